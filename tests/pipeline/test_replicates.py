"""Replicated runs: the original's names (``...,run1`` .. ``runR``) and seeds seed..seed+R-1."""

import pytest

from layerhessians.errors import UserError
from layerhessians.pipeline.grid import GridRun, flags_to_config
from layerhessians.pipeline.replicates import (
    replicate_base,
    replicate_configs,
    replicate_grid,
    replicate_index,
    replicate_name,
)
from layerhessians.store.record import RunRecord
from layerhessians.training.config import HessianConfig, TrainConfig


def test_names_follow_the_original():
    assert replicate_name("model=LeNet,dataset=MNIST,te", 1) == "model=LeNet,dataset=MNIST,te,run1"
    # a seed name already ending in run1 is renumbered, not extended
    assert replicate_name("model=LeNet,dataset=MNIST,te,run1", 3) == \
        "model=LeNet,dataset=MNIST,te,run3"
    assert replicate_base("model=VGG11_bn,dataset=SVHN,te,run12") == "model=VGG11_bn,dataset=SVHN,te"
    assert replicate_index("x,run12") == 12 and replicate_index("x,runs") is None
    for bad in (0, -1, 1.0, True):
        with pytest.raises(UserError, match="replicate index"):
            replicate_name("x", bad)


def test_configs_take_consecutive_training_seeds():
    config = TrainConfig(model="LeNet", dataset="MNIST5k", seed=7, learning_rate=0.01,
                         hessian=HessianConfig(subset_seed=3, iterations=32))
    out = replicate_configs(config, 4)
    assert [n for n, _ in out] == [f"model=LeNet,dataset=MNIST5k,te,run{k}" for k in (1, 2, 3, 4)]
    assert [c.seed for _, c in out] == [7, 8, 9, 10]
    assert all(c.hessian.subset_seed == 3 for _, c in out)
    # nothing else changes
    for _, c in out:
        assert c.to_dict() | {"seed": 0} == config.to_dict() | {"seed": 0}
    assert out[0][1] == config  # replicate 1 is the setting itself


def test_configs_vary_the_subset_seed_on_request():
    config = TrainConfig(seed=2, hessian=HessianConfig(subset_seed=5))
    out = replicate_configs(config, 3, vary_subset=True, base_name="mine,run1")
    assert [n for n, _ in out] == ["mine,run1", "mine,run2", "mine,run3"]
    assert [(c.seed, c.hessian.subset_seed) for _, c in out] == [(2, 5), (3, 6), (4, 7)]
    assert config.hessian.subset_seed == 5  # the input is not modified


@pytest.mark.parametrize("bad", [0, -2, 1.5, "3", True])
def test_replicates_must_be_a_positive_integer(bad):
    with pytest.raises(UserError, match="--replicates"):
        replicate_configs(TrainConfig(), bad)


def test_grid_expansion_keeps_one_replicate_as_today_and_seeds_the_others():
    runs = [GridRun("model=LeNet,dataset=Digits,te,run1", {"learning_rate": 0.01}),
            GridRun("other", {"seed": 10, "num_epochs": 2})]
    assert replicate_grid(runs, 1) == runs
    out = replicate_grid(runs, 2, vary_subset=True)
    assert [r.run for r in out] == ["model=LeNet,dataset=Digits,te,run1",
                                    "model=LeNet,dataset=Digits,te,run2", "other,run1",
                                    "other,run2"]
    configs = [flags_to_config(r.flags) for r in out]
    assert [(c.seed, c.hessian.subset_seed) for c in configs] == [(0, 0), (1, 1), (10, 0),
                                                                  (11, 1)]
    assert configs[0].learning_rate == 0.01 and configs[3].num_epochs == 2


def test_grid_expansion_refuses_a_grid_that_already_holds_replicates():
    runs = [GridRun("a,run1", {}), GridRun("a,run2", {"seed": 1})]
    with pytest.raises(UserError, match="twice"):
        replicate_grid(runs, 2)


def test_sweep_trains_replicates_and_pools_them(tmp_path, capsys):
    import json

    from layerhessians.cli.main import main

    grid = tmp_path / "grid.json"
    flags = {"num_epochs": 1, "dataset": "Digits", "hessian_iterations": 8,
             "examples_per_class": 1, "batch_size": 256}
    grid.write_text(json.dumps({"runs": [{"run": "a", "flags": flags}]}))
    argv = ["sweep", str(grid), "--root", str(tmp_path), "--threads", "1", "--no-plots",
            "--replicates", "2", "--vary-subset", "--train-args=--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    recorded = [RunRecord.from_dict(json.loads((tmp_path / f"a,run{k}" / "config.json")
                                               .read_text())).training_settings()
                for k in (1, 2)]
    assert [(c["seed"], c["hessian"]["subset_seed"]) for c in recorded] == [(0, 0), (1, 1)]
    assert "sweep: pooled: LeNet+Digits [S1, 2 replicates]: over training, " in out
    assert "parameter-share mixture" in out
    # complete replicates are skipped
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "a,run1: complete" in out and "a,run2: complete" in out
    # the seeds are the replicates': --train-args may not set them
    assert main([*argv, "--train-args=--seed 3"]) == 2
    assert "--train-args sets seed" in capsys.readouterr().err
    # --vary-subset without replicates would vary nothing
    one = [a for a in argv if a not in ("--replicates", "2")]
    assert main([*one, "--dry-run"]) == 2
    assert "--vary-subset varies the Hessian subset across replicates: add --replicates" in \
        capsys.readouterr().err
