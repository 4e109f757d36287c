"""Every suggestion in an error message is something the user can do (issue 21, item 18):
a flag named in a CLI error exists on a `layerhessians` command (on the command that was
called, where the message is produced by running it), an API error names arguments, not
command-line flags, and a suggestion followed works."""

import ast
import re
from pathlib import Path

import pytest

import layerhessians as lh
from layerhessians.cli.main import COMMANDS, build_parser, main
from layerhessians.errors import UserError
from problems import PROBLEMS

SRC = Path(lh.__file__).parent
FLAG = re.compile(r"(?<![\w-])--[a-zA-Z][\w-]*")
#: flags of other programs that messages may name (the program is named with them)
EXTERNAL = {"--force-reinstall": "pip install", "--nproc_per_node": "torchrun"}
#: packages whose errors reach Python callers only: they name arguments, never flags
API_ONLY = ("curvature", "spectra", "tracking", "integrations")


def command_options(command: str) -> set:
    return set(build_parser(only=command).command_parser._option_string_actions)


ALL_OPTIONS = set().union(*(command_options(c) for c in COMMANDS))


def _strings(node):
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, str):
            yield n.value


def error_texts():
    """``(file, line, text, is_setting_error)`` for every string in a ``raise`` statement
    and every CLI spelling of a ``(api, cli)`` pair (the SettingError tables)."""
    for path in sorted(SRC.rglob("*.py")):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Raise) and node.exc is not None:
                setting = "SettingError" in ast.unparse(node.exc) or "_error(" in ast.unparse(
                    node.exc)
                for text in _strings(node.exc):
                    yield path, node.lineno, text, setting
            if isinstance(node, ast.Tuple) and len(node.elts) == 2 and all(
                    isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
                api, cli = (e.value for e in node.elts)
                if FLAG.search(cli) and not FLAG.search(api):
                    yield path, node.lineno, cli, True


def test_every_flag_named_in_an_error_exists_on_a_command():
    missing = []
    for path, line, text, _ in error_texts():
        for flag in FLAG.findall(text):
            if flag in EXTERNAL:
                assert EXTERNAL[flag] in text or path.name in ("mnist5k.py", "distributed.py")
            elif flag not in ALL_OPTIONS:
                missing.append(f"{path.relative_to(SRC)}:{line} {flag}")
    assert not missing, "errors suggest flags no command has: " + ", ".join(missing)


def test_api_errors_name_arguments_not_flags():
    flagged = [f"{path.relative_to(SRC)}:{line}: {text!r}"
               for path, line, text, setting in error_texts()
               if path.relative_to(SRC).parts[0] in API_ONLY and not setting
               and FLAG.search(text)]
    assert not flagged, "API errors that name command-line flags: " + "; ".join(flagged)


def _typo(option: str) -> str:
    return option[:-2] + option[-1] if len(option) > 5 else option + "x"


@pytest.mark.parametrize("command", COMMANDS)
def test_a_misspelled_option_suggests_one_of_the_same_command(command, capsys):
    options = sorted(o for o in command_options(command) if o.startswith("--") and o != "--help")
    assert options
    positional = ["quick"] if command == "sweep" else []  # its required grid
    for option in options:
        assert main([command, *positional, _typo(option)]) == 2
        err = capsys.readouterr().err
        suggested = re.findall(r"did you mean (--[\w-]+)\?", err)
        assert suggested, err
        assert suggested[0] in command_options(command), (command, option, err)


def _cli_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for flag in FLAG.findall(err):
        assert flag in command_options(argv[0]) or flag in EXTERNAL, (argv, flag, err)
    return err


def test_cli_refusals_suggest_options_of_the_command_called(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    # (`train -r NEW --resume` is issue 21 item 17, the settings branch's)
    _cli_error(["train", "-r", str(tmp_path / "x"), "--resume", "--overwrite"], capsys)
    _cli_error(["train", "-r", str(tmp_path / "x"), "--threads", "0"], capsys)
    _cli_error(["train", "-r", str(tmp_path / "x"), "--hessian-examples", "0"], capsys)
    _cli_error(["plot", str(tmp_path / "empty")], capsys)
    _cli_error(["match", str(tmp_path / "empty")], capsys)
    _cli_error(["sweep", "quick", "--root", str(tmp_path / "r"), "--only", "nope",
                "--dry-run"], capsys)
    _cli_error(["reproduce", "--quick", "--root", str(tmp_path / "r"), "--gpus", "x"], capsys)
    _cli_error(["datasets", "--download", "MNISTT"], capsys)


def test_tracker_suggestions_followed_work(tmp_path):
    model, data = PROBLEMS["mlp"].build()
    loss_fn = PROBLEMS["mlp"].loss_fn
    with lh.SpectraTracker(model, loss_fn, data, tmp_path / "run", iterations=4) as tracker:
        tracker.update(0)
    with pytest.raises(UserError, match="pass resume=True") as caught:
        lh.SpectraTracker(model, loss_fn, data, tmp_path / "run", iterations=4)
    assert not FLAG.search(str(caught.value))
    with lh.SpectraTracker(model, loss_fn, data, tmp_path / "run", iterations=4,
                           resume=True) as tracker:  # followed
        tracker.update(1)
    with pytest.raises(UserError, match="overwrite=True") as caught:
        lh.SpectraTracker(model, loss_fn, data, tmp_path / "run", iterations=5, resume=True)
    assert not FLAG.search(str(caught.value))
    with lh.SpectraTracker(model, loss_fn, data, tmp_path / "run", iterations=5,
                           overwrite=True) as tracker:  # followed
        assert tracker.completed is None


def test_store_refusal_followed_through_the_api(tmp_path):
    # a run folder whose config.json was lost: the advice is overwrite=True or another run_dir
    model, data = PROBLEMS["mlp"].build()
    loss_fn = PROBLEMS["mlp"].loss_fn
    with lh.SpectraTracker(model, loss_fn, data, tmp_path / "run", iterations=4) as tracker:
        tracker.update(0)
    (tmp_path / "run" / "config.json").unlink()
    with pytest.raises(UserError) as caught:
        lh.SpectraTracker(model, loss_fn, data, tmp_path / "run", iterations=4)
    message = str(caught.value)
    assert "overwrite=True" in message and not FLAG.search(message)
    with lh.SpectraTracker(model, loss_fn, data, tmp_path / "run", iterations=4,
                           overwrite=True) as tracker:  # followed
        tracker.update(0)
    assert lh.load_run(tmp_path / "run").epochs == [0]
