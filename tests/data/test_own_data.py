"""`train -d PATH` (issue 21, item 26): an image folder (one sub-folder per class, PNG or
JPEG) or a .npz/.pt tensor file, with the built-in datasets' checks, class-balanced Hessian
subset and checksum; every bad file refused in one line naming it. Small generated files."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from layerhessians.cli.main import main
from layerhessians.data import hessian_subset, load_dataset
from layerhessians.errors import UserError

TRAIN = ["-m", "LeNet", "-n", "1", "-b", "16", "--hessian-iterations", "4",
         "--examples_per_class", "2", "--threads", "1"]


def _images(n, side=12, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, side, side) if channels == 1 else (n, side, side, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def write_folder(root, classes=("cat", "dog", "emu"), per_class=5, side=12, channels=1,
                 split=False, suffix=".png"):
    pixels = _images(len(classes) * per_class, side, channels)
    count = 0
    for name in classes:
        for i in range(per_class):
            part = ("train" if i < per_class - 1 else "test") if split else ""
            folder = root / part / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[count]).save(folder / f"{i}{suffix}")
            count += 1
    return root, pixels


def tensors(n=30, classes=3, channels=1, side=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, channels, side, side), dtype=np.uint8)
    y = np.arange(n) % classes
    return x, y.astype(np.int64)


def test_an_image_folder_reads_with_classes_in_sorted_order(tmp_path):
    root, pixels = write_folder(tmp_path / "pets", classes=("dog", "cat", "emu"))
    data = load_dataset(str(root))
    assert data.name == "pets" and data.num_classes == 3 and data.in_channels == 1
    assert data.train_x.shape[1:] == (1, 32, 32)
    assert len(data.train_y) + len(data.test_y) == 15 and len(data.test_y) == 3  # 20% per class
    # class k is the k-th folder name in sorted order: cat 0, dog 1, emu 2; the first cat
    # image (the 6th written) is the unnormalised pixel grid, padded to 32x32
    first_cat = pixels[5].astype(np.float32) / 255.0
    x = data.train_x[data.train_y == 0] * data.std[0] + data.mean[0]
    found = any(np.allclose(x[i, 0, 10:22, 10:22].numpy(), first_cat, atol=1e-5)
                for i in range(len(x)))
    assert found


def test_train_and_test_folders_and_rgb_jpeg(tmp_path):
    root, _ = write_folder(tmp_path / "rgb", channels=3, split=True, suffix=".jpg")
    data = load_dataset(str(root))
    assert data.in_channels == 3 and len(data.test_y) == 3 and len(data.train_y) == 12


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
@pytest.mark.parametrize("split", [True, False])
def test_tensor_files_read_the_same_arrays(tmp_path, suffix, split):
    x, y = tensors()
    arrays = ({"train_x": x[:24], "train_y": y[:24], "test_x": x[24:], "test_y": y[24:]}
              if split else {"x": x, "y": y})
    path = tmp_path / f"mine{suffix}"
    if suffix == ".npz":
        np.savez(path, **arrays)
    else:
        torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, path)
    data = load_dataset(str(path))
    assert data.num_classes == 3 and data.train_x.shape[1:] == (1, 32, 32)
    assert len(data.train_y) == (24 if split else 24) and len(data.test_y) == 6
    # the same arrays give the same checksum in either format
    other = tmp_path / ("other.pt" if suffix == ".npz" else "other.npz")
    if other.suffix == ".npz":
        np.savez(other, **arrays)
    else:
        torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, other)
    assert load_dataset(str(other)).checksum == data.checksum
    subset = hessian_subset(data.train_y, examples_per_class=2, seed=0)
    assert np.bincount(data.train_y[subset].numpy(), minlength=3).tolist() == [2, 2, 2]


def test_the_checksum_follows_the_content(tmp_path):
    x, y = tensors()
    np.savez(tmp_path / "a.npz", x=x, y=y)
    x2 = x.copy()
    x2[0, 0, 0, 0] ^= 1
    np.savez(tmp_path / "b.npz", x=x2, y=y)
    np.savez(tmp_path / "c.npz", x=x, y=y)
    a, b, c = (load_dataset(str(tmp_path / f"{n}.npz")).checksum for n in "abc")
    assert a == c and a != b


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _bad_cases(tmp_path):
    x, y = tensors()
    cases = {}
    p = tmp_path / "keys.npz"
    np.savez(p, images=x, labels=y)
    cases["keys"] = (p, "expected train_x")
    p = tmp_path / "object.npz"
    np.savez(p, x=np.array([object()] * 3, dtype=object), y=y[:3])
    cases["object"] = (p, "not a readable .npz")
    p = tmp_path / "float_labels.npz"
    np.savez(p, x=x, y=y.astype(np.float32))
    cases["float_labels"] = (p, "integer class labels")
    p = tmp_path / "nan.npz"
    xf = x.astype(np.float32)
    xf[0, 0, 0, 0] = np.nan
    np.savez(p, x=xf, y=y)
    cases["nan"] = (p, "NaN")
    p = tmp_path / "big.npz"
    np.savez(p, x=np.zeros((30, 1, 40, 40), np.uint8), y=y)
    cases["big"] = (p, "at most 32x32")
    p = tmp_path / "one_class.npz"
    np.savez(p, x=x, y=np.zeros_like(y))
    cases["one_class"] = (p, "at least 2")
    p = tmp_path / "length.npz"
    np.savez(p, x=x, y=y[:-1])
    cases["length"] = (p, "one label per image")
    p = tmp_path / "truncated.npz"
    np.savez(p, x=x, y=y)
    p.write_bytes(p.read_bytes()[:200])
    cases["truncated"] = (p, "not a readable .npz")
    p = tmp_path / "code.pt"
    torch.save({"x": torch.zeros(3), "evil": _Evil()}, p)
    cases["code"] = (p, "weights_only=True")
    p = tmp_path / "list.pt"
    torch.save([torch.zeros(3)], p)
    cases["list"] = (p, "dict of tensors")
    p = tmp_path / "garbage.pt"
    p.write_bytes(b"not a torch file at all")
    cases["garbage"] = (p, "not a readable .pt")
    folder, _ = write_folder(tmp_path / "broken")
    bad = folder / "cat" / "9.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    cases["broken_png"] = (bad, "not a readable image")
    folder, _ = write_folder(tmp_path / "sizes")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "dog" / "9.png")
    cases["sizes"] = (folder / "dog" / "9.png", "one size")
    folder, _ = write_folder(tmp_path / "other_file")
    (folder / "emu" / "notes.txt").write_text("hello")
    cases["other_file"] = (folder / "emu" / "notes.txt", "not a PNG or JPEG")
    folder, _ = write_folder(tmp_path / "empty_class")
    (folder / "fox").mkdir()
    cases["empty_class"] = (folder / "fox", "empty class folder")
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "flat" / "a.png")
    cases["flat"] = (tmp_path / "flat", "no class folders")
    cases["missing"] = (tmp_path / "nowhere.npz", "no such file")
    return cases


CASES = ["keys", "object", "float_labels", "nan", "big", "one_class", "length", "truncated",
         "code", "list", "garbage", "broken_png", "sizes", "other_file", "empty_class", "flat",
         "missing"]


@pytest.mark.parametrize("case", CASES)
def test_bad_files_are_refused_in_one_line_naming_them(tmp_path, case, capsys):
    path, message = _bad_cases(tmp_path)[case]
    dataset = {"broken_png": path.parent.parent, "sizes": path.parent.parent,
               "other_file": path.parent.parent, "empty_class": path.parent}.get(case, path)
    with pytest.raises(UserError, match=message) as caught:
        load_dataset(str(dataset))
    text = str(caught.value)
    assert str(path.name) in text and "\n" not in text and "pwned" not in text
    capsys.readouterr()


def test_train_on_an_image_folder_records_path_and_checksum(tmp_path, capsys):
    root, _ = write_folder(tmp_path / "pets", per_class=6)
    run = tmp_path / "run"
    assert main(["train", "-d", str(root), "-r", str(run), *TRAIN]) == 0
    config = json.loads((run / "config.json").read_text())
    data = load_dataset(str(root))
    assert config["facts"]["dataset"] == str(root.resolve())
    assert config["facts"]["dataset_checksum"] == data.checksum
    assert config["facts"]["num_classes"] == 3 and config["facts"]["in_channels"] == 1
    capsys.readouterr()
    # a bad file: one line, exit 2, nothing trained
    (root / "cat" / "x.png").write_bytes(b"broken")
    assert main(["train", "-d", str(root), "-r", str(tmp_path / "run2"), *TRAIN]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x.png" in err[0]


def test_resume_with_changed_data_is_refused(tmp_path, capsys):
    x, y = tensors(n=40)
    path = tmp_path / "mine.npz"
    np.savez(path, x=x, y=y)
    run = tmp_path / "run"
    assert main(["train", "-d", str(path), "-r", str(run), *TRAIN]) == 0
    x[0, 0, 0, 0] ^= 1
    np.savez(path, x=x, y=y)
    capsys.readouterr()
    assert main(["train", "-r", str(run), "--resume", "-n", "2"]) == 2
    err = capsys.readouterr().err
    assert "checksum" in err or "different settings" in err


def test_names_and_paths_are_told_apart(tmp_path, monkeypatch):
    from layerhessians.data import get_spec, is_dataset_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "Digits").mkdir()  # a folder named like a built-in dataset: the name wins
    assert not is_dataset_path("Digits") and not is_dataset_path("mnist5k")
    assert not is_dataset_path(get_spec("Digits")) and not is_dataset_path("x" * 5000)
    assert not is_dataset_path("Digitz")  # a typo stays a name (did-you-mean)
    assert is_dataset_path("./Digits") and is_dataset_path("mine.npz")
    with pytest.raises(UserError, match="did you mean 'Digits'"):
        load_dataset("Digitz")
