"""runs.py and train.py: runs killed or interrupted and resumed bit-identical, and every error a user can
fix as one line with the output folder left untouched."""
import hashlib
import json
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import builtin
import data
import evaluation
import hf
import lora
import runs
import train
from conftest import MALFORMED, ROOT, safetensors_bytes, small_fed, tree_bytes

# train.main in a subprocess that stops itself at an exact point: `how` n, counted from the start
# of that process. Deterministic, and the process really dies (SIGKILL) or is really interrupted.
RUNNER = r"""
import os, signal, sys
import torch
import fast, runs, train
torch.set_num_threads(1)  # the same arithmetic in every process
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as a terminal gives it, even if started with SIGINT ignored (nohup ... &)
how, n = sys.argv[1], int(sys.argv[2])
count = 0

def tick():
    global count
    count += 1
    return count == n

forward = fast.forward  # the model's forward inside fast.enabled, as train.py runs it
def counted_forward(self, *args, **kwargs):  # training forward passes only (generation uses hidden)
    if how in ("mid", "sigint", "nan") and torch.is_grad_enabled() and tick():
        if how == "mid":                     # SIGKILL in the middle of a round
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "sigint":                  # Ctrl-C in the middle of a round
            os.kill(os.getpid(), signal.SIGINT)
        if how == "nan":                     # this client's loss becomes NaN
            logits, loss = forward(self, *args, **kwargs)
            return logits, loss * float("nan")
    return forward(self, *args, **kwargs)
fast.forward = counted_forward

save_state = runs.save_state
def counted_save(out, state):
    if how == "write" and tick():            # SIGKILL inside the n-th checkpoint write, before its rename
        replace = os.replace
        def kill_before_rename(src, dst):
            if dst.endswith("checkpoint.pt"):
                os.kill(os.getpid(), signal.SIGKILL)
            replace(src, dst)
        os.replace = kill_before_rename
    save_state(out, state)
    if how == "between" and tick():          # SIGKILL right after the n-th checkpoint is complete
        os.kill(os.getpid(), signal.SIGKILL)
runs.save_state = counted_save

train.main(sys.argv[3:])
"""

# With TINY_RUN: forward passes 1-18 are FedIT (3 rounds x 3 clients x 2 steps); 19-24 FedDPA-T's
# round 0 (global only); 25-36 its round 1 and 37-48 its round 2 (per client 2 local, then 2 global
# steps). Checkpoint writes: 1 the initial state, 2-4 FedIT's rounds, 5 its end, 6-8 FedDPA-T's
# rounds, 9 its end, 10-11 after evaluating each method.


def run_tiny(how, n, *args, timeout=120):
    return subprocess.run([sys.executable, "-c", RUNNER, how, str(n), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def checkpoint_round(out):
    state = torch.load(Path(out) / "checkpoint.pt", weights_only=True)
    cur = state["current"]
    return (cur["phase"], cur["round"]) if cur else None


def untimed(x):
    """results.json without what differs between two identical runs: timings and the output folder."""
    if isinstance(x, dict):
        return {k: untimed(v) for k, v in x.items() if k not in ("seconds", "eval_seconds", "out")}
    return [untimed(v) for v in x] if isinstance(x, list) else x


def outcome(out):
    out = Path(out)
    adapters = {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "adapters").rglob("*.safetensors"))}
    return untimed(json.loads((out / "results.json").read_text())), adapters


def straight_and_killed_after_fedit_round_2(args: list, tmp_path) -> tuple:
    """outcome() of a run of the tiny model with args never stopped, and of one SIGKILLed right after
    FedIT's second round is checkpointed, then resumed with --resume."""
    r = run_tiny("none", 0, *args, "--out", str(tmp_path / "straight"))
    assert r.returncode == 0, r.stderr
    r = run_tiny("between", 3, *args, "--out", str(tmp_path / "killed"))
    assert r.returncode != 0 and checkpoint_round(tmp_path / "killed") == ("fedit", 2)
    r = run_tiny("none", 0, "--resume", str(tmp_path / "killed"))
    assert r.returncode == 0, r.stderr
    return outcome(tmp_path / "straight"), outcome(tmp_path / "killed")


@pytest.fixture(scope="module")
def reference(tiny_run, tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    r = run_tiny("none", 0, *tiny_run[2], "--out", str(out))
    assert r.returncode == 0, r.stderr
    return outcome(out)


# (how, n, exit code, the checkpoint's (phase, completed rounds) afterwards) for each interruption,
# each followed by `--resume`; the last resume runs to the end.
INTERRUPTIONS = {
    "SIGKILL between rounds": [("between", 7, -signal.SIGKILL, ("feddpa-t", 2))],
    "SIGKILL mid-round, then mid-checkpoint-write": [
        ("mid", 40, -signal.SIGKILL, ("feddpa-t", 2)),                  # client 0, round 2, global training
        ("write", 1, -signal.SIGKILL, ("feddpa-t", 2))],                # resumed: round 2's checkpoint never lands
    "Ctrl-C mid-round": [("sigint", 9, 130, ("fedit", 1))],              # client 1 in the 2nd round
    "NaN loss": [("nan", 25, 2, ("feddpa-t", 1))],                       # FedDPA-T: client 0 in its 2nd round
}


@pytest.mark.parametrize("case", INTERRUPTIONS)
def test_interrupted_and_resumed_run_is_bit_identical(case, tiny_run, reference, tmp_path):
    out = str(tmp_path / "run")
    resume = False
    for how, n, code, where in INTERRUPTIONS[case]:
        r = run_tiny(how, n, *(["--resume", out] if resume else [*tiny_run[2], "--out", out]))
        assert r.returncode == code, r.stderr
        assert checkpoint_round(out) == where
        assert "Traceback" not in r.stderr
        last = r.stderr.strip().splitlines()[-1]
        if how == "sigint":
            assert last == f"interrupted; completed rounds are saved. Resume with: python train.py --resume {out}"
        if how == "nan":  # names the method, client and round; the last good round stays
            assert last.startswith("error: feddpa-t: loss became nan while training the local adapter of client 0 in round 2")
            assert "checkpoint.pt keeps the last good round (1 of 3 complete)" in last
        if how == "write":
            assert list(Path(out).glob("checkpoint.pt.tmp*"))  # the half-done write, never renamed
        resume = True
    r = run_tiny("none", 0, "--resume", out)
    assert r.returncode == 0, r.stderr
    assert not list(Path(out).rglob("*.tmp*"))
    assert outcome(out) == reference


def test_resuming_a_finished_run_keeps_its_results_and_its_own_times(tiny_run, tmp_path):
    """A resume that finds the run finished has nothing to do: results.json stays as the run wrote it,
    its seconds (total, training, evaluation) the run's own, not the resume's."""
    out = tmp_path / "run"
    train.main([*tiny_run[2], "--out", str(out), "-q"])
    before = json.loads((out / "results.json").read_text())
    s = before["seconds"]
    assert s["total"] >= s["pretrain"] + sum(s["training"].values()) + sum(s["evaluation"].values())
    train.main(["--resume", str(out), "-q"])
    assert json.loads((out / "results.json").read_text()) == before


def test_a_killed_and_resumed_run_counts_the_time_of_both_parts(run_copy):
    """The total of a run killed after FedDPA-T's round 2 and resumed is the first part's time up to its
    last checkpoint plus the second part's: at least the work each part did, at most what the first part
    recorded plus the second's wall time."""
    state = torch.load(run_copy / "checkpoint.pt", weights_only=True)
    first = state["elapsed"]
    assert first >= (state["pretrain_seconds"] + state["trained"]["fedit"]["seconds"]
                     + sum(h["seconds"] for h in state["current"]["history"]))
    t0 = time.time()
    train.main(["--resume", str(run_copy), "-q"])
    second = time.time() - t0
    res = json.loads((run_copy / "results.json").read_text())
    second_work = (sum(h["seconds"] for h in res["training"]["feddpa-t"]["history"][state["current"]["round"]:])
                   + sum(res["seconds"]["evaluation"].values()))
    assert first + second_work <= res["seconds"]["total"] <= first + second
    assert torch.load(run_copy / "checkpoint.pt", weights_only=True)["elapsed"] == res["seconds"]["total"]


# ----------------------------------------------------------------------------------------------
# Bad input: exit code 2, one line on stderr that names the problem and the file, no traceback, and
# an existing output folder left byte for byte as it was.

def main_error(argv, capsys):
    """(exit code, stderr) of train.main(argv) run in this process."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    return e.value.code, capsys.readouterr().err


def assert_one_line(err, *pieces):
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, err
    for piece in pieces:
        assert piece in err, err


@pytest.fixture(scope="module")
def interrupted(tiny_run, tmp_path_factory):
    """The folder of a run killed after FedDPA-T's round 1: FedIT done, local adapters in the checkpoint."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    r = run_tiny("between", 7, *tiny_run[2], "--out", str(out))
    assert r.returncode == -signal.SIGKILL and checkpoint_round(out) == ("feddpa-t", 2)
    return out


@pytest.fixture
def run_copy(interrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    return out


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_data_exits_with_one_line_and_keeps_the_output(case, tiny_run, run_copy, capsys, tmp_path):
    mutate, pieces = MALFORMED[case]
    bad = tmp_path / "bad"
    data.write_federated(small_fed(), bad)
    mutate(bad)
    before = tree_bytes(run_copy)
    code, err = main_error(["--data", str(bad), "--model", str(tiny_run[0]), "--out", str(run_copy), "--overwrite"], capsys)
    assert code == 2
    assert_one_line(err, "error: ", *pieces)
    assert tree_bytes(run_copy) == before


def edit_checkpoint(change):
    def edit(out):
        path = out / "checkpoint.pt"
        state = torch.load(path, weights_only=True)
        change(state)
        torch.save(state, path)
    return edit


Q0 = "model.layers.0.self_attn.q_proj.lora_A.weight"


class Payload:
    """What a malicious checkpoint would run when unpickled: here, create a file."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


BAD_CHECKPOINTS = {  # case -> (edit of a run folder, message pieces)
    "adapter of the wrong shape": (
        edit_checkpoint(lambda s: s["trained"]["fedit"]["global"].update({Q0: torch.zeros(4, 64)})),
        ["checkpoint.pt: fedit global adapter: adapter tensor " + Q0, "shape (4, 64)", "expects (8, 64)"]),
    "local adapter of the wrong shape": (
        edit_checkpoint(lambda s: s["current"]["clients"][2][0].update({Q0: torch.zeros(8, 32)})),
        ["checkpoint.pt: feddpa-t client 2 local adapter: adapter tensor " + Q0, "shape (8, 32)"]),
    "renamed adapter tensor": (
        edit_checkpoint(lambda s: s["init"].update({"lm_head.lora_A.weight": s["init"].pop(Q0)})),
        ["checkpoint.pt: initial adapter: unexpected adapter tensor lm_head.lora_A.weight"]),
    "fewer clients": (edit_checkpoint(lambda s: s["trained"]["fedit"]["locals"].pop()),
                      ["checkpoint.pt: fedit has 2 clients, the data 3"]),
    "not this program's": (edit_checkpoint(lambda s: s.pop("trained")), ["checkpoint.pt: not a checkpoint of this program"]),
    "truncated": (lambda out: (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:5000]),
                  ["checkpoint.pt: unreadable checkpoint"]),
    "pickled code": (lambda out: torch.save({"init": Payload(out.parent / "pwned")}, out / "checkpoint.pt"),
                     ["checkpoint.pt: holds objects other than tensors and plain data; refusing to load it"]),
    "no checkpoint": (lambda out: (out / "checkpoint.pt").unlink(), ["checkpoint.pt: no checkpoint to resume from"]),
    "bad config.json": (lambda out: (out / "config.json").write_text('{"rounds": "3"}'),
                        ["config.json: rounds is '3', not a int"]),
    "history of the wrong type": (edit_checkpoint(lambda s: s["trained"]["fedit"]["history"].append("round 4")),
                                  ["checkpoint.pt: not a checkpoint of this program (fedit: malformed history)"]),
    "round of the wrong type": (edit_checkpoint(lambda s: s["current"].update(round="2")),
                                 ["checkpoint.pt: not a checkpoint of this program (the phase in progress)"]),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoint_exits_with_one_line_and_keeps_the_output(case, run_copy, capsys):
    edit, pieces = BAD_CHECKPOINTS[case]
    edit(run_copy)
    before = tree_bytes(run_copy)
    code, err = main_error(["--resume", str(run_copy)], capsys)
    assert code == 2
    assert_one_line(err, "error: ", *pieces)
    assert tree_bytes(run_copy) == before
    assert not (run_copy.parent / "pwned").exists()


def edit_weights(change):
    """Rewrite the copied base model's model.safetensors: change(header, buffer) -> file bytes."""
    def edit(base):
        raw = (base / "model.safetensors").read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        (base / "model.safetensors").write_bytes(change(json.loads(raw[8:8 + n]), raw[8 + n:]))
    return edit


def entry(header):
    return next(k for k in header if k != "__metadata__")


BAD_MODELS = {  # --model DIR whose model.safetensors is damaged -> message pieces
    "header length past the end": (edit_weights(lambda h, b: struct.pack("<Q", 10 ** 9) + json.dumps(h).encode()),
                                   ["model.safetensors: header length 1000000000 runs past the end"]),
    "truncated": (edit_weights(lambda h, b: safetensors_bytes(h, b[:len(b) // 2])), ["model.safetensors: tensor", "do not fit"]),
    "offsets outside the buffer": (
        edit_weights(lambda h, b: safetensors_bytes({**h, entry(h): {**h[entry(h)], "data_offsets": [len(b), len(b) + 64]}}, b)),
        ["model.safetensors: tensor", "offsets", "do not fit"]),
    "unknown dtype": (edit_weights(lambda h, b: safetensors_bytes({**h, entry(h): {**h[entry(h)], "dtype": "Q7"}}, b)),
                      ["model.safetensors: tensor", "unsupported dtype 'Q7'"]),
    "header not JSON": (edit_weights(lambda h, b: struct.pack("<Q", 4) + b"{{{{" + b), ["model.safetensors: header is not valid JSON"]),
    "boolean in a shape": (edit_weights(lambda h, b: safetensors_bytes({**h, entry(h): {**h[entry(h)], "shape": [True, 1]}}, b)),
                           ["model.safetensors: tensor", "malformed shape"]),
    "empty file": (lambda base: (base / "model.safetensors").write_bytes(b""), ["model.safetensors: truncated safetensors file"]),
    "a tensor of another shape": (
        lambda base: (base / "config.json").write_text((base / "config.json").read_text().replace('"intermediate_size": 176', '"intermediate_size": 180')),
        ["tensor model.layers.0.mlp.down_proj.weight has shape (64, 176), the config implies (64, 180)"]),
    "damaged tokenizer": (lambda base: (base / "tokenizer.model").write_bytes(b"\x00junk"), ["cannot load the tokenizer"]),
}


@pytest.mark.parametrize("case", BAD_MODELS)
def test_bad_model_exits_with_one_line_and_keeps_the_output(case, tiny_run, run_copy, capsys, tmp_path):
    edit, pieces = BAD_MODELS[case]
    base = tmp_path / "base"
    shutil.copytree(tiny_run[0], base)
    edit(base)
    before = tree_bytes(run_copy)
    code, err = main_error([*tiny_run[2], "--model", str(base), "--out", str(run_copy), "--overwrite"], capsys)
    assert code == 2
    assert_one_line(err, f"error: {base}", *pieces)
    assert tree_bytes(run_copy) == before


BAD_CONFIGS = {  # extra arguments -> message pieces
    "settings with --resume": (["--resume", "RUN"], ["--resume takes every setting from", "config.json", "drop --data"]),
    "--local-epochs while --local-steps counts": (["--overwrite", "--local-epochs", "5"],
                                                  ["--local-epochs is used only with --local-steps 0 (now 2)"]),
    "too many records dropped": (["--overwrite", "--cutoff", "40"], ["would lose", "whose prompts fill --cutoff 40",
                                                                     "--max-dropped"]),
    "another run's folder": ([], ["holds another run (results.json); use --resume", "--overwrite"]),
    "unknown method": (["--overwrite", "--methods", "fedit,fedprox"], ["unknown method(s) fedprox; choose from base, local"]),
    "client fraction 0": (["--overwrite", "--fraction", "0"], ["--fraction 0.0 must be in (0, 1]"]),
    "rank 0": (["--overwrite", "--lora-r", "0"], ["--lora-r 0 must be >= 1"]),
    "cutoff shorter than the prompt": (["--overwrite", "--cutoff", "8"], ["--cutoff 8 is too short: the prompt template alone takes"]),
    "more clients than examples": (["--overwrite", "--clients", "100", "--min-client-size", "1"],
                                   ["data: --clients 100: cannot give 100 clients 1 records each from 60 records"]),
    "longer than the model reads": (["--overwrite", "--cutoff", "512", "--max-new-tokens", "250"],
                                    ["the model reads at most 256 tokens", "--max-new-tokens 250"]),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_impossible_config_exits_with_one_line_and_keeps_the_output(case, tiny_run, run_copy, capsys):
    extra, pieces = BAD_CONFIGS[case]
    extra = [str(run_copy) if a == "RUN" else a for a in extra]
    (run_copy / "results.json").write_text("{}")  # as a finished run has one
    before = tree_bytes(run_copy)
    code, err = main_error([*tiny_run[2], "--out", str(run_copy), *extra], capsys)
    assert code == 2
    assert_one_line(err, "error: ", *pieces)
    assert tree_bytes(run_copy) == before


FLOAT_FLAGS = [f.name for f in fields(train.Config) if type(f.default) is float]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", FLOAT_FLAGS)
def test_float_flag_that_is_not_finite_exits_with_one_line_and_keeps_the_output(name, value, tiny_run, run_copy,
                                                                                  capsys, tmp_path):
    """nan passes every range check (a comparison with nan is False), inf some: each float flag refuses
    both before anything is written, in a new folder or over another run's."""
    flag = "--" + name.replace("_", "-")
    extra = ["--local-steps", "0"] if name == "local_epochs" else []  # --local-epochs counts only then
    # flag=value: argparse would read a lone -inf as another option
    before = tree_bytes(run_copy)
    for out in (run_copy, tmp_path / "new"):
        code, err = main_error([*tiny_run[2], *extra, f"{flag}={value}", "--out", str(out), "--overwrite"], capsys)
        assert code == 2
        assert_one_line(err, f"error: {flag} {float(value)} must be a finite number")
    assert tree_bytes(run_copy) == before
    assert not (tmp_path / "new").exists()


def test_earlier_flag_and_config_names_still_work(tmp_path):
    """--alpha and --mix became --lambda-scale and --local-weight; the old flags and the old names in a
    run folder's config.json still mean the same."""
    cfg, _ = train.parse_args(["--alpha", "0.3", "--mix", "0.4"])
    assert (cfg.lambda_scale, cfg.local_weight) == (0.3, 0.4)
    cfg, _ = train.parse_args(["--lambda-scale", "0.2", "--local-weight", "0.6"])
    assert (cfg.lambda_scale, cfg.local_weight) == (0.2, 0.6)
    old = {k: v for k, v in vars(train.Config()).items() if k not in ("lambda_scale", "local_weight")}
    (tmp_path / "config.json").write_text(json.dumps({**old, "alpha": 0.35, "mix": 0.45}))
    resumed = train.resumed_config(train.Config(), str(tmp_path))
    assert (resumed.lambda_scale, resumed.local_weight, resumed.out) == (0.35, 0.45, str(tmp_path))


def test_seeds_run_each_seed_in_its_folder_and_summarise_mean_and_std(tiny_run, tmp_path, capsys):
    out = tmp_path / "seeds"
    args = [*tiny_run[2], "--rounds", "2", "--methods", "fedit,feddpa-t", "--seeds", "0,3", "--out", str(out)]
    train.main(args)
    res = json.loads((out / "results.json").read_text())
    per_seed = [json.loads((out / f"seed{s}" / "results.json").read_text()) for s in (0, 3)]
    assert res["seeds"] == [0, 3] and [r["config"]["seed"] for r in per_seed] == [0, 3]
    for method in ("fedit", "feddpa-t"):
        p = [r["methods"][method]["P"] for r in per_seed]
        mean, std = res["summary"][method]["P"]
        assert mean == pytest.approx(sum(p) / 2) and std == pytest.approx(abs(p[0] - p[1]) / 2 ** 0.5)
    assert "lambda_auroc" in res["summary"]["feddpa-t"]
    printed = capsys.readouterr().out
    assert "mean ± std over seeds 0, 3" in printed and "paired differences" in printed
    # of COMPARISONS, only FedDPA-T against FedIT was run: on P and on TTP
    assert [(d["a"], d["b"], d["metric"]) for d in res["differences"]] == [("feddpa-t", "fedit", m) for m in ("P", "TTP")]
    for d in res["differences"]:
        want = [r["methods"]["feddpa-t"][d["metric"]] - r["methods"]["fedit"][d["metric"]] for r in per_seed]
        assert d["per_seed"] == pytest.approx(want) and d["diff"] == pytest.approx(sum(want) / 2)
        assert d["ci95"][0] <= d["diff"] <= d["ci95"][1]
    (out / "seed3" / "results.json").unlink()  # as if stopped before its end: --resume finishes it
    train.main(["--resume", str(out)])
    assert json.loads((out / "results.json").read_text())["summary"] == res["summary"]
    # carried elsewhere as config.json and each seed's results.json alone: the finished seeds are read, not rerun
    carried = tmp_path / "carried"
    for f in ("config.json", "seed0/results.json", "seed3/results.json"):
        (carried / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / f, carried / f)
    capsys.readouterr()
    train.main(["--resume", str(carried)])
    assert json.loads((carried / "results.json").read_text())["summary"] == res["summary"]
    assert "seed 3: " + str(carried / "seed3") + " (finished)" in capsys.readouterr().out
    assert sorted(p.name for p in (carried / "seed3").iterdir()) == ["results.json"]
    seed3 = json.loads((carried / "seed3" / "results.json").read_text())
    seed3["config"]["lr"] *= 2  # a seed of another study is refused, naming the file and the setting
    (carried / "seed3" / "results.json").write_text(json.dumps(seed3))
    code, err = main_error(["--resume", str(carried)], capsys)
    assert code == 2 and err.count("\n") == 1 and str(carried / "seed3" / "results.json") in err and "its lr is" in err
    code, err = main_error([*args[:-2], "--out", str(tmp_path / "x"), "--seeds", "0,a"], capsys)
    assert code == 2 and "--seeds '0,a': comma-separated non-negative integers" in err


ABLATIONS = ("k1", "k3", "k10", "sim-l2", "sim-pearson", "pool-mean")  # the budget study re-scored (issue 38)


@pytest.mark.parametrize("name", ["flan1-smollm2", "flan2-smollm2", "flan1-to-flan2-smollm2", "flan1-smollm2-bf16",
                                  "budget-smollm2", *(f"budget-smollm2-{w}" for w in ABLATIONS), "budget-smollm2-unseen"])
def test_the_carried_smollm2_study_gives_the_table_and_intervals_in_the_docs(name, tmp_path, capsys):
    """docs/study/<name> holds every seed's results.json of a SmolLM2 study (FLAN set 1, set 2, set 1 with
    set 2's tasks unseen, set 1 in bfloat16 with FedDPA-F); its summary, recomputed from them by the
    documented command (finished seeds are read, none is run: no model or data needed), prints the rows
    and paired intervals that docs/real-models.md shows, line for line (on unseen tasks too, where the
    study has them)."""
    study = tmp_path / name
    shutil.copytree(ROOT / "docs" / "study" / name, study)
    train.main(["--resume", str(study)])
    printed = capsys.readouterr().out
    doc = {line.rstrip() for line in (ROOT / "docs" / "real-models.md").read_text().splitlines()}
    config = json.loads((study / "config.json").read_text())
    methods = config["methods"].split(",")
    compared = [c for c in runs.COMPARISONS if c[0] in methods and c[1] in methods]
    expected = len(methods) + len(compared)  # every method's row, every comparison whose methods ran
    if config["test_data"]:  # and again on the unseen tasks, TTP only
        expected += len(methods) + len([c for c in compared if c[2] == "TTP"])
    rows = [line.rstrip() for line in printed.splitlines() if line.startswith(tuple(f"{m} " for m in methods))]
    assert len(rows) == expected
    assert [row for row in rows if row not in doc] == []


def rescored_copy(base: Path, out: Path, shift: float, methods: list, **settings) -> Path:
    """A copy of carried study `base` as if re-scored with `settings`, keeping `methods`, every
    per-instance ROUGE-1 of theirs raised by `shift`."""
    shutil.copytree(base, out)
    for path in [out / "config.json", *out.glob("seed*/results.json")]:
        res = json.loads(path.read_text())
        (res["config"] if "config" in res else res).update(settings, methods=",".join(methods))
        if "config" in res:  # a seed's results
            res["methods"] = {m: res["methods"][m] for m in methods}
            for c in (c for m in methods for c in res["methods"][m]["per_client"]):
                for s in c.values():
                    s["rouge1_each"] = [x + shift for x in s["rouge1_each"]]
        path.write_text(json.dumps(res))
    return out


def test_ablations_are_paired_against_the_study_they_rescore(tmp_path, capsys):
    """tools/ablations.py: each re-scored method minus the base study's same method, on P and TTP. Every
    instance's score raised by 10 is a difference of exactly +10 in each seed, interval [+10, +10], above;
    the setting is named with the base's value; a study that differs in two settings, or whose method the
    base lacks, is one line naming it."""
    from tools import ablations
    base = ROOT / "docs" / "study" / "flan1-smollm2-bf16"
    k1 = rescored_copy(base, tmp_path / "k1", 10.0, ["feddpa-t", "feddpa-t-calibrated"], k_refs=1)
    same = rescored_copy(base, tmp_path / "same", 0.0, ["feddpa-f"], pool="mean")
    assert ablations.main([str(base), str(k1), str(same)]) == 0
    lines = [line.replace("[ ", "[") for line in capsys.readouterr().out.splitlines()[1:]]
    assert [line.split()[:4] for line in lines] == [
        ["k_refs", "1", "(5)", m] for m in ("feddpa-t", "feddpa-t", "feddpa-t-calibrated", "feddpa-t-calibrated")] + [
        ["pool", "mean", "(last)", "feddpa-f"]] * 2
    for line in lines[:4]:
        assert line.split()[4:] == [line.split()[4], "+10.0", "[+10.0,", "+10.0]", "above", "+10.0", "+10.0", "+10.0"]
    for line in lines[4:]:
        assert line.split()[5:] == ["+0.0", "[+0.0,", "+0.0]", "identical", "+0.0", "+0.0", "+0.0"]
    two = rescored_copy(base, tmp_path / "two", 0.0, ["feddpa-t"], k_refs=1, pool="mean")
    foreign = rescored_copy(base, tmp_path / "foreign", 0.0, ["feddpa-t"], k_refs=1)
    for path in [foreign / "config.json", *foreign.glob("seed*/results.json")]:  # its feddpa-t renamed
        res = json.loads(path.read_text())
        (res["config"] if "config" in res else res)["methods"] = "feddpa-t-sum"
        if "config" in res:
            res["methods"]["feddpa-t-sum"] = res["methods"].pop("feddpa-t")
        path.write_text(json.dumps(res))
    for study, message in ((two, "differs from the base study in k_refs, pool"),
                           (foreign, "feddpa-t-sum is not among the base study's methods")):
        assert ablations.main([str(base), str(study)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(study) in err and message in err


def test_the_carried_ablations_give_the_intervals_in_the_docs(capsys):
    """tools/ablations.py on the carried budget study and its six re-scorings prints the paired
    differences docs/real-models.md shows, line for line: each re-scored method on P and TTP."""
    from tools import ablations
    study = ROOT / "docs" / "study"
    assert ablations.main([str(study / "budget-smollm2"), *(str(study / f"budget-smollm2-{w}") for w in ABLATIONS)]) == 0
    lines = [line.rstrip() for line in capsys.readouterr().out.splitlines()[1:]]
    doc = {line.rstrip() for line in (ROOT / "docs" / "real-models.md").read_text().splitlines()}
    assert len(lines) == 2 * (2 + 2 + 2 + 1 + 1 + 2) and [line for line in lines if line not in doc] == []


def test_test_data_scores_every_method_on_the_unseen_tasks(tiny_run, tmp_path, capsys):
    """--test-data: every method also answers another folder's test sets, tasks no client trained on
    (their tasks and per-instance scores checked by answering them again from the saved adapters; which
    adapters a method uses is evaluate_method's, held to the oracle in test_oracle.py), reported as TTP;
    over seeds, mean ± std and the paired differences on TTP only."""
    world = builtin.benchmark(seed=0, n_train=20, n_test=5)
    unseen_tasks = world.client_tasks[3:6]
    other = tmp_path / "other"
    data.write_federated(data.federated_data("other", world.clients[3:6],
                                             [r for t in unseen_tasks for r in world.tests[t]]), other)
    out = tmp_path / "seeds"
    train.main([*tiny_run[2], "--rounds", "1", "--methods", "fedit,local,feddpa-t", "--test-data", str(other),
                "--seeds", "0,1", "--out", str(out)])
    res = json.loads((out / "results.json").read_text())
    per_seed = [json.loads((out / f"seed{s}" / "results.json").read_text()) for s in (0, 1)]
    r = per_seed[0]
    assert not set(unseen_tasks) & set(r["client_tasks"]) and set(r["unseen"]) == {"fedit", "local", "feddpa-t"}
    model = hf.from_pretrained(str(tiny_run[0]))
    tok = hf.load_tokenizer(str(tiny_run[0]), model.config)
    lora.inject(model, lora.TARGETS, r=8, lora_alpha=16)  # train.py's defaults
    model.eval()
    tests = {t: world.tests[t][:2] for t in sorted(unseen_tasks)}
    dec = evaluation.Decode(max_new_tokens=4, batch_size=64, cutoff=128)
    for method, client, slot, file in (("fedit", 0, "global", "fedit/global"), ("local", 1, "local", "local/client1_local")):
        lora.load_adapter(model, slot, hf.read_safetensors(str(out / "seed0" / "adapters" / f"{file}.safetensors")))
        scored = r["unseen"][method]["per_client"][client]
        assert list(scored) == list(tests), method
        for task, recs in tests.items():
            answers = evaluation.answer(evaluation.Evaluator(model, tok, dec, "cpu"), recs, weights={slot: 1.0})
            assert scored[task]["rouge1_each"] == pytest.approx(evaluation.score(answers, [x["output"] for x in recs])["rouge1_each"])
    for method, row in r["unseen"].items():
        assert row["TTP"] == pytest.approx(sum(sum(s["rouge1"] for s in c.values()) / len(c) for c in row["per_client"]) / 3)
        mean, _ = res["summary_unseen"][method]["TTP"]
        assert mean == pytest.approx((per_seed[0]["unseen"][method]["TTP"] + per_seed[1]["unseen"][method]["TTP"]) / 2)
    (d,) = res["differences_unseen"]  # FedDPA-T against FedIT on TTP: no P on tasks no client owns
    assert (d["a"], d["b"], d["metric"]) == ("feddpa-t", "fedit", "TTP")
    assert d["per_seed"] == pytest.approx([x["unseen"]["feddpa-t"]["TTP"] - x["unseen"]["fedit"]["TTP"] for x in per_seed])
    assert "unseen tasks" in capsys.readouterr().out
    code, err = main_error([*tiny_run[2], "--test-data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and err.count("\n") == 1 and "nowhere: no such dataset folder" in err
    assert not (tmp_path / "x").exists()


def scores(*tasks_each):
    """per_client scores as evaluate_method writes them, from each client's {task: per-instance ROUGE-1}."""
    return [{t: {"rouge1": sum(xs) / len(xs), "rouge1_each": list(xs)} for t, xs in c.items()} for c in tasks_each]


def test_paired_difference_on_hand_computed_cases():
    """evaluation.paired_difference against cases whose answer is known without it."""
    pd = evaluation.paired_difference
    # 1. A = B + 5 on every instance, B's instances spread from 0 to 100: paired, every replicate is +5
    b = scores({"x": [0, 100, 20, 80], "y": [50, 0, 100, 10]}, {"x": [90, 10, 0, 40], "y": [0, 0, 100, 100]})
    a = [{t: {"rouge1_each": [v + 5 for v in s["rouge1_each"]]} for t, s in c.items()} for c in b]
    for metric in ("P", "TTP"):
        assert pd([a], [b], client_tasks=[["x", "y"]], metric=metric) == {"diff": 5.0, "ci95": [5.0, 5.0], "per_seed": [5.0]}
    # 2. the clients answered the same instances: +d_i for client 0 and -d_i for client 1 on each instance i
    #    cancel in every replicate only if one draw serves both clients
    b = scores({"x": [0, 0, 0]}, {"x": [50, 50, 50]})
    a = scores({"x": [30, 0, 90]}, {"x": [20, 50, -40]})
    assert pd([a], [b], client_tasks=[["x", "x"]], metric="P") == {"diff": 0.0, "ci95": [0.0, 0.0], "per_seed": [0.0]}
    # 3. one client, differences 0 and 10: a replicate's mean is 0, 5 or 10 with probability 1/4, 1/2, 1/4,
    #    so the 2.5th and 97.5th percentiles are 0 and 10 and about half the replicates are 5
    a, b = scores({"x": [10, 30]}), scores({"x": [10, 20]})
    assert pd([a], [b], client_tasks=[["x"]], metric="P", n_boot=4000) == {"diff": 5.0, "ci95": [0.0, 10.0], "per_seed": [5.0]}
    #    differences 0, 3, 9: of the 27 equally likely draws one has mean 0 and one mean 9 (3.7% each, more
    #    than 2.5% and less than 5%: 148 +- 12 of 4000), so the 95% interval is exactly [0, 9]
    a, b = scores({"x": [0, 3, 9]}), scores({"x": [0, 0, 0]})
    assert pd([a], [b], client_tasks=[["x"]], metric="P", n_boot=4000) == {"diff": 4.0, "ci95": [0.0, 9.0], "per_seed": [4.0]}
    #    differences 0, 4, 8, 12: P(mean <= 1) = 5/256 = 1.95% (390 +- 20 of 20000, under 2.5%), P(mean <= 2)
    #    = 15/256 = 5.9%: the interval is exactly [2, 10], not the 1st and 99th percentiles' [1, 11]
    a, b = scores({"x": [0, 4, 8, 12]}), scores({"x": [0, 0, 0, 0]})
    assert pd([a], [b], client_tasks=[["x"]], metric="P", n_boot=20000) == {"diff": 6.0, "ci95": [2.0, 10.0], "per_seed": [6.0]}
    # 4. seeds are combined by averaging: constant differences 2 and 6 give 4, every replicate too
    runs = [(scores({"x": [v + 2] * 3}), scores({"x": [v] * 3})) for v in (10, 70)]
    runs[1] = (scores({"x": [76] * 3}), runs[1][1])
    got = pd([r[0] for r in runs], [r[1] for r in runs], client_tasks=[["x"], ["x"]], metric="TTP")
    assert got == {"diff": 4.0, "ci95": [4.0, 4.0], "per_seed": [2.0, 6.0]}
    # 5. TTP weighs every task alike for each client: tasks x (+10) and y (0) give +5 whatever their sizes
    a = scores({"x": [20], "y": [0, 0, 0, 0, 0]})
    b = scores({"x": [10], "y": [0, 0, 0, 0, 0]})
    assert pd([a], [b], client_tasks=[["y"]], metric="TTP") == {"diff": 5.0, "ci95": [5.0, 5.0], "per_seed": [5.0]}
    assert pd([a], [b], client_tasks=[["y"]], metric="P")["diff"] == 0.0
    with pytest.raises(ValueError, match="P or TTP"):
        pd([a], [b], client_tasks=[["y"]], metric="ROUGE")


@pytest.mark.parametrize("ci, each, want", [
    ([0.5, 3.0], [1.0, 2.0, 0.2], "above"), ([-3.0, -0.5], [-1.0, -2.0, -0.2], "below"),
    ([0.5, 3.0], [1.0, 2.0, -0.2], "undecided"),   # the interval excludes 0 but one seed disagrees
    ([-3.0, -0.5], [-1.0, 0.0, -2.0], "undecided"),  # a seed at 0 does not agree
    ([-0.5, 3.0], [1.0, 2.0, 0.2], "undecided"),   # every seed agrees but the interval holds 0
    ([0.0, 0.0], [0.0, 0.0, 0.0], "identical"), ([0.0, 0.0], [0.0], "identical"), ([0.1, 0.4], [0.3], "above")])
def test_a_claim_is_decided_only_where_the_interval_excludes_0_and_every_seed_agrees(ci, each, want):
    """runs.verdict, DEVELOPERS.md's rule for an ordering between methods."""
    assert runs.verdict({"ci95": ci, "per_seed": each}) == want


def test_seed_summary_takes_a_minus_b_on_each_comparison_s_own_metric():
    """runs.paired_differences on results whose differences are not 0 (a tiny random model's are): FedDPA-T
    minus FedIT on P and TTP, FedDPA-T minus Local on P, and on the unseen tasks TTP only. Clients 0 and 1 own
    tasks x and y; one instance per task, so every interval is its point."""
    def result(**per_method):
        return {"client_tasks": ["x", "y"], "methods": {m: {"per_client": scores(*c)} for m, c in per_method.items()}}
    one = result(**{"feddpa-t": ({"x": [60], "y": [20]}, {"x": [10], "y": [50]}),  # TTP 35, P 55
                    "fedit": ({"x": [40], "y": [40]}, {"x": [40], "y": [40]}),       # TTP 40, P 40
                    "local": ({"x": [30], "y": [0]}, {"x": [0], "y": [35]})})        # TTP 16.25, P 32.5
    got = {(d["a"], d["b"], d["metric"]): (d["diff"], d["ci95"]) for d in runs.paired_differences([one])}
    assert got == {("feddpa-t", "fedit", "P"): (15.0, [15.0, 15.0]), ("feddpa-t", "fedit", "TTP"): (-5.0, [-5.0, -5.0]),
                   ("feddpa-t", "local", "P"): (22.5, [22.5, 22.5])}
    one["unseen"] = one.pop("methods")
    got = {(d["a"], d["b"], d["metric"]): d["diff"] for d in runs.paired_differences([one], "unseen")}
    assert got == {("feddpa-t", "fedit", "TTP"): -5.0}


def test_diverging_run_stops_naming_client_and_round(tiny_run, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = main_error([*tiny_run[2], "--out", str(out), "--lr", "1e30"], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: fedit: loss became")
    assert "of client 0 in round 1; stopped" in err and "keeps the last good round (0 of 3 complete)" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["current"] is None  # the initial state


def test_errors_in_a_subprocess_are_one_line_without_traceback(tiny_run, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_run[0], base)
    BAD_MODELS["offsets outside the buffer"][0](base)
    for args in ([*tiny_run[2], "--model", str(base), "--out", str(tmp_path / "a")],
                 [*tiny_run[2], "--out", str(tmp_path / "b"), "--methods", "fedavg"]):
        r = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stdout == ""
        assert_one_line(r.stderr, "error: ")
        assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    r = subprocess.run([sys.executable, "train.py", *args, "--debug"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" in r.stderr and "UserError: unknown method(s) fedavg" in r.stderr


# ----------------------------------------------------------------------------------------------
# A small run of every method, in float64, as recorded: the pretrained base, every adapter and loss
# within RTOL, every answer's score exactly. float64 makes the record hold on any CPU kind: another
# CPU (Intel Xeon or AMD EPYC, AVX-512 or AVX2 kernels, MKL's paths for each) or thread count sums in
# another order, which moves float64 results by ~1e-15 relative, far inside RTOL, and flips no answer;
# a change to the method moves them by far more. A change that is meant to change numbers records it
# anew, on any machine, saying why: python -m tools.record_golden

GOLDEN = ROOT / "tests" / "data" / "golden_run.json"
GOLDEN_ARGS = ["--rounds", "2", "--local-steps", "2", "--test-per-task", "2", "--pretrain-steps", "8",
               "--max-new-tokens", "6", "--dtype", "float64"]
RTOL = 1e-9    # adapters, base and losses: float64 summation order moves them by ~1e-15 (docs/tests.md)
LAMBDA_ATOL = 1e-6  # lambda is computed in float32 from the float64 representations


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def projections(path: Path) -> list:
    """A safetensors file as 3 numbers: the norm of all its tensors, and their dot products with two
    fixed vectors of uniform draws (seeded), which a change to any one element moves."""
    flat = torch.cat([t.double().flatten() for _, t in sorted(hf.read_safetensors(str(path)).items())])
    g = torch.Generator().manual_seed(12345)
    probes = torch.rand(2, len(flat), generator=g, dtype=torch.float64) * 2 - 1
    return [flat.norm().item(), *(probes @ flat).tolist()]


def fingerprint(out: Path, cache: Path) -> dict:
    res = json.loads((out / "results.json").read_text())
    base = next(cache.rglob("model.safetensors")).parent
    return {"args": GOLDEN_ARGS,
            "tokenizer": sha256(base / "tokenizer.model"),
            "base": projections(base / "model.safetensors"),
            "adapters": {str(p.relative_to(out)): projections(p) for p in sorted((out / "adapters").rglob("*.safetensors"))},
            "methods": {m: {k: v for k, v in r.items() if k != "eval_seconds"} for m, r in res["methods"].items()},
            "training": {p: [{k: v for k, v in h.items() if k != "seconds"} for h in t["history"]]
                         for p, t in res["training"].items()}}


def golden_run(tmp: Path) -> dict:
    train.main([*GOLDEN_ARGS, "--out", str(tmp / "out"), "--cache", str(tmp / "cache"), "--quiet"])
    return fingerprint(tmp / "out", tmp / "cache")


def differences(got, want, path="") -> list:
    """Where got differs from want: numbers under a lambda key by more than LAMBDA_ATOL, losses and
    projections by more than RTOL of their scale, every other value (scores, clients, counts) at all."""
    if isinstance(want, dict):
        if set(got) != set(want):
            return [f"{path}: keys {sorted(set(got) ^ set(want))}"]
        return [d for k in want for d in differences(got[k], want[k], f"{path}/{k}")]
    if isinstance(want, list):
        if len(got) != len(want):
            return [f"{path}: {len(got)} items, recorded {len(want)}"]
        scale = max(abs(x) for x in want) if want and all(isinstance(x, float) for x in want) else 0.0
        return [d for i, (a, b) in enumerate(zip(got, want))
                for d in (differences(a, b, f"{path}[{i}]") if scale == 0.0 or "lambda" in path
                          else [f"{path}[{i}]: {a} != {b}"] * (abs(a - b) > RTOL * scale))]
    if isinstance(want, float) and "lambda" in path:
        return [f"{path}: {got} != {want}"] * (abs(got - want) > LAMBDA_ATOL)
    if isinstance(want, float) and path.endswith("loss"):
        return [f"{path}: {got} != {want}"] * (abs(got - want) > RTOL * abs(want))
    return [f"{path}: {got!r} != {want!r}"] * (got != want)


def test_small_run_in_float64_equals_the_recorded_one_on_any_cpu(tmp_path):
    """The golden run against its record; never skipped: it holds across CPU kinds and thread counts
    (docs/tests.md says how that was checked)."""
    recorded = json.loads(GOLDEN.read_text())
    assert recorded["args"] == GOLDEN_ARGS, "the record is of other arguments: python -m tools.record_golden"
    problems = differences(golden_run(tmp_path), recorded)
    assert not problems, f"{len(problems)} differences, first: " + "; ".join(problems[:5])
