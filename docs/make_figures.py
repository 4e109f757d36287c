"""Regenerate every figure and number the README shows, from runs of the current code.

    python docs/make_figures.py            # every step (hours on one core: see --jobs)
    python docs/make_figures.py --epochs 2 --replicates 2 --skip-quick   # a smoke test

Every run lives under this script's own root, ``runs/figures/`` (never the README's
hands-on ``runs/mnist5k-lenet`` or ``runs/quick``), and a run found there is reused only when
its config.json holds the settings this script asks for (else the script stops and says
what differs; ``--fresh`` starts over). Steps (each prints what it runs and where it writes;
offline, CPU):

1. the quick grid: ``layerhessians reproduce --quick --root runs/figures/quick`` (LeNet on
   MNIST5k and on Digits), whose match figures and each run's overview and layer-distance
   figures are copied into ``docs/figures/``;
2. one real-data run in detail: LeNet on MNIST5k with the seed's LeNet/MNIST
   hyperparameters (``-lr 1e-2 -l2 0 -b 256 -o sgd``), the paper's 128 Lanczos steps, 10
   examples per class, spectra from initialisation on, exact layer spectra, 3 random vectors
   for the full spectrum's spread, in ``runs/figures/mnist5k-lenet``; then the match by the
   default metric and the paper's (``--metric both``); its figures are copied into
   ``docs/figures/mnist5k_lenet_*``;
3. the finding, replicated: LeNet on MNIST5k and on Digits with the same hyperparameters,
   ``--replicates`` training seeds (default 5) on each of ``--subsets`` Hessian subsets
   (default 2), one SLQ vector per spectrum, trained by ``layerhessians sweep --replicates``
   (``--jobs`` sweeps in parallel, one thread each) under ``runs/figures/finding``; then
   ``match --metric both`` pooled over the replicates of each setting, once for the runs of
   the first subset (training seeds only) and once for all (seeds and subsets); figures into
   ``docs/figures/finding_*``;
4. the Hessian-trace-regularisation finding: ``python experiments/htr_finding.py --root
   runs/figures/htr-finding --out docs/figures/htr`` (LeNet on MNIST5k, the original's
   MNIST settings, SGD / L2 / the original's HTR / ggn HTR, all and middle layers, 5 reruns
   each, gamma tuned on a validation split; resumable), whose table, numbers and figures
   land in ``docs/figures/htr/`` (``--htr-args`` passes options to it).

Finally ``docs/figures/numbers.json`` gets every number the README quotes: each step's
wall time with the thread count and load average, the verdicts per metric with their
spread, the block-diagonal baseline and the final accuracies.
"""

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIGURES = REPO / "docs" / "figures"
#: this script's own run root: the README's hands-on commands never write here
ROOT = Path("runs/figures")
QUICK_ROOT = ROOT / "quick"
MNIST_RUN = ROOT / "mnist5k-lenet"
MNIST_MATCH = ROOT / "mnist5k-lenet-match"
FINDING_ROOT = ROOT / "finding"
HTR_ROOT = ROOT / "htr-finding"
#: the seed's LeNet/MNIST hyperparameters and the paper's spectra settings
SEED_LENET = {"model": "LeNet", "learning_rate": 1e-2, "weight_decay": 0.0, "batch_size": 256,
              "optimizer": "sgd", "examples_per_class": 10, "hessian_iterations": 128,
              "layer_spectra": "auto"}
MNIST_FLAGS = ["-m", "LeNet", "-d", "MNIST5k", "-lr", "1e-2", "-l2", "0", "-b", "256",
               "-o", "sgd", "--examples_per_class", "10", "--hessian-iterations", "128",
               "--init-spectra", "--layer-spectra", "auto"]
MNIST_SETTINGS = {**SEED_LENET, "dataset": "MNIST5k", "init_spectra": True}
FINDING_DATASETS = ("MNIST5k", "Digits")
#: quick-grid run directories and the names their figures get in docs/figures
QUICK_RUNS = {"model=LeNet,dataset=MNIST5k,quick": "lenet_mnist5k_quick",
              "model=LeNet,dataset=Digits,quick": "lenet_digits"}
RUN_FIGURES = ("overview_full", "layer_distances")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(ROOT),
                   help=f"this script's run root (default {ROOT}; another one for smoke tests)")
    p.add_argument("--skip-quick", action="store_true", help="skip step 1 (the quick grid)")
    p.add_argument("--skip-mnist", action="store_true", help="skip step 2 (real MNIST)")
    p.add_argument("--skip-finding", action="store_true",
                   help="skip step 3 (the replicated finding)")
    p.add_argument("--skip-htr", action="store_true",
                   help="skip step 4 (the regularisation finding)")
    p.add_argument("--htr-args", default="",
                   help="step 4: options for experiments/htr_finding.py, one string "
                        "(e.g. '--epochs 2 --reruns 2' for a smoke test)")
    p.add_argument("--train-only", action="store_true",
                   help="step 3: train (or resume) the replicated runs, then stop")
    p.add_argument("--replicates", type=int, default=5,
                   help="step 3: training seeds per setting (default 5)")
    p.add_argument("--subsets", type=int, default=2,
                   help="step 3: Hessian subsets (subset seeds 0..N-1), each with every "
                        "training seed (default 2)")
    p.add_argument("--subset-replicates", type=int, default=None,
                   help="step 3: training seeds on the Hessian subsets after the first "
                        "(default: --replicates)")
    p.add_argument("--finding-draws", type=int, default=200,
                   help="step 3: bootstrap draws per run (default 200, match's default)")
    p.add_argument("--jobs", type=int, default=2,
                   help="step 3: sweeps training in parallel, and match processes, one thread "
                        "each (default 2)")
    p.add_argument("--epochs", type=int, default=50,
                   help="training epochs of the real-MNIST run (default 50; fewer for a "
                        "smoke test)")
    p.add_argument("--vectors", type=int, default=3,
                   help="random start vectors of the full spectrum's SLQ in the real-MNIST "
                        "run; their spread gives the distances' spread (default 3)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch (and BLAS) threads of every step (default 1)")
    p.add_argument("--fresh", action="store_true",
                   help="delete the run directories of the steps that run first (under "
                        f"{ROOT}) instead of reusing them")
    p.add_argument("--draws", type=int, default=50,
                   help="bootstrap draws behind each distance's spread and the verdicts "
                        "(default 50: with exact layer spectra and 3 vectors a draw is one "
                        "of 10 multisets of the full spectrum's vectors; the paper metric "
                        "costs about 0.15 s per draw and epoch on one core)")
    p.add_argument("--dpi", type=int, default=150, help="resolution of the PNGs (default 150)")
    args = p.parse_args(argv)
    args.subset_replicates = args.subset_replicates or args.replicates
    if min(args.epochs, args.vectors, args.threads, args.draws, args.replicates, args.subsets,
           args.jobs) < 1:
        p.error("--epochs, --vectors, --threads, --draws, --replicates, --subsets and --jobs "
                "must be >= 1")
    return args


def load_average() -> list:
    return [round(x, 2) for x in os.getloadavg()]


def clean(value):
    """JSON-safe ``value``: NaN -> None, numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Steps:
    """Wall time, thread count and load average of each step, for numbers.json."""

    def __init__(self, threads):
        self.threads, self.records = threads, []

    def run(self, name, function, command=None, status=None):
        before = load_average()
        print(f"\n== {name}" + (f"\n$ {command}" if command else ""), flush=True)
        start = time.time()
        result = function()
        seconds = time.time() - start
        self.records.append({"step": name, "command": command, "status": status,
                             "seconds": round(seconds, 1),
                             "threads": self.threads, "load_average_before": before,
                             "load_average_after": load_average()})
        print(f"== {name}: {seconds:.1f} s (load average before {before}, after "
              f"{load_average()})", flush=True)
        return result


def call(argv, env):
    rc = subprocess.call(argv, cwd=REPO, env=env)
    if rc:
        sys.exit(f"make_figures: `{' '.join(argv)}` failed (exit {rc}); run this script "
                 "again to resume")


def shown(path):
    """``path`` relative to the repository where it lies inside it (a ``--root`` elsewhere
    is shown as it is)."""
    path = Path(path)
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def copy(src, name):
    FIGURES.mkdir(parents=True, exist_ok=True)
    dst = FIGURES / name
    shutil.copyfile(REPO / src, dst)
    print(f"copied {src} -> {dst.relative_to(REPO)}", flush=True)
    return str(dst.relative_to(REPO))


def made_here(path, flags) -> None:
    """Stop unless the run in ``path`` (if any) holds the settings ``flags`` asks for (by
    ``layerhessians train`` destination; ``num_epochs`` may be smaller: it is resumed).
    A run this script did not make with its own settings is never reused."""
    from layerhessians.training.config import HESSIAN_FLAGS, TrainConfig, apply_flags

    config_file = REPO / path / "config.json"
    if not config_file.is_file():
        return
    from layerhessians.store.record import RunRecord

    stored = RunRecord.from_dict(json.loads(config_file.read_text()))
    recorded = TrainConfig.from_dict(stored.training_settings())
    wanted = apply_flags(TrainConfig(), flags).validated()
    differ = []
    for key in flags:
        if key in ("num_epochs", "threads"):
            continue
        field = HESSIAN_FLAGS.get(key)
        have, want = ((getattr(recorded.hessian, field), getattr(wanted.hessian, field))
                      if field else (getattr(recorded, key), getattr(wanted, key)))
        if json.dumps(have, default=str) != json.dumps(want, default=str):
            differ.append(f"{key} {have!r} (asked {want!r})")
    if differ:
        sys.exit(f"make_figures: {path} holds a run with other settings ({'; '.join(differ)}); "
                 "this script reuses only the runs it made: remove it or pass --fresh")


def summary_rows(path) -> dict:
    """``{metric: row}`` of a ``match_distros_summary.csv`` (one run)."""
    import pandas as pd

    frame = pd.read_csv(REPO / path, keep_default_na=True)
    return {row["metric"]: clean(row.to_dict()) for _, row in frame.iterrows()}


def run_numbers(run) -> dict:
    """Accuracies and timings of a loaded run (its metrics.csv)."""
    m = run.metrics
    last = m.iloc[-1]
    spectra = m["spectra_seconds"].dropna() if "spectra_seconds" in m else []
    return clean({
        "epochs": int(last["epoch"]), "final_test_acc": float(last["test_acc"]),
        "final_test_loss": float(last["test_loss"]), "final_train_acc": float(last["train_acc"]),
        "final_train_loss": float(last["train_loss"]),
        "best_test_acc": float(m["test_acc"].max()),
        "train_seconds_total": float(m["train_seconds"].sum()),
        "spectra_seconds_total": float(sum(spectra)),
        "spectra_seconds_median_per_epoch": float(spectra.median()) if len(spectra) else None,
        "threads": run.record.facts.get("threads"),
    })


def per_epoch_counts(distances, metric) -> dict:
    """Per layer: at how many epochs it is closest, and significantly closest."""
    from layerhessians.analysis import matching

    rows = distances[distances["metric"] == metric]
    verdicts = matching.epoch_verdicts(rows)
    layers = rows.drop_duplicates("layer").sort_values("index")
    out = {}
    for _, layer in layers.iterrows():
        mine = verdicts[verdicts["layer"] == layer["layer"]]
        out[layer["layer"]] = {"depth": float(layer["depth"]), "share": float(layer["share"]),
                               "closest_epochs": int(len(mine)),
                               "significantly_closest_epochs": int(mine["significant"].sum())}
    return clean({"epochs": int(len(verdicts)),
                  "no_significant_layer_epochs": int((~verdicts["significant"]).sum()),
                  "layers": out})


def profiles(distances, summary, metric) -> list:
    """Per layer: the distance summed over training and at the peak, with intervals."""
    from layerhessians.analysis import matching

    rows = distances[distances["metric"] == metric]
    peak = summary[metric]["peak_epoch"]
    summed = matching.profile(rows).set_index("layer")
    at_peak = matching.profile(rows, peak).set_index("layer")
    return clean([{"layer": layer, "depth": float(r["depth"]), "share": float(r["share"]),
                   "summed": float(r["distance"]), "summed_low": float(r["low"]),
                   "summed_high": float(r["high"]),
                   "at_peak": float(at_peak.loc[layer, "distance"]),
                   "at_peak_low": float(at_peak.loc[layer, "low"]),
                   "at_peak_high": float(at_peak.loc[layer, "high"])}
                  for layer, r in summed.iterrows()])


def quick_step(args, steps, env, numbers):
    from layerhessians.pipeline.grid import load_grid
    from layerhessians.store.run import load_run

    cmd = ["layerhessians", "reproduce", "--quick", "--root", str(QUICK_ROOT),
           "--threads", str(args.threads)]
    for entry in load_grid("quick"):
        made_here(QUICK_ROOT / entry.run, {**entry.flags, "threads": args.threads})
    complete = [r.run for r in load_grid("quick") if r.is_complete(REPO / QUICK_ROOT)]
    status = ("trained" if not complete else
              f"runs already complete, reused (only plot + match timed): {', '.join(complete)}")
    steps.run("quick grid", lambda: call(cmd, env), " ".join(cmd), status)
    figures = [copy(QUICK_ROOT / f"{name}.png", f"{name}.png")
               for name in ("match_distros_wasserstein", "match_distros_peak")]
    runs = {}
    for run_dir, prefix in QUICK_RUNS.items():
        path = QUICK_ROOT / run_dir
        figures += [copy(path / "images" / f"{f}.png", f"{prefix}_{f}.png") for f in RUN_FIGURES]
        runs[run_dir] = run_numbers(load_run(REPO / path))
    summary = {}
    import pandas as pd

    frame = pd.read_csv(REPO / QUICK_ROOT / "match_distros_summary.csv")
    for _, row in frame.iterrows():
        summary.setdefault(row["run"], {})[row["metric"]] = clean(row.to_dict())
    numbers["quick"] = {"command": " ".join(cmd), "root": str(QUICK_ROOT), "runs": runs,
                        "match": summary, "figures": figures}


def mnist_step(args, steps, env, numbers):
    import torch

    from layerhessians.analysis.report import make_figures, match_runs
    from layerhessians.store.run import load_run
    from layerhessians.store.writer import RunStore

    path = REPO / MNIST_RUN
    made_here(MNIST_RUN, {**MNIST_SETTINGS, "hessian_vectors": args.vectors})
    done = RunStore(path).completed_epoch if path.is_dir() else None
    if done is not None and done >= args.epochs:
        status = f"complete (epoch {done}), reused"
        print(f"\n== real MNIST: {MNIST_RUN} is {status}", flush=True)
        cmd = None
    else:
        if done is None:
            if path.exists():
                shutil.rmtree(path)  # a run that never committed an epoch: start over
            cmd = ["layerhessians", "train", *MNIST_FLAGS, "-n", str(args.epochs),
                   "--hessian-vectors", str(args.vectors), "--threads", str(args.threads),
                   "-r", str(MNIST_RUN), "--no-progress"]
            status = "new"
        else:
            cmd = ["layerhessians", "train", "-r", str(MNIST_RUN), "--resume",
                   "-n", str(args.epochs), "--no-progress"]
            status = f"resumed after epoch {done}"
        steps.run("real MNIST: train LeNet on MNIST5k", lambda: call(cmd, env),
                  " ".join(cmd), status)
    run = load_run(path)
    torch.set_num_threads(args.threads)
    epochs = list(range(1, args.epochs + 1))

    def match():
        return match_runs([run], metrics=("both",), out=REPO / MNIST_MATCH, epochs=epochs,
                          dpi=args.dpi, replicates=args.draws)

    distances, summary_frame, written = steps.run(
        "real MNIST: match (--metric both)", match,
        f"layerhessians match {MNIST_RUN} --metric both --epochs 1-{args.epochs} "
        f"--draws {args.draws} --out {MNIST_MATCH}")
    for p in written:
        print(f"saved: {shown(p)}")
    images = REPO / MNIST_MATCH / "images"

    # the run's own figures by the default metric (the paper metric's per-epoch heat map
    # would repeat the match's most expensive computation; its panel is in the match figure)
    steps.run("real MNIST: per-run figures (w1-maxabs)",
              lambda: make_figures(run, out=images, dpi=args.dpi, epochs=f"0-{args.epochs}",
                                   replicates=args.draws),
              f"make_figures(load_run('{MNIST_RUN}'), epochs='0-{args.epochs}', "
              f"draws={args.draws}) (= layerhessians plot, fewer draws)")
    figures = [copy(MNIST_MATCH / f"{name}.png", f"mnist5k_lenet_{name}.png")
               for name in ("match_distros_wasserstein", "match_distros_peak")]
    rel = shown(images)
    figures += [copy(rel / f"{name}.png", f"mnist5k_lenet_{name}.png")
                for name in ("overview_full", "layer_distances", "best_match", "training_curves")]

    summary = summary_rows(MNIST_MATCH / "match_distros_summary.csv")
    stored = run.record.training_settings()
    numbers["mnist"] = {
        "run": str(MNIST_RUN), "match": str(MNIST_MATCH),
        "train_command": "layerhessians train " + " ".join(MNIST_FLAGS) + f" -n {args.epochs} "
                         f"--hessian-vectors {args.vectors} --threads {args.threads} "
                         f"-r {MNIST_RUN}",
        "settings": clean({k: stored.get(k) for k in (
            "model", "dataset", "optimizer", "learning_rate", "weight_decay", "momentum",
            "batch_size", "num_epochs", "examples_per_class", "seed", "threads")}
            | {"hessian": stored.get("hessian")}),
        "training": run_numbers(run),
        "draws": args.draws,
        "verdicts": summary,
        "profiles": {m: profiles(distances, summary, m) for m in summary},
        "per_epoch": {m: per_epoch_counts(distances, m) for m in summary},
        "figures": figures,
    }


def finding_grid(args) -> list:
    """The finding's grid entries: per dataset and Hessian subset, the seed's LeNet setting
    (``--replicates`` expands each into training seeds 0..R-1)."""
    from layerhessians.pipeline.grid import GridRun

    # named as the seed grid (",run1"), so one replicate keeps the ",run1" of its folder
    return [GridRun(f"model=LeNet,dataset={dataset},te" + (f",subset{s}" if s else "") + ",run1",
                    {**SEED_LENET, "dataset": dataset, "num_epochs": args.epochs,
                     "hessian_vectors": 1, "hessian_subset_seed": s})
            for dataset in FINDING_DATASETS for s in range(args.subsets)]


def finding_train(args, steps, env):
    """Train the finding's replicated runs: ``--jobs`` sweeps in parallel (one per group of
    grid entries), each logging to ``FINDING_ROOT/sweep-K.log``."""
    from layerhessians.pipeline.replicates import replicate_grid

    entries = finding_grid(args)
    counts = {e.run: args.replicates if not e.flags["hessian_subset_seed"] else
              args.subset_replicates for e in entries}
    runs = [r for e in entries for r in replicate_grid([e], counts[e.run])]
    for run in runs:
        made_here(FINDING_ROOT / run.run, {**run.flags, "threads": 1})
    root = REPO / FINDING_ROOT
    root.mkdir(parents=True, exist_ok=True)
    grid = root / "grid.json"
    grid.write_text(json.dumps({"description": "make_figures.py: the replicated finding",
                                "runs": [{"run": e.run, "flags": e.flags} for e in entries]},
                               indent=1))
    jobs = min(args.jobs, len(entries))
    # contiguous groups (one dataset each by default): every job trains its first subset's
    # training seeds before the next subset's; one sweep per grid entry, one after another
    bounds = [round(k * len(entries) / jobs) for k in range(jobs + 1)]
    groups = [entries[a:b] for a, b in zip(bounds, bounds[1:])]
    commands = [" && ".join(shlex.join([
        "layerhessians", "sweep", str(FINDING_ROOT / "grid.json"), "--root", str(FINDING_ROOT),
        "--replicates", str(counts[e.run]), "--threads", "1", "--no-match", "--no-plots",
        "--train-args=--no-progress", "--only", e.run]) for e in group) for group in groups]

    def train_all():
        logs = [open(root / f"sweep-{k + 1}.log", "a") for k in range(jobs)]
        procs = [subprocess.Popen(["bash", "-c", c], cwd=REPO, env=env, stdout=log,
                                  stderr=subprocess.STDOUT) for c, log in zip(commands, logs)]
        total = len(runs)
        while any(p.poll() is None for p in procs):
            time.sleep(30)
            done = sum(1 for r in runs if r.is_complete(root))
            print(f"finding: {done}/{total} runs complete (logs: {FINDING_ROOT}/sweep-*.log)",
                  flush=True)
        for log in logs:
            log.close()
        failed = [c for c, p in zip(commands, procs) if p.returncode]
        if failed:
            sys.exit(f"make_figures: `{failed[0]}` failed (see {FINDING_ROOT}/sweep-*.log); "
                     "run this script again to resume")

    status = f"{sum(1 for r in runs if r.is_complete(root))} of {len(runs)} runs complete"
    steps.run("finding: train the replicated runs", train_all, " & ".join(commands), status)
    return entries, runs


def set_root(root) -> None:
    """Place every run of this script under ``root``."""
    global ROOT, QUICK_ROOT, MNIST_RUN, MNIST_MATCH, FINDING_ROOT, HTR_ROOT
    ROOT = root
    QUICK_ROOT, MNIST_RUN = root / "quick", root / "mnist5k-lenet"
    MNIST_MATCH, FINDING_ROOT = root / "mnist5k-lenet-match", root / "finding"
    HTR_ROOT = root / "htr-finding"


def pooled_rows(table) -> list:
    """The pooled table's rows as JSON-ready dicts (without the long ``runs`` column)."""
    return [clean(r) for r in table.drop(columns=["runs"]).to_dict("records")]


def best_rows(table) -> list:
    """Per setting, metric and scope: the closest layer's row and the verdict."""
    out = []
    for _, rows in table.groupby(["setting", "metric", "scope"], sort=False):
        out.append(clean(rows.loc[rows["distance"].idxmin()].drop("runs").to_dict()))
    return out


def single_run_verdicts(summary, subset_of) -> list:
    """Per run and metric: its own verdict (one run, SLQ spread only) and baseline."""
    rows = []
    for _, r in summary.iterrows():
        rows.append(clean({
            "run": r["run"], "dataset": r["dataset"], "metric": r["metric"],
            "subset_seed": subset_of[r["run"]],
            "summed_layer": r["best_layer"], "summed_significant": bool(r["best_significant"]),
            "summed_distance": r["best_summed"], "summed_mixture": r["mixture_summed"],
            "peak_epoch": r["peak_epoch"], "peak_layer": r["peak_layer"],
            "peak_significant": bool(r["peak_significant"]),
            "peak_distance": r["peak_distance"], "peak_mixture": r["mixture_peak"]}))
    return rows


def finding_match(args, steps, numbers, entries, runs):
    """Match the finding's runs once (both metrics, every run's distances with their draws),
    pool them per setting (training seeds x Hessian subsets), and again per Hessian subset
    (training seeds only); copy the figures and record the numbers."""
    from layerhessians.analysis import pooling
    from layerhessians.analysis.report import match_runs
    from layerhessians.store.run import load_run
    from layerhessians.training.config import TrainConfig

    root = REPO / FINDING_ROOT
    missing = [r.run for r in runs if not r.is_complete(root)]
    if missing:
        sys.exit(f"make_figures: {len(missing)} finding runs are not complete ({missing[0]}, "
                 "...); run this script again to resume them")
    loaded = [load_run(root / r.run) for r in runs]
    out = FINDING_ROOT / "match"
    command = (f"layerhessians match {FINDING_ROOT}/model=LeNet,* --metric both --epochs "
               f"1-{args.epochs} --draws {args.finding_draws} --workers {args.jobs} --out {out}")
    distances, summary, written = steps.run(
        "finding: match (both metrics, replicates pooled)",
        lambda: match_runs(loaded, metrics=("both",), out=REPO / out, dpi=args.dpi,
                           epochs=list(range(1, args.epochs + 1)),
                           replicates=args.finding_draws, workers=args.jobs), command)
    for p in written:
        print(f"saved: {p}")
    figures = [copy(out / f"{name}.png", f"finding_{name}.png")
               for name in ("match_distros_wasserstein", "match_distros_peak")]
    subset_of = {r.run: r.flags["hessian_subset_seed"] for r in runs}
    analyses = {"seeds_and_subsets": summary.attrs["settings"]}
    for subset in range(args.subsets):
        ids = [rid for rid, s in subset_of.items() if s == subset]
        configs = [pooling.setting_view(load_run(root / rid).record) for rid in ids]
        settings, _ = pooling.group_runs(ids, configs)
        recorded = [TrainConfig.from_dict(c) for c in configs]
        seeds = {rid: (c.seed, c.hessian.subset_seed) for rid, c in zip(ids, recorded)}
        table = pooling.pool_settings(distances[distances["run"].isin(ids)], settings,
                                      seeds=seeds)
        name = f"subset{subset}"
        table.to_csv(REPO / out / f"match_distros_settings_{name}.csv", index=False)
        analyses[name] = table
    numbers["finding"] = {
        "root": str(FINDING_ROOT), "match": str(out), "match_command": command,
        "train_flags": {**SEED_LENET, "num_epochs": args.epochs, "hessian_vectors": 1},
        "datasets": list(FINDING_DATASETS), "replicates": args.replicates,
        "subsets": args.subsets, "subset_replicates": args.subset_replicates,
        "draws": args.finding_draws, "runs": len(runs),
        "training": {r.run: run_numbers(run) for r, run in zip(runs, loaded)},
        "best": {k: best_rows(t) for k, t in analyses.items()},
        "pooled": {k: pooled_rows(t) for k, t in analyses.items()},
        "verdict_lines": {k: pooling.setting_verdicts(t) for k, t in analyses.items()},
        "single_runs": single_run_verdicts(summary, subset_of),
        "figures": figures,
    }
    for key, lines in numbers["finding"]["verdict_lines"].items():
        print(f"\n{key}:")
        for line in lines:
            print(f"  {line}")


def finding_step(args, steps, env, numbers):
    entries, runs = finding_train(args, steps, env)
    if args.train_only:
        return
    finding_match(args, steps, numbers, entries, runs)


def htr_step(args, steps, env, numbers):
    """Step 4: the regularisation finding (experiments/htr_finding.py, resumable)."""
    out = Path("docs/figures/htr")
    command = [sys.executable, "experiments/htr_finding.py", "--root", str(HTR_ROOT),
               "--out", str(out), *shlex.split(args.htr_args)]
    if args.train_only:
        command += ["--stage", "train"]
    steps.run("htr finding: train and analyse", lambda: call(command, env),
              "python " + shlex.join(command[1:]))
    if args.train_only:
        return
    found = json.loads((REPO / out / "numbers.json").read_text())
    numbers["htr"] = {"root": str(HTR_ROOT), "out": str(out), "command": found["command"],
                      "methods": found["methods"], "curvature": found["curvature"],
                      "tuning": found["tuning"],
                      "figures": [str(out / name) for name in found["figures"]]}


def main(argv=None):
    args = parse_args(argv)
    os.chdir(REPO)
    set_root(Path(args.root))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "OPENBLAS_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    os.environ.update({k: env[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                           "MKL_NUM_THREADS")})
    if shutil.which("layerhessians") is None:
        sys.exit("make_figures: `layerhessians` is not on PATH; activate the environment "
                 "(pip install -e .) first")
    if args.fresh:  # only the folders of the steps that run
        for p in ([] if args.skip_quick else [QUICK_ROOT]) + (
                [] if args.skip_mnist else [MNIST_RUN, MNIST_MATCH]) + (
                [] if args.skip_finding else [FINDING_ROOT]) + (
                [] if args.skip_htr else [HTR_ROOT]):
            if (REPO / p).exists():
                print(f"--fresh: removing {p}")
                shutil.rmtree(REPO / p)
    import torch

    import layerhessians

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "src"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip())
    numbers = {"command": "python docs/make_figures.py " + " ".join(sys.argv[1:] if argv is None
                                                                      else argv),
               "commit": commit, "src_modified": dirty,
               "layerhessians": layerhessians.__version__, "torch": torch.__version__,
               "python": platform.python_version(), "machine": platform.machine(),
               "cpus": os.cpu_count(), "threads": args.threads,
               "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    steps = Steps(args.threads)
    numbers["steps"] = steps.records
    FIGURES.mkdir(parents=True, exist_ok=True)
    out = FIGURES / "numbers.json"
    old = json.loads(out.read_text()) if out.is_file() else {}
    for key, skip, step, prefix in (("quick", args.skip_quick, quick_step, "quick"),
                                    ("mnist", args.skip_mnist, mnist_step, "real MNIST"),
                                    ("finding", args.skip_finding, finding_step, "finding"),
                                    ("htr", args.skip_htr, htr_step, "htr")):
        if not skip:
            step(args, steps, env, numbers)
        elif key in old:  # kept from the last run that made them
            numbers[key] = old[key]
            steps.records += [r for r in old.get("steps", []) if r["step"].startswith(prefix)]
    if args.train_only:
        print("make_figures: --train-only: runs trained; numbers.json not written")
        return 0
    numbers["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    out.write_text(json.dumps(clean(numbers), indent=1) + "\n")
    print(f"\nwrote {out.relative_to(REPO)}; figures in {FIGURES.relative_to(REPO)}/:")
    for name in sorted(p.name for p in FIGURES.glob("*.png")):
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
