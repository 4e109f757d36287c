"""Cost and quality of the Hessian-trace penalty (layerhessians.regularization.trace_penalty).

    python benchmarks/bench_htr.py                      # all three sections
    python benchmarks/bench_htr.py --sections steps --repeats 7

Sections (float32 models, cross-entropy mean, SGD momentum 0.9, torch threads ``--threads``,
default 1; every time a median of ``--repeats`` after a warm-up, the variants of a section
timed in interleaved rounds so that load from other processes hits all alike):

1. ``steps``: LeNet, batch 256 of MNIST5k: one training step with the penalty (loss +
   gamma * penalty, backward, SGD step) relative to a plain SGD step, for ggn (1 probe,
   per-example; batched, reusing the step's forward as the trainer does, and with a forward
   of its own), hutchinson (1 and 10 probes: the original's estimator, reusing the forward),
   and the original's schedule amortised (1 step in 50 with 10 probes).
2. ``quality``: LeNet on a batch of 256 MNIST5k images at initialisation, mid-training
   (2 epochs of SGD) and fitted (the batch trained to a loss below 0.01): per estimator and
   ONE probe, the value's relative standard deviation and the gradient's relative RMS error
   against the exact GGN trace and its gradient (= the Hessian trace for this ReLU/max-pool
   net), the seconds per probe (value and gradient), and both errors at a budget of one
   second (error x sqrt(seconds per probe)).
3. ``large``: VGG11_bn and ResNet18, batch 64 of random 3x32x32 inputs: step ratios
   (ggn 1 probe: batched, train-mode batch norm couples the examples; hutchinson 1 and 10
   probes, ``--large-variants``) and peak resident memory of each variant, each measured in
   a fresh subprocess.

Prints the tables and writes JSON (``--out``, default benchmarks/results/bench_htr.json).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy/scipy threads fight torch's

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from layerhessians.models import build_model  # noqa: E402
from layerhessians.regularization import penalty_forward_context, trace_penalty  # noqa: E402

GAMMA = 1e-3
#: step variants: (label, estimator, probes, form)
#: ``shared``: the penalty reuses the step's forward (``outputs=``, as the trainer and
#: ``TraceRegularizer.loss`` do); otherwise it runs its own
STEP_VARIANTS = [("sgd", None, 0, None), ("ggn 1 probe, per-example", "ggn", 1, "per-example"),
                 ("ggn 1 probe, batched, own forward", "ggn", 1, "batched"),
                 ("ggn 1 probe, batched", "ggn", 1, "batched shared"),
                 ("hutchinson 1 probe", "hutchinson", 1, "auto shared"),
                 ("hutchinson 10 probes (original)", "hutchinson", 10, "auto shared")]
QUALITY = [("hutchinson", "auto"), ("ggn", "per-example"), ("ggn", "batched")]


def mnist_batch(size: int, seed: int = 0):
    from layerhessians.data import load_dataset

    data = load_dataset("MNIST5k")
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data.train_y), generator=generator)[:size]
    return data, data.train_x[index], data.train_y[index]


def make_step(model, optimizer, loss_fn, x, y, estimator, probes, form, generator):
    """One SGD step; with an estimator, ``loss + GAMMA * trace_penalty(...)`` (``form``
    ending in `` shared``: the penalty reuses the step's forward, run in its context)."""
    form, _, shared = (form or "").partition(" ")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with penalty_forward_context() if shared else contextlib.nullcontext():
            outputs = model(x)
        loss = loss_fn(outputs, y)
        if estimator is not None:
            loss = loss + GAMMA * trace_penalty(model, loss_fn, (x, y), estimator=estimator,
                                                probes=probes, form=form, generator=generator,
                                                bn_mode="train",
                                                outputs=outputs if shared else None)
        loss.backward()
        optimizer.step()
    return step


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_ratios(model, x, y, variants, repeats: int) -> dict:
    """Median seconds per step of each variant (interleaved rounds) and the ratio to sgd."""
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    steps = {label: make_step(model, optimizer, loss_fn, x, y, est, probes, form, generator)
             for label, est, probes, form in variants}
    for step in steps.values():
        step()  # warm-up
    times = {label: [] for label in steps}
    for _ in range(repeats):
        for label, step in steps.items():
            times[label].append(timed(step))
    base = statistics.median(times["sgd"])
    return {label: {"seconds": statistics.median(t), "ratio": statistics.median(t) / base}
            for label, t in times.items()}


# ----------------------------------------------------------------------------- quality
def flat_grad(value, params):
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                      for p, g in zip(params, grads)])


def exact_reference(model, x, y, chunk: int = 32):
    """The exact GGN trace of the batch's mean loss and its gradient, by chunks."""
    params = list(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    value, grad = 0.0, torch.zeros(sum(p.numel() for p in params))
    for start in range(0, len(y), chunk):
        xs, ys = x[start:start + chunk], y[start:start + chunk]
        part = trace_penalty(model, loss_fn, (xs, ys), estimator="exact") * (len(ys) / len(y))
        value += float(part.detach())
        grad += flat_grad(part, params)
    return value, grad


def quality_at(model, x, y, samples: int) -> list[dict]:
    params = list(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    value, grad = exact_reference(model, x, y)
    rows = []
    for estimator, form in QUALITY:
        generator = torch.Generator().manual_seed(1)
        values, errors, seconds = [], [], []
        for _ in range(samples):
            start = time.perf_counter()
            estimate = trace_penalty(model, loss_fn, (x, y), estimator=estimator, probes=1,
                                     form=form, generator=generator)
            g = flat_grad(estimate, params)
            seconds.append(time.perf_counter() - start)
            values.append(float(estimate))
            errors.append(float((g - grad).norm() ** 2))
        rel_std = statistics.pstdev(values) / abs(value)
        rel_grad = math.sqrt(statistics.mean(errors)) / float(grad.norm())
        per_probe = statistics.median(seconds)
        rows.append({"estimator": estimator, "form": form, "trace": value,
                     "mean_estimate": statistics.mean(values), "rel_std": rel_std,
                     "rel_grad_error": rel_grad, "seconds_per_probe": per_probe,
                     "rel_std_1s": rel_std * math.sqrt(per_probe),
                     "rel_grad_error_1s": rel_grad * math.sqrt(per_probe)})
    return rows


def train_steps(model, batches, lr: float):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    loss = None
    for x, y in batches:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
    return float(loss)


def quality(samples: int) -> dict:
    torch.manual_seed(0)
    data, x, y = mnist_batch(256)
    model = build_model("LeNet")
    out = {"init": quality_at(model, x, y, samples)}
    batches = list(data.train_batches(256, shuffle=True, seed=0)) * 2  # 2 epochs
    model.train()
    train_steps(model, batches, 1e-2)
    out["mid-training"] = quality_at(model, x, y, samples)
    loss, steps = 1.0, 0
    while loss > 0.01 and steps < 2000:
        loss = train_steps(model, [(x, y)] * 20, 2e-2)
        steps += 20
    out["fitted"] = quality_at(model, x, y, samples)
    out["fitted_steps"], out["fitted_loss"] = steps, loss
    return out


# ----------------------------------------------------------------------------- large
LARGE_VARIANTS = [("sgd", None, 0, None), ("ggn 1 probe, batched", "ggn", 1, "batched shared"),
                  ("hutchinson 1 probe", "hutchinson", 1, "auto shared"),
                  ("hutchinson 10 probes (original)", "hutchinson", 10, "auto shared")]


def one_large(name: str, label: str, repeats: int) -> dict:
    """Seconds per step (median) and peak resident memory of one variant, this process."""
    torch.manual_seed(0)
    model = build_model(name, in_channels=3, num_classes=10)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    variant = next(v for v in LARGE_VARIANTS if v[0] == label)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    step = make_step(model, optimizer, loss_fn, x, y, *variant[1:],
                     torch.Generator().manual_seed(0))
    step()
    seconds = statistics.median(timed(step) for _ in range(repeats))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    return {"seconds": seconds, "peak_rss_mib": peak}


def large(repeats: int, threads: int, variants) -> dict:
    out = {}
    for name in ("VGG11_bn", "ResNet18"):
        rows = {}
        for label, *_ in LARGE_VARIANTS:
            if label != "sgd" and label not in variants:
                continue
            command = [sys.executable, __file__, "--one-large", name, label,
                       "--repeats", str(repeats), "--threads", str(threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows[label] = json.loads(done.stdout.strip().splitlines()[-1])
        base = rows["sgd"]["seconds"]
        for row in rows.values():
            row["ratio"] = row["seconds"] / base
        out[name] = rows
    return out


# ----------------------------------------------------------------------------- main
def print_steps(title, rows):
    print(f"\n{title}")
    print(f"{'variant':34s} {'s/step':>8s} {'x SGD':>7s}")
    for label, row in rows.items():
        print(f"{label:34s} {row['seconds']:8.3f} {row['ratio']:7.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", nargs="+", default=["steps", "quality", "large"],
                   choices=["steps", "quality", "large"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--samples", type=int, default=20, help="single-probe estimates per point")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/bench_htr.json")
    p.add_argument("--large-variants", nargs="+",
                   default=[label for label, *_ in LARGE_VARIANTS[1:]],
                   choices=[label for label, *_ in LARGE_VARIANTS[1:]],
                   help="variants of the large section besides sgd (the original's 10 probes "
                        "held 9.3 GB and had not finished 4 VGG11_bn steps in 40 min on a "
                        "loaded 2-core machine)")
    p.add_argument("--one-large", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one_large:
        print(json.dumps(one_large(*args.one_large, args.repeats)))
        return 0
    result = {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
              "machine": platform.machine(), "cpus": os.cpu_count(),
              "load_average_before": os.getloadavg()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every section: an interrupted benchmark keeps what it measured
        result["load_average_after"] = os.getloadavg()
        out.write_text(json.dumps(result, indent=1))
    if "steps" in args.sections:
        torch.manual_seed(0)
        _, x, y = mnist_batch(256)
        rows = step_ratios(build_model("LeNet"), x, y, STEP_VARIANTS, args.repeats)
        original = rows["hutchinson 10 probes (original)"]["ratio"]
        rows["original schedule (10 probes, 1 step in 50)"] = {
            "seconds": float("nan"), "ratio": 1 + (original - 1) / 50}
        result["steps"] = rows
        print_steps(f"LeNet, batch 256 (MNIST5k), {args.threads} thread(s): one training step",
                    rows)
        save()
    if "quality" in args.sections:
        result["quality"] = quality(args.samples)
        print(f"\nLeNet, batch 256: one probe's error against the exact trace "
              f"({args.samples} estimates per row)")
        print(f"{'point':13s} {'estimator':24s} {'trace':>9s} {'rel std':>8s} "
              f"{'grad err':>9s} {'s/probe':>8s} {'std@1s':>7s} {'grad@1s':>8s}")
        for point in ("init", "mid-training", "fitted"):
            for row in result["quality"][point]:
                print(f"{point:13s} {row['estimator'] + ' ' + row['form']:24s} "
                      f"{row['trace']:9.3f} {row['rel_std']:8.3f} {row['rel_grad_error']:9.3f} "
                      f"{row['seconds_per_probe']:8.3f} {row['rel_std_1s']:7.3f} "
                      f"{row['rel_grad_error_1s']:8.3f}")
        save()
    if "large" in args.sections:
        result["large"] = large(args.repeats, args.threads, args.large_variants)
        for name, rows in result["large"].items():
            print(f"\n{name}, batch 64, {args.threads} thread(s)")
            print(f"{'variant':34s} {'s/step':>8s} {'x SGD':>7s} {'peak RSS MiB':>13s}")
            for label, row in rows.items():
                print(f"{label:34s} {row['seconds']:8.3f} {row['ratio']:7.2f} "
                      f"{row['peak_rss_mib']:13.0f}")
    save()
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
