"""FedDPA: dual-personalizing adapters (Yang et al., NeurIPS 2024), its baselines, and evaluation.

Each client owns a *global* adapter, trained locally and averaged by the server every round (it
learns what all clients share: test-time personalization), and a *local* adapter that never leaves
the client (it learns the client's own task: personalization). The local adapter is learned in one
of two ways, sequentially (F) or iteratively (T):

  FedDPA-F  federated LoRA for R rounds, then each client fine-tunes a copy of the final global
            adapter on its own data; that copy is its local adapter.
  FedDPA-T  round 0 trains the global adapter alone; from round 1 each selected client first trains
            its local adapter with the global one mixed in and frozen,
                h = W x + (1 - a) * dW_global x + a * dW_local x,      a = 0.5,
            then trains its copy of the global adapter alone and sends it for FedAvg.

At inference the two are mixed per test instance (the instance-wise dynamic weighting mechanism):
        lambda(x) = clamp(alpha * mean_k cos(r(x), r(x_k)), 0, 1),   alpha = 0.5,
where r is the model's representation of an instruction (local adapter active) and x_1..x_K are
K = 5 of the client's training instructions, drawn once; the local adapter gets lambda and the
global one 1 - lambda, so instances that look like the client's own data lean on its local adapter.

Baselines on the same model, data and budget: the base model (no adapter), Local (each client
alone), FedIT (one federated adapter), Centralized (one adapter on the pooled data). Scores: ROUGE-1
F1 (the paper's metric), ROUGE-L and exact match; P = a client's score on its own task, TTP = its
mean over all tasks, each averaged over clients.
"""
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import lora
from data import encode_prompt, pad_left
from fed import Client, LocalTrain, Update, train_adapter

METHODS = ("base", "local", "fedit", "centralized", "feddpa-f", "feddpa-f-fixed", "feddpa-t", "feddpa-t-fixed")


@dataclass
class MethodConfig:
    """What the client steps and the dynamic weighting below need; the round schedule is train.py's."""
    train: LocalTrain = field(default_factory=LocalTrain)
    mix: float = 0.5                # FedDPA-T: the local adapter's weight a while training it
    alpha: float = 0.5              # dynamic weighting scale: lambda in [0, alpha]
    k_refs: int = 5                 # K training instructions per client for the dynamic weight
    pool: str = "last"              # instance representation: 'last' prompt token or 'mean'
    lambda_to: str = "local"        # which adapter gets lambda; 'global' is what the official code does


# ----------------------------------------------------------------------------------------------
# Client steps: what one selected client does in one round, given the global adapter it received.
# They return the Update message (global adapter + example count) and local metrics.

def fedit_step(model, pad_id, cfg: MethodConfig):
    """FedIT (plain federated LoRA) and FedDPA-T's round 0: train the global adapter alone."""
    def step(round_, client: Client, global_adapter):
        lora.set_adapter(model, "global", global_adapter)
        m = train_adapter(model, "global", client.data, cfg.train, {"global": 1.0}, pad_id, client.generator,
                          where=f" of client {client.id} in round {round_}")
        return Update(lora.get_adapter(model, "global"), len(client.data)), m
    return step


def feddpa_t_step(model, pad_id, cfg: MethodConfig, fresh_local):
    """FedDPA-T (iterative learning): local adapter with the frozen global one mixed in, then the global alone."""
    global_step = fedit_step(model, pad_id, cfg)

    def step(round_, client: Client, global_adapter):
        if round_ == 0:
            return global_step(round_, client, global_adapter)
        lora.set_adapter(model, "global", global_adapter)
        lora.set_adapter(model, "local", client.local if client.local is not None else fresh_local)
        m1 = train_adapter(model, "local", client.data, cfg.train, {"local": cfg.mix, "global": 1 - cfg.mix},
                           pad_id, client.generator, where=f" of client {client.id} in round {round_}")
        client.local = lora.get_adapter(model, "local")   # stays on the client
        update, m2 = global_step(round_, client, global_adapter)
        return update, {"loss": (m1["loss"] + m2["loss"]) / 2, "local_loss": m1["loss"], "global_loss": m2["loss"]}
    return step


def local_step(model, pad_id, train: LocalTrain, start: dict):
    """Train the client's own adapter alone; nothing is sent (an empty Update). Used for FedDPA-F's
    second stage (start = the final global adapter, one round) and the Local baseline (start = the
    initial adapter, R rounds). The adapter carries over between rounds."""
    def step(round_, client: Client, global_adapter):
        lora.set_adapter(model, "local", client.local if client.local is not None else start)
        m = train_adapter(model, "local", client.data, train, {"local": 1.0}, pad_id, client.generator,
                          where=f" of client {client.id} in round {round_}")
        client.local = lora.get_adapter(model, "local")
        return Update({}, len(client.data)), m
    return step


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
    reps = torch.empty(len(refs), model.cfg.dim, device=device)
    for idx, ids, mask in prompt_batches(tok, refs, len(refs), cutoff):
        reps[idx] = represent(model, ids.to(device), mask.to(device), pool).float()
    return reps


def dynamic_lambda(reps, ref_reps, alpha: float):
    """lambda = clamp(alpha * mean_k cos(r(x), r(x_k)), 0, 1), per instance: (B, dim), (K, dim) -> (B,)."""
    cos = F.cosine_similarity(reps.float()[:, None, :], ref_reps[None, :, :], dim=-1)  # (B, K)
    return (alpha * cos.mean(-1)).clamp(0.0, 1.0)


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
# Generation with a given mix

@dataclass
class Decode:
    max_new_tokens: int = 32
    num_beams: int = 1
    batch_size: int = 32
    cutoff: int = 512


@torch.no_grad()
def answer(model, tok, records, dec: Decode, device, mix=None, refs=None, cfg: MethodConfig = None) -> tuple:
    """Answers to records, in order, and the lambda used for each (None for a fixed mix).

    mix: a fixed {adapter: weight} dict, or 'dynamic' with refs = the client's cached reference
    representations. Dynamic weights are per example inside each batch, never one instance at a time."""
    out, lams = [None] * len(records), [None] * len(records)
    for idx, ids, mask in prompt_batches(tok, records, dec.batch_size, dec.cutoff):
        ids, mask = ids.to(device), mask.to(device)
        if mix == "dynamic":
            lam = dynamic_lambda(represent(model, ids, mask, cfg.pool), refs, cfg.alpha)   # (B,)
            w = lam.repeat_interleave(dec.num_beams)  # beams are laid out example-major
            mine, other = ("local", "global") if cfg.lambda_to == "local" else ("global", "local")
            lora.set_weights(model, {mine: w, other: 1 - w})
            for i, v in zip(idx, lam.tolist()):
                lams[i] = v
        else:
            lora.set_weights(model, mix or {})
        gen = model.generate(ids, mask, dec.max_new_tokens, tok.eos_id, tok.pad_id, dec.num_beams)
        for i, row in zip(idx, gen.tolist()):
            row = row[:row.index(tok.eos_id)] if tok.eos_id in row else row
            out[i] = tok.decode(row).strip()
    return out, lams


def evaluate(model, tok, tests: dict, dec: Decode, device, mix=None, refs=None, cfg=None) -> dict:
    """Scores of one model (one mix of adapters already loaded) on every task's test set."""
    result = {}
    for task, records in tests.items():
        preds, lams = answer(model, tok, records, dec, device, mix, refs, cfg)
        result[task] = score(preds, [r["output"] for r in records])
        if mix == "dynamic":
            result[task]["lambda"] = sum(lams) / max(len(lams), 1)
    return result


def p_and_ttp(per_client: list, client_tasks: list, metric: str = "rouge1") -> dict:
    """P: each client's score on its own task; TTP: its mean over all tasks; both averaged over clients."""
    p = [scores[task][metric] for scores, task in zip(per_client, client_tasks)]
    ttp = [sum(s[metric] for s in scores.values()) / len(scores) for scores in per_client]
    return {"P": sum(p) / len(p), "TTP": sum(ttp) / len(ttp)}
