"""SpectraSettings: one frozen spelling of a spectra computation, validated once when made,
refusals in the caller's spelling; the one table from the CLI flags, TrainConfig fields and
layer_spectra / SpectraTracker keywords onto it; contradictions refused."""

import argparse
import dataclasses
import inspect

import pytest

from layerhessians.cli import train as train_cmd
from layerhessians.cli.main import main
from layerhessians.errors import SettingError, UserError
from layerhessians.settings import MIN_ITERATIONS, SETTINGS, SpectraSettings
from layerhessians.training.config import HessianConfig, TrainConfig
from layerhessians.vocabulary import DEFAULT_ITERATIONS, DEFAULT_VECTORS


def test_defaults_are_the_papers_and_the_object_is_frozen():
    s = SpectraSettings()
    assert (s.iterations, s.vectors, s.seed, s.distribution, s.kind, s.bn_mode) == \
        (DEFAULT_ITERATIONS, DEFAULT_VECTORS, 0, "gaussian", "hessian", "eval")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.iterations = 4
    assert s.with_seed(7).seed == 7 and s.seed == 0


def test_values_are_canonicalised_when_made():
    s = SpectraSettings(kind="GGN", bn_mode="Train", reorthogonalize="none",
                        layer_method="EXACT", micro_batch_size="auto", reuse_graph="AUTO",
                        memory_budget=" 8GB ")
    assert (s.kind, s.bn_mode, s.reorthogonalize, s.layer_method) == \
        ("ggn", "train", False, "exact")
    assert (s.micro_batch_size, s.reuse_graph, s.memory_budget) == ("auto", "auto", "8GB")
    assert SpectraSettings(reorthogonalize="full").reorthogonalize is True
    assert SpectraSettings(reorthogonalize="Auto").reorthogonalize == "auto"


@pytest.mark.parametrize("values, api, cli", [
    ({"iterations": 0}, "iterations must be a positive integer",
     "--hessian-iterations must be an integer >= 2, got 0"),
    ({"iterations": 1}, "iterations must be an integer >= 2",
     "--hessian-iterations must be an integer >= 2, got 1"),
    ({"iterations": 4.0}, "iterations must be", "--hessian-iterations must be an integer"),
    ({"vectors": True}, "vectors must be a positive integer", "--hessian-vectors must be"),
    ({"kind": "hessain"}, "kind must be one of hessian, ggn, residual, ef; got 'hessain' "
                          "(did you mean 'hessian'?)", "unknown --hessian-kind 'hessain'"),
    ({"reorthogonalize": "maybe"}, "reorthogonalize must be True, False or 'auto'",
     "--hessian-reorthogonalize must be auto, full, none, got 'maybe'"),
    ({"layer_method": "exat"}, "layer_method must be one of", "unknown --layer-spectra 'exat'"),
    ({"micro_batch_size": 0}, "micro_batch_size must be a positive integer",
     "--hessian-batch-size must be an integer >= 1, got 0"),
    ({"memory_budget": "lots"}, "memory budget 'lots' is not a size",
     "--memory-budget: memory budget 'lots' is not a size"),
    ({"reuse_graph": "yes"}, "reuse_graph must be True, False or 'auto'", "reuse_graph"),
    ({"check_symmetry": 1}, "check_symmetry must be True or False", "check_symmetry"),
])
def test_refusals_name_the_setting_as_the_caller_spells_it(values, api, cli):
    with pytest.raises(SettingError) as err:
        SpectraSettings(**values)
    assert api in str(err.value)
    assert cli in err.value.spelled("cli")


def test_one_table_maps_every_interface_onto_the_fields():
    fields = SpectraSettings.field_names()
    assert list(SETTINGS) == list(fields)
    # every flag of the table is an option of `layerhessians train`
    parser = argparse.ArgumentParser()
    train_cmd.add_arguments(parser)
    options = {s for action in parser._actions for s in action.option_strings}
    assert {row.flag for row in SETTINGS.values() if row.flag} <= options
    # every TrainConfig path of the table exists and carries the value to the settings
    config = TrainConfig(seed=3, hessian_batch_size=16, memory_budget="1GB",
                         hessian=HessianConfig(iterations=12, vectors=2, kind="ggn",
                                               reorthogonalize="none", layer_method="slq"))
    s = SpectraSettings.from_config(config)
    assert (s.iterations, s.vectors, s.seed, s.kind, s.reorthogonalize, s.layer_method) == \
        (12, 2, 3, "ggn", False, "slq")
    assert (s.micro_batch_size, s.memory_budget, s.reuse_graph) == (16, "1GB", "auto")
    assert SpectraSettings.from_config(TrainConfig()).micro_batch_size == "auto"
    # layer_spectra's keywords (and so the tracker's) are the field names
    from layerhessians.spectra import layer_spectra

    keywords = set(inspect.signature(layer_spectra).parameters)
    assert set(fields) <= keywords


def test_a_validated_config_makes_its_settings_once():
    config = TrainConfig(hessian=HessianConfig(iterations=8, kind="GGN")).validated()
    made = config.spectra_settings()
    assert made.iterations == 8 and made.kind == "ggn"
    assert config.spectra_settings() is made
    assert config.validated().spectra_settings() is made  # compared, not made again
    config.hessian.iterations = 9  # a changed config makes new settings
    assert config.spectra_settings().iterations == 9


def test_trainer_refusals_use_the_cli_spelling():
    with pytest.raises(UserError, match="--hessian-iterations must be an integer >= 2"):
        TrainConfig(hessian=HessianConfig(iterations=1)).validated()
    with pytest.raises(UserError, match="--memory-budget"):
        TrainConfig(memory_budget="lots").validated()


def test_api_refuses_reorthogonalize_maybe():
    import torch

    from layerhessians.curvature import MatrixOperator
    from layerhessians.spectra import slq

    op = MatrixOperator(torch.eye(3, dtype=torch.float64))
    with pytest.raises(SettingError, match="reorthogonalize must be True, False or 'auto'"):
        slq(op, iterations=2, reorthogonalize="maybe")


@pytest.mark.parametrize("flags, message", [
    (["--no-layers", "--validate-layer-spectra"],
     "--no-layers contradicts --validate-layer-spectra"),
    (["--no-layers", "--layer-spectra", "exact"],
     "--no-layers contradicts --layer-spectra exact"),
])
def test_layer_settings_without_layers_are_refused(flags, message, tmp_path, capsys):
    with pytest.raises(UserError, match=message):
        TrainConfig(hessian=HessianConfig(layers=False, validate_layers="--validate" in
                                          flags[1], layer_method=flags[-1] if
                                          flags[-1] == "exact" else "auto")).validated()
    assert main(["train", "-r", str(tmp_path / "run"), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not (tmp_path / "run").exists()
    assert MIN_ITERATIONS == 2
