"""Speed (and accuracy) of the spectra engine against the original method and the peers.

    python benchmarks/bench_spectra.py --models LeNet VGG11_bn ResNet18 --device cpu \
        --repeats 5 --out benchmarks/results/spectra.json

Measures, per model (random inputs [100, C, 32, 32], cross-entropy mean, batch norm in eval
mode, float32 model, float64 Lanczos vectors), medians of repeats, all ratios within this
process:

1. a gradient; a naive Hessian-vector product (fresh forward + double backward); a product on
   the reused first-order graph (goal 1: <= 2x a gradient);
2. all layer-block products of one Lanczos step against one full product (goal 2: <= 1x);
3. full + all layer spectra of one epoch against the original method at equal steps (goal 3:
   >= 3x faster). The original is simulated: per spectrum a 64-step bounding Lanczos run and
   an S-step run, no re-orthogonalisation, float32, every product a fresh forward and double
   backward (the layer products differentiate only the layer's weight, as the original's
   ``LayerHessian.Hv`` did). For the big models on a CPU both sides are composed from
   measured per-step costs (stated in the table);
4. the full spectrum (SLQ, S steps, 1 vector, float64 full re-orthogonalisation) against
   PyHessian's density at equal steps and vectors (goal 4: no slower), with curvlinops and
   hessian-eigenthings side by side when installed;
5. (``--accuracy``) W1 distance to the exact spectrum of a 2,410-parameter MLP (float64,
   100 steps), relative to the spectral range, for 1 and 10 vectors, ours and the peers.

Timings on shared machines move 15-20% between runs: compare ratios, not absolute times.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy/scipy threads fight torch's

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import OrderedDict  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from layerhessians.curvature import hessian_operator  # noqa: E402
from layerhessians.models import build_model, layer_blocks  # noqa: E402
from layerhessians.spectra import (  # noqa: E402
    exact_spectrum,
    lanczos,
    layer_operators,
    layer_spectra,
    slq,
    start_vector,
)
from layerhessians.spectra.lanczos import tridiagonal_eigh  # noqa: E402

PAPER_STEPS = 128
BOUND_STEPS = 64
PYHESSIAN_STEPS = 100
CHANNELS = {"LeNet": 1}


# ----------------------------------------------------------------------------- timing


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def once(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def median(self, fn, repeats: int, warmup: int = 1) -> float:
        for _ in range(warmup):
            fn()
        return statistics.median(self.once(fn) for _ in range(repeats))

    def interleaved(self, fns: dict, repeats: int, warmup: int = 1) -> dict:
        """Medians of ``fns`` timed in rounds (one call of each per round), so that a burst
        of load from other processes hits all of them alike."""
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        times = {k: [] for k in fns}
        for _ in range(repeats):
            for k, fn in fns.items():
                times[k].append(self.once(fn))
        return {k: statistics.median(v) for k, v in times.items()}


# ----------------------------------------------------------------------------- the original


def naive_product(model, loss_fn, x, y, params):
    """A product as the original made it: fresh forward, create_graph gradient, backward."""
    sizes = [p.numel() for p in params]
    shapes = [p.shape for p in params]

    def product(v: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        parts = [t.view(s) for t, s in zip(v.split(sizes), shapes)]
        hv = torch.autograd.grad(grads, params, parts)
        return torch.cat([t.reshape(-1) for t in hv])

    return product


def plain_lanczos32(product, dim, steps, generator, device):
    """Lanczos without re-orthogonalisation in float32 (the original's arithmetic)."""
    q = torch.randn(dim, generator=generator).to(device)
    q /= q.norm()
    q_prev, beta = torch.zeros_like(q), 0.0
    alphas, betas = [], []
    for j in range(steps):
        w = product(q) - beta * q_prev
        alpha = float(w @ q)
        w -= alpha * q
        alphas.append(alpha)
        beta = float(w.norm())
        if j + 1 < steps:
            betas.append(beta)
            q_prev, q = q, w / beta
    return np.array(alphas), np.array(betas), beta


def original_spectrum(product, dim, steps, device, seed=0):
    """Papyan's method as in the original code: bounds from a 64-step run (Ritz extremes
    +- residual, 5% margin), then an S-step run smoothed on 1024 points."""
    generator = torch.Generator().manual_seed(seed)
    alphas, betas, residual = plain_lanczos32(product, dim, BOUND_STEPS, generator, device)
    values, vectors = tridiagonal_eigh(alphas, betas)
    low = values[0] - abs(residual * vectors[-1, 0])
    high = values[-1] + abs(residual * vectors[-1, -1])
    span = high - low
    low, high = low - 0.05 * span, high + 0.05 * span
    alphas, betas, _ = plain_lanczos32(product, dim, steps, generator, device)
    nodes, vectors = tridiagonal_eigh(alphas, betas)
    weights = vectors[0] ** 2
    grid = np.linspace(-1, 1, 1024)
    sigma = 2 / (steps - 1) / math.sqrt(8 * math.log(1.25))
    t = (nodes - (high + low) / 2) / ((high - low) / 2)
    density = (np.exp(-0.5 * ((grid[:, None] - t[None, :]) / sigma) ** 2) @ weights)
    return grid, density


class _Diagonal:
    """``diag(d) v`` with a fixed random ``d``: an operator whose product is one cheap pass,
    to time the Lanczos vector work at a model's sizes."""

    matvec_accepts_out = True

    def __init__(self, dim, device):
        self.dim, self.device, self.name = dim, device, "diagonal"
        self.diagonal = torch.rand(dim, dtype=torch.float64, device=device)

    def matvec(self, vector, out=None):
        return torch.mul(vector, self.diagonal, out=out)


# ----------------------------------------------------------------------------- peers


def pyhessian_density(model, loss_fn, x, y, steps, device):
    """PyHessian 0.1's density with a torch.linalg.eigh stand-in for the removed torch.eig."""
    from pyhessian import hessian as pyhessian_hessian

    def eig_stand_in(matrix, eigenvectors=True):
        values, vectors = torch.linalg.eigh(matrix)
        return torch.stack([values, torch.zeros_like(values)], 1), vectors

    had_eig = hasattr(torch, "eig")
    original = getattr(torch, "eig", None)
    torch.eig = eig_stand_in
    try:
        engine = pyhessian_hessian(model, loss_fn, data=(x, y), cuda=device.type == "cuda")
        nodes, weights = engine.density(iter=steps, n_v=1)
    finally:
        if had_eig:
            torch.eig = original
        else:
            del torch.eig
        model.zero_grad(set_to_none=True)
    return nodes, weights


def curvlinops_spectrum(model, loss_fn, x, y, steps):
    from curvlinops import HessianLinearOperator
    from curvlinops.papyan2020traces.spectrum import lanczos_approximate_spectrum

    params = [p for p in model.parameters() if p.requires_grad]
    op = HessianLinearOperator(model, loss_fn, params, [(x, y)], check_deterministic=False)
    return lanczos_approximate_spectrum(op, steps, num_repeats=1)


def eigenthings_density(model, loss_fn, x, y, steps, runs=1, seed=0):
    from hessian_eigenthings import HessianOperator, spectral_density, supervised_loss

    op = HessianOperator(model, [(x, y)], supervised_loss(loss_fn))
    return spectral_density(op, num_runs=runs, lanczos_steps=steps, seed=seed)


def peer_available(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:
        return False


# ----------------------------------------------------------------------------- per model


def model_and_data(name, examples, device, seed=0):
    torch.manual_seed(seed)
    channels = CHANNELS.get(name, 3)
    model = build_model(name, in_channels=channels, num_classes=10).to(device).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(examples, channels, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (examples,), generator=g).to(device)
    return model, x, y


def bench_model(name, args, device, timer, log):
    big = name in args.composed if args.composed is not None else (
        name != "LeNet" and device.type == "cpu")
    repeats = max(1, min(args.repeats, args.big_repeats)) if big else args.repeats
    model, x, y = model_and_data(name, args.examples, device)
    loss_fn = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in params)
    blocks = layer_blocks(model)
    result = OrderedDict(model=name, parameters=dim, examples=args.examples,
                         layer_blocks=len(blocks), repeats=repeats,
                         load_average_before=os.getloadavg())
    log(f"\n== {name}: {dim:,} parameters, {len(blocks)} layer blocks, "
        f"{args.examples} examples, repeats {repeats}")

    # -- goal 1: products
    def gradient():
        torch.autograd.grad(loss_fn(model(x), y), params)

    v64 = start_vector(dim, 0, 0, "bench").to(device)
    naive = naive_product(model, loss_fn, x, y, params)
    ops = layer_operators(model, loss_fn, (x, y))
    build = timer.once(lambda: ops["full"].graph.build())
    warmup = 0 if big else 1  # a big model's products take seconds: no warm-up round
    t = OrderedDict()
    t["graph_build"] = build
    t.update(timer.interleaved({"gradient": gradient,
                                "naive_hvp": lambda: naive(v64.float()),
                                "reused_hvp": lambda: ops["full"].matvec(v64)},
                               repeats, warmup))
    log(f"gradient {t['gradient'] * 1e3:.1f} ms, naive HVP {t['naive_hvp'] * 1e3:.1f} ms, "
        f"reused HVP {t['reused_hvp'] * 1e3:.1f} ms")

    # -- goal 2: all block products of one step vs one full product
    block_vectors = {k: start_vector(op.dim, 0, 0, k).to(device) for k, op in ops.items()}
    per_block = OrderedDict()
    for k, op in ops.items():
        if k != "full":
            per_block[k] = timer.median(lambda op=op, k=k: op.matvec(block_vectors[k]),
                                        1 if big else repeats, warmup)
    if big:  # the sum of the single per-block measurements (CPU time is scarce)
        t["all_block_products"] = sum(per_block.values())
    else:  # interleaved with the full product, whose median is reported with it
        pair = timer.interleaved(
            {"all": lambda: [op.matvec(block_vectors[k]) for k, op in ops.items()
                             if k != "full"],
             "full": lambda: ops["full"].matvec(v64)}, repeats, warmup=0)
        t["all_block_products"] = pair["all"]
        t["full_product_beside_blocks"] = pair["full"]
    ops["full"].release()
    ops = None  # drop the operators and their graph before the next measurements
    if not big:  # the same products with PyTorch's own convolution double backward
        native = layer_operators(model, loss_fn, (x, y), conv_double_backward="native")
        native["full"].graph.build()
        native_times = timer.interleaved(
            {"full": lambda: native["full"].matvec(v64),
             "all": lambda: [op.matvec(block_vectors[k]) for k, op in native.items()
                             if k != "full"],
             "gradient": gradient}, repeats)
        t["reused_hvp_native_conv"] = native_times["full"]
        t["all_block_products_native_conv"] = native_times["all"]
        t["gradient_beside_native_conv"] = native_times["gradient"]
        native["full"].release()
        del native
    log(f"all {len(blocks)} block products {t['all_block_products'] * 1e3:.1f} ms "
        f"(full {t.get('full_product_beside_blocks', t['reused_hvp']) * 1e3:.1f} ms)")

    # -- goal 3: full + layer spectra of one epoch vs the original method
    steps = args.steps
    spectra_params = OrderedDict([("full", params)] + [(k, ps) for k, ps in blocks.items()])
    if not big:
        def ours_epoch(reorthogonalize=True):
            spectra = layer_spectra(model, loss_fn, (x, y), iterations=steps,
                                    reorthogonalize=reorthogonalize)
            for measure in spectra.values():
                measure.density()

        def original_epoch():
            for block_params in spectra_params.values():
                product = naive_product(model, loss_fn, x, y, block_params)
                original_spectrum(product, sum(p.numel() for p in block_params), steps,
                                  device)

        epoch_repeats = max(1, min(repeats, args.epoch_repeats))
        t["ours_epoch"] = timer.median(ours_epoch, epoch_repeats, warmup=0)
        t["ours_epoch_no_reorth"] = timer.median(lambda: ours_epoch(False), epoch_repeats,
                                                 warmup=0)
        log(f"ours: full + {len(blocks)} layer spectra, {steps} steps: "
            f"{t['ours_epoch']:.2f} s ({t['ours_epoch_no_reorth']:.2f} s without "
            "re-orthogonalisation)")
        t["original_epoch"] = timer.median(original_epoch, epoch_repeats, warmup=0)
        log(f"original method: {t['original_epoch']:.2f} s")
        epoch_note = f"measured, {steps} steps, median of {epoch_repeats}"
    else:
        # Composed from measured parts (an end-to-end 128-step run would take an hour on a
        # CPU): per step, the full product + all block products (medians above) + the
        # Lanczos vector work at these sizes (measured with cheap diagonal operators);
        # setup = graph build + start vectors. Without re-orthogonalisation: its basis at
        # 128 steps would need 128 * 8 B * (dim + block dims), like the original.
        dims = [dim] + [sum(p.numel() for p in ps) for ps in blocks.values()]
        diagonals = [_Diagonal(n, device) for n in dims]
        starts = timer.once(lambda: [start_vector(n, 0, 0, str(i)) for i, n in enumerate(dims)])
        vectors = [start_vector(n, 0, 0, str(i)).to(device) for i, n in enumerate(dims)]
        k = max(1, args.big_steps)
        overhead = timer.once(lambda: lanczos(diagonals, vectors, k, reorthogonalize=False)) / k
        per_step = t["reused_hvp"] + t["all_block_products"] + overhead
        setup = t["graph_build"] + starts
        naive_costs = OrderedDict()
        for key, block_params in spectra_params.items():
            product = naive_product(model, loss_fn, x, y, block_params)
            vec = torch.randn(sum(p.numel() for p in block_params)).to(device)
            naive_costs[key] = timer.median(lambda product=product, vec=vec: product(vec), 1,
                                           warmup=0)
        original_step = sum(naive_costs.values())
        t["ours_step"] = per_step
        t["ours_lanczos_vector_work_per_step"] = overhead
        t["ours_setup"] = setup
        t["original_step_per_spectrum_set"] = original_step
        t["ours_epoch"] = setup + args.steps * per_step
        t["original_epoch"] = (BOUND_STEPS + args.steps) * original_step
        result["naive_block_product_seconds"] = naive_costs
        epoch_note = (f"composed for {args.steps} steps from measured costs (ours: full + "
                      f"block products + Lanczos vector work per step, no "
                      f"re-orthogonalisation; original: one naive product per spectrum, "
                      f"x{BOUND_STEPS + args.steps})")
        log(f"ours per step {per_step:.2f} s (Lanczos vector work {overhead:.2f} s; "
            f"+{setup:.2f} s setup); original per step {original_step:.2f} s; "
            f"epoch {t['ours_epoch']:.0f} s vs {t['original_epoch']:.0f} s")

    # -- goal 4: full spectrum vs PyHessian density, equal steps, 1 vector
    density_steps = args.density_steps if not big else args.big_density_steps
    density_repeats = 1 if big else min(repeats, 3)
    t["ours_full_spectrum"] = timer.median(
        lambda: slq(hessian_operator(model, loss_fn, (x, y)), iterations=density_steps)
        .density(), density_repeats, warmup=0)
    peers = OrderedDict()
    if peer_available("pyhessian"):
        peers["pyhessian"] = timer.median(
            lambda: pyhessian_density(model, loss_fn, x, y, density_steps, device),
            density_repeats, warmup=0)
    if not big and peer_available("curvlinops"):
        peers["curvlinops"] = timer.median(
            lambda: curvlinops_spectrum(model, loss_fn, x, y, density_steps), 1, warmup=0)
    if not big and peer_available("hessian_eigenthings"):
        peers["hessian_eigenthings"] = timer.median(
            lambda: eigenthings_density(model, loss_fn, x, y, density_steps), 1, warmup=0)
    log(f"full spectrum {density_steps} steps: ours {t['ours_full_spectrum']:.2f} s; "
        + ", ".join(f"{k} {v:.2f} s" for k, v in peers.items()))

    ratios = OrderedDict()
    ratios["naive_hvp_over_gradient"] = t["naive_hvp"] / t["gradient"]
    ratios["reused_hvp_over_gradient"] = t["reused_hvp"] / t["gradient"]
    ratios["all_blocks_over_full_product"] = t["all_block_products"] / t.get(
        "full_product_beside_blocks", t["reused_hvp"])
    ratios["original_over_ours_epoch"] = t["original_epoch"] / t["ours_epoch"]
    if "ours_epoch_no_reorth" in t:
        ratios["original_over_ours_epoch_no_reorth"] = (t["original_epoch"]
                                                        / t["ours_epoch_no_reorth"])
    if "reused_hvp_native_conv" in t:
        ratios["reused_hvp_native_conv_over_gradient"] = (t["reused_hvp_native_conv"]
                                                          / t["gradient_beside_native_conv"])
        ratios["all_blocks_over_full_product_native_conv"] = (
            t["all_block_products_native_conv"] / t["reused_hvp_native_conv"])
    for k, v in peers.items():
        ratios[f"{k}_over_ours_full_spectrum"] = v / t["ours_full_spectrum"]
    goals = OrderedDict()
    goals["1_hvp_at_most_2x_gradient"] = _goal(ratios["reused_hvp_over_gradient"], 2.0, "<=")
    goals["2_blocks_at_most_1x_full"] = _goal(ratios["all_blocks_over_full_product"], 1.0, "<=")
    goals["3_epoch_at_least_3x_faster"] = _goal(ratios["original_over_ours_epoch"], 3.0, ">=")
    if "pyhessian" in peers:
        goals["4_not_slower_than_pyhessian"] = _goal(
            ratios["pyhessian_over_ours_full_spectrum"], 1.0, ">=")
    result.update(
        load_average_after=os.getloadavg(),
        seconds=t, block_product_seconds=per_block, peer_seconds=peers, ratios=ratios,
        goals=goals, epoch_steps=steps, epoch_method=epoch_note,
        density_steps=density_steps,
        reorth_basis_bytes_at_128_steps=int(PAPER_STEPS * 8 * (dim + sum(
            p.numel() for ps in blocks.values() for p in ps))),
    )
    return result


def _goal(value, target, direction):
    met = value <= target if direction == "<=" else value >= target
    margin = target / value if direction == "<=" else value / target
    return OrderedDict(value=value, target=f"{direction} {target}", met=bool(met),
                       factor=margin)


# ----------------------------------------------------------------------------- accuracy


def bench_accuracy(args, log):
    """W1 to the exact spectrum of a 64-32-10 MLP (2,410 parameters) on 100 Digits images."""
    from sklearn.datasets import load_digits

    from layerhessians.spectra.measure import w1 as measure_w1

    digits = load_digits()
    x = torch.as_tensor(digits.data[:100] / 16.0, dtype=torch.float64)
    y = torch.as_tensor(digits.target[:100])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(30):  # a little training gives outliers and a bulk
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    op = hessian_operator(model, loss_fn, (x, y))
    exact = exact_spectrum(op)
    low, high = exact.support

    def w1(nodes, weights):
        nodes, weights = np.asarray(nodes, float).ravel(), np.asarray(weights, float).ravel()
        keep = np.isfinite(nodes)
        nodes, weights = nodes[keep], weights[keep] / weights[keep].sum()
        return measure_w1(nodes, weights, exact.nodes, exact.weights) / (high - low)

    steps, seeds = 100, args.accuracy_seeds
    results = OrderedDict()

    def record(name, vectors, fn):
        values = [fn(vectors, seed) for seed in range(seeds)]
        results[f"{name}, {vectors} vector{'s' if vectors > 1 else ''}"] = OrderedDict(
            mean=float(np.mean(values)), std=float(np.std(values)), seeds=seeds)

    for vectors in (1, 10):
        record("ours (float64, full reorth.)", vectors, lambda v, s: w1(
            *(lambda m: (m.nodes, m.weights))(slq(op, iterations=steps, vectors=v, seed=s))))
        record("ours (no reorth.)", vectors, lambda v, s: w1(
            *(lambda m: (m.nodes, m.weights))(slq(op, iterations=steps, vectors=v, seed=s,
                                                  reorthogonalize=False))))
        if peer_available("pyhessian"):
            def pyh(v, s):
                torch.manual_seed(s)
                nodes, weights = _pyhessian_vectors(model, loss_fn, x, y, steps, v)
                return w1(nodes, np.asarray(weights) / v)
            record("pyhessian", vectors, pyh)
        if peer_available("curvlinops"):
            def cvl(v, s):
                from curvlinops import HessianLinearOperator
                from curvlinops.papyan2020traces.spectrum import fast_lanczos
                params = list(model.parameters())
                A = HessianLinearOperator(model, loss_fn, params, [(x, y)],
                                          check_deterministic=False)
                torch.manual_seed(s)
                nodes, weights = [], []
                for _ in range(v):
                    evals, evecs = fast_lanczos(A, steps)
                    nodes.append(evals.numpy())
                    weights.append(evecs[0].numpy() ** 2 / v)
                return w1(nodes, weights)
            record("curvlinops (fast_lanczos)", vectors, cvl)
        if peer_available("hessian_eigenthings"):
            def het(v, s):
                result = eigenthings_density(model, loss_fn, x, y, steps, runs=v, seed=s)
                return w1(result.raw_eigenvalues.numpy(), result.raw_weights.numpy() / v)
            record("hessian-eigenthings", vectors, het)
    for k, r in results.items():
        log(f"accuracy {k}: W1/range {r['mean']:.4f} +- {r['std']:.4f} ({seeds} seeds)")
    return OrderedDict(model="MLP 64-32-10 (2,410 parameters), Digits, 100 examples, float64",
                       steps=steps, exact_range=[low, high], w1_over_range=results)


def _pyhessian_vectors(model, loss_fn, x, y, steps, vectors):
    from pyhessian import hessian as pyhessian_hessian

    def eig_stand_in(matrix, eigenvectors=True):
        values, vecs = torch.linalg.eigh(matrix)
        return torch.stack([values, torch.zeros_like(values)], 1), vecs

    torch.eig = eig_stand_in
    try:
        engine = pyhessian_hessian(model, loss_fn, data=(x, y), cuda=False)
        nodes, weights = engine.density(iter=steps, n_v=vectors)
    finally:
        del torch.eig
        model.zero_grad(set_to_none=True)
    return nodes, weights


# ----------------------------------------------------------------------------- report


def table(results) -> str:
    lines = []
    head = (f"{'model':9s} {'params':>11s} {'grad ms':>8s} {'naive/g':>8s} {'reuse/g':>8s} "
            f"{'G1':>3s} {'blk/full':>8s} {'G2':>3s} {'orig/ours':>9s} {'G3':>3s} "
            f"{'pyh/ours':>8s} {'G4':>3s}  epoch")
    lines.append(head)
    lines.append("-" * len(head))
    for r in results:
        rt, g = r["ratios"], r["goals"]
        mark = lambda key: ("yes" if g[key]["met"] else "NO") if key in g else "-"  # noqa
        pyh = rt.get("pyhessian_over_ours_full_spectrum", float("nan"))
        lines.append(
            f"{r['model']:9s} {r['parameters']:>11,d} {r['seconds']['gradient'] * 1e3:8.1f} "
            f"{rt['naive_hvp_over_gradient']:8.2f} {rt['reused_hvp_over_gradient']:8.2f} "
            f"{mark('1_hvp_at_most_2x_gradient'):>3s} "
            f"{rt['all_blocks_over_full_product']:8.2f} {mark('2_blocks_at_most_1x_full'):>3s} "
            f"{rt['original_over_ours_epoch']:9.2f} {mark('3_epoch_at_least_3x_faster'):>3s} "
            f"{pyh:8.2f} {mark('4_not_slower_than_pyhessian'):>3s}  {r['epoch_method']}")
    return "\n".join(lines)


def write_json(path, payload):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as f:
        json.dump(payload, f, indent=2)
        tmp = f.name
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["LeNet", "VGG11_bn", "ResNet18"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=PAPER_STEPS,
                        help="Lanczos steps per spectrum in the epoch comparison (paper: 128)")
    parser.add_argument("--density-steps", type=int, default=PYHESSIAN_STEPS,
                        help="steps of the full-spectrum comparison with the peers")
    parser.add_argument("--epoch-repeats", type=int, default=1,
                        help="repeats of the whole-epoch comparison (LeNet)")
    parser.add_argument("--big-steps", type=int, default=3,
                        help="VGG11_bn/ResNet18 on a CPU: Lanczos steps of the vector-work "
                             "measurement")
    parser.add_argument("--composed", nargs="*", default=None,
                        help="models measured the cheap way (default: all but LeNet on a CPU)")
    parser.add_argument("--big-density-steps", type=int, default=2,
                        help="VGG11_bn/ResNet18 on a CPU: steps of the PyHessian comparison")
    parser.add_argument("--big-repeats", type=int, default=2)
    parser.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--accuracy-seeds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/spectra.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    timer = Timer(device)
    start = time.perf_counter()

    def log(message):
        print(message, flush=True)

    results = [bench_model(name, args, device, timer, log) for name in args.models]
    accuracy = bench_accuracy(args, log) if args.accuracy else None
    print()
    print(table(results))
    payload = OrderedDict(
        machine=OrderedDict(python=platform.python_version(), torch=torch.__version__,
                            platform=platform.platform(), cpus=os.cpu_count(),
                            torch_threads=torch.get_num_threads(), device=str(device),
                            cuda=torch.cuda.get_device_name(device)
                            if device.type == "cuda" else None),
        settings=vars(args), models=results, accuracy=accuracy,
        seconds_total=time.perf_counter() - start,
        notes=["medians of repeats; ratios are within this process",
               "timings on shared machines move 15-20% between runs"],
    )
    write_json(args.out, payload)
    print(f"\nwrote {args.out} ({payload['seconds_total']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
