"""Record the golden run anew (tests/data/golden_run.json), which tests/test_runs.py holds every later run to.

    python -m tools.record_golden      # from the repository's root

Only a change that is meant to change numbers records it, and its commit message says why.
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
