"""Issue 21 items 1-16: the engine on what researchers really bring is right (against a dense
float64 reference built here) or refuses in one line, and measuring changes nothing."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from layerhessians.curvature import (
    MatrixOperator,
    hessian_operator,
    reference_matrix,
)
from layerhessians.errors import UserError
from layerhessians.spectra import (
    exact_spectrum,
    hessian_trace,
    layer_spectra,
    slq,
    top_eigenvalues,
)
from problems import CE, mlp_data, tiny_mlp
from references import dense_reference


def _top(matrix):
    return float(torch.linalg.eigvalsh(matrix)[-1])


def _dense(op):
    eye = torch.eye(op.dim, dtype=torch.float64)
    return torch.stack([op.matvec(eye[:, j]) for j in range(op.dim)], dim=1)


# ----------------------------------------------------------------------------- item 1
CHANGES = {
    "p.data =": lambda m: setattr(m[0].weight, "data", m[0].weight.data * 1.5),
    "p.data.mul_": lambda m: m[0].weight.data.mul_(1.5),
    "optimizer step": lambda m: _sgd_step(m),
    "load_state_dict": lambda m: m.load_state_dict(
        {k: v * 1.5 for k, v in m.state_dict().items()}),
    "frozen parameter": lambda m: m[2].bias.data.add_(torch.tensor([1.0, 0.0, -1.0])),
}


def _sgd_step(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = mlp_data()[0]
    CE(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("reuse_graph", [True, False])
@pytest.mark.parametrize("change", list(CHANGES))
def test_a_kept_operator_refuses_after_any_parameter_change(change, reuse_graph):
    model, data = tiny_mlp(), mlp_data()
    if change == "frozen parameter":  # not in the operator, but the loss depends on it
        model[2].bias.requires_grad_(False)
    op = hessian_operator(model, CE, data, reuse_graph=reuse_graph)
    v = torch.ones(op.dim, dtype=torch.float64)
    before = op @ v
    CHANGES[change](model)
    with pytest.raises(UserError, match="changed after its curvature operator was built.*"
                                        "op.release"):
        top_eigenvalues(op, 1)
    op.release()  # measures at the new weights, right against the new dense Hessian
    new = reference_matrix(model, CE, data)
    assert not torch.allclose(op @ v, before)
    assert np.isclose(top_eigenvalues(op, 1)[0], _top(new), rtol=1e-8)
    independent = dense_reference(model, CE, data, reduction="mean")  # frozen bias: excluded
    assert np.isclose(top_eigenvalues(op, 1)[0], _top(independent), rtol=1e-8)


# ----------------------------------------------------------------------------- item 2
class Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.Sequential(nn.Linear(5, 4), nn.Tanh())
        self.head = nn.Linear(4, 3)
        self.reentrant = reentrant

    def forward(self, x):
        return self.head(checkpoint(self.block, x, use_reentrant=self.reentrant))


def test_reentrant_checkpoint_is_refused_and_non_reentrant_is_right():
    data = mlp_data()
    model = Checkpointed(True).double()
    with pytest.raises(UserError, match="use_reentrant=True.*pass use_reentrant=False"):
        hessian_operator(model, CE, data) @ torch.ones(39, dtype=torch.float64)
    with pytest.raises(UserError, match="use_reentrant=False"):
        layer_spectra(model, CE, data, iterations=4)
    model.reentrant = False
    for kind in ("hessian", "ggn", "ef"):
        op = hessian_operator(model, CE, data, kind=kind)
        assert torch.allclose(_dense(op), reference_matrix(model, CE, data, kind=kind),
                              atol=1e-10)
        assert torch.allclose(_dense(op), dense_reference(model, CE, data, kind,
                                                          reduction="mean"), atol=1e-10)


# ----------------------------------------------------------------------------- item 3
def test_class_weighted_mean_is_refused_however_split_or_ordered():
    model = tiny_mlp()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 5, dtype=torch.float64, generator=g)
    y = torch.arange(30) // 10  # sorted by class: the first rows share a class
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64))
    perm = torch.randperm(30, generator=g)
    for data in ((x, y), [(x[i:i + 10], y[i:i + 10]) for i in range(0, 30, 10)],
                 [(x[i:i + 25], y[i:i + 25]) for i in (0, 25)], (x[perm], y[perm])):
        for kind in ("hessian", "ggn", "ef"):
            with pytest.raises(UserError, match="neither the mean nor the sum.*class weights"):
                op = hessian_operator(model, weighted, data, kind=kind)
                op @ torch.ones(39, dtype=torch.float64)
    # an unweighted mean is right for every split
    reference = reference_matrix(model, CE, (x, y))
    for size in (None, 25, 10):
        m = layer_spectra(model, CE, (x, y), iterations=39, micro_batch_size=size,
                          layers=False, reorthogonalize=True)["full"]
        assert np.isclose(float(np.max(m.nodes)), _top(reference), rtol=1e-6)
        assert np.isclose(float(np.max(m.nodes)),
                          _top(dense_reference(model, CE, (x, y), reduction="mean")), rtol=1e-6)


# ----------------------------------------------------------------------------- item 5
def test_every_estimator_runs_the_same_symmetry_and_finite_checks():
    skew = MatrixOperator(torch.tensor([[1.0, 2.0], [-2.0, 1.0]], dtype=torch.float64),
                          name="skew")
    for run in (lambda: hessian_trace(skew, 4), lambda: exact_spectrum(skew),
                lambda: top_eigenvalues(skew, 1), lambda: slq(skew, iterations=2)):
        with pytest.raises(UserError, match="'skew' is not symmetric.*No known cause was "
                                            "detected"):
            run()
    head = torch.nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), head).double()
    op = hessian_operator(model, CE, mlp_data())
    for run in (lambda: hessian_trace(op, 4), lambda: exact_spectrum(op)):
        with pytest.raises(UserError, match="Detected: module '2' uses torch's weight_norm"):
            run()
    nan = MatrixOperator(torch.tensor([[1.0, 0.0], [0.0, float("nan")]],
                                      dtype=torch.float64), name="nan")
    for run in (lambda: hessian_trace(nan, 4), lambda: exact_spectrum(nan)):
        with pytest.raises(UserError, match="NaN or infinite"):
            run()


# ----------------------------------------------------------------------------- item 6
class Sampler(nn.Module):
    """A VAE-like forward: draws noise in every mode; keeps a buffer; uses dropout."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(5, 4)
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)
        self.dec = nn.Linear(4, 3)

    def forward(self, x):
        h = self.bn(self.enc(x))
        return self.dec(self.drop(h + 0.1 * torch.randn_like(h)))


def test_measuring_leaves_rng_streams_buffers_parameters_and_modes_alone():
    from layerhessians.tracking import SpectraTracker

    model = Sampler().double()
    model.train()
    x, y = mlp_data(sizes=(12,))[0]
    params = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    expected = torch.rand(5)  # the training stream without measuring
    torch.manual_seed(123)
    for kind in ("hessian", "ggn"):
        op = hessian_operator(model, CE, (x, y), kind=kind)
        op @ torch.ones(op.dim, dtype=torch.float64)
        reference_matrix(model, CE, (x, y), kind=kind)
    layer_spectra(model, CE, (x, y), iterations=4)
    with pytest.raises(UserError, match="per-example gradients.*forward draws random numbers"):
        hessian_operator(model, CE, (x, y), kind="ef")  # per-example draws differ: refused
    with pytest.raises(UserError, match="2 batches, but the model's forward draws random"):
        hessian_operator(model, CE, [(x[:6], y[:6]), (x[6:], y[6:])])  # item 13
    assert torch.equal(torch.rand(5), expected)
    assert model.training and model.drop.training and model.bn.training
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())
    # the operator is one fixed function of the weights (the engine's seeded draw)
    op = hessian_operator(model, CE, (x, y), reuse_graph=False)
    assert torch.allclose(_dense(op), reference_matrix(model, CE, (x, y)), atol=1e-10)
    del SpectraTracker


# ----------------------------------------------------------------------------- item 7
def test_exact_route_with_a_sum_reduced_loss_is_scaled():
    torch.manual_seed(0)
    model, data = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double(), mlp_data()
    for loss in (nn.CrossEntropyLoss(reduction="sum"), nn.MSELoss(reduction="sum")):
        if isinstance(loss, nn.MSELoss):
            data = [(x, torch.nn.functional.one_hot(y, 3).double()) for x, y in data]
        spectra = layer_spectra(model, loss, data, iterations=20, layer_method="exact")
        for name, param in (("0", model[0].weight), ("2", model[2].weight)):
            name = next(n for n in spectra if n != "full" and n.startswith(name))
            block = reference_matrix(model, loss, data, params=[param])
            assert spectra.methods[name] == "exact"
            assert np.isclose(float(np.max(spectra[name].nodes)), _top(block), rtol=1e-8)
            independent = dense_reference(model, loss, data, params=[param], reduction="sum")
            assert np.isclose(float(np.max(spectra[name].nodes)), _top(independent),
                              rtol=1e-8)


# ----------------------------------------------------------------------------- items 4, 10
class Augmenting(torch.utils.data.Dataset):
    """A dataset that adds fresh noise to every example it hands out (augmentation)."""

    def __init__(self):
        g = torch.Generator().manual_seed(5)
        self.x = torch.randn(12, 5, dtype=torch.float64, generator=g)
        self.y = torch.randint(0, 3, (12,), generator=g)

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return self.x[i] + 0.3 * torch.randn(5, dtype=torch.float64), self.y[i]


def test_tracker_fixes_an_augmenting_loader_and_records_a_real_checksum(tmp_path):
    import hashlib
    import json

    from layerhessians.tracking import SpectraTracker

    model = tiny_mlp()
    loader = torch.utils.data.DataLoader(Augmenting(), batch_size=6, shuffle=True)
    tracker = SpectraTracker(model, CE, loader, tmp_path / "run", iterations=39)
    first = tracker.update(1)
    second = tracker.compute(1)  # same weights, same seed: the same spectra
    assert np.array_equal(first["full"].nodes, second["full"].nodes)
    data = tracker.data  # the batches read once: the spectra are those of these data
    reference = reference_matrix(model, CE, data)
    assert np.isclose(float(np.max(first["full"].nodes)), _top(reference), rtol=1e-6)
    independent = dense_reference(model, CE, data, reduction="mean")
    assert np.isclose(float(np.max(first["full"].nodes)), _top(independent), rtol=1e-6)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["facts"]["hessian_checksum"] != hashlib.sha256().hexdigest()
    tracker.close()
    with pytest.raises(UserError, match="different settings"):  # resume with other data
        SpectraTracker(model, CE, torch.utils.data.DataLoader(Augmenting(), batch_size=6),
                       tmp_path / "run", iterations=39, resume=True)
    data[0][0].add_(1.0)  # the fixed data changed in place: refused
    with pytest.raises(UserError, match="Hessian data changed in place"):
        tracker.update(2)


def test_tracker_after_pruning_refuses_and_records_a_shrunk_operator(tmp_path):
    import pandas as pd

    from layerhessians.tracking import SpectraTracker

    model, data = tiny_mlp(), mlp_data()
    tracker = SpectraTracker(model, CE, data, tmp_path / "run", iterations=4)
    tracker.update(1)
    model[2].bias.requires_grad_(False)  # freezing shrinks the full operator: recorded
    spectra = tracker.update(2)
    assert spectra["full"].dim == 39 - 3
    dims = pd.read_csv(tmp_path / "run" / "metrics.csv")["full_dim"].tolist()
    assert dims == [39, 36]
    import torch.nn.utils.prune as prune

    prune.l1_unstructured(model[0], "weight", amount=0.5)
    with pytest.raises(UserError, match="no longer has the parameter.*0.weight.*new tracker"):
        tracker.update(3)
    tracker.close()


# ----------------------------------------------------------------------------- items 8, 9
class Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = cell(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        out = self.rnn(x)[0]
        return self.head(out[:, -1])


@pytest.mark.parametrize("cell", [nn.RNN, nn.GRU, nn.LSTM])
def test_empirical_fisher_on_recurrent_networks(cell):
    model = Recurrent(cell).double()
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(4, 5, 3, dtype=torch.float64, generator=g),
             torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]
    for kind in ("ef", "hessian"):
        op = hessian_operator(model, CE, data, kind=kind)
        assert torch.allclose(_dense(op), reference_matrix(model, CE, data, kind=kind),
                              atol=1e-10)
        assert torch.allclose(_dense(op), dense_reference(model, CE, data, kind,
                                                          reduction="mean"), atol=1e-10)


class SparseBag(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(7, 3, sparse=True)
        self.head = nn.Linear(3, 3)

    def forward(self, tokens):
        return self.head(torch.tanh(self.emb(tokens)).mean(1))


def test_sparse_embeddings_are_measured_with_dense_gradients():
    model = SparseBag().double()
    g = torch.Generator().manual_seed(2)
    data = (torch.randint(0, 7, (6, 4), generator=g), torch.randint(0, 3, (6,), generator=g))
    for kind in ("hessian", "ggn", "ef"):
        op = hessian_operator(model, CE, data, kind=kind)
        assert torch.allclose(_dense(op), reference_matrix(model, CE, data, kind=kind),
                              atol=1e-10)
        assert torch.allclose(_dense(op), dense_reference(model, CE, data, kind,
                                                          reduction="mean"), atol=1e-10)
    assert model.emb.sparse  # the user's setting is back


# ----------------------------------------------------------------------------- items 11, 12
def test_calls_under_inference_mode_or_no_grad_work():
    model, data = tiny_mlp(), mlp_data()
    reference = reference_matrix(model, CE, data)
    independent = dense_reference(model, CE, data, reduction="mean")
    with torch.inference_mode():
        x, y = torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])
        op = hessian_operator(model, CE, (x, y))
        inside = _dense(op)
    assert torch.allclose(inside, reference, atol=1e-10)
    assert torch.allclose(inside, independent, atol=1e-10)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            top = top_eigenvalues(hessian_operator(model, CE, data), 1)[0]
            spectra = layer_spectra(model, CE, data, iterations=39, layers=False)
        assert np.isclose(top, _top(reference), rtol=1e-8)
        assert np.isclose(float(np.max(spectra["full"].nodes)), _top(reference), rtol=1e-6)
        assert np.isclose(top, _top(independent), rtol=1e-8)


def test_a_dataset_is_taken_as_one_batch():
    model, data = tiny_mlp(), mlp_data()
    x, y = torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])
    reference = reference_matrix(model, CE, (x, y))
    independent = dense_reference(model, CE, data, reduction="mean")  # the batches as given
    for dataset in (torch.utils.data.TensorDataset(x, y),
                    torch.utils.data.Subset(torch.utils.data.TensorDataset(x, y),
                                            list(range(12)))):
        op = hessian_operator(model, CE, dataset)
        assert torch.allclose(_dense(op), reference, atol=1e-10)
        assert torch.allclose(_dense(op), independent, atol=1e-10)
    with pytest.raises(UserError, match="examples are not \\(input, target\\) pairs"):
        hessian_operator(model, CE, torch.utils.data.Subset(x, list(range(12))))
