"""Exact layer-block spectra by the Gram route, against dense float64 references."""

import logging

import numpy as np
import pytest
import torch
from torch import nn

from layerhessians.curvature import gram as gram_module
from layerhessians.curvature import layer_blocks, reference_matrix
from layerhessians.curvature.certify import certify_blocks, probe_tolerance
from layerhessians.curvature.gram import gram_factors, output_hessian_sqrt
from layerhessians.errors import UserError
from layerhessians.spectra import SpectralMeasure, layer_spectra
from layerhessians.spectra.exact_layers import (
    exact_ggn_spectrum,
    exact_layer_spectra,
    gram_measure,
)
from layerhessians.spectra.fidelity import relative_w1, slq_fidelity
from problems import TinyLeNet, counter_examples, zoo
from references import dense_reference

CE = nn.CrossEntropyLoss()
ZOO = zoo()
COUNTER = counter_examples()


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def dense_measure(matrix):
    values = torch.linalg.eigvalsh(matrix.detach()).numpy()
    return SpectralMeasure(values[None, :], np.full((1, values.size), 1.0 / values.size),
                           dim=values.size)


@pytest.mark.parametrize("name", list(ZOO))
def test_hessian_block_equals_ggn_block_on_the_tiny_zoo(name):
    model, data = ZOO[name]
    for block, (param,) in layer_blocks(model).items():
        hessian = reference_matrix(model, CE, data, params=[param], kind="hessian")
        ggn = reference_matrix(model, CE, data, params=[param], kind="ggn")
        assert rel(hessian, ggn) < 1e-10, block
        independent = dense_reference(model, CE, data, "hessian", [param], reduction="mean")
        assert rel(hessian, independent) < 1e-10, block
        assert rel(dense_reference(model, CE, data, "ggn", [param], reduction="mean"),
                   independent) < 1e-10, block


@pytest.mark.parametrize("name", list(COUNTER))
def test_the_identity_fails_on_the_counter_examples(name):
    model, data, bn_mode = COUNTER[name]
    residuals = []
    for (param,) in layer_blocks(model).values():
        hessian = reference_matrix(model, CE, data, params=[param], bn_mode=bn_mode)
        ggn = reference_matrix(model, CE, data, params=[param], kind="ggn", bn_mode=bn_mode)
        residuals.append(rel(hessian, ggn))
        independent = [dense_reference(model, CE, data, kind, [param], reduction="mean",
                                       bn_mode=bn_mode) for kind in ("hessian", "ggn")]
        assert rel(hessian, independent[0]) < 1e-10 and rel(ggn, independent[1]) < 1e-10
    assert max(residuals) > 0.1
    assert residuals[-1] < 1e-10  # the output layer: the outputs are linear in its weight


@pytest.mark.parametrize("name", list(ZOO))
def test_gram_factors_give_the_dense_ggn_block_and_its_spectrum(name):
    model, data = ZOO[name]
    blocks = layer_blocks(model)
    factors = gram_factors(model, CE, data, blocks)
    measures, certificates = exact_layer_spectra(model, CE, data)
    assert list(measures) == list(blocks)
    for block, (param,) in blocks.items():
        ggn = reference_matrix(model, CE, data, params=[param], kind="ggn")
        assert rel(factors[block].dense_block(), ggn) < 1e-10
        assert rel(factors[block].dense_block(),
                   dense_reference(model, CE, data, "ggn", [param], reduction="mean")) < 1e-10
        reference = dense_measure(reference_matrix(model, CE, data, params=[param]))
        independent = dense_measure(dense_reference(model, CE, data, "hessian", [param],
                                                    reduction="mean"))
        for method in ("factorised", "materialised"):  # the Gram matrix by both routes
            values = torch.linalg.eigvalsh(factors[block].gram(method)).numpy()
            values = np.sort(values)[-min(values.size, param.numel()):]
            assert relative_w1(gram_measure(values, param.numel()), reference) < 1e-10
        measure = measures[block]
        assert measure.method == "exact" and measure.dim == param.numel()
        assert measure.num_vectors == 1
        assert relative_w1(measure, reference) < 1e-10
        assert relative_w1(measure, independent) < 1e-10
        assert measure.trace() == pytest.approx(float(torch.trace(ggn.detach())), rel=1e-10)
        assert certificates[block].certified
        assert certificates[block].hessian_residual < probe_tolerance(torch.float64)


def test_float32_grams_agree_with_float64():  # the float32 BLAS routes (ssyrk)
    model, data = ZOO["LeNet"]
    single = [(x.float(), y) for x, y in data]
    model32 = TinyLeNet()
    model32.load_state_dict(model.state_dict())
    blocks, blocks32 = layer_blocks(model), layer_blocks(model32)
    factors = gram_factors(model, CE, data, blocks)
    factors32 = gram_factors(model32, CE, single, blocks32)
    for block in blocks:
        f64, f32 = factors[block], factors32[block]
        assert rel(f32.dense_block().double(), f64.dense_block()) < 1e-5
        for method in ("factorised", "materialised"):
            gram = f32.gram(method)
            assert gram.dtype == torch.float32
            if method == "materialised":  # one triangle by syrk, mirrored
                assert torch.equal(gram, gram.T)
            assert rel(gram.double(), f64.gram(method)) < 1e-5


def test_grams_in_chunks_equal_grams_in_one_piece(monkeypatch):
    model, data = ZOO["VGG11_bn"]
    factors = gram_factors(model, CE, data, layer_blocks(model))
    whole = {(b, m): f.gram(m) for b, f in factors.items()
             for m in ("factorised", "materialised")}
    monkeypatch.setattr(gram_module, "_CHUNK_BYTES", 1)  # one example / channel per chunk
    for (block, method), reference in whole.items():
        assert rel(factors[block].gram(method), reference) < 1e-13, (block, method)


def test_zero_eigenvalue_carries_the_missing_mass():
    model, data = ZOO["VGG11_bn"]
    x, y = data
    data = (x[:2], y[:2])  # N K = 2 * (3 - 1) = 4 < dim: a rank-deficient block
    measures, _ = exact_layer_spectra(model, CE, data)
    block = "features.8.weight"
    param = model.features[8].weight
    assert param.numel() > 4
    measure = measures[block]
    assert measure.nodes.size == 5 and measure.nodes[-1] == 0.0
    assert measure.weights[-1] == pytest.approx((param.numel() - 4) / param.numel())
    reference = dense_measure(reference_matrix(model, CE, data, params=[param]))
    assert relative_w1(measure, reference) < 1e-10
    independent = dense_measure(dense_reference(model, CE, data, params=[param],
                                                reduction="mean"))
    assert relative_w1(measure, independent) < 1e-10


def test_micro_batches_and_general_loss_route_agree():
    model, data = ZOO["LeNet"]
    blocks = layer_blocks(model)
    whole = gram_factors(model, CE, data, blocks)
    micro = gram_factors(model, CE, data, blocks, micro_batch_size=2)

    def general(outputs, targets):  # cross-entropy written out: no closed form used
        return (torch.logsumexp(outputs, 1) - outputs.gather(1, targets[:, None])[:, 0]).mean()

    other = gram_factors(model, general, data, blocks)
    for block in blocks:
        reference = whole[block].dense_block()
        assert rel(micro[block].dense_block(), reference) < 1e-12
        assert rel(other[block].dense_block(), reference) < 1e-10
    mse = nn.MSELoss()
    x, y = data[0]
    targets = torch.randn(x.shape[0], 3, dtype=torch.float64)
    factors = gram_factors(model, mse, (x, targets), blocks)
    for block, (param,) in blocks.items():
        ggn = reference_matrix(model, mse, (x, targets), params=[param], kind="ggn")
        assert rel(factors[block].dense_block(), ggn) < 1e-10
        independent = dense_reference(model, mse, (x, targets), "ggn", [param],
                                      reduction="mean")
        assert rel(factors[block].dense_block(), independent) < 1e-10


def test_output_hessian_square_root_of_cross_entropy():
    g = torch.Generator().manual_seed(0)
    outputs = torch.randn(4, 5, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 5, (4,), generator=g)
    root = output_hessian_sqrt(CE, outputs, targets, 0.25)
    hessian = torch.func.hessian(lambda z: CE(z, targets))(outputs)
    for n in range(4):
        np.testing.assert_allclose((root[n] @ root[n].T).numpy(),
                                   hessian[n, :, n, :].numpy(), atol=1e-15)


@pytest.mark.parametrize("spread", [1.0, 40.0, 800.0])  # 800: p underflows to exact zeros
def test_cross_entropy_square_root_has_the_output_hessians_rank(spread):
    g = torch.Generator().manual_seed(1)
    outputs = spread * torch.randn(6, 7, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 7, (6,), generator=g)
    root = output_hessian_sqrt(CE, outputs, targets, 1.0 / 6)
    assert root.shape == (6, 7, 6)  # C - 1 columns: the all-ones null direction dropped
    hessian = torch.func.hessian(lambda z: CE(z, targets))(outputs)
    for n in range(6):
        np.testing.assert_allclose((root[n] @ root[n].T).numpy(),
                                   hessian[n, :, n, :].numpy(), rtol=0, atol=1e-15)


def test_factors_come_from_one_batched_backward_per_micro_batch(monkeypatch):
    calls = []
    grad = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(kwargs.get("is_grads_batched", False))
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    for name, (model, data) in ZOO.items():
        sizes = [int(x.shape[0]) for x, _ in (data if isinstance(data, list) else [data])]
        calls.clear()
        gram_factors(model, CE, data, layer_blocks(model))
        assert calls == [True] * len(sizes), name  # not a loop over the columns
        calls.clear()
        gram_factors(model, CE, data, layer_blocks(model), micro_batch_size=2)
        assert calls == [True] * sum(-(-n // 2) for n in sizes), name


@pytest.mark.parametrize("name", ["VGG11_bn", "tanh"])
def test_certification_without_factors_compares_the_diagonal_blocks(name):
    model, data = ZOO[name] if name in ZOO else COUNTER[name][:2]
    blocks = layer_blocks(model)
    certificates = certify_blocks(model, CE, data, blocks)  # no factors: H_bb v vs G_bb v
    for block, (param,) in blocks.items():
        hessian = reference_matrix(model, CE, data, params=[param])
        ggn = reference_matrix(model, CE, data, params=[param], kind="ggn")
        certificate = certificates[block]
        assert not certificate.certified and "no Gram factors" in certificate.reason
        if rel(hessian, ggn) < 1e-10:
            assert certificate.hessian_residual < probe_tolerance(torch.float64), block
            assert certificate.reason == "no Gram factors"
        else:
            assert certificate.hessian_residual > 1e-3, block


@pytest.mark.parametrize("name", list(COUNTER))
def test_certification_refuses_every_counter_example(name):
    model, data, bn_mode = COUNTER[name]
    blocks = layer_blocks(model)
    try:
        factors = gram_factors(model, CE, data, blocks)
    except UserError:  # the shared weight runs twice: no factors for any block
        factors = {}
    certificates = certify_blocks(model, CE, data, blocks, factors, bn_mode=bn_mode)
    for block, (param,) in blocks.items():
        hessian = reference_matrix(model, CE, data, params=[param], bn_mode=bn_mode)
        ggn = reference_matrix(model, CE, data, params=[param], kind="ggn", bn_mode=bn_mode)
        if rel(hessian, ggn) > 1e-8:
            assert not certificates[block].certified, block
    assert not all(c.certified for c in certificates.values())
    with pytest.raises(UserError, match="not certified|cannot"):
        layer_spectra(model, CE, data, iterations=4, bn_mode=bn_mode, layer_method="exact")


def test_auto_falls_back_to_slq_and_says_so_once(caplog):
    model, data, _ = COUNTER["tanh"]
    with caplog.at_level(logging.WARNING, logger="layerhessians.spectra"):
        spectra = layer_spectra(model, CE, data, iterations=6, layer_method="auto")
    messages = [r for r in caplog.records if "SLQ instead of the exact route" in r.message]
    assert len(messages) == 1
    assert spectra.methods == {"full": "slq", "conv1.weight": "slq", "conv2.weight": "slq",
                               "fc1.weight": "slq", "fc2.weight": "slq",
                               "fc3.weight": "exact"}
    assert set(spectra.fallbacks) == {"conv1.weight", "conv2.weight", "fc1.weight",
                                      "fc2.weight"}
    slq_only = layer_spectra(model, CE, data, iterations=6, layer_method="slq")
    np.testing.assert_allclose(spectra["conv1.weight"].nodes, slq_only["conv1.weight"].nodes)
    np.testing.assert_allclose(spectra["full"].nodes, slq_only["full"].nodes)
    reference = dense_measure(reference_matrix(model, CE, data, params=[model.fc3.weight]))
    assert relative_w1(spectra["fc3.weight"], reference) < 1e-10
    independent = dense_measure(dense_reference(model, CE, data, params=[model.fc3.weight],
                                                reduction="mean"))
    assert relative_w1(spectra["fc3.weight"], independent) < 1e-10


def test_auto_is_exact_on_the_zoo_and_reuses_certificates():
    model, data = ZOO["ResNet18"]
    spectra = layer_spectra(model, CE, data, iterations=6, layer_method="auto")
    assert set(spectra.methods.values()) == {"slq", "exact"}
    assert spectra.methods["full"] == "slq" and not spectra.fallbacks
    again = layer_spectra(model, CE, data, iterations=6, layer_method="auto",
                          certificates=spectra.certificates)
    for block in layer_blocks(model):
        np.testing.assert_allclose(again[block].nodes, spectra[block].nodes)
    tight = layer_spectra(model, CE, data, iterations=6, memory_budget=1000,
                          layer_method="auto")
    assert all(m == "slq" for m in tight.methods.values())
    assert all("memory budget" in r for r in tight.fallbacks.values())
    with pytest.raises(UserError, match="memory budget"):
        layer_spectra(model, CE, data, iterations=6, memory_budget=1000, layer_method="exact")
    with pytest.raises(UserError, match="layer_method"):
        layer_spectra(model, CE, data, layer_method="dense")


def test_exact_full_ggn_spectrum_equals_dense_eigenvalues():
    model, data = ZOO["LeNet"]
    measure = exact_ggn_spectrum(model, CE, data)
    reference = dense_measure(reference_matrix(model, CE, data, kind="ggn"))
    assert measure.dim == sum(p.numel() for p in model.parameters())
    assert relative_w1(measure, reference) < 1e-10
    independent = dense_measure(dense_reference(model, CE, data, "ggn", reduction="mean"))
    assert relative_w1(measure, independent) < 1e-10
    with pytest.raises(UserError, match="Conv2d/Linear"):
        exact_ggn_spectrum(*ZOO["ResNet18"], CE)  # batch-norm parameters


def test_slq_fidelity_is_the_w1_distance_of_slq_to_the_dense_spectrum():
    model, data = ZOO["VGG11_bn"]
    table = slq_fidelity(model, CE, data, iterations=8, seed=3)
    assert list(table["block"]) == list(layer_blocks(model))
    spectra = layer_spectra(model, CE, data, iterations=8, seed=3, layer_method="slq")
    for row in table.itertuples():
        param = dict(model.named_parameters())[row.block]
        reference = dense_measure(reference_matrix(model, CE, data, params=[param]))
        assert row.w1_relative == pytest.approx(relative_w1(spectra[row.block], reference),
                                                rel=1e-8, abs=1e-12)
        assert row.exact_trace == pytest.approx(reference.trace(), rel=1e-10)
