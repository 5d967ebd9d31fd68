"""The federated loop as plain functions over in-memory state (FedAvg, McMahan et al. 2017, as FedDPA uses it).

One frozen foundation model lives in memory; its LoRA layers hold two adapter slots, `global` and
`local` (lora.py). A client's adapters are plain state dicts, given to each training at the call
(lora.using) and returned trained; the model keeps none between calls. The boundary between client and server is the `Update` message: the server only ever sees
a client's copy of the global adapter and its example count — never its data, never its local
adapter, never its optimizer.

Contents: local training (AdamW, linear decay, micro-batches with gradient accumulation); the
client/server state and message; FedAvg, and client-level DP-FedAvg with its privacy guarantee; the
seeds (one generator per stream of draws, `seeded`); the round loop with client sampling and per-round
metrics, which reaches its clients through a `train_round` function: in_process here, over Flower in
flower_app.py.
"""
import hashlib
import json
import math
import secrets
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import lora
from data import collate
from model import IGNORE_INDEX


@dataclass
class LocalTrain:
    """How a client trains an adapter on its own data in one round."""
    lr: float = 3e-4              # AdamW, as in the paper
    epochs: float = 1.0           # passes over the client's data per round ...
    max_steps: int = 0            # ... or, if > 0, a budget of optimizer steps per round
    batch_size: int = 16          # examples per optimizer step
    micro_batch_size: int = 8     # examples per forward pass (gradients accumulate)
    max_grad_norm: float = 1.0    # clip the gradient's global norm before each step (0: off), as transformers' Trainer
    bf16: bool = False            # bfloat16 autocast for the forward pass (CPU or GPU)


class Diverged(Exception):
    """The loss became NaN or infinite; the message names where."""


def train_adapter(model, client: "Client", *, adapters: dict, weights: dict, trains: str, train: LocalTrain,
                  pad_id: int) -> tuple:
    """Train adapter `trains` of `adapters` ({slot: state dict}) on the client's encoded examples, in its
    data order, the others mixed in with fixed `weights` (the mix, lora.using).

    The client's generator draws its data order and its LoRA dropout. Returns the trained adapter (a
    state dict) and {"loss": mean loss, "steps": optimizer steps,
    "examples": examples seen, "tokens": labelled tokens}."""
    examples, generator = client.data, client.generator
    steps = train.max_steps or max(1, math.ceil(train.epochs * len(examples) / train.batch_size))
    # adapters, mix and mode for this block only
    with lora.using(model, adapters, weights), lora.training(model, trains, generator) as params:
        # no weight decay, as the paper's code (AdamW's own default is 0.01); fused: one kernel per step for
        # all the adapter's tensors (transformers' Trainer default too)
        opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=0.0, fused=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)  # linear decay to 0
        order = []
        losses, tokens = [], 0
        for _ in range(steps):
            while len(order) < train.batch_size:  # epochs of seeded shuffles, as long as the budget needs
                order += torch.randperm(len(examples), generator=generator).tolist()
            batch, order = [examples[i] for i in order[:train.batch_size]], order[train.batch_size:]
            micro = [batch[i:i + train.micro_batch_size] for i in range(0, len(batch), train.micro_batch_size)]
            step_loss = 0.0
            for mb in micro:
                ids, mask, labels = (t.to(params[0].device) for t in collate(mb, pad_id))
                with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=train.bf16):
                    loss = model(ids, mask, labels)[1] / len(micro)
                loss.backward()
                step_loss += loss.item()
                tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())
            if not math.isfinite(step_loss):
                raise Diverged(f"loss became {step_loss} while training the {trains} adapter")
            if train.max_grad_norm > 0:  # after accumulation, before the step, as the official Trainer does
                torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(step_loss)
        trained = lora.get_adapter(model, trains)
    return trained, {"loss": sum(losses) / len(losses), "steps": steps, "examples": steps * train.batch_size,
                     "tokens": tokens}


# ----------------------------------------------------------------------------------------------
# State on each side of the boundary, and what crosses it

@dataclass
class Client:
    id: int
    data: list                        # encoded training examples: private
    generator: torch.Generator        # the client's own draws, data order and LoRA dropout: private
    local: dict | None = None         # the local adapter (FedDPA): private, never sent


@dataclass
class Update:
    """The only thing a client sends: its trained copy of the global adapter and its example count."""
    adapter: dict
    n_examples: int
    norm: float | None = None  # DP-FedAvg over Flower: the update's norm before its client clipped it


def fedavg(updates: list, weighting: str = "count") -> dict:
    """FedAvg of the global adapter: each tensor (A and B separately, as the paper's code does)
    averaged with weights n_k / sum n ('count') or 1 / K ('uniform')."""
    if weighting not in ("count", "uniform"):
        raise ValueError(f"unknown FedAvg weighting {weighting!r} (count or uniform)")
    w = torch.tensor([u.n_examples if weighting == "count" else 1.0 for u in updates], dtype=torch.float64)
    w = w / w.sum()
    return {k: sum(wi * u.adapter[k].double() for wi, u in zip(w, updates)).to(updates[0].adapter[k].dtype)
            for k in updates[0].adapter}


# ----------------------------------------------------------------------------------------------
# Client-level differential privacy on the global adapter: DP-FedAvg (McMahan et al., ICLR 2018)

@dataclass(frozen=True)
class DP:
    """DP-FedAvg's settings. Neighbouring federations differ by one client's whole data (added or removed)."""
    clip: float            # C: each client's update clipped to L2 norm C, over all the adapter's tensors together
    noise: float           # sigma, the noise multiplier: N(0, (sigma C / n)^2) per coordinate on the mean of n updates
    delta: float = 1e-5    # the delta that epsilon is reported at
    seeded_noise: bool = True  # noise from the run's seed (a reproducible simulation); False: the OS's secure randomness


def clipped(adapter: dict, sent: dict, clip: float) -> tuple:
    """(the update adapter - sent as float64 tensors, scaled to L2 norm at most `clip` over all of the
    adapter's tensors together, by one factor; the update's norm before). Run by the server, or by the
    client before it sends (over Flower)."""
    change = {k: adapter[k].double() - sent[k].double() for k in sent}
    norm = math.sqrt(sum(float((d * d).sum()) for d in change.values()))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: scale * d for k, d in change.items()}, norm


def dp_fedavg(updates: list, sent: dict, dp: DP, *, expected: int, generator: torch.Generator) -> tuple:
    """DP-FedAvg's server step: each update (a client's trained adapter minus `sent`, the adapter it
    received) scaled to L2 norm at most C, their sum divided by the number of clients expected in the
    round (fixed, so that one client more or less moves the mean by at most C / n), Gaussian noise of
    std sigma C / n on every coordinate, added to `sent`. Returns (new global adapter, each update's
    norm before clipping: where its client clipped it already, the norm the client reports)."""
    changes, norms = zip(*(clipped(u.adapter, sent, dp.clip) for u in updates))
    norms = [n if u.norm is None else u.norm for u, n in zip(updates, norms)]
    std = dp.noise * dp.clip / expected
    new = {}
    for k in sent:  # in the adapter's order: the noise's draws are the same on every run
        mean = sum(c[k] for c in changes) / expected
        noise = torch.randn(sent[k].shape, generator=generator, dtype=torch.float64) * std
        new[k] = (sent[k].double() + mean + noise.to(mean.device)).to(sent[k].dtype)
    return new, norms


def dp_epsilon(noise: float, rounds: int, delta: float) -> float:
    """epsilon at delta of `rounds` Gaussian mechanisms of noise multiplier `noise` (a client's clipped
    update has sensitivity C; the noise on the sum is noise * C), composed exactly: they are one Gaussian
    mechanism of multiplier s = noise / sqrt(rounds), whose privacy curve is (Balle and Wang, ICML 2018,
    Theorem 8) delta(eps) = Phi(1/(2s) - eps s) - e^eps Phi(-1/(2s) - eps s), decreasing in eps; solved
    for eps by bisection (logs of Phi, so that neither term overflows). Every client in every round: a
    sampled fraction is not amplified (the draw is public), so the bound holds as if all took part."""
    if noise <= 0:
        return math.inf
    s = noise / math.sqrt(rounds)
    log_phi = lambda x: torch.special.log_ndtr(torch.tensor(x, dtype=torch.float64)).item()  # noqa: E731

    def delta_of(eps):
        return math.exp(log_phi(1 / (2 * s) - eps * s)) - math.exp(eps + log_phi(-1 / (2 * s) - eps * s))
    lo, hi = 0.0, 1.0
    while delta_of(hi) > delta:
        lo, hi = hi, 2 * hi
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def averaging(weighting: str = "count", dp: DP | None = None, *, seed: int = 0, stream: tuple = ()):
    """The server's step for run_rounds: aggregate(updates, sent adapter, *, round_, expected) -> (new
    global adapter, what the round's history records), expected: the number of clients chosen. FedAvg
    with `weighting`; or, where dp is given, DP-FedAvg (equal weights), its noise drawn from
    seeded(seed, *stream, "dp noise", round): a generator per round, so a resumed run draws the same
    noise (dp.seeded_noise False: from secrets instead); the history gets each update's norm before clipping,
    and epsilon after this round (None without noise: no guarantee)."""
    def aggregate(updates, sent, *, round_, expected):
        if dp is None:
            return fedavg(updates, weighting), {}
        gen = (seeded(seed, *stream, "dp noise", round_) if dp.seeded_noise
               else torch.Generator().manual_seed(secrets.randbits(63)))  # a deployment: noise no one can replay
        new, norms = dp_fedavg(updates, sent, dp, expected=expected, generator=gen)
        eps = dp_epsilon(dp.noise, round_ + 1, dp.delta)  # infinite without noise: None in the history
        return new, {"update_norms": norms, "epsilon": eps if math.isfinite(eps) else None, "delta": dp.delta}
    return aggregate


def nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def sample_clients(n: int, fraction: float, *, seed: int, round_: int) -> list:
    """Clients taking part in a round: a seeded draw of max(1, round(fraction * n)) of them."""
    k = max(1, round(fraction * n))
    return sorted(torch.randperm(n, generator=seeded(seed, "clients", round_))[:k].tolist())


def seeded(seed: int, *names) -> torch.Generator:
    """A generator of its own for each stream of draws, keyed by the run's seed and stable names (a phase,
    a client, a purpose): adding a stream, or drawing more from one, changes no other. The key is the
    first 8 bytes of sha256 of the JSON list [seed, *names], little-endian, less its top bit."""
    digest = hashlib.sha256(json.dumps([seed, *names]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))


@dataclass
class Federation:
    """Everything the server holds between rounds (what a checkpoint saves): no client state."""
    global_adapter: dict
    n_clients: int
    round: int = 0                                # rounds completed
    history: list = field(default_factory=list)   # one metrics dict per round


def in_process(clients: list, client_update, progress: bool = False):
    """How a simulated federation reaches its clients: each chosen client's step, one after another, in
    this process. client_update(round, client, global_adapter) -> (Update, local adapter, metrics) is the
    method's local step; the client keeps the local adapter it returns. (flower_app.py reaches clients on
    other processes or machines instead.)"""
    def train_round(round_, chosen, global_adapter) -> dict:
        replies = {}
        for cid in tqdm(chosen, desc=f"round {round_ + 1}", leave=False, unit="client", disable=not progress):
            client = clients[cid]
            try:  # down: the global adapter; up: the Update
                update, client.local, metrics = client_update(round_, client, global_adapter)
            except Diverged as e:
                raise Diverged(f"{e} of client {cid} in round {round_ + 1}") from None
            replies[cid] = update, metrics
        return replies
    return train_round


class NoReplies(Exception):
    """No chosen client answered in a round: there is nothing to average."""


def every_client(n: int, round_: int) -> list:
    return list(range(n))


def run_rounds(federation: Federation, train_round, *, rounds: int, sample=every_client, aggregate=averaging(),
               on_round_end=None, progress: str | None = None):
    """Run rounds federation.round .. rounds-1. sample(n_clients, round) -> the clients chosen (e.g.
    sample_clients with a fraction and a seed); train_round(round, chosen, global_adapter) -> {client:
    (Update, metrics)} reaches them (in_process, or over a network, where some may not answer); the server
    here only samples, sends, and averages what came back (aggregate: see averaging). progress: a bar on
    stderr so labelled."""
    bar = tqdm(range(federation.round, rounds), desc=progress, leave=False, unit="round", initial=federation.round,
               total=rounds, disable=progress is None)
    for r in bar:
        t0 = time.time()
        chosen = sample(federation.n_clients, r)
        sent = nbytes(federation.global_adapter) * len(chosen)
        replies = train_round(r, chosen, federation.global_adapter)
        came = [c for c in chosen if c in replies]
        if not came:
            raise NoReplies(f"round {r + 1}: none of the chosen clients {chosen} replied")
        updates, metrics = [replies[c][0] for c in came], [replies[c][1] for c in came]
        federation.global_adapter, server = aggregate(updates, federation.global_adapter, round_=r,
                                                      expected=len(chosen))
        federation.round = r + 1
        federation.history.append({
            "round": r, "clients": came,
            "missing": [c for c in chosen if c not in replies],  # chosen but no reply (only over a network)
            "loss": sum(cm["loss"] for cm in metrics) / len(metrics),
            "steps": [cm["steps"] for cm in metrics],         # optimizer steps of each client that replied
            "examples": [cm["examples"] for cm in metrics],
            "bytes_down": sent,
            "bytes_up": sum(nbytes(u.adapter) for u in updates),
            "seconds": time.time() - t0,
            **server,  # DP-FedAvg's update norms and epsilon
        })
        bar.set_postfix(loss=f"{federation.history[-1]['loss']:.3f}")
        if on_round_end is not None:
            on_round_end(federation)
    return federation
