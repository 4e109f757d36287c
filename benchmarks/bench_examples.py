"""Wall time of the README's examples, with the thread count and machine load stated.

Usage::

    python benchmarks/bench_examples.py                           # 1 thread, then torch's default
    python benchmarks/bench_examples.py --threads 1 --repeats 3   # medians of 3
    python benchmarks/bench_examples.py --examples spectra_api.py --quick

Each repeat runs ``python examples/<script> --threads N`` as a subprocess (``N = 0``: torch's
default of one thread per core) in a fresh temporary folder (``--run`` inside it for the
tracker examples, so nothing is reused), and records the wall time, CPU time, exit status and
the load average before the run (other users' work slows every number: read them with it).
It prints a table and writes JSON to ``--out`` (default ``benchmarks/results/examples.json``).
The README's example timings are quoted from this script.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

from bench_quickstart import machine  # the same machine description

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
#: script -> arguments (the tracker examples write into a fresh run folder)
SCRIPTS = OrderedDict([
    ("spectra_api.py", []),
    ("transformer_lm.py", ["--run", "{tmp}/run"]),
    ("transformer_lm_lightning.py", ["--run", "{tmp}/run"]),
])


def run_once(script: str, threads: int, quick: bool) -> OrderedDict:
    """One run of ``script`` with ``--threads threads`` in a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [a.format(tmp=tmp) for a in SCRIPTS[script]]
        if quick and script != "spectra_api.py":
            args.append("--quick")
        command = [sys.executable, str(EXAMPLES / script), "--threads", str(threads), *args]
        load = os.getloadavg()
        before = os.times()
        started = time.perf_counter()
        done = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
        wall = time.perf_counter() - started
        after = os.times()
    return OrderedDict(wall_s=wall, cpu_s=(after.children_user - before.children_user)
                       + (after.children_system - before.children_system),
                       returncode=done.returncode, load_average_before=list(load),
                       error=done.stderr.strip().splitlines()[-1:] if done.returncode else [])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", nargs="+", choices=list(SCRIPTS), default=list(SCRIPTS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 0],
                        help="thread counts to time (0: torch's default, one per core)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="the examples' --quick settings")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "examples.json"))
    args = parser.parse_args(argv)
    info = machine()
    rows = []
    for script in args.examples:
        for threads in args.threads:
            runs = [run_once(script, threads, args.quick) for _ in range(args.repeats)]
            row = OrderedDict(script=script, threads=threads or "default",
                              quick=args.quick, median_wall_s=statistics.median(
                                  r["wall_s"] for r in runs), runs=runs)
            rows.append(row)
            load = runs[0]["load_average_before"][0]
            status = "ok" if all(r["returncode"] == 0 for r in runs) else "FAILED"
            print(f"{script:30s} threads {str(row['threads']):8s} "
                  f"{row['median_wall_s']:8.1f} s (median of {len(runs)}; load {load:.1f}) "
                  f"{status}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    print(f"machine: {info.get('cpus_usable', info['cpus'])} usable CPUs, {info['cpu_model']}; "
          f"written: {args.out}")
    return 1 if any(r["returncode"] for row in rows for r in row["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
