"""What a new user meets (issue 21, items 22 and 24): measures say how they were computed,
a tracker's resume=True also starts a run, and a tracker logs an engine note once."""

import logging

import pytest
import torch
from torch import nn

import layerhessians as lh
from layerhessians.errors import UserError
from layerhessians.store.writer import RunStore
from problems import PROBLEMS


def test_every_measure_says_how_it_was_computed():
    model, data = PROBLEMS["mlp"].build()
    op = lh.hessian_operator(model, PROBLEMS["mlp"].loss_fn, data)
    assert lh.slq(op, iterations=4).method == "slq"
    assert lh.exact_spectrum(op).method == "exact"
    from layerhessians.spectra import concatenate_rows
    assert concatenate_rows([lh.slq(op, iterations=4, seed=s) for s in (0, 1)]).method == "slq"


def test_tracker_resume_true_starts_a_new_run_then_continues_it(tmp_path):
    model, data = PROBLEMS["mlp"].build()
    loss_fn = PROBLEMS["mlp"].loss_fn
    with lh.SpectraTracker(model, loss_fn, data, tmp_path / "new", iterations=4,
                           resume=True) as tracker:
        assert tracker.completed is None
        tracker.update(0)
    with lh.SpectraTracker(model, loss_fn, data, tmp_path / "new", iterations=4,
                           resume=True) as tracker:
        assert tracker.completed == 0
        tracker.update(1)
    assert lh.load_run(tmp_path / "new").epochs == [0, 1]


def test_store_refusals_through_the_api_name_the_api_arguments(tmp_path):
    model, data = PROBLEMS["mlp"].build()
    loss_fn = PROBLEMS["mlp"].loss_fn
    (tmp_path / "half" / "checkpoints").mkdir(parents=True)
    (tmp_path / "half" / "metrics.csv").write_text("epoch\n0\n")
    with pytest.raises(UserError) as caught:
        lh.SpectraTracker(model, loss_fn, data, tmp_path / "half", iterations=4, resume=True)
    assert "overwrite=True" in str(caught.value) and "run_dir" in str(caught.value)
    assert "--" not in str(caught.value) and "-r" not in str(caught.value).split()
    with pytest.raises(UserError) as caught:  # the same refusal for the command line
        RunStore.create(tmp_path / "half", {"model": "x"}, resume=True)
    assert "--overwrite" in str(caught.value) and "another -r" in str(caught.value)


class _Smooth(nn.Module):
    """A tanh MLP: its blocks are not certified (Hessian != GGN), so auto falls back."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_a_tracker_logs_a_fallback_reason_once(caplog):
    torch.manual_seed(0)
    model = _Smooth().double()
    _, data = PROBLEMS["mlp"].build()
    tracker = lh.SpectraTracker(model, PROBLEMS["mlp"].loss_fn, data, iterations=4)
    with caplog.at_level(logging.WARNING, logger="layerhessians"):
        for index in range(3):
            tracker.update(index)
    notes = [r for r in caplog.records if "instead of the exact route" in r.getMessage()]
    assert len(notes) == 1
    with caplog.at_level(logging.WARNING, logger="layerhessians"):
        lh.layer_spectra(model, PROBLEMS["mlp"].loss_fn, data, iterations=4)
    # the filter is the tracker's own: a plain call still says why
    assert len([r for r in caplog.records if "instead of the exact route" in r.getMessage()]) == 2


def test_user_error_is_exported():
    assert issubclass(lh.UserError, UserError)


# ----------------------------------------------------------------------------- plot (item 24)
def test_plot_shows_progress_and_says_what_it_replaced(tmp_path, capsys, monkeypatch):
    from layerhessians.analysis import report
    from layerhessians.cli.main import main
    from runfactory import write_run

    run = write_run(tmp_path / "run")
    monkeypatch.setattr(report, "PLOT_PROGRESS_S", 0.01)  # a slow plot, made quick
    slow = report.plots.save_figure

    def save_slowly(*args, **kwargs):
        import time
        time.sleep(0.05)
        return slow(*args, **kwargs)

    monkeypatch.setattr(report.plots, "save_figure", save_slowly)
    assert main(["plot", str(run), "--points", "64", "--dpi", "20"]) == 0
    first = capsys.readouterr()
    assert "replaced" not in first.out + first.err
    progress = [line for line in first.err.splitlines() if line.startswith("plot run:")]
    assert progress and "figures" in progress[-1] and "done" in progress[-1]
    assert main(["plot", str(run), "--points", "64", "--dpi", "20"]) == 0
    second = capsys.readouterr()
    saved = [line for line in second.out.splitlines() if line.startswith("image saved at:")]
    assert saved and all(line.endswith("(replaced the earlier one)") for line in saved)
    assert f"replaced {len(saved)} figure(s)" in second.err
