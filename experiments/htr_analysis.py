"""Tables, tests and figures of the HTR finding, from the runs ``htr_finding.py`` trained
(:func:`layerhessians.analysis.method_comparison.compare_methods` with the finding's labels and
the original's recorded numbers).

Called by ``python experiments/htr_finding.py --stage analyze`` (or ``--stage all``).
Writes into ``OUT``: ``table.md`` (test error per method, mean +- sample std over reruns,
Welch's t against SGD and against L2 with 95% intervals, the original's recorded numbers
beside), ``numbers.json`` (every number, per-run values, the gamma choice, the command),
``error_bars.png``, ``test_accuracy.png`` (through training, mean and min-max band over
reruns), ``layer_curvature.png`` (exact per-layer trace and top eigenvalue through
training, mean over reruns, per method).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from layerhessians.analysis.method_comparison import (  # noqa: E402
    compare_methods,
    method_groups,
)

#: methods in table order, with their labels
LABELS = {"sgd": "SGD", "l2": "SGD + L2 1e-4", "htr": "HTR (original: hutchinson)",
          "htr+l2": "HTR + L2 (original 'combined')",
          "paper-middle": "HTR middle (original mask)", "ggn": "HTR ggn, every step",
          "ggn-middle": "HTR ggn, middle layers"}
#: the original's recorded LeNet/MNIST test error in % over 3 reruns (commit 3d4ce32, and the
#: scripts.sh accuracies as 100 - acc); full MNIST, not MNIST5k
ORIGINAL = {"sgd": "1.00 +- 0.05 (3d4ce32); 1.25 +- 0.03 (scripts.sh)",
            "l2": "0.92 +- 0.03", "htr": "0.86 +- 0.09",
            "htr+l2": "1.153 +- 0.019 (scripts.sh)", "paper-middle": "-"}


def method_runs(root: Path) -> dict:
    """``{method: complete reruns}`` of the finding's methods, in table order."""
    found = method_groups(root).get("", {})
    return {method: found[method] for method in LABELS if method in found}


def analyze(root: Path, out: Path, args=None) -> dict:
    runs = method_runs(root)
    if not runs:
        raise SystemExit(f"no complete runs under {root}")
    result = compare_methods(runs, out, labels=LABELS, original=ORIGINAL,
                             title="LeNet on MNIST5k, 30 epochs")
    tuning = root / "tuning.json"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    record = {"command": "python experiments/htr_finding.py", "commit": commit,
              "python": platform.python_version(), "root": str(root),
              "methods": result["methods"], "curvature": result["curvature"],
              "tuning": json.loads(tuning.read_text()) if tuning.is_file() else None,
              "figures": result["figures"]}
    (out / "numbers.json").write_text(json.dumps(record, indent=1, default=float))
    print(result["table"])
    print(f"wrote {out}/table.md, numbers.json, {', '.join(record['figures'])}")
    return record


if __name__ == "__main__":
    analyze(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/htr-finding"),
            Path(sys.argv[2] if len(sys.argv) > 2 else "docs/figures/htr"))
