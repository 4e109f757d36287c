"""Exact layer-block spectra (the Gram route) against the SLQ spectra they replace.

    python benchmarks/bench_exact_layers.py --models LeNet VGG11_bn ResNet18 \
        --out benchmarks/results/exact_layers.json

Per model, in its own subprocess (its peak resident memory from ``os.wait4``'s
``ru_maxrss``): random inputs [100, C, 32, 32] (C = 1 for LeNet, 3 otherwise), 10 classes,
cross-entropy (mean), float32 model, eval-mode batch norm, torch with ONE thread,
``OPENBLAS_NUM_THREADS=1``. Each subprocess first runs the exact route once on 2 examples
(imports and ``vmap`` set-up, paid once per process), untimed. Then, timed:

1. ``exact``: all layer blocks by the route ``layer_spectra(layer_method="auto"|"exact")``
   takes (:func:`~layerhessians.spectra.exact_layers.exact_blocks`: memory estimate, Gram
   factors from one forward + one batched backward, the run-time certificate, the per-layer
   Gram matrices and their float64 eigenvalues), split into its parts; ``first`` probes
   every block, ``later`` reuses the first call's certificates (as the trainer does from the
   second epoch on: the factor check still runs);
2. ``full SLQ``: the full Hessian's 128-step SLQ spectrum (1 vector, float64
   re-orthogonalisation), alone. With ``--compose`` (default for VGG11_bn and ResNet18,
   slow on a shared CPU) it is composed as ``setup + 128 * step`` from runs of ``--short``
   and ``2 * --short`` steps (re-orthogonalisation is then slightly under-counted);
3. ``epoch``: full SLQ + all layers (``layer_method="auto"``), first and later epochs,
   against the full spectrum alone (measured for LeNet; composed as full + exact otherwise);
4. LeNet only, when installed: ViViT 1.0.0's exact GGN eigenvalues of the same five blocks
   (BackPACK 1.7.1, one forward and backward with its ``EigvalshComputation`` hook; a
   ``torch.linalg``-based stand-in for the ``Tensor.symeig`` it calls, removed in torch 2).

LeNet timings are medians of ``--repeats`` interleaved repeats; VGG11_bn and ResNet18 are
single runs. The load average of the (shared) machine is recorded before and after each
model. Goals (issue 10): exact / full <= 0.15 (LeNet), <= 0.1 (VGG11_bn, ResNet18) within
8 GiB; epoch / full <= 1.25 (LeNet, ResNet18). Timings on shared machines move 15-20%.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from layerhessians.curvature.certify import certify_blocks  # noqa: E402
from layerhessians.curvature.gram import gram_factors  # noqa: E402
from layerhessians.models import build_model, layer_blocks  # noqa: E402
from layerhessians.spectra import layer_spectra  # noqa: E402
from layerhessians.spectra.exact_layers import exact_blocks, layer_measure  # noqa: E402

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


def clock(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def finite_max(values) -> float | None:
    """The largest non-NaN value (``None`` if none: a residual that was not computed)."""
    values = [v for v in values if v == v]
    return max(values) if values else None


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def vivit_eigenvalues(model: nn.Module, data):
    """ViViT's exact GGN eigenvalues of LeNet's five weight blocks (one backward pass).

    Imported here: optional packages, only for the side-by-side run."""
    from backpack import backpack, extend
    from vivit.linalg.eigvalsh import EigvalshComputation

    def symeig(self, eigenvectors=False, upper=True):  # removed from torch 2
        uplo = "U" if upper else "L"
        if eigenvectors:
            return torch.linalg.eigh(self, UPLO=uplo)
        return torch.linalg.eigvalsh(self, UPLO=uplo), torch.empty(0)

    torch.Tensor.symeig = symeig
    layers = [model.conv1, model.conv2, model.fc1, model.fc2, model.fc3]
    sequential = extend(nn.Sequential(
        layers[0], nn.ReLU(), nn.MaxPool2d(2), layers[1], nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), layers[2], nn.ReLU(), layers[3], nn.ReLU(), layers[4]))
    loss_fn = extend(nn.CrossEntropyLoss())

    def run():
        computation = EigvalshComputation()
        groups = [{"params": [layer.weight]} for layer in layers]
        x, y = data
        loss = loss_fn(sequential(x), y)
        with backpack(computation.get_extension(),
                      extension_hook=computation.get_extension_hook(groups)):
            loss.backward()
        sequential.zero_grad(set_to_none=True)
        return [computation.get_result(group) for group in groups]

    return run


def run_model(name: str, args) -> dict:
    torch.set_num_threads(1)
    model, data = problem(name, args.examples)
    blocks = layer_blocks(model)
    compose = args.compose if args.compose is not None else name != "LeNet"
    repeats = args.repeats if not compose else 1
    row = {"model": name, "examples": args.examples, "threads": torch.get_num_threads(),
           "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
           "blocks": len(blocks), "composed": compose, "repeats": repeats,
           "load_before": os.getloadavg()}
    small = (data[0][:2], data[1][:2])
    layer_spectra(model, CE, small, iterations=2, layer_method="exact")  # warm-up
    parts = {"factors_s": [], "certify_s": [], "eigen_s": []}
    for _ in range(repeats):
        t_factors, factors = clock(lambda: gram_factors(model, CE, data, blocks))
        t_certify, certificates = clock(lambda factors=factors: certify_blocks(
            model, CE, data, blocks, factors))
        t_eigen, _ = clock(lambda factors=factors: [layer_measure(f)
                                                    for f in factors.values()])
        for key, value in zip(parts, (t_factors, t_certify, t_eigen)):
            parts[key].append(value)
    row.update({key: statistics.median(values) for key, values in parts.items()})
    row.update(methods={n: f.method() for n, f in factors.items()},
               gram_columns=next(iter(factors.values())).columns,
               certified=sum(c.certified for c in certificates.values()),
               worst_hessian_residual=finite_max(c.hessian_residual
                                                 for c in certificates.values()),
               worst_factor_residual=finite_max(c.factor_residual
                                                for c in certificates.values()))
    factors = None  # free the memory before the timed runs
    times = {key: [] for key in ("exact_s", "exact_later_s", "full_s", "epoch_s",
                                 "epoch_later_s", "vivit_s")}
    run_vivit = None
    if name == "LeNet" and not args.no_vivit:
        try:
            run_vivit = vivit_eigenvalues(model, data)
        except ImportError as error:
            row["vivit"] = f"not installed ({error})"
    for _ in range(repeats):
        t, (spectra, fallbacks, certs) = clock(lambda: exact_blocks(model, CE, data, blocks))
        times["exact_s"].append(t)
        t, _ = clock(lambda certs=certs: exact_blocks(model, CE, data, blocks,
                                                      certificates=certs))
        times["exact_later_s"].append(t)
        if not compose:
            t, _ = clock(lambda: layer_spectra(model, CE, data, iterations=STEPS,
                                               layers=False))
            times["full_s"].append(t)
            t, epoch = clock(lambda: layer_spectra(model, CE, data, iterations=STEPS,
                                                   layer_method="auto"))
            times["epoch_s"].append(t)
            t, _ = clock(lambda epoch=epoch: layer_spectra(
                model, CE, data, iterations=STEPS, layer_method="auto",
                certificates=epoch.certificates))
            times["epoch_later_s"].append(t)
        if run_vivit is not None:
            t, vivit_values = clock(run_vivit)
            times["vivit_s"].append(t)
    row.update({key: statistics.median(values) for key, values in times.items() if values})
    row["fallbacks"] = dict(fallbacks)
    row["peak_gib_after_exact"] = peak_gib()
    row["exact_top"] = {n: m.support[1] for n, m in spectra.items()}
    row["exact_trace"] = {n: m.trace() for n, m in spectra.items()}
    if run_vivit is not None:  # the same eigenvalues? (ViViT: float32 Gram eigenvalues)
        row["vivit_top_relative_difference"] = max(
            abs(float(values.max()) - row["exact_top"][n]) / row["exact_top"][n]
            for n, values in zip(blocks, vivit_values))
    if compose:
        short = args.short
        t_a, _ = clock(lambda: layer_spectra(model, CE, data, iterations=short, layers=False))
        t_b, _ = clock(lambda: layer_spectra(model, CE, data, iterations=2 * short,
                                             layers=False))
        step = (t_b - t_a) / short
        row["full_step_s"] = step
        row["full_s"] = (t_a - short * step) + STEPS * step
        row["epoch_s"] = row["full_s"] + row["exact_s"]
        row["epoch_later_s"] = row["full_s"] + row["exact_later_s"]
    row["exact_over_full"] = row["exact_s"] / row["full_s"]
    row["exact_later_over_full"] = row["exact_later_s"] / row["full_s"]
    row["epoch_over_full"] = row["epoch_s"] / row["full_s"]
    row["epoch_later_over_full"] = row["epoch_later_s"] / row["full_s"]
    if "vivit_s" in row:
        row["exact_over_vivit"] = row["exact_s"] / row["vivit_s"]
    row["peak_gib_self"] = peak_gib()
    row["load_after"] = os.getloadavg()
    return row


def table(rows) -> str:
    head = (f"{'model':9} {'exact s':>7} {'(factors':>8} {'certify':>7} {'eig)':>5} "
            f"{'later s':>7} {'full SLQ s':>10} {'exact/full':>10} {'later/full':>10} "
            f"{'epoch/full':>10} {'later ep.':>9} {'ViViT s':>7} {'peak GiB':>8} "
            f"{'composed':>8} {'load':>5}")
    lines = [head, "-" * len(head)]
    for r in rows:
        vivit = f"{r['vivit_s']:7.2f}" if "vivit_s" in r else f"{'-':>7}"
        lines.append(
            f"{r['model']:9} {r['exact_s']:7.2f} {r['factors_s']:8.2f} {r['certify_s']:7.2f} "
            f"{r['eigen_s']:5.2f} {r['exact_later_s']:7.2f} {r['full_s']:10.2f} "
            f"{r['exact_over_full']:10.3f} {r['exact_later_over_full']:10.3f} "
            f"{r['epoch_over_full']:10.3f} {r['epoch_later_over_full']:9.3f} {vivit} "
            f"{r.get('peak_gib', r['peak_gib_self']):8.2f} {str(r['composed']):>8} "
            f"{max(r['load_before'][0], r['load_after'][0]):5.1f}")
    return "\n".join(lines)


def run_child(command: list[str]) -> tuple[int, str, str, float]:
    """Run ``command``; its exit code, stdout, stderr and peak resident GiB (``wait4``)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return child.returncode, out.read(), err.read(), usage.ru_maxrss / 2 ** 20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["LeNet", "VGG11_bn", "ResNet18"])
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--short", type=int, default=2, help="steps of the composing runs")
    parser.add_argument("--compose", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--no-vivit", action="store_true", help="skip the ViViT run")
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
        if args.no_vivit:
            command.append("--no-vivit")
        code, out, err, peak = run_child(command)
        if code != 0:
            print(f"{name}: failed\n{err[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.strip().splitlines()[-1]))
        rows[-1]["peak_gib"] = peak
        print(table(rows[-1:]), flush=True)
    print(table(rows))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump({"torch": torch.__version__, "threads": 1,
                   "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
                   "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                   "steps": STEPS, "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
