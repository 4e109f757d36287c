"""Run settings: defaults, validation, round trip through config.json, flag resolution,
one-line errors for bad input, and the per-epoch seeds."""

import json

import pytest

from layerhessians.cli import train as train_cmd
from layerhessians.cli.main import main
from layerhessians.errors import UserError
from layerhessians.training import resume as resume_mod
from layerhessians.training.config import HessianConfig, TrainConfig
from layerhessians.training.seeding import derive_seed


def test_defaults_are_the_seeds_and_the_papers():
    c = TrainConfig()
    assert (c.learning_rate, c.weight_decay, c.num_epochs, c.batch_size) == (1e-4, 0.0, 100, 256)
    assert (c.milestones, c.step_gamma, c.seed, c.examples_per_class) == ([10000], 0.1, 0, 10)
    assert (c.optimizer, c.momentum, c.loss, c.workers) == ("sgd", 0.9, "ce", 4)
    h = c.hessian
    assert (h.iterations, h.vectors, h.kind, h.bn_mode, h.every, h.layers, h.init) == \
        (128, 1, "hessian", "eval", 1, True, False)
    assert h.distribution == "gaussian"


def test_validated_canonicalises_names():
    c = TrainConfig(model="lenet", dataset="fashionmnist", optimizer="ADAM",
                    milestones=[20, 5], hessian=HessianConfig(kind="GGN")).validated()
    assert (c.model, c.dataset, c.optimizer, c.milestones, c.hessian.kind) == \
        ("LeNet", "FashionMNIST", "adam", [5, 20], "ggn")


def test_to_dict_round_trip_through_json():
    c = TrainConfig(learning_rate=0.01, hessian=HessianConfig(iterations=16, layers=False)).validated()
    stored = json.loads(json.dumps({**c.to_dict(), "blocks": ["full"], "start_time": "t"}))
    assert stored["hessian"]["iterations"] == 16 and stored["hessian"]["layers"] is False
    assert TrainConfig.from_dict(stored) == c


@pytest.mark.parametrize("changes, message", [
    ({"model": "AlexNet"}, "unknown model 'AlexNet'; choose one of LeNet"),
    ({"dataset": "ImageNet"}, "unknown dataset 'ImageNet'"),
    ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'; choose one of sgd, adam"),
    ({"learning_rate": 0.0}, "--learning_rate must be a finite number > 0"),
    ({"learning_rate": float("nan")}, "--learning_rate"),
    ({"weight_decay": -1e-4}, "--weight_decay must be a finite number >= 0"),
    ({"num_epochs": 0}, "--num_epochs must be an integer >= 1"),
    ({"batch_size": -3}, "--batch_size"),
    ({"milestones": [0]}, "--milestones"),
    ({"step_gamma": 0.0}, "--step_gamma"),
    ({"seed": -1}, "--seed must be an integer >= 0"),
    ({"examples_per_class": 0}, "--examples_per_class"),
    ({"save_freq": 0}, "--save_freq"),
    ({"loss": "mse"}, "unknown loss 'mse'"),
    ({"hessian": HessianConfig(iterations=1)}, "--hessian-iterations must be an integer >= 2"),
    ({"hessian": HessianConfig(every=0)}, "--hessian-every"),
    ({"hessian": HessianConfig(bn_mode="fixed")}, "unknown --hessian-bn-mode"),
])
def test_bad_values_raise_user_errors(changes, message):
    with pytest.raises(UserError) as err:
        TrainConfig(**changes).validated()
    assert message in str(err.value)


def test_spectra_schedule():
    h = HessianConfig(every=3)
    assert [e for e in range(0, 8) if h.due(e, 7)] == [3, 6, 7]
    assert HessianConfig(init=True).due(0, 5) and not HessianConfig().due(0, 5)


def test_epoch_seeds_are_stable_and_distinct():
    assert derive_seed(0, 3, "batches") == derive_seed(0, 3, "batches")
    seeds = {derive_seed(s, e, k) for s in (0, 1) for e in (0, 1, 2) for k in ("batches", "spectra")}
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)


def cli(argv) -> int:
    """``layerhessians ARGV`` in-process; argparse's own errors exit through SystemExit."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.parametrize("argv, message", [
    (["-m", "AlexNet"], "unknown model 'AlexNet'"),
    (["-d", "ImageNet"], "unknown dataset 'ImageNet'"),
    (["-o", "rmsprop"], "unknown optimizer 'rmsprop'"),
    (["-lr", "-1"], "--learning_rate must be a finite number > 0"),
    (["-n", "abc"], "argument -n/--num_epochs: invalid int value: 'abc'"),
    (["--hessian-kind", "fisher"], "argument --hessian-kind: invalid choice"),
    (["--resume", "--overwrite"], "--resume and --overwrite contradict"),
    (["-d", "MNIST", "--no-download", "--dataset_root", "{tmp}/none"], "MNIST"),
])
def test_cli_bad_input_is_one_line_exit_2(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc = cli(["train", "-r", str(tmp_path / "run"), "--no-progress", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert "Traceback" not in err[0]
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_resume_alone_takes_flags_from_the_stored_run(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    stored = TrainConfig(model="LeNet", learning_rate=0.05, num_epochs=3,
                         hessian=HessianConfig(iterations=12, every=2)).validated()
    (run / "config.json").write_text(json.dumps({**stored.to_dict(), "blocks": ["full"]}))
    config, run_dir, resume, overwrite = resume_mod.resolve({"run": str(run), "resume": True})
    assert (config, run_dir, resume, overwrite) == (stored, run, True, False)
    # typed flags win (volatile -n extends, others are checked later by the run store)
    config, *_ = resume_mod.resolve({"run": str(run), "resume": True, "num_epochs": 5,
                                    "hessian_every": 1})
    assert config.num_epochs == 5 and config.hessian.every == 1 and config.learning_rate == 0.05
    # the seed's form: --resume PATH (the run directory or its checkpoint)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    for target in (run, run / "checkpoints" / "last.pt"):
        config, run_dir, *_ = resume_mod.resolve({"resume": str(target)})
        assert run_dir == run and config == stored
    with pytest.raises(UserError, match="name different runs"):
        resume_mod.resolve({"resume": str(run), "run": str(tmp_path / "other")})
    with pytest.raises(UserError, match="no such file"):
        resume_mod.resolve({"resume": str(tmp_path / "missing")})


def test_default_run_directory_and_command_line():
    config, run_dir, resume, _ = resume_mod.resolve({"learning_rate": 0.01, "model": "lenet"})
    assert run_dir.as_posix() == "runs/model=LeNet,dataset=Digits,opt=sgd,lr=0.01,l2=0,b=256,seed=0"
    assert not resume
    parser = __import__("argparse").ArgumentParser()
    train_cmd.add_arguments(parser)
    args = parser.parse_args(["-lr", "0.01", "--milestones", "3", "5", "--augment", "--no-layers"])
    flags = train_cmd.typed_flags(args)
    assert flags == {"learning_rate": 0.01, "milestones": [3, 5], "augment": True, "layers": False}
    assert train_cmd.command_line(flags) == \
        "layerhessians train --learning_rate 0.01 --milestones 3 5 --augment --no-layers"


def test_resume_without_a_run_or_settings_is_refused_before_loading(tmp_path, capsys):
    """Issue 21 item 17: ``train -r DIR --resume`` where DIR holds no run is refused in one
    line (it does not start a run with every default); with settings (a grid's command
    line) it starts the run."""
    (tmp_path / "empty").mkdir()
    for run in (tmp_path / "absent", tmp_path / "empty"):
        with pytest.raises(UserError, match="holds no run to resume.*drop --resume"):
            resume_mod.resolve({"run": str(run), "resume": True})
        assert cli(["train", "-r", str(run), "--resume", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds no run to resume" in err[0], err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
        assert not any((tmp_path / "empty").iterdir())
    _, _, how, _ = resume_mod.resolve({"run": str(tmp_path / "new"), "resume": True,
                                   "num_epochs": 2})
    assert how == "allow"
