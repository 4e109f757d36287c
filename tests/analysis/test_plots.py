"""Figures: the ``plot`` command end to end on a synthetic run, atomic saving, checks on
what is drawn, and the seed-compatible experiment scripts."""

import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from layerhessians.analysis import distances
from layerhessians.analysis import figures as plots
from layerhessians.analysis.matching import block_dimensions
from layerhessians.cli.main import main
from layerhessians.cli.plot import _check_identity
from layerhessians.store.run import load_run
from runfactory import LENET_LAYERS, write_run

REPO = Path(__file__).resolve().parents[2]


def assert_png_with_content(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    img = mpimg.imread(path)
    assert img.shape[0] >= 150 and img.shape[1] >= 250, (path, img.shape)
    rgb = img[..., :3]
    # not blank: varied pixels, some ink, and ink in several places (not only a title)
    assert float(np.std(rgb)) > 0.05, path
    ink = rgb.min(axis=2) < 0.6
    assert ink.mean() > 0.01, path
    rows, cols = np.nonzero(ink)
    assert np.ptp(rows) > img.shape[0] / 2 and np.ptp(cols) > img.shape[1] / 2, path


def test_plot_end_to_end(tmp_path, capsys):
    run = write_run(tmp_path / "model=LeNet,dataset=MNIST,te,run1", layers=LENET_LAYERS[:2],
                    epochs=range(0, 5), best_layer=1, peak_epoch=3, nodes=10)
    rc = main(["plot", "-r", str(run), "-m", "LeNet", "-d", "MNIST", "--points", "200",
               "--dpi", "70"])
    assert rc == 0
    printed = capsys.readouterr().out
    images = run / "images"
    expected = ["spectrum_full", *[f"spectrum_{b}" for b in LENET_LAYERS[:2]], "overview_full",
                "layer_distances", "best_match", "training_curves"]
    for name in expected:
        path = images / f"{name}.png"
        assert str(path) in printed
        assert_png_with_content(path)
    assert sorted(p.name for p in images.iterdir()) == sorted(f"{n}.png" for n in expected)


def test_plot_user_errors(tmp_path, capsys):
    run = write_run(tmp_path / "r", layers=LENET_LAYERS[:2], epochs=[0, 1], nodes=8)
    cases = [
        (["plot", "-r", str(tmp_path / "absent")], "not a LayerHessians run"),
        (["plot", "-r", str(run), "-m", "ResNet18"], "does not match"),
        (["plot", "-r", str(run), "-d", "CIFAR10"], "does not match"),
        (["plot", "-r", str(run), "--epochs", "7-9"], "none of the epochs"),
        (["plot", "-r", str(run), "--points", "3"], "too few"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
    # names are matched case-insensitively
    _check_identity(load_run(run), SimpleNamespace(model="lenet", dataset="mnist"))


def test_save_figure_is_atomic(tmp_path, monkeypatch):
    fig = plots.plot_training_curves(pd.DataFrame({"epoch": [0, 1], "train_loss": [2.0, 1.0],
                                                   "test_loss": [2.1, 1.2]}))
    target = tmp_path / "img" / "curves.png"
    target.parent.mkdir()
    target.write_bytes(b"old")

    def broken(*args, **kwargs):
        Path(args[0]).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(RuntimeError):
        plots.save_figure(fig, target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["curves.png"]
    monkeypatch.undo()
    fig = plots.plot_training_curves(pd.DataFrame({"epoch": [0, 1], "train_acc": [0.1, 0.9]}))
    assert plots.save_figure(fig, target, dpi=50) == target
    assert target.read_bytes()[:4] == b"\x89PNG"
    fig = plots.plot_training_curves(pd.DataFrame({"epoch": [0, 1], "train_acc": [0.1, 0.9]}))
    pdf = plots.save_figure(fig, target.with_suffix(".pdf"))
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in target.parent.iterdir()) == ["curves.pdf", "curves.png"]


def test_figures_draw_the_data():
    grid = np.linspace(-1.0, 3.0, 50)
    curves = {e: (grid, np.exp(-(grid - e) ** 2) + 1e-9) for e in (0, 2, 4)}
    fig = plots.plot_block_spectra(curves, "fc1.weight")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_xlabel() and ax.get_ylabel()
    lines = ax.get_lines()
    assert len(lines) == 3
    np.testing.assert_allclose(lines[2].get_ydata(), curves[4][1])
    colors = {tuple(line.get_color()) for line in lines}
    assert len(colors) == 3  # colour = epoch
    assert fig.axes[1].get_ylabel() == "epoch"  # the colour bar
    with pytest.raises(ValueError):
        plots.plot_block_spectra({}, "x")
    metrics = pd.DataFrame({"epoch": [0, 1, 2], "train_acc": [0.1, 0.5, 0.9],
                            "test_acc": [0.1, 0.4, 0.8], "train_loss": [2, 1, 0.5],
                            "test_loss": [2, 1.2, 0.7]})
    fig = plots.plot_training_curves(metrics)
    acc = fig.axes[1].get_lines()[0].get_ydata()
    np.testing.assert_allclose(acc, [10, 50, 90])  # fractions shown in percent
    assert len(plots.plot_training_curves(metrics[["epoch", "train_loss"]]).axes) == 1
    with pytest.raises(ValueError):
        plots.plot_training_curves(metrics[["epoch"]])
    x, y = plots.normalized_curve(np.array([2.0, 4.0, 6.0]), np.array([1.0, 2.0, 1.0]), 2.0, 6.0)
    np.testing.assert_allclose(x, [0, 0.5, 1])
    np.testing.assert_allclose(y, [4, 8, 4])  # still a density on the new axis
    import matplotlib.pyplot as plt

    plt.close("all")


def test_block_dimensions():
    assert block_dimensions({"block_dims": {"full": 10, "fc.weight": 4}}) == {"full": 10,
                                                                              "fc.weight": 4}
    dims = block_dimensions({"model": "LeNet", "dataset": "MNIST"})
    assert dims["full"] == 61706
    assert dims["conv1.weight"] == 6 * 1 * 5 * 5 and dims["fc3.weight"] == 84 * 10
    assert block_dimensions({"model": "NoSuchNet"}) == {}


def test_experiment_scripts_run_from_any_directory(tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path / "model=LeNet,dataset=MNIST,te,run1", layers=LENET_LAYERS[:1],
                    epochs=[0, 1, 2, 3], nodes=8)
    monkeypatch.chdir(tmp_path)
    script = REPO / "experiments" / "plot_training_eigenspectrum.py"
    monkeypatch.setattr(sys, "argv", [str(script), "-r", run.name, "-m", "LeNet", "-d", "MNIST",
                                      "--dpi", "40", "--points", "64", "--format", "pdf",
                                      "--epochs", "1-2", "--metric", "paper"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 0
    pdfs = sorted((run / "images").glob("*.pdf"))
    assert [p.stem for p in pdfs] == ["best_match", "layer_distances", "overview_full",
                                      "spectrum_conv1.weight", "spectrum_full",
                                      "training_curves"]
    assert all(p.read_bytes()[:5] == b"%PDF-" and p.stat().st_size > 1000 for p in pdfs)
    capsys.readouterr()  # the plot's own output (its progress lines on stderr)
    # the match script in a folder without runs: the one-line error, exit status 2
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    script = REPO / "experiments" / "match_distros.py"
    monkeypatch.setattr(sys, "argv", [str(script)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 2
    assert capsys.readouterr().err.startswith("layerhessians match: error: none of the 12 seed")


# ----------------------------------------------------------------------------- match figures
def _text_boxes_overlap(fig, texts):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in texts if t.get_text()]
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_run_styles_colour_per_model_marker_per_dataset_and_never_identical():
    runs = [("a", "LeNet", "MNIST"), ("b", "LeNet", "CIFAR10"), ("c", "VGG11_bn", "MNIST"),
            ("d", "LeNet", "MNIST"), ("e", "ResNet18", "SVHN")]
    styles = plots.run_styles(runs)
    assert styles["a"][0] == styles["b"][0] == styles["d"][0] != styles["c"][0]
    assert styles["a"][1] == styles["c"][1] == styles["d"][1] != styles["b"][1]
    assert len(set(styles.values())) == len(runs)  # a and d differ by line style


def test_depth_profiles_one_panel_per_metric_with_bars_and_verdict_marks():
    def frame(best):
        depth = np.linspace(0, 1, 4)
        rel = 0.3 + np.abs(depth - depth[best])
        rel = rel / rel.max()
        return pd.DataFrame({"depth": depth, "relative": rel, "relative_low": rel - 0.05,
                             "relative_high": rel + 0.05})

    entries = [{"label": "LeNet+MNIST", "model": "LeNet", "dataset": "MNIST", "frame": frame(1),
                "best_index": 1, "significant": True},
               {"label": "VGG11_bn+SVHN", "model": "VGG11_bn", "dataset": "SVHN",
                "frame": frame(2), "best_index": 2, "significant": False}]
    labels = {m: distances.DISTANCES[m].label for m in ("w1-maxabs", "paper", "w1-minmax")}
    fig = plots.plot_depth_profiles({m: entries for m in labels}, labels, title="t")
    panels = [ax for ax in fig.axes if ax.get_xlabel()]
    assert len(panels) == 3
    assert not _text_boxes_overlap(fig, [ax.title for ax in panels])
    ax = panels[0]
    assert len(ax.containers) == 2  # error bars per run
    markers = [line.get_marker() for line in ax.get_lines()]
    assert markers.count("*") == 1  # the significant run's closest layer
    assert any(t.get_text() == "n.s." for t in ax.texts)
    legend = fig.legends[0]
    assert "colour = model, marker = dataset" in legend.get_title().get_text()
    assert any("no layer significantly closer" in t.get_text() for t in legend.get_texts())
    import matplotlib.pyplot as plt

    plt.close("all")


def test_heatmap_is_scaled_per_epoch_and_marks_the_verdicts():
    matrix = pd.DataFrame([[1.0, 100.0, 0.0], [2.0, 110.0, 0.0], [4.0, 300.0, 0.0]],
                          index=["a", "b", "c"], columns=[1, 2, 3])
    scaled = plots.per_epoch_scaled(matrix)
    np.testing.assert_allclose(scaled[1], [1, 2, 4])
    np.testing.assert_allclose(scaled[2], [1, 1.1, 3])  # within epoch 2: told apart
    np.testing.assert_allclose(scaled[3], [1, 1, 1])  # all zero: a tie, shown as one colour
    verdicts = pd.DataFrame({"epoch": [1, 2, 3], "index": [0, 0, 0],
                             "significant": [True, True, False]})
    curves = {"closest layer": (np.array([1, 2, 3]), np.array([1.0, 100, 0]),
                                np.array([0.9, 90, 0]), np.array([1.1, 110, 0]))}
    fig = plots.plot_distance_heatmap(matrix, "d", peak=2, verdicts=verdicts, curves=curves)
    ax = [a for a in fig.axes if a.get_ylabel().startswith("layer")][0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "no layer significantly closer" in labels and "peak epoch 2" in labels
    offsets = {c.get_label(): c.get_offsets() for c in ax.collections if c.get_label()}
    np.testing.assert_allclose(offsets["closest layer (significantly)"], [[1, 0], [2, 0]])
    np.testing.assert_allclose(offsets["no layer significantly closer"], [[3, 0]])
    import matplotlib.pyplot as plt

    plt.close("all")


def test_epoch_ticks_do_not_overlap_at_50_epochs():
    epochs = np.arange(51)
    grid = np.linspace(-1, 5, 40)
    densities = np.exp(-(grid[None, :] - epochs[:, None] / 10) ** 2)
    fig = plots.plot_full_overview(grid, epochs, densities, epochs / 10 + 1, epochs * 3.0)
    for ax in fig.axes:
        if ax.get_xlabel() == "epoch" or ax.get_ylabel() == "epoch":
            axis = ax.xaxis if ax.get_xlabel() == "epoch" else ax.yaxis
            fig.canvas.draw()
            ticks = [t for t in axis.get_ticklabels() if t.get_text()]
            assert 3 <= len(ticks) <= 10
            assert not _text_boxes_overlap(fig, ticks)
    matrix = pd.DataFrame(np.random.default_rng(0).random((5, 50)) + 0.1,
                          index=list("abcde"), columns=range(1, 51))
    fig = plots.plot_distance_heatmap(matrix, "d")
    ax = fig.axes[0]
    fig.canvas.draw()
    assert not _text_boxes_overlap(fig, ax.xaxis.get_ticklabels())
    import matplotlib.pyplot as plt

    plt.close("all")


def test_wrap_label_never_breaks_inside_math():
    label = "$W_1$ on $\\lambda / \\max|\\lambda|$, nonzero part of the spectrum"
    wrapped = plots.wrap_label(label, 12)
    assert wrapped.replace("\n", " ") == label
    assert all(line.count("$") % 2 == 0 for line in wrapped.split("\n"))
    assert wrapped.count("\n") >= 2
