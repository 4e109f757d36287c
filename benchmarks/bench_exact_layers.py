"""Exact layer-block spectra (the Gram route) against the SLQ spectra they replace.

    python benchmarks/bench_exact_layers.py --models LeNet VGG11_bn ResNet18 \
        --out benchmarks/results/exact_layers.json

Per model, in its own subprocess (so ``ru_maxrss`` is that model's peak memory): random
inputs [100, C, 32, 32] (C = 1 for LeNet, 3 otherwise), 10 classes, cross-entropy (mean),
float32 model, eval-mode batch norm, torch with ONE thread, ``OPENBLAS_NUM_THREADS=1``.

1. ``exact``: all layer blocks by ``layer_spectra``'s exact route (Gram factors from one
   forward + one batched backward, the run-time certificate, the per-layer Gram matrices
   and their float64 eigenvalues), split into its parts;
2. ``full SLQ``: the full Hessian's 128-step SLQ spectrum (1 vector, float64
   re-orthogonalisation), alone. With ``--compose`` (default for VGG11_bn and ResNet18,
   which are slow on a shared CPU) it is composed as ``setup + 128 * step`` from runs of
   ``--short`` and ``2 * --short`` steps (re-orthogonalisation is then slightly
   under-counted); said in the output;
3. ``auto epoch``: full SLQ + all layers exact (``layer_method="auto"``), against the full
   spectrum alone (measured for LeNet, composed as full + exact otherwise).

Goals (issue 10): exact / full <= 0.15 (LeNet), <= 0.1 (VGG11_bn, ResNet18) within 8 GiB;
auto epoch / full <= 1.25 (LeNet, ResNet18). Timings on shared machines move 15-20%.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from layerhessians.curvature.certify import certify_blocks  # noqa: E402
from layerhessians.curvature.gram import gram_factors  # noqa: E402
from layerhessians.models import build_model, layer_blocks  # noqa: E402
from layerhessians.spectra import layer_spectra  # noqa: E402
from layerhessians.spectra.exact_layers import layer_measure  # noqa: E402

STEPS = 128
CE = nn.CrossEntropyLoss()


def problem(name: str, examples: int, seed: int = 0):
    torch.manual_seed(seed)
    channels = 1 if name == "LeNet" else 3
    model = build_model(name, in_channels=channels, num_classes=10).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(examples, channels, 32, 32, generator=g)
    y = torch.randint(0, 10, (examples,), generator=g)
    return model, (x, y)


def timed(fn, repeats: int = 1):
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def run_model(name: str, args) -> dict:
    torch.set_num_threads(1)
    model, data = problem(name, args.examples)
    blocks = layer_blocks(model)
    compose = args.compose if args.compose is not None else name != "LeNet"
    repeats = args.repeats if not compose else 1
    row = {"model": name, "examples": args.examples, "threads": torch.get_num_threads(),
           "blocks": len(blocks), "composed": compose}
    # the exact route, in parts, then as layer_spectra runs it
    t_factors, factors = timed(lambda: gram_factors(model, CE, data, blocks))
    t_certify, certificates = timed(lambda: certify_blocks(model, CE, data, blocks, factors))
    t_eigen, _ = timed(lambda: [layer_measure(f) for f in factors.values()])
    row.update(factors_s=t_factors, certify_s=t_certify, eigen_s=t_eigen,
               methods={n: f.method() for n, f in factors.items()},
               certified=sum(c.certified for c in certificates.values()),
               worst_hessian_residual=max(c.hessian_residual for c in certificates.values()),
               worst_factor_residual=max(c.factor_residual for c in certificates.values()))
    t_exact, spectra = timed(lambda: layer_spectra(model, CE, data, iterations=1,
                                                   layers=True, layer_method="exact"),
                             repeats)
    # layer_spectra(iterations=1) includes one full SLQ step: subtract it below
    t_one, _ = timed(lambda: layer_spectra(model, CE, data, iterations=1, layers=False))
    row["exact_s"] = t_exact - t_one
    row["peak_gib_after_exact"] = peak_gib()
    row["exact_top"] = {n: m.support[1] for n, m in spectra.items() if n != "full"}
    row["exact_trace"] = {n: m.trace() for n, m in spectra.items() if n != "full"}
    if compose:
        short = args.short
        t_a, _ = timed(lambda: layer_spectra(model, CE, data, iterations=short, layers=False))
        t_b, _ = timed(lambda: layer_spectra(model, CE, data, iterations=2 * short,
                                             layers=False))
        step = (t_b - t_a) / short
        row["full_step_s"] = step
        row["full_s"] = (t_a - short * step) + STEPS * step
        row["auto_epoch_s"] = row["full_s"] + row["exact_s"]
    else:
        row["full_s"], _ = timed(lambda: layer_spectra(model, CE, data, iterations=STEPS,
                                                       layers=False), repeats)
        row["auto_epoch_s"], _ = timed(lambda: layer_spectra(model, CE, data,
                                                             iterations=STEPS), repeats)
    row["exact_over_full"] = row["exact_s"] / row["full_s"]
    row["auto_epoch_over_full"] = row["auto_epoch_s"] / row["full_s"]
    row["peak_gib"] = peak_gib()
    return row


def table(rows) -> str:
    head = (f"{'model':10} {'exact s':>8} {'(factors':>8} {'certify':>8} {'eig)':>6} "
            f"{'full SLQ s':>10} {'exact/full':>10} {'epoch/full':>10} {'peak GiB':>8} "
            f"{'composed':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:10} {r['exact_s']:8.2f} {r['factors_s']:8.2f} "
                     f"{r['certify_s']:8.2f} {r['eigen_s']:6.2f} {r['full_s']:10.2f} "
                     f"{r['exact_over_full']:10.3f} {r['auto_epoch_over_full']:10.3f} "
                     f"{r['peak_gib']:8.2f} {str(r['composed']):>8}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["LeNet", "VGG11_bn", "ResNet18"])
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--short", type=int, default=2, help="steps of the composing runs")
    parser.add_argument("--compose", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--out", default="benchmarks/results/exact_layers.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the per-model subprocess
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_model(args.one, args)))
        return 0
    rows = []
    for name in args.models:
        command = [sys.executable, __file__, "--one", name, "--examples", str(args.examples),
                   "--repeats", str(args.repeats), "--short", str(args.short)]
        if args.compose is not None:
            command.append("--compose" if args.compose else "--no-compose")
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(table(rows[-1:]), flush=True)
    print(table(rows))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump({"torch": torch.__version__, "threads": 1, "steps": STEPS, "rows": rows},
                  handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
