"""FedDPA: dual-personalizing adapters (Yang et al., NeurIPS 2024), its baselines, and how each is evaluated.

Each client owns a *global* adapter, trained locally and averaged by the server every round (it
learns what all clients share: test-time personalization), and a *local* adapter that never leaves
the client (it learns the client's own task: personalization). The local adapter is learned in one
of two ways, sequentially (F) or iteratively (T), as the paper names them:

  FedDPA-F  federated LoRA (FedIT) for R rounds, then each client fine-tunes a copy of the final
            global adapter on its own data; that copy is its local adapter.
  FedDPA-T  round 0 trains the global adapter alone; from round 1 each selected client first trains
            its local adapter (at its first time, a fresh one of its own: A random, B = 0) with the
            global one mixed in and frozen,
                h = W x + (1 - a) * dW_global x + a * dW_local x,      a = 0.5,
            then trains its copy of the global adapter alone and sends it for FedAvg.
A client's local adapter stays on it across the rounds it is not sampled in; a client that never
trained one is evaluated with the global adapter alone (and the results say so).

At inference the two are mixed per test instance (the paper's instance-wise dynamic weighting mechanism):
        lambda(x) = clamp(s * mean_k cos(r(x), r(x_k)), 0, 1),   s = 0.5 (lambda_scale),
where r is the model's representation of an instruction (local adapter active) and x_1..x_K are
K = 5 of the client's training instructions, drawn once; the local adapter gets lambda and the
global one 1 - lambda (mix), so instances that look like the client's own data lean on its local
adapter. The `-fixed` rows (the paper's ablation) use the training mix a instead.

Baselines on the same model and data: the base model (no adapter), Local (each client alone), FedIT
(one federated adapter), Centralized (one adapter on the pooled data). Scores: ROUGE-1 F1 (the
paper's metric), ROUGE-L and exact match; P = a client's score on its own task, TTP = its mean over
all tasks, each averaged over clients.

Top to bottom: the methods and the training phases each needs; the mix; the client steps; each
phase's clients, step and schedule (FedDPA-F's hand-over from FedIT included); the dynamic weight;
ROUGE; generation with a mix; evaluating each method; P and TTP. Not here: the LoRA layers
(lora.py), the round loop, local training and FedAvg (fed.py), the run folder (runs.py).
"""
import re
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F

import lora
from data import encode_prompt, pad_left
from fed import Client, LocalTrain, Update, train_adapter
from generate import generate

METHODS = ("base", "local", "fedit", "centralized", "feddpa-f", "feddpa-f-fixed", "feddpa-t", "feddpa-t-fixed")
PHASES = {  # training phase -> the methods that need it, in the order they run (FedDPA-F needs FedIT first)
    "fedit": {"fedit", "feddpa-f", "feddpa-f-fixed"},
    "feddpa-f": {"feddpa-f", "feddpa-f-fixed"},
    "feddpa-t": {"feddpa-t", "feddpa-t-fixed"},
    "local": {"local"},
    "centralized": {"centralized"},
}


@dataclass
class Recipe:
    """Every setting of the method: the schedule, local training, FedDPA-T's mix, the dynamic weight."""
    train: LocalTrain = field(default_factory=LocalTrain)
    rounds: int = 20                # communication rounds R
    fraction: float = 1.0           # clients sampled per round (FedIT, FedDPA-T)
    local_weight: float = 0.5       # a: the local adapter's weight while FedDPA-T trains it; the -fixed rows' mix
    finetune_rounds: float = 1.0    # FedDPA-F: local fine-tuning budget, in rounds of local training (the paper: 1)
    lambda_scale: float = 0.5       # s: lambda in [0, s]
    k_refs: int = 5                 # K training instructions per client for the dynamic weight
    pool: str = "last"              # instance representation: 'last' prompt token or 'mean'
    lambda_to: str = "local"        # which adapter gets lambda; 'global' is what the official code does
    seed: int = 0


def mix(lam, to: str = "local") -> dict:
    """The two adapters' weights when adapter `to` gets lam (a float or a (batch,) tensor) and the other
    1 - lam: the only way the two are ever mixed, in training and in evaluation."""
    other = "global" if to == "local" else "local"
    return {to: lam, other: 1 - lam}


# ----------------------------------------------------------------------------------------------
# Client steps: what one selected client does in one round, given the global adapter it received.
# They return the Update message (global adapter + example count) and local metrics.

def fedit_step(model, pad_id, train: LocalTrain):
    """FedIT (plain federated LoRA) and FedDPA-T's round 0: train the global adapter alone."""
    def step(round_, client: Client, global_adapter):
        lora.set_adapter(model, "global", global_adapter)
        metrics = train_adapter(model, "global", client.data, train, {"global": 1.0}, pad_id, client.generator,
                                where=f" of client {client.id} in round {round_}")
        return Update(lora.get_adapter(model, "global"), len(client.data)), metrics
    return step


def fresh_local(model, seed: int, client_id: int) -> dict:
    """A client's own initial local adapter for FedDPA-T, as the official code adds one per client at its
    first local round: A kaiming-uniform from the client's seeded draw, B = 0."""
    return lora.new_adapter(model, torch.Generator().manual_seed(seed * 1_000_003 + 500_000 + client_id))


def feddpa_t_step(model, pad_id, train: LocalTrain, local_weight: float, seed: int):
    """FedDPA-T (iterative learning): local adapter with the frozen global one mixed in, then the global alone."""
    global_step = fedit_step(model, pad_id, train)

    def step(round_, client: Client, global_adapter):
        if round_ == 0:
            return global_step(round_, client, global_adapter)
        lora.set_adapter(model, "global", global_adapter)
        lora.set_adapter(model, "local", client.local if client.local is not None else fresh_local(model, seed, client.id))
        local = train_adapter(model, "local", client.data, train, mix(local_weight), pad_id, client.generator,
                              where=f" of client {client.id} in round {round_}")
        client.local = lora.get_adapter(model, "local")   # stays on the client
        update, glob = global_step(round_, client, global_adapter)
        return update, {"loss": (local["loss"] + glob["loss"]) / 2, "local_loss": local["loss"], "global_loss": glob["loss"],
                        "steps": local["steps"] + glob["steps"], "examples": local["examples"] + glob["examples"]}
    return step


def local_step(model, pad_id, train: LocalTrain, start: dict):
    """Train the client's own adapter alone; nothing is sent (an empty Update). Used for FedDPA-F's
    second stage (start = the final global adapter, one round) and the Local baseline (start = the
    initial adapter, R rounds). The adapter carries over between rounds."""
    def step(round_, client: Client, global_adapter):
        lora.set_adapter(model, "local", client.local if client.local is not None else start)
        metrics = train_adapter(model, "local", client.data, train, {"local": 1.0}, pad_id, client.generator,
                                where=f" of client {client.id} in round {round_}")
        client.local = lora.get_adapter(model, "local")
        return Update({}, len(client.data)), metrics
    return step


# ----------------------------------------------------------------------------------------------
# Training phases: each is one federated run (fed.run_rounds) of some clients with one client step.

@dataclass
class Phase:
    clients: list          # fed.Client, each with its own seeded data order
    step: Callable         # the client step
    rounds: int
    fraction: float        # clients sampled per round
    start: dict            # the global adapter sent in round 0 ({}: none is sent)


def scaled(train: LocalTrain, factor: float) -> LocalTrain:
    return replace(train, epochs=train.epochs * factor, max_steps=round(train.max_steps * factor))


def setup_phase(name: str, model, pad_id: int, recipe: Recipe, datasets: list, init: dict, trained: dict) -> Phase:
    """Phase `name` on the clients' encoded datasets, every adapter starting from init; trained holds
    the phases already run ({phase: {"global": adapter, "locals": [...]}}): FedDPA-F starts from FedIT's."""
    def clients(sets):
        return [Client(i, d, torch.Generator().manual_seed(recipe.seed * 1000 + i)) for i, d in enumerate(sets)]
    train = recipe.train
    if name == "fedit":
        return Phase(clients(datasets), fedit_step(model, pad_id, train), recipe.rounds, recipe.fraction, init)
    if name == "feddpa-t":
        step = feddpa_t_step(model, pad_id, train, recipe.local_weight, recipe.seed)
        return Phase(clients(datasets), step, recipe.rounds, recipe.fraction, init)
    if name == "feddpa-f":  # the hand-over: every client fine-tunes a copy of FedIT's final global adapter
        step = local_step(model, pad_id, scaled(train, recipe.finetune_rounds), trained["fedit"]["global"])
        return Phase(clients(datasets), step, 1, 1.0, {})
    if name == "local":  # sampled as FedIT is: the same clients in the same rounds
        return Phase(clients(datasets), local_step(model, pad_id, train, init), recipe.rounds, recipe.fraction, {})
    if name == "centralized":  # one client holding everything, the same total number of optimizer steps
        pooled = [e for d in datasets for e in d]
        train = train if not train.max_steps else scaled(train, len(datasets))
        return Phase(clients([pooled]), fedit_step(model, pad_id, train), recipe.rounds, 1.0, init)
    raise ValueError(f"unknown phase {name!r}")


def phase_result(name: str, global_adapter: dict, clients: list, trained: dict) -> dict:
    """What a finished phase leaves for evaluation: its global adapter (FedDPA-F's is FedIT's) and each
    client's local adapter (None where a client trained none)."""
    return {"global": trained["fedit"]["global"] if name == "feddpa-f" else global_adapter,
            "locals": [c.local for c in clients]}


# ----------------------------------------------------------------------------------------------
# Instance-wise dynamic weighting mechanism (inference)

def prompt_batches(tok, records, batch_size, cutoff=512):
    """Encoded, left-padded prompts in batches of similar length; yields (indices, ids, mask)."""
    enc = [encode_prompt(tok, r, cutoff) for r in records]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask = pad_left([enc[i] for i in idx], tok.pad_id)
        yield idx, ids, mask


@torch.no_grad()
def represent(model, ids, mask, pool):
    """r(x): the instruction's representation with only the local adapter active, (B, dim)."""
    lora.set_weights(model, {"local": 1.0})
    return model.represent(ids, mask, pool)


def draw_references(records, k: int, seed: int, client_id: int) -> list:
    """The K training instructions a client compares test instances with: drawn once, seeded."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + client_id)
    return [records[i] for i in torch.randperm(len(records), generator=g)[:k].tolist()]


@torch.no_grad()
def reference_reps(model, tok, refs, pool, device, cutoff=512) -> torch.Tensor:
    """Cached representations of the client's reference instructions, (K, dim); local adapter loaded."""
    reps = torch.empty(len(refs), model.config.dim, device=device)
    for idx, ids, mask in prompt_batches(tok, refs, len(refs), cutoff):
        reps[idx] = represent(model, ids.to(device), mask.to(device), pool).float()
    return reps


def dynamic_lambda(reps, ref_reps, scale: float):
    """lambda = clamp(scale * mean_k cos(r(x), r(x_k)), 0, 1), per instance: (B, dim), (K, dim) -> (B,)."""
    cos = F.cosine_similarity(reps.float()[:, None, :], ref_reps[None, :, :], dim=-1)  # (B, K)
    return (scale * cos.mean(-1)).clamp(0.0, 1.0)


@dataclass
class Dynamic:
    """A client's dynamic weight: its cached reference representations and how lambda is applied."""
    ref_reps: torch.Tensor     # (K, dim)
    scale: float               # lambda_scale
    pool: str
    to: str                    # the adapter that gets lambda

    def lam(self, model, ids, mask):
        return dynamic_lambda(represent(model, ids, mask, self.pool), self.ref_reps, self.scale)  # (B,)

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
    """Mean scores in percent, as the paper reports them."""
    n = max(len(refs), 1)
    return {name: 100 * sum(fn(p, r) for p, r in zip(preds, refs)) / n
            for name, fn in (("rouge1", rouge1), ("rougeL", rouge_l), ("exact", exact_match))}


# ----------------------------------------------------------------------------------------------
# Generation with a mix, and each method's evaluation

@dataclass
class Decode:
    max_new_tokens: int = 32
    num_beams: int = 1
    batch_size: int = 32
    cutoff: int = 512


@torch.no_grad()
def answer(model, tok, records, dec: Decode, device, weights: dict | None = None, dynamic: Dynamic | None = None):
    """Answers to records, in order, and the lambda used for each (None without a dynamic weight).

    weights: a fixed mix {adapter: weight}; or dynamic: lambda per instance, applied per example inside
    each batch, never one instance at a time."""
    out, lams = [None] * len(records), [None] * len(records)
    for idx, ids, mask in prompt_batches(tok, records, dec.batch_size, dec.cutoff):
        ids, mask = ids.to(device), mask.to(device)
        if dynamic is not None:
            lam = dynamic.lam(model, ids, mask)                                   # (B,)
            lora.set_weights(model, mix(lam.repeat_interleave(dec.num_beams), dynamic.to))  # beams: example-major
            for i, v in zip(idx, lam.tolist()):
                lams[i] = v
        else:
            lora.set_weights(model, weights or {})
        gen = generate(model, ids, mask, dec.max_new_tokens, tok.eos_id, tok.pad_id, dec.num_beams)
        for i, row in zip(idx, gen.tolist()):
            row = row[:row.index(tok.eos_id)] if tok.eos_id in row else row
            out[i] = tok.decode(row).strip()
    return out, lams


def evaluate(model, tok, tests: dict, dec: Decode, device, weights=None, dynamic=None) -> dict:
    """Scores of one model (its adapters already loaded) on every task's test set."""
    result = {}
    for task, records in tests.items():
        preds, lams = answer(model, tok, records, dec, device, weights, dynamic)
        result[task] = score(preds, [r["output"] for r in records])
        if dynamic is not None:
            result[task]["lambda"] = sum(lams) / max(len(lams), 1)
    return result


def evaluate_method(method: str, model, tok, tests: dict, client_data: list, client_tasks: list, trained: dict,
                    init: dict, recipe: Recipe, dec: Decode, device) -> dict:
    """Each client's scores on every task with the adapters and mix of `method`; P and TTP.

    client_data: each client's training records (the dynamic weight's references); trained: as for
    setup_phase. Models that every client shares (base, FedIT, Centralized) are evaluated once.
    "no_local" lists the clients that never trained a local adapter."""
    t0 = time.time()
    no_local = []
    if method in ("base", "fedit", "centralized"):
        if method != "base":
            lora.set_adapter(model, "global", trained[method]["global"])
        scores = evaluate(model, tok, tests, dec, device, {} if method == "base" else {"global": 1.0})
        per_client = [scores] * len(client_data)
    else:
        phase = trained[method.removesuffix("-fixed")]
        per_client = []
        for i, records in enumerate(client_data):
            local = phase["locals"][i]
            if local is None:  # never sampled to train one: the global adapter alone (Local: the base model)
                if phase["global"]:
                    lora.set_adapter(model, "global", phase["global"])
                per_client.append(evaluate(model, tok, tests, dec, device, {"global": 1.0} if phase["global"] else {}))
                continue
            lora.set_adapter(model, "local", local)
            if method == "local":
                per_client.append(evaluate(model, tok, tests, dec, device, {"local": 1.0}))
                continue
            lora.set_adapter(model, "global", phase["global"])
            if method.endswith("-fixed"):
                per_client.append(evaluate(model, tok, tests, dec, device, mix(recipe.local_weight)))
            else:
                refs = draw_references(records, recipe.k_refs, recipe.seed, i)
                ref_reps = reference_reps(model, tok, refs, recipe.pool, device, dec.cutoff)
                dynamic = Dynamic(ref_reps, recipe.lambda_scale, recipe.pool, recipe.lambda_to)
                per_client.append(evaluate(model, tok, tests, dec, device, dynamic=dynamic))
        no_local = [i for i, local in enumerate(phase["locals"]) if local is None]
    return {**p_and_ttp(per_client, client_tasks), "per_client": per_client, "no_local": no_local,
            "exact": p_and_ttp(per_client, client_tasks, "exact"), "eval_seconds": time.time() - t0}


def p_and_ttp(per_client: list, client_tasks: list, metric: str = "rouge1") -> dict:
    """P: each client's score on its own task; TTP: its mean over all tasks; both averaged over clients."""
    p = [scores[task][metric] for scores, task in zip(per_client, client_tasks)]
    ttp = [sum(s[metric] for s in scores.values()) / len(scores) for scores in per_client]
    return {"P": sum(p) / len(p), "TTP": sum(ttp) / len(ttp)}
