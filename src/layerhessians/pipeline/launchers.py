"""Launchers: where and how the training runs of a grid execute.

Three launchers share one interface, ``launcher.launch(tasks) -> [Outcome]``:

- :class:`SequentialLauncher` (default): in this process, one run after another; needs
  nothing beyond this package.
- :class:`LocalLauncher` (``--gpus 0,1``): submitit's ``LocalExecutor``, one job per listed
  GPU at a time, each with ``CUDA_VISIBLE_DEVICES=G`` and ``--device cuda:0``.
- :class:`SlurmLauncher` (``--launcher slurm``): submitit's ``SlurmExecutor``, one job per
  run. A job that is preempted or reaches its time limit is requeued by submitit
  (:class:`TrainJob` is ``Checkpointable``) and continues from its last committed epoch,
  because every task resumes.

Job logs (submitit's folder) go to ``ROOT/.jobs/``: ``JOBID_0_log.out`` / ``.err``.
A :class:`Task` is one run: its name, directory and settings; every launcher trains it
through the library's :func:`~layerhessians.training.train` (jobs pickle the task).
"""

import re
import shlex
import sys
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

from layerhessians.errors import SettingError, UserError
from layerhessians.pipeline.grid import flags_to_config
from layerhessians.training import train
from layerhessians.training.config import TrainConfig
from layerhessians.vocabulary import INSTALL_HINT, LAUNCHERS, SLURM_DEFAULT_MINUTES  # noqa: F401

try:  # optional: only the submitit launchers need it
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # pragma: no cover - exercised only without the cluster extra
    _Checkpointable = object

JOBS_FOLDER = ".jobs"
MAX_REQUEUES = 20  # timeouts a Slurm job may be requeued after (preemptions do not count)
SIGNAL_DELAY_S = 120  # seconds between submitit's warning signal and the time limit
LOCAL_NO_LIMIT_MINUTES = 60 * 24 * 365
DEVICE_FLAGS = ("device", "cuda")


@dataclass(frozen=True)
class Task:
    """One training run: ``run`` (its grid name), ``run_dir``, ``flags`` (its settings by
    ``layerhessians train`` destination, overrides applied) and ``progress`` (bars: ``None``
    on a terminal only, ``False`` never). It always resumes: a complete epoch is never
    trained twice."""

    run: str
    run_dir: str
    flags: dict = field(default_factory=dict)
    progress: object = None

    def config(self) -> TrainConfig:
        """The run's settings (validated by :func:`~layerhessians.training.train`)."""
        return flags_to_config(self.flags, validate=False)

    def with_device(self, device) -> "Task":
        """This task on ``device`` unless its flags already choose one (``device``/``cuda``)."""
        return replace(self, flags=with_device(self.flags, device))

    def command(self) -> str:
        """What runs, for logs: ``layerhessians train -r RUN_DIR --resume`` and the settings."""
        settings = ", ".join(f"{k}={v}" for k, v in self.flags.items())
        return (f"layerhessians train -r {shlex.quote(str(self.run_dir))} --resume"
                + (f"  # {settings}" if settings else ""))


def run_task(task: Task) -> Path:
    """Train (or resume) ``task`` in this process through the library's
    :func:`~layerhessians.training.train`; returns the run directory.

    Raises:
        UserError: bad settings or a run that cannot continue (see ``train``).
    """
    return train(task.config(), task.run_dir, resume="allow", progress=task.progress,
                 command=task.command())


@dataclass
class Outcome:
    """How a task ended: ``ok``; for a job also its ``job_id`` and log file; ``reason`` if not ok."""

    run: str
    ok: bool
    job_id: "str | None" = None
    reason: str = ""
    log: "Path | None" = None
    result: object = None  # what the job returned (the run directory)


class TrainJob(_Checkpointable):
    """A :class:`Task` as a submitit job: submitit pickles it (its settings) and calls it in
    the job's process, which trains through the library.

    A failing run raises, so the job is marked failed. On preemption or timeout, submitit
    calls :meth:`checkpoint`, which resubmits the same task: it resumes from the last
    committed epoch.
    """

    def __init__(self, task: Task):
        self.task = task

    def __call__(self) -> Path:
        """Train (or resume) the task in the job's process.

        Returns:
            The run directory.

        Raises:
            UserError: bad settings or a run that cannot continue (the job is marked failed).
        """
        print(f"$ {self.task.command()}", flush=True)
        return run_task(self.task)

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on preemption or timeout: resubmit the same task (it resumes).

        Args:
            *args: passed on to the resubmitted job.
            **kwargs: passed on to the resubmitted job.

        Returns:
            A ``DelayedSubmission`` of a new :class:`TrainJob` for the same task.
        """
        from submitit.helpers import DelayedSubmission  # optional dependency

        print("requeued: the run continues from its last committed epoch (--resume)", flush=True)
        return DelayedSubmission(TrainJob(self.task), *args, **kwargs)


# ----------------------------------------------------------------------------- helpers
def _require_submitit(what: str):
    try:
        import submitit
    except ImportError:
        raise UserError(f"{what} needs submitit: {INSTALL_HINT}") from None
    return submitit


def parse_gpus(text) -> list:
    """``"0,1,3"`` -> ``[0, 1, 3]`` (GPU indices, distinct, non-negative)."""
    if text is None:
        return []
    try:
        gpus = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--gpus {text!r}: list GPU indices separated by commas, e.g. --gpus 0,1") from None
    if not gpus or min(gpus) < 0 or len(set(gpus)) != len(gpus):
        raise UserError(f"--gpus {text!r}: list distinct GPU indices (>= 0) separated by commas, "
                        "e.g. --gpus 0,1")
    return gpus


def names_device(flags: dict) -> bool:
    """Whether ``flags`` already choose a device (``device`` or ``cuda``)."""
    return any(flags.get(name) is not None for name in DEVICE_FLAGS)


def with_device(flags: dict, device) -> dict:
    """``flags`` plus ``device`` unless they already name a device."""
    flags = dict(flags)
    return flags if device is None or names_device(flags) else {**flags, "device": device}


def _failure_reason(err, log) -> str:
    """One line: the train command's own error line if logged, else what submitit reports
    (the last line of the job's traceback, or the state of a job that left no result)."""
    if log is not None and Path(log).exists():
        lines = [ln for ln in Path(log).read_text(errors="replace").splitlines()
                 if ln.startswith("layerhessians train: error:")]
        if lines:
            return lines[-1]
    text = str(err)
    if type(err).__name__ == "FailedJobError":  # the job raised: its trace between two rules
        text = text.split("----------------------\n")[1] if "----------------------\n" in text else text
    elif type(err).__name__ == "UncompletedJobError":  # killed, out of memory, cancelled, ...
        state = re.search(r"\(state: ([^)]*)\)", text)
        if state:
            return f"the job ended without a result (state {state.group(1)})"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


def _job_outcome(task, job) -> Outcome:
    log = job.paths.stderr
    try:
        result = job.result()
    except Exception as err:  # noqa: BLE001 - any job failure is reported, not raised
        return Outcome(task.run, False, str(job.job_id), _failure_reason(err, log), log)
    return Outcome(task.run, True, str(job.job_id), "", log, result)


def _report(outcome: Outcome):
    if outcome.ok:
        print(f"[job {outcome.job_id}] {outcome.run}: done", flush=True)
    else:
        print(f"[job {outcome.job_id}] {outcome.run}: FAILED: {outcome.reason} (log {outcome.log})",
              file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- launchers
class SequentialLauncher:
    """Train each task in this process, one after another (no dependency, the default)."""

    name = "sequential"

    def describe(self) -> str:
        """Where and how the runs execute, in words (for the grid's progress line)."""
        return "in this process, one run after another"

    def check(self):
        """Nothing to check: training runs in this process."""

    def task_command(self, task: Task) -> str:
        """The command line that trains ``task`` (shown in dry runs and logs)."""
        return task.command()

    def launch(self, tasks) -> list:
        """Train ``tasks`` one after another in this process; a failing run does not stop the others.

        Args:
            tasks: the :class:`Task` objects, in order.

        Returns:
            One :class:`Outcome` per task, in order (``ok=False`` with the one-line reason for a
            run that raised a :class:`UserError`; other exceptions propagate).
        """
        outcomes = []
        for task in tasks:
            print(f"$ {task.command()}", flush=True)
            try:
                result = run_task(task)
            except UserError as err:  # reported; the other runs go on
                reason = err.spelled("cli") if isinstance(err, SettingError) else str(err)
                print(f"{task.run}: error: {reason}", file=sys.stderr, flush=True)
                outcomes.append(Outcome(task.run, False, reason=reason))
            else:
                outcomes.append(Outcome(task.run, True, result=result))
        return outcomes


class LocalLauncher:
    """submitit ``LocalExecutor`` jobs, one per listed GPU at a time.

    Each job sees only its GPU (``CUDA_VISIBLE_DEVICES=G``) and trains with
    ``--device cuda:0`` unless the train arguments name a device. ``timeout_min`` (minutes)
    limits each job; a job reaching it is requeued and resumes. ``job_factory(task)`` makes
    the callable a job runs from a :class:`Task` (default :class:`TrainJob`).
    """

    name = "local"

    def __init__(self, folder, gpus, timeout_min=None, poll_s=0.5, job_factory=TrainJob):
        self.folder = Path(folder)
        self.gpus = list(gpus)
        if not self.gpus:
            raise UserError("the local job launcher needs GPUs: pass --gpus 0,1 (or drop "
                            "--launcher options to train in this process)")
        self.timeout_min = timeout_min
        self.poll_s = poll_s
        self.job_factory = job_factory

    def describe(self) -> str:
        """Where and how the runs execute, in words (for the grid's progress line)."""
        return (f"submitit local jobs, one per GPU at a time on GPUs "
                f"{','.join(map(str, self.gpus))}; logs in {self.folder}")

    def check(self):
        """Raise :class:`UserError` unless submitit is installed."""
        _require_submitit("--gpus (local parallel jobs)")

    def prepare(self, task: Task) -> Task:
        """The task as a job runs it: on ``cuda:0`` unless it names a device."""
        return task.with_device("cuda:0")

    def task_command(self, task: Task) -> str:
        """The command line a job runs for ``task``, with its ``CUDA_VISIBLE_DEVICES`` placeholder."""
        return f"CUDA_VISIBLE_DEVICES=<one of {','.join(map(str, self.gpus))}> " \
               f"{self.prepare(task).command()}"

    def executor(self):
        """A submitit ``LocalExecutor`` writing logs to ``folder`` (``timeout_min`` per job).

        Raises:
            UserError: submitit is not installed.
        """
        submitit = _require_submitit("--gpus (local parallel jobs)")
        executor = submitit.LocalExecutor(folder=self.folder, max_num_timeout=MAX_REQUEUES)
        minutes = self.timeout_min if self.timeout_min is not None else LOCAL_NO_LIMIT_MINUTES
        executor.update_parameters(timeout_min=minutes, signal_delay_s=min(SIGNAL_DELAY_S, 10))
        return executor

    def launch(self, tasks) -> list:
        """Run ``tasks`` as local jobs, one per free GPU at a time, until all have ended.

        Args:
            tasks: the :class:`Task` objects, in order.

        Returns:
            One :class:`Outcome` per task, in order.

        Raises:
            UserError: submitit is not installed.
            KeyboardInterrupt: after cancelling the running jobs.
        """
        executor = self.executor()
        pending, free = deque(tasks), list(self.gpus)
        running, outcomes = {}, {}
        try:
            while pending or running:
                while pending and free:
                    gpu, task = free.pop(0), pending.popleft()
                    executor.update_parameters(visible_gpus=(gpu,), gpus_per_node=1)
                    job = executor.submit(self.job_factory(self.prepare(task)))
                    running[job] = (task, gpu)
                    print(f"[job {job.job_id}] {task.run}: started on GPU {gpu} "
                          f"(log {job.paths.stdout})", flush=True)
                for job in [j for j in running if j.done()]:
                    task, gpu = running.pop(job)
                    outcomes[task.run] = _job_outcome(task, job)
                    _report(outcomes[task.run])
                    free.append(gpu)
                if running:
                    time.sleep(self.poll_s)
        except KeyboardInterrupt:
            for job in running:
                job.cancel(check=False)
            raise
        return [outcomes[t.run] for t in tasks]


class SlurmLauncher:
    """submitit ``SlurmExecutor`` jobs, one per run, all submitted at once, then awaited.

    Parameters map to ``sbatch``: ``partition``, ``time`` (minutes), ``gpus_per_node``
    (``--gpus-per-job``), ``cpus_per_task``, ``mem`` (``--mem`` GB). ``options`` are extra
    ``sbatch`` options (``{"account": "abc"}``). Jobs get ``#SBATCH --signal=USR2@120``;
    submitit then checkpoints and requeues them, and training resumes (``--resume``).
    """

    name = "slurm"

    def __init__(self, folder, partition=None, time_min=None, gpus_per_job=1,
                 cpus_per_task=None, mem_gb=None, options=None, poll_s=30.0,
                 job_factory=TrainJob):
        self.folder = Path(folder)
        self.parameters = slurm_parameters(partition=partition, time_min=time_min,
                                           gpus_per_job=gpus_per_job, cpus_per_task=cpus_per_task,
                                           mem_gb=mem_gb, options=options)
        self.gpus_per_job = self.parameters["gpus_per_node"]
        self.poll_s = poll_s
        self.job_factory = job_factory

    def describe(self) -> str:
        """Where and how the runs execute, in words (for the grid's progress line)."""
        flags = " ".join(sbatch_flags(self.parameters))
        return f"Slurm jobs through submitit, one per run: sbatch {flags}; logs in {self.folder}"

    def check(self):
        """Raise :class:`UserError` unless submitit is installed and Slurm's srun is found."""
        submitit = _require_submitit("--launcher slurm")
        if submitit.SlurmExecutor.affinity() <= 0:
            raise UserError("--launcher slurm: no Slurm here (srun not found); run the sweep on "
                            "a Slurm login node")

    def prepare(self, task: Task) -> Task:
        """The task as a job runs it: on ``cuda`` when jobs get GPUs, unless it names a device."""
        return task.with_device("cuda" if self.gpus_per_job > 0 else None)

    def task_command(self, task: Task) -> str:
        """The command line a Slurm job runs for ``task``."""
        return self.prepare(task).command()

    def executor(self):
        """A submitit ``SlurmExecutor`` writing logs to ``folder``, with the sweep's sbatch parameters.

        Raises:
            UserError: submitit is not installed, or Slurm's ``srun`` is not found.
        """
        submitit = _require_submitit("--launcher slurm")
        try:
            executor = submitit.SlurmExecutor(folder=self.folder, max_num_timeout=MAX_REQUEUES)
        except RuntimeError as err:  # no srun on this machine
            raise UserError(f"--launcher slurm: {err}; run the sweep on a Slurm login node") from None
        executor.update_parameters(**self.parameters)
        return executor

    def launch(self, tasks) -> list:
        """Submit ``tasks`` as Slurm jobs, all at once, then wait until all have ended.

        Args:
            tasks: the :class:`Task` objects, in order.

        Returns:
            One :class:`Outcome` per task, in order.

        Raises:
            UserError: submitit is not installed, or Slurm's ``srun`` is not found.
            KeyboardInterrupt: the jobs keep running (their ids and ``scancel`` are printed).
        """
        executor = self.executor()
        jobs = []
        for task in tasks:
            executor.update_parameters(job_name=job_name(task.run))
            job = executor.submit(self.job_factory(self.prepare(task)))
            jobs.append((job, task))
            print(f"[job {job.job_id}] {task.run}: submitted (log {job.paths.stdout})", flush=True)
        outcomes, waiting = {}, list(jobs)
        try:
            while waiting:
                for job, task in [(j, t) for j, t in waiting if j.done()]:
                    waiting.remove((job, task))
                    outcomes[task.run] = _job_outcome(task, job)
                    _report(outcomes[task.run])
                if waiting:
                    time.sleep(self.poll_s)
        except KeyboardInterrupt:
            ids = " ".join(str(j.job_id) for j, _ in waiting)
            print(f"sweep: stopped waiting; Slurm jobs {ids} keep running (cancel: scancel {ids}); "
                  "when they end, run the same command again to plot and match",
                  file=sys.stderr, flush=True)
            raise
        return [outcomes[t.run] for t in tasks]


def job_name(run: str) -> str:
    """A Slurm job name for a run (letters, digits and ``._=,-`` kept)."""
    return "lh:" + "".join(c if c.isalnum() or c in "._=,-" else "_" for c in run)


def slurm_parameters(partition=None, time_min=None, gpus_per_job=1, cpus_per_task=None,
                     mem_gb=None, options=None) -> dict:
    """The ``SlurmExecutor.update_parameters`` keywords of a sweep's jobs (names as sbatch's)."""
    minutes = SLURM_DEFAULT_MINUTES if time_min is None else time_min
    if minutes <= 0 or int(minutes) != minutes:
        raise UserError(f"--time {time_min}: give the job time limit in whole minutes, e.g. --time 1440")
    if gpus_per_job < 0 or (cpus_per_task is not None and cpus_per_task < 1):
        raise UserError("--gpus-per-job must be >= 0 and --cpus-per-task >= 1")
    if mem_gb is not None and mem_gb <= 0:
        raise UserError(f"--mem {mem_gb}: give the memory per job in GB, e.g. --mem 32")
    params = {"time": int(minutes), "nodes": 1, "ntasks_per_node": 1,
              "gpus_per_node": int(gpus_per_job), "signal_delay_s": SIGNAL_DELAY_S}
    if partition:
        params["partition"] = partition
    if cpus_per_task is not None:
        params["cpus_per_task"] = int(cpus_per_task)
    if mem_gb is not None:
        params["mem"] = f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{int(mem_gb * 1024)}MB"
    if options:
        params["additional_parameters"] = dict(options)
    return params


def sbatch_flags(parameters: dict) -> list:
    """``["--partition=gpu", "--time=1440", ...]``: the sbatch options the parameters set."""
    flags = []
    for key, value in parameters.items():
        if key == "signal_delay_s":
            flags.append(f"--signal=USR2@{value}")
        elif key == "additional_parameters":
            flags += [f"--{k.replace('_', '-')}={v}" for k, v in value.items()]
        else:
            flags.append(f"--{key.replace('_', '-')}={value}")
    return flags


def parse_options(items) -> dict:
    """``["account=abc", "qos=high"]`` -> ``{"account": "abc", "qos": "high"}``."""
    options = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--slurm-option {item!r}: write KEY=VALUE, e.g. --slurm-option account=abc")
        options[key.strip().lstrip("-")] = value
    return options


# ----------------------------------------------------------------------------- choice
def make_launcher(args, root):
    """The launcher the parsed flags ask for; jobs log to ``ROOT/.jobs``. Checks the flags."""
    folder = Path(root).absolute() / JOBS_FOLDER
    slurm_only = {"--partition": args.partition, "--cpus-per-task": args.cpus_per_task,
                  "--mem": args.mem, "--slurm-option": args.slurm_option or None,
                  "--gpus-per-job": None if args.gpus_per_job == 1 else args.gpus_per_job}
    if args.launcher == "slurm":
        if args.gpus is not None:
            raise UserError("--gpus lists this machine's GPUs; with --launcher slurm use "
                            "--gpus-per-job N")
        return SlurmLauncher(folder, partition=args.partition, time_min=args.time,
                             gpus_per_job=args.gpus_per_job, cpus_per_task=args.cpus_per_task,
                             mem_gb=args.mem, options=parse_options(args.slurm_option))
    given = [flag for flag, value in slurm_only.items() if value is not None]
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise UserError(f"{', '.join(given)} {verb} only to --launcher slurm; drop "
                        f"{'it' if len(given) == 1 else 'them'} or add --launcher slurm")
    if args.gpus is None:
        if args.time is not None:
            raise UserError("--time limits submitit jobs: use it with --gpus or --launcher slurm")
        return SequentialLauncher()
    if args.time is not None and args.time <= 0:
        raise UserError(f"--time {args.time}: give the job time limit in minutes (> 0)")
    return LocalLauncher(folder, parse_gpus(args.gpus), timeout_min=args.time)
