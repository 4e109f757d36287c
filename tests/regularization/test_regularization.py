"""trace_penalty against dense float64 references built here with torch.func (no helper of
the code under test): exact values and gradients (third order), unbiasedness of the ggn and
hutchinson estimators for the value and the gradient, blocks and middle rules, batch norm in
both modes, MSE and cross-entropy, refusals; TraceRegularizer's schedule."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from layerhessians.curvature import BatchLoss, layer_blocks
from layerhessians.errors import UserError
from layerhessians.models import build_model
from layerhessians.regularization import (
    RegularizerSettings,
    TraceRegularizer,
    middle_layers,
    paper_middle,
    resolve_blocks,
    trace_penalty,
)

N, D_IN, HIDDEN, C = 6, 4, 5, 3


def mlp(activation, batch_norm=False, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(D_IN, HIDDEN)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(HIDDEN))
    layers += [activation(), nn.Linear(HIDDEN, HIDDEN), activation(), nn.Linear(HIDDEN, C)]
    model = nn.Sequential(*layers).double()
    if activation is nn.Tanh:  # into tanh's curved range: tr H and tr G differ by ~10%
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(2.0)
    if batch_norm:  # non-trivial running statistics and affine parameters
        bn = model[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    return model


def problem(loss="ce", seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D_IN, generator=generator, dtype=torch.float64)
    if loss == "ce":
        y = torch.randint(0, C, (N,), generator=generator)
    else:
        y = torch.randn(N, C, generator=generator, dtype=torch.float64)
    return x, y


def per_example_loss(loss, reduction="mean"):
    """l_n as a function of one example's outputs [C] and target."""
    if loss == "ce":
        return lambda f, y: -torch.log_softmax(f, -1)[y]
    if reduction == "sum":
        return lambda f, y: ((f - y) ** 2).sum()
    return lambda f, y: ((f - y) ** 2).mean()


def dense_traces(model, x, y, loss, names, bn_mode="eval", reduction="mean"):
    """``(theta, tr_H(theta), tr_G(theta))``: functions of the flat parameter vector, the
    traces of the blocks ``names`` (parameter names) of the Hessian and GGN of the mean loss."""
    params = dict(model.named_parameters())
    keys = list(params)
    shapes = [params[k].shape for k in keys]
    sizes = [params[k].numel() for k in keys]
    theta = torch.cat([params[k].detach().reshape(-1) for k in keys])
    offsets = torch.cumsum(torch.tensor([0] + sizes), 0).tolist()
    index = torch.cat([torch.arange(offsets[i], offsets[i + 1])
                       for i, k in enumerate(keys) if k in names])
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    modes = [m.training for m in model.modules()]
    model.eval()
    if bn_mode == "train":
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.train()
    single = per_example_loss(loss, reduction)

    def outputs(flat):
        values = {k: flat[offsets[i]:offsets[i + 1]].reshape(shapes[i])
                  for i, k in enumerate(keys)}
        return functional_call(model, ({**values}, {k: b.clone() for k, b in buffers.items()}),
                               (x,))

    def mean_loss(flat):
        f = outputs(flat)
        return torch.stack([single(f[n], y[n]) for n in range(N)]).mean()

    def tr_h(flat):
        return torch.diagonal(hessian(mean_loss)(flat))[index].sum()

    def tr_g(flat):
        f = outputs(flat)
        jac = jacrev(outputs)(flat)  # [N, C, P]
        total = 0.0
        for n in range(N):
            h_out = hessian(lambda fn, target=y[n]: single(fn, target))(f[n])  # [C, C]
            j = jac[n][:, index]
            total = total + torch.einsum("cp,cd,dp->", j, h_out, j)
        return total / N

    restore = lambda: [setattr(m, "training", t) for m, t in zip(model.modules(), modes)]  # noqa: E731
    return theta, tr_h, tr_g, restore


def flat_grad(value, model):
    grads = torch.autograd.grad(value, list(model.parameters()), allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                      for p, g in zip(model.parameters(), grads)])


def block_names(model, blocks):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for ps in resolve_blocks(model, blocks).values() for p in ps}


# ----------------------------------------------------------------------------- exact
@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh])
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("blocks", [None, "layers", "middle"])
@pytest.mark.parametrize("form", ["auto", "batched"])
def test_exact_equals_dense_trace_and_gradient(activation, loss, blocks, form):
    model = mlp(activation)
    x, y = problem(loss)
    loss_fn = nn.CrossEntropyLoss() if loss == "ce" else nn.MSELoss()
    value = trace_penalty(model, loss_fn, (x, y), blocks=blocks, estimator="exact", form=form)
    assert value.dim() == 0 and value.dtype == torch.float64
    theta, _, tr_g, restore = dense_traces(model, x, y, loss, block_names(model, blocks))
    expected = tr_g(theta)
    gradient = jacrev(tr_g)(theta)
    restore()
    assert float(value) == pytest.approx(float(expected), rel=1e-10, abs=1e-12)
    assert torch.allclose(flat_grad(value, model), gradient, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_exact_with_batch_norm_in_both_modes(bn_mode):
    model = mlp(nn.ReLU, batch_norm=True)
    model.train()
    x, y = problem("ce")
    before = {k: b.clone() for k, b in model.named_buffers()}
    value = trace_penalty(model, nn.CrossEntropyLoss(), (x, y), estimator="exact",
                          bn_mode=bn_mode)
    for k, b in model.named_buffers():  # measuring never changes the model
        assert torch.equal(b, before[k]), k
    assert all(m.training for m in model.modules())
    theta, _, tr_g, restore = dense_traces(model, x, y, "ce",
                                           {n for n, _ in model.named_parameters()}, bn_mode)
    expected = tr_g(theta)
    if bn_mode == "eval":
        gradient = jacrev(tr_g)(theta)
        tolerance = 1e-8
    else:
        # torch 2.13's nested jacrev through train-mode batch norm disagrees with finite
        # differences (measured: -0.038 vs -0.0613 on the first weight); central differences
        # of the dense float64 trace are the reference here
        step = 1e-5
        basis = torch.eye(len(theta), dtype=theta.dtype)
        gradient = torch.stack([(tr_g(theta + step * e) - tr_g(theta - step * e)) / (2 * step)
                                for e in basis])
        tolerance = 1e-6
    restore()
    assert float(value) == pytest.approx(float(expected), rel=1e-10)
    assert torch.allclose(flat_grad(value, model), gradient, rtol=tolerance, atol=tolerance)


def test_sum_reduced_mse_is_the_sum_over_outputs():
    model = mlp(nn.Tanh)
    x, y = problem("mse")
    value = trace_penalty(model, nn.MSELoss(reduction="sum"), (x, y), estimator="exact")
    theta, _, tr_g, restore = dense_traces(model, x, y, "mse",
                                           {n for n, _ in model.named_parameters()},
                                           reduction="sum")
    expected = tr_g(theta)
    restore()
    assert float(value) == pytest.approx(float(expected), rel=1e-10)


def test_several_batches_give_the_trace_of_the_mean_loss():
    model = mlp(nn.Tanh)
    x, y = problem("ce")
    whole = trace_penalty(model, nn.CrossEntropyLoss(), (x, y), estimator="exact")
    split = trace_penalty(model, nn.CrossEntropyLoss(reduction="sum"),
                          [(x[:2], y[:2]), (x[2:], y[2:])], estimator="exact")
    assert float(split) == pytest.approx(float(whole), rel=1e-12)


# ----------------------------------------------------------------------------- unbiased
def sample(model, estimator, calls, probes, **kwargs):
    """``calls`` independent estimates (each the mean of ``probes`` probes): values [calls]
    and flat gradients [calls, P]."""
    generator = torch.Generator().manual_seed(7)
    loss_fn, data = kwargs.pop("loss_fn", nn.CrossEntropyLoss()), kwargs.pop("data")
    values, grads = [], []
    for _ in range(calls):
        value = trace_penalty(model, loss_fn, data, estimator=estimator, probes=probes,
                              generator=generator, **kwargs)
        values.append(value.detach())
        grads.append(flat_grad(value, model))
    return torch.stack(values), torch.stack(grads)


def assert_unbiased(values, grads, value, gradient, directions=4):
    """The mean estimate within 4.5 standard errors of ``value``; the mean gradient's
    projections on the true gradient and on ``directions`` fixed random directions each
    within 4.5 standard errors of the true gradient's (the coordinates are correlated, so
    each projection is tested as one scalar)."""
    calls = len(values)
    se = values.std() / math.sqrt(calls)
    assert abs(float(values.mean() - value)) < 4.5 * float(se), (values.mean(), value, se)
    generator = torch.Generator().manual_seed(11)
    basis = [gradient / gradient.norm()] + [
        torch.randn(len(gradient), generator=generator, dtype=gradient.dtype)
        for _ in range(directions)]
    for d in basis:
        projected = grads @ d
        se_d = float(projected.std()) / math.sqrt(calls)
        error = abs(float(projected.mean() - gradient @ d))
        assert error < 4.5 * se_d + 1e-12, (error, se_d)


@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh])
@pytest.mark.parametrize("estimator,form,distribution", [
    ("ggn", "per-example", "gaussian"), ("ggn", "batched", "rademacher"),
    ("hutchinson", "auto", "gaussian"), ("hutchinson", "auto", "rademacher")])
def test_estimators_are_unbiased_for_their_own_trace(activation, estimator, form,
                                                     distribution):
    model = mlp(activation)
    x, y = problem("ce")
    names = {n for n, _ in model.named_parameters()}
    theta, tr_h, tr_g, restore = dense_traces(model, x, y, "ce", names)
    target = tr_h if estimator == "hutchinson" else tr_g
    value, gradient = target(theta), jacrev(target)(theta)
    other = (tr_g if estimator == "hutchinson" else tr_h)(theta)
    restore()
    probes = 16 if estimator == "hutchinson" else 4  # parameter-space probes: noisier
    values, grads = sample(model, estimator, 300, probes, data=(x, y), form=form,
                           distribution=distribution)
    assert_unbiased(values, grads, float(value), gradient)
    se = float(values.std()) / math.sqrt(len(values))
    if activation is nn.ReLU:  # piecewise-linear outputs: H and G have one trace
        assert float(other) == pytest.approx(float(value), rel=1e-10, abs=1e-12)
    else:  # the same check refuses the other trace: each estimator matches its own only
        assert abs(float(values.mean()) - float(other)) > 4.5 * se, (float(other), se)


def test_ggn_with_batch_norm_in_train_mode_is_unbiased():
    model = mlp(nn.ReLU, batch_norm=True)
    x, y = problem("ce")
    theta, _, tr_g, restore = dense_traces(model, x, y, "ce",
                                           {n for n, _ in model.named_parameters()}, "train")
    value, gradient = tr_g(theta), jacrev(tr_g)(theta)
    restore()
    values, grads = sample(model, "ggn", 300, 4, data=(x, y), bn_mode="train")  # auto: batched
    assert_unbiased(values, grads, float(value), gradient)


def test_hutchinson_on_mse_and_a_block_is_unbiased():
    model = mlp(nn.Tanh)
    x, y = problem("mse")
    blocks = {"middle": [model[2].weight, model[2].bias]}
    theta, tr_h, _, restore = dense_traces(model, x, y, "mse", {"2.weight", "2.bias"})
    value, gradient = tr_h(theta), jacrev(tr_h)(theta)
    restore()
    values, grads = sample(model, "hutchinson", 300, 4, data=(x, y), loss_fn=nn.MSELoss(),
                           blocks=blocks)
    assert_unbiased(values, grads, float(value), gradient)


def test_batch_loss_with_hutchinson():
    model = mlp(nn.Tanh)
    x, y = problem("ce")
    batch_loss = BatchLoss(lambda m, b: (nn.functional.cross_entropy(m(b[0]), b[1]), len(b[1])))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = trace_penalty(model, batch_loss, [(x, y)], estimator="hutchinson", probes=3,
                      generator=g1)
    b = trace_penalty(model, nn.CrossEntropyLoss(), (x, y), estimator="hutchinson", probes=3,
                      generator=g2)
    assert float(a) == pytest.approx(float(b), rel=1e-12)


def test_generator_makes_it_reproducible():
    model = mlp(nn.Tanh)
    data = problem("ce")
    a = trace_penalty(model, nn.CrossEntropyLoss(), data, generator=torch.Generator().manual_seed(5))
    b = trace_penalty(model, nn.CrossEntropyLoss(), data, generator=torch.Generator().manual_seed(5))
    assert float(a) == float(b)


# ----------------------------------------------------------------------------- blocks
def test_block_rules_on_lenet():
    model = build_model("LeNet")
    assert list(resolve_blocks(model, "layers")) == list(layer_blocks(model))
    assert list(middle_layers(model)) == ["conv2.weight", "fc1.weight", "fc2.weight"]
    assert list(paper_middle(model)) == ["conv2.weight", "conv2.bias", "fc1.weight",
                                         "fc1.bias", "fc2.weight", "fc2.bias"]
    share = sum(p.numel() for ps in paper_middle(model).values() for p in ps) / \
        sum(p.numel() for p in model.parameters())
    assert share == pytest.approx(0.984, abs=0.001)  # the notes' 98.4%
    all_params = resolve_blocks(model, None)["all"]
    assert len(all_params) == len(list(model.parameters()))


def test_middle_rule_by_relative_depth():
    for count, expected in [(1, [0]), (2, [0, 1]), (3, [1]), (4, [1, 2]), (8, [2, 3, 4, 5])]:
        model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(count)])
        assert list(middle_layers(model)) == [f"{i}.weight" for i in expected], count


def test_blocks_sum_the_block_traces():
    model = mlp(nn.Tanh)
    data = problem("ce")
    loss_fn = nn.CrossEntropyLoss()
    parts = [trace_penalty(model, loss_fn, data, blocks={n: ps}, estimator="exact")
             for n, ps in layer_blocks(model).items()]
    total = trace_penalty(model, loss_fn, data, blocks="layers", estimator="exact")
    assert float(total) == pytest.approx(float(sum(parts)), rel=1e-12)


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kwargs,loss_fn,match", [
    ({"estimator": "hessian"}, nn.CrossEntropyLoss(), "estimator must be one of"),
    ({"probes": 0}, nn.CrossEntropyLoss(), "probes must be an integer"),
    ({"distribution": "normal"}, nn.CrossEntropyLoss(), "distribution must be one of"),
    ({"blocks": "centre"}, nn.CrossEntropyLoss(), "blocks must be one of"),
    ({}, nn.NLLLoss(), "use estimator='hutchinson'"),
    ({}, nn.CrossEntropyLoss(weight=torch.ones(C, dtype=torch.float64)), "hutchinson"),
    ({"estimator": "exact"}, nn.MSELoss(reduction="none"), "reduction='none'"),
])
def test_refusals(kwargs, loss_fn, match):
    model = mlp(nn.ReLU)
    x, y = problem("mse" if isinstance(loss_fn, nn.MSELoss) else "ce")
    with pytest.raises(UserError, match=match):
        trace_penalty(model, loss_fn, (x, y), **kwargs)


def test_refusals_of_batch_coupling_and_batch_loss():
    model = mlp(nn.ReLU, batch_norm=True)
    x, y = problem("ce")
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(UserError, match="form='batched'"):
        trace_penalty(model, loss_fn, (x, y), form="per-example", bn_mode="train")
    with pytest.raises(UserError, match="one batch"):
        trace_penalty(model, loss_fn, [(x[:3], y[:3]), (x[3:], y[3:])], bn_mode="train")
    with pytest.raises(UserError, match="BatchLoss"):
        trace_penalty(model, BatchLoss(lambda m, b: (loss_fn(m(b[0]), b[1]), 3)), [(x, y)])
    y[0] = -100
    with pytest.raises(UserError, match="ignore_index"):
        trace_penalty(mlp(nn.ReLU), loss_fn, (x, y))


# ----------------------------------------------------------------------------- regulariser
def test_regularizer_schedule_and_log():
    model = mlp(nn.Tanh)
    data = problem("ce")
    logged = []
    regularizer = TraceRegularizer(model, nn.CrossEntropyLoss(), gamma=0.5, every=3,
                                   start_epoch=2, loggers=lambda i, s: logged.append((i, s)))
    terms = {(epoch, step): regularizer.term(data, epoch=epoch, step=step)
             for epoch in (1, 2) for step in range(7)}
    due = [key for key, term in terms.items() if torch.is_tensor(term)]
    assert due == [(2, 0), (2, 3), (2, 6)]
    assert all(terms[key] == 0.0 for key in terms if key not in due)
    summary = regularizer.epoch_summary()
    assert summary["htr_steps"] == 3 and regularizer.steps == 3
    values = [float(terms[key]) / 0.5 for key in due]
    assert summary["htr_penalty"] == pytest.approx(sum(values) / 3)
    assert [i for i, _ in logged] == [7, 10, 13]  # global step indices


def test_settings_validation_and_record():
    with pytest.raises(UserError, match="--htr-probes"):
        RegularizerSettings(gamma=1.0, probes=0).validated()
    with pytest.raises(UserError, match="--htr-estimator"):
        RegularizerSettings(estimator="ggm").validated()
    settings = RegularizerSettings(gamma=1e-3, estimator="Hutchinson").validated()
    assert settings.estimator == "hutchinson"
    assert RegularizerSettings.from_dict(settings.to_dict()) == settings
    assert not RegularizerSettings().active


def test_lightning_callback_adds_the_penalty_gradient(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from layerhessians.regularization.lightning import TraceRegularizerCallback

    x, y = problem("ce")
    settings = {"gamma": 0.3, "every": 1, "estimator": "ggn", "seed": 4}

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp(nn.Tanh)

        def forward(self, inputs):
            return self.net(inputs)

        def training_step(self, batch, index):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Module()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=N)
    trainer = pl.Trainer(max_epochs=1, callbacks=[TraceRegularizerCallback(
        nn.CrossEntropyLoss(), **settings)], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
        default_root_dir=tmp_path)
    trainer.fit(module, loader)
    # the same step by hand: loss + gamma * penalty with the regulariser's own generator
    model = mlp(nn.Tanh)
    regularizer = TraceRegularizer(model, nn.CrossEntropyLoss(), **settings)
    loss = nn.functional.cross_entropy(model(x), y) + regularizer.term((x, y), epoch=1, step=0)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    for a, b in zip(module.net.parameters(), model.parameters()):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- shared forward
def tiny_lenet_problem(seed=0):
    from problems import TinyLeNet

    torch.manual_seed(seed)
    model = TinyLeNet().double()
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(N, 1, 12, 12, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=generator)
    return model, x, y


@pytest.mark.parametrize("blocks", [None, "middle"])
def test_exact_on_a_conv_net_with_shared_outputs_equals_dense_trace(blocks):
    """The first convolution sees the data (the lean double backward without unfolding);
    the caller's forward, run inside penalty_forward_context, is reused."""
    from layerhessians.regularization import penalty_forward_context

    model, x, y = tiny_lenet_problem()
    with penalty_forward_context():
        outputs = model(x)
    value = trace_penalty(model, nn.CrossEntropyLoss(), (x, y), blocks=blocks,
                          estimator="exact", form="batched", outputs=outputs)
    theta, _, tr_g, restore = dense_traces(model, x, y, "ce", block_names(model, blocks))
    expected, gradient = tr_g(theta), jacrev(tr_g)(theta)
    restore()
    assert float(value) == pytest.approx(float(expected), rel=1e-10)
    assert torch.allclose(flat_grad(value, model), gradient, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("estimator", ["ggn", "hutchinson"])
@pytest.mark.parametrize("bn", [False, True])
def test_shared_outputs_give_the_penalty_of_its_own_forward(estimator, bn):
    """Same probes, same value and gradient, whether the penalty runs its forward or reuses
    the caller's (train-mode batch norm with bn_mode='train': the training step's)."""
    from problems import conv_data, tiny_convnet

    if bn:
        model = tiny_convnet().train()
        (x, y), = conv_data(sizes=(8,))
    else:
        model, x, y = tiny_lenet_problem()
    loss_fn = nn.CrossEntropyLoss()
    kwargs = dict(estimator=estimator, probes=2, form="batched", bn_mode="train")
    own = trace_penalty(model, loss_fn, (x, y), generator=torch.Generator().manual_seed(3),
                        **kwargs)
    shared = trace_penalty(model, loss_fn, (x, y), generator=torch.Generator().manual_seed(3),
                           outputs=model(x), **kwargs)
    assert float(shared) == pytest.approx(float(own), rel=1e-12)
    assert torch.allclose(flat_grad(shared, model), flat_grad(own, model), rtol=1e-10,
                          atol=1e-12)


def test_shared_outputs_refused_where_the_forwards_differ():
    model = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Dropout(0.5), nn.ReLU(),
                          nn.Linear(HIDDEN, C)).double().train()
    x, y = problem("ce")
    with pytest.raises(UserError, match="1 \\(Dropout\\) reads its mode"):
        trace_penalty(model, nn.CrossEntropyLoss(), (x, y), outputs=model(x), form="batched")
    relu = mlp(nn.ReLU)
    with pytest.raises(UserError, match="with their graph"):
        trace_penalty(relu, nn.CrossEntropyLoss(), (x, y), outputs=relu(x).detach())
    with pytest.raises(UserError, match="one row per example"):
        trace_penalty(relu, nn.CrossEntropyLoss(), (x, y), outputs=relu(x[:3]))
    with pytest.raises(UserError, match="one .inputs, targets. batch only"):
        trace_penalty(relu, nn.CrossEntropyLoss(), [(x[:3], y[:3]), (x[3:], y[3:])],
                      outputs=relu(x))
    bn = mlp(nn.ReLU, batch_norm=True).train()  # train-mode forward, penalty in eval mode
    with pytest.raises(UserError, match="BatchNorm1d.*train mode"):
        trace_penalty(bn, nn.CrossEntropyLoss(), (x, y), outputs=bn(x), bn_mode="eval")


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_regularizer_loss_is_loss_plus_term(dropout):
    """TraceRegularizer.loss (one forward where the modes allow) gives the gradient of
    loss_fn(model(x), y) + term, and updates batch norm's running statistics once."""
    def make():
        torch.manual_seed(0)
        layers = [nn.Linear(D_IN, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU()]
        layers += [nn.Dropout(dropout)] if dropout else []
        return nn.Sequential(*layers, nn.Linear(HIDDEN, C)).double().train()

    x, y = problem("ce")
    loss_fn = nn.CrossEntropyLoss()
    settings = RegularizerSettings(gamma=0.1, estimator="ggn", probes=2, form="batched",
                                   bn_mode="train")
    results = []
    for way in ("loss", "term"):
        model = make()
        regularizer = TraceRegularizer(model, loss_fn, settings, seed=4)
        torch.manual_seed(7)  # the dropout masks
        if way == "loss":
            total, data_loss, outputs = regularizer.loss((x, y), epoch=1, step=0)
        else:
            outputs = model(x)
            data_loss = loss_fn(outputs, y)
            total = data_loss + regularizer.term((x, y), epoch=1, step=0)
        results.append((flat_grad(total, model), float(data_loss), outputs.detach(),
                        model[1].running_mean.clone(), int(model[1].num_batches_tracked),
                        regularizer.epoch_summary()))
    (g1, l1, o1, m1, n1, s1), (g2, l2, o2, m2, n2, s2) = results
    assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-12)
    assert l1 == l2 and torch.equal(o1, o2) and torch.equal(m1, m2) and n1 == n2 == 1
    assert s1 == s2 and s1["htr_steps"] == 1


# ----------------------------------------------------------------------------- certificates
def test_trace_certificates_tell_where_tr_g_is_tr_h():
    """ReLU: certified on every block (and the exact tr G equals the dense tr H); tanh: not
    (tr G != tr H, as the dense references show); batch norm in train mode: not before it."""
    from layerhessians.regularization import trace_certificates

    x, y = problem("ce")
    loss_fn = nn.CrossEntropyLoss()
    for activation, expected in ((nn.ReLU, True), (nn.Tanh, False)):
        model = mlp(activation)
        found = trace_certificates(model, loss_fn, (x, y), "layers")
        assert [c["certified"] for c in found.values()] == [expected, expected, True], activation
        theta, tr_h, tr_g, restore = dense_traces(model, x, y, "ce", block_names(model, None))
        same = abs(float(tr_h(theta)) - float(tr_g(theta))) < 1e-10 * abs(float(tr_h(theta)))
        restore()
        assert same == expected
    model = mlp(nn.ReLU, batch_norm=True)
    found = trace_certificates(model, loss_fn, (x, y), None, bn_mode="train")
    assert not found["all"]["certified"] and "Hessian block != GGN block" in found["all"]["reason"]
    assert trace_certificates(model, loss_fn, (x, y), None, bn_mode="eval")["all"]["certified"]


# ----------------------------------------------------------------------------- per-example norms
class _Sequence(nn.Module):
    """Linear layers on [N, T, D] inputs, a weight used twice (``shared=True``)."""

    def __init__(self, shared=False):
        super().__init__()
        self.first, self.second = nn.Linear(D_IN, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.out, self.shared = nn.Linear(HIDDEN, C), shared

    def forward(self, x):
        h = torch.relu(self.second(torch.relu(self.first(x.reshape(x.shape[0], 2, -1)))))
        if self.shared:
            h = torch.relu(self.second(h))
        return self.out(h.mean(1))


@pytest.mark.parametrize("case", ["lenet", "tanh-mlp", "sequence", "shared", "batch-norm"])
@pytest.mark.parametrize("estimator", ["ggn", "exact"])
def test_per_example_from_layer_norms_equals_vmap(case, estimator):
    """The per-example form from one backward pass (Linear/Conv2d layers) gives the vmap
    path's value and gradient for the same probes; where the rule does not apply (a weight
    used twice, a batch-norm parameter) the vmap path runs."""
    import layerhessians.regularization.penalty as penalty
    from layerhessians.regularization.per_example_norms import plan

    x, y = problem("ce")
    if case == "lenet":
        model, x, y = tiny_lenet_problem()
    elif case in ("sequence", "shared"):
        torch.manual_seed(0)
        model = _Sequence(shared=case == "shared").double()
        x = torch.randn(N, 2 * D_IN, dtype=torch.float64)
    else:
        model = mlp(nn.Tanh, batch_norm=case == "batch-norm")
    params = [p for p in model.parameters()]
    assert bool(plan(model, params)[0]) == (case != "batch-norm")
    results = []
    for rule in (plan, lambda m, p: ([], "off")):
        original, penalty.plan = penalty.plan, rule
        try:
            value = trace_penalty(model, nn.CrossEntropyLoss(), (x, y), estimator=estimator,
                                  probes=3, form="per-example",
                                  generator=torch.Generator().manual_seed(2))
        finally:
            penalty.plan = original
        results.append((value.detach(), flat_grad(value, model)))
    (v1, g1), (v2, g2) = results
    assert torch.allclose(v1, v2, rtol=1e-12) and torch.allclose(g1, g2, rtol=1e-10, atol=1e-12)
    if estimator == "exact" and case != "batch-norm":  # and both are the dense GGN trace
        theta, _, tr_g, restore = dense_traces(model, x, y, "ce", block_names(model, None))
        expected = tr_g(theta)
        restore()
        assert float(v1) == pytest.approx(float(expected), rel=1e-10)


def test_regularizer_takes_a_block_rule_as_a_setting_and_settings_say_what_cannot_act():
    model = mlp(nn.ReLU)
    regularizer = TraceRegularizer(model, nn.CrossEntropyLoss(), gamma=1e-3, blocks="middle")
    assert regularizer.settings.blocks == "middle" and "blocks='middle'" in repr(regularizer)
    with pytest.raises(UserError, match=r"blocks \(--htr-blocks\)"):
        TraceRegularizer(model, nn.CrossEntropyLoss(), gamma=1e-3, blocks="mid")
    with pytest.raises(UserError, match=r"^gamma \(--htr-gamma\) must be"):
        TraceRegularizer(model, nn.CrossEntropyLoss(), gamma=-1)
    assert RegularizerSettings(gamma=1e-3).notes(5) == []
    assert "--htr-estimator does nothing" in RegularizerSettings(estimator="exact").notes()[0]
    assert "no step is regularised" in RegularizerSettings(gamma=1, start_epoch=4).notes(3)[0]
    assert "not hutchinson" in RegularizerSettings(gamma=1, estimator="hutchinson",
                                                   form="batched").notes()[0]
