"""SpectraTracker: spectra equal layer_spectra's on the same state, the model's state is left
alone, the record is the trainer's format (load_run, plot, match), a killed loop resumes
without a lost or duplicated record, blocks by mapping on a transformer (against dense
block Hessians), loggers and refusals."""

import fnmatch
from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import layerhessians
from layerhessians.analysis.report import make_figures, match_runs
from layerhessians.curvature.dense import reference_matrix
from layerhessians.errors import UserError
from layerhessians.spectra import layer_spectra, start_vector
from layerhessians.store import checkpoints, manifest, names, writer
from layerhessians.store.run import load_run
from layerhessians.tracking import SpectraTracker, spectra_scalars
from layerhessians.training.seeding import derive_seed
from problems import PROBLEMS
from references import dense_reference

ITERATIONS = 12


class TinyLM(nn.Module):
    """Causal transformer LM: embedding + position, one encoder layer, head; float64."""

    def __init__(self, vocab=5, width=4, context=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.1 * torch.randn(context, width))
        self.layer = nn.TransformerEncoderLayer(width, 2, 6, dropout=0.0, batch_first=True,
                                                norm_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens):
        length = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, dtype=torch.float64)
        h = self.embed(tokens) + self.position[:length]
        return self.head(self.layer(h, src_mask=mask, is_causal=True))


def lm_loss(logits, targets):
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    return TinyLM().double()


def lm_data(seed=1, sizes=(3, 3)):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 5, (sum(sizes), 5), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    return [(x[a:a + n], y[a:a + n]) for a, n in zip(np.cumsum((0, *sizes[:-1])), sizes)]


PATTERNS = OrderedDict([("embedding", ["embed.weight", "position"]),
                        ("attention", ["layer.self_attn.*"]),
                        ("mlp", ["layer.linear*"])])


def pattern_blocks(model):
    named = list(model.named_parameters())
    return OrderedDict((block, [p for n, p in named if any(fnmatch.fnmatch(n, q) for q in pats)])
                       for block, pats in PATTERNS.items())


def assert_same_spectra(a, b):
    assert list(a) == list(b)
    for block in a:
        np.testing.assert_array_equal(a[block].nodes, b[block].nodes)
        np.testing.assert_array_equal(a[block].weights, b[block].weights)


def set_weights(model, epoch):
    """The loop's weights after ``epoch``: a deterministic function of the epoch."""
    g = torch.Generator().manual_seed(100 + epoch)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


# ----------------------------------------------------------------------------- spectra
def test_top_level_export():
    assert layerhessians.SpectraTracker is SpectraTracker


def test_spectra_equal_layer_spectra_on_the_same_state():
    model, data = PROBLEMS["conv"].build()
    tracker = SpectraTracker(model, PROBLEMS["conv"].loss_fn, data, iterations=ITERATIONS,
                             vectors=2, seed=7)
    got = tracker.update(3)
    want = layer_spectra(model, PROBLEMS["conv"].loss_fn, data, iterations=ITERATIONS,
                         vectors=2, seed=derive_seed(7, 3, "spectra"))
    assert list(got) == ["full", "conv1.weight", "conv2.weight", "fc.weight"]
    assert_same_spectra(got, want)
    assert tracker.seed_for(3) == derive_seed(7, 3, "spectra") != tracker.seed_for(4)


def test_transformer_blocks_by_mapping_against_dense_block_hessians():
    model, data = tiny_lm(), lm_data()
    blocks = pattern_blocks(model)
    tracker = SpectraTracker(model, lm_loss, data, blocks=blocks, iterations=ITERATIONS)
    got = tracker.update(0)
    assert list(got) == ["full", "embedding", "attention", "mlp"]
    assert [p for p in tracker.blocks()["attention"]] == blocks["attention"]
    with sdpa_kernel(SDPBackend.MATH):
        want = layer_spectra(model, lm_loss, data, layers=blocks, iterations=ITERATIONS,
                             seed=tracker.seed_for(0))
    assert_same_spectra(got, want)
    # enough Lanczos steps: the Ritz values are the block Hessian's eigenvalues
    exact = SpectraTracker(model, lm_loss, data, blocks={"attention": blocks["attention"]},
                           iterations=80).update(0)["attention"]
    with sdpa_kernel(SDPBackend.MATH):
        dense = reference_matrix(model, lm_loss, data, params=blocks["attention"]).detach()
    assert dense.shape == (80, 80)  # in_proj 3 x 4 x 4 + 12, out_proj 4 x 4 + 4
    eigenvalues = torch.linalg.eigvalsh(dense).numpy()
    assert exact.support[1] == pytest.approx(eigenvalues.max(), rel=1e-8, abs=1e-10)
    assert exact.support[0] == pytest.approx(eigenvalues.min(), rel=1e-8, abs=1e-10)
    # the SLQ trace estimate is dim * v^T A v for the unit start vector v
    v = start_vector(80, seed=tracker.seed_for(0), block="attention")
    assert exact.trace() == pytest.approx(80 * float(v @ dense @ v), rel=1e-8)
    independent = dense_reference(model, lm_loss, data, params=blocks["attention"],
                                  reduction="mean")
    assert float(torch.linalg.norm(independent - dense) / torch.linalg.norm(dense)) < 1e-10
    assert exact.trace() == pytest.approx(80 * float(v @ independent @ v), rel=1e-8)


def test_a_stock_float32_transformer_works_on_the_cpu():
    # float32 attention on the CPU takes the fused flash kernel, which has no double backward
    model, data = tiny_lm().float(), lm_data()
    spectra = SpectraTracker(model, lm_loss, data, blocks=pattern_blocks(model),
                             iterations=4).update(0)
    assert all(np.isfinite(m.nodes).all() for m in spectra.values())


def test_a_tied_weight_counts_once():
    model = tiny_lm()
    model.head.weight = model.embed.weight  # tied input/output embedding
    tracker = SpectraTracker(model, lm_loss, lm_data(),
                             blocks={"tied": [model.embed.weight, model.head.weight]},
                             iterations=4)
    assert tracker.block_names == {"tied": ["embed.weight"]}
    assert tracker.update(0)["tied"].dim == model.embed.weight.numel()


def test_the_model_state_is_left_alone():
    model, data = PROBLEMS["conv"].build(sizes=(10,))  # train-mode batch norm: one batch
    model.train()
    model.conv2.eval()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    SpectraTracker(model, PROBLEMS["conv"].loss_fn, data, iterations=6,
                   bn_mode="train").update(1)
    assert [m.training for m in model.modules()] == modes
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]) and torch.equal(p.grad, torch.full_like(p, 0.5))
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert torch.equal(torch.get_rng_state(), rng)


def test_loggers_get_the_scalars_of_the_spectra():
    model, data = PROBLEMS["mlp"].build()
    calls = []
    tracker = SpectraTracker(model, PROBLEMS["mlp"].loss_fn, data, iterations=35,
                             loggers=lambda *args: calls.append(args))
    spectra = tracker.update(2)
    (index, scalars, logged), = calls
    assert index == 2 and logged is spectra
    assert scalars == spectra_scalars(spectra)
    assert list(scalars)[:2] == ["top_eigenvalue/full", "trace/full"]
    dense = reference_matrix(model, PROBLEMS["mlp"].loss_fn, data).detach()
    eigenvalues = torch.linalg.eigvalsh(dense)
    assert scalars["top_eigenvalue/full"] == pytest.approx(float(eigenvalues.max()), rel=1e-8)
    v = start_vector(dense.shape[0], seed=tracker.seed_for(2))
    assert scalars["trace/full"] == pytest.approx(dense.shape[0] * float(v @ dense @ v),
                                                  rel=1e-8)
    independent = dense_reference(model, PROBLEMS["mlp"].loss_fn, data, reduction="mean")
    assert scalars["top_eigenvalue/full"] == pytest.approx(
        float(torch.linalg.eigvalsh(independent).max()), rel=1e-8)
    assert scalars["trace/full"] == pytest.approx(dense.shape[0] * float(v @ independent @ v),
                                                  rel=1e-8)
    weight = dict(model.named_parameters())["2.weight"]
    assert scalars["trace/2.weight"] == pytest.approx(spectra["2.weight"].trace())
    assert spectra["2.weight"].dim == weight.numel()


# ----------------------------------------------------------------------------- the record
def test_the_record_reads_as_a_run(tmp_path):
    model, data = tiny_lm(), lm_data()
    run_dir = tmp_path / "lm"
    with SpectraTracker(model, lm_loss, data, run_dir, blocks=pattern_blocks(model),
                        iterations=ITERATIONS, dataset="tokens") as tracker:
        recorded = {}
        for epoch in range(3):
            set_weights(model, epoch)
            recorded[epoch] = tracker.update(epoch, metrics={"train_loss": 1.0 / (epoch + 1),
                                                             "test_loss": torch.tensor(2.0)})
        assert tracker.completed == 2
    run = load_run(run_dir)
    assert run.epochs == [0, 1, 2]
    assert run.blocks == ["full", "embedding", "attention", "mlp"]
    assert run.record.model == "TinyLM" and run.record.dataset == "tokens"
    assert run.record.block_dims["attention"] == 80
    assert run.record.tracker["block_params"]["embedding"] == ["position", "embed.weight"]
    for epoch, spectra in recorded.items():
        for block, measure in spectra.items():
            np.testing.assert_allclose(run.measure(block, epoch).nodes, measure.nodes,
                                       rtol=1e-15)
    assert list(run.metrics["epoch"]) == [0, 1, 2]
    np.testing.assert_allclose(run.metrics["top_eigenvalue"],
                               [spectra_scalars(recorded[e])["top_eigenvalue/full"]
                                for e in range(3)])
    assert run.metrics["test_loss"].tolist() == [2.0, 2.0, 2.0]
    written = make_figures(run, points=64)  # what `layerhessians plot` draws
    assert {p.name for p in written} >= {"spectrum_attention.png", "overview_full.png",
                                         "layer_distances.png", "training_curves.png"}
    distances, summary, _ = match_runs([run], out=tmp_path / "match")
    assert set(distances["layer"]) == {"embedding", "attention", "mlp"}
    assert len(summary) == 1


def _loop(model, loss_fn, data, run_dir, epochs, resume, *, stop_at=None):
    """A user's loop: the model's weights after each epoch come from its own checkpoint
    (``set_weights``), the tracker resumes after its last committed update."""
    tracker = SpectraTracker(model, loss_fn, data, run_dir, iterations=8, resume=resume)
    first = 0 if tracker.completed is None else tracker.completed + 1
    try:
        for epoch in range(first, epochs + 1):
            set_weights(model, epoch)
            tracker.update(epoch, metrics={"train_loss": float(epoch)})
    finally:
        tracker.close()  # what a killed process's exit does to the lock


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def _record(run_dir):
    run = load_run(run_dir)
    return run.spectra, run.metrics.drop(columns="spectra_seconds")


@pytest.mark.parametrize("victim", ["spectra.csv", "metrics.csv", "last.pt"])
def test_a_killed_loop_resumes_without_lost_or_duplicated_records(tmp_path, monkeypatch, victim):
    model, data = PROBLEMS["conv"].build()
    loss_fn = PROBLEMS["conv"].loss_fn
    _loop(model, loss_fn, data, tmp_path / "whole", 3, resume=False)
    want_spectra, want_metrics = _record(tmp_path / "whole")

    calls = {"n": 0}
    # the store's writers of the CSVs (write_bytes) and of the checkpoint (save_torch)
    real = {"write_bytes": manifest.write_bytes, "save_torch": checkpoints.save_torch}

    def dying(name):
        def write(path, obj):
            if path.name == victim:
                calls["n"] += 1
                if calls["n"] == 3:  # the write of epoch 2
                    raise Killed(f"killed before writing {victim} of epoch 2")
            real[name](path, obj)
        return write

    monkeypatch.setattr(writer, "write_bytes", dying("write_bytes"))
    monkeypatch.setattr(writer, "save_torch", dying("save_torch"))
    with pytest.raises(Killed):
        _loop(model, loss_fn, data, tmp_path / "killed", 3, resume=False)
    monkeypatch.setattr(writer, "write_bytes", real["write_bytes"])
    monkeypatch.setattr(writer, "save_torch", real["save_torch"])
    killed = SpectraTracker(model, loss_fn, data, tmp_path / "killed", iterations=8,
                            resume=True)
    assert killed.completed == 1
    assert set(load_run(tmp_path / "killed").epochs) == {0, 1}  # partial rows dropped
    killed.close()
    _loop(model, loss_fn, data, tmp_path / "killed", 3, resume=True)
    got_spectra, got_metrics = _record(tmp_path / "killed")
    pd.testing.assert_frame_equal(got_spectra, want_spectra)
    pd.testing.assert_frame_equal(got_metrics, want_metrics)
    assert not got_spectra.duplicated(["epoch", "block", "vector", "node"]).any()


def test_an_older_index_rewinds_the_record(tmp_path, monkeypatch):
    model, data = PROBLEMS["mlp"].build()
    loss_fn = PROBLEMS["mlp"].loss_fn
    _loop(model, loss_fn, data, tmp_path / "run", 3, resume=False)
    want = load_run(tmp_path / "run")
    # the loop resumed from its epoch-1 checkpoint: epoch 2 again, killed in the store's
    # rewind to epoch 1 (journalled), before the rows after epoch 1 were dropped
    tracker = SpectraTracker(model, loss_fn, data, tmp_path / "run", iterations=8, resume=True)
    set_weights(model, 2)

    def killed(epoch):
        raise Killed("killed before the rows after epoch 1 were dropped")

    monkeypatch.setattr(tracker.store, "truncate_after", killed)
    with pytest.raises(Killed):
        tracker.update(2, metrics={"train_loss": 2.0})
    tracker.close()
    assert (tmp_path / "run" / names.JOURNAL).exists()
    # the next open finishes the rewind: the record ends at epoch 1
    resumed = SpectraTracker(model, loss_fn, data, tmp_path / "run", iterations=8, resume=True)
    assert resumed.completed == 1 and load_run(tmp_path / "run").epochs == [0, 1]
    set_weights(model, 1)
    resumed.update(1, metrics={"train_loss": 1.0})
    assert resumed.completed == 1 and load_run(tmp_path / "run").epochs == [0, 1]
    assert not (tmp_path / "run" / "checkpoints" / "rewind.pt").exists()
    resumed.close()
    _loop(model, loss_fn, data, tmp_path / "run", 3, resume=True)
    got = load_run(tmp_path / "run")
    pd.testing.assert_frame_equal(got.spectra, want.spectra)
    assert got.metrics["epoch"].tolist() == [0, 1, 2, 3]
    # an index the record starts at starts the record over (the store's overwrite)
    with SpectraTracker(model, loss_fn, data, tmp_path / "run", iterations=8,
                        resume=True) as again:
        set_weights(model, 0)
        again.update(0, metrics={"train_loss": 0.0})
        assert again.completed == 0
    got = load_run(tmp_path / "run")
    assert got.epochs == [0] and got.metrics["epoch"].tolist() == [0]
    pd.testing.assert_frame_equal(got.spectra, want.spectra[want.spectra["epoch"] == 0])


def test_a_tracker_updated_every_k_steps_resumes(tmp_path):
    """Updates at steps 0, 10, 20, then resumed and updated at 30: the store accepts the
    increasing, non-consecutive indices of a tracker's record."""
    model, data = PROBLEMS["mlp"].build()
    loss_fn = PROBLEMS["mlp"].loss_fn
    with SpectraTracker(model, loss_fn, data, tmp_path / "run", iterations=4,
                        unit="step") as tracker:
        for step in (0, 10, 20):
            set_weights(model, step)
            tracker.update(step=step, metrics={"train_loss": float(step)})
    with SpectraTracker(model, loss_fn, data, tmp_path / "run", iterations=4, unit="step",
                        resume=True) as tracker:
        assert tracker.completed == 20
        set_weights(model, 30)
        tracker.update(step=30, metrics={"train_loss": 30.0})
        assert tracker.completed == 30
    run = load_run(tmp_path / "run")
    assert run.metrics["epoch"].tolist() == [0, 10, 20, 30]
    assert run.epochs == [0, 10, 20, 30]
    assert run.metrics["train_loss"].tolist() == [0.0, 10.0, 20.0, 30.0]


def test_a_failed_update_records_nothing(tmp_path):
    model, data = PROBLEMS["mlp"].build()

    def broken(outputs, targets):  # passes the engine's probe (no gradients), fails later
        if torch.is_grad_enabled():
            raise RuntimeError("loss failed")
        return PROBLEMS["mlp"].loss_fn(outputs, targets)

    with SpectraTracker(model, broken, data, tmp_path / "run", iterations=4) as tracker:
        with pytest.raises(RuntimeError, match="loss failed"):
            tracker.update(1)
        assert tracker.completed is None
    assert load_run(tmp_path / "run").metrics.empty


# ----------------------------------------------------------------------------- refusals
def test_reopening_a_run_needs_resume_or_overwrite_and_the_same_settings(tmp_path):
    model, data = PROBLEMS["mlp"].build()
    loss_fn = PROBLEMS["mlp"].loss_fn
    with SpectraTracker(model, loss_fn, data, tmp_path / "run", iterations=4) as tracker:
        tracker.update(0)
        with pytest.raises(UserError, match="another process"):
            SpectraTracker(model, loss_fn, data, tmp_path / "run", iterations=4, resume=True)
    with pytest.raises(UserError, match="pass resume=True"):
        SpectraTracker(model, loss_fn, data, tmp_path / "run", iterations=4)
    with pytest.raises(UserError, match="different settings.*iterations: 4 -> 5"):
        SpectraTracker(model, loss_fn, data, tmp_path / "run", iterations=5, resume=True)
    other = [(x, y.flip(0)) for x, y in data]
    with pytest.raises(UserError, match="different settings.*hessian_checksum"):
        SpectraTracker(model, loss_fn, other, tmp_path / "run", iterations=4, resume=True)
    with pytest.raises(UserError, match="different settings.*blocks"):
        SpectraTracker(model, loss_fn, data, tmp_path / "run", iterations=4, blocks=False,
                       resume=True)
    with SpectraTracker(model, loss_fn, data, tmp_path / "run", iterations=5,
                        overwrite=True) as fresh:
        assert fresh.completed is None
    assert load_run(tmp_path / "run").metrics.empty


@pytest.mark.parametrize("kwargs, message", [
    ({"iterations": 0}, "iterations must be a positive integer"),
    ({"kind": "hessain"}, "kind must be one of"),
    ({"unit": "batch"}, "unit must be one of"),
    ({"reorthogonalise": True}, "unknown spectra option.*reorthogonalise"),
    ({"layers": True}, "unknown spectra option.*layers"),
    ({"blocks": {"full": []}}, "'full' is reserved"),
    ({"blocks": {"w": []}}, "block 'w' is empty"),
    ({"blocks": {"w": torch.zeros(3)}}, "block 'w': .* not a leaf parameter of the model"),
    ({"blocks": ["0.weight"]}, "blocks must be True"),
    ({"loggers": [1]}, "every logger must be callable"),
])
def test_bad_settings_are_refused(kwargs, message):
    model, data = PROBLEMS["mlp"].build()
    with pytest.raises(UserError, match=message):
        SpectraTracker(model, PROBLEMS["mlp"].loss_fn, data, **kwargs)


def test_bad_updates_are_refused():
    model, data = PROBLEMS["mlp"].build()
    tracker = SpectraTracker(model, PROBLEMS["mlp"].loss_fn, data, iterations=4)
    with pytest.raises(UserError, match="update needs one index"):
        tracker.update()
    with pytest.raises(UserError, match=r"counts epochs.*unit='step'"):
        tracker.update(step=3)
    with pytest.raises(UserError, match="non-negative integer"):
        tracker.update(-1)
    with pytest.raises(UserError, match="metric 'acc' must be a number"):
        tracker.update(1, metrics={"acc": "high"})
    stepper = SpectraTracker(model, PROBLEMS["mlp"].loss_fn, data, iterations=4, unit="step")
    assert list(stepper.update(step=250)) == ["full", "0.weight", "2.weight"]
