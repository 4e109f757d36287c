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
from layerhessians.store import checkpoints, consistency, legacy, manifest, writer
from layerhessians.store.checkpoints import COMMITTED_KEY
from layerhessians.store.names import JOURNAL, MANIFEST, run_path, safe_child
from layerhessians.store.run import load_run
from layerhessians.store.writer import RunStore, resume_source


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
        assert store.config["learning_rate"] == 0.1


def test_a_gap_in_the_epochs_is_refused_for_a_trainer_run_only(tmp_path):
    """A trainer's run records every epoch: a gap is refused on resume. A SpectraTracker's
    run (config source) may skip indices, which must still increase up to the checkpoint's."""
    trainer = make_run(tmp_path / "trainer", epochs=(0, 1, 3))
    with pytest.raises(UserError, match="does not hold each epoch up to the checkpoint's "
                                        r"epoch 3 once \(holds 0..3 \(3 rows\)\)") as err:
        RunStore.create(trainer, CONFIG, resume=True)
    assert "metrics.csv" in one_line(err)
    tracked = {**CONFIG, "source": consistency.TRACKER_SOURCE}
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
    assert list(result.metrics["epoch"]) == [1, 2] and result.config["learning_rate"] == 0.02
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
