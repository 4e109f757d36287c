"""Verdicts pooled over replicated runs (issue 20): what a replicate is, pooled intervals with
known answers, one replicate = the single-run numbers, intervals that contain their estimate,
and the batched draws against the per-draw computation."""

import json

import numpy as np
import pandas as pd
import pytest

from layerhessians.analysis import draws as batch
from layerhessians.analysis import matching as compare
from layerhessians.analysis import pooling
from layerhessians.analysis.matching import block_diagonal_mixture, distance_entry
from layerhessians.cli.main import main
from layerhessians.spectra.measure import SpectralMeasure
from layerhessians.store.run import load_run
from runfactory import write_run

BASE = {"model": "LeNet", "dataset": "MNIST5k", "learning_rate": 0.01, "seed": 0,
        "hessian": {"iterations": 128, "subset_seed": 0}}


def config(**changes):
    out = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        if key.startswith("hessian."):
            out["hessian"][key.split(".", 1)[1]] = value
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------- grouping
def test_runs_differing_only_in_their_seeds_are_one_setting():
    configs = [config(), config(seed=1), config(**{"hessian.subset_seed": 1}),
               config(seed=2, threads=4, device="cuda:0", dataset_root="/elsewhere"),
               config(learning_rate=0.1), config(**{"hessian.iterations": 64}),
               config(dataset="Digits", seed=3)]
    ids = [f"r{i}" for i in range(len(configs))]
    settings, groups = pooling.group_runs(ids, configs)
    assert [s["runs"] for s in settings] == [["r0", "r1", "r2", "r3"], ["r4"], ["r5"], ["r6"]]
    notes = dict(zip(groups["run"], groups["note"]))
    assert notes["r4"] == "not pooled with S1: differs in learning_rate 0.1 vs 0.01"
    assert notes["r5"] == "not pooled with S1: differs in hessian.iterations 64 vs 128"
    assert "dataset 'Digits' vs 'MNIST5k'" in notes["r6"]
    assert list(groups["seed"]) == [0, 1, 0, 2, 0, 0, 3]
    # labels tell settings of one model and dataset apart
    labels = dict(zip(groups["setting"], groups["label"]))
    assert labels["S1"] != labels["S2"] and labels["S4"] == "LeNet+Digits"


def test_a_repeat_of_a_run_is_not_a_replicate():
    settings, groups = pooling.group_runs(["a", "b", "c"], [config(), config(), config(seed=1)])
    assert [s["runs"] for s in settings] == [["a", "c"], ["b"]]
    assert "a repeat of a run, not a replicate" in groups["note"].iloc[1]
    assert len(set(groups["label"])) == 2


def test_other_data_or_other_compared_epochs_are_not_pooled():
    configs = [config(dataset_checksum="aa"), config(seed=1, dataset_checksum="bb"),
               config(seed=2, dataset_checksum="aa")]
    layouts = [(["a", "b"], [1, 2, 3]), (["a", "b"], [1, 2, 3]), (["a", "b"], [1, 2])]
    settings, groups = pooling.group_runs(["x", "y", "z"], configs, layouts)
    assert [s["runs"] for s in settings] == [["x"], ["y"], ["z"]]
    assert "dataset_checksum" in groups["note"].iloc[1]
    assert "compared epochs" in groups["note"].iloc[2]


# ----------------------------------------------------------------------------- pooling
def synthetic_distances(per_run, epochs=3, draws=200, noise=0.02, seed=0):
    """A distance table: ``per_run[r] = [d_layer0, d_layer1]`` at every epoch, draws with
    Gaussian noise; the mixture at 1.5 (between the two)."""
    rng = np.random.default_rng(seed)
    rows = []
    for r, values in enumerate(per_run):
        for epoch in range(1, epochs + 1):
            mix_draws = 1.5 + noise * rng.normal(size=draws)
            for i, value in enumerate(values):
                rows.append({"run": f"r{r}", "model": "LeNet", "dataset": "MNIST5k",
                             "epoch": epoch, "layer": f"l{i}", "index": i, "depth": float(i),
                             "share": 0.5, "distance": value + 0.1 * (epoch == 2),
                             "mixture_distance": 1.5, "metric": "w1-maxabs",
                             "draws": value + 0.1 * (epoch == 2) + noise * rng.normal(size=draws),
                             "mixture_draws": mix_draws})
    return pd.DataFrame(rows)


def one_setting(ids):
    return [{"setting": "S1", "label": "LeNet+MNIST5k", "runs": list(ids), "nearest": None}]


def test_a_layer_closer_in_every_replicate_is_significant():
    d = synthetic_distances([[1.0, 2.0], [1.1, 1.9], [0.9, 2.2], [1.0, 2.1]])
    table = pooling.pool_settings(d, one_setting(["r0", "r1", "r2", "r3"]))
    for scope in pooling.SCOPES:
        rows = table[table["scope"] == scope].set_index("layer")
        assert rows.loc["l0", "significant"] and rows.loc["l0", "verdict"] == "l0"
        assert rows.loc["l0", "closest_in"] == 4 and rows.loc["l1", "closest_in"] == 0
        assert rows.loc["l0", "support"] == 1.0 and rows.loc["l0", "replicates"] == 4
        # the mean over replicates, inside its interval; the mixture is pooled alike
        assert rows.loc["l0", "distance_low"] <= rows.loc["l0", "distance"] \
            <= rows.loc["l0", "distance_high"]
        assert rows.loc["l0", "baseline"] == "closer than the mixture"
        assert rows.loc["l1", "baseline"] == "mixture closer"
    summed = table[table["scope"] == "summed"].set_index("layer")
    assert summed.loc["l0", "distance"] == pytest.approx(3 * 1.0 + 0.1)
    peak = table[table["scope"] == "peak"].iloc[0]
    assert peak["peak_epoch"] == 1 and peak["peak_epochs"] == "1,1,1,1"
    lines = pooling.setting_verdicts(table)
    assert lines[0].startswith("LeNet+MNIST5k [S1, 4 replicates]: over training, l0 ")
    assert "closest in 4 of 4" in lines[0] and "closer than the parameter-share mixture" \
        in lines[0]


def test_a_layer_closer_in_half_the_replicates_is_not_significant():
    # each run alone is decisive (tiny SLQ noise), but the replicates disagree
    d = synthetic_distances([[1.0, 2.0], [2.0, 1.0], [1.0, 2.0], [2.0, 1.0]], noise=1e-3)
    table = pooling.pool_settings(d, one_setting(["r0", "r1", "r2", "r3"]))
    for scope in pooling.SCOPES:
        rows = table[table["scope"] == scope].set_index("layer")
        assert not rows["significant"].any()
        assert (rows["verdict"] == compare.NO_VERDICT).all()
        assert list(rows["closest_in"]) == [2, 2]
        assert rows["support"].max() < 0.95
    assert "no layer significantly closer" in pooling.setting_verdicts(table)[0]
    assert "closest in 2 of 4" in pooling.setting_verdicts(table)[0]


def test_hierarchical_draws_resample_replicates_and_keep_one_replicate_as_is():
    rng = np.random.default_rng(0)
    one = rng.normal(size=(1, 3, 50))
    np.testing.assert_array_equal(pooling.hierarchical_draws(one, rng), one[0])
    # two replicates at 0 and 10 with no inner noise: draws are means of 2 picks -> 0, 5, 10
    two = np.stack([np.zeros((1, 400)), np.full((1, 400), 10.0)])
    pooled = pooling.hierarchical_draws(two, np.random.default_rng(1))
    assert set(np.unique(pooled)) == {0.0, 5.0, 10.0}
    assert 0.35 < np.mean(pooled == 5.0) < 0.65


def test_runs_of_one_training_seed_are_resampled_together():
    """Two trainings (0 and 10), each measured on two Hessian subsets (no inner noise): as
    four independent replicates the draws are means of 4 picks (many values, narrow); as two
    clusters they are means of 2 trainings (0, 5, 10: as wide as two runs alone)."""
    runs = np.stack([np.zeros((1, 400)), np.zeros((1, 400)), np.full((1, 400), 10.0),
                     np.full((1, 400), 10.0)])
    clustered = pooling.hierarchical_draws(runs, np.random.default_rng(1), [0, 0, 1, 1])
    assert set(np.unique(clustered)) == {0.0, 5.0, 10.0}
    assert 0.35 < np.mean(clustered == 5.0) < 0.65
    independent = pooling.hierarchical_draws(runs, np.random.default_rng(1))
    assert len(np.unique(independent)) == 5  # 0, 2.5, 5, 7.5, 10
    assert np.std(independent) < 0.8 * np.std(clustered)
    # distinct labels: the independent scheme, draw for draw
    np.testing.assert_array_equal(
        pooling.hierarchical_draws(runs, np.random.default_rng(1), [3, 2, 1, 0]), independent)


def test_one_replicate_reproduces_the_single_run_numbers_exactly(tmp_path):
    run = load_run(write_run(tmp_path / "r", epochs=range(0, 6), best_layer=2, peak_epoch=3))
    d = compare.distance_table(run, ["w1-maxabs", "paper"], replicates=60, points=128)
    d = d.assign(run="r")
    summary = compare.summarize(d)
    settings, _ = pooling.group_runs(["r"], [run.config])
    table = pooling.pool_settings(d, settings)
    for _, s in summary.iterrows():
        rows = table[table["metric"] == s["metric"]]
        summed = rows[(rows["scope"] == "summed") & (rows["layer"] == s["best_layer"])].iloc[0]
        assert summed["distance"] == s["best_summed"]
        assert (summed["distance_low"], summed["distance_high"]) == (s["best_low"], s["best_high"])
        assert summed["significant"] == s["best_significant"]
        assert summed["support"] == s["best_support"]
        assert summed["mixture_distance"] == pytest.approx(s["mixture_summed"], rel=1e-12)
        peak = rows[(rows["scope"] == "peak") & (rows["layer"] == s["peak_layer"])].iloc[0]
        assert peak["peak_epoch"] == s["peak_epoch"]
        assert peak["distance"] == s["peak_distance"]
        assert (peak["distance_low"], peak["distance_high"]) == (s["peak_low"], s["peak_high"])
        assert peak["support"] == s["peak_support"]
        assert (peak["mixture_low"], peak["mixture_high"]) == (s["mixture_peak_low"],
                                                               s["mixture_peak_high"])


# ----------------------------------------------------------------------------- intervals
def test_the_interval_contains_its_estimate_even_when_the_draws_do_not():
    # the case: draws beside the estimate (7.685e-05 [6.281e-05, 7.654e-05])
    rng = np.random.default_rng(0)
    draws = rng.uniform(6.2e-05, 7.66e-05, size=200)
    point = 7.685e-05
    tail = np.percentile(draws, [2.5, 97.5])
    assert not tail[0] <= point <= tail[1]  # the percentile interval excludes it
    low, high = compare.interval(draws, point)
    assert low <= point <= high
    # its width is the draws' percentile width, centred by their median
    assert high - low == pytest.approx(tail[1] - tail[0])
    assert point - low == pytest.approx(np.median(draws) - tail[0])
    for _ in range(200):
        draws = rng.gamma(rng.uniform(0.2, 5), size=rng.integers(2, 300)) * rng.uniform(0.1, 3)
        point = rng.uniform(-0.5, 1.5) * draws.max()
        low, high = compare.interval(draws, point)
        assert low <= point <= high
    assert np.isnan(compare.interval(np.array([]), 1.0)[0])
    assert compare.interval(np.full(5, 2.0), 2.0) == (2.0, 2.0)
    assert compare.interval(np.array([0.0, 1.0, 2.0]), 0.1)[0] == 0.0  # distances stay >= 0


# ----------------------------------------------------------------------------- batched draws
@pytest.mark.parametrize("name", ["w1-maxabs", "w1-maxabs-nonzero", "w1-minmax", "w1-raw",
                                  "paper"])
def test_batched_distances_equal_the_per_draw_computation(name):
    rng = np.random.default_rng(3)

    def measure(n, dim, scale=1.0, shift=0.0):
        w = rng.random(n)
        return SpectralMeasure(np.sort(rng.normal(size=n)) * scale + shift, w / w.sum(), dim=dim)

    full, layers = measure(24, 500, 3.0), [measure(24, 100, 1.0, 0.5), measure(16, 300, 2.0)]
    exact = SpectralMeasure(np.r_[0.0, rng.random(12)], np.r_[0.5, np.full(12, 0.5 / 12)],
                            dim=200)
    dims, count = [100, 300, 200], 6

    def dirichlet(m):
        g = rng.gamma(np.full((m.nodes.size, count), 2.0))
        return batch.Draws(m.nodes, g / g.sum(axis=0), m.steps)

    full_d = dirichlet(full)
    parts_d = [dirichlet(m) for m in layers] + [batch.fixed_draws(exact)]
    entry = distance_entry(name, points=256)
    for k, other in enumerate(parts_d + [batch.mixture_draws(parts_d, dims)]):
        got = np.broadcast_to(batch.batched_distance(name, full_d, other, points=256), (count,))
        for b in range(count):
            f = SpectralMeasure(full_d.nodes, full_d.weights[:, b], dim=500)
            rp = [SpectralMeasure(p.nodes, p.weights[:, min(b, p.weights.shape[1] - 1)], dim=d)
                  for p, d in zip(parts_d, dims)]
            ref = entry(f, rp[k] if k < 3 else block_diagonal_mixture(rp, dims))
            assert got[b] == pytest.approx(ref, rel=1e-10, abs=1e-14), (k, b)


# ----------------------------------------------------------------------------- CLI
def test_match_pools_replicates_end_to_end(tmp_path, capsys):
    paths = [write_run(tmp_path / f"model=LeNet,dataset=MNIST,te,run{k + 1}", epochs=range(0, 4),
                       best_layer=2, peak_epoch=2, config={"seed": k}) for k in range(3)]
    paths.append(write_run(tmp_path / "lr", epochs=range(0, 4), best_layer=1, peak_epoch=2,
                           config={"learning_rate": 0.5}))
    out = tmp_path / "out"
    argv = ["match", *map(str, paths), "--out", str(out), "--draws", "40", "--dpi", "50"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "S1 LeNet+MNIST (learning_rate=0.0001): 3 runs" in text
    assert "not pooled with S1: differs in learning_rate 0.5 vs 0.0001" in text
    assert "[S1, 3 replicates]: over training, " in text and "closest in 3 of 3" in text
    table = pd.read_csv(out / "match_distros_settings.csv")
    assert {"model", "dataset", "metric", "layer", "replicates", "distance", "distance_low",
            "distance_high", "closest_in"} <= set(table.columns)
    assert sorted(table["replicates"].unique()) == [1, 3]
    groups = pd.read_csv(out / "match_distros_groups.csv")
    assert list(groups["setting"]) == ["S1", "S1", "S1", "S2"]
    # a second match into the same folder says that it overwrites the first's outputs
    assert main(argv) == 0
    assert "note: overwriting the outputs of an earlier match" in capsys.readouterr().out


def test_match_in_worker_processes_gives_the_same_numbers(tmp_path):
    from layerhessians.analysis.report import match_runs

    runs = [load_run(write_run(tmp_path / f"r{k}", epochs=range(0, 3), best_layer=k,
                               config={"seed": k})) for k in range(3)]
    one = match_runs(runs, out=tmp_path / "one", replicates=20, dpi=40, progress=False)
    two = match_runs(runs, out=tmp_path / "two", replicates=20, dpi=40, progress=False,
                     workers=2)
    pd.testing.assert_frame_equal(one[0].drop(columns=["draws", "mixture_draws"]),
                                  two[0].drop(columns=["draws", "mixture_draws"]))
    pd.testing.assert_frame_equal(one[1].attrs["settings"], two[1].attrs["settings"])


def test_why_not_pooled_names_the_differences_or_a_repeat():
    assert pooling.not_pooled(("S1", [("learning_rate", 0.05, 0.02)])) == \
        "not pooled with S1: differs in learning_rate 0.05 vs 0.02"
    assert pooling.not_pooled(("S2", [])) == \
        "not pooled with S2: the same settings and seeds (a repeat of a run, not a replicate)"
