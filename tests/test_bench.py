"""bench.py: a smoke run of the benchmark."""
import re

def test_benchmark_runs_and_compares_like_with_like(capsys):
    """bench.py on its smallest scenarios, one timed step: both implementations get a row with their
    ratio, and they compute the same loss on the same weights and batch (|dloss0|)."""
    from extras import bench
    bench.main(["--only", "d,pretrain", "--steps", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("d fp32")]
    assert len(rows) == 2, out
    for row in rows:
        assert re.search(r"\|\s*\d+\.\d+x\s+\d+\.\d+x", row), row
        assert float(row.rsplit("x", 1)[1].split()[0]) < 1e-4, row   # |dloss0|
    assert "pretraining step" in out
