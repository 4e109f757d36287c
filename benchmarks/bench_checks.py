"""Cost of the engine's checks (issue 11) against the work they guard.

    python benchmarks/bench_checks.py --model LeNet --examples 100 --repeats 7 \
        --out benchmarks/results/checks.json

On a float32 model with random inputs [examples, 1, 32, 32] in 2 batches (cross-entropy
mean, batch norm in eval mode), medians of ``repeats``, all in one process with torch and BLAS
threads set by ``--threads`` (default 1):

- ``product``: one full Hessian-vector product on the kept graph (includes the non-finite
  check, ``torch.isfinite(result).all()``); ``finite_check``: that check alone on a vector of
  the same size;
- ``symmetry_probe``: :func:`~layerhessians.spectra.lanczos.check_symmetric` on the full
  operator (two products);
- ``loss_probe``: :func:`~layerhessians.curvature.graph.loss_reduction_of` on a batch;
  ``coupling_probe``: :func:`~layerhessians.curvature.graph.batch_coupling` on a batch;
  ``build``: building the graph (which runs the loss probe once).

Prints a table and writes JSON.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy/scipy threads fight torch's

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from layerhessians.curvature import hessian_operator  # noqa: E402
from layerhessians.curvature.coupling import batch_coupling  # noqa: E402
from layerhessians.curvature.loss_reduction import loss_reduction_of  # noqa: E402
from layerhessians.models import build_model  # noqa: E402
from layerhessians.spectra.lanczos import check_symmetric  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="LeNet")
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/checks.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model, in_channels=1, num_classes=10)
    x = torch.randn(args.examples, 1, 32, 32)
    y = torch.randint(0, 10, (args.examples,))
    half = args.examples // 2
    data = [(x[:half], y[:half]), (x[half:], y[half:])]
    loss_fn = nn.CrossEntropyLoss()
    op = hessian_operator(model, loss_fn, data)
    op.graph.build()
    v = torch.randn(op.dim)
    op.matvec(v)  # warm-up
    with torch.no_grad():
        outputs = model.eval()(x[:half])
    rows = {
        "build": median_seconds(lambda: (op.release(), op.graph.build()), args.repeats),
        "product": median_seconds(lambda: op.matvec(v), args.repeats),
        "finite_check": median_seconds(lambda: bool(torch.isfinite(v).all()), args.repeats),
        "symmetry_probe": median_seconds(lambda: check_symmetric([op]), args.repeats),
        "loss_probe": median_seconds(lambda: loss_reduction_of(loss_fn, outputs, y[:half], half),
                                     args.repeats),
        "coupling_probe": median_seconds(lambda: batch_coupling(model, "eval", x[:half]),
                                         args.repeats),
    }
    print(f"{args.model}, {args.examples} examples in 2 batches, dim {op.dim:,}, "
          f"{args.threads} thread(s), medians of {args.repeats}")
    for name, seconds in rows.items():
        print(f"  {name:15s} {seconds * 1e3:9.3f} ms  {seconds / rows['product']:7.3f} x product")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "examples": args.examples, "dim": op.dim,
                               "threads": args.threads, "repeats": args.repeats,
                               "seconds": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
