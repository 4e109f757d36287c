"""Cost of the run store's durability per epoch: ``commit_epoch`` (spectra -> metrics ->
checkpoint, each written atomically) with fsync of every file and folder (the default) vs
without (``atomic.DURABLE = False``), plus opening a run for ``--resume`` (checkpoint digest,
committed-bytes check, CSV parsing).

    python benchmarks/bench_store.py --out benchmarks/results/store.json

Two sizes of training state: LeNet (61,706 float32 parameters; with SGD momentum) and a
VGG11-sized one (9.2 M parameters, ~74 MB with momentum). Spectra: full + layer blocks,
``--iterations`` Ritz values each (one vector). Each configuration commits ``--epochs``
epochs into a fresh run directory under ``--dir`` (default: a temporary folder: say which
file system it is on when quoting numbers); durable and non-durable runs alternate within
one process and the per-epoch medians are reported. Single-threaded (torch and BLAS).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from layerhessians.store import atomic, writer  # noqa: E402

SIZES = {"LeNet": (61_706, 6), "VGG11-sized": (9_231_114, 12)}


class Measure:
    def __init__(self, nodes, weights):
        self.nodes, self.weights = nodes, weights

    def to_frame(self):
        return pd.DataFrame({"vector": 0, "node": self.nodes, "weight": self.weights})


def state(params: int, epoch: int) -> dict:
    gen = torch.Generator().manual_seed(epoch)
    w = torch.randn(params, generator=gen)
    return {"model": {"w": w}, "optimizer": {"state": {0: {"momentum_buffer": w * 0.1}},
                                             "param_groups": [{"lr": 0.1, "params": [0]}]},
            "scheduler": {"last_epoch": epoch}, "rng": {"torch": torch.get_rng_state()}}


def run_once(folder: Path, params: int, blocks: int, epochs: int, iterations: int,
             durable: bool) -> dict:
    atomic.DURABLE = durable
    rng = np.random.default_rng(0)
    names = ["full", *[f"layer{i}.weight" for i in range(blocks - 1)]]
    config = {"model": "bench", "blocks": names, "num_epochs": epochs, "start_time": "t"}
    path = folder / f"run-{params}-{durable}-{time.perf_counter_ns()}"
    times = []
    with writer.RunStore.create(path, config) as store:
        for epoch in range(epochs):
            spectra = {b: Measure(np.sort(rng.normal(size=iterations)),
                                  np.full(iterations, 1 / iterations)) for b in names}
            checkpoint = state(params, epoch)
            row = {"lr": 0.1, "train_loss": 1.0, "train_acc": 0.5, "test_loss": 1.0,
                   "test_acc": 0.5, "train_seconds": 1.0, "spectra_seconds": 1.0}
            start = time.perf_counter()
            store.commit_epoch(epoch, row, spectra, checkpoint)
            times.append(time.perf_counter() - start)
    start = time.perf_counter()
    with writer.RunStore.create(path, config, resume=True):
        pass
    opened = time.perf_counter() - start
    atomic.DURABLE = True
    return {"commit_s": statistics.median(times[1:]), "open_s": opened,
            "checkpoint_bytes": (path / "checkpoints" / "last.pt").stat().st_size}


def filesystem(folder: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(folder)], capture_output=True, text=True).stdout
        return out.splitlines()[-1].split()[1]
    except (OSError, IndexError):
        return "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=90)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="folder for the runs (default: temporary)")
    parser.add_argument("--out", default="benchmarks/results/store.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        results = []
        for name, (params, blocks) in SIZES.items():
            samples = {True: [], False: []}
            for _ in range(args.repeats):
                for durable in (True, False):
                    samples[durable].append(run_once(folder, params, blocks, args.epochs,
                                                     args.iterations, durable))
            on = statistics.median(s["commit_s"] for s in samples[True])
            off = statistics.median(s["commit_s"] for s in samples[False])
            results.append({"state": name, "params": params, "blocks": blocks,
                            "checkpoint_bytes": samples[True][0]["checkpoint_bytes"],
                            "commit_fsync_s": on, "commit_no_fsync_s": off,
                            "fsync_cost_s": on - off, "ratio": on / off,
                            "open_for_resume_s": statistics.median(
                                s["open_s"] for s in samples[True])})
        fs = filesystem(folder)
    print(f"run store, per epoch (median of {args.repeats} x {args.epochs - 1} epochs; "
          f"1 thread; file system {fs})")
    print(f"{'state':<12} {'ckpt MB':>8} {'commit+fsync':>13} {'no fsync':>9} "
          f"{'fsync cost':>11} {'ratio':>6} {'open':>8}")
    for r in results:
        print(f"{r['state']:<12} {r['checkpoint_bytes'] / 1e6:>8.1f} "
              f"{1e3 * r['commit_fsync_s']:>11.1f}ms {1e3 * r['commit_no_fsync_s']:>7.1f}ms "
              f"{1e3 * r['fsync_cost_s']:>9.1f}ms {r['ratio']:>6.2f} "
              f"{1e3 * r['open_for_resume_s']:>6.1f}ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"filesystem": fs, "threads": 1, "epochs": args.epochs,
                               "repeats": args.repeats, "iterations": args.iterations,
                               "python": platform.python_version(), "torch": torch.__version__,
                               "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
