"""The run store against directories it did not write or half wrote, damaged files, names
that leave their place and operating-system errors (issue 12). Every case is built in a
temporary directory; kills are simulated by an exception at the exact step (the state left
on disk is the same as after SIGKILL there, since every step is one atomic file operation)."""

import errno
import json
import os
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from layerhessians.cli.main import main
from layerhessians.errors import UserError
from layerhessians.store import checkpoints, legacy, manifest, record, writer
from layerhessians.store.checkpoints import COMMITTED_KEY
from layerhessians.store.names import JOURNAL, MANIFEST, run_path, safe_child
from layerhessians.store.resume import resume_source
from layerhessians.store.run import load_run
from layerhessians.store.writer import RunStore


class FakeMeasure:
    def __init__(self, nodes, weights):
        self.nodes, self.weights = np.asarray(nodes, float), np.asarray(weights, float)

    def to_frame(self):
        return pd.DataFrame({"vector": 0, "node": self.nodes, "weight": self.weights})


BLOCKS = ["full", "conv1.weight", "conv2.weight"]
CONFIG = {"model": "LeNet", "dataset": "Digits", "learning_rate": 0.05, "num_epochs": 4,
          "blocks": BLOCKS, "start_time": "t0", "hessian": {"init": True},
          "versions": {"layerhessians": "test"}}


class Crash(Exception):
    """Stands for SIGKILL at one step."""


def state(epoch):
    return {"model": {"w": torch.full((3,), float(epoch))},
            "optimizer": {"state": {0: {"momentum_buffer": torch.ones(3) * epoch}},
                          "param_groups": [{"lr": 0.05, "params": [0]}]},
            "scheduler": {"last_epoch": epoch}, "rng": {"torch": torch.get_rng_state()}}


def commit(store, epoch):
    spectra = {b: FakeMeasure([-1.0 + i, epoch + 0.25], [0.5, 0.5]) for i, b in enumerate(BLOCKS)}
    row = {"lr": 0.05, "train_loss": 1.0 / (epoch + 1), "train_acc": 0.5, "test_loss": 1.5,
           "test_acc": 0.4, "train_seconds": 0.1, "spectra_seconds": 0.2}
    store.commit_epoch(epoch, row, spectra, state(epoch))


def make_run(path, epochs=(0, 1, 2)):
    with RunStore.create(path, CONFIG) as store:
        for epoch in epochs:
            commit(store, epoch)
    return path


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and text.strip()
    return text


def strip_commit_record(run):
    """The checkpoint as an earlier version wrote it (no committed CSV record, no digest)."""
    path = run / "checkpoints" / "last.pt"
    obj = torch.load(path, weights_only=True)
    obj.pop(COMMITTED_KEY)
    obj.pop(checkpoints.DIGEST_KEY)
    torch.save(obj, path)


# ----------------------------------------------------------------------------- kind 1
def test_overwrite_killed_midway_is_finished_on_next_open(tmp_path, monkeypatch):
    run = make_run(tmp_path / "ow")
    real_unlink = type(run).unlink
    calls = []

    def dying_unlink(self, *args, **kwargs):
        if self.name == "last.pt":  # killed just before the checkpoint is removed
            raise Crash
        calls.append(self.name)
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(type(run), "unlink", dying_unlink)
    with pytest.raises(Crash):
        RunStore.create(run, {**CONFIG, "learning_rate": 0.1}, overwrite=True)
    monkeypatch.undo()
    assert (run / JOURNAL).exists() and (run / "checkpoints" / "last.pt").exists()
    assert "metrics.csv" in calls
    with pytest.raises(UserError, match="unfinished operation"):
        load_run(run)
    # --resume there: the old run was being replaced; finish that and refuse
    with pytest.raises(UserError, match="holds no run to resume") as err:
        RunStore.create(run, CONFIG, resume=True)
    one_line(err)
    assert not (run / JOURNAL).exists() and not (run / "checkpoints" / "last.pt").exists()
    # the same --overwrite command again: a new run, nothing of the old one
    with RunStore.create(run, {**CONFIG, "learning_rate": 0.1}, overwrite=True) as store:
        assert store.completed_epoch is None and store.metrics.empty and store.spectra.empty
        assert store.record.training["learning_rate"] == 0.1


def test_a_gap_in_the_epochs_is_refused_for_a_trainer_run_only(tmp_path):
    """A trainer's run records every epoch: a gap is refused on resume. A SpectraTracker's
    run (config source) may skip indices, which must still increase up to the checkpoint's."""
    trainer = make_run(tmp_path / "trainer", epochs=(0, 1, 3))
    with pytest.raises(UserError, match="does not hold each epoch up to the checkpoint's "
                                        r"epoch 3 once \(holds 0..3 \(3 rows\)\)") as err:
        RunStore.create(trainer, CONFIG, resume=True)
    assert "metrics.csv" in one_line(err)
    tracked = {**CONFIG, "source": record.TRACKER}  # the old tracker's shape
    with RunStore.create(tmp_path / "tracker", tracked) as store:
        for epoch in (0, 10, 20):
            commit(store, epoch)
    with RunStore.create(tmp_path / "tracker", tracked, resume=True) as store:
        assert store.completed_epoch == 20
        commit(store, 30)
    assert load_run(tmp_path / "tracker").epochs == [0, 10, 20, 30]
    # without the committed bytes (an earlier version's checkpoint), the coverage check
    # alone refuses an index held twice, or a record that stops before the checkpoint's
    strip_commit_record(tmp_path / "tracker")
    metrics = tmp_path / "tracker" / "metrics.csv"
    header, *rows = metrics.read_bytes().splitlines(keepends=True)
    for damaged in ([rows[0], rows[1], rows[1], *rows[2:]], rows[:-1]):
        metrics.write_bytes(b"".join([header, *damaged]))
        with pytest.raises(UserError, match="does not hold increasing indices, each once, "
                                            "ending at the checkpoint's 30") as err:
            RunStore.create(tmp_path / "tracker", tracked, resume=True)
        assert str(metrics) in one_line(err)


def test_creation_killed_before_config_is_undone(tmp_path, monkeypatch):
    run = tmp_path / "new"
    real = manifest.write_json

    def dying(path, obj):
        if path.name == "config.json":
            raise Crash
        return real(path, obj)

    monkeypatch.setattr(writer, "write_json", dying)
    with pytest.raises(Crash):
        RunStore.create(run, CONFIG)
    monkeypatch.undo()
    assert (run / JOURNAL).exists() and (run / "checkpoints").is_dir()
    with pytest.raises(UserError, match="holds no run to resume"):
        RunStore.create(run, CONFIG, resume=True)
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # undone
    with RunStore.create(run, CONFIG) as store:  # starting it works
        commit(store, 0)


def test_creation_killed_after_config_is_completed(tmp_path, monkeypatch):
    run = tmp_path / "new"
    monkeypatch.setattr(RunStore, "_end_journal", lambda self: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        RunStore.create(run, CONFIG)
    monkeypatch.undo()
    (run / "images").rmdir()
    with RunStore.create(run, CONFIG, resume=True) as store:
        assert store.completed_epoch is None and (run / "images").is_dir()
        assert any("creation" in note for note in store.notes)
    assert not (run / JOURNAL).exists()


def test_checkpoint_without_config_is_refused(tmp_path):
    run = make_run(tmp_path / "r")
    (run / "config.json").unlink()
    for kwargs in ({"resume": True}, {}, {"resume": "allow"}):
        with pytest.raises(UserError, match="checkpoints/last.pt but no config.json") as err:
            RunStore.create(run, {**CONFIG, "learning_rate": 0.01}, **kwargs)
        one_line(err)
    assert (run / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize("where", ["empty", "missing"])
def test_resume_without_a_run_is_refused(tmp_path, where):
    run = tmp_path / "r"
    if where == "empty":
        run.mkdir()
    with pytest.raises(UserError, match="holds no run to resume.*drop --resume"):
        RunStore.create(run, CONFIG, resume=True)
    assert not (run / "config.json").exists()
    assert run.exists() == (where == "empty")  # a refused --resume creates nothing
    with RunStore.create(run, CONFIG, resume="allow") as store:  # grids: continue or start
        assert store.completed_epoch is None


def test_cli_resume_alone_in_an_empty_directory_is_refused(tmp_path, capsys):
    (tmp_path / "e").mkdir()
    assert main(["train", "-r", str(tmp_path / "e"), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no run to resume" in err[0]
    assert not (tmp_path / "e" / "config.json").exists()


def _damage(run, name, how):
    path = run / name
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    if how == "emptied":
        path.write_text("")
    elif how == "cut":
        path.write_text(text[:-7])
    elif how == "banana":  # a non-number in a numeric column (spectra: weight; metrics: last)
        header = lines[0].rstrip("\n").split(",")
        column = header.index("weight") if "weight" in header else len(header) - 1
        cells = lines[-2].rstrip("\n").split(",")
        cells[column] = "banana"
        lines[-2] = ",".join(cells) + "\n"
        path.write_text("".join(lines))
    elif how == "half_blocks":  # the rows of one block of the last epoch gone
        last = lines[-1].split(",")[0]
        path.write_text("".join(line for line in lines
                                if not (line.startswith(last + ",conv2"))))
    elif how == "lost_epoch":  # a whole row of the middle epoch gone
        path.write_text("".join(line for line in lines if not line.startswith("1,")))
    elif how == "missing_column":
        frame = pd.read_csv(path).drop(columns=["weight" if "spectra" in name else "epoch"])
        frame.to_csv(path, index=False)


CASES = [("metrics.csv", "emptied"), ("metrics.csv", "cut"), ("metrics.csv", "lost_epoch"),
         ("spectra.csv", "cut"), ("spectra.csv", "banana"), ("spectra.csv", "half_blocks"),
         ("spectra.csv", "missing_column"), ("metrics.csv", "missing_column")]


@pytest.mark.parametrize("name,how", CASES)
def test_damaged_csv_refused_on_resume(tmp_path, name, how):
    run = make_run(tmp_path / "r")
    _damage(run, name, how)
    with pytest.raises(UserError) as err:
        RunStore.create(run, CONFIG, resume=True)
    text = one_line(err)
    assert str(run / name) in text and ("--overwrite" in text or "restore" in text)


EXPECTED = {"emptied": "does not hold each epoch", "cut": "middle of a row",
            "lost_epoch": "does not hold each epoch", "banana": "non-number 'banana'",
            "half_blocks": "exactly the run's blocks", "missing_column": "misses the column"}


@pytest.mark.parametrize("name,how", CASES)
def test_damaged_csv_refused_without_commit_record(tmp_path, name, how):
    """Checkpoints of an earlier version (no record of the committed bytes): the parse and
    coverage checks alone catch each damage."""
    run = make_run(tmp_path / "r")
    strip_commit_record(run)
    _damage(run, name, how)
    with pytest.raises(UserError, match=EXPECTED[how]) as err:
        RunStore.create(run, CONFIG, resume=True)
    assert str(run / name) in one_line(err)


def test_rows_after_checkpoint_cut_back_exactly(tmp_path):
    run = make_run(tmp_path / "r")
    before = {n: (run / n).read_bytes() for n in ("metrics.csv", "spectra.csv")}
    with RunStore.create(run, CONFIG, resume=True) as store:  # epoch 3 written, not committed
        store.commit_epoch(3, {"lr": 0.05}, {b: FakeMeasure([1.0], [1.0]) for b in BLOCKS})
    with RunStore.create(run, CONFIG, resume=True) as store:
        assert store.completed_epoch == 2
    assert {n: (run / n).read_bytes() for n in before} == before


@pytest.mark.parametrize("offset", [0.05, 0.3, 0.5, 0.7, 0.95])
def test_garbled_checkpoint_is_one_line(tmp_path, offset, capsys):
    run = make_run(tmp_path / "r")
    path = run / "checkpoints" / "last.pt"
    data = bytearray(path.read_bytes())
    start = int(offset * (len(data) - 64))
    data[start:start + 64] = bytes((b ^ 0x5A) for b in data[start:start + 64])
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="not a readable checkpoint this tool wrote") as err:
        RunStore.create(run, CONFIG, resume=True)
    text = one_line(err)
    assert "diverged" not in text and "weights_only" not in text


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_checkpoint_is_one_line_without_advice(tmp_path, capsys):
    run = make_run(tmp_path / "r")
    with open(run / "checkpoints" / "last.pt", "wb") as fh:
        torch.save({"epoch": 2, "model": Evil()}, fh)
    with pytest.raises(UserError, match="not a readable checkpoint this tool wrote") as err:
        RunStore.create(run, CONFIG, resume=True)
    text = one_line(err)
    assert "weights_only" not in text and "False" not in text
    with open(run / "checkpoints" / "last.pt", "wb") as fh:
        pickle.dump(Evil(), fh)
    with pytest.raises(UserError, match="not a readable checkpoint"):
        _ = RunStore(run).completed_epoch


def test_leftover_temporaries_removed_on_open(tmp_path):
    run = make_run(tmp_path / "r")
    ours = [run / ".metrics.csv.ab12cd_9.tmp", run / "checkpoints" / ".last.pt.zz99yy00.tmp"]
    theirs = [run / ".notes.tmp", run / "draft.tmp", run / "images" / ".x.abcdefghi.tmp"]
    for p in ours + theirs:
        p.write_text("x")
    with RunStore.create(run, CONFIG, resume=True):
        pass
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)


# ----------------------------------------------------------------------------- kind 2
@pytest.mark.parametrize("name,content,expected", [
    ("config.json", b"{not json", "is not valid JSON"),
    ("config.json", b"[1, 2]", "holds a JSON list"),
    ("config.json", b'{"blocks": "full"}', "'blocks' entry"),
    ("config.json", b"\xff\xfe\x00", "not UTF-8"),
    ("metrics.csv", b"lr,train_loss\n0.1,2.0\n", "misses the column epoch"),
    ("spectra.csv", b"epoch,block,vector,node\n0,full,0,1.0\n", "misses the column weight"),
    ("spectra.csv", b"epoch,block,vector,node,weight\n0,full,0,\xff\xfe,1\n", "not UTF-8"),
    ("spectra.csv", b"epoch,block,vector,node,weight\n0,full,0,1.0,1.0,9,9\n", "well-formed"),
    ("spectra.csv", b"epoch,block,vector,node,weight\nx,full,0,1.0,1.0\n", "non-number 'x'"),
    ("metrics.csv", b"epoch,lr\n0,0.1\n1.5,0.1\n", "non-integer epoch"),
])
def test_readers_give_one_line_naming_the_file(tmp_path, name, content, expected, capsys):
    run = make_run(tmp_path / "r")
    (run / name).write_bytes(content)
    with pytest.raises(UserError, match=expected) as err:
        load_run(run)
    assert str(run / name) in one_line(err)
    assert main(["plot", "-r", str(run)]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and name in err_lines[0]


# ----------------------------------------------------------------------------- kind 3
@pytest.mark.parametrize("name", ["../escaped", "/tmp/abs", "a/b", "a\\b", "", "  ", ".",
                                  "..", "x..y", None, 3, "nul\0"])
def test_safe_child_refuses_names_that_leave_root(tmp_path, name):
    with pytest.raises(UserError, match="not a plain folder name") as err:
        safe_child(tmp_path, name)
    one_line(err)


def test_safe_child_accepts_plain_names(tmp_path):
    for name in ("run1", "model=LeNet,dataset=MNIST,lr=0.01", ".hidden-ok", "a.b"):
        assert safe_child(tmp_path, name) == tmp_path / name


def test_legacy_export_refuses_block_names_with_separators(tmp_path):
    run = make_run(tmp_path / "r")
    frame = pd.read_csv(run / "spectra.csv")
    frame.loc[frame["block"] == "conv2.weight", "block"] = "../../escaped"
    frame.to_csv(run / "spectra.csv", index=False)
    with pytest.raises(UserError, match="not a parameter name") as err:
        legacy.export_legacy(run)
    one_line(err)
    assert not list(tmp_path.rglob("*escaped*")) and not (run / "ckpt").exists()


def test_legacy_export_writes_inside_run(tmp_path):
    run = make_run(tmp_path / "r")
    written = legacy.export_legacy(run)
    assert written and all(p.resolve().parent == (run / "ckpt").resolve() for p in written)
    # the store wrote them, so --overwrite removes them
    with RunStore.create(run, CONFIG, overwrite=True):
        assert not (run / "ckpt").exists()


def test_lock_symlink_is_not_followed(tmp_path):
    run = make_run(tmp_path / "r")
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (run / ".lock").unlink()
    (run / ".lock").symlink_to(target)
    with pytest.raises(UserError, match="symbolic link") as err:
        RunStore.create(run, CONFIG, resume=True)
    one_line(err)
    assert target.read_text() == "keep me"


def test_overwrite_refuses_a_users_own_files(tmp_path):
    run = tmp_path / "mine"
    (run / "images").mkdir(parents=True)
    (run / "logs").mkdir()
    (run / "config.json").write_text('{"my": "settings"}')
    (run / "images" / "loss.png").write_bytes(b"my figure")
    (run / "logs" / "notes.log").write_text("my log")
    for kwargs in ({"overwrite": True}, {}, {"resume": True}):
        with pytest.raises(UserError, match="did not write") as err:
            RunStore.create(run, CONFIG, **kwargs)
        assert "config.json" in one_line(err)
    assert (run / "config.json").read_text() == '{"my": "settings"}'
    assert (run / "images" / "loss.png").read_bytes() == b"my figure"
    assert not (run / MANIFEST).exists()


def test_overwrite_keeps_user_files_inside_the_store_folders(tmp_path):
    run = tmp_path / "r"
    (run / "images").mkdir(parents=True)
    (run / "images" / "cat.png").write_bytes(b"cat")  # the user's, before the run
    make_run(run)
    (run / "images" / "loss.png").write_bytes(b"figure")  # as the trainer writes it
    (run / "checkpoints" / "mine.txt").write_text("notes")  # the user's, during the run
    (run / "notes.txt").write_text("notes")
    with RunStore.create(run, {**CONFIG, "learning_rate": 0.1}, overwrite=True) as store:
        assert store.completed_epoch is None
    assert (run / "images" / "cat.png").read_bytes() == b"cat"
    assert (run / "checkpoints" / "mine.txt").exists() and (run / "notes.txt").exists()
    assert not (run / "images" / "loss.png").exists()


def test_run_of_an_earlier_version_is_adopted(tmp_path):
    run = make_run(tmp_path / "r")
    (run / MANIFEST).unlink()
    with RunStore.create(run, {**CONFIG, "learning_rate": 0.1}, overwrite=True):
        pass
    assert not (run / "checkpoints" / "last.pt").exists()


# ----------------------------------------------------------------------------- kind 4
def test_proc_path_is_one_line(tmp_path):
    with pytest.raises(UserError, match="cannot create the run directory /proc/lh_run") as err:
        RunStore.create("/proc/lh_run", CONFIG)
    one_line(err)


def test_file_in_the_way_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        RunStore.create(tmp_path / "f", CONFIG)
    with pytest.raises(UserError, match="cannot create the run directory") as err:
        RunStore.create(tmp_path / "f" / "sub", CONFIG)
    one_line(err)
    with pytest.raises(UserError, match="cannot write") as err:  # e.g. match --out FILE
        manifest.write_csv(tmp_path / "f" / "x.csv", pd.DataFrame({"a": [1]}))
    one_line(err)


def test_permission_errors_are_one_line(tmp_path, monkeypatch):
    run = make_run(tmp_path / "r")
    real = os.open

    def denied(path, flags, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(UserError, match="cannot lock .*Permission denied.*permissions") as err:
        RunStore.create(run, CONFIG, resume=True)
    one_line(err)
    monkeypatch.undo()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    with RunStore.create(run, CONFIG, resume=True) as store:
        monkeypatch.setattr(os, "open", read_only)  # the atomic writer's temporary file
        with pytest.raises(UserError, match="cannot write .*Read-only file system") as err:
            commit(store, 3)
        one_line(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_parent_is_one_line(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(UserError, match="Permission denied") as err:
            RunStore.create(parent / "r", CONFIG)
        one_line(err)
    finally:
        parent.chmod(0o755)


# ----------------------------------------------------------------------------- kind 5
def test_empty_run_path_is_refused(tmp_path):
    for value in ("", "  ", None):
        with pytest.raises(UserError, match="empty"):
            run_path(value)
    with pytest.raises(UserError, match="empty"):
        RunStore("")
    with pytest.raises(UserError, match="names nothing"):
        resume_source("")


def test_resume_from_a_weights_file_is_refused_clearly(tmp_path, capsys):
    run = make_run(tmp_path / "r")
    with RunStore.create(run, CONFIG, resume=True) as store:
        store.save_weights(1, state(1)["model"])
    weights = run / "checkpoints" / "epoch_0001.pt"
    with pytest.raises(UserError, match="holds only model weights") as err:
        resume_source(weights)
    one_line(err)
    assert resume_source(run / "checkpoints" / "last.pt") == (run, None)
    assert resume_source(run) == (run, None)
    assert main(["train", "--resume", str(weights)]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "only model weights" in err_lines[0]
    assert main(["train", "-r", ""]) == 2
    assert "empty" in capsys.readouterr().err


def test_rewind_to_a_full_state_checkpoint(tmp_path):
    run = tmp_path / "r"
    with RunStore.create(run, CONFIG) as store:
        for epoch in (0, 1, 2, 3):
            commit(store, epoch)
            checkpoints.save_torch(run / "checkpoints" / f"epoch_{epoch:04d}.pt",
                                   {**state(epoch), "epoch": epoch})
    source = run / "checkpoints" / "epoch_0001.pt"
    assert resume_source(source) == (run, source)
    with RunStore.create(run, CONFIG, resume=True, checkpoint=source) as store:
        assert store.completed_epoch == 1
        commit(store, 2)
        commit(store, 3)
    result = load_run(run)
    assert list(result.metrics["epoch"]) == [0, 1, 2, 3] and result.epochs == [0, 1, 2, 3]
    assert not (run / "checkpoints" / "epoch_0003.pt").exists()
    # a checkpoint of another run is refused
    other = make_run(tmp_path / "o")
    with pytest.raises(UserError, match="not a checkpoint of the run"):
        RunStore.create(other, CONFIG, resume=True, checkpoint=source)


def test_rewind_killed_midway_is_redone(tmp_path, monkeypatch):
    run = tmp_path / "r"
    with RunStore.create(run, CONFIG) as store:
        for epoch in (0, 1, 2):
            commit(store, epoch)
        checkpoints.save_torch(run / "checkpoints" / "epoch_0001.pt", {**state(1), "epoch": 1})
    real = checkpoints.save_torch

    def dying(path, obj):
        if path.name == "last.pt":
            raise Crash
        return real(path, obj)

    monkeypatch.setattr(writer, "save_torch", dying)
    with pytest.raises(Crash):
        RunStore.create(run, CONFIG, resume=True, checkpoint=run / "checkpoints" / "epoch_0001.pt")
    monkeypatch.undo()
    assert (run / JOURNAL).exists()
    with RunStore.create(run, CONFIG, resume=True) as store:
        assert store.completed_epoch == 1 and list(store.metrics["epoch"]) == [0, 1]


# ----------------------------------------------------------------------------- durability
def test_commit_fsyncs_files_and_folders(tmp_path, monkeypatch):
    run = make_run(tmp_path / "r", epochs=(0,))
    synced = []
    real = os.fsync

    def recording(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    with RunStore.create(run, CONFIG, resume=True) as store:
        synced.clear()
        commit(store, 1)
    folders = [p for p in synced if os.path.isdir(p)]
    files = [os.path.basename(p) for p in synced if not os.path.isdir(p)]
    for name in ("metrics.csv", "spectra.csv", "last.pt"):
        assert any(f.startswith(f".{name}.") for f in files), (name, files)
    assert str(run.resolve()) in folders and str((run / "checkpoints").resolve()) in folders
    assert json.loads((run / MANIFEST).read_text())["files"]


# ----------------------------------------------------------------------------- end to end
def _train(run, *extra):
    return main(["train", "-r", str(run), "-d", "digits", "-m", "LeNet", "-n", "2", "-b", "128",
                 "--hessian-iterations", "4", "--examples_per_class", "1", "--no-layers",
                 "--no-progress", *extra])


def test_cli_overwrite_killed_then_rerun_trains_afresh(tmp_path, monkeypatch, capsys):
    run = tmp_path / "ow"
    assert _train(run, "-lr", "0.05") == 0
    real_unlink = type(run).unlink

    def dying_unlink(self, *args, **kwargs):
        if self.name == "last.pt":
            raise Crash
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(type(run), "unlink", dying_unlink)
    with pytest.raises(Crash):
        _train(run, "-lr", "0.02", "--overwrite")
    monkeypatch.undo()
    capsys.readouterr()
    assert _train(run, "-lr", "0.02", "--overwrite") == 0
    assert "is complete" not in capsys.readouterr().out
    result = load_run(run)
    assert list(result.metrics["epoch"]) == [1, 2] and result.record.training["learning_rate"] == 0.02
    assert RunStore(run).completed_epoch == 2

    # garbled checkpoint: one line, never "diverged"
    path = run / "checkpoints" / "last.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = b"\x00" * 64
    path.write_bytes(bytes(data))
    assert _train(run, "-lr", "0.02", "--resume", "-n", "3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a readable checkpoint this tool wrote" in err[0]
    assert "diverged" not in err[0]


def test_cli_checkpoint_without_config_is_refused(tmp_path, capsys):
    run = tmp_path / "r"
    assert _train(run, "-lr", "0.05") == 0
    (run / "config.json").unlink()
    capsys.readouterr()
    assert _train(run, "-lr", "0.01", "-n", "3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "but no config.json" in err[0]
    assert main(["train", "-r", str(run), "--resume"]) == 2
    assert "no config.json" in capsys.readouterr().err


# ------------------------------------------------------------------ issue 22: nothing lost
def snapshot(root):
    """Every entry under ``root`` (links as their target) with its bytes."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = ("link", os.readlink(path))
            elif os.path.isfile(path):
                with open(path, "rb") as fh:
                    out[rel] = fh.read()
            else:
                out[rel] = "dir"
    return out


def without_lock(snap):
    return {k: v for k, v in snap.items() if k != ".lock"}


def forge(run, entry):
    """A journal with a valid digest (as the store's own writer would make it)."""
    from layerhessians.store import journal
    journal.begin(run, entry)


GARBAGE = {
    "bytes": b"\x00garbage\xff",
    "empty": b"",
    "list": b"[]",
    "no-digest": b'{"op": "overwrite", "pid": 1}',
    "unknown-op": b'{"op": "nuke", "pid": 1, "digest": "0"}',
    "deep": b"[" * 100_000,
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_damaged_journal_is_refused_and_nothing_deleted(tmp_path, kind):
    """Issue 22 item 1: a journal the store cannot validate deletes nothing."""
    run = make_run(tmp_path / "r")
    (run / JOURNAL).write_bytes(GARBAGE[kind])
    before = without_lock(snapshot(run))
    for kwargs in ({"resume": True}, {"resume": "allow"}, {"overwrite": True}):
        with pytest.raises(UserError) as err:
            RunStore.create(run, CONFIG, **kwargs)
        assert JOURNAL in one_line(err) and "nothing was changed" in str(err.value)
        assert without_lock(snapshot(run)) == before
    with pytest.raises(UserError, match="unfinished operation"):
        load_run(run)


def test_journal_with_a_changed_digest_is_refused(tmp_path):
    run = make_run(tmp_path / "r")
    forge(run, {"op": "overwrite", "manifest": "x"})
    entry = json.loads((run / JOURNAL).read_text())
    entry["manifest"] = "y"
    (run / JOURNAL).write_text(json.dumps(entry))
    before = without_lock(snapshot(run))
    with pytest.raises(UserError, match="digest does not match"):
        RunStore.create(run, CONFIG, resume=True)
    assert without_lock(snapshot(run)) == before


@pytest.mark.parametrize("place", ["link", "folder"])
def test_journal_that_is_not_a_regular_file_is_refused(tmp_path, place):
    run = make_run(tmp_path / "r")
    outside = tmp_path / "outside.json"
    outside.write_text('{"op": "overwrite"}')
    if place == "link":
        (run / JOURNAL).symlink_to(outside)
    else:
        (run / JOURNAL).mkdir()
    before = without_lock(snapshot(run))
    with pytest.raises(UserError, match="not a regular file"):
        RunStore.create(run, CONFIG, resume=True)
    assert without_lock(snapshot(run)) == before and outside.exists()


@pytest.mark.parametrize("entry", [
    {"op": "rewind", "epoch": -1, "source": "last.pt"},            # wipes every row
    {"op": "rewind", "epoch": 0, "source": "last.pt"},             # last.pt holds epoch 2
    {"op": "rewind", "epoch": 7, "source": "last.pt"},             # an epoch that never was
    {"op": "rewind", "epoch": 0, "source": "../../outside.pt"},    # a path outside the run
    {"op": "rewind", "epoch": 0, "source": "epoch_0000.pt"},       # weights, no epoch
    {"op": "rewind", "epoch": 0, "source": "missing.pt"},
    {"op": "overwrite", "manifest": "0" * 64},                     # another manifest
    {"op": "create"},                                              # config.json is there...
], ids=["minus-one", "other-epoch", "future", "outside", "weights", "missing", "overwrite",
        "create"])
def test_forged_journal_is_refused_and_nothing_deleted(tmp_path, entry):
    """Issue 22 item 2: a journal is acted on only if it fits the run."""
    run = make_run(tmp_path / "r")
    with RunStore.create(run, CONFIG, resume=True) as store:
        store.save_weights(0, {"w": torch.zeros(2)})
    if entry["op"] == "create":  # ... a creation journal only fits before its config.json
        (run / "config.json").rename(tmp_path / "config.json")
    outside = tmp_path / "outside.pt"
    torch.save({"epoch": 0, "model": {}, "optimizer": {}}, outside)
    forge(run, entry)
    before = without_lock(snapshot(run))
    with pytest.raises(UserError) as err:
        RunStore.create(run, CONFIG, resume=True)
    assert JOURNAL in one_line(err) and "nothing was changed" in str(err.value)
    assert without_lock(snapshot(run)) == before and outside.exists()


def test_own_rewind_journal_is_still_finished(tmp_path):
    """The store's own, fitting rewind journal is acted on (epoch 1 of 0..2)."""
    run = make_run(tmp_path / "r")
    with RunStore.create(run, CONFIG, resume=True) as store:
        store.save_weights(1, {"w": torch.ones(1)})
    torch.save(torch.load(run / "checkpoints" / "last.pt", weights_only=True), tmp_path / "x")
    from layerhessians.store.checkpoints import save_torch
    save_torch(run / "checkpoints" / "full_0001.pt", state(1) | {"epoch": 1})
    forge(run, {"op": "rewind", "epoch": 1, "source": "full_0001.pt"})
    with RunStore.create(run, CONFIG, resume=True) as store:
        assert store.completed_epoch == 1 and "rewind" in store.notes[0]
    assert list(load_run(run).metrics["epoch"]) == [0, 1]


@pytest.mark.parametrize("entry", ["../outside.txt", "/ABS/outside.txt", "a/../../outside.txt",
                                   "./config.json", "images//x.png"])
def test_manifest_entries_outside_the_run_are_refused(tmp_path, entry):
    """Issue 22 item 6: --overwrite (and a recovering --resume) delete only inside the run."""
    run = make_run(tmp_path / "r")
    outside = tmp_path / "outside.txt"
    outside.write_text("mine")
    manifest = json.loads((run / MANIFEST).read_text())
    manifest["files"].append(entry.replace("/ABS", str(tmp_path)))
    (run / MANIFEST).write_text(json.dumps(manifest))
    before = without_lock(snapshot(run))
    with pytest.raises(UserError, match="not a path inside the run"):
        RunStore.create(run, CONFIG, overwrite=True)
    assert outside.read_text() == "mine" and without_lock(snapshot(run)) == before
    forge(run, {"op": "overwrite", "manifest": writer.manifest_digest(run)})
    with pytest.raises(UserError, match="not a path inside the run"):
        RunStore.create(run, CONFIG, resume=True)
    assert outside.read_text() == "mine"


def test_overwrite_keeps_links_and_what_they_point_to(tmp_path):
    """Only regular files are deleted: a link at a name the manifest lists stays, and so
    does its target (and a file below a linked folder)."""
    run = make_run(tmp_path / "r")
    outside = tmp_path / "outside.csv"
    outside.write_text("mine")
    (run / "metrics.csv").unlink()
    (run / "metrics.csv").symlink_to(outside)
    with pytest.raises(UserError, match="did not write"):  # the link is kept: a foreign file
        RunStore.create(run, CONFIG, overwrite=True)
    assert outside.read_text() == "mine" and (run / "metrics.csv").is_symlink()


def test_renamed_run_folder_stops_the_writer(tmp_path):
    """Issue 22 item 4: the run folder renamed or deleted while open: one line, no write
    at the old path."""
    run = tmp_path / "r"
    store = RunStore.create(run, CONFIG)
    commit(store, 0)
    run.rename(tmp_path / "moved")
    with pytest.raises(UserError, match="no longer the run directory") as err:
        commit(store, 1)
    one_line(err)
    assert not run.exists()
    for name in ("log_path", "images"):
        with pytest.raises(UserError, match="no longer the run directory"):
            getattr(store, name)
    with pytest.raises(UserError, match="no longer the run directory"):
        store.save_weights(1, {"w": torch.zeros(1)})
    store.close()
    assert list(load_run(tmp_path / "moved").metrics["epoch"]) == [0]


def test_deleted_run_folder_stops_the_writer(tmp_path):
    import shutil
    run = tmp_path / "r"
    store = RunStore.create(run, CONFIG)
    commit(store, 0)
    shutil.rmtree(run)
    with pytest.raises(UserError, match="no longer the run directory"):
        commit(store, 1)
    assert not run.exists()
    run.mkdir()  # a new folder at the same path is not the one opened either
    with pytest.raises(UserError, match="no longer the run directory"):
        commit(store, 1)
    assert os.listdir(run) == []
    store.close()


def test_readers_show_committed_epochs_only(tmp_path, monkeypatch):
    """Issue 22 item 5: killed between metrics.csv and the checkpoint, readers show the
    checkpoint's epochs (2), not the written row of epoch 3."""
    run = make_run(tmp_path / "r")
    real = writer.save_torch

    def dying(path, obj):
        if path.name == "last.pt":
            raise Crash
        return real(path, obj)

    monkeypatch.setattr(writer, "save_torch", dying)
    with RunStore.create(run, CONFIG, resume=True) as store, pytest.raises(Crash):
        commit(store, 3)
    monkeypatch.undo()
    assert b"\n3," in (run / "metrics.csv").read_bytes()  # written, not committed
    result = load_run(run)
    assert list(result.metrics["epoch"]) == [0, 1, 2]
    assert sorted(set(result.spectra["epoch"])) == [0, 1, 2] and result.epochs == [0, 1, 2]


def test_readers_show_nothing_before_the_first_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "r"
    monkeypatch.setattr(writer, "save_torch", lambda path, obj: (_ for _ in ()).throw(Crash))
    with RunStore.create(run, CONFIG) as store, pytest.raises(Crash):
        commit(store, 0)
    monkeypatch.undo()
    assert load_run(run).metrics.empty and load_run(run).spectra.empty


@pytest.mark.parametrize("where", ["log", "logs", "images", "checkpoints"])
def test_no_write_follows_a_link_out_of_the_run(tmp_path, where):
    """Issue 22 item 7: logs/train.log, logs/, images/ or checkpoints/ linked outside."""
    run = make_run(tmp_path / "r")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "train.log").write_text("mine\n")
    if where == "log":
        (run / "logs" / "train.log").unlink(missing_ok=True)
        (run / "logs" / "train.log").symlink_to(outside / "train.log")
    else:
        for name in os.listdir(run / where):
            os.rename(run / where / name, outside / name)
        (run / where).rmdir()
        (run / where).symlink_to(outside)
    before = snapshot(outside)
    with pytest.raises(UserError, match="symbolic link") as err:
        with RunStore.create(run, CONFIG, resume=True) as store:
            if where == "log":
                assert store.log_path
            commit(store, 3)
    one_line(err)
    assert snapshot(outside) == before


def test_figures_not_written_through_a_linked_images_folder(tmp_path, capsys):
    """Issue 22 item 7: ``plot`` refuses images/ linked to another folder."""
    run = make_run(tmp_path / "r")
    outside = tmp_path / "outside"
    outside.mkdir()
    (run / "images").rmdir()
    (run / "images").symlink_to(outside)
    assert main(["plot", str(run)]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert os.listdir(outside) == []


def test_hidden_figure_temporaries_are_cleaned_on_next_open(tmp_path):
    """Issue 22 item 12: figure temporaries (their format's suffix) left by a kill."""
    from layerhessians.store.atomic import atomic_path
    run = make_run(tmp_path / "r")
    with pytest.raises(Crash), atomic_path(run / "images" / "loss.png", suffix=".png") as tmp:
        tmp.write_bytes(b"half")
        left = tmp
        os.link(tmp, run / "images" / (tmp.name + "x"))  # stands for the file a kill leaves
        raise Crash
    stray = run / "images" / (left.name + "x")
    renamed = stray.with_name(left.name)
    stray.rename(renamed)
    assert renamed.name.startswith(".loss.png.") and renamed.name.endswith(".png")
    keep = run / "images" / ".mine.png"
    keep.write_bytes(b"user")
    with RunStore.create(run, CONFIG, resume=True):
        pass
    assert not renamed.exists() and keep.exists()


# ------------------------------------------------------------------ issue 22: readable record
@pytest.mark.parametrize("metrics,match", [
    ({"a,b": 1.0}, "cannot be a column"),
    ({'q"': 1.0}, "cannot be a column"),
    ({"line\nbreak": 1.0}, "cannot be a column"),
    ({"": 1.0}, "cannot be a column"),
    ({" pad": 1.0}, "cannot be a column"),
    ({3: 1.0}, "cannot be a column"),
    ({"x" * 101: 1.0}, "cannot be a column"),
    ({"big": 10**400}, "must be a number"),
    ({"inf": float("inf")}, "finite numbers only"),
    ({"text": "1.0"}, "must be a number"),
    ({"vec": np.ones(2)}, "must be a number"),
])
def test_metrics_the_csv_cannot_hold_are_refused_before_commit(tmp_path, metrics, match):
    """Issue 22 item 3: validated before committing; the record always reads back."""
    run = make_run(tmp_path / "r")
    with RunStore.create(run, CONFIG, resume=True) as store:
        with pytest.raises(UserError, match=match):
            store.commit_epoch(3, metrics, None, state(3))
        store.commit_epoch(3, {"lr": 0.05, "big": 10**30}, None, state(3))
    result = load_run(run)
    assert list(result.metrics["epoch"]) == [0, 1, 2, 3]
    assert result.metrics["big"].iloc[-1] == 1e30


@pytest.mark.parametrize("epoch", [10**30, -1, 2**53 + 1, 1.5, True])
def test_epoch_the_csv_cannot_hold_is_refused(tmp_path, epoch):
    run = make_run(tmp_path / "r")
    with RunStore.create(run, CONFIG, resume=True) as store:
        with pytest.raises(UserError, match="cannot be recorded"):
            store.commit_epoch(epoch, {"lr": 0.05}, None, state(3))
    assert list(load_run(run).metrics["epoch"]) == [0, 1, 2]


# ------------------------------------------------------------------ issue 22: the tracker
def tiny_tracker(run_dir, **kwargs):
    from layerhessians.tracking import SpectraTracker
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    return SpectraTracker(model, torch.nn.functional.cross_entropy, data, run_dir,
                          iterations=3, **kwargs)


def test_tracker_comma_metric_then_update_without_it_reads_back(tmp_path):
    """Issue 22 item 3: a comma in a name is refused before anything is written; a
    committed record always reads back, however the metrics vary between updates."""
    with tiny_tracker(tmp_path / "t") as tracker:
        with pytest.raises(UserError, match="cannot be a column"):
            tracker.update(0, metrics={"a,b": 1.0})
        tracker.update(0, metrics={"a": 1.0})
        tracker.update(1)
        tracker.update(2, metrics={"b": 2.0})
    metrics = load_run(tmp_path / "t").metrics
    assert list(metrics["epoch"]) == [0, 1, 2] and metrics["b"].iloc[-1] == 2.0


def test_tracker_huge_index_is_refused_and_record_reads_back(tmp_path):
    """Issue 22 item 3: ``update(10**30)`` bricked the record."""
    with tiny_tracker(tmp_path / "t") as tracker:
        tracker.update(0)
        with pytest.raises(UserError, match="cannot be recorded"):
            tracker.update(10**30)
    assert list(load_run(tmp_path / "t").metrics["epoch"]) == [0]
    with tiny_tracker(tmp_path / "t", resume=True) as tracker:
        tracker.update(1)
    assert list(load_run(tmp_path / "t").metrics["epoch"]) == [0, 1]


@pytest.mark.parametrize("metrics,match", [
    ({"loss": float("nan")}, "is NaN"),
    ({"loss": torch.tensor(float("nan"))}, "is NaN"),
    ({"loss": float("inf")}, "finite numbers only"),
    ([1, 2], "must be a dict"),
    ("loss", "must be a dict"),
])
def test_tracker_refuses_metrics_it_cannot_record(tmp_path, metrics, match):
    """Issue 22 items 10 and 12: NaN metrics refused (not stored as an empty cell), and
    ``update(metrics=[1, 2])`` one line, not an AttributeError."""
    with tiny_tracker(tmp_path / "t") as tracker:
        with pytest.raises(UserError, match=match):
            tracker.update(0, metrics=metrics)
    assert load_run(tmp_path / "t").metrics.empty


@pytest.mark.parametrize("run_dir", ["", "  "])
def test_tracker_refuses_an_empty_run_dir(tmp_path, monkeypatch, run_dir):
    """Issue 22 item 9: run_dir="" wrote into the working directory."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="run directory is empty"):
        tiny_tracker(run_dir)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ issue 22: the trainer
def test_cli_resume_does_not_append_to_a_linked_log(tmp_path, capsys):
    """Issue 22 item 7: logs/train.log linked to an outside file is not appended to."""
    run = tmp_path / "r"
    assert _train(run, "-lr", "0.05") == 0
    outside = tmp_path / "outside.log"
    outside.write_text("mine\n")
    (run / "logs" / "train.log").unlink()
    (run / "logs" / "train.log").symlink_to(outside)
    capsys.readouterr()
    assert _train(run, "-lr", "0.05", "--resume", "-n", "3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "symbolic link" in err[0]
    assert outside.read_text() == "mine\n" and RunStore(run).completed_epoch == 2


def test_cli_run_folder_renamed_during_training_stops(tmp_path, monkeypatch, capsys):
    """Issue 22 item 4: renamed after epoch 1: one line, exit 2, nothing rebuilt at the old
    path, the moved run resumes."""
    from layerhessians.training import loop
    run, moved = tmp_path / "r", tmp_path / "moved"
    real = loop._after_commit

    def rename_after_first(store, setup, config, epochs):
        real(store, setup, config, epochs)
        if list(epochs) == [1]:
            run.rename(moved)

    monkeypatch.setattr(loop, "_after_commit", rename_after_first)
    assert _train(run, "-lr", "0.05") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "no longer the run directory" in err[-1] and "done" not in " ".join(err)
    assert not run.exists()
    monkeypatch.undo()
    assert list(load_run(moved).metrics["epoch"]) == [1]
    assert _train(moved, "-lr", "0.05", "--resume") == 0
    assert list(load_run(moved).metrics["epoch"]) == [1, 2]


# ------------------------------------------------------------------ issue 22: sizes
@pytest.mark.parametrize("command,flag,value", [
    ("match", "--points", "1000000000"), ("match", "--draws", "1000000000"),
    ("plot", "--points", "1000000000"), ("match", "--points", "15"),
    ("plot", "--dpi", "1000000"),
])
def test_sizes_from_flags_are_bounded_before_work(tmp_path, capsys, command, flag, value):
    """Issue 22 item 8: every size a user controls is bounded and refused in one line
    before the work starts (``match --points 1e9`` was killed at 24 GB)."""
    run = make_run(tmp_path / "r")
    out = ["--out", str(tmp_path / "out")] if command == "match" else []
    assert main([command, str(run), flag, value, *out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0]
    assert not (tmp_path / "out").exists() and os.listdir(run / "images") == []


def test_match_replicates_alias_is_bounded_as_draws(tmp_path, capsys):
    """``match --replicates`` (the old name of ``--draws``, kept as an alias) is refused in
    one line naming the option as it is now spelled."""
    run = make_run(tmp_path / "r")
    assert main(["match", str(run), "--replicates", "1000000000", "--out",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--draws 1000000000 must be 0..100000" in err[0]
    assert not (tmp_path / "out").exists()


def _idx_header(shape):
    import struct
    return bytes([0, 0, 0x08, len(shape)]) + struct.pack(">" + "I" * len(shape), *shape)


@pytest.mark.parametrize("case", ["claims-huge", "inflates-past-header"])
def test_compressed_dataset_file_is_read_against_its_expected_size(tmp_path, case):
    """Issue 22 item 8: a small .gz that inflates far beyond what its header gives (or a
    header that claims gigabytes) is refused without inflating it whole."""
    import gzip

    from layerhessians.data.readers import read_idx
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as fh:
        if case == "claims-huge":
            fh.write(_idx_header((100_000, 28 * 1000, 28)))
        else:
            fh.write(_idx_header((2, 28, 28)))
            chunk = bytes(1 << 20)
            for _ in range(64):  # 64 MiB of zeros, about 64 KiB compressed
                fh.write(chunk)
    assert path.stat().st_size < 1 << 20
    with pytest.raises(UserError) as err:
        read_idx(path)
    assert str(path) in one_line(err)
    assert ("more than" in str(err.value)) == (case == "claims-huge")


def test_cli_finite_divergence_is_flagged_and_no_spectra_recorded(tmp_path, capsys):
    """Issue 22 item 10: ``-o adam -lr 1e3`` ended with train loss 1.3e21, spectra written
    (top eigenvalue 0.0) and exit 0: now a loss 10^4 times a uniform guess's stops the run
    before that epoch's spectra, and nothing of it is committed."""
    run = tmp_path / "r"
    assert _train(run, "-o", "adam", "-lr", "1e3", "--init-spectra") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "diverged at epoch 1" in err[-1] and "kept" in err[-1]
    result = load_run(run)
    assert list(result.metrics["epoch"]) == [0] and result.epochs == [0]
    assert result.metrics["train_loss"].iloc[0] < 10


@pytest.mark.parametrize("column,value", [("node", "inf"), ("node", "nan"), ("weight", "-0.5"),
                                          ("weight", "inf")])
def test_bad_nodes_or_weights_are_refused_naming_file_epoch_block(tmp_path, column, value):
    """Issue 22 item 11: a bad spectra.csv entry names the file, the epoch and the block."""
    run = make_run(tmp_path / "r")
    frame = pd.read_csv(run / "spectra.csv")
    row = frame.index[(frame["epoch"] == 1) & (frame["block"] == "conv2.weight")][0]
    frame[column] = frame[column].astype(object)
    frame.loc[row, column] = value
    frame.to_csv(run / "spectra.csv", index=False)
    with pytest.raises(UserError) as err:
        load_run(run)
    text = one_line(err)
    assert "spectra.csv" in text and "epoch 1" in text and "'conv2.weight'" in text, text


@pytest.mark.parametrize("how", ["nan-input", "inf-weight"])
def test_non_finite_inputs_or_weights_are_a_non_finite_error(how):
    """Issue 22 item 11: not "neither the mean nor the sum"."""
    from layerhessians.curvature.graph import NonFiniteError
    from layerhessians.spectra import layer_spectra
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    if how == "nan-input":
        x[2, 1] = float("nan")
    else:
        with torch.no_grad():
            model[2].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        layer_spectra(model, torch.nn.functional.cross_entropy, (x, y), iterations=3)


def test_slq_without_an_operator_is_one_line():
    """Issue 22 item 12: slq(None) was an AttributeError."""
    from layerhessians.spectra import slq
    with pytest.raises(UserError, match="needs an operator"):
        slq(None)


# ------------------------------------------------------------------ issue 22: one line, exit 2
@pytest.mark.parametrize("extra,expected", [
    (["--threads", "3000000000"], "--threads must be an integer"),
    (["--seed", "18446744073709551616"], "--seed must be an integer"),
    (["--step_gamma", "1e300", "--milestones", "1"], "exceeds 1e+30"),
    (["--num_epochs", "100000000000"], "--num_epochs must be an integer"),
    (["--batch_size", "100000000000"], "--batch_size must be an integer"),
])
def test_cli_out_of_range_settings_are_one_line(tmp_path, capsys, extra, expected):
    """Issue 22 item 12 (and other size flags): tracebacks became one line, exit 2, and
    nothing is created."""
    assert _train(tmp_path / "r", "-lr", "0.05", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "r").exists()


def test_cli_resume_with_a_config_that_is_a_json_list(tmp_path, capsys):
    run = tmp_path / "r"
    assert _train(run, "-lr", "0.05") == 0
    (run / "config.json").write_text("[1, 2]")
    before = without_lock(snapshot(run))
    capsys.readouterr()
    assert main(["train", "-r", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "JSON list" in err[0]
    assert without_lock(snapshot(run)) == before


def test_cli_resume_with_another_architectures_weights(tmp_path, capsys):
    """Issue 22 item 12: a last.pt holding another network's weights, with valid digests."""
    from layerhessians.store.checkpoints import save_torch
    run = tmp_path / "r"
    assert _train(run, "-lr", "0.05") == 0
    path = run / "checkpoints" / "last.pt"
    saved = torch.load(path, weights_only=True)
    saved["model"] = {"fc.weight": torch.zeros(3, 5), "fc.bias": torch.zeros(3)}
    save_torch(path, saved)  # a valid digest, the committed record kept
    capsys.readouterr()
    assert _train(run, "-lr", "0.05", "--resume", "-n", "3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "does not fit its model" in err[-1] and "Traceback" not in " ".join(err)
    assert list(load_run(run).metrics["epoch"]) == [1, 2]


def test_grid_file_nested_too_deeply_is_one_line(tmp_path):
    from layerhessians.pipeline.grid import load_grid
    path = tmp_path / "grid.json"
    path.write_text("[" * 100_000)
    with pytest.raises(UserError, match="nested too deeply") as err:
        load_grid(path)
    one_line(err)


def test_integer_loss_at_the_reduction_probe_is_refused():
    from layerhessians.curvature.loss_reduction import loss_reduction_of
    outputs, targets = torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(UserError, match="floating-point scalar"):
        loss_reduction_of(lambda o, t: o.sum().long(), outputs, targets, 4)


# ------------------------------------------------------------------ issue 22: fresh attack
def test_attack_journal_copied_from_another_run_is_refused(tmp_path, monkeypatch):
    """A1: an interrupted overwrite's journal copied into a run with a byte-identical
    manifest (same settings) is not acted on: it was written in another folder."""
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b")
    assert (a / MANIFEST).read_bytes() == (b / MANIFEST).read_bytes()
    forge(a, {"op": "overwrite", "manifest": writer.manifest_digest(a)})
    (b / JOURNAL).write_bytes((a / JOURNAL).read_bytes())
    before = without_lock(snapshot(b))
    with pytest.raises(UserError, match="another folder"):
        RunStore.create(b, CONFIG, resume=True)
    assert without_lock(snapshot(b)) == before


@pytest.mark.parametrize("name", [JOURNAL, MANIFEST, "config.json", "metrics.csv"])
def test_attack_a_named_pipe_at_a_store_name_does_not_hang(tmp_path, name):
    """A2: a FIFO at the journal's, manifest's, config's or metrics' name: one line, not a
    reader blocked forever."""
    run = make_run(tmp_path / "r")
    (run / name).unlink(missing_ok=True)
    os.mkfifo(run / name)
    with pytest.raises(UserError, match="not a regular file") as err:
        with RunStore.create(run, CONFIG, resume=True):
            pass
    one_line(err)
    assert (run / "checkpoints" / "last.pt").exists()


def test_attack_overwrite_journal_after_its_manifest_is_gone(tmp_path, monkeypatch):
    """A3: an overwrite killed after deleting every file and the manifest, before removing
    its journal: the next open finishes it and a user's file stays."""
    run = make_run(tmp_path / "r")
    (run / "notes.txt").write_text("mine")
    real = writer.RunStore._end_journal
    calls = []

    def dying_end(self):
        calls.append(1)
        if len(calls) == 1:
            raise Crash
        return real(self)

    monkeypatch.setattr(writer.RunStore, "_end_journal", dying_end)
    with pytest.raises(Crash):
        RunStore.create(run, CONFIG, overwrite=True)
    monkeypatch.undo()
    assert (run / JOURNAL).exists() and not (run / MANIFEST).exists()
    with RunStore.create(run, CONFIG) as store:
        assert store.completed_epoch is None
    assert (run / "notes.txt").read_text() == "mine" and not (run / JOURNAL).exists()


@pytest.mark.parametrize("name", ["metrics.csv", "checkpoints/last.pt", "config.json"])
def test_attack_store_file_linked_outside_is_never_written_through(tmp_path, name):
    """A4: a store file replaced by a link to an outside copy: committing replaces the link
    itself (atomic rename over it), never writes into the outside file."""
    run = make_run(tmp_path / "r")
    outside = tmp_path / "outside"
    outside.write_bytes((run / name).read_bytes())
    (run / name).unlink()
    (run / name).symlink_to(outside)
    before = outside.read_bytes()
    with RunStore.create(run, CONFIG, resume=True) as store:
        commit(store, 3)
    assert outside.read_bytes() == before
    assert not (run / name).is_symlink() and RunStore(run).completed_epoch == 3


def test_attack_rewind_keeps_linked_later_weights(tmp_path):
    """A5: ``checkpoints/epoch_0005.pt`` linked to an outside file: a rewind to epoch 1
    removes the store's own later weights only; the link and its target stay."""
    run = make_run(tmp_path / "r", epochs=(0, 1, 2, 3))
    from layerhessians.store.checkpoints import save_torch
    with RunStore.create(run, CONFIG, resume=True) as store:
        store.save_weights(3, {"w": torch.zeros(1)})
    save_torch(run / "checkpoints" / "full_0001.pt", state(1) | {"epoch": 1})
    outside = tmp_path / "precious.pt"
    outside.write_bytes(b"precious")
    (run / "checkpoints" / "epoch_0005.pt").symlink_to(outside)
    with RunStore.create(run, CONFIG, resume=True,
                         checkpoint=run / "checkpoints" / "full_0001.pt") as store:
        assert store.completed_epoch == 1
    assert not (run / "checkpoints" / "epoch_0003.pt").exists()
    assert (run / "checkpoints" / "epoch_0005.pt").is_symlink()
    assert outside.read_bytes() == b"precious"


def test_attack_legacy_export_through_a_linked_folder_is_refused(tmp_path):
    """A6: ``--export-legacy``'s ``ckpt/`` linked to an outside folder receives nothing."""
    run = make_run(tmp_path / "r")
    outside = tmp_path / "outside"
    outside.mkdir()
    (run / "ckpt").symlink_to(outside)
    with pytest.raises(UserError, match="symbolic link"):
        legacy.export_legacy(run)
    assert os.listdir(outside) == []


@pytest.mark.parametrize("field,entry", [("dirs", "../outside"), ("dirs", "/"),
                                         ("files", "checkpoints")])
def test_attack_manifest_folders_outside_or_folders_as_files(tmp_path, field, entry):
    """A7: a manifest listing a folder outside the run (refused) or a folder as a file
    (not deleted: only regular files are)."""
    run = make_run(tmp_path / "r")
    outside = tmp_path / "outside"
    outside.mkdir()
    manifest = json.loads((run / MANIFEST).read_text())
    manifest[field].append(entry)
    (run / MANIFEST).write_text(json.dumps(manifest))
    if field == "dirs":
        with pytest.raises(UserError, match="not a path inside the run"):
            RunStore.create(run, CONFIG, overwrite=True)
    else:
        with RunStore.create(run, {**CONFIG, "learning_rate": 0.1}, overwrite=True):
            pass
    assert outside.is_dir()


@pytest.mark.parametrize("flag,value", [("--hessian-iterations", "10000000000"),
                                        ("--hessian-vectors", "10000000000"),
                                        ("--examples_per_class", "10000000000"),
                                        ("--save_freq", "10000000000")])
def test_attack_other_size_flags_are_bounded(tmp_path, capsys, flag, value):
    """A8: other integer size flags of ``train`` are bounded before anything is created."""
    assert _train(tmp_path / "r", "-lr", "0.05", flag, value) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0], err
    assert not (tmp_path / "r").exists()


def test_attack_plot_points_through_the_api_is_bounded(tmp_path):
    """A9: ``make_figures(points=10**9)`` (the API under ``plot``) is refused before work."""
    from layerhessians.analysis.report import make_figures
    run = make_run(tmp_path / "r")
    with pytest.raises(UserError, match="--points"):
        make_figures(load_run(run), points=10**9)
    assert os.listdir(run / "images") == []


def test_attack_tracker_index_as_numpy_and_float(tmp_path):
    """A10: the tracker's index as a numpy integer is recorded exactly; a float, or a NaN
    metric after a committed update, is refused and the record still reads back."""
    with tiny_tracker(tmp_path / "t") as tracker:
        tracker.update(np.int64(0))
        with pytest.raises(UserError):
            tracker.update(1.0)
        with pytest.raises(UserError, match="is NaN"):
            tracker.update(1, metrics={"loss": np.float32("nan")})
    assert list(load_run(tmp_path / "t").metrics["epoch"]) == [0]


def test_attack_journal_that_is_a_huge_file_is_refused_unread(tmp_path):
    """A11: a journal of 100 MB (sparse) is refused without being read."""
    run = make_run(tmp_path / "r")
    with open(run / JOURNAL, "wb") as fh:
        fh.truncate(100 << 20)
    with pytest.raises(UserError, match="bytes"):
        RunStore.create(run, CONFIG, resume=True)
    assert (run / "checkpoints" / "last.pt").exists()
