"""layer_spectra: full + every layer block in one shared pass, equal to separate runs."""

import numpy as np
import pytest
import torch

from layerhessians.curvature import dense_matrix, hessian_operator
from layerhessians.errors import UserError
from layerhessians.spectra import SpectralMeasure, layer_spectra, slq, start_vector
from problems import CE, assert_state_equal, conv_data, state_of, tiny_convnet


def test_layer_spectra_equal_separate_slq_runs_and_share_one_forward():
    model, data = tiny_convnet(), conv_data()
    model.train()
    state = state_of(model)
    forwards = []
    # graph forwards only: the batch-coupling probe adds two small no-grad forwards
    model.register_forward_hook(lambda *args: forwards.append(1) if torch.is_grad_enabled()
                                else None)
    spectra = layer_spectra(model, CE, data, iterations=12, vectors=2, seed=4,
                            layer_method="slq")
    assert list(spectra) == ["full", "conv1.weight", "conv2.weight", "fc.weight"]
    assert len(forwards) == len(data)  # one forward per batch for everything
    assert_state_equal(model, state)
    blocks = {"full": None, "conv1.weight": [model.conv1.weight],
              "conv2.weight": [model.conv2.weight], "fc.weight": [model.fc.weight]}
    for name, params in blocks.items():
        measure = spectra[name]
        assert isinstance(measure, SpectralMeasure) and measure.num_vectors == 2
        alone = slq(hessian_operator(model, CE, data, params=params), iterations=12,
                    vectors=2, seed=4)
        assert measure.dim == alone.dim
        np.testing.assert_allclose(measure.nodes, alone.nodes, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(measure.weights, alone.weights, rtol=1e-9, atol=1e-12)


def test_full_runs_give_exact_block_eigenvalues():
    model, data = tiny_convnet(), conv_data(sizes=(10,))  # one batch: batch statistics
    spectra = layer_spectra(model, CE, data, iterations=200, kind="ggn", bn_mode="train",
                            layer_method="slq")
    for name, param in [("conv1.weight", model.conv1.weight),
                        ("conv2.weight", model.conv2.weight)]:
        op = hessian_operator(model, CE, data, params=[param], kind="ggn", bn_mode="train")
        matrix = dense_matrix(op)
        values, vectors = torch.linalg.eigh(matrix)
        scale = values.abs().max().item()
        q = start_vector(op.dim, 0, 0, name)
        seen = ((vectors.T @ q) ** 2).numpy() > 1e-12  # eigenvalues the start vector sees
        measure = spectra[name]
        for value in values.numpy()[seen]:
            assert np.min(np.abs(measure.nodes - value)) < 1e-9 * scale
        for node in measure.nodes:
            assert np.min(np.abs(values.numpy() - node)) < 1e-9 * scale
        for j in range(1, 6):  # the measure's moments are q^T A^j q
            moment = float(q @ torch.linalg.matrix_power(matrix, j) @ q)
            assert measure.moments(j)[j] == pytest.approx(moment, rel=1e-9, abs=1e-14)


def test_seed_independent_of_other_blocks_and_layer_options():
    model, data = tiny_convnet(), conv_data()
    all_blocks = layer_spectra(model, CE, data, iterations=6, layer_method="slq")
    only_fc = layer_spectra(model, CE, data, iterations=6, layers={"fc.weight": model.fc.weight},
                            layer_method="slq")
    assert list(only_fc) == ["full", "fc.weight"]
    np.testing.assert_allclose(only_fc["fc.weight"].nodes, all_blocks["fc.weight"].nodes,
                               rtol=1e-12)
    assert list(layer_spectra(model, CE, data, iterations=3, layers=False)) == ["full"]


def test_layer_spectra_bad_input():
    model, data = tiny_convnet(), conv_data()
    with pytest.raises(UserError):
        layer_spectra(model, CE, data, iterations=0)
    with pytest.raises(UserError, match="reserved"):
        layer_spectra(model, CE, data, layers={"full": model.fc.weight})
    model.fc.weight.requires_grad_(False)
    with pytest.raises(UserError, match="frozen"):
        layer_spectra(model, CE, data, layers={"fc": model.fc.weight})
    with pytest.raises(UserError, match="empty"):
        layer_spectra(model, CE, [], iterations=2)
