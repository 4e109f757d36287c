"""Speed-up of 2 processes (torch.distributed, gloo) over 1 on the Hessian products of a
1,000-example Hessian set.

    python benchmarks/bench_distributed.py --out benchmarks/results/distributed.json

Setting: LeNet (61,706 parameters, float32, as the trainer), random MNIST-shaped inputs
[1000, 1, 32, 32] with 10 balanced classes, cross-entropy (mean), float64 Lanczos vectors.
Each configuration runs in fresh processes (2 processes through ``torchrun``, sharded as the
trainer does: rank r takes examples r, r + 2, ...; every product all-reduced):

- ``1 x T``: one process with T intra-op threads (T = 1, 2);
- ``2 x 1``: two processes with one thread each (the 2-core machine's natural split).

Per configuration (medians of ``--repeats``): building the first-order graph; one full
Hessian product (with its all-reduce); one lockstep Lanczos step over full + 5 layer blocks
(6 products); the same step without the all-reduce (compute only); one all-reduce of a
61,706-float64 vector alone; and a full + layer spectra run (``--iterations`` steps). The
speed-up is ``time(1 x 2) / time(2 x 1)``: the same two cores, used by threads or by
processes. The 2-process spectra are checked against the 1-process ones.

Timings on shared machines move 15-20% between runs: compare ratios from one invocation.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy/scipy threads fight torch's

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from layerhessians.models import build_model  # noqa: E402
from layerhessians.spectra import layer_operators, layer_spectra, start_vector  # noqa: E402
from layerhessians.training.distributed import process_group, shard_indices  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [(1, 2), (1, 1), (2, 1)]  # (processes, threads per process)


def hessian_set(examples: int):
    """Random MNIST-shaped inputs (normalised scale) and balanced labels, fixed seed."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(examples, 1, 32, 32, generator=g)
    y = torch.arange(examples) % 10
    return x, y


def _median_seconds(fn, repeats, barrier):
    times = []
    for _ in range(repeats):
        barrier()
        start = time.perf_counter()
        fn()
        barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(args) -> None:
    """One process of a configuration; rank 0 writes the measurements to ``args.result``."""
    torch.set_num_threads(args.threads)
    with process_group("gloo", "cpu") as ctx:
        x, y = hessian_set(args.examples)
        index = shard_indices(len(y), ctx.rank, ctx.world_size)
        local = (x[index], y[index])
        torch.manual_seed(0)
        model = build_model("LeNet")
        loss = nn.CrossEntropyLoss()
        reduced = layer_operators(model, loss, local, reduction=ctx.reduction())
        alone = layer_operators(model, loss, local)  # the same shard, no all-reduce
        starts = {name: start_vector(op.dim, 0, 0, name) for name, op in reduced.items()}
        full = reduced["full"]
        build = _median_seconds(lambda: (full.release(), full.graph.build()), 3, ctx.barrier)
        alone["full"].graph.build()
        full.matvec(starts["full"])  # warm-up
        product = _median_seconds(lambda: full.matvec(starts["full"]), args.repeats, ctx.barrier)
        step = _median_seconds(lambda: [op.matvec(starts[n]) for n, op in reduced.items()],
                               args.repeats, ctx.barrier)
        compute = _median_seconds(lambda: [op.matvec(starts[n]) for n, op in alone.items()],
                                  args.repeats, ctx.barrier)
        buffer = torch.zeros(full.dim, dtype=torch.float64)
        allreduce = _median_seconds(lambda: ctx.all_reduce_sum(buffer), args.repeats,
                                    ctx.barrier)
        full.release()
        alone["full"].release()
        ctx.barrier()
        start = time.perf_counter()
        spectra = layer_spectra(model, loss, local, iterations=args.iterations, seed=1,
                                reduction=ctx.reduction())
        ctx.barrier()
        spectra_seconds = time.perf_counter() - start
        if ctx.is_main:
            Path(args.result).write_text(json.dumps({
                "processes": ctx.world_size, "threads": args.threads,
                "examples_per_process": len(index), "build_s": build, "product_s": product,
                "step_s": step, "step_compute_s": compute, "allreduce_s": allreduce,
                "spectra_s": spectra_seconds, "products_per_step": len(reduced),
                "nodes": {k: m.nodes.tolist() for k, m in spectra.items()}}))


def run_config(processes, threads, args, folder) -> dict:
    result = Path(folder) / f"p{processes}t{threads}.json"
    tail = ["--worker", "--threads", str(threads), "--result", str(result),
            "--examples", str(args.examples), "--repeats", str(args.repeats),
            "--iterations", str(args.iterations)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    if processes == 1:
        argv = [sys.executable, __file__, *tail]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port()), __file__, *tail]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800,
                          cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{processes}x{threads} failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    return json.loads(result.read_text())


CALIBRATE = """
import sys, time, torch
torch.set_num_threads(1)
a = torch.randn(384, 384)
start = time.perf_counter()
for _ in range(300):
    a @ a
print(time.perf_counter() - start)
"""


def parallel_capacity() -> float:
    """Cores' worth of parallel CPU the machine gives right now: ``2 * t1 / t2`` for a fixed
    1-thread matmul loop run alone (``t1``) and as two concurrent processes (``t2``, the
    slower); 2.0 on two idle cores, about 1.0 when other work holds one core."""
    def run(count):
        procs = [subprocess.Popen([sys.executable, "-c", CALIBRATE], stdout=subprocess.PIPE,
                                  text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                 for _ in range(count)]
        return max(float(proc.communicate()[0]) for proc in procs)

    return 2 * run(1) / run(2)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=16,
                        help="Lanczos steps of the spectra run (default 16)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    load_before, capacity_before = os.getloadavg()[0], parallel_capacity()
    with tempfile.TemporaryDirectory() as folder:
        results = {f"{p}x{t}": run_config(p, t, args, folder) for p, t in CONFIGS}
    load_after, capacity_after = os.getloadavg()[0], parallel_capacity()
    base, two = results["1x2"], results["2x1"]
    worst = max(float(np.max(np.abs(np.subtract(two["nodes"][k], base["nodes"][k])))
                    / np.max(np.abs(base["nodes"][k]))) for k in base["nodes"])
    keys = [("build_s", "graph build"), ("product_s", "full product"),
            ("step_s", "Lanczos step (6 products)"), ("step_compute_s", " ... compute only"),
            ("allreduce_s", "all-reduce 61,706 float64"), ("spectra_s",
                                                          f"spectra ({args.iterations} steps)")]
    print(f"Hessian products, LeNet, {args.examples} examples, float32 model, float64 vectors "
          f"({os.cpu_count()} CPUs, torch {torch.__version__}); medians of {args.repeats}")
    print(f"{'':28s}" + "".join(f"{name:>12s}" for name in results) + f"{'1x2 / 2x1':>12s}")
    for key, label in keys:
        if key == "allreduce_s":
            print(f"{label:28s}{'-':>12s}{'-':>12s}{1e3 * two[key]:>10.1f}ms{'-':>12s}")
            continue
        row = "".join(f"{1e3 * r[key]:>10.1f}ms" for r in results.values())
        print(f"{label:28s}{row}{base[key] / two[key]:>11.2f}x")
    print(f"{'speed-up 2x1 over 1x1':28s}" + "".join(
        f"{label.strip()}: {results['1x1'][key] / two[key]:.2f}x  " for key, label in keys
        if key in ("product_s", "step_s", "spectra_s")))
    print(f"parallel capacity (cores' worth, 2.0 = two idle cores): {capacity_before:.2f} "
          f"before, {capacity_after:.2f} after; load average {load_before:.2f} -> "
          f"{load_after:.2f}")
    print(f"2-process spectra vs 1-process: max node difference {worst:.1e} (relative to the "
          "largest |node|; float32 products)")
    summary = {
        "setting": {"model": "LeNet", "parameters": 61706, "examples": args.examples,
                    "inputs": "random [N, 1, 32, 32], 10 balanced classes", "dtype": "float32",
                    "repeats": args.repeats, "iterations": args.iterations,
                    "cpus": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version(), "backend": "gloo"},
        "results": {k: {kk: vv for kk, vv in r.items() if kk != "nodes"}
                    for k, r in results.items()},
        "speedup_2x1_over_1x2": {key: base[key] / two[key] for key, _ in keys
                                 if key != "allreduce_s"},
        "speedup_2x1_over_1x1": {key: results["1x1"][key] / two[key] for key, _ in keys
                                 if key != "allreduce_s"},
        "parallel_capacity": {"before": capacity_before, "after": capacity_after},
        "load_average": {"before": load_before, "after": load_after},
        "spectra_max_relative_difference": worst,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
