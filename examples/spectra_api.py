"""The spectra engine on its own: a LeNet at initialisation, the MNIST5k Hessian subset.

Run: python examples/spectra_api.py [--threads N] (timings:
``python benchmarks/bench_examples.py``; one torch thread unless ``--threads N``).
"""
import argparse

import torch

import layerhessians as lh
from layerhessians.data import hessian_subset, load_dataset
from layerhessians.training.threads import set_threads

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: right on a shared machine; 0 keeps "
                         "torch's default of one per core)")
set_threads(parser.parse_args().threads or None)  # torch.set_num_threads, checked

data = load_dataset("MNIST5k")                                   # offline, real MNIST
idx = hessian_subset(data.train_y, examples_per_class=10, seed=0)
batch = (data.train_x[idx], data.train_y[idx])                   # 100 examples, [100, 1, 32, 32]
torch.manual_seed(0)
model = lh.build_model("LeNet", in_channels=1, num_classes=10)
loss_fn = torch.nn.CrossEntropyLoss()

op = lh.hessian_operator(model, loss_fn, batch)                  # .dim == 61706, .matvec(v)
measure = lh.slq(op, iterations=64, vectors=2, seed=0)           # SpectralMeasure
grid, density = measure.density(points=1024)
print(op.dim, measure.support, lh.top_eigenvalues(op, 3))
print(lh.hessian_trace(op, samples=20))

spectra = lh.layer_spectra(model, loss_fn, batch, iterations=64)  # {"full": ..., "conv1.weight": ...}
print({name: round(float(m.support[1]), 3) for name, m in spectra.items()})
