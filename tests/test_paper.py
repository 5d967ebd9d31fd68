"""The paper's experiments as train.py runs them: the similarity metrics of the dynamic weight, task
subsets (--tasks), the convergence curve (--eval-every) and re-scoring a finished run's adapters with
other inference settings (--rescore)."""
import json
import math
import shutil
from dataclasses import replace

import pytest
import torch

import fed
import feddpa
import hf
import train
from conftest import write_three_clients
from runs import UserError


# ----------------------------------------------------------------------------------------------
# --similarity: each metric against values worked out by hand

def test_each_similarity_equals_its_hand_computed_value():
    a = torch.tensor([[1.0, 2.0, 3.0]])
    refs = torch.tensor([[1.0, 0.0, 1.0], [-1.0, -2.0, -3.0], [2.0, 4.0, 6.0]])
    # a.b = 4, |a| = sqrt 14, |b| = sqrt 2: cos = 4 / sqrt 28; a - 2 = (-1, 0, 1), b - 2/3 = (1, -2, 1) / 3:
    # Pearson 0; |a - b| = sqrt 8: L2 = 1 - sqrt 8 / (sqrt 14 + sqrt 2)
    want = {"cosine": [4 / math.sqrt(28), -1.0, 1.0],
            "pearson": [0.0, -1.0, 1.0],
            "l2": [1 - math.sqrt(8) / (math.sqrt(14) + math.sqrt(2)), 0.0, 1 - math.sqrt(14) / (3 * math.sqrt(14))]}
    for kind, values in want.items():
        got = feddpa.similarity(a[:, None, :], refs[None], kind)[0]
        assert got.tolist() == pytest.approx(values, abs=1e-6), kind
        lam = feddpa.dynamic_lambda(a, refs, 0.5, kind=kind)  # clamp(0.5 * mean, 0, 1)
        assert lam.item() == pytest.approx(min(max(0.5 * sum(values) / 3, 0.0), 1.0), abs=1e-6), kind
    # L2 reads the norms: a scaled copy is as similar as can be by cosine, not by distance
    assert feddpa.similarity(a[:, None], 2 * a[None], "cosine").item() == pytest.approx(1.0)
    assert feddpa.similarity(a[:, None], 2 * a[None], "l2").item() == pytest.approx(1 - 1 / 3)
    with pytest.raises(ValueError, match="unknown similarity 'dot'"):
        feddpa.similarity(a, a, "dot")


def test_similarity_flag_is_checked(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--similarity", "dot", "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: --similarity 'dot': cosine, l2, pearson\n"
    with pytest.raises(SystemExit) as e:
        train.main(["--methods", "fedit", "--curve-methods", "fedit,local", "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and capsys.readouterr().err == "error: --curve-methods: local not among --methods\n"


# ----------------------------------------------------------------------------------------------
# --tasks: exactly those clients, by their ids, and those tests

def test_tasks_keep_exactly_those_clients_and_tests():
    full = train.load_data("builtin", 0, 0, 0.5, 10, 0)
    pick = [full.client_tasks[5], full.client_tasks[2]]
    sub = train.load_data("builtin", 0, 0, 0.5, 10, 0, ",".join(pick))
    assert sub.client_ids == [2, 5] and sub.client_tasks == [full.client_tasks[2], full.client_tasks[5]]
    assert sub.clients == [full.clients[2], full.clients[5]]
    assert sub.tests == {t: full.tests[t] for t in full.tests if t in pick}
    # with --clients N the records of those tasks are kept, then split
    split = train.load_data("builtin", 0, 4, 0.5, 10, 0, ",".join(pick))
    assert len(split.clients) == 4 and set(split.tests) == set(pick)
    assert sorted(map(json.dumps, (r for c in split.clients for r in c))) == \
        sorted(map(json.dumps, full.clients[2] + full.clients[5]))
    with pytest.raises(UserError, match=r"^builtin: --tasks: unknown task\(s\) nope; the tasks are "):
        train.load_data("builtin", 0, 0, 0.5, 10, 0, "nope")


def test_a_subset_runs_clients_are_the_full_runs_clients(tiny_dir, tmp_path):
    """Local trains each client alone: with --tasks, the clients kept train exactly the adapters they
    train in the full run (their ids name their seeds: data order and dropout)."""
    write_three_clients(tmp_path / "data", n_train=16, n_test=2)
    common = ["--data", str(tmp_path / "data"), "--model", str(tiny_dir), "--rounds", "2", "--local-steps", "2",
              "--batch-size", "4", "--micro-batch-size", "4", "--test-per-task", "2", "--max-new-tokens", "2",
              "--methods", "local", "--lora-dropout", "0.2", "-q"]
    train.main([*common, "--out", str(tmp_path / "full")])
    tasks = json.loads((tmp_path / "full" / "results.json").read_text())["client_tasks"]
    train.main([*common, "--tasks", f"{tasks[2]},{tasks[0]}", "--out", str(tmp_path / "sub")])
    res = json.loads((tmp_path / "sub" / "results.json").read_text())
    assert res["client_ids"] == [0, 2] and res["client_tasks"] == [tasks[0], tasks[2]]
    assert all(set(c) == {tasks[0], tasks[2]} for c in res["methods"]["local"]["per_client"])
    for i in (0, 2):
        full = hf.read_safetensors(str(tmp_path / "full" / "adapters" / "local" / f"client{i}_local.safetensors"))
        sub = hf.read_safetensors(str(tmp_path / "sub" / "adapters" / "local" / f"client{i}_local.safetensors"))
        assert all(torch.equal(full[k], sub[k]) for k in full), i
    assert not (tmp_path / "sub" / "adapters" / "local" / "client1_local.safetensors").exists()


# ----------------------------------------------------------------------------------------------
# --eval-every: the convergence curve

CURVE_RUN = ["--rounds", "3", "--local-steps", "2", "--batch-size", "4", "--micro-batch-size", "4",
             "--test-per-task", "3", "--max-new-tokens", "4", "--dtype", "float64", "--lora-dropout", "0.1",
             "--methods", "base,local,fedit,feddpa-f,feddpa-t,feddpa-t-calibrated", "-q"]


@pytest.fixture(scope="module")
def curve_runs(tiny_dir, tmp_path_factory):
    """Three runs of the tiny model on three clients: without a curve and with one on every test instance,
    where the test outputs are the base model's own answers (which hold no word, so ROUGE is 0: exact
    match is the score that moves as the adapters train, and gives the checks teeth); and with a curve
    on a subset, on the data's own outputs (where some answers score ROUGE-1 above 0)."""
    import builtin
    import data
    import evaluation
    d = tmp_path_factory.mktemp("curves")
    world = builtin.benchmark(seed=0, n_train=16, n_test=3)
    base = hf.from_pretrained(str(tiny_dir), dtype=torch.float64)
    tok = hf.load_tokenizer(str(tiny_dir), base.config)
    records = [r for recs in list(world.tests.values())[:3] for r in recs]
    ev = evaluation.Evaluator(base, tok, evaluation.Decode(max_new_tokens=4, batch_size=16), "cpu")
    tests = [{**r, "output": a} for r, a in zip(records, evaluation.answer(ev, records))]
    data.write_federated(data.federated_data("tiny", world.clients[:3], tests), d / "data")
    common = ["--data", str(d / "data"), "--model", str(tiny_dir), *CURVE_RUN]
    train.main([*common, "--out", str(d / "plain")])
    train.main([*common, "--eval-every", "2", "--curve-per-task", "3", "--out", str(d / "curve")])
    write_three_clients(d / "real", n_train=16, n_test=3)
    train.main(["--data", str(d / "real"), "--model", str(tiny_dir), *CURVE_RUN, "--eval-every", "1",
                "--curve-per-task", "2", "--out", str(d / "subset")])
    return d


def results(d):
    return json.loads((d / "results.json").read_text())


def test_curves_change_nothing_that_training_does(curve_runs):
    plain, curve = curve_runs / "plain", curve_runs / "curve"
    for path in sorted((plain / "adapters").rglob("*.safetensors")):
        a, b = hf.read_safetensors(str(path)), hf.read_safetensors(str(curve / path.relative_to(plain)))
        assert all(torch.equal(a[k], b[k]) for k in a), path
    assert [h["loss"] for t in results(plain)["training"].values() for h in t["history"]] == \
        [h["loss"] for t in results(curve)["training"].values() for h in t["history"]]


def test_the_curves_last_point_is_the_final_evaluation(curve_runs):
    """--curve-per-task as large as the test sets: the curve's instances are the final evaluation's, so
    its last point is the final P and TTP; every 2 rounds and after the last (3); FedDPA-F's one round
    of fine-tuning is round 4; the base model, which no phase trains, has none."""
    res = results(curve_runs / "curve")["methods"]
    assert "curve" not in res["base"]
    for method in ("local", "fedit", "feddpa-t", "feddpa-t-calibrated", "feddpa-f"):
        rounds = [p["round"] for p in res[method]["curve"]]
        assert rounds == ([4] if method == "feddpa-f" else [2, 3]), method
        assert res[method]["curve"][-1]["P"] == res[method]["P"], method
        assert res[method]["curve"][-1]["TTP"] == res[method]["TTP"], method
        for k in ("P_exact", "TTP_exact"):
            assert res[method]["curve"][-1][k] == res[method][k], (method, k)
    points = [p[k] for m in res.values() for p in m.get("curve", []) for k in ("P_exact", "TTP_exact")]
    assert len(set(points)) > 3  # the scores move: the check has teeth


def test_a_curve_point_scores_the_rounds_adapters(tiny):
    """A point of FedIT's curve answers with the round's global adapter, not the phase's starting one:
    the test outputs are the answers of the round's adapter, so the point is those answers' score (100
    but where an answer is empty), and the starting adapter's answers score otherwise (the check has teeth)."""
    import data
    import evaluation
    import lora
    m, tok, world = tiny
    tasks = world.client_tasks[:3]
    start = lora.get_adapter(m, "global")
    g = torch.Generator().manual_seed(3)
    now = {k: v + (torch.randn(v.shape, generator=g) if "lora_B" in k else 0) for k, v in start.items()}
    records = [r for t in tasks for r in world.tests[t][:2]]
    ev = evaluation.Evaluator(m, tok, evaluation.Decode(max_new_tokens=4, batch_size=8), "cpu", feddpa.Recipe())
    answers = {}
    for name, adapter in (("start", start), ("now", now)):
        with lora.using(m, {"global": adapter}):
            answers[name] = evaluation.answer(ev, records, weights={"global": 1.0})
    assert answers["start"] != answers["now"]
    it = iter(answers["now"])
    fd = data.FedData(world.clients[:3], {t: [{**r, "output": next(it)} for r in world.tests[t][:2]] for t in tasks},
                      list(tasks), "tiny")
    cfg = train.Config(methods="fedit", eval_every=1, curve_per_task=2)
    state = {"trained": {}, "curves": {}}
    phase = feddpa.Phase([fed.Client(i, [], torch.Generator()) for i in range(3)], None, 1, 1.0, start, 0, "count")
    train.curve(cfg, state, ev, fd)("fedit", phase, fed.Federation(now, 3, round=1))
    refs = [r["output"] for t in tasks for r in fd.tests[t]]
    want = {name: sum(evaluation.score(a[2 * k:2 * k + 2], refs[2 * k:2 * k + 2])["rouge1"] for k in range(3)) / 3
            for name, a in answers.items()}
    assert want["start"] != want["now"]
    # the held-out loss, one record at a time through the plain forward (its mean over the answer's tokens)
    loss = {}
    for name, adapter in (("start", start), ("now", now)):
        with lora.using(m, {"global": adapter}, {"global": 1.0}):
            each = [m(torch.tensor([e["input_ids"]]), None, torch.tensor([e["labels"]]))[1].item()
                    for e in (data.encode_example(tok, r, 1 << 30) for t in tasks for r in fd.tests[t])]
        loss[name] = sum(sum(each[2 * k:2 * k + 2]) / 2 for k in range(3)) / 3
    assert abs(loss["start"] - loss["now"]) > 0.1
    others = {"trained": {}, "curves": {}}  # --curve-methods: only those methods get a curve
    train.curve(replace(cfg, methods="fedit,centralized", curve_methods="centralized"), others, ev, fd)(
        "fedit", phase, fed.Federation(now, 3, round=1))
    assert others["curves"] == {}
    assert state["curves"] == {"fedit": [{"round": 1, "P": pytest.approx(want["now"]), "TTP": pytest.approx(want["now"]),
                                          "P_exact": 100.0, "TTP_exact": 100.0, "P_loss": pytest.approx(loss["now"]),
                                          "TTP_loss": pytest.approx(loss["now"])}]}


def test_answer_losses_are_each_records_loss_under_its_own_mix(tiny):
    """evaluation.answer_losses in batches of mixed lengths, with lambda per instance, equals each record
    alone through the plain forward with its lambda as a float mix (the model's mean loss over the
    answer's tokens): the per-row reduction and the per-example mix are right."""
    import data
    import evaluation
    import lora
    m, tok, world = tiny
    g = torch.Generator().manual_seed(5)
    adapters = {n: {k: v + (0.3 * torch.randn(v.shape, generator=g) if "lora_B" in k else 0)
                    for k, v in lora.get_adapter(m, "global").items()} for n in ("global", "local")}
    records = [r for t in world.client_tasks[:3] for r in world.tests[t][:3]]
    lams = torch.rand(len(records), generator=g, dtype=torch.float64)
    ev = evaluation.Evaluator(m, tok, evaluation.Decode(max_new_tokens=4, batch_size=4), "cpu")
    with lora.using(m, adapters):
        got = evaluation.answer_losses(ev, records, lams=lams, to="local")
        fixed = evaluation.answer_losses(ev, records, weights={"global": 1.0})
    want, want_fixed = [], []
    for r, lam in zip(records, lams.tolist()):
        e = data.encode_example(tok, r, 1 << 30)
        ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
        for weights, out in ((feddpa.mix(lam), want), ({"global": 1.0}, want_fixed)):
            with lora.using(m, adapters, weights):
                out.append(m(ids, None, labels)[1].item())
    assert got == pytest.approx(want, rel=1e-4) and fixed == pytest.approx(want_fixed, rel=1e-4)
    assert max(abs(a - b) for a, b in zip(want, want_fixed)) > 0.01  # the mix matters: the check has teeth


def test_a_curve_on_a_subset_scores_that_subset(curve_runs):
    """--curve-per-task 2 of 3: the last point is the final per-instance scores of the seeded subset."""
    res = results(curve_runs / "subset")
    seed, own = res["config"]["seed"], res["client_tasks"]
    for method in ("local", "fedit", "feddpa-t"):
        r = res["methods"][method]
        assert [p["round"] for p in r["curve"]] == [1, 2, 3]
        tasks = list(r["per_client"][0])
        keep = {t: sorted(torch.randperm(3, generator=fed.seeded(seed, "curve", t))[:2].tolist()) for t in tasks}
        mean = {t: [sum(c[t]["rouge1_each"][i] for i in keep[t]) / 2 for c in r["per_client"]] for t in tasks}
        p = sum(mean[t][k] for k, t in enumerate(own)) / len(own)
        ttp = sum(sum(mean[t][k] for t in tasks) / len(tasks) for k in range(len(own))) / len(own)
        assert r["curve"][-1]["P"] == pytest.approx(p, abs=1e-9) and r["curve"][-1]["TTP"] == pytest.approx(ttp, abs=1e-9)
    assert any(c[t]["rouge1_each"][i] > 0 for c in res["methods"]["local"]["per_client"] for t in c for i in (0, 1, 2))


def test_a_killed_and_resumed_run_draws_the_same_curve(tiny_run, tmp_path):
    """SIGKILL right after FedIT's second round is checkpointed, then --resume: the same results, curves
    included, as a run never stopped (each point is saved with its round's checkpoint)."""
    from test_runs import straight_and_killed_after_fedit_round_2
    straight, killed = straight_and_killed_after_fedit_round_2(
        [*tiny_run[2], "--eval-every", "1", "--curve-per-task", "2"], tmp_path)
    assert [p["round"] for p in killed[0]["methods"]["fedit"]["curve"]] == [1, 2, 3]
    assert killed == straight


# ----------------------------------------------------------------------------------------------
# --rescore: a finished run's adapters, other inference settings

def test_rescoring_with_unchanged_settings_reproduces_the_run(curve_runs, tmp_path):
    src = curve_runs / "plain"
    train.main(["--rescore", str(src), "--out", str(tmp_path / "again"), "-q"])
    a, b = results(src), results(tmp_path / "again")
    assert set(a["methods"]) == set(b["methods"])
    for method in a["methods"]:
        for key in ("P", "TTP", "per_client", "lambda", "no_local"):
            assert a["methods"][method][key] == b["methods"][method][key], (method, key)
    assert b["config"]["rescore"] == str(src)
    assert {k: v for k, v in b["config"].items() if k not in ("out", "rescore")} == \
        {k: v for k, v in a["config"].items() if k not in ("out", "rescore")}


def test_rescoring_changes_only_inference(curve_runs, tmp_path):
    src = curve_runs / "plain"
    train.main(["--rescore", str(src), "--out", str(tmp_path / "k1"), "--k-refs", "1", "--similarity", "l2",
                "--methods", "fedit,feddpa-t,feddpa-t-sum", "-q"])
    a, b = results(src)["methods"], results(tmp_path / "k1")
    assert b["config"]["k_refs"] == 1 and b["config"]["similarity"] == "l2" and b["config"]["rounds"] == 3
    assert a["fedit"]["per_client"] == b["methods"]["fedit"]["per_client"]  # no dynamic weight: the same
    lams = lambda r: [s["lambdas"] for c in r["per_client"] for s in c.values()]  # noqa: E731
    assert lams(a["feddpa-t"]) != lams(b["methods"]["feddpa-t"])
    assert "feddpa-t-sum" in b["methods"]


def test_rescoring_a_run_with_curve_methods_on_a_subset_of_its_methods(curve_runs, tmp_path):
    """A run trained with --curve-methods local,fedit re-scored on FedDPA-T alone: a re-scoring draws no
    curve, so the run's curve methods need not be among the re-scored ones (they were refused once)."""
    src = tmp_path / "src"
    shutil.copytree(curve_runs / "curve", src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "curve_methods": "local,fedit"}))
    train.main(["--rescore", str(src), "--out", str(tmp_path / "t"), "--methods", "feddpa-t", "-q"])
    got = results(tmp_path / "t")
    assert list(got["methods"]) == ["feddpa-t"] and "curve" not in got["methods"]["feddpa-t"]
    assert got["config"]["eval_every"] == 0 and got["config"]["curve_methods"] == ""


@pytest.mark.parametrize("flags, message", [
    (["--lr", "0.1"], "--rescore changes only how {src}'s adapters are evaluated; --lr is a training setting: drop it"),
    (["--local-weight", "0.3"], "--rescore changes only how {src}'s adapters are evaluated; --local-weight is a "
                                "training setting: drop it"),
    (["--eval-every", "1"], "--rescore changes only how {src}'s adapters are evaluated; --eval-every is a "
                            "training setting: drop it"),
    (["--methods", "centralized"], "--methods centralized: {src} did not finish training its centralized phase "
                                   "(finished: fedit, feddpa-f, feddpa-t, local)"),
])
def test_rescoring_refuses_what_it_cannot_do_in_one_line(curve_runs, tmp_path, capsys, flags, message):
    src = curve_runs / "plain"
    with pytest.raises(SystemExit) as e:
        train.main(["--rescore", str(src), "--out", str(tmp_path / "new"), *flags])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: {message.format(src=src)}\n"
    assert not (tmp_path / "new").exists()


def test_rescoring_refuses_runs_without_adapters_here(curve_runs, tmp_path, capsys):
    import runs
    src = curve_runs / "plain"
    carried = tmp_path / "carried"  # a carried run: config and results only
    carried.mkdir()
    for name in ("config.json", "results.json"):
        (carried / name).write_bytes((src / name).read_bytes())
    flower = tmp_path / "flower"  # a Flower run's checkpoint: its local adapters are on its nodes
    flower.mkdir()
    (flower / "config.json").write_bytes((src / "config.json").read_bytes())
    runs.save_state(str(flower), {**runs.load_state(str(src)), "flower": True})
    for run, message in ((carried, f"{carried}/checkpoint.pt: not found; re-scoring reads the adapters a run's "
                                   "checkpoint holds (a carried study keeps only its results)"),
                         (flower, f"{flower}: a Flower run; its local adapters live on its nodes: re-score it there"),
                         (src, f"--out {src}: re-scoring writes a new run and never into {src}; choose another --out")):
        out = src if run == src else tmp_path / "new"
        with pytest.raises(SystemExit):
            train.main(["--rescore", str(run), "--out", str(out)])
        assert capsys.readouterr().err == f"error: {message}\n"


def test_a_study_is_rescored_seed_by_seed(tiny_run, tmp_path):
    """A --seeds run re-scored: each seed's adapters with the new settings, and the summary over seeds;
    with unchanged settings, every seed's scores as they were."""
    study = tmp_path / "study"
    train.main([*tiny_run[2], "--seeds", "0,1", "--out", str(study), "-q"])
    train.main(["--rescore", str(study), "--out", str(tmp_path / "again"), "-q"])
    a, b = results(study), results(tmp_path / "again")
    assert b["seeds"] == [0, 1] and b["config"]["rescore"] == str(study)
    for seed in ("0", "1"):
        assert b["per_seed"][seed]["config"]["rescore"] == str(study / f"seed{seed}")
        for method, r in a["per_seed"][seed]["methods"].items():
            assert b["per_seed"][seed]["methods"][method]["per_client"] == r["per_client"], (seed, method)
    assert b["summary"] == a["summary"]
