"""The README's first command, ``layerhessians reproduce --quick``, timed as a new user runs it.

Usage::

    python benchmarks/bench_quickstart.py                     # quiet, then busy; ~5-10 min
    python benchmarks/bench_quickstart.py --repeats 3         # medians of 3 of each
    python benchmarks/bench_quickstart.py --dry-run           # seconds: checks the script only
    python benchmarks/bench_quickstart.py --extra "--train-args '--threads 1'"

Each repeat runs ``python -m layerhessians reproduce --quick --root <fresh temporary folder>``
as a subprocess (so every run trains from scratch), in two scenarios:

- ``quiet``: nothing else started by this script;
- ``busy``: one other CPU-bound process (a Python busy loop) running all along.

For each run it records the wall time, the subprocess's peak resident memory (``ru_maxrss``
from ``os.wait4`` of that process: the largest of it and the descendants it waited for), the
exit status, and the longest stretch without a line of output (the command's output is a
pipe, not a terminal, as in a batch job). The load average is recorded before each run: other
users' work on the machine makes the "quiet" numbers slower, so read them with it.

The issue's goals are checked: quiet wall time <= 120 s, peak memory <= 2 GiB, busy time <=
3x quiet time (medians). It prints a table with the machine (CPUs, load average) and writes
JSON to ``--out`` (default ``benchmarks/results/quickstart.json``).

``--dry-run`` passes ``--dry-run`` to ``reproduce`` (it lists the runs without training) so
the whole harness is exercised in seconds; its numbers measure nothing of interest.
"""

import argparse
import json
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from importlib import metadata
from pathlib import Path

#: The issue's goals for the quick start on a 2-core machine.
QUIET_LIMIT_S = 120.0
PEAK_LIMIT_BYTES = 2 * 1024 ** 3
BUSY_FACTOR_LIMIT = 3.0
SCENARIOS = ("quiet", "busy")
BUSY_LOOP = "while True:\n    pass\n"


def machine() -> OrderedDict:
    """CPUs, memory, load average, versions: what the numbers depend on."""
    info = OrderedDict(platform=platform.platform(), python=platform.python_version(),
                       cpus=os.cpu_count())
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                                  if line.startswith("model name")), platform.processor())
    except OSError:
        info["cpu_model"] = platform.processor()
    try:
        info["memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        info["memory_bytes"] = None
    info["load_average"] = list(os.getloadavg())
    for package in ("torch", "layerhessians", "numpy"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    info["thread_env"] = {key: os.environ[key] for key in
                          ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
                          if key in os.environ}
    return info


def maxrss_bytes(usage) -> int:
    """``ru_maxrss`` in bytes (Linux reports KiB, macOS bytes)."""
    return int(usage.ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


def quickstart_command(root, extra, dry_run) -> list:
    """The command timed: ``python -m layerhessians reproduce --quick --root ROOT [...]``."""
    command = [sys.executable, "-m", "layerhessians", "reproduce", "--quick", "--root", str(root)]
    return command + shlex.split(extra) + (["--dry-run"] if dry_run else [])


def run_once(command, log_path) -> OrderedDict:
    """Run ``command``, copying its output (stdout and stderr, a pipe) to ``log_path``;
    return wall seconds, peak memory, exit status and the longest silence in seconds."""
    load = os.getloadavg()
    stamps = []
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)

    def copy():
        with open(log_path, "wb") as log:
            for line in process.stdout:
                stamps.append(time.perf_counter())
                log.write(line)

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    reader.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    times = [started, *stamps, started + wall]
    return OrderedDict(
        wall_s=wall, peak_rss_bytes=maxrss_bytes(usage), returncode=process.returncode,
        longest_silence_s=max(b - a for a, b in zip(times, times[1:])), output_lines=len(stamps),
        user_cpu_s=usage.ru_utime, system_cpu_s=usage.ru_stime, load_average_before=list(load),
        log=str(log_path))


def start_busy_process() -> subprocess.Popen:
    """One CPU-bound process (a Python busy loop), the 'one other job' of the issue."""
    return subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdin=subprocess.DEVNULL)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_scenario(name, args, logs) -> OrderedDict:
    """``args.repeats`` runs of the quick start in scenario ``name``; medians and each run."""
    busy = start_busy_process() if name == "busy" else None
    runs = []
    try:
        if busy is not None:
            time.sleep(1.0)  # let it reach full speed
        for repeat in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="quickstart-") as root:
                command = quickstart_command(root, args.extra, args.dry_run)
                result = run_once(command, logs / f"{name}-{repeat}.log")
            result["command"] = shlex.join(command)
            runs.append(result)
            print(f"  {name} #{repeat + 1}: {result['wall_s']:.1f} s, "
                  f"{result['peak_rss_bytes'] / 2 ** 30:.2f} GiB, rc {result['returncode']}",
                  file=sys.stderr, flush=True)
    finally:
        if busy is not None:
            stop(busy)
    return OrderedDict(
        wall_s=statistics.median(r["wall_s"] for r in runs),
        peak_rss_bytes=max(r["peak_rss_bytes"] for r in runs),
        longest_silence_s=max(r["longest_silence_s"] for r in runs),
        all_ok=all(r["returncode"] == 0 for r in runs), runs=runs)


def goals(results) -> OrderedDict:
    """The issue's limits, each with the measured value and whether it is met."""
    out = OrderedDict()
    if "quiet" in results:
        quiet = results["quiet"]["wall_s"]
        out["quiet_wall_s"] = OrderedDict(limit=QUIET_LIMIT_S, value=quiet, met=quiet <= QUIET_LIMIT_S)
    peak = max(r["peak_rss_bytes"] for r in results.values())
    out["peak_rss_bytes"] = OrderedDict(limit=PEAK_LIMIT_BYTES, value=peak, met=peak <= PEAK_LIMIT_BYTES)
    if "quiet" in results and "busy" in results:
        factor = results["busy"]["wall_s"] / results["quiet"]["wall_s"]
        out["busy_over_quiet"] = OrderedDict(limit=BUSY_FACTOR_LIMIT, value=factor,
                                             met=factor <= BUSY_FACTOR_LIMIT)
    return out


def table(info, results, checks) -> str:
    lines = [f"machine: {info['cpu_model']}, {info['cpus']} CPUs "
             f"({info.get('cpus_usable', '?')} usable), load average "
             f"{' '.join(f'{x:.2f}' for x in info['load_average'])}, "
             f"python {info['python']}, torch {info['torch']}",
             f"{'scenario':<10}{'wall s (median)':>17}{'peak GiB':>10}{'silence s':>11}{'load before':>13}  ok"]
    for name, result in results.items():
        load = statistics.median(r["load_average_before"][0] for r in result["runs"])
        lines.append(f"{name:<10}{result['wall_s']:>17.1f}{result['peak_rss_bytes'] / 2 ** 30:>10.2f}"
                     f"{result['longest_silence_s']:>11.1f}{load:>13.2f}  {result['all_ok']}")
    for key, check in checks.items():
        value, limit = check["value"], check["limit"]
        if key == "peak_rss_bytes":
            value, limit = f"{value / 2 ** 30:.2f} GiB", f"{limit / 2 ** 30:.0f} GiB"
        elif key == "busy_over_quiet":
            value, limit = f"{value:.2f}x", f"{limit:.0f}x"
        else:
            value, limit = f"{value:.1f} s", f"{limit:.0f} s"
        lines.append(f"goal {key}: {value} (limit {limit}) {'met' if check['met'] else 'NOT met'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="runs per scenario (median reported)")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--extra", default="", help="extra `reproduce` flags, quoted")
    parser.add_argument("--dry-run", action="store_true",
                        help="pass --dry-run to reproduce: check the harness in seconds")
    parser.add_argument("--out", default="benchmarks/results/quickstart.json")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    out = Path(args.out)
    logs = out.parent / "quickstart-logs"
    logs.mkdir(parents=True, exist_ok=True)
    info = machine()
    results = OrderedDict()
    for name in args.scenarios:
        results[name] = run_scenario(name, args, logs)
    checks = goals(results)
    info["load_average_after"] = list(os.getloadavg())
    report = OrderedDict(machine=info, settings=vars(args), dry_run=args.dry_run,
                         scenarios=results, goals=checks,
                         self_rusage_maxrss_bytes=maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF)))
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(info, results, checks))
    print(f"wrote {out}" + (" (dry run: reproduce --dry-run, nothing trained)" if args.dry_run else ""))
    return 0 if all(r["all_ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
