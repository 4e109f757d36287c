"""Every Python snippet of README.md runs (issue 21, item 22), in order, in one namespace,
as a reader pasting them into one session would, in a temporary working directory. The
first snippet reads `runs/mnist5k-lenet`, which the README makes with `layerhessians train`
just before it: here a small run of the same command (Digits, 3 epochs, few Lanczos steps)
stands in for it."""

import re
from pathlib import Path

import pytest
import torch

from layerhessians.cli.main import main

README = Path(__file__).resolve().parent.parent / "README.md"


def python_snippets() -> list:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_snippets():
    assert len(python_snippets()) >= 5


def test_every_readme_python_snippet_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    assert main(["train", "-m", "LeNet", "-d", "Digits", "-n", "3", "-r", "runs/mnist5k-lenet",
                 "--hessian-iterations", "8", "--examples_per_class", "2",
                 "--threads", "1"]) == 0
    namespace = {"__name__": "readme"}
    try:
        for index, snippet in enumerate(python_snippets()):
            try:
                exec(compile(snippet, f"README.md python snippet {index + 1}", "exec"),
                     namespace)
            except Exception as err:  # noqa: BLE001 - name the snippet that failed
                pytest.fail(f"README python snippet {index + 1} failed: "
                            f"{type(err).__name__}: {err}\n{snippet}")
    finally:
        torch.set_num_threads(threads)
    # what the snippets promise
    assert namespace["measure"].method == "slq"
    assert namespace["m"].method == "exact"
    assert set(namespace["spectra"].methods.values()) == {"slq", "exact"}
    assert namespace["tracker"].completed == 2
    capsys.readouterr()
