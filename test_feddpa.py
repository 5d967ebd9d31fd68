"""feddpa.py: FedDPA-T's phases, the dynamic weight (deterministic references, lambda in range, batched
equal to one instance at a time), ROUGE equal to rouge-score, P and TTP, and every method end to end."""
import json

import pytest
import torch

import data
import fed
import evaluation
import feddpa
import hf
import lora
import train
from conftest import write_three_clients

def snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_feddpa_t_phases_change_exactly_their_adapter_and_send_no_local(tiny, monkeypatch):
    """Round 0 trains the global adapter alone; round 1 the local one with the global one given (and
    mixed in, frozen), then the global one alone. Each training returns a changed copy of the adapter it
    trains, the others given stay as they were, and the model holds afterwards what it held before."""
    m, tok, world = tiny
    train = fed.LocalTrain(lr=1e-2, max_steps=2, batch_size=4, micro_batch_size=2)
    phases = []
    real = feddpa.train_adapter

    def spy(model_, client_, *, adapters, trains, **k):
        given = {n: {key: v.clone() for key, v in a.items()} for n, a in adapters.items()}
        trained, metrics = real(model_, client_, adapters=adapters, trains=trains, **k)
        kept = all(not changed(given[n], adapters[n]) for n in adapters)
        phases.append((trains, sorted(adapters), bool(changed(given[trains], trained)) and kept))
        return trained, metrics
    monkeypatch.setattr(feddpa, "train_adapter", spy)
    init = lora.get_adapter(m, "global")
    client = fed.Client(0, [data.encode_example(tok, r) for r in world.clients[0]], torch.Generator().manual_seed(0))
    step = feddpa.feddpa_t_step(m, tok.pad_id, train, recipe=feddpa.Recipe(local_weight=0.5, seed=0))
    before = snapshot(m)
    _, local, _ = step(0, client, init)       # round 0: the global adapter only
    assert phases == [("global", ["global"], True)] and local is None
    client.local = local
    update, local, _ = step(1, client, init)  # round 1: local (global frozen), then global alone
    assert phases[1:] == [("local", ["global", "local"], True), ("global", ["global"], True)]
    assert not changed(before, snapshot(m))   # nothing left on the model
    # the message: the global adapter's tensors and a count (and, only where DP over Flower clips it on the
    # client, the update's norm: a number), nothing of the local adapter
    assert set(vars(update)) == {"adapter", "n_examples", "norm"} and update.n_examples == len(client.data)
    assert update.norm is None
    assert set(update.adapter) == set(init) == set(local)
    assert not any(torch.equal(update.adapter[k], local[k]) for k in update.adapter if "lora_B" in k)


def test_mix_gives_lambda_to_one_adapter_and_the_rest_to_the_other():
    assert feddpa.mix(0.3) == {"local": 0.3, "global": 0.7}
    assert feddpa.mix(0.3, "global") == {"global": 0.3, "local": 0.7}
    lam = torch.tensor([0.0, 0.25, 1.0])
    w = feddpa.mix(lam)
    assert torch.equal(w["local"], lam) and torch.equal(w["global"], torch.tensor([1.0, 0.75, 0.0]))


def test_lambda_is_the_scaled_mean_cosine_clamped_to_0_1():
    refs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    reps = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, 0.0], [2.0, 0.0]])
    # mean cosines: 1/sqrt(2), -1/sqrt(2), 1/2, 1/2
    assert torch.allclose(feddpa.dynamic_lambda(reps, refs, 0.5), torch.tensor([0.5 ** 1.5, 0.0, 0.25, 0.25]))
    assert torch.allclose(feddpa.dynamic_lambda(reps, refs, 4.0), torch.tensor([1.0, 0.0, 1.0, 1.0]))


def test_references_and_lambda_are_deterministic_and_in_range(tiny):
    m, tok, world = tiny
    for _, layer in lora.lora_layers(m):
        layer.lora_B["local"].weight.data.normal_(0, 0.1)
    refs = feddpa.draw_references(world.clients[2], 5, seed=3, client_id=2)
    assert refs == feddpa.draw_references(world.clients[2], 5, seed=3, client_id=2)
    assert refs != feddpa.draw_references(world.clients[2], 5, seed=4, client_id=2)
    reps = feddpa.reference_reps(m, tok, refs, pool="last", device="cpu")
    assert torch.equal(reps, feddpa.reference_reps(m, tok, refs, pool="last", device="cpu"))
    tests = [r for recs in world.tests.values() for r in recs]
    lams = []
    for _, ids, mask in feddpa.prompt_batches(tok, tests, 16):
        lams.append(feddpa.dynamic_lambda(feddpa.represent(m, ids, mask, pool="last"), reps, scale=0.5))
    lam = torch.cat(lams)
    assert lam.min() >= 0 and lam.max() <= 0.5 and lam.std() > 0
    own = feddpa.dynamic_lambda(feddpa.represent(m, *feddpa.pad_left([data.encode_prompt(tok, refs[0])], tok.pad_id), pool="last"), reps, 0.5)
    assert own.item() > lam.mean().item()  # an instance from the client's own data leans on its local adapter


@pytest.mark.parametrize("beams", [1, 3])
def test_batched_dynamic_weighting_equals_one_instance_at_a_time(tiny, beams):
    m, tok, world = tiny
    torch.manual_seed(1)
    for _, layer in lora.lora_layers(m):
        for n in lora.ADAPTERS:
            layer.lora_B[n].weight.data.normal_(0, 0.3)
    refs = feddpa.reference_reps(m, tok, feddpa.draw_references(world.clients[0], 5, seed=0, client_id=0), pool="last",
                                 device="cpu")
    dynamic = feddpa.PaperWeight(refs, scale=0.5, pool="last", to="local")
    tests = [recs[0] for recs in world.tests.values()]
    dec = evaluation.Decode(max_new_tokens=6, num_beams=beams, batch_size=8)
    ev = evaluation.Evaluator(m, tok, dec, "cpu")
    batched, lams = evaluation.answer_dynamic(ev, tests, dynamic)
    alone = [evaluation.answer_dynamic(ev, [r], dynamic) for r in tests]
    assert [a[0][0] for a in alone] == batched
    assert all(abs(a[1][0] - l) < 1e-6 for a, l in zip(alone, lams))
    assert len(set(batched)) > 1 and len(set(round(l, 4) for l in lams)) > 1


# ==============================================================================================
# ROUGE by hand equals the rouge-score package (which the paper's evaluation uses underneath)

def rouge_pairs():
    import random
    rng = random.Random(0)
    words = ["the", "cat", "Cat", "sat", "on", "mat", "a", "dog's", "x1", "42", "run-time", "ran", "", "!!", "é"]
    pairs = [("", ""), ("", "the cat"), ("the cat", ""), ("...", "!!"), ("?", "the"), ("The CAT.", "the cat")]
    for _ in range(300):
        a = " ".join(rng.choice(words) for _ in range(rng.randint(0, 8)))
        b = " ".join(rng.choice(words) for _ in range(rng.randint(0, 8)))
        pairs.append((a, b))
    return pairs


def test_rouge_matches_rouge_score_package():
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    for pred, ref in rouge_pairs():
        want = scorer.score(ref, pred)  # (target, prediction)
        assert evaluation.rouge1(pred, ref) == pytest.approx(want["rouge1"].fmeasure, abs=1e-12), (pred, ref)
        assert evaluation.rouge_l(pred, ref) == pytest.approx(want["rougeL"].fmeasure, abs=1e-12), (pred, ref)


def test_auroc_and_lambda_diagnostics_by_hand():
    assert evaluation.auroc([3, 2], [1, 2]) == 0.875          # (1 + 1 + 1 + 1/2) / 4 pairs
    assert evaluation.auroc([1], [2, 3]) == 0.0
    per_client = [{"a": {"lambdas": [0.4, 0.5]}, "b": {"lambdas": [0.1, 0.5]}},   # client 0, own task a
                  {"a": {"lambdas": [0.2]}, "b": {"lambdas": [0.3]}},             # client 1, own task b
                  {"a": {}, "b": {}}]                                              # client 2: no local adapter
    got = evaluation.lambda_diagnostics(per_client, ["a", "b", "a"])
    assert got == pytest.approx({"own": (0.45 + 0.3) / 2, "other": (0.3 + 0.2) / 2,
                                 "auroc": (2.5 / 4 + 1.0) / 2, "clients": 2})  # 0.4>0.1, 0.5>0.1, 0.5=0.5


def test_p_and_ttp():
    per_client = [{"a": {"rouge1": 80.0}, "b": {"rouge1": 20.0}}, {"a": {"rouge1": 10.0}, "b": {"rouge1": 50.0}}]
    got = evaluation.p_and_ttp(per_client, ["a", "b"])
    assert got == {"P": 65.0, "TTP": 40.0}


# ==============================================================================================
# train.py: a tiny end-to-end run of every method

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_method_end_to_end_on_a_tiny_run(tiny_dir, tmp_path, capsys, dtype):
    write_three_clients(tmp_path / "data", n_train=40, n_test=6)
    out = tmp_path / "out"
    train.main(["--data", str(tmp_path / "data"), "--model", str(tiny_dir), "--rounds", "2", "--local-steps", "2",
                "--batch-size", "4", "--micro-batch-size", "2", "--test-per-task", "3", "--max-new-tokens", "4",
                "--dtype", dtype, "--out", str(out), "-v", "--methods", ",".join(feddpa.METHODS)])
    # adapters train and are saved in float32 whatever the base's dtype
    assert {t.dtype for t in hf.read_safetensors(str(out / "adapters" / "fedit" / "global.safetensors")).values()} == {torch.float32}
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == set(feddpa.METHODS)
    own = res["client_tasks"]
    for method, r in res["methods"].items():  # P and TTP from the per-client scores, by hand
        assert len(r["per_client"]) == 3 and all(set(c) == set(r["per_client"][0]) for c in r["per_client"])
        p = [c[task]["rouge1"] for c, task in zip(r["per_client"], own)]
        ttp = [sum(s["rouge1"] for s in c.values()) / len(c) for c in r["per_client"]]
        assert r["P"] == pytest.approx(sum(p) / 3) and r["TTP"] == pytest.approx(sum(ttp) / 3), method
    assert res["training"]["local"]["bytes"] == 0 and res["training"]["fedit"]["bytes"] > 0
    assert (out / "adapters" / "feddpa-t" / "client2_local.safetensors").exists()
    printed = capsys.readouterr().out
    assert all(m in printed for m in feddpa.METHODS)
    # the budget of each method, optimizer steps per client: R rounds x S steps (R = 2, S = 2); FedDPA-T
    # trains the global adapter alone in round 0, then two adapters per round; FedDPA-F adds one round of
    # fine-tuning after FedIT; Centralized is one client with the pooled data and all the steps
    want = {"fedit": 4, "local": 4, "feddpa-t": 2 + 2 * 2, "feddpa-t-fixed": 6, "feddpa-f": 4 + 2, "feddpa-f-fixed": 6}
    for method, steps in want.items():
        budget = res["methods"][method]["budget"]
        assert budget["steps_per_client"] == [steps] * 3, method
        assert budget["examples_per_client"] == [4 * steps] * 3, method
    assert res["methods"]["centralized"]["budget"]["steps_per_client"] == [2 * 2 * 3]
    assert res["methods"]["base"]["budget"]["steps_per_client"] == []


def test_partial_participation(tiny_dir, tmp_path, capsys):
    """--fraction 1/3 of 3 clients for 3 rounds: Local is sampled as FedIT is; a client that never trained
    a local adapter has no lambda and no local adapter file, and the table says so (that it is scored
    with the global adapter alone: the test below)."""
    write_three_clients(tmp_path / "data", n_train=20, n_test=4)
    out = tmp_path / "out"
    train.main(["--data", str(tmp_path / "data"), "--model", str(tiny_dir), "--rounds", "3", "--local-steps", "1",
                "--batch-size", "4", "--micro-batch-size", "4", "--test-per-task", "2", "--max-new-tokens", "3",
                "--fraction", "0.34", "--methods", "fedit,local,feddpa-t,feddpa-t-fixed", "--out", str(out)])
    res = json.loads((out / "results.json").read_text())
    rounds = {p: [h["clients"] for h in res["training"][p]["history"]] for p in ("fedit", "local", "feddpa-t")}
    assert rounds["local"] == rounds["fedit"] == rounds["feddpa-t"] and all(len(c) == 1 for c in rounds["fedit"])
    trained_local = set(c for cs in rounds["feddpa-t"][1:] for c in cs)  # round 0 trains the global adapter only
    no_local = sorted(set(range(3)) - trained_local)
    assert no_local and res["methods"]["feddpa-t"]["no_local"] == res["methods"]["feddpa-t-fixed"]["no_local"] == no_local
    for i in no_local:
        dynamic, fixed = res["methods"]["feddpa-t"]["per_client"][i], res["methods"]["feddpa-t-fixed"]["per_client"][i]
        assert not any("lambda" in s for s in dynamic.values()) and not any("lambda" in s for s in fixed.values())
        assert not (out / "adapters" / "feddpa-t" / f"client{i}_local.safetensors").exists()
    printed = capsys.readouterr().out
    assert "feddpa-t+" in printed and f"client(s) {', '.join(map(str, no_local))} were never sampled" in printed


def test_a_client_that_never_trained_a_local_adapter_is_scored_with_the_global_adapter_alone(tiny):
    """Every FedDPA-T row, with client 1 never sampled after round 0 (no local adapter): its answers are
    those of the global adapter alone, not the base model's, not a mix with the local adapter the client
    before it left on the model. The test outputs are the global adapter's answers, so its scores say
    which model answered."""
    m, tok, world = tiny
    g = torch.Generator().manual_seed(3)
    init = lora.get_adapter(m, "global")

    def random_adapter():
        return {k: v + (0.5 * torch.randn(v.shape, generator=g) if "lora_B" in k else 0) for k, v in init.items()}
    glob, stale = random_adapter(), random_adapter()
    trained = {"feddpa-t": {"global": glob, "locals": [stale, None, random_adapter()]}}
    tasks = list(world.tests)[:3]
    dec = evaluation.Decode(max_new_tokens=5, batch_size=8)
    lora.load_adapter(m, "global", glob)
    lora.load_adapter(m, "local", stale)
    records = [r for t in tasks for r in world.tests[t][:3]]

    def answers(weights):
        return evaluation.answer(evaluation.Evaluator(m, tok, dec, "cpu"), records, weights=weights)
    alone = answers({"global": 1.0})
    for wrong in ({}, {"local": 1.0}, feddpa.mix(0.5)):  # the check has teeth: each gives other answers
        assert answers(wrong) != alone, wrong
    it = iter(alone)
    tests = {t: [{**r, "output": next(it)} for r in world.tests[t][:3]] for t in tasks}
    recipe = feddpa.Recipe(local_weight=0.3, k_refs=3, seed=0)
    rows = [name for name, method in feddpa.METHODS.items() if method.phase == "feddpa-t" and not method.shared]
    assert len(rows) >= 4
    for method in rows:
        got = evaluation.evaluate_method(method, evaluation.Evaluator(m, tok, dec, "cpu", recipe), tests,
                                         client_data=dict(enumerate(world.clients[:3])), client_tasks=tasks, trained=trained)
        assert got["no_local"] == [1], method
        for task in tasks:
            assert got["per_client"][1][task]["exact"] == 100.0, (method, task)
            assert "lambda" not in got["per_client"][1][task], method


def test_no_answer_is_generated_twice_and_shared_answers_are_the_rows_own(tiny, monkeypatch):
    """Every method evaluated in the table's order, sharing what was answered: no test instance is
    answered twice by the same adapters with the same fixed mix (FedDPA-F's global adapter alone is
    FedIT's; an -oracle row's parts are its -fixed row and its global adapter alone), the count the
    progress bars are given is what is generated, and every row's scores equal those it gets evaluated
    alone, with nothing shared; and no test instance's representation r(x) is computed twice for one
    local adapter (a client's paper's and calibrated weights share it). FedDPA-F's global adapter is a
    copy of FedIT's (as a resumed run loads it), so the sharing cannot rest on the tensors' identity."""
    m, tok, world = tiny
    g = torch.Generator().manual_seed(5)
    init = lora.get_adapter(m, "global")

    def random_adapter():
        return {k: v + (0.5 * torch.randn(v.shape, generator=g) if "lora_B" in k else 0) for k, v in init.items()}
    fedit = random_adapter()
    trained = {"fedit": {"global": fedit, "locals": [None] * 3},
               "feddpa-f": {"global": {k: v.clone() for k, v in fedit.items()}, "locals": [random_adapter() for _ in range(3)]},
               "feddpa-t": {"global": random_adapter(), "locals": [random_adapter(), None, random_adapter()]},
               "local": {"global": {}, "locals": [random_adapter(), random_adapter(), None]},
               "centralized": {"global": random_adapter(), "locals": [None]}}
    tasks = list(world.tests)[:3]
    recipe = feddpa.Recipe(local_weight=0.3, k_refs=3, calibration_refs=4, seed=0)
    dec = evaluation.Decode(max_new_tokens=4, batch_size=4)  # 6 instances: two batches, the r(x) cache keyed by both
    # the test outputs are client 0's FedDPA-F answers with the fixed mix, so that scores tell models apart
    lora.load_adapter(m, "global", fedit)
    lora.load_adapter(m, "local", trained["feddpa-f"]["locals"][0])
    records = [r for t in tasks for r in world.tests[t][:2]]
    it = iter(evaluation.answer(evaluation.Evaluator(m, tok, dec, "cpu"), records, weights=feddpa.mix(0.3)))
    tests = {t: [{**r, "output": next(it)} for r in world.tests[t][:2]] for t in tasks}

    def run(evaluator_of):
        return {method: evaluation.evaluate_method(method, evaluator_of(method), tests, client_data=dict(enumerate(world.clients[:3])),
                                                   client_tasks=tasks, trained=trained)
                for method in feddpa.METHODS}
    alone = run(lambda method: evaluation.Evaluator(m, tok, dec, "cpu", recipe))  # each method with its own
    fixed = alone["feddpa-f-fixed"]["per_client"]
    assert fixed[0] != fixed[1] and fixed[1] != fixed[2]  # the check has teeth: each client's model answers its own

    real, generated, calls = evaluation.answer, [], []

    def fingerprint(slot):
        return hash(tuple(v.numpy().tobytes() for _, v in sorted(lora.adapter_tensors(m, slot).items())))

    def spy(ev, records, *, weights=None, lams=None, to="local", progress=None):
        if lams is None:  # which adapters, and how much of each, answer which instance
            model_ = tuple(sorted((slot, fingerprint(slot), float(w)) for slot, w in (weights or {}).items() if w))
            generated.extend((model_, json.dumps(r, sort_keys=True)) for r in records)
        else:  # a dynamic mix is the client's own: each call its own
            calls.append(lams)
            generated.extend(("dynamic", len(calls), i) for i in range(len(records)))
        return real(ev, records, weights=weights, lams=lams, to=to, progress=progress)
    real_represent, represented = evaluation.represent, []

    def spy_represent(model, ids, mask, *, pool):  # a test instance's r(x): which local adapter, which prompt
        represented.extend((fingerprint("local"), pool, row[m_.bool()].numpy().tobytes()) for row, m_ in zip(ids, mask))
        return real_represent(model, ids, mask, pool=pool)
    monkeypatch.setattr(evaluation, "answer", spy)
    monkeypatch.setattr(evaluation, "represent", spy_represent)
    one = evaluation.Evaluator(m, tok, dec, "cpu", recipe)
    shared = run(lambda method: one)  # one evaluator, its answer sets shared by the methods
    assert len(generated) == len(set(generated)), "an answer generated twice"
    # the paper's and the calibrated weight of a client weigh one r(x) of each instance: computed once
    # per local adapter (FedDPA-T's and FedDPA-F's), for each of the clients that trained one
    n_dynamic = sum(trained[p]["locals"][i] is not None for p in ("feddpa-t", "feddpa-f") for i in range(3))
    assert len(represented) == len(set(represented)) == n_dynamic * sum(map(len, tests.values())), "an r(x) computed twice"
    has_local = lambda phase, i: trained[phase]["locals"][i] is not None  # noqa: E731
    assert len(generated) == sum(evaluation.answers_needed(list(feddpa.METHODS), tests, [0, 1, 2], has_local=has_local).values())
    assert len(generated) < 3 * len(feddpa.METHODS) * sum(map(len, tests.values()))  # something was shared
    strip = lambda r: {k: v for k, v in r.items() if k != "eval_seconds"}  # noqa: E731
    for method in feddpa.METHODS:
        assert strip(shared[method]) == strip(alone[method]), method


def test_local_adapters_stay_on_their_clients_through_rounds_they_sit_out(tiny):
    m, tok, world = tiny
    train = fed.LocalTrain(lr=1e-2, max_steps=1, batch_size=4, micro_batch_size=4)
    clients = [fed.Client(i, [data.encode_example(tok, r) for r in recs], torch.Generator().manual_seed(i))
               for i, recs in enumerate(world.clients[:3])]
    step = feddpa.feddpa_t_step(m, tok.pad_id, train, recipe=feddpa.Recipe(local_weight=0.5, seed=0))
    kept = []

    def after_round(f):
        kept.append([None if c.local is None else {k: v.clone() for k, v in c.local.items()} for c in clients])
    federation = fed.run_rounds(fed.Federation(lora.get_adapter(m, "global"), len(clients)), fed.in_process(clients, step),
                                rounds=6, sample=lambda n, r: fed.sample_clients(n, 1 / 3, seed=0, round_=r),
                                on_round_end=after_round)
    sat_out = 0
    for r in range(2, 6):
        for cid in set(range(3)) - set(federation.history[r]["clients"]):
            before, after = kept[r - 1][cid], kept[r][cid]
            if before is not None:
                sat_out += 1
                assert all(torch.equal(before[k], after[k]) for k in before)
    assert sat_out > 0


def layer_state(m):
    """Every LoRA layer's mix, which adapters require grad, the modules' training flags, and what the
    adapter slots hold (bytes)."""
    return ([dict(layer.weights) for _, layer in lora.lora_layers(m)],
            [p.requires_grad for p in m.parameters()], [mod.training for mod in m.modules()],
            [p.detach().numpy().tobytes() for n, p in m.named_parameters() if ".lora_" in n])


def test_representing_training_and_answering_leave_the_callers_mix_and_mode_as_they_were(tiny):
    """The mix and the mode are scoped: each step sets what it needs for its own forward passes and puts
    back what the caller had, so no step reads a mix or a mode that another left behind."""
    m, tok, world = tiny
    g = torch.Generator().manual_seed(5)
    for name in lora.ADAPTERS:  # two different, non-zero adapters, so a wrong mix changes the numbers
        lora.load_adapter(m, name, {k: v + (0.3 * torch.randn(v.shape, generator=g) if "lora_B" in k else 0)
                                    for k, v in lora.get_adapter(m, name).items()})
    ids, mask = data.pad_left([data.encode_prompt(tok, r) for r in world.clients[0][:3]], tok.pad_id)
    caller = {"global": 0.8, "local": 0.2}
    with lora.mixed(m, caller):
        m.eval()
        before = layer_state(m)
        with torch.no_grad():
            want = m(ids, mask)[0]
        reps = feddpa.represent(m, ids, mask, pool="last")
        assert layer_state(m) == before
        with torch.no_grad(), lora.mixed(m, {"local": 1.0}):  # represent's own mix: the local adapter alone
            assert torch.equal(reps, m.pooled(ids, mask, "last"))
        assert layer_state(m) == before
        dec = evaluation.Decode(max_new_tokens=3, batch_size=2)
        dynamic = feddpa.paper_weight(m, tok, world.clients[0], recipe=feddpa.Recipe(k_refs=3), client_id=0, device="cpu")
        evaluation.answer_dynamic(evaluation.Evaluator(m, tok, dec, "cpu"), world.tests[world.client_tasks[1]][:3], dynamic)
        assert layer_state(m) == before
        examples = [data.encode_example(tok, r) for r in world.clients[0][:8]]
        client = fed.Client(0, examples, torch.Generator().manual_seed(0))
        local, _ = fed.train_adapter(m, client, adapters={n: lora.get_adapter(m, n) for n in lora.ADAPTERS},
                                     weights=feddpa.mix(0.5), trains="local", pad_id=tok.pad_id,
                                     train=fed.LocalTrain(lr=1e-2, max_steps=1, batch_size=4))
        assert layer_state(m) == before       # eval mode again, nothing trainable, the caller's mix
        with torch.no_grad():
            assert torch.equal(want, m(ids, mask)[0])  # the caller's adapters, as they were ...
            lora.load_adapter(m, "local", local)
            assert not torch.equal(want, m(ids, mask)[0])  # ... and the local adapter trained
    assert layer_state(m)[0] == [{}] * len(lora.lora_layers(m))  # outside any block, no adapter is on
    with pytest.raises(RuntimeError), lora.mixed(m, {"global": 1.0}):
        raise RuntimeError("a step that fails")
    assert layer_state(m)[0] == [{}] * len(lora.lora_layers(m))  # restored however the block ends


def every_step(m, tok, world):
    """Each training or representation step a run takes, by name, as a function of the model."""
    records, tests = world.clients[0][:12], {t: world.tests[t][:2] for t in world.client_tasks[:2]}
    examples = [[data.encode_example(tok, r) for r in recs[:8]] for recs in world.clients[:2]]
    recipe = feddpa.Recipe(train=fed.LocalTrain(lr=1e-2, max_steps=1, batch_size=4, micro_batch_size=2), rounds=2,
                           k_refs=3, calibration_refs=6)
    dec = evaluation.Decode(max_new_tokens=2, batch_size=4)
    adapter = lora.get_adapter(m, "local")
    ids, mask = data.pad_left([data.encode_prompt(tok, r) for r in records[:3]], tok.pad_id)

    def phases(m):
        trained = {}
        for name in feddpa.PHASES:
            phase = feddpa.setup_phase(name, m, pad_id=tok.pad_id, recipe=recipe, datasets=dict(enumerate(examples)),
                                       init=lora.get_adapter(m, "global"), trained=trained)
            federation = feddpa.run_phase(name, phase)
            trained[name] = feddpa.phase_result(name, federation.global_adapter, phase.clients, trained=trained)
    steps = {
        "represent": lambda m: feddpa.represent(m, ids, mask, pool="mean"),
        "reference_reps": lambda m: feddpa.reference_reps(m, tok, records[:3], pool="last", device="cpu"),
        "paper_weight": lambda m: feddpa.paper_weight(m, tok, records, recipe=recipe, client_id=0, device="cpu"),
        "calibrated": lambda m: feddpa.calibrated(m, tok, records, recipe=recipe, client_id=0, device="cpu"),
        "train_adapter": lambda m: fed.train_adapter(m, fed.Client(0, examples[0], torch.Generator().manual_seed(0)),
                                                      adapters={"global": adapter}, weights={"global": 1.0},
                                                      trains="global", train=recipe.train, pad_id=tok.pad_id),
        "run_phase, every phase": phases,
    }
    for method in feddpa.METHODS:
        steps[f"evaluate_client {method}"] = lambda m, method=method: evaluation.evaluate_client(
            method, evaluation.Evaluator(m, tok, dec, "cpu", recipe), tests,
            client=evaluation.EvalClient(0, records, world.client_tasks[0], adapter, adapter))
    return steps


def test_every_training_and_representation_step_leaves_the_callers_mix_and_mode_as_they_were(tiny):
    """Each step of every_step, called inside a caller's mix in evaluation mode: afterwards the model is
    in evaluation mode, no adapter requires grad, and every layer holds the caller's mix."""
    m, tok, world = tiny
    steps = every_step(m, tok, world)
    caller = {"global": 0.8, "local": 0.2}
    for name, step in steps.items():
        with lora.mixed(m, caller):
            m.eval()
            before = layer_state(m)
            step(m)
            assert layer_state(m) == before, name
            assert not m.training and not any(p.requires_grad for p in m.parameters()), name


def test_no_step_reads_an_adapter_another_left_in_a_slot(tiny):
    """Whatever the slots hold before a step (here two different random fillings), the step gives the same
    result: each training step and each method's evaluation loads the adapters its forwards use (lora.using)."""
    m, tok, world = tiny
    steps = every_step(m, tok, world)
    g = torch.Generator().manual_seed(11)

    def fill():
        for name in lora.ADAPTERS:
            lora.load_adapter(m, name, {k: v + 0.5 * torch.randn(v.shape, generator=g)
                                        for k, v in lora.get_adapter(m, name).items()})
    def plain(x):  # a step's result as comparable values (tensors to lists, timings dropped)
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items() if "seconds" not in k}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x.tolist() if torch.is_tensor(x) else x
    for name in [n for n in steps if n.startswith(("train_adapter", "evaluate_client"))]:
        results = []
        for _ in range(2):
            fill()
            torch.manual_seed(0)  # LoRA dropout's draws
            results.append(plain(steps[name](m)))
        assert results[0] == results[1], name
