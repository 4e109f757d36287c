"""The Hessian-trace-regularisation finding on real data: train the grid, then write the
table, the tests and the figures.

    python experiments/htr_finding.py                 # train (resumable) + analyse
    python experiments/htr_finding.py --stage analyze # tables and figures from the runs

LeNet on MNIST5k with the original's LeNet/MNIST settings (SGD momentum 0.9, lr 1e-2,
batch 256, 30 epochs, milestones 10 20, lr factor 0.25), ``--reruns`` seeds each:

- ``sgd``, ``l2`` (weight decay 1e-4), ``htr`` (the original's: gamma 1e-3, 10 Gaussian
  Hutchinson probes on every 50th step of an epoch from epoch 11), and with
  ``--extra-reruns`` seeds ``htr+l2`` (its ``combined``) and ``paper-middle`` (its
  ``middle``: gamma 1e-4 on its parameter-list mask);
- ``ggn`` (1 output-space probe every step from epoch 1) and ``ggn-middle`` (the middle
  layers by depth), batched form, with gamma chosen on MNIST5k-val (MNIST5k's training images split
  3,200 / 800; the test images are never used to choose) among ``--gammas``: the lowest mean
  validation error at the last epoch over ``--tune-reruns`` seeds (ties: the smaller gamma).

Spectra (exact layer blocks, 128-step SLQ of the full Hessian) at initialisation and every
``--hessian-every`` epochs. Two sweeps run in parallel, one torch thread each. Outputs:
runs under ``--root`` (git-ignored), the table, tests and figures under ``--out``.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from layerhessians.pipeline.regularization_grid import MNIST_BASE, grid, mnist_methods  # noqa: E402

FIRST = ("sgd", "l2", "htr", "htr+l2", "paper-middle")
GGN = ("ggn", "ggn-middle")
#: the methods other than ggn in two parallel chains; the last two are extras (--extra-reruns)
CHAINS = (("sgd", "l2", "htr+l2"), ("htr", "paper-middle"))
EXTRA = ("htr+l2", "paper-middle")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("all", "train", "analyze"), default="all")
    p.add_argument("--root", default="runs/htr-finding", help="run directories (default %(default)s)")
    p.add_argument("--out", default="docs/figures/htr", help="tables and figures (default %(default)s)")
    p.add_argument("--reruns", type=int, default=5, help="seeds per method (default 5)")
    p.add_argument("--extra-reruns", type=int, default=3,
                   help="seeds of htr+l2 and paper-middle (default 3)")
    p.add_argument("--tune-reruns", type=int, default=2, help="seeds per gamma when tuning (default 2)")
    p.add_argument("--gammas", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1],
                   help="ggn gammas tried on the validation split (default 1e-3 1e-2 1e-1)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (default 30; fewer: smoke test)")
    p.add_argument("--hessian-every", type=int, default=5, help="spectra every N epochs (default 5)")
    p.add_argument("--tuned", action="store_true",
                   help="choose gamma from the complete tuning runs already there (no tuning "
                        "sweep)")
    p.add_argument("--methods", nargs="+", default=[*FIRST, *GGN],
                   help="methods to train (default all)")
    return p.parse_args(argv)


def base_flags(args) -> dict:
    return {**MNIST_BASE, "dataset": "MNIST5k", "num_epochs": args.epochs, "threads": 1,
            "examples_per_class": 10, "init_spectra": True, "layer_spectra": "auto",
            "hessian_every": args.hessian_every}


def sweep(grid_file: Path, root: Path, reruns: int, log: Path, only=None) -> subprocess.Popen:
    command = [sys.executable, "-m", "layerhessians", "sweep", str(grid_file), "--root", str(root),
               "--replicates", str(reruns), "--threads", "1", "--no-match", "--no-plots"]
    if only:
        command += ["--only", only]
    print("$", " ".join(command), f"> {log}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=log.open("a"), stderr=subprocess.STDOUT, env=env)


class _Chain:
    """Sweeps of one grid's entries one after another, in a background thread."""

    def __init__(self, path, root, methods, args, name):
        import threading

        self.args, self.returncode = name, None
        self._thread = threading.Thread(target=self._run, args=(path, root, methods, args, name))
        self._thread.start()

    def _run(self, path, root, methods, args, name):
        self.returncode = 0
        for method in methods:
            reruns = args.extra_reruns if method in EXTRA else args.reruns
            job = sweep(path, root, reruns, root / "logs" / f"{name}.log", only=method)
            if job.wait() != 0:
                self.returncode = 1

    def wait(self) -> int:
        self._thread.join()
        return self.returncode


def chained_sweeps(path, root, methods, args, name) -> _Chain:
    return _Chain(path, root, methods, args, name)


def write_grid(path: Path, content: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=1))
    return path


def run_name(method: str, index: int, reruns: int) -> str:
    """A sweep's run directory name: the method's, ``,runK`` with several reruns."""
    return method if reruns == 1 else f"{method},run{index}"


def complete(run_dir: Path, epochs: int) -> bool:
    """Whether ``run_dir``'s metrics reach epoch ``epochs``."""
    import pandas as pd

    metrics = run_dir / "metrics.csv"
    return metrics.is_file() and len(pd.read_csv(metrics)) > 0 and \
        int(pd.read_csv(metrics)["epoch"].max()) >= epochs


def last_test_acc(run_dir: Path):
    import pandas as pd

    metrics = run_dir / "metrics.csv"
    if not metrics.is_file():
        return None
    table = pd.read_csv(metrics)
    return float(table["test_acc"].iloc[-1]) if len(table) else None


def choose_gamma(args, root: Path) -> dict:
    """The ggn gamma with the lowest mean validation error (ties: the smaller gamma)."""
    import numpy as np

    rows = []
    for gamma in args.gammas:
        dirs = [root / "tune" / run_name(f"ggn,gamma={gamma:g}", k, args.tune_reruns)
                for k in range(1, args.tune_reruns + 1)]
        accs = [last_test_acc(d) for d in dirs if complete(d, args.epochs)]
        if not accs:
            raise SystemExit(f"no complete tuning run for gamma {gamma:g}")
        rows.append({"gamma": gamma, "runs": len(accs), "val_error": [1 - a for a in accs],
                     "mean_val_error": float(np.mean([1 - a for a in accs]))})
    best = min(rows, key=lambda r: (round(r["mean_val_error"], 6), r["gamma"]))
    result = {"chosen_gamma": best["gamma"], "dataset": "MNIST5k-val (3,200 train / 800 validation)",
              "seeds": f"100..{99 + args.tune_reruns}", "candidates": rows}
    (root / "tuning.json").write_text(json.dumps(result, indent=1))
    tried = ", ".join(f"{r['gamma']:g}: {100 * r['mean_val_error']:.2f}%" for r in rows)
    print(f"ggn gamma chosen on the validation split: {best['gamma']:g} ({tried})", flush=True)
    return result


def train(args) -> None:
    root = Path(args.root)
    base = base_flags(args)
    jobs = []
    first = {k: v for k, v in mnist_methods().items() if k in args.methods}
    if first:
        path = write_grid(root / "grids" / "methods.json",
                          grid(first, base, description="HTR finding: baselines and the original's HTR"))
        chains = [[m for m in CHAIN if m in first] for CHAIN in CHAINS]
        for index, chain in enumerate(chains):
            if chain:
                jobs.append(chained_sweeps(path, root, chain, args, f"methods-{index + 1}"))
    if any(m in args.methods for m in GGN):
        tune = {f"ggn,gamma={g:g}": {**mnist_methods(g)["ggn"], "seed": 100} for g in args.gammas}
        tune_base = {**base, "dataset": "MNIST5k-val", "init_spectra": False, "layers": False,
                     "hessian_iterations": 8, "hessian_every": args.epochs}
        path = write_grid(root / "grids" / "tune.json",
                          grid(tune, tune_base, description="HTR finding: ggn gamma on MNIST5k-val"))
        if not args.tuned:
            tuner = sweep(path, root / "tune", args.tune_reruns, root / "logs" / "tune.log")
            if tuner.wait() != 0:
                raise SystemExit(f"tuning failed: see {root / 'logs' / 'tune.log'}")
        gamma = choose_gamma(args, root)["chosen_gamma"]
        for name, settings in mnist_methods(gamma).items():  # one sweep each, in parallel
            if name in GGN and name in args.methods:
                path = write_grid(root / "grids" / f"{name}.json",
                                  grid({name: settings}, base,
                                       description=f"HTR finding: {name}, gamma {gamma:g}"))
                jobs.append(sweep(path, root, args.reruns, root / "logs" / f"{name}.log"))
    failed = [job.args for job in jobs if job.wait() != 0]
    if failed:
        raise SystemExit(f"a sweep failed: {failed}")


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    if args.stage in ("all", "train"):
        train(args)
        print(f"trained in {time.time() - start:.0f} s", flush=True)
    if args.stage in ("all", "analyze"):
        from htr_analysis import analyze  # experiments/htr_analysis.py

        analyze(Path(args.root), Path(args.out), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
