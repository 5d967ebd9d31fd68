"""Record the golden run anew (tests/data/golden_run.json), which tests/test_runs.py holds every later run to.

    python -m tools.record_golden      # from the repository's root, on any machine

The run is in float64 and the record holds on every CPU kind and thread count (tests/test_runs.py says
within what), so it is recorded wherever the change is made. Only a change that is meant to change
numbers records it, and its commit message says why.
"""
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_runs import GOLDEN, golden_run  # noqa: E402  (the tests folder is no package)

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(golden_run(Path(d)), indent=1) + "\n")
    print(f"wrote {GOLDEN}")
