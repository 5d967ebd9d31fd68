"""Record the golden run anew (tests/data/golden_run.json), which tests/test_runs.py holds every later run to,
or check a run against the record and say by how much it differs.

    python -m tools.record_golden            # from the repository's root, on any machine
    ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 OMP_NUM_THREADS=2 \\
        python -m tools.record_golden --check  # another summation order: a stand-in for another CPU kind

The run is in float64 and the record holds on every CPU kind and thread count (tests/test_runs.py says
within what), so it is recorded wherever the change is made. Only a change that is meant to change
numbers records it, and its commit message says why. --check prints the largest relative difference of
the adapters, the base and the losses from the record, and every difference the test would report.
"""
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_runs import GOLDEN, RTOL, differences, golden_run  # noqa: E402  (the tests folder is no package)


def largest_relative(got, want, path=""):
    """The largest |got - want| / scale over the projections (scale: the largest of their list) and the losses."""
    if isinstance(want, dict):
        return max([largest_relative(got[k], want[k], f"{path}/{k}") for k in want] or [0.0])
    if isinstance(want, list) and want and all(isinstance(x, float) for x in want) and "lambda" not in path:
        scale = max(abs(x) for x in want) or 1.0
        return max(abs(a - b) / scale for a, b in zip(got, want))
    if isinstance(want, list):
        return max([largest_relative(a, b, path) for a, b in zip(got, want)] or [0.0])
    if isinstance(want, float) and path.endswith("loss"):
        return abs(got - want) / abs(want)
    return 0.0


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        got = golden_run(Path(d))
    if "--check" in sys.argv:
        want = json.loads(GOLDEN.read_text())
        print(f"largest relative difference of adapters, base and losses: {largest_relative(got, want):.3g} "
              f"(tolerance {RTOL:g}); differences the test reports: {differences(got, want) or 'none'}")
    else:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
        print(f"wrote {GOLDEN}")
