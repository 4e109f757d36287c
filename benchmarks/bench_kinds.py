"""Cost of each curvature kind on one shared graph: graph build, one product, kept memory.

    python benchmarks/bench_kinds.py --models LeNet --examples 100 --repeats 5 \
        --out benchmarks/results/kinds.json

Per model (random inputs [examples, C, 32, 32], cross-entropy mean, batch norm in eval mode,
float32 model), for every registered kind (``layerhessians.curvature.KINDS``): the median
time to build the graph (after a warm-up build), the median of ``repeats`` full products on the kept graph (kinds timed in
interleaved rounds, so load from other processes hits all alike), the product relative to a
gradient measured in the same rounds, and the kept memory per example and per batch
(:func:`~layerhessians.curvature.measure_graph_cost`). Prints a table, writes JSON. Torch and
BLAS threads: ``--threads`` (default 1).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy/scipy threads fight torch's

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from layerhessians.curvature import KINDS, hessian_operator, measure_graph_cost  # noqa: E402
from layerhessians.models import build_model  # noqa: E402

CHANNELS = {"LeNet": 1}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(name: str, examples: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    channels = CHANNELS.get(name, 3)
    model = build_model(name, in_channels=channels, num_classes=10)
    x = torch.randn(examples, channels, 32, 32)
    y = torch.randint(0, 10, (examples,))
    loss_fn = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
    ops, builds = {}, {}
    for kind in KINDS:
        ops[kind] = hessian_operator(model, loss_fn, (x, y), kind=kind)
        graph = ops[kind].graph
        graph.build()  # warm-up (first calls initialise kernels and vmap rules)
        builds[kind] = statistics.median(
            timed(lambda graph=graph: (graph.release(), graph.build())) for _ in range(repeats))

    def gradient():
        model.eval()
        torch.autograd.grad(loss_fn(model(x), y), params)

    fns = {"gradient": gradient, **{k: (lambda op=op: op.matvec(v)) for k, op in ops.items()}}
    for fn in fns.values():  # warm-up round
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    medians = {k: statistics.median(t) for k, t in times.items()}
    rows = []
    for kind, op in ops.items():
        op.release()
        cost = measure_graph_cost(model, loss_fn, x, y, kind=kind)
        rows.append({"model": name, "kind": kind, "examples": examples, "dim": op.dim,
                     "build_s": builds[kind], "product_s": medians[kind],
                     "gradient_s": medians["gradient"],
                     "product_over_gradient": medians[kind] / medians["gradient"],
                     "kept_bytes_per_example": cost.per_example,
                     "kept_bytes_per_batch": cost.per_batch})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["LeNet"])
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/kinds.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [row for name in args.models for row in bench(name, args.examples, args.repeats)]
    print(f"{'model':8} {'kind':9} {'build s':>8} {'product s':>10} {'x gradient':>10} "
          f"{'KiB/example':>12} {'KiB/batch':>10}")
    for r in rows:
        print(f"{r['model']:8} {r['kind']:9} {r['build_s']:8.3f} {r['product_s']:10.4f} "
              f"{r['product_over_gradient']:10.2f} {r['kept_bytes_per_example'] / 1024:12.1f} "
              f"{r['kept_bytes_per_batch'] / 1024:10.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "torch": torch.__version__,
                               "machine": platform.machine(), "repeats": args.repeats,
                               "rows": rows}, indent=2))
    print(f"wrote {out} (torch threads {args.threads}; medians of {args.repeats} repeats)")


if __name__ == "__main__":
    main()
