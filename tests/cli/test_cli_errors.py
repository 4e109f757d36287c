"""The command line's contract for mistakes: refusals come before any training, in one
line on stderr without a traceback, with exit status 2, in the CLI's own spelling; plot and
match take runs positionally or with -r; match writes next to the runs; reproduce checks
the data of every run first."""

import json
import os
import sys
from pathlib import Path

import pytest

from layerhessians.cli.main import main
from layerhessians.errors import SettingError, UserError
from layerhessians.store.writer import RunStore
from layerhessians.training import loop
from layerhessians.training.config import HessianConfig, TrainConfig, check_types
from runfactory import write_run

REPO = Path(__file__).resolve().parents[2]
FAST = ["-d", "Digits", "-m", "LeNet", "-n", "1", "-b", "64", "--no-progress",
        "--hessian-iterations", "4"]


def one_line_error(capsys, *needles):
    """The single stderr line (no traceback), which contains every needle."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if an epoch starts training."""
    def boom(*args, **kwargs):
        raise AssertionError("an epoch was trained before the refusal")
    monkeypatch.setattr(loop, "train_epoch", boom)


# ----------------------------------------------------------------------------- issue 11, kind 7
def test_bases_over_the_budget_are_refused_before_training_with_cli_flags(tmp_path, capsys,
                                                                           no_training):
    run = tmp_path / "run"
    rc = main(["train", "-r", str(run), *FAST[:-2], "--memory-budget", "1MB",
               "--hessian-reorthogonalize", "full"])
    assert rc == 2
    line = one_line_error(capsys, "full re-orthogonalisation needs", "--memory-budget",
                          "--hessian-reorthogonalize auto|none", "--hessian-iterations")
    assert "reorthogonalize=False" not in line
    # 128 steps x (61,706 full + 61,470 in the 5 layer blocks) x 8 bytes
    assert "123,176 parameters" in line and "120.3 MiB" in line
    assert not (run / "metrics.csv").exists()


def test_bases_over_free_memory_are_refused_before_training(tmp_path, capsys, monkeypatch,
                                                             no_training):
    """The VGG11_bn case (53.7 GiB of bases) on a machine with little free memory."""
    from layerhessians.spectra import plan

    monkeypatch.setattr(plan, "free_memory", lambda device: 2**20)
    rc = main(["train", "-r", str(tmp_path / "run"), *FAST[:-2],
               "--hessian-reorthogonalize", "full"])
    assert rc == 2
    one_line_error(capsys, "full re-orthogonalisation needs", "cpu has 1.0 MiB free",
                   "--hessian-reorthogonalize auto|none")


def test_api_refusal_names_the_api_arguments(tmp_path, no_training):
    config = TrainConfig(dataset="Digits", num_epochs=1, memory_budget="1MB",
                         hessian=HessianConfig(reorthogonalize=True))
    with pytest.raises(SettingError) as err:
        loop.train(config, tmp_path / "run", progress=False, console=False)
    message = str(err.value)
    assert 'reorthogonalize=False or "auto"' in message and "(iterations)" in message
    assert "memory_budget" in message and "--hessian" not in message
    assert "--hessian-reorthogonalize" in err.value.spelled("cli")
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_auto_still_turns_reorthogonalisation_off_instead_of_refusing(tmp_path, no_training,
                                                                      monkeypatch):
    """Only an explicit ``full`` is refused; ``auto`` decides (and training starts)."""
    monkeypatch.setattr(loop, "train_epoch", lambda *a, **k: (_ for _ in ()).throw(
        KeyboardInterrupt()))
    config = TrainConfig(dataset="Digits", num_epochs=1, memory_budget="1MB")
    with pytest.raises(KeyboardInterrupt):  # reached the first epoch
        loop.train(config, tmp_path / "run", progress=False, console=False)


def test_more_lanczos_steps_than_parameters_are_refused(tmp_path, capsys, no_training):
    rc = main(["train", "-r", str(tmp_path / "run"), *FAST[:-2],
               "--hessian-iterations", "1000000000"])
    assert rc == 2
    one_line_error(capsys, "--hessian-iterations 1000000000", "61,706 parameters",
                   "--hessian-iterations 61706 or fewer")


# ----------------------------------------------------------------------------- issue 12, kind 4
def test_run_directory_that_cannot_be_created(tmp_path, capsys):
    rc = main(["train", "-r", "/proc/lh_run", *FAST])
    assert rc == 2
    one_line_error(capsys, "/proc/lh_run", "choose another location")


def test_run_directory_without_permission(tmp_path, capsys, monkeypatch):
    def denied(self):
        raise PermissionError(13, "Permission denied", str(self.path / ".lock"))
    monkeypatch.setattr(RunStore, "_lock", denied)
    rc = main(["train", "-r", str(tmp_path / "run"), *FAST])
    assert rc == 2
    one_line_error(capsys, "Permission denied", ".lock")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_read_only_parent(tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        assert main(["train", "-r", str(parent / "run"), *FAST]) == 2
    finally:
        parent.chmod(0o700)
    one_line_error(capsys, "Permission denied")


def test_match_out_is_a_file(tmp_path, capsys):
    run = write_run(tmp_path / "r", epochs=range(3))
    (tmp_path / "file").write_text("x")
    assert main(["match", str(run), "--out", str(tmp_path / "file"), "--dpi", "60"]) == 2
    one_line_error(capsys, "is a file")
    # a file in the way of a folder further up: the OS error, as one line
    assert main(["match", str(run), "--out", str(tmp_path / "file" / "sub"), "--dpi", "60"]) == 2
    one_line_error(capsys, str(tmp_path / "file"))


# ----------------------------------------------------------------------------- issue 12, kind 5
def test_empty_run_directory_is_refused(capsys):
    assert main(["train", "-r", "", *FAST]) == 2
    one_line_error(capsys, "-r/--run is empty")


@pytest.mark.parametrize("argv, needles", [
    (["train", "--foo"], ["unknown option --foo", "see `layerhessians train --help`"]),
    (["train", "--hesian-iterations", "3"], ["did you mean --hessian-iterations?"]),
    (["train", "--hessian-kind", "gnn"], ["invalid choice 'gnn'", "did you mean ggn?"]),
    (["plot", "--foo"], ["unknown option --foo", "layerhessians plot --help"]),
    (["match", "--metrc", "paper"], ["did you mean --metric?"]),
    (["trian"], ["did you mean train?"]),
])
def test_bad_command_lines_are_one_line(argv, needles, capsys):
    assert main(argv) == 2
    line = one_line_error(capsys, *needles)
    assert "usage:" not in line


def test_plot_dpi_and_epoch_ranges(tmp_path, capsys):
    run = write_run(tmp_path / "r", epochs=range(3))
    assert main(["plot", str(run), "--dpi", "0"]) == 2
    one_line_error(capsys, "--dpi 0")
    assert main(["plot", str(run), "--epochs", "0-1000000000"]) == 2
    one_line_error(capsys, "no spectra at epoch 1000000000", "0..2")
    assert main(["match", str(run), "--epochs", "1-1000000000", "--dpi", "60"]) == 2
    one_line_error(capsys, "no spectra at epoch 1000000000")


def test_grid_value_of_the_wrong_type(tmp_path, capsys):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"runs": [{"run": "a", "flags": {"num_epochs": [1, 2]}}]}))
    assert main(["sweep", str(grid), "--root", str(tmp_path / "runs")]) == 2
    one_line_error(capsys, "grid run 'a'", "num_epochs must be an integer, got [1, 2]")
    assert not (tmp_path / "runs" / "a").exists()


def test_check_types():
    check_types({"num_epochs": 3, "learning_rate": 1, "milestones": [5, 9], "layers": False,
                 "hessian_total": "all", "memory_budget": "8GB", "save_freq": None,
                 "hessian_reorthogonalize": "auto", "cuda": 1, "model": "LeNet"})
    for bad in ({"learning_rate": "fast"}, {"augment": 1}, {"milestones": [1.5]},
                {"memory_budget": [1]}, {"seed": True}):
        with pytest.raises(UserError):
            check_types(bad)


def test_resume_from_an_older_checkpoint_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "checkpoints" / "epoch_0001.pt").write_bytes(b"")
    rc = main(["train", "--resume", str(run / "checkpoints" / "epoch_0001.pt"), *FAST])
    assert rc == 2
    one_line_error(capsys, "continues a run from its last completed epoch",
                   f"layerhessians train --resume {run}")


# ----------------------------------------------------------------------------- issue 15
def test_plot_takes_runs_positionally_or_with_r(tmp_path, capsys):
    a = write_run(tmp_path / "a", epochs=range(3))
    b = write_run(tmp_path / "b", epochs=range(3))
    args = ["--points", "64", "--dpi", "40"]
    assert main(["plot", str(a), *args]) == 0
    assert main(["plot", "-r", str(b), *args]) == 0
    out = capsys.readouterr().out
    assert str(a / "images") in out and str(b / "images") in out
    for path in (a, b):
        (path / "images" / "overview_full.png").unlink()
    assert main(["plot", str(a), "-r", str(b), *args]) == 0
    assert (a / "images" / "overview_full.png").exists()
    assert (b / "images" / "overview_full.png").exists()
    capsys.readouterr()  # the plots' own output (progress and replacement notes on stderr)
    assert main(["plot"]) == 2
    one_line_error(capsys, "give a run directory")


def test_match_writes_next_to_the_runs_and_prints_the_paths(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    a = write_run(tmp_path / "runs" / "a", epochs=range(3))
    b = write_run(tmp_path / "runs" / "b", epochs=range(3))
    assert main(["match", str(a), "-r", str(b), "--dpi", "40"]) == 0
    out = capsys.readouterr().out
    written = sorted(p.name for p in (tmp_path / "runs").glob("match_distros*"))
    assert written == ["match_distros.csv", "match_distros_peak.png",
                       "match_distros_summary.csv", "match_distros_wasserstein.png"]
    for name in written:
        assert str(tmp_path / "runs" / name) in out
    assert list(work.iterdir()) == []


def test_common_parent():
    from layerhessians.analysis.report import common_parent

    assert common_parent(["/x/runs/a", "/x/runs/b"]) == Path("/x/runs")
    assert common_parent(["/x/runs/a", "/x/other/deep/b"]) == Path("/x")
    with pytest.raises(UserError):
        common_parent(["/x/a", "/y/b"])


def test_seed_match_script_keeps_the_working_directory():
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import match_distros
    finally:
        sys.path.remove(str(REPO / "experiments"))
    assert match_distros.seed_arguments(["r"]) == ["match", "r", "--out", "."]
    assert match_distros.seed_arguments(["r", "--out=x"]) == ["match", "r", "--out=x"]


def test_reproduce_checks_every_dataset_before_training(tmp_path, capsys, no_training):
    grid = tmp_path / "grid.json"
    none = str(tmp_path / "none")
    grid.write_text(json.dumps({"runs": [
        {"run": "digits", "flags": {"dataset": "Digits", "num_epochs": 1}},
        {"run": "mnist", "flags": {"dataset": "MNIST", "num_epochs": 1, "dataset_root": none}},
        {"run": "cifar", "flags": {"dataset": "CIFAR10", "num_epochs": 1, "dataset_root": none}},
    ]}))
    rc = main(["reproduce", "--grid", str(grid), "--root", str(tmp_path / "runs")])
    assert rc == 2
    err = capsys.readouterr().err  # the download attempts are announced, then one error
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in ("nothing was trained", "MNIST, CIFAR10",
                   f"layerhessians datasets --download MNIST CIFAR10 --root {none}"):
        assert needle in errors[0]
    assert not (tmp_path / "runs" / "digits").exists()


def test_grid_summary_names_only_figures_that_exist(tmp_path, capsys):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"runs": [{"run": "bad", "flags": {"model": "NoSuchNet"}}]}))
    assert main(["sweep", str(grid), "--root", str(tmp_path / "runs")]) == 1
    out = capsys.readouterr().out
    assert "0/1 runs with spectra" in out and "figures" not in out
