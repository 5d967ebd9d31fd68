"""How each method is scored: answers generated with the method's adapters and mix, ROUGE, P and TTP,
and diagnostics of the dynamic weight.

Every client's model answers the test instances of every task. P is a client's score on its own task,
TTP its mean over all tasks (test-time personalization: its own task included), each averaged over
clients, in percent, with ROUGE-1 F1 (the paper's metric); ROUGE-L and exact match beside it. For
each dynamic-weight row the lambdas are kept per instance, and lambda_diagnostics says how well they
tell the client's own task from the others: their means on each and the AUROC.

Top to bottom: ROUGE as the rouge-score package computes it; generation with a fixed or per-instance
mix; evaluating each method with its adapters and mix (feddpa.METHODS); P and TTP; the diagnostics;
paired bootstrap intervals for the difference between two methods.
"""
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import lora
from data import collate, encode_example
from feddpa import METHODS, PHASES, Recipe, calibrated, mix, paper_weight, prompt_batches, represent
from generate import generate
from model import IGNORE_INDEX


# ----------------------------------------------------------------------------------------------
# Scores: ROUGE as the rouge-score package computes it (lower-case, alphanumeric tokens, no stemming)

def rouge_tokens(text: str) -> list:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def f1(overlap: int, n_pred: int, n_ref: int) -> float:
    p, r = overlap / max(n_pred, 1), overlap / max(n_ref, 1)
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def rouge1(pred: str, ref: str) -> float:
    a, b = rouge_tokens(pred), rouge_tokens(ref)
    return f1(sum((Counter(a) & Counter(b)).values()), len(a), len(b))


def rouge_l(pred: str, ref: str) -> float:
    a, b = rouge_tokens(pred), rouge_tokens(ref)
    if not a or not b:
        return 0.0
    row = [0] * (len(b) + 1)  # longest common subsequence, one DP row at a time
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return f1(row[-1], len(a), len(b))


def exact_match(pred: str, ref: str) -> float:
    return float(" ".join(pred.split()).lower() == " ".join(ref.split()).lower())


def score(preds, refs) -> dict:
    """Mean scores in percent, as the paper reports them, and each instance's ROUGE-1 (percent), from
    which paired_difference resamples."""
    n = max(len(refs), 1)
    each = {name: [fn(p, r) for p, r in zip(preds, refs)]
            for name, fn in (("rouge1", rouge1), ("rougeL", rouge_l), ("exact", exact_match))}
    return {**{name: 100 * sum(xs) / n for name, xs in each.items()}, "rouge1_each": [100 * x for x in each["rouge1"]]}


# ----------------------------------------------------------------------------------------------
# Generation with a mix, and each method's evaluation

@dataclass
class Decode:
    max_new_tokens: int = 32
    num_beams: int = 1
    batch_size: int = 32
    cutoff: int = 512


@dataclass
class Evaluator:
    """What every answer needs: the model and its tokenizer, decoding, the device, the recipe's inference
    settings (the dynamic weights', the fixed mix), and the answer sets already generated on one test set
    ({answer_key: scores}, read and filled in), so that none is generated twice: one per test set."""
    model: object
    tok: object
    dec: Decode
    device: object
    recipe: Recipe = field(default_factory=Recipe)
    answered: dict = field(default_factory=dict)
    losses: bool = False  # also each answer set's teacher-forced loss on the reference answers (the curves')


@dataclass
class EvalClient:
    """A client as evaluation sees it."""
    id: int
    records: list                # its training records: the dynamic weight's references
    task: str                    # its own task; "" on tests of tasks no client trained on
    global_adapter: dict         # the method's phase's ({} for the base model and Local)
    local_adapter: dict | None   # its own; None where it never trained one


@torch.no_grad()
def answer(ev: Evaluator, records: list, *, weights: dict | None = None, lams=None, to: str = "local", progress=None):
    """Answers to records, in order: with the fixed mix `weights` ({adapter: weight}), or with lambda per
    instance, lams (N,) (records[i]'s is lams[i]): adapter `to` gets it, the other 1 - lambda (feddpa.mix),
    per example inside each batch. progress: a tqdm bar to advance by each batch's answers."""
    model, tok, dec, device = ev.model, ev.tok, ev.dec, ev.device
    out = [None] * len(records)
    for idx, ids, mask in prompt_batches(tok, records, dec.batch_size, cutoff=dec.cutoff):
        ids, mask = ids.to(device), mask.to(device)
        if lams is not None:
            batch_weights = mix(lams[idx].repeat_interleave(dec.num_beams), to)  # beams: example-major
        else:
            batch_weights = weights or {}
        gen = generate(model, ids, mask, dec.max_new_tokens, tok.stop_ids, tok.pad_id, dec.num_beams, batch_weights)
        for i, row in zip(idx, gen.tolist()):
            row = row[:next((j for j, t in enumerate(row) if t in tok.stop_ids), len(row))]
            out[i] = tok.decode(row).strip()
        if progress is not None:
            progress.update(len(idx))
    return out


@torch.no_grad()
def answer_losses(ev: Evaluator, records: list, *, weights: dict | None = None, lams=None, to: str = "local") -> list:
    """Each record's teacher-forced loss on its reference answer, in order, as floats: the mean
    cross-entropy of the answer's tokens (EOS included) each given the prompt and the answer before it,
    with the mix answer() would use (weights, or lams per instance). A low-noise signal of how far the
    adapters have learnt, beside the answers' ROUGE (the --eval-every curves)."""
    model, dec = ev.model, ev.dec
    # prompt and answer as training encodes them; a long one keeps its last cutoff + max_new_tokens tokens
    enc = [encode_example(ev.tok, r, 1 << 30) for r in records]
    enc = [{k: v[max(0, len(e["input_ids"]) - dec.cutoff - dec.max_new_tokens):] for k, v in e.items()} for e in enc]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]["input_ids"]))
    out = [None] * len(records)
    for s in range(0, len(order), dec.batch_size):
        idx = order[s:s + dec.batch_size]
        ids, mask, labels = (t.to(ev.device) for t in collate([enc[i] for i in idx], ev.tok.pad_id))
        weights_now = mix(lams[idx], to) if lams is not None else (weights or {})
        with lora.mixed(model, weights_now):
            h = model.hidden(ids, mask)                                          # (B, T, dim)
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)                     # (B, T): the next token
        keep = targets != IGNORE_INDEX
        ce = F.cross_entropy(model.lm_head(h[keep]).float(), targets[keep], reduction="none")  # (M,)
        per_row = torch.zeros(len(idx), dtype=ce.dtype, device=ce.device).index_add_(0, keep.nonzero()[:, 0], ce)
        for i, v in zip(idx, (per_row / keep.sum(1)).tolist()):
            out[i] = v
    return out


@torch.no_grad()
def represented(ev: Evaluator, records: list, pool: str) -> list:
    """r(x) of every record (feddpa.represent: the local adapter the caller loaded, alone), as
    [(indices, (B, dim))] in answer()'s batches (a batch's representations are those its prompts get together)."""
    return [(idx, represent(ev.model, ids.to(ev.device), mask.to(ev.device), pool=pool))
            for idx, ids, mask in prompt_batches(ev.tok, records, ev.dec.batch_size, cutoff=ev.dec.cutoff)]


def lambdas(weight, reps: list, n: int) -> torch.Tensor:
    """lambda of each of n instances, (n,), from their representations (represented) and a client's
    dynamic weight (feddpa.PaperWeight or feddpa.Calibrated), batch by batch."""
    each = [(idx, weight.lam(r)) for idx, r in reps]                          # [(indices, (B,))]
    lams = torch.empty(n, dtype=each[0][1].dtype, device=each[0][1].device)
    for idx, lam in each:
        lams[idx] = lam
    return lams


def answer_dynamic(ev: Evaluator, records: list, weight, *, reps: list | None = None, progress=None) -> tuple:
    """Answers to records with a client's dynamic weight, in plain steps: every instance's r(x) (reps,
    or represented), then its lambda, then the answers; returns (answers, lambdas as floats). The
    client's global and local adapters must be loaded."""
    lams = lambdas(weight, reps if reps is not None else represented(ev, records, weight.pool), len(records))
    return answer(ev, records, lams=lams, to=weight.to, progress=progress), lams.tolist()


def scores_by_task(tests: dict, preds: list, *, lams=None, losses=None) -> dict:
    """{task: score()} of answers preds to every task's test instances in turn (as evaluate_client orders
    them), with each instance's lambda and their mean where lams (a list of floats) are given, and the
    mean teacher-forced loss ("loss") where losses (answer_losses) are."""
    result, start = {}, 0
    for task, recs in tests.items():
        end = start + len(recs)
        result[task] = score(preds[start:end], [r["output"] for r in recs])
        if lams is not None:
            mine = lams[start:end]
            result[task]["lambda"], result[task]["lambdas"] = sum(mine) / max(len(recs), 1), mine
        if losses is not None:
            result[task]["loss"] = sum(losses[start:end]) / max(len(recs), 1)
        start = end
    return result


# Rows that give the same answers generate them once. An answer set is a model (its adapters and a fixed
# mix) answering every test instance; answer_key names it by where its adapters come from, so that
# FedDPA-F's global adapter alone is FedIT's row, and an -oracle row is its -fixed row on the client's
# own task and its global adapter alone on the others. The dynamic rows' mixes are the client's own,
# per instance: never shared; their representations r(x) are, by a client's paper and calibrated rows.

def global_source(method: str) -> str | None:
    """The training phase whose global adapter `method` loads (FedDPA-F's is FedIT's)."""
    phase = METHODS[method].phase
    return phase and (PHASES[phase].starts_from or phase)


def answer_key(method: str, client_id: int, has_local: bool, *, mixing: str | None = None) -> tuple:
    """The answer set of `method` for one client, with `mixing` in place of the method's own (the
    -oracle rows' parts). has_local: whether the client trained a local adapter (without one it is
    scored with the global adapter alone; Local: the base model)."""
    m, g = METHODS[method], global_source(method)
    mixing = mixing or m.mixing
    if mixing == "none" or (m.phase == "local" and not has_local):
        return ("none",)
    if mixing == "global" or not has_local:
        return ("global", g)
    if mixing in ("local", "fixed", "sum"):
        return (mixing, g, m.phase, client_id)
    return (mixing, method, client_id)  # the dynamic rows


def answer_keys(method: str, client_ids: list, has_local, *, own_tasks: bool = True) -> list:
    """Every answer set `method` needs, in the order evaluate_method generates them. has_local(phase,
    k) -> bool for the k-th client; own_tasks False: test sets no client trained on (the -oracle rows
    then use the global adapter alone)."""
    m = METHODS[method]
    if m.shared:
        return [answer_key(method, 0, False)]
    keys = []
    for k, i in enumerate(client_ids):
        mine = has_local(m.phase, k)
        parts = (("fixed", "global") if own_tasks else ("global",)) if m.mixing == "oracle" else (None,)
        keys += [answer_key(method, i, mine, mixing=w) for w in parts]
    return list(dict.fromkeys(keys))


def answers_needed(methods: list, tests: dict, client_ids: list, *, has_local=lambda phase, k: True, known=(),
                   own_tasks: bool = True) -> dict:
    """How many answers evaluating `methods` in turn generates, per method: each answer set not yet
    generated (not in `known`, nor made by a method before it) answers every test instance once."""
    seen, n, counts = set(known), sum(map(len, tests.values())), {}
    for method in methods:
        new = [k for k in answer_keys(method, client_ids, has_local, own_tasks=own_tasks) if k not in seen]
        seen.update(new)
        counts[method] = n * len(new)
    return counts


FIXED_MIXES = {  # mixing -> (the client's adapters it loads, their mix); "fixed": the training mix a
    "none": ((), {}), "global": (("global",), {"global": 1.0}), "local": (("local",), {"local": 1.0}),
    "fixed": (("global", "local"), None), "sum": (("global", "local"), {"global": 1.0, "local": 1.0})}


def evaluate_client(method: str, ev: Evaluator, tests: dict, *, client: EvalClient, progress=None) -> dict:
    """One client's scores on every task with the adapters and mix of `method` (feddpa.METHODS): a client
    without a local adapter is scored with the global adapter alone (Local: the base model). Each answer
    set is generated once per test set (ev.answered, by answer_key)."""
    has_local = client.local_adapter is not None
    mixing, recipe = METHODS[method].mixing, ev.recipe
    given = {"global": client.global_adapter, "local": client.local_adapter}
    records = [r for recs in tests.values() for r in recs]  # all tasks together: full batches

    def scored(mixing):
        """The scores of one fixed-mix answer set, generated only if not answered before."""
        key = answer_key(method, client.id, has_local, mixing=mixing)
        if key not in ev.answered:
            names, weights = FIXED_MIXES[key[0]]
            weights = mix(recipe.local_weight) if key[0] == "fixed" else weights
            with lora.using(ev.model, {n: given[n] for n in names}):
                preds = answer(ev, records, weights=weights, progress=progress)
                losses = answer_losses(ev, records, weights=weights) if ev.losses else None
            ev.answered[key] = scores_by_task(tests, preds, losses=losses)
        return ev.answered[key]

    if mixing in FIXED_MIXES or not has_local:
        return scored(mixing)
    if mixing == "oracle":  # a bound: it reads the test instance's task
        own, other = (scored("fixed") if client.task else None), scored("global")
        return {task: dict((own if task == client.task else other)[task]) for task in tests}
    # a dynamic row: first the client's lambda for every test instance, then its answers
    if progress is not None:
        progress.set_postfix_str(f"client {client.id}: lambdas")
    weigh = calibrated if mixing == "calibrated" else paper_weight
    with lora.using(ev.model, given):
        weight = weigh(ev.model, ev.tok, client.records, recipe=recipe, client_id=client.id, device=ev.device,
                       cutoff=ev.dec.cutoff)
        reps_key = ("represented", METHODS[method].phase, client.id, recipe.pool)  # r(x): the local adapter's
        if reps_key not in ev.answered:
            ev.answered[reps_key] = represented(ev, records, recipe.pool)
        if progress is not None:
            progress.set_postfix_str(f"client {client.id}")
        preds, lams = answer_dynamic(ev, records, weight, reps=ev.answered[reps_key], progress=progress)
        losses = (answer_losses(ev, records, lams=torch.tensor(lams, dtype=torch.float64), to=weight.to) if ev.losses else None)
    return scores_by_task(tests, preds, lams=lams, losses=losses)


def evaluate_method(method: str, ev: Evaluator, tests: dict, *, client_data: dict, client_tasks: list | None,
                    trained: dict, progress=None) -> dict:
    """Every client's scores with `method` (evaluate_client), P and TTP (summarize).

    client_data: each client's training records by its id; client_tasks: each client's own task, or None for test
    sets of tasks no client trained on (the paper's unseen tasks: no P, and the -oracle rows answer
    every task with the global adapter alone); trained: as for feddpa.setup_phase; progress: a tqdm bar
    advanced by answers_needed() in all. Models that every client shares (base, FedIT, Centralized) are
    evaluated once."""
    t0 = time.time()
    m = METHODS[method]
    phase = trained.get(m.phase, {"global": {}, "locals": [None] * len(client_data)})
    if m.shared:
        scores = evaluate_client(method, ev, tests, client=EvalClient(0, [], "", phase["global"], None), progress=progress)
        per_client = [scores] * len(client_data)
    else:
        per_client = [evaluate_client(method, ev, tests, progress=progress,
                                      client=EvalClient(i, records, client_tasks[k] if client_tasks else "",
                                                        phase["global"], phase["locals"][k]))
                      for k, (i, records) in enumerate(client_data.items())]
    no_local = [] if m.shared else [i for i, local in zip(client_data, phase["locals"]) if local is None]
    return summarize(per_client, client_tasks, no_local=no_local, seconds=time.time() - t0)


def summarize(per_client: list, client_tasks: list | None, *, no_local: list, seconds: float) -> dict:
    """A method's result from its clients' scores: P and TTP (ROUGE-1 and exact match; P None on unseen
    tasks, client_tasks None), the clients that never trained a local adapter ("no_local"), and the
    lambda diagnostics of a dynamic row."""
    result = {**p_and_ttp(per_client, client_tasks), "per_client": per_client, "no_local": no_local,
              "exact": p_and_ttp(per_client, client_tasks, "exact"), "eval_seconds": seconds}
    if client_tasks and any("lambdas" in s for scores in per_client for s in scores.values()):
        result["lambda"] = lambda_diagnostics(per_client, client_tasks)
    return result


def p_and_ttp(per_client: list, client_tasks: list | None, metric: str = "rouge1") -> dict:
    """P: each client's score on its own task (None without client_tasks); TTP: its mean over all tasks;
    both averaged over clients."""
    p = [scores[task][metric] for scores, task in zip(per_client, client_tasks)] if client_tasks else None
    ttp = [sum(s[metric] for s in scores.values()) / len(scores) for scores in per_client]
    return {"P": sum(p) / len(p) if p else None, "TTP": sum(ttp) / len(ttp)}


def auroc(pos: list, neg: list) -> float:
    """P(a positive scores above a negative), ties counting half (the Mann-Whitney statistic)."""
    pos, neg = torch.tensor(pos, dtype=torch.float64), torch.tensor(neg, dtype=torch.float64)
    return ((pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()).mean().item()


def lambda_diagnostics(per_client: list, client_tasks: list) -> dict:
    """How the per-instance lambdas of a dynamic row tell a client's own task from the others: the mean
    lambda on each and the AUROC of lambda (own task positive), each averaged over the clients that have
    both (a client without a local adapter has no lambdas)."""
    own, other, areas = [], [], []
    for scores, task in zip(per_client, client_tasks):
        mine = scores.get(task, {}).get("lambdas", [])
        theirs = [v for t, s in scores.items() if t != task for v in s.get("lambdas", [])]
        if mine and theirs:
            own.append(sum(mine) / len(mine))
            other.append(sum(theirs) / len(theirs))
            areas.append(auroc(mine, theirs))
    n = max(len(areas), 1)
    return {"own": sum(own) / n, "other": sum(other) / n, "auroc": sum(areas) / n, "clients": len(areas)}


# ----------------------------------------------------------------------------------------------
# Is one method above another beyond the noise of the test sample? A paired bootstrap over instances

def paired_difference(runs_a: list, runs_b: list, *, client_tasks: list, metric: str, n_boot: int = 4000,
                      seed: int = 0) -> dict:
    """Method A's P or TTP (ROUGE-1, metric "P" or "TTP") minus method B's, with a 95% interval.

    runs_a, runs_b: per seed, the method's per_client scores (evaluate_method's, with each task's
    "rouge1_each"); client_tasks: per seed, each client's own task. Every client answered the same test
    instances under both methods, so the comparison is paired: each bootstrap replicate draws, within
    each seed and each task, that task's instances with replacement, one draw for both methods and all
    clients, and averages the seeds' differences. The interval, its 2.5th and 97.5th percentiles,
    covers the test sample's noise with the seeds' training runs as they are; "per_seed" shows how
    much the difference moves from one training seed to another."""
    rng = np.random.default_rng(seed)
    points, replicates = [], np.zeros(n_boot)
    for a, b, own in zip(runs_a, runs_b, client_tasks):
        tasks = list(a[0])
        diff = {t: np.array([c[t]["rouge1_each"] for c in a]) - np.array([c[t]["rouge1_each"] for c in b])
                for t in tasks}                                                   # task -> (clients, n_t)
        drawn = {t: d[:, rng.integers(0, d.shape[1], (n_boot, d.shape[1]))].mean(-1)  # (clients, n_boot)
                 for t, d in diff.items()}
        if metric == "P":    # each client on its own task
            rep = np.mean([drawn[t][c] for c, t in enumerate(own)], 0)
            point = np.mean([diff[t][c].mean() for c, t in enumerate(own)])
        elif metric == "TTP":  # each client's mean over all tasks, then over clients
            rep = np.mean([drawn[t] for t in tasks], 0).mean(0)
            point = np.mean([diff[t].mean() for t in tasks])
        else:
            raise ValueError(f"metric {metric!r}: P or TTP")
        points.append(float(point))
        replicates += rep / len(runs_a)
    lo, hi = np.percentile(replicates, [2.5, 97.5])
    return {"diff": sum(points) / len(points), "ci95": [float(lo), float(hi)], "per_seed": points}
