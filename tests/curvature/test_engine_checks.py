"""Issue 11: no silent wrong numbers, no unclear failures. Each kind is checked where the
paths meet (the graph, the products, the Lanczos step), and every example has its right value
(against an independent float64 reference) or its clear error."""

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from layerhessians.curvature import (
    BatchLoss,
    CurvatureGraph,
    MatrixOperator,
    Reduction,
    dense_matrix,
    hessian_operator,
    reference_matrix,
)
from layerhessians.curvature.batches import output_tensors
from layerhessians.curvature.coupling import batch_coupling
from layerhessians.curvature.graph import NonFiniteError
from layerhessians.curvature.loss_reduction import loss_reduction_of
from layerhessians.errors import UserError
from layerhessians.spectra import (
    exact_spectrum,
    hessian_trace,
    layer_spectra,
    slq,
    slq_many,
    top_eigenvalues,
)
from layerhessians.spectra.lanczos import check_symmetric, symmetry_defects
from layerhessians.spectra.plan import plan_memory
from problems import CE, mlp_data, rel_error, tiny_mlp
from references import dense_reference

RTOL = 1e-10


def flat_hessian(model, mean_loss):
    """The dense float64 Hessian of ``mean_loss(values)`` in all of ``model``'s parameters,
    by ``torch.func.hessian`` (independent of the engine)."""
    named = dict(model.named_parameters())
    names, shapes = list(named), [p.shape for p in named.values()]
    sizes = [p.numel() for p in named.values()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in named.values()])

    def loss(flat):
        return mean_loss({n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes)})

    return torch.func.hessian(loss)(flat0)


# ----------------------------------------------------------------------------- kind 1
def issue_bn_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(32, 3)).double()
    x = torch.randn(12, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    return model, x, y


def test_batch_norm_train_one_batch_operator_and_every_split_refused():
    model, x, y = issue_bn_problem()
    # the one-batch operator: its exact extremes (the issue's -1.8850, 3.0506)
    eigenvalues = torch.linalg.eigvalsh(dense_matrix(hessian_operator(model, CE, (x, y),
                                                                      bn_mode="train")))
    assert float(eigenvalues[0]) == pytest.approx(-1.8850, abs=1e-4)
    assert float(eigenvalues[-1]) == pytest.approx(3.0506, abs=1e-4)
    spectra = layer_spectra(model, CE, (x, y), bn_mode="train", iterations=200)
    nodes = spectra["full"].nodes
    assert nodes.min() == pytest.approx(float(eigenvalues[0]), rel=1e-9)
    assert nodes.max() == pytest.approx(float(eigenvalues[-1]), rel=1e-9)
    # an integer micro-batch size: refused (it returned the mean of per-micro-batch Hessians)
    with pytest.raises(UserError, match="micro_batch_size=4 would cut a batch"):
        layer_spectra(model, CE, (x, y), bn_mode="train", micro_batch_size=4, iterations=5)
    with pytest.raises(UserError, match="micro-batches would change the operator"):
        plan_memory(model, CE, (x, y), dims=[1], iterations=5, bn_mode="train",
                    micro_batch_size=4)
    # "auto" does not split: the same spectrum as one batch, even on a tiny budget
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = layer_spectra(model, CE, (x, y), bn_mode="train", iterations=200,
                             micro_batch_size="auto", memory_budget="1KB")
    np.testing.assert_allclose(auto["full"].nodes, nodes, rtol=1e-9, atol=1e-12)
    # several batches given by the user, and a sharded (distributed) graph: refused
    with pytest.raises(UserError, match="3 batches.*batch norm '1' in bn_mode 'train'"):
        hessian_operator(model, CE, [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])],
                         bn_mode="train")
    with pytest.raises(UserError, match="sharded over processes"):
        hessian_operator(model, CE, (x, y), bn_mode="train", reduction=Reduction())
    # eval mode (running statistics) splits freely
    split = hessian_operator(model, CE, [(x[:4], y[:4]), (x[4:], y[4:])])
    assert rel_error(dense_matrix(split), dense_matrix(hessian_operator(model, CE, (x, y)))) \
        < RTOL


def test_batch_norm_without_running_statistics_is_batch_dependent_in_eval_mode():
    model, x, y = issue_bn_problem()
    model[1] = nn.BatchNorm2d(2, track_running_stats=False).double()
    assert "track_running_stats=False" in batch_coupling(model, "eval")
    with pytest.raises(UserError, match="track_running_stats=False"):
        hessian_operator(model, CE, [(x[:6], y[:6]), (x[6:], y[6:])])
    with pytest.raises(UserError, match="would cut a batch"):
        layer_spectra(model, CE, (x, y), micro_batch_size=5, iterations=5)
    with pytest.raises(UserError, match="track_running_stats=False"):
        hessian_operator(model, CE, (x, y), kind="ef")


class Centre(nn.Module):
    """Subtracts the batch mean: couples the examples, whatever its flags."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


def test_probe_finds_a_custom_layer_that_mixes_examples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), Centre(), nn.Tanh(), nn.Linear(4, 3)).double()
    data = mlp_data()
    x = torch.cat([b[0] for b in data])
    assert batch_coupling(model, "eval") is None  # nothing to see statically
    assert "mixes the examples" in batch_coupling(model, "eval", x)
    with pytest.raises(UserError, match="2 batches.*mixes the examples"):
        hessian_operator(model, CE, data)
    with pytest.raises(UserError, match="would cut a batch"):
        layer_spectra(model, CE, (x, torch.cat([b[1] for b in data])), micro_batch_size=4,
                      iterations=5)
    # one batch is fine
    hessian_operator(model, CE, (x, torch.cat([b[1] for b in data]))).matvec(
        torch.ones(39, dtype=torch.float64))


def test_per_example_norms_split_freely():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4),
                          nn.InstanceNorm2d(4, affine=True), nn.Tanh(), nn.Flatten(),
                          nn.LayerNorm(64), nn.Linear(64, 3)).double()
    x = torch.randn(10, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    for bn_mode in ("eval", "train"):
        assert batch_coupling(model, bn_mode, x) is None
        whole = dense_matrix(hessian_operator(model, CE, (x, y), bn_mode=bn_mode))
        split = dense_matrix(hessian_operator(model, CE, [(x[:3], y[:3]), (x[3:], y[3:])],
                                              bn_mode=bn_mode))
        assert rel_error(split, whole) < RTOL


# ----------------------------------------------------------------------------- kind 2
class NormHead(nn.Module):
    """``head(||fc(x)||)``: the norm's Hessian is NaN at an all-zero input row."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3, bias=False)
        self.head = nn.Linear(1, 3)

    def forward(self, x):
        return self.head(torch.linalg.vector_norm(self.fc(x), dim=1, keepdim=True))


def nan_problem():
    torch.manual_seed(0)
    x = torch.randn(6, 4, dtype=torch.float64)
    x[2] = 0
    return NormHead().double(), (x, torch.randint(0, 3, (6,)))


@pytest.mark.parametrize("estimator", [
    lambda op, m, d: slq(op, iterations=10),
    lambda op, m, d: slq(op, iterations=10, check_symmetry=False),
    lambda op, m, d: slq_many([op, op], ["a", "b"], iterations=10),
    lambda op, m, d: top_eigenvalues(op, 2),
    lambda op, m, d: hessian_trace(op, samples=3),
    lambda op, m, d: exact_spectrum(op),
    lambda op, m, d: dense_matrix(op),
    lambda op, m, d: layer_spectra(m, CE, d, iterations=5, layer_method="slq"),
    lambda op, m, d: layer_spectra(m, CE, d, iterations=5, reuse_graph=False,
                                   layer_method="slq"),
], ids=["slq", "slq-nosym", "slq_many", "top_eigenvalues", "hessian_trace", "exact_spectrum",
        "dense_matrix", "layer_spectra", "layer_spectra-rebuilt"])
def test_non_finite_curvature_is_a_clear_error_in_every_estimator(estimator):
    model, data = nan_problem()
    op = hessian_operator(model, CE, data)
    with pytest.raises(NonFiniteError, match="'full'.*NaN or infinite"):
        estimator(op, model, data)


def test_non_finite_curvature_in_the_exact_route_names_the_block():
    model, data = nan_problem()  # the certification probe meets the NaN first
    with pytest.raises(NonFiniteError, match="'fc.weight'.*NaN or infinite"):
        layer_spectra(model, CE, data, iterations=5, layer_method="auto")


def test_non_finite_foreign_operator_names_the_lanczos_step():
    matrix = torch.eye(4, dtype=torch.float64)
    matrix[1, 1] = math.inf
    op = MatrixOperator(matrix, name="broken")
    with pytest.raises(NonFiniteError, match="symmetry probe of the operator 'broken'"):
        slq(op, iterations=3)
    with pytest.raises(NonFiniteError, match="Lanczos step 1 on the operator 'broken'"):
        slq(op, iterations=3, check_symmetry=False)
    with pytest.raises(NonFiniteError, match="hessian_trace sample 1"):
        hessian_trace(op, samples=2)
    with pytest.raises(NonFiniteError, match="'broken'"):
        exact_spectrum(op)


# ----------------------------------------------------------------------------- kind 3
class TwoOutputs(nn.Module):
    """``(logits, tanh(logits))`` or ``{"logits": ..., "squashed": ...}``."""

    def __init__(self, as_dict=False):
        super().__init__()
        self.a, self.b, self.as_dict = nn.Linear(5, 4), nn.Linear(4, 3), as_dict

    def forward(self, x):
        z = self.b(torch.tanh(self.a(x)))
        return {"logits": z, "squashed": torch.tanh(z)} if self.as_dict else (z, torch.tanh(z))


@pytest.mark.parametrize("kind", ["hessian", "ggn", "residual", "ef"])
@pytest.mark.parametrize("as_dict", [False, True])
def test_structured_outputs_for_every_kind(kind, as_dict):
    torch.manual_seed(0)
    model = TwoOutputs(as_dict).double()
    data = mlp_data()
    key = "logits" if as_dict else 0

    def loss(out, t):
        return CE(out[key], t)

    # the same network returning the logits alone: the reference the outputs must match
    plain = nn.Sequential(model.a, nn.Tanh(), model.b)
    expected = reference_matrix(plain, CE, data, kind=kind)
    assert rel_error(reference_matrix(model, loss, data, kind=kind), expected) < RTOL
    op = hessian_operator(model, loss, data, kind=kind)
    assert rel_error(dense_matrix(op), expected) < RTOL
    independent = dense_reference(model, loss, data, kind, reduction="mean")
    assert rel_error(independent, dense_reference(plain, CE, data, kind, reduction="mean")) < RTOL
    assert rel_error(dense_matrix(op), independent) < RTOL


def test_structured_outputs_the_loss_uses_all_of():
    """A loss on both outputs: the GGN includes the second one's curvature (and its cross
    terms with the first)."""
    torch.manual_seed(0)
    model = TwoOutputs().double()
    data = mlp_data()

    def loss(out, t):
        return CE(out[0], t) + (out[1] ** 2).sum(1).mean()

    for kind in ("ggn", "residual"):
        expected = reference_matrix(model, loss, data, kind=kind)
        assert rel_error(dense_matrix(hessian_operator(model, loss, data, kind=kind)),
                         expected) < RTOL
        independent = dense_reference(model, loss, data, kind, reduction="mean")
        assert rel_error(dense_matrix(hessian_operator(model, loss, data, kind=kind)),
                         independent) < RTOL


def test_outputs_without_a_tensor_are_refused():
    with pytest.raises(UserError, match="outputs must be a floating tensor"):
        output_tensors(("text", 3))


# ----------------------------------------------------------------------------- kind 4
def mse_problem():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(13, 3, dtype=torch.float64)
    t = torch.randn(13, 2, dtype=torch.float64)
    return model, x, t, [(x[:5], t[:5]), (x[5:10], t[5:10]), (x[10:], t[10:])]


def test_sum_reduced_loss_over_uneven_batches_is_the_mean_operator():
    model, x, t, data = mse_problem()

    def summed(values):
        return nn.functional.mse_loss(torch.func.functional_call(model, values, (x,)), t,
                                      reduction="sum")

    total = flat_hessian(model, summed)  # Hessian of sum_n l_n over all 13 examples
    for loss_reduction, expected in (("mean", total / 13), ("sum", total)):
        op = hessian_operator(model, nn.MSELoss(reduction="sum"), data,
                              loss_reduction=loss_reduction)
        assert rel_error(dense_matrix(op), expected) < RTOL
        top = top_eigenvalues(op, 1)[0]
        assert top == pytest.approx(float(torch.linalg.eigvalsh(expected)[-1]), rel=1e-8)
        one_batch = hessian_operator(model, nn.MSELoss(reduction="sum"), (x, t),
                                     loss_reduction=loss_reduction)
        assert top_eigenvalues(one_batch, 1)[0] == pytest.approx(top, rel=1e-8)
    # a mean-reduced MSE averages each row's 2 outputs too: half the operator
    mean_op = hessian_operator(model, nn.MSELoss(), data)
    assert rel_error(dense_matrix(mean_op), total / 26) < RTOL
    # the dense reference follows the same definition
    assert rel_error(reference_matrix(model, nn.MSELoss(reduction="sum"), data),
                     total / 13) < RTOL
    assert rel_error(dense_reference(model, nn.MSELoss(reduction="sum"), data,
                                     reduction="sum"), total / 13) < RTOL


def test_a_loss_that_is_neither_mean_nor_sum_is_refused():
    model, data = tiny_mlp(), mlp_data()
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    op = hessian_operator(model, weighted, data)
    with pytest.raises(UserError, match="neither the mean nor the sum"):
        op.matvec(torch.ones(op.dim, dtype=torch.float64))
    outputs = torch.randn(4, 3, dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 1])
    assert loss_reduction_of(CE, outputs, targets, 4) == "mean"
    assert loss_reduction_of(nn.CrossEntropyLoss(reduction="sum"), outputs, targets, 4) == "sum"
    assert loss_reduction_of(CE, outputs[:1], targets[:1], 1) is None
    with pytest.raises(UserError, match="loss_reduction"):
        hessian_operator(model, CE, data, loss_reduction="total")


# ----------------------------------------------------------------------------- BatchLoss
class TinyLM(nn.Module):
    def __init__(self, vocab=7, width=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens):
        return self.head(torch.tanh(self.emb(tokens)))


def next_token_loss(model, batch):
    tokens = batch["tokens"]
    logits = model(tokens[:, :-1])
    targets = tokens[:, 1:]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       targets.reshape(-1)), targets.numel()


def test_batch_loss_language_model_mean_over_tokens():
    torch.manual_seed(0)
    model = TinyLM().double()
    g = torch.Generator().manual_seed(0)
    batches = [{"tokens": torch.randint(0, 7, shape, generator=g)}
               for shape in ((2, 5), (3, 3), (1, 8))]  # 8 + 6 + 7 = 21 predicted tokens

    def mean_loss(values):
        total = 0.0
        for batch in batches:
            tokens = batch["tokens"]
            logits = torch.func.functional_call(model, values, (tokens[:, :-1],))
            total = total + nn.functional.cross_entropy(
                logits.reshape(-1, 7), tokens[:, 1:].reshape(-1), reduction="sum")
        return total / 21

    op = hessian_operator(model, BatchLoss(next_token_loss), batches)
    assert rel_error(dense_matrix(op), flat_hessian(model, mean_loss)) < RTOL
    assert op.graph.num_examples == 21
    for reuse in (True, False):
        spectra = layer_spectra(model, BatchLoss(next_token_loss), batches, iterations=60,
                                reuse_graph=reuse)
        exact = torch.linalg.eigvalsh(flat_hessian(model, mean_loss))
        assert spectra["full"].nodes.max() == pytest.approx(float(exact[-1]), rel=1e-8)
    with pytest.raises(UserError, match="BatchLoss gives the Hessian only"):
        hessian_operator(model, BatchLoss(next_token_loss), batches, kind="ggn")
    with pytest.raises(UserError, match="cannot cut or measure the batches"):
        layer_spectra(model, BatchLoss(next_token_loss), batches, micro_batch_size=2)
    with pytest.raises(UserError, match="for a BatchLoss take torch.func.hessian"):
        reference_matrix(model, BatchLoss(next_token_loss), batches)
    with pytest.raises(UserError, match="must return .mean loss, number of terms."):
        dense_matrix(hessian_operator(model, BatchLoss(lambda m, b: m(b["tokens"]).sum()),
                                      batches))


def test_batch_loss_with_batch_norm_matches_pairs_and_leaves_buffers():
    model, x, y = issue_bn_problem()
    model.train()
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    def batch_loss(net, batch):
        inputs, targets = batch
        return CE(net(inputs), targets), inputs.shape[0]

    for bn_mode in ("eval", "train"):
        got = hessian_operator(model, BatchLoss(batch_loss), [(x, y)], bn_mode=bn_mode)
        want = hessian_operator(model, CE, (x, y), bn_mode=bn_mode)
        assert rel_error(dense_matrix(got), dense_matrix(want)) < RTOL
    with pytest.raises(UserError, match="2 batches"):
        hessian_operator(model, BatchLoss(batch_loss), [(x[:6], y[:6]), (x[6:], y[6:])],
                         bn_mode="train")
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert model.training


# ----------------------------------------------------------------------------- kind 6
@pytest.mark.parametrize("style", ["parametrizations", "old"])
def test_non_symmetric_operator_refused_before_a_spectrum(style):
    torch.manual_seed(0)
    head = nn.Linear(4, 3)
    head = torch.nn.utils.parametrizations.weight_norm(head) if style == "parametrizations" \
        else torch.nn.utils.weight_norm(head)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), head).double()
    data = mlp_data()
    op = hessian_operator(model, CE, data)
    assert symmetry_defects([op])[0] > 1e-3
    for run in (lambda: slq(op, iterations=5), lambda: top_eigenvalues(op, 1),
                lambda: layer_spectra(model, CE, data, iterations=5, layers=False),
                lambda: layer_spectra(model, CE, data, iterations=5,
                                      layers={"first": model[0].weight})):
        with pytest.raises(UserError, match="'full' is not symmetric.*weight_norm"):
            run()
    measure = slq(op, iterations=5, check_symmetry=False)  # the opt-out proceeds
    assert np.asarray(measure.nodes).size == 5


def test_symmetry_probe_passes_symmetric_operators_in_one_pass():
    model, data = tiny_mlp(), mlp_data()
    ops = layer_spectra.__globals__["layer_operators"](model, CE, data, reuse_graph=False)
    graph = next(iter(ops.values())).graph
    before = graph.forward_passes
    defects = symmetry_defects(list(ops.values()))
    assert graph.forward_passes - before == len(data)  # every block in one pass
    assert max(defects) < 1e-12
    check_symmetric(list(ops.values()))
    check_symmetric([MatrixOperator(torch.eye(3, dtype=torch.float32))])
    with pytest.raises(UserError, match="'skew' is not symmetric"):
        check_symmetric([MatrixOperator(torch.tensor([[0.0, 1.0], [-1.0, 0.0]]), name="skew")])


def test_graph_takes_needs_not_batch_loss_for_other_kinds():
    model, data = tiny_mlp(), mlp_data()
    params = list(model.parameters())
    with pytest.raises(UserError, match="Hessian only"):
        CurvatureGraph(model, BatchLoss(lambda m, b: (m(b[0]).sum(), 1)), data, params,
                       needs={"output_curvature"})
