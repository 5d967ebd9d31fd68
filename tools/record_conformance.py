"""Record the conformance vectors (tests/conformance.json) that ports check themselves against and that
tests/test_conformance.py holds this implementation to.

    python -m tools.record_conformance      # from the repository's root

The values are this implementation's, in float64, on the tiny case of tests/test_conformance.py (its
CASE); the oracle (tests/test_oracle.py) holds the implementation to transformers + peft. Only a change
that is meant to change numbers records them anew, and its commit message says why.
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_conformance import CASE, RTOL, VECTORS, compute  # noqa: E402  (the tests folder is no package)

if __name__ == "__main__":
    import torch
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    record = {"about": "FedDPA conformance vectors: see docs/conformance.md", "recorded_by": f"feddpa {commit}, torch "
              f"{torch.__version__}, float64", "rtol": RTOL, "case": CASE, "vectors": compute()}
    VECTORS.write_text(json.dumps(record, indent=None, separators=(",", ":")) + "\n")
    print(f"wrote {VECTORS}")
