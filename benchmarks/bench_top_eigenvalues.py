"""Operator products that ``top_eigenvalues`` (block Lanczos, block size k) needs, against
single-vector Lanczos, and whether each finds the top k with their multiplicities.

    python benchmarks/bench_top_eigenvalues.py --out benchmarks/results/top_eigenvalues.json

Products are counted, not timed (each is one Hessian-vector product on a real model), so the
numbers do not depend on the machine. Operators (dense float64, wrapped as operators):

- ``mlp``: the cross-entropy Hessian of MLP 20-30-10 (tanh, 200 random examples, dim 940);
- ``repeated``: eigenvalues 0.8976 (x2), 0.7971 (x2), 0.4242, 0.3480 and 24 in [-0.6, 0.3]
  in a random basis (dim 30; issue 11's case);
- ``least-squares``: the MSE Hessian of Linear(12, 3), every eigenvalue three times (dim 36).

Single-vector Lanczos is the recurrence of ``layerhessians.spectra.lanczos`` (full
re-orthogonalisation, stopped when the top k Ritz pairs converge to the same tolerance).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from layerhessians.curvature import MatrixOperator, dense_matrix, hessian_operator  # noqa: E402
from layerhessians.spectra import top_eigenvalues  # noqa: E402
from layerhessians.spectra.lanczos import tridiagonal_eigh  # noqa: E402
from layerhessians.spectra.slq import start_vector  # noqa: E402


class Counted(MatrixOperator):
    def __init__(self, matrix, name):
        super().__init__(matrix, name)
        self.products = 0

    def matvec(self, vector, out=None):
        self.products += 1
        return super().matvec(vector, out)


def single_vector(op, k, tol, limit):
    """Single-vector Lanczos, full re-orthogonalisation, top-k residual test; (values, products)."""
    basis = [start_vector(op.dim, 0, 0, "top/" + op.name, "gaussian")]
    alphas, betas = [], []
    while True:
        w = op.matvec(basis[-1])
        alphas.append(float(w @ basis[-1]))
        q = torch.stack(basis)
        for _ in range(2):
            w = w - q.T @ (q @ w)
        beta = float(torch.linalg.vector_norm(w))
        values, vectors = tridiagonal_eigh(np.array(alphas), np.array(betas))
        top = np.argsort(values)[::-1][:k]
        scale = np.abs(values).max()
        done = len(alphas) >= k and np.all(beta * np.abs(vectors[-1, top]) <= tol * scale)
        if done or len(alphas) == limit or beta < 1e-10 * scale:
            return values[top], op.products
        betas.append(beta)
        basis.append(w / beta)


def operators():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 10)).double()
    x, y = torch.randn(200, 20, dtype=torch.float64), torch.randint(0, 10, (200,))
    yield "mlp", dense_matrix(hessian_operator(mlp, nn.CrossEntropyLoss(), (x, y)))
    rng = np.random.default_rng(1)
    values = torch.as_tensor(np.r_[0.8976, 0.8976, 0.7971, 0.7971, 0.4242, 0.3480,
                                   rng.uniform(-0.6, 0.3, 24)])
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64))
    yield "repeated", (q * values) @ q.T
    torch.manual_seed(2)
    linear = nn.Sequential(nn.Linear(12, 3, bias=False)).double()
    x, y = torch.randn(40, 12, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    yield "least-squares", dense_matrix(hessian_operator(linear, nn.MSELoss(), (x, y)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/top_eigenvalues.json"))
    parser.add_argument("--tol", type=float, default=1e-8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name, matrix in operators():
        exact = np.sort(torch.linalg.eigvalsh(matrix).numpy())[::-1]
        for k in (1, 2, 4, 10):
            block = Counted(matrix, name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                found = top_eigenvalues(block, k, iterations=matrix.shape[0], tol=args.tol)
            single, products = single_vector(Counted(matrix, name), k, args.tol, matrix.shape[0])
            scale = abs(exact[0])
            rows.append({"operator": name, "dim": matrix.shape[0], "k": k,
                         "block_products": block.products,
                         "block_error": float(np.abs(found - exact[:k]).max() / scale),
                         "single_products": products,
                         "single_error": float(np.abs(single - exact[:k]).max() / scale)})
    header = f"{'operator':14s} {'dim':>4s} {'k':>3s} {'block':>6s} {'error':>8s} " \
             f"{'single':>6s} {'error':>8s}"
    print(header)
    for r in rows:
        print(f"{r['operator']:14s} {r['dim']:4d} {r['k']:3d} {r['block_products']:6d} "
              f"{r['block_error']:8.1e} {r['single_products']:6d} {r['single_error']:8.1e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"tol": args.tol, "threads": 1, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
