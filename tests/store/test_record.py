"""The run record (store/record.py): one config.json shape for every writer, and the
previous release's shapes read in one place.

Fixtures (written by the previous release's writers, commit 6cbe1e0):
``fixtures/legacy_trainer_config.json`` (``layerhessians train -n 2 --hessian-iterations 4
--examples_per_class 1 --threads 1 --learning_rate 0.01``) and ``fixtures/legacy_tracker_run``
(a SpectraTracker, ``unit="step"``, updates 0, 10, 20, built as :func:`_tracker` builds it).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from layerhessians.analysis.matching import block_dimensions
from layerhessians.errors import UserError
from layerhessians.settings import SpectraSettings
from layerhessians.store.record import (
    RECORD_VERSION,
    RunRecord,
    differences,
    from_legacy,
    read_record,
)
from layerhessians.store.run import load_run
from layerhessians.store.writer import RunStore
from layerhessians.tracking import SpectraTracker
from layerhessians.training.checkpoint import RESUME_IGNORES
from layerhessians.training.config import TrainConfig

FIXTURES = Path(__file__).parent / "fixtures"
SECTIONS = {"record", "facts", "spectra", "blocks", "training", "tracker"}


def _legacy_trainer() -> dict:
    return json.loads((FIXTURES / "legacy_trainer_config.json").read_text())


def _tracker(run_dir, **kwargs):
    """The tracker that wrote ``fixtures/legacy_tracker_run`` (same model, data, settings)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    return SpectraTracker(model, nn.CrossEntropyLoss(), (x, y), run_dir=run_dir,
                          blocks={"first": model[0].weight, "last": model[2].weight},
                          iterations=4, unit="step", model_name="MLP", dataset="random",
                          settings={"lr": 0.1}, reorthogonalize=False, **kwargs)


def test_legacy_trainer_record_is_converted_without_loss():
    old = _legacy_trainer()
    record = RunRecord.from_dict(old)
    assert record.writer == "train" and record.consecutive
    assert (record.model, record.dataset) == ("LeNet", "Digits")
    assert record.block_names == old["blocks"] and record.block_dims == old["block_dims"]
    assert record.spectra == SpectraSettings(
        iterations=4, seed=0, reorthogonalize=True, micro_batch_size="auto",
        reuse_graph="auto").to_dict()
    assert record.facts["threads"] == 1 and record.facts["dataset_checksum"] == \
        old["dataset_checksum"]
    # no value is spelled twice: the spectra values are not in the training section
    assert "iterations" not in record.training["hessian"] and "seed" not in record.training
    # the settings read back are those the old reader read from the flat dict
    assert TrainConfig.from_dict(record.training_settings()) == TrainConfig.from_dict(old)
    # written in the new shape, read back: the same record
    again = RunRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert set(record.to_dict()) == SECTIONS and record.to_dict()["record"] == RECORD_VERSION
    assert again == record and differences(record, again) == []


def test_settings_added_later_take_their_legacy_values():
    old = _legacy_trainer()
    for key in ("layer_method", "validate_layers"):
        del old["hessian"][key]
    record = from_legacy(old)
    assert record.spectra["layer_method"] == "slq"  # runs before it had SLQ layer spectra
    assert record.training_settings()["hessian"]["validate_layers"] is False


def test_a_new_trainer_record_compares_equal_to_its_legacy_self():
    """Resuming a run of the previous release with its own settings finds no difference."""
    old = from_legacy(_legacy_trainer())
    config = TrainConfig.from_dict(old.training_settings()).validated()
    spectra = SpectraSettings.from_dict({**config.spectra_settings().to_dict(),
                                         "reorthogonalize": True})
    new = RunRecord.make({**old.facts, "host": "elsewhere", "start_time": "later"}, spectra,
                         old.blocks, training=config.to_dict())
    assert differences(old, new, RESUME_IGNORES) == []
    changed = RunRecord.make(new.facts, spectra.with_seed(3), old.blocks,
                             training={**config.to_dict(), "learning_rate": 0.5})
    assert differences(old, changed, RESUME_IGNORES) == ["seed: 0 -> 3",
                                                         "learning_rate: 0.01 -> 0.5"]


def test_a_training_field_added_later_flows_into_the_record():
    spectra = SpectraSettings()
    record = RunRecord.make({"writer": "train"}, spectra, {"full": 3},
                            training={**TrainConfig().to_dict(), "trace_penalty": 0.25})
    assert record.training["trace_penalty"] == 0.25
    assert record.training_settings()["trace_penalty"] == 0.25


def test_legacy_tracker_run_is_read_and_resumed(tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURES / "legacy_tracker_run", run_dir)
    run = load_run(run_dir)
    record = run.record
    assert record.writer == "SpectraTracker" and not record.consecutive
    assert record.tracker == {"unit": "step", "block_params": {"first": ["0.weight"],
                                                               "last": ["2.weight"]},
                              "settings": {"lr": 0.1}}
    assert record.spectra["reorthogonalize"] is False and record.spectra["iterations"] == 4
    assert run.epochs == [0, 10, 20] and run.blocks == ["full", "first", "last"]
    assert block_dimensions(record) == {"full": 23, "first": 12, "last": 6}
    # the same tracker continues the old record (same settings, blocks and data)
    with _tracker(run_dir, resume=True) as tracker:
        assert tracker.completed == 20
        tracker.update(step=30)
    assert load_run(run_dir).epochs == [0, 10, 20, 30]
    stored = json.loads((run_dir / "config.json").read_text())
    assert set(stored) == SECTIONS and stored["tracker"]["unit"] == "step"
    # another setting is refused, naming it
    with pytest.raises(UserError, match=r"different settings \(vectors: 1 -> 2\)"):
        _tracker(run_dir, resume=True, vectors=2)


def test_trainer_and_tracker_records_have_the_same_sections(tmp_path):
    with _tracker(tmp_path / "t") as tracker:
        tracker.update(step=0)
    tracked = json.loads((tmp_path / "t" / "config.json").read_text())
    assert set(tracked) == SECTIONS and tracked["training"] is None
    assert list(tracked["blocks"]) == ["full", "first", "last"]
    assert tracked["spectra"] == SpectraSettings(iterations=4, reorthogonalize=False).to_dict()
    trained = RunRecord.from_dict(_legacy_trainer()).to_dict()
    assert set(trained) == SECTIONS and trained["tracker"] is None
    assert set(tracked["facts"]) & set(trained["facts"]) >= {
        "writer", "model", "dataset", "indices", "num_params", "hessian_examples", "device",
        "threads", "versions", "host", "start_time"}


def test_a_damaged_record_is_refused_in_one_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"record": RECORD_VERSION, "facts": [], "spectra": {},
                                "blocks": {}, "training": None, "tracker": None}))
    with pytest.raises(UserError, match="is not a run record: .*'facts' section") as err:
        read_record(path)
    assert "\n" not in str(err.value)
    store_dir = tmp_path / "run"
    with RunStore.create(store_dir, RunRecord.from_dict(_legacy_trainer())):
        pass
    assert read_record(store_dir / "config.json").model == "LeNet"
