"""Cost of ``layerhessians match`` on the seed grid with replicates: 12 settings x R
replicates (default 5: 60 runs) of ``--epochs`` epochs (default 50), LeNet's 5 layer blocks
plus the full Hessian, ``--metric both`` (the default W1 and the paper's metric), the default
number of bootstrap draws (200), pooled per setting (issue 20's cost goal: under 10 minutes
on 2 cores).

    python benchmarks/bench_match.py --out benchmarks/results/match.json
    python benchmarks/bench_match.py --runs 10 --epochs 10    # a quick look

The runs are synthetic, written in the documented run format into a temporary folder:
every spectrum has ``--nodes`` Ritz values (default 128, the paper's Lanczos steps) from one
SLQ vector, so the full spectrum and every layer are resampled (Dirichlet weights, the
dearest case; real runs with exact layer spectra resample the full spectrum only);
``--layers exact`` gives the layers exact spectra of 1,001 eigenvalues instead. The whole
``match_runs`` (distances, pooling, CSVs, figures; ``--workers`` processes, default 2) is timed
once, in wall and in CPU seconds of all processes (the CPU time divided by the workers is the
estimate for idle cores; a smaller ``--runs`` is scaled to 60 x 50); the per-draw computation
this replaced (one density per measure and draw) is timed on ``--reference-epochs`` epochs of
one run in the same process and scaled to the whole grid for the ratio. Single-threaded
(torch, BLAS); the load average is printed beside the times (the machine is shared).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from layerhessians.analysis import matching as compare  # noqa: E402
from layerhessians.analysis.report import match_runs  # noqa: E402
from layerhessians.store.run import load_run  # noqa: E402
from layerhessians.vocabulary import DEFAULT_REPLICATES  # noqa: E402

LAYERS = {"conv1.weight": 150, "conv2.weight": 2400, "fc1.weight": 48000,
          "fc2.weight": 10080, "fc3.weight": 840}
MODELS = ("LeNet", "VGG11_bn", "ResNet18")
DATASETS = ("MNIST", "FashionMNIST", "SVHN", "CIFAR10")


def write_run(path: Path, setting: int, seed: int, epochs: int, nodes: int, layers: str):
    """A synthetic run: spectra for epochs 1..epochs, one vector per block."""
    rng = np.random.default_rng(1000 * setting + seed)
    (path / "images").mkdir(parents=True, exist_ok=True)
    blocks = ["full", *LAYERS]
    frames = []
    for epoch in range(1, epochs + 1):
        for block in blocks:
            exact = layers == "exact" and block != "full"
            k = 1001 if exact else nodes
            x = np.sort(rng.gamma(0.5, 1.0 + epoch / 10, size=k) - 0.2 * rng.random())
            w = rng.dirichlet(np.full(k, 0.5))
            frame = pd.DataFrame({"epoch": epoch, "block": block, "vector": 0, "node": x,
                                  "weight": w})
            frame["method"] = "exact" if exact else "slq"
            frames.append(frame)
    pd.concat(frames).to_csv(path / "spectra.csv", index=False)
    pd.DataFrame({"epoch": range(1, epochs + 1), "lr": 0.01, "train_loss": 1.0,
                  "train_acc": 0.5, "test_loss": 1.0, "test_acc": 0.5}).to_csv(
        path / "metrics.csv", index=False)
    dims = {**LAYERS, "full": 61706}
    config = {"model": MODELS[setting % 3], "dataset": DATASETS[setting // 3 % 4],
              "seed": seed, "num_epochs": epochs, "blocks": blocks, "block_dims": dims,
              "hessian": {"iterations": nodes, "vectors": 1, "subset_seed": 0}}
    (path / "config.json").write_text(json.dumps(config))
    return path


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (user + system)."""
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                          resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=60, help="runs (default 60 = 12 settings x 5)")
    p.add_argument("--replicates", type=int, default=5, help="runs per setting (default 5)")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--nodes", type=int, default=128)
    p.add_argument("--draws", type=int, default=DEFAULT_REPLICATES)
    p.add_argument("--layers", choices=("slq", "exact"), default="slq")
    p.add_argument("--reference-epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=2,
                   help="match processes (default 2: the goal's 2 cores)")
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        start = time.perf_counter()
        paths = [write_run(root / f"s{i // args.replicates},run{i % args.replicates + 1}",
                           i // args.replicates, i % args.replicates, args.epochs, args.nodes,
                           args.layers) for i in range(args.runs)]
        runs = [load_run(p) for p in paths]
        setup = time.perf_counter() - start
        print(f"bench_match: {args.runs} synthetic runs x {args.epochs} epochs written and "
              f"read in {setup:.1f} s", flush=True)

        # the per-draw computation this replaced, on a few epochs of one run
        epochs = list(range(1, args.reference_epochs + 1))
        batched = compare._batched_draws
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        compare.distance_table(runs[0], [compare.DEFAULT_DISTANCE, "paper"], epochs=epochs,
                               replicates=args.draws)
        new_small = time.perf_counter() - start
        compare._batched_draws = lambda *a, **k: None
        try:
            start = time.perf_counter()
            compare.distance_table(runs[0], [compare.DEFAULT_DISTANCE, "paper"],
                                   epochs=epochs, replicates=args.draws)
            old_small = time.perf_counter() - start
        finally:
            compare._batched_draws = batched

        start, cpu = time.perf_counter(), _cpu_seconds()
        _, summary, _ = match_runs(runs, metrics=("both",), out=root / "match",
                                   replicates=args.draws, dpi=60, workers=args.workers,
                                   stream=open(os.devnull, "w"))
        total, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
        load_after = os.getloadavg()[0]
    run_epochs = args.runs * args.epochs
    old_total = old_small / len(epochs) * run_epochs
    settings = summary.attrs["settings"]
    scale = 60 * 50 / run_epochs  # to the seed grid with 5 replicates
    rows = [(f"match_runs, wall ({args.workers} workers)", total),
            ("match_runs, CPU seconds (all processes)", cpu),
            (f"  CPU / {args.workers} cores, scaled to 60 runs x 50 epochs", cpu / args.workers
             * scale),
            (f"per-draw loop it replaced, scaled from {len(epochs)} epochs x 1 run", old_total),
            (f"batched, same {len(epochs)} epochs x 1 run, scaled", new_small / len(epochs)
             * run_epochs)]
    print(f"\n{args.runs} runs ({settings['setting'].nunique()} settings x "
          f"{args.replicates} replicates), {args.epochs} epochs, {args.nodes} nodes, layers "
          f"{args.layers}, {args.draws} draws, metrics w1-maxabs + paper; 1 thread; load "
          f"average {load_before:.1f} before, {load_after:.1f} after (2 cores, shared)")
    print(f"{'what':<70} {'seconds':>10} {'minutes':>8}")
    for name, seconds in rows:
        print(f"{name:<70} {seconds:>10.1f} {seconds / 60:>8.1f}")
    estimate = cpu / args.workers * scale
    print(f"speed-up of the distances (per-draw / batched): {old_small / new_small:.1f}x; "
          f"goal (60 runs x 50 epochs < 10 min on 2 cores): "
          f"{'met' if estimate < 600 else 'NOT met'} by the CPU-time estimate "
          f"({estimate / 60:.1f} min; wall times depend on the load)")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "runs": args.runs, "replicates": args.replicates, "epochs": args.epochs,
            "nodes": args.nodes, "layers": args.layers, "draws": args.draws, "threads": 1,
            "load_average": [load_before, load_after], "seconds_match_runs": total,
            "cpu_seconds_match_runs": cpu, "workers": args.workers,
            "estimate_minutes_60x50_on_2_cores": estimate / 60,
            "seconds_per_draw_loop_scaled": old_total,
            "speedup_distances": old_small / new_small, "goal_met": estimate < 600,
            "python": platform.python_version(), "cpus": os.cpu_count()}, indent=1))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
