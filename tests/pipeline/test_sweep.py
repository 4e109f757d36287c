"""``layerhessians sweep`` and the launchers: sequential, submitit local jobs, Slurm parameters.

Slurm itself cannot run here: its test builds the real ``SlurmExecutor`` (with submitit's
"is srun installed" check patched) and reads the sbatch script submitit would submit.
"""

import functools
import json
import os
import sys

import cloudpickle
import pytest

from layerhessians.cli.main import main
from layerhessians.errors import UserError
from layerhessians.pipeline import launchers
from layerhessians.store.run import load_run
from layerhessians.store.writer import RunStore

submitit = pytest.importorskip("submitit")

# the probe jobs below are pickled by value, so the job processes need not import this file
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TINY = "--device cpu --no-progress --hessian-iterations 4 --examples_per_class 2 --no-layers"


def _probe(flags):
    if "fail" in flags:
        raise RuntimeError("probe asked to fail")
    return os.environ.get("CUDA_VISIBLE_DEVICES"), dict(flags)


def _probe_factory(task):
    return functools.partial(_probe, dict(task.flags))


def _args(argv):
    """Parsed ``sweep`` flags (the launcher ones included)."""
    from layerhessians.cli.main import build_parser

    return build_parser("sweep").parse_args(["sweep", "grid.json", *argv])


def _write_grid(path, runs):
    path.write_text(json.dumps({"runs": [{"run": name, "flags": flags} for name, flags in runs]}))
    return path


# ----------------------------------------------------------------------------- flag handling
def test_parse_gpus():
    assert launchers.parse_gpus("0,1, 3") == [0, 1, 3]
    assert launchers.parse_gpus(None) == []
    for bad in ("a,b", "0,0", "-1", ","):
        with pytest.raises(UserError, match="--gpus"):
            launchers.parse_gpus(bad)


def test_with_device_keeps_the_users_choice():
    assert launchers.with_device({"seed": 1}, "cuda:0") == {"seed": 1, "device": "cuda:0"}
    assert launchers.with_device({"device": "cpu"}, "cuda:0") == {"device": "cpu"}
    assert launchers.with_device({"cuda": 1}, "cuda") == {"cuda": 1}
    assert launchers.with_device({"seed": 1}, None) == {"seed": 1}


def test_make_launcher_choice_and_misuse(tmp_path):
    assert isinstance(launchers.make_launcher(_args([]), tmp_path), launchers.SequentialLauncher)
    local = launchers.make_launcher(_args(["--gpus", "2,3", "--time", "30"]), tmp_path)
    assert isinstance(local, launchers.LocalLauncher)
    assert local.gpus == [2, 3] and local.timeout_min == 30
    assert local.folder == tmp_path.absolute() / ".jobs"
    slurm = launchers.make_launcher(_args(["--launcher", "slurm", "--partition", "gpu"]), tmp_path)
    assert isinstance(slurm, launchers.SlurmLauncher)
    assert slurm.parameters["partition"] == "gpu"
    assert slurm.parameters["time"] == launchers.SLURM_DEFAULT_MINUTES
    misuse = {"applies only to --launcher slurm": ["--partition", "gpu"],
              "--mem, --slurm-option apply only": ["--mem", "4", "--slurm-option", "qos=x"],
              "--gpus-per-job N": ["--launcher", "slurm", "--gpus", "0"],
              "--time limits submitit jobs": ["--time", "10"],
              "whole minutes": ["--launcher", "slurm", "--time", "1.5"],
              "KEY=VALUE": ["--launcher", "slurm", "--slurm-option", "account"]}
    for message, argv in misuse.items():
        with pytest.raises(UserError, match=message):
            launchers.make_launcher(_args(argv), tmp_path)


# ----------------------------------------------------------------------------- Slurm
def test_slurm_executor_parameters_and_sbatch_script(tmp_path, monkeypatch):
    """The sbatch script submitit would submit for a sweep job (nothing is submitted)."""
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    args = _args(["--launcher", "slurm", "--partition", "gpu", "--time", "90",
                  "--gpus-per-job", "2", "--cpus-per-task", "8", "--mem", "32",
                  "--slurm-option", "account=abc"])
    launcher = launchers.make_launcher(args, tmp_path)
    launcher.check()
    executor = launcher.executor()
    assert executor.max_num_timeout == launchers.MAX_REQUEUES
    executor.update_parameters(job_name=launchers.job_name("model=LeNet,dataset=MNIST,te,run1"))
    script = executor._make_submission_file_text("python -m submitit.core._submit X", "uid")
    jobs = tmp_path.absolute() / ".jobs"
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB", "#SBATCH --nodes=1",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --account=abc",
                 f"#SBATCH --signal=USR2@{launchers.SIGNAL_DELAY_S}",
                 "#SBATCH --job-name=lh:model=LeNet,dataset=MNIST,te,run1",
                 f"#SBATCH --output={jobs}/%j_0_log.out"):
        assert line in script.splitlines(), line
    task = launchers.Task("r", "runs/r", {"seed": 1})
    assert launcher.prepare(task).flags == {"seed": 1, "device": "cuda"}
    cpu = launchers.make_launcher(_args(["--launcher", "slurm", "--gpus-per-job", "0"]), tmp_path)
    assert cpu.prepare(task) == task
    assert "--gpus-per-node=0" in launchers.sbatch_flags(cpu.parameters)


def test_slurm_without_submitit_says_how_to_install(tmp_path, monkeypatch, capsys):
    grid = _write_grid(tmp_path / "grid.json", [("a", {"num_epochs": 1})])
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit -> ImportError
    code = main(["sweep", str(grid), "--root", str(tmp_path), "--launcher", "slurm"])
    assert code == 2
    assert "pip install 'layerhessians[cluster]'" in capsys.readouterr().err


def test_slurm_without_srun_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: -1))
    with pytest.raises(UserError, match="Slurm login node"):
        launchers.make_launcher(_args(["--launcher", "slurm"]), tmp_path).check()


def test_train_job_checkpoint_resubmits_the_same_command():
    task = launchers.Task("a", "runs/a", {"seed": 1})
    job = launchers.TrainJob(task)
    assert isinstance(job, submitit.helpers.Checkpointable)
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert isinstance(delayed.function, launchers.TrainJob)
    assert delayed.function.task == task
    assert delayed.args == () and delayed.kwargs == {}


def test_failure_reason_prefers_the_train_error_line(tmp_path):
    log = tmp_path / "1_0_log.err"
    log.write_text("noise\nlayerhessians train: error: unknown model 'X'; choose one of LeNet\n"
                   "Traceback (most recent call last):\nRuntimeError: exited with status 2\n")
    failed = submitit.core.utils.FailedJobError(
        "Job failed with trace:\n----------------------\nTraceback ...\n"
        "RuntimeError: layerhessians train exited with status 2\n----------------------\nlogs")
    assert launchers._failure_reason(failed, log) == \
        "layerhessians train: error: unknown model 'X'; choose one of LeNet"
    assert launchers._failure_reason(failed, tmp_path / "missing.err") == \
        "RuntimeError: layerhessians train exited with status 2"
    killed = submitit.core.utils.UncompletedJobError(
        "Job 7 (task: 0) with path /x/7_0_result.pkl\nhas not produced any output "
        "(state: OUT_OF_MEMORY)\nError stream produced:\n" + "-" * 40 + "\nslurmstepd: oom\n")
    assert launchers._failure_reason(killed, None) == \
        "the job ended without a result (state OUT_OF_MEMORY)"


# ----------------------------------------------------------------------------- local jobs
def test_local_launcher_one_job_per_gpu(tmp_path, capsys):
    """Each job sees only its GPU; a failing job is reported with its reason and log."""
    launcher = launchers.LocalLauncher(tmp_path / ".jobs", gpus=[3, 5], poll_s=0.1,
                                       job_factory=_probe_factory)
    tasks = [launchers.Task("a", "a"), launchers.Task("b", "b", {"fail": True}),
             launchers.Task("c", "c", {"device": "cpu"})]
    outcomes = launcher.launch(tasks)
    assert [o.run for o in outcomes] == ["a", "b", "c"]
    assert [o.ok for o in outcomes] == [True, False, True]
    gpus = {o.run: o.result[0] for o in outcomes if o.ok}
    assert set(gpus.values()) <= {"3", "5"}
    assert outcomes[0].result[1] == {"device": "cuda:0"}
    assert outcomes[2].result[1] == {"device": "cpu"}
    assert "RuntimeError: probe asked to fail" in outcomes[1].reason
    assert outcomes[1].log.parent == tmp_path / ".jobs" and outcomes[1].log.exists()
    printed = capsys.readouterr()
    assert printed.out.count("[job ") >= 3 and "FAILED" in printed.err


def test_sweep_trains_with_local_jobs_then_skips_complete_runs(tmp_path, monkeypatch, capsys):
    """Real ``train`` runs as submitit local jobs; the second sweep trains nothing; the
    default launcher skips them too, and a failing run does not stop the others."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two jobs share the test machine's cores
    monkeypatch.chdir(tmp_path)
    grid = _write_grid(tmp_path / "grid.json", [
        ("a", {"num_epochs": 1, "model": "LeNet", "dataset": "Digits"}),
        ("b", {"num_epochs": 1, "learning_rate": 0.01, "dataset": "Digits"}),
        ("bad", {"num_epochs": 1, "model": "NoSuchNet"}),
    ])
    root = tmp_path / "runs"
    common = ["sweep", str(grid), "--root", str(root), "--no-plots", "--no-match",
              "--train-args", TINY]

    assert main([*common, "--gpus", "0,1", "--only", "a", "b"]) == 0
    out, _ = capsys.readouterr()
    assert out.count("started on GPU") == 2 and out.count(": done") == 2
    for name in ("a", "b"):
        assert RunStore(root / name).completed_epoch == 1
        assert list(load_run(root / name).metrics["epoch"]) == [1]
    logs = sorted((root / ".jobs").glob("*_0_log.out"))
    assert len(logs) == 2 and "$ layerhessians train -r" in logs[0].read_text()
    stamps = {n: (root / n / "metrics.csv").stat().st_mtime_ns for n in ("a", "b")}

    # the second time, the complete runs are skipped: no job is submitted
    assert main([*common, "--gpus", "0,1", "--only", "a", "b"]) == 0
    out, _ = capsys.readouterr()
    assert "[1/2] a: complete" in out and "[2/2] b: complete" in out and "[job" not in out
    assert sorted((root / ".jobs").glob("*_0_log.out")) == logs

    # the default launcher (this process) skips them too and reports the bad run
    assert main(common) == 1
    out, err = capsys.readouterr()
    assert "[1/3] a: complete" in out and "[2/3] b: complete" in out and "[3/3] bad: new" in out
    assert out.count("$ layerhessians train") == 1 and "sweep: failed: bad" in err
    assert "unknown model 'NoSuchNet'" in err
    assert {n: (root / n / "metrics.csv").stat().st_mtime_ns for n in ("a", "b")} == stamps
