"""Small synthetic run directories in the documented format, with known answers.

``write_run(path, ...)`` writes ``config.json``, ``metrics.csv``, ``spectra.csv`` (long
table: epoch, block, vector, node, weight) and an empty ``images/``, as ``layerhessians
train`` does (docs/architecture.md), using pandas/json directly.

The spectra are built so that the answers are known:

- a base measure on ``u_j = j / (K - 1)``, ``j = 0..K-1``, with fixed weights;
- the full spectrum at epoch ``e``: ``(1 + e) * u - 0.5`` (an affine image of the base);
- layer ``i`` at epoch ``e``: ``scale_i * u ** (1 + t) + shift_i`` with distortion
  ``t = 0.5 * |i - best_layer| + 0.2 * |e - peak_epoch|``, different scales and shifts per
  layer.

On the min-max normalised axis the layer ``best_layer`` at ``peak_epoch`` is exactly the
full spectrum (distance 0), ``best_layer`` is the best layer at every epoch and over
training, and the peak epoch is ``peak_epoch``.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd

LENET_LAYERS = ("conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight", "fc3.weight")


def base_weights(k: int) -> np.ndarray:
    """Fixed quadrature-like weights on ``k`` nodes: heavy near 0, summing to 1."""
    u = np.linspace(0.0, 1.0, k)
    w = np.exp(-4.0 * u) + 0.05
    return w / w.sum()


def full_nodes(epoch: int, k: int) -> np.ndarray:
    return (1.0 + epoch) * np.linspace(0.0, 1.0, k) - 0.5


def layer_nodes(index: int, epoch: int, k: int, best_layer: int, peak_epoch: int) -> np.ndarray:
    t = 0.5 * abs(index - best_layer) + 0.2 * abs(epoch - peak_epoch)
    scale, shift = 10.0 ** (-index), 0.1 * index - 0.05
    return scale * np.linspace(0.0, 1.0, k) ** (1.0 + t) + shift


def write_run(path, *, model="LeNet", dataset="MNIST", layers=LENET_LAYERS, epochs=range(6),
              best_layer=2, peak_epoch=3, nodes=16, vectors=1, spectra=None, config=None):
    """Write a synthetic run directory at ``path``; returns its ``Path``.

    ``spectra``: optional ``{(epoch, block): (nodes, weights)}`` replacing the built-in
    spectra entirely (weights summing to 1; written as vector 0). ``config``: extra keys.
    ``block_dims`` (parameters per block, as ``layerhessians train`` writes it): synthetic
    sizes ``1000 * (i + 1)`` for layer ``i`` and 1.25 times their sum for ``full``.
    """
    path = Path(path)
    (path / "images").mkdir(parents=True, exist_ok=True)
    epochs = list(epochs)
    blocks = ["full", *layers]
    rows = []
    if spectra is None:
        weights = base_weights(nodes)
        for epoch in epochs:
            for block in blocks:
                x = (full_nodes(epoch, nodes) if block == "full" else
                     layer_nodes(blocks.index(block) - 1, epoch, nodes, best_layer, peak_epoch))
                for vector in range(vectors):
                    rows += [(epoch, block, vector, n, w) for n, w in zip(x, weights)]
    else:
        for (epoch, block), (x, w) in spectra.items():
            rows += [(epoch, block, 0, float(n), float(m)) for n, m in zip(x, w)]
    frame = pd.DataFrame(rows, columns=["epoch", "block", "vector", "node", "weight"])
    frame.to_csv(path / "spectra.csv", index=False)
    metric_epochs = sorted({int(e) for e in frame["epoch"]})
    metrics = pd.DataFrame({
        "epoch": metric_epochs,
        "lr": 0.01,
        "train_loss": [2.3 / (1 + e) for e in metric_epochs],
        "train_acc": [1 - 0.9 / (1 + e) for e in metric_epochs],
        "test_loss": [2.4 / (1 + e) + 0.05 for e in metric_epochs],
        "test_acc": [1 - 0.95 / (1 + e) for e in metric_epochs],
        "train_seconds": 1.0,
        "spectra_seconds": 2.0,
    })
    metrics.to_csv(path / "metrics.csv", index=False)
    dims = {layer: 1000 * (i + 1) for i, layer in enumerate(layers)}
    dims = {"full": int(1.25 * sum(dims.values())) or 1000, **dims}
    cfg = {"model": model, "dataset": dataset, "blocks": blocks, "block_dims": dims,
           "num_epochs": max(epochs),
           "hessian": {"iterations": nodes, "vectors": vectors, "kind": "hessian",
                       "bn_mode": "eval"}, **(config or {})}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path
