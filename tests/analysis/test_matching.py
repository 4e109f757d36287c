"""Distances between spectra (against hand-computed values), the original's metric, peaks,
and the ``match`` command end to end on synthetic runs."""

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from layerhessians.analysis import distances, matching, seed_grid, spread
from layerhessians.cli.main import main
from layerhessians.errors import UserError
from layerhessians.store.run import load_run
from runfactory import LENET_LAYERS, base_weights, write_run


def measure(nodes, weights=None):
    nodes = np.asarray(nodes, float)
    if weights is None:
        weights = np.full(nodes.shape, 1.0 / nodes.size)
    weights = np.asarray(weights, float)
    return SimpleNamespace(nodes=nodes, weights=weights)


def w1_by_cdf(x, wx, y, wy):
    """Reference W1: integral of |F - G| over the union of atoms, in float64."""
    points = np.union1d(x, y)
    F = np.array([wx[x <= p].sum() for p in points])
    G = np.array([wy[y <= p].sum() for p in points])
    return float(np.sum(np.abs(F - G)[:-1] * np.diff(points)))


# ----------------------------------------------------------------------------- wasserstein
@pytest.mark.parametrize("shift", [0.0, 0.3, -2.5, 7.0])
def test_shifted_atoms_raw_axis(shift):
    got = distances.wasserstein(measure([1.0]), measure([1.0 + shift]), "none")
    assert got == pytest.approx(abs(shift))


def test_two_point_measures_by_hand():
    p = measure([0.0, 1.0], [0.5, 0.5])
    q = measure([0.0, 1.0], [0.25, 0.75])
    # |F_p - F_q| = 0.25 on [0, 1)
    assert distances.wasserstein(p, q, "none") == pytest.approx(0.25)
    assert distances.wasserstein(p, q, "minmax") == pytest.approx(0.25)
    # the same shapes on [10, 14] and [0, 1]: minmax sees the same, raw sees the move
    p2 = measure([10.0, 14.0], [0.5, 0.5])
    assert distances.wasserstein(p2, q, "minmax") == pytest.approx(0.25)
    # quantile functions: on (0, .25] 10 vs 0, (.25, .5] 10 vs 1, (.5, 1] 14 vs 1
    assert distances.wasserstein(p2, q, "none") == pytest.approx(0.25 * 10 + 0.25 * 9 + 0.5 * 13)
    # joint: the union's [0, 14] -> [0, 1] for both
    assert distances.wasserstein(p2, q, "joint") == pytest.approx(11.25 / 14)


def test_zero_weight_nodes_do_not_stretch_the_support():
    p = measure([0.0, 1.0, 100.0], [0.5, 0.5, 0.0])
    assert distances.wasserstein(p, measure([0.0, 1.0]), "minmax") == pytest.approx(0.0, abs=1e-15)


def test_against_cdf_reference_on_random_measures():
    rng = np.random.default_rng(0)
    for _ in range(5):
        x, y = rng.normal(size=7), rng.normal(2.0, 3.0, size=11)
        wx, wy = rng.random(7), rng.random(11)
        wx, wy = wx / wx.sum(), wy / wy.sum()
        got = distances.wasserstein(measure(x, wx), measure(y, wy), "none")
        assert got == pytest.approx(w1_by_cdf(x, wx, y, wy), rel=1e-12)
        nx = (x - x.min()) / np.ptp(x)
        ny = (y - y.min()) / np.ptp(y)
        got = distances.wasserstein(measure(x, wx), measure(y, wy), "minmax")
        assert got == pytest.approx(w1_by_cdf(nx, wx, ny, wy), rel=1e-12)


def test_normalisations_are_invariant_to_their_scale():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=9), rng.gamma(2.0, size=13)
    wx, wy = np.full(9, 1 / 9), rng.dirichlet(np.ones(13))
    ref = {how: distances.wasserstein(measure(x, wx), measure(y, wy), how)
           for how in distances.NORMALIZATIONS}
    # minmax: any positive affine map of each measure separately
    assert distances.wasserstein(measure(1e-4 * x + 3, wx), measure(250 * y - 7, wy),
                               "minmax") == pytest.approx(ref["minmax"], rel=1e-10)
    # maxabs: a positive scale of each measure separately
    assert distances.wasserstein(measure(1e3 * x, wx), measure(0.02 * y, wy),
                               "maxabs") == pytest.approx(ref["maxabs"], rel=1e-10)
    # joint: one positive affine map of both
    assert distances.wasserstein(measure(5 * x - 1, wx), measure(5 * y - 1, wy),
                               "joint") == pytest.approx(ref["joint"], rel=1e-10)
    # none: scales with the axis
    assert distances.wasserstein(measure(5 * x, wx), measure(5 * y, wy),
                               "none") == pytest.approx(5 * ref["none"], rel=1e-10)
    # and the scale matters where it should
    moved = distances.wasserstein(measure(5 * x, wx), measure(y, wy), "joint")
    assert moved != pytest.approx(ref["joint"])


def test_degenerate_supports_do_not_divide_by_zero():
    point = measure([3.0, 3.0], [0.5, 0.5])
    spread = measure([0.0, 1.0], [0.5, 0.5])
    # a single point maps to 0.5
    assert distances.wasserstein(point, spread, "minmax") == pytest.approx(0.5)
    assert distances.wasserstein(point, measure([-2.0]), "minmax") == 0.0
    assert distances.wasserstein(measure([0.0]), measure([0.0]), "maxabs") == 0.0
    assert distances.wasserstein(point, point, "joint") == 0.0
    assert np.isfinite(distances.wasserstein(measure([0.0]), spread, "maxabs"))


def test_bad_measures_and_options():
    with pytest.raises(UserError, match="normalisation"):
        distances.wasserstein(measure([0.0]), measure([1.0]), "zscore")
    with pytest.raises(ValueError):
        distances.wasserstein(measure([0.0, 1.0], [0.5, -0.5]), measure([1.0]))
    with pytest.raises(TypeError):
        distances.wasserstein(np.zeros(3), measure([1.0]))
    with pytest.raises(UserError, match="metric"):
        distances.spectrum_distance(measure([0.0]), measure([1.0]), metric="kl")


# ----------------------------------------------------------------------------- the original
def test_paper_transform_by_hand():
    # d = [0, .5, 1, 2]: zero -> .5; log = [-ln2, -ln2, 0, ln2]; minmax [0, 0, .5, 1]; /1.5
    np.testing.assert_allclose(distances.paper_transform([0.0, 0.5, 1.0, 2.0]),
                               [0.0, 0.0, 1 / 3, 2 / 3], atol=1e-15)
    np.testing.assert_allclose(distances.paper_transform([1.0, 1.0, 1.0, np.e]), [0, 0, 0, 1],
                               atol=1e-15)
    # constant log-density (0/0 in the original): uniform
    np.testing.assert_allclose(distances.paper_transform([2.0, 2.0, 0.0]), [1 / 3] * 3)


def test_paper_distance_by_hand():
    # samples {0, 0, 1/3, 2/3} and {0, 0, 0, 1}, weights 1/4: sorted pairs differ by
    # 0, 0, 1/3, 1/3 -> W1 = (2/3) / 4
    got = distances.paper_distance([0.0, 0.5, 1.0, 2.0], [1.0, 1.0, 1.0, np.e])
    assert got == pytest.approx(1 / 6, rel=1e-12)
    # a density's scale drops out (log, then min-max)
    assert distances.paper_distance([0.0, 5.0, 10.0, 20.0], [1.0, 1.0, 1.0, np.e]) == pytest.approx(
        1 / 6, rel=1e-12)
    # it ignores the grid: the same density values in another order give 0
    assert distances.paper_distance([0.1, 0.5, 2.0], [2.0, 0.1, 0.5]) == pytest.approx(0.0, abs=1e-15)


def test_paper_metric_uses_each_measures_density():
    class Curve:
        def __init__(self, values):
            self.values = np.asarray(values, float)

        def density(self, points=1024):
            assert points == 4
            return np.arange(4.0), self.values

    got = distances.paper_metric(Curve([0.0, 0.5, 1.0, 2.0]), Curve([1.0, 1.0, 1.0, np.e]), points=4)
    assert got == pytest.approx(1 / 6, rel=1e-12)
    with pytest.raises(ValueError):
        distances.paper_transform([0.0, 0.0])


def test_paper_peak_epochs_are_the_originals_plus_one():
    assert len(seed_grid.PAPER_PEAK_EPOCH) == 12
    assert seed_grid.paper_peak_epoch("LeNet", "MNIST") == 19
    assert seed_grid.paper_peak_epoch("VGG11_bn", "FashionMNIST") == 7
    assert seed_grid.paper_peak_epoch("LeNet", "Digits") is None
    assert len(set(seed_grid.SEED_RUNS)) == 12
    assert "model=ResNet18,dataset=CIFAR10,te,run1" in seed_grid.SEED_RUNS


# ----------------------------------------------------------------------------- runs
def test_layer_distances_known_run(tmp_path):
    run = load_run(write_run(tmp_path / "r", epochs=range(0, 6), best_layer=2, peak_epoch=3,
                             nodes=12, vectors=2))
    # the values below are the former default's (W1 with each support -> [0, 1])
    d = matching.layer_distances(run, "w1-minmax")
    assert sorted(d["epoch"].unique()) == [1, 2, 3, 4, 5]  # epoch 0 left out by default
    assert list(d.columns) == matching.DISTANCE_COLUMNS
    assert list(d.loc[d["epoch"] == 1, "layer"]) == list(LENET_LAYERS)
    np.testing.assert_allclose(d.loc[d["epoch"] == 1, "depth"], [0, 0.25, 0.5, 0.75, 1])
    # exact: both monotone in u with the same weights -> W1 = sum w (u - u^(1+t))
    u, w = np.linspace(0, 1, 12), base_weights(12)
    for row in d.itertuples():
        t = 0.5 * abs(row.index - 2) + 0.2 * abs(row.epoch - 3)
        assert row.distance == pytest.approx(np.sum(w * (u - u ** (1 + t))), abs=1e-12)
    assert matching.peak_epoch(d) == 3
    assert matching.best_layer(d, 3)["layer"] == "fc1.weight"
    assert matching.best_layer(d)["index"] == 2
    table = matching.distance_matrix(d)
    assert list(table.index) == list(LENET_LAYERS) and list(table.columns) == [1, 2, 3, 4, 5]
    prof = matching.profile(d)
    assert prof["relative"].max() == pytest.approx(1.0) and prof["relative"].idxmin() == 2
    summary = matching.summarize(d, {})
    assert summary.loc[0, "peak_epoch"] == 3 and summary.loc[0, "peak_layer"] == "fc1.weight"
    assert matching.summarize(d, {run.name: 5}).loc[0, "peak_source"] == "given"


def test_layer_distances_paper_metric_and_errors(tmp_path):
    run = load_run(write_run(tmp_path / "r", epochs=[0, 1, 2], best_layer=1, peak_epoch=2))
    d = matching.layer_distances(run, "paper", epochs=[0, 1, 2], points=256)
    assert (d["metric"] == "paper").all() and (d["normalize"] == "").all()
    # an affine image of the full measure has an affine image of its density: distance ~0
    at_peak = d[(d["epoch"] == 2) & (d["index"] == 1)]["distance"].item()
    assert at_peak < 1e-6 < d["distance"].max()
    with pytest.raises(UserError, match="epoch"):
        matching.layer_distances(run, epochs=[7])
    with pytest.raises(UserError, match="metric"):
        matching.layer_distances(run, "kl")
    only_full = load_run(write_run(tmp_path / "f", layers=(), epochs=[1]))
    with pytest.raises(UserError, match="at least one"):
        matching.layer_distances(only_full)


def test_parse_epochs():
    assert matching.parse_epochs("1-3,7, 5") == [1, 2, 3, 5, 7]
    assert matching.parse_epochs("0") == [0]
    for bad in ("x", "5-2", "", "-3"):
        with pytest.raises(UserError):
            matching.parse_epochs(bad)


# ----------------------------------------------------------------------------- the command
def png_has_content(path):
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 200
    rgb = img[..., :3]
    return float(np.std(rgb)) > 0.02 and (rgb < 0.5).mean() > 0.005


def test_match_end_to_end(tmp_path, capsys):
    a = write_run(tmp_path / "model=LeNet,dataset=MNIST,te,run1", best_layer=1, peak_epoch=2,
                  epochs=range(0, 5))
    b = write_run(tmp_path / "vgg", model="VGG11_bn", dataset="CIFAR10",
                  layers=tuple(f"features.{i}.weight" for i in range(7)), best_layer=5,
                  peak_epoch=4, epochs=range(0, 5))
    out = tmp_path / "out"
    # the peaks and layers below are the former default's answers (then --metric both =
    # wasserstein with each support -> [0, 1], and paper): asked for by name
    rc = main(["match", str(a), str(b), "--out", str(out), "--metric", "w1-minmax", "paper",
               "--points", "128", "--dpi", "80", "--replicates", "50"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "LeNet+MNIST" in text and "VGG11_bn+CIFAR10" in text
    assert "at peak epoch 2 (computed): #1 conv2.weight" in text
    assert "at peak epoch 4 (computed): #5 features.5.weight" in text
    table = pd.read_csv(out / "match_distros.csv")
    assert set(["run", "model", "dataset", "epoch", "layer", "depth", "distance",
                "metric"]) <= set(table.columns)
    assert len(table) == 2 * (5 * 4 + 7 * 4)  # metrics x (layers x epochs 1..4)
    assert set(table["metric"]) == {"w1-minmax", "paper"}
    summary = pd.read_csv(out / "match_distros_summary.csv")
    assert set(summary["peak_epoch"]) == {2, 4}
    for name in ("match_distros_wasserstein.png", "match_distros_peak.png"):
        assert png_has_content(out / name), name
    # a given peak is used as is
    rc = main(["match", str(a), "--out", str(out), "--peak", f"{a.name}=3", "--dpi", "60",
               "--replicates", "50"])
    assert rc == 0 and "at peak epoch 3 (given)" in capsys.readouterr().out
    # both = the default and the paper's metric
    rc = main(["match", str(a), "--out", str(out), "--metric", "both", "--dpi", "60",
               "--replicates", "20"])
    assert rc == 0
    assert set(pd.read_csv(out / "match_distros.csv")["metric"]) == {
        distances.DEFAULT_DISTANCE, "paper"}


def test_match_finds_seed_runs_in_working_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["match"]) == 2
    assert "none of the 12 seed run directories" in capsys.readouterr().err
    write_run(tmp_path / seed_grid.seed_run_name("LeNet", "MNIST"), epochs=range(0, 21),
              best_layer=3, peak_epoch=10, nodes=8)
    # the layer below is the former default's answer (W1 with each support -> [0, 1])
    assert main(["match", "--peak", "paper", "--dpi", "60", "--metric", "w1-minmax",
                 "--replicates", "50"]) == 0
    captured = capsys.readouterr()
    assert "missing: model=LeNet,dataset=FashionMNIST,te,run1" in captured.err
    assert "1 of the 12" in captured.err
    assert "at peak epoch 19 (given): #3 fc2.weight" in captured.out
    assert (tmp_path / "match_distros_peak.png").exists()


def test_match_user_errors(tmp_path, capsys):
    run = write_run(tmp_path / "r", epochs=[0, 1, 2])
    cases = [
        (["match", str(tmp_path / "absent")], "does not exist"),
        (["match", str(run), "--peak", "r=x"], "RUN=EPOCH"),
        (["match", str(run), "--peak", "other=1"], "not one of the runs"),
        (["match", str(run), "--peak", "r=9", "--out", str(tmp_path)], "peak epoch 9"),
        (["match", str(run), "--epochs", "5-6", "--out", str(tmp_path)], "no spectra at epoch"),
        (["match", str(tmp_path / "r" / "images")], "not a LayerHessians run"),
        (["match", str(run), "--peak", "paper", "--epochs", "1", "--out", str(tmp_path)],
         "peak epoch 19"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"] == "LeNet"


# ----------------------------------------------------------------------------- verdicts
def test_verdict_needs_support_beyond_the_spread():
    rng = np.random.default_rng(0)
    points = np.array([1.0, 2.0, 3.0])
    clear = points[:, None] + 0.05 * rng.standard_normal((3, 400))
    v = matching.verdict(points, clear)
    assert v["best"] == 0 and v["runner_up"] == 1 and v["significant"] and v["support"] > 0.99
    # within the spread: no verdict
    close = np.array([1.0, 1.01, 3.0])
    v = matching.verdict(close, close[:, None] + 0.05 * rng.standard_normal((3, 400)))
    assert not v["significant"] and 0.3 < v["support"] < 0.8
    # an exact tie is never a result, even without noise
    tie = np.array([0.5, 0.5, 0.7])
    v = matching.verdict(tie, np.repeat(tie[:, None], 50, axis=1))
    assert v["support"] == 0.0 and not v["significant"]
    # no draws: no verdict; one candidate: nothing to beat
    assert not matching.verdict(points, np.full((3, 10), np.nan))["significant"]
    assert matching.verdict([2.0], np.zeros((1, 0)))["significant"]


def test_block_diagonal_mixture_is_the_spectrum_of_the_block_diagonal_matrix():
    from layerhessians.spectra import SpectralMeasure

    rng = np.random.default_rng(1)
    sizes = [3, 7, 12]
    blocks = []
    for d in sizes:
        a = rng.standard_normal((d, d))
        blocks.append(a @ a.T - d * np.eye(d) * (d == 7))
    exact = [np.linalg.eigvalsh(b) for b in blocks]
    measures = [SpectralMeasure(e, np.full(e.size, 1.0 / e.size)) for e in exact]
    mix = spread.block_diagonal_mixture(measures, sizes)
    dense = np.zeros((sum(sizes), sum(sizes)))
    at = 0
    for b in blocks:
        dense[at:at + len(b), at:at + len(b)] = b
        at += len(b)
    reference = np.linalg.eigvalsh(dense)
    np.testing.assert_allclose(np.sort(mix.nodes), reference, atol=1e-10)
    np.testing.assert_allclose(mix.weights, 1.0 / sum(sizes))
    assert mix.dim == sum(sizes)
    assert distances.spectrum_distance(mix, SpectralMeasure(reference, np.full(22, 1 / 22)),
                                     "w1-raw") < 1e-10
    # its density is the same mixture of the blocks' densities
    grid = np.linspace(-10, 40, 64)
    want = sum(d / 22 * m.density(grid=grid)[1] for d, m in zip(sizes, measures))
    np.testing.assert_allclose(mix.density(grid=grid)[1], want)
    with pytest.raises(UserError, match="positive size"):
        spread.block_diagonal_mixture(measures, [3, 0, 12])


def test_distance_table_spread_mixture_and_shares(tmp_path):
    run = load_run(write_run(tmp_path / "r", epochs=range(0, 4), best_layer=2, peak_epoch=2,
                             nodes=10))
    d = matching.layer_distances(run, replicates=40, seed=3)
    assert list(d.columns) == matching.DISTANCE_COLUMNS
    assert (d["distance_low"] < d["distance_high"]).all()
    assert all(len(x) == 40 for x in d["draws"])
    assert (d["spread"] == "dirichlet/dirichlet").all()
    dims = run.record.block_dims
    np.testing.assert_allclose(d.loc[d["epoch"] == 1, "share"],
                               [dims[b] / dims["full"] for b in LENET_LAYERS])
    assert (d["mixture_blocks"] == "layers only").all()
    # the mixture distance is the full spectrum's distance to sum_b d_b / D mu_b
    lookup = matching.measure_lookup(run)
    layers = [lookup(b, 2) for b in LENET_LAYERS]
    mix = spread.block_diagonal_mixture(layers, [dims[b] for b in LENET_LAYERS])
    got = d.loc[d["epoch"] == 2, "mixture_distance"].unique()
    assert got.size == 1 and got[0] == pytest.approx(distances.spectrum_distance(lookup("full", 2),
                                                                                mix))
    # the same seed gives the same draws; another seed other draws
    again = matching.layer_distances(run, replicates=40, seed=3)
    np.testing.assert_array_equal(np.stack(d["draws"]), np.stack(again["draws"]))
    other = matching.layer_distances(run, replicates=40, seed=4)
    assert not np.array_equal(np.stack(d["draws"]), np.stack(other["draws"]))
    # no replicates: no spread and no verdicts, but the distances
    bare = matching.layer_distances(run, replicates=0)
    assert bare["distance_low"].isna().all()
    np.testing.assert_allclose(bare["distance"], d["distance"])
    assert not matching.summarize(bare).loc[0, "peak_significant"]


def test_exact_layers_take_their_spread_from_the_full_spectrum(tmp_path):
    path = write_run(tmp_path / "r", epochs=[1, 2], nodes=8, vectors=2)
    spectra = pd.read_csv(path / "spectra.csv")
    spectra["method"] = np.where(spectra["block"] == "full", "slq", "exact")
    spectra = spectra[(spectra["block"] == "full") | (spectra["vector"] == 0)]
    spectra.to_csv(path / "spectra.csv", index=False)
    run = load_run(path)
    assert matching.measure_lookup(run)("fc1.weight", 1).method == "exact"
    d = matching.layer_distances(run, replicates=30)
    assert (d["spread"] == "vectors(2)/exact").all()
    # all layers see the same draws of the full spectrum: with the full spectrum fixed too
    # (exact), no spread is left
    spectra["method"] = "exact"
    spectra[spectra["vector"] == 0].to_csv(path / "spectra.csv", index=False)
    fixed = matching.layer_distances(load_run(path), replicates=30)
    assert (fixed["spread"] == "exact/exact").all()
    np.testing.assert_allclose(fixed["distance_low"], fixed["distance"])
    np.testing.assert_allclose(fixed["distance_high"], fixed["distance"])


def test_summary_verdicts_and_peak_epoch_care(tmp_path):
    run = load_run(write_run(tmp_path / "r", epochs=range(0, 6), best_layer=1, peak_epoch=3,
                             nodes=12))
    d = matching.layer_distances(run, "paper", replicates=60, points=128)
    s = matching.summarize(d).iloc[0]
    assert s["peak_epoch"] == 3 and s["peak_layer"] == "conv2.weight"
    assert s["peak_significant"] and s["peak_verdict"] == "conv2.weight"
    assert s["peak_low"] <= s["peak_high"] and 0 <= s["peak_support"] <= 1
    assert "3" in s["peak_epochs_within_spread"].split(",")
    assert s["best_share"] == pytest.approx(2000 / run.record.block_dims["full"])
    per_epoch = matching.epoch_verdicts(d)
    assert list(per_epoch["epoch"]) == [1, 2, 3, 4, 5]
    assert (per_epoch["layer"] == "conv2.weight").all()
    # two identical layers: no layer is significantly closer, and the summary says so
    twin = write_run(tmp_path / "twin", layers=("a.weight", "b.weight"), epochs=[1, 2],
                     spectra={(e, b): (np.r_[0.0, 0.5, 1.0 + e], [0.6, 0.3, 0.1])
                              for e in (1, 2) for b in ("full", "a.weight", "b.weight")})
    d = matching.layer_distances(load_run(twin), replicates=40)
    s = matching.summarize(d).iloc[0]
    assert not s["peak_significant"] and s["peak_verdict"] == matching.NO_VERDICT
    assert s["best_verdict"] == matching.NO_VERDICT


def test_match_prints_a_verdict_with_its_spread(tmp_path, capsys):
    twin = write_run(tmp_path / "twin", layers=("a.weight", "b.weight"), epochs=[1, 2],
                     spectra={(e, b): (np.r_[-0.2, 0.0, 0.5, 1.0 + e], [0.05, 0.55, 0.3, 0.1])
                              for e in (1, 2) for b in ("full", "a.weight", "b.weight")})
    assert main(["match", str(twin), "--out", str(tmp_path / "o"), "--replicates", "30",
                 "--dpi", "50", "--metric", "w1-maxabs", "w1-minmax"]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "--replicates is the former name of --draws" in captured.err  # 30 draws, said
    assert "note: 30 draws: supports near the 95% rule are unsteady" in captured.err
    assert (pd.read_csv(tmp_path / "o" / "match_distros_summary.csv")["replicates"] == 30).all()
    assert text.count("no layer significantly closer") == 4  # 2 metrics x (peak, training)
    assert "baseline: block-diagonal mixture over the layer weights only" in text
    assert "[" in text and "runner-up" in text
    table = pd.read_csv(tmp_path / "o" / "match_distros.csv")
    assert {"distance_low", "distance_high", "share", "mixture_distance"} <= set(table.columns)
    assert "draws" not in table.columns
    summary = pd.read_csv(tmp_path / "o" / "match_distros_summary.csv")
    assert (summary["peak_verdict"] == matching.NO_VERDICT).all()
    assert main(["match", str(twin), "--replicates", "-1"]) == 2
    # argparse (one-line usage error, exit 2): not one of the registry's names
    assert main(["match", str(twin), "--metric", "kl"]) == 2
    err = capsys.readouterr().err
    assert "--metric: invalid choice 'kl'" in err and "w1-maxabs" in err
