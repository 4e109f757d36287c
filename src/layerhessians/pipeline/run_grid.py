"""The seed README's pipeline over a grid, shared by ``reproduce`` and ``sweep``: train the
runs (skipping complete ones, resuming the others) with a launcher, plot each run, then
match layer spectra to full spectra across the runs."""

import sys
import time
from pathlib import Path

from layerhessians.analysis.matching import NO_VERDICT
from layerhessians.analysis.report import make_figures, match_runs
from layerhessians.data import ensure_files, get_spec, is_dataset_path, is_present
from layerhessians.errors import DatasetMissingError, UserError
from layerhessians.pipeline import launchers
from layerhessians.store.run import load_run

DEFAULT_DATASET_ROOT = "datasets"


def check_settings(runs, overrides=None) -> tuple:
    """``(configs, invalid)``: every valid run's checked
    :class:`~layerhessians.training.config.TrainConfig` by run name, and ``{run: message}``
    for the runs whose settings are refused, so that nothing trains before every run's
    settings were checked."""
    configs, invalid = {}, {}
    for entry in runs:
        try:
            configs[entry.run] = entry.config(overrides)
        except UserError as err:
            invalid[entry.run] = str(err)
    return configs, invalid


def check_datasets(configs) -> None:
    """Make every dataset the runs need readable (downloading the missing ones when the runs
    allow it) before any training; refuse at once, naming all that are missing.

    Raises:
        UserError: one line listing the missing datasets, where they belong and the
            ``layerhessians datasets --download`` command that fetches them.
    """
    needed = {}
    for config in configs:
        if is_dataset_path(config.dataset):  # your own data: read when its run starts
            continue
        key = (get_spec(config.dataset).name, str(config.dataset_root))
        needed[key] = needed.get(key, False) or config.download
    missing = {}
    for (name, root), download in needed.items():
        spec = get_spec(name)
        if is_present(spec, root):
            continue
        try:
            ensure_files(spec, root, download=download)
        except DatasetMissingError:
            missing.setdefault(root, []).append(name)
    if not missing:
        return
    parts = []
    for root, names in missing.items():
        option = "" if root == DEFAULT_DATASET_ROOT else f" --root {root}"
        parts.append(f"{', '.join(names)} (into {Path(root).resolve()}/NAME/: "
                     f"`layerhessians datasets --download {' '.join(names)}{option}`)")
    raise DatasetMissingError(f"datasets missing, nothing was trained: {'; '.join(parts)}; "
                              "offline, put the official files there (see `layerhessians "
                              "datasets`)")


def _significance(r, prefix: str) -> str:
    """``"LAYER (depth D) significantly closest"`` or ``"no layer significantly closer
    (closest LAYER, runner-up R)"`` from a summary row's ``prefix_*`` columns, with the
    parameter-share mixture baseline where the summary has it."""
    layer = f"#{r[prefix + '_index']} {r[prefix + '_layer']} (depth {r[prefix + '_depth']:.2f}"
    share = r.get(prefix + "_share")
    layer += f", {100 * share:.2g}% of parameters)" if share == share and share else ")"
    if r[prefix + "_verdict"] == NO_VERDICT:
        text = f"{NO_VERDICT} (closest {layer}, runner-up {r.get(prefix + '_runner_up')})"
    else:
        text = f"{layer} significantly closest"
    value = r.get("best_summed" if prefix == "best" else "peak_distance")
    mixture = r.get("mixture_summed" if prefix == "best" else "mixture_peak")
    if value is not None and mixture is not None and mixture == mixture:
        pair = f"{value:.4g} vs {mixture:.4g}"
        text += (f", but the parameter-share mixture is as close or closer ({pair})"
                 if mixture <= value else f", closer than the parameter-share mixture ({pair})")
    return text


def verdicts(summary) -> list:
    """One line per run of a match summary (:func:`~layerhessians.analysis.report.match_runs`'s
    ``summary``, its first metric): whether a layer is significantly closer to the full
    spectrum than every other over training and at the peak epoch (the ``*_verdict``
    columns), else (summaries without verdicts) the closest layers; a ``verdict`` column,
    where present, is printed as it is."""
    if summary is None or not len(summary):
        return []
    lines = []  # per run (the per-setting lines: setting_lines)
    for run, rows in summary.groupby("run", sort=False):
        r = rows.iloc[0]
        label = f"{r.get('model')}+{r.get('dataset')} [{run}]"
        if isinstance(r.get("verdict"), str) and r.get("verdict"):
            lines.append(f"{label}: {r['verdict']}")
            continue
        if not {"best_index", "best_layer", "best_depth"} <= set(rows.columns):
            lines.append(f"{label}: see match_distros_summary.csv")
            continue
        if {"best_verdict", "peak_verdict"} <= set(rows.columns):
            lines.append(f"{label}: over training, {_significance(r, 'best')}; at the peak "
                         f"epoch {r['peak_epoch']}, {_significance(r, 'peak')} [{r['metric']}]")
            continue
        text = (f"{label}: closest to the full spectrum over training: #{r['best_index']} "
                f"{r['best_layer']} (depth {r['best_depth']:.2f})")
        if "peak_layer" in r and r.get("peak_layer") == r["best_layer"]:
            text += f", also at the peak epoch {r['peak_epoch']}"
        elif "peak_layer" in r:
            text += (f"; at the peak epoch {r['peak_epoch']}: #{r['peak_index']} "
                     f"{r['peak_layer']} (depth {r['peak_depth']:.2f})")
        lines.append(text + f" [{r['metric']}]")
    return lines


def setting_lines(summary) -> list:
    """One line per setting with more than one replicate and metric
    (:func:`~layerhessians.analysis.pooling.setting_verdicts`; ``summary.attrs["settings"]``
    of :func:`~layerhessians.analysis.report.match_runs`)."""
    from layerhessians.analysis.pooling import setting_verdicts

    table = None if summary is None else summary.attrs.get("settings")
    if table is None or not len(table):
        return []
    groups = summary.attrs.get("groups")
    labels = {} if groups is None else dict(zip(groups["setting"], groups["label"]))
    return setting_verdicts(table[table["replicates"] > 1], labels)


def run_grid(runs, root, launcher, *, overrides=None, progress=None, plots=True, match=True,
             dry_run=False, command="reproduce") -> bool:
    """Train ``runs`` (:class:`~layerhessians.pipeline.grid.GridRun`) under ``root`` with
    ``launcher``, then plot and match them.

    Args:
        runs: the grid's runs, in order.
        root: folder of the run directories and the match outputs.
        launcher: one of :mod:`~layerhessians.pipeline.launchers`' launchers.
        overrides: settings (``train`` destinations) applied to every run.
        progress: progress bars (``None``: on a terminal only, ``False``: never).
        plots: also plot each run.
        match: also match the runs (Sankar et al.'s layer matching).
        dry_run: print what would run, train nothing.
        command: the name used in messages.

    Returns:
        ``True`` when every run, plot and the match succeeded (runs that failed are named on
        stderr; running the same grid again resumes them).

    Raises:
        UserError: the launcher cannot run here (checked before anything trains).
    """
    root = Path(root)
    configs, invalid = check_settings(runs, overrides)
    if not dry_run:
        launcher.check()
        if not isinstance(launcher, launchers.SlurmLauncher):  # the data is on this machine
            check_datasets([configs[r.run] for r in runs if r.run in configs
                            and not r.is_complete(root)])
    job_root = root if isinstance(launcher, launchers.SequentialLauncher) else root.absolute()
    failed, started, tasks = [], time.time(), []
    for i, entry in enumerate(runs, 1):
        done = entry.completed_epoch(root)
        complete = entry.is_complete(root)
        status = "complete" if complete else (
            f"resumes after epoch {done}" if done is not None else "new")
        print(f"[{i}/{len(runs)}] {entry.run}: {status}", flush=True)
        task = launchers.Task(entry.run, str(entry.path(job_root)),
                              {**entry.flags, **(overrides or {})}, progress)
        if entry.run in invalid and not complete:  # refused before anything trains
            print(f"$ {launcher.task_command(task)}", flush=True)
            print(f"{entry.run}: error: {invalid[entry.run]}", file=sys.stderr, flush=True)
            failed.append(entry.run)
            continue
        if dry_run:
            print(f"  {launcher.task_command(task)}")
        if not complete:
            tasks.append(task)
    if dry_run:
        print(f"{command}: {len(tasks)} of {len(runs)} runs to train, {launcher.describe()}")
        return not failed

    if tasks and not isinstance(launcher, launchers.SequentialLauncher):
        print(f"{command}: {len(tasks)} runs to train, {launcher.describe()}", flush=True)
    failed += [o.run for o in launcher.launch(tasks) if not o.ok]

    present = [r for r in runs if r.run not in failed and r.completed_epoch(root) is not None]
    figures = []
    if plots:
        for entry in present:
            try:
                for path in make_figures(load_run(entry.path(root))):
                    print(f"image saved at: {path}")
                    figures.append(path)
            except UserError as err:
                print(f"{command}: plot {entry.run}: error: {err}", file=sys.stderr)
                failed.append(entry.run)
    match_ok, summary = True, None
    if match and present:
        try:
            _, summary, written = match_runs([load_run(r.path(root)) for r in present], out=root)
            for path in written:
                print(f"saved: {path}")
            figures += [p for p in written if Path(p).suffix != ".csv"]
        except UserError as err:
            print(f"{command}: match: error: {err}", file=sys.stderr)
            match_ok = False
    elif match:
        match_ok = False
        print(f"{command}: no run has spectra yet; nothing to match", file=sys.stderr)

    minutes = (time.time() - started) / 60
    figures = [str(p) for p in figures if Path(p).is_file()]
    print(f"{command}: {len(present)}/{len(runs)} runs with spectra, {minutes:.1f} min",
          flush=True)
    for line in setting_lines(summary):
        print(f"{command}: pooled: {line}", flush=True)
    if figures:  # only figures that exist are named
        match_figures = [p for p in figures if Path(p).name.startswith("match_distros")]
        print(f"{command}: figures: " + ", ".join(match_figures or figures[:1]) + (
            " and each run's images/" if plots and present else ""), flush=True)
    for line in verdicts(summary):
        print(f"{command}: {line}", flush=True)
    if failed:
        print(f"{command}: failed: {', '.join(dict.fromkeys(failed))} (see their messages above; "
              "run the same command again to resume)", file=sys.stderr)
    return not failed and match_ok
