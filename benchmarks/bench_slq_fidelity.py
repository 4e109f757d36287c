"""How accurate is SLQ on real networks? Layer-block SLQ spectra against the exact ones.

    python benchmarks/bench_slq_fidelity.py --out benchmarks/results/slq_fidelity.json

Per model (``--models``, each in its own subprocess, torch with ONE thread,
``OPENBLAS_NUM_THREADS=1``): MNIST5k (4,000 real MNIST training images, zero-padded to
32x32, 1 channel, normalised), the Hessian set ``hessian_subset(train_y, 10, seed=0)``
(10 examples per class: 100), cross-entropy (mean), float32 model, batch norm in eval mode.
Two states: ``init`` (``torch.manual_seed(seed)``, untrained) and ``trained`` (SGD, lr 0.01,
momentum 0.9, batch 64, for ``--epochs`` epochs on the first ``--train-examples`` of a
seeded permutation of the training set; batch norm in train mode while training).

In each state, for every layer block (Conv2d/Linear weight) that the run-time certificate
admits (``exact_blocks``: Hessian block = GGN block), the exact spectrum from the Gram route
and SLQ's from ``slq_many`` on the same blocks (one shared first-order graph, the full
Hessian left out; start vectors seeded by ``(seed, vector, block)``, so vector 0 is exactly
the 1-vector run of ``layer_spectra(..., layer_method="slq")``). Per block:

- ``w1``: 1-Wasserstein distance between SLQ's measure and the exact one (zero mass
  included), divided by the exact spectrum's span (``relative_w1``);
- ``top``: SLQ's largest Ritz value against the exact top eigenvalue, relative;
- ``zero``: the same relative W1 for a point mass at zero (a baseline that knows nothing
  but the zero mass; for a positive semi-definite block it is ``trace / dim / span``);
- ``trace``: SLQ's trace estimate (``dim * sum(weights * nodes)``, i.e. Hutchinson with the
  same vectors) against the exact trace, relative.

Each with 1 vector (vector 0) and, with ``--vectors 3``, the 3-vector average. Steps and
re-orthogonalisation per model: ``--steps MODEL=N`` and ``--no-reorth MODEL`` (a 128-step
float64 basis of VGG11_bn's 28M block parameters would need 29 GB). The load average
before/after each state and all seeds and settings are in the JSON.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from layerhessians.curvature.blocks import FULL, layer_blocks  # noqa: E402
from layerhessians.data import hessian_subset, load_dataset  # noqa: E402
from layerhessians.models import build_model  # noqa: E402
from layerhessians.spectra.exact_layers import exact_blocks  # noqa: E402
from layerhessians.spectra.fidelity import relative_w1  # noqa: E402
from layerhessians.spectra.layers import layer_operators  # noqa: E402
from layerhessians.spectra.measure import SpectralMeasure  # noqa: E402
from layerhessians.spectra.slq import slq_many  # noqa: E402

CE = nn.CrossEntropyLoss()
DATASET = "MNIST5k"
DEFAULT_STEPS = {"LeNet": 128, "VGG11_bn": 32, "ResNet18": 32}
DEFAULT_VECTORS = {"LeNet": 3, "VGG11_bn": 1, "ResNet18": 1}
DEFAULT_EPOCHS = {"LeNet": 5, "VGG11_bn": 1, "ResNet18": 1}


def relative_error(estimate: float, exact: float) -> float:
    return abs(estimate - exact) / abs(exact) if exact != 0 else abs(estimate)


def train(model: nn.Module, data, epochs: int, examples: int, seed: int) -> dict:
    """Plain SGD on the first ``examples`` of a seeded permutation; returns loss and accuracy."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randperm(len(data.train_y), generator=g)[:examples]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    losses = []
    for _ in range(epochs):
        order = pool[torch.randperm(len(pool), generator=g)]
        for start in range(0, len(order), 64):
            batch = order[start:start + 64]
            loss = CE(model(data.train_x[batch]), data.train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        accuracy = float((model(data.test_x).argmax(1) == data.test_y).float().mean())
    return {"last_epoch_loss": float(np.mean(losses[-max(1, len(pool) // 64):])),
            "test_accuracy": accuracy}


def fidelity(model: nn.Module, batch, steps: int, vectors: int, seed: int,
             reorthogonalize: bool) -> tuple[list[dict], dict, dict]:
    """Per certified block: exact against SLQ (1 vector, and ``vectors``); fallbacks; times."""
    blocks = layer_blocks(model)
    start = time.perf_counter()
    exact, fallbacks, _ = exact_blocks(model, CE, [batch], blocks, seed=seed)
    t_exact = time.perf_counter() - start
    start = time.perf_counter()
    operators = layer_operators(model, CE, [batch], layers={n: blocks[n] for n in exact})
    try:
        names = list(exact)
        measures = slq_many([operators[n] for n in names], names, iterations=steps,
                            vectors=vectors, seed=seed, reorthogonalize=reorthogonalize)
    finally:
        operators[FULL].release()
    t_slq = time.perf_counter() - start
    rows = []
    for name, many in zip(names, measures):
        truth = exact[name]
        one = SpectralMeasure([many.per_vector[0][0]], [many.per_vector[0][1]], dim=truth.dim)
        row = {"block": name, "dim": truth.dim,
               "rank": int(np.count_nonzero(truth.nodes != 0)),
               "exact_top": truth.support[1], "exact_trace": truth.trace(),
               "exact_span": truth.support[1] - truth.support[0],
               "w1_zero": relative_w1(SpectralMeasure([[0.0]], [[1.0]], dim=truth.dim), truth)}
        for label, measure in (("v1", one), (f"v{vectors}", many)):
            row[f"w1_{label}"] = relative_w1(measure, truth)
            row[f"top_{label}"] = relative_error(measure.support[1], truth.support[1])
            row[f"trace_{label}"] = relative_error(measure.trace(), truth.trace())
        rows.append(row)
    return rows, dict(fallbacks), {"exact_s": t_exact, "slq_s": t_slq}


def run_model(name: str, args) -> dict:
    torch.set_num_threads(1)
    data = load_dataset(DATASET)
    index = hessian_subset(data.train_y, examples_per_class=10, seed=args.seed)
    batch = (data.train_x[index], data.train_y[index])
    torch.manual_seed(args.seed)
    model = build_model(name, in_channels=data.in_channels, num_classes=data.num_classes).eval()
    steps, epochs, vectors = args.steps_of[name], args.epochs_of[name], args.vectors_of[name]
    reorth = name not in args.no_reorth
    out = {"model": name, "dataset": DATASET, "hessian_examples": len(index),
           "threads": torch.get_num_threads(),
           "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"), "steps": steps,
           "vectors": vectors, "reorthogonalize": reorth, "seed": args.seed,
           "states": []}
    for state in args.states:
        entry = {"state": state, "load_before": os.getloadavg()}
        if state == "trained":
            if epochs == 0:
                continue
            examples = min(args.train_examples_of[name], len(data.train_y))
            entry.update(epochs=epochs, train_examples=examples, lr=0.01, momentum=0.9,
                         batch_size=64, train_seed=args.seed)
            start = time.perf_counter()
            entry.update(train(model, data, epochs, examples, args.seed))
            entry["train_s"] = time.perf_counter() - start
        rows, fallbacks, times = fidelity(model, batch, steps, vectors, args.seed, reorth)
        entry.update(times, rows=rows, fallbacks=fallbacks, load_after=os.getloadavg())
        out["states"].append(entry)
        print(f"{name} {state}: {len(rows)} blocks, exact {times['exact_s']:.1f} s, "
              f"SLQ {times['slq_s']:.1f} s", file=sys.stderr, flush=True)
    return out


def summary(result: dict, extra: int) -> list[str]:
    """Markdown rows: median / max over the blocks, 1 vector and (if run) ``extra`` vectors."""
    lines = []
    for entry in result["states"]:
        rows = entry["rows"]
        if not rows:
            continue
        cells = []
        for label in ["v1"] + ([f"v{extra}"] if extra > 1 else []):
            if f"w1_{label}" not in rows[0]:
                cells.append("| - | - | - ")
                continue
            w1 = [r[f"w1_{label}"] for r in rows]
            top = [r[f"top_{label}"] for r in rows]
            trace = [r[f"trace_{label}"] for r in rows]
            zero = [zero_baseline(r) for r in rows]
            baseline = (f"({statistics.median(zero):.1e} / {max(zero):.1e}) "
                        if label == "v1" else "")
            cells.append(f"| {statistics.median(w1):.1e} / {max(w1):.1e} {baseline}"
                         f"| {statistics.median(top):.0e} / {max(top):.0e} "
                         f"| {statistics.median(trace):.2f} / {max(trace):.2f} ")
        lines.append(f"| {result['model']} | {entry['state']} | {len(rows)} "
                     f"| {result['steps']} | {'yes' if result['reorthogonalize'] else 'no'} "
                     + "".join(cells) + "|")
    return lines


def zero_baseline(row: dict) -> float:
    """``w1_zero`` (older results: ``trace / dim / span``, the same for a PSD block)."""
    return row.get("w1_zero", row["exact_trace"] / row["dim"] / row["exact_span"])


def write(path: str, args, results: list) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"torch": torch.__version__, "threads": 1,
                   "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
                   "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                   "seed": args.seed, "argv": sys.argv[1:], "results": results}, handle,
                  indent=2)


def per_block(result: dict) -> str:
    v = result["vectors"]
    head = (f"{'state':8} {'block':28} {'dim':>9} {'rank':>5} {'top':>10} {'W1/span':>9} "
            f"{'top err':>8} {'tr err':>8}" + (f" {'W1 v' + str(v):>9} {'top v' + str(v):>8} "
                                                f"{'tr v' + str(v):>8}" if v > 1 else ""))
    lines = [f"{result['model']}: {result['steps']} steps, reorth "
             f"{result['reorthogonalize']}, {result['hessian_examples']} examples", head]
    for entry in result["states"]:
        for r in entry["rows"]:
            line = (f"{entry['state']:8} {r['block']:28} {r['dim']:9d} {r['rank']:5d} "
                    f"{r['exact_top']:10.3e} {r['w1_v1']:9.2e} {zero_baseline(r):8.1e} {r['top_v1']:8.1e} "
                    f"{r['trace_v1']:8.1e}")
            if v > 1:
                line += (f" {r[f'w1_v{v}']:9.2e} {r[f'top_v{v}']:8.1e} "
                         f"{r[f'trace_v{v}']:8.1e}")
            lines.append(line)
        for name, reason in entry["fallbacks"].items():
            lines.append(f"{entry['state']:8} {name:28} not certified: {reason}")
    return "\n".join(lines)


def pairs(values, kind) -> dict:
    out = {}
    for item in values:
        model, _, value = item.partition("=")
        out[model] = kind(value)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["LeNet", "VGG11_bn", "ResNet18"])
    parser.add_argument("--states", nargs="+", default=["init", "trained"],
                        choices=["init", "trained"])
    parser.add_argument("--steps", nargs="*", default=[], metavar="MODEL=N",
                        help=f"Lanczos steps per model (default {DEFAULT_STEPS})")
    parser.add_argument("--epochs", nargs="*", default=[], metavar="MODEL=N",
                        help=f"training epochs per model (default {DEFAULT_EPOCHS}; 0: none)")
    parser.add_argument("--train-examples", nargs="*", default=[], metavar="MODEL=N",
                        help="training examples per model (default: LeNet all 4000, "
                             "others 1024)")
    parser.add_argument("--no-reorth", nargs="*", default=["VGG11_bn", "ResNet18"],
                        metavar="MODEL", help="models run without re-orthogonalisation")
    parser.add_argument("--vectors", nargs="*", default=[], metavar="MODEL=N",
                        help=f"random vectors per model (default {DEFAULT_VECTORS}); the "
                             "1-vector figures are always vector 0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/slq_fidelity.json")
    parser.add_argument("--from-json", metavar="PATH",
                        help="print the tables of an earlier run's JSON and exit")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the per-model subprocess
    args = parser.parse_args(argv)
    args.steps_of = {**DEFAULT_STEPS, **pairs(args.steps, int)}
    args.vectors_of = {**DEFAULT_VECTORS, **pairs(args.vectors, int)}
    args.epochs_of = {**DEFAULT_EPOCHS, **pairs(args.epochs, int)}
    args.train_examples_of = {"LeNet": 4000, "VGG11_bn": 1024, "ResNet18": 1024,
                              **pairs(args.train_examples, int)}
    if args.one:
        print(json.dumps(run_model(args.one, args)))
        return 0
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as handle:
            results = json.load(handle)["results"]
        for result in results:
            print(per_block(result))
        tables(results)
        return 0
    results = []
    passthrough = list(argv if argv is not None else sys.argv[1:])
    for name in args.models:
        start = time.perf_counter()
        child = subprocess.run([sys.executable, __file__, *passthrough, "--one", name],
                               stdout=subprocess.PIPE, text=True)
        if child.returncode != 0:
            print(f"{name}: failed (exit {child.returncode})", file=sys.stderr)
            continue
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
        results[-1]["wall_s"] = time.perf_counter() - start
        print(per_block(results[-1]), flush=True)
        write(args.out, args, results)  # partial results survive a later failure
    tables(results)
    write(args.out, args, results)
    return 0


def tables(results: list) -> None:
    """Print the markdown summary of ``results``."""
    extra = max([r["vectors"] for r in results] + [1])
    head = ("| model | state | blocks | steps | reorth. | rel. W1 med / max (zero) | top err med / max "
            "| trace err med / max |")
    if extra > 1:
        head += (f" rel. W1 ({extra} vec.) | top err ({extra} vec.) "
                 f"| trace err ({extra} vec.) |")
    print("\n" + head)
    print("|" + "---|" * (head.count("|") - 1))
    for result in results:
        print("\n".join(summary(result, extra)))


if __name__ == "__main__":
    sys.exit(main())
