"""bench.py: smoke runs of the benchmark."""
import re

from conftest import FLAN, needs_flan, smollm2_dir


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


@needs_flan
def test_smollm2_scenarios_give_each_ratio_and_the_bound_its_profile_sets(capsys):
    """bench.py's SmolLM2 scenarios, shrunk (one timed step, 4 prompts, 6 new tokens): the training step
    and greedy and 4-beam generation each get their ratio to transformers (+ peft) from the one run, the
    same loss and the same tokens as theirs, and the bound that each side's kernel time sets."""
    from extras import bench
    bench.main(["--only", "smol,gen", "--steps", "1", "--gen-batch", "4", "--gen-tokens", "6", "--dtypes", "float32",
                "--flan", str(FLAN), "--smollm2", smollm2_dir()])
    out = capsys.readouterr().out
    train = [line for line in out.splitlines() if line.startswith("s fp32, SmolLM2")]
    assert len(train) == 1 and re.search(r"\|\s*\d+\.\d+x\s+\d+\.\d+x", train[0]), out
    assert float(train[0].rsplit("x", 1)[1].split()[0]) < 1e-4, train[0]   # |dloss0|
    for beams in (1, 4):
        gen = [line for line in out.splitlines() if f"float32 {beams} beam(s)" in line]
        assert len(gen) == 1 and re.search(r"ours \d+\.\d+x; \d+ tokens, identical", gen[0]), out
    assert len(re.findall(r"with these kernels at most \d+\.\d+x", out)) == 3, out
    assert re.search(r"a decoding step \(reads \d+ MB of weights: \d+\.\d+ GB/s\)", out), out


def test_inference_time_table_times_each_mode_without_sharing(tiny_dir, monkeypatch):
    """The paper's inference-time table (bench_infer.inference_time), shrunk: a time per instance for
    each mode at each batch size, and nothing shared between runs: every dynamic run encodes the
    client's references and the instances' r(x) afresh, and only the dynamic runs do."""
    import builtin
    import evaluation
    import feddpa
    import hf
    from extras import bench_infer
    calls = {"references": 0, "represented": 0}
    real_refs, real_rep = feddpa.reference_reps, evaluation.represented

    def refs(*args, **kwargs):
        calls["references"] += 1
        return real_refs(*args, **kwargs)

    def rep(*args, **kwargs):
        calls["represented"] += 1
        return real_rep(*args, **kwargs)
    monkeypatch.setattr(feddpa, "reference_reps", refs)
    monkeypatch.setattr(evaluation, "represented", rep)
    fd = builtin.benchmark(seed=0, n_train=10, n_test=4)
    tok = hf.load_tokenizer(str(tiny_dir), hf.config_from_hf(str(tiny_dir / "config.json")))
    times = bench_infer.inference_time(str(tiny_dir), tok, fd, n=4, batches=(1, 4), max_new_tokens=3)
    assert set(times) == {(mode, b) for mode in bench_infer.INFERENCE_MODES for b in (1, 4)}
    assert all(0 < t < 10 for t in times.values())
    assert calls == {"references": 4, "represented": 4}  # 2 batch sizes x the faster of 2 runs, dynamic only
