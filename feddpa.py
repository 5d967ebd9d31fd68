"""FedDPA: dual-personalizing adapters (Yang et al., NeurIPS 2024), its baselines, and every step of both.

The algorithm, each step named by the function that does it (fed.py holds the generic round loop):

  every method   one frozen base with two LoRA slots per layer, `global` and `local` (lora.inject);
                 run_phase runs a training phase: R rounds of fed.run_rounds, each chosen client
                 taking one client step, the server averaging what comes back (fed.fedavg)
  FedIT          each round, each client loads the global adapter, trains it alone and sends it back
                 (fedit_step)
  FedDPA-F       FedIT for R rounds; then one round in which each client fine-tunes a copy of FedIT's
                 final global adapter on its own data, and keeps it as its local adapter
                 (setup_phase "feddpa-f", local_step)
  FedDPA-T       round 0 as FedIT; from round 1 each client first trains its local adapter (at first a
                 fresh one of its own, fresh_local) with the frozen global one mixed in,
                     h = W x + (1 - a) * dW_global x + a * dW_local x,      a = 0.5  (mix),
                 then its copy of the global adapter alone, and sends that (feddpa_t_step)
  inference      per test instance x, lambda(x) = clamp(s * mean_k sim(r(x), r(x_k)), 0, 1), s = 0.5,
                 r the representation with the local adapter (represent), x_1..x_K K = 5 of the
                 client's training instructions drawn once (paper_weight, dynamic_lambda), sim the
                 cosine (the paper's ablation: L2 and Pearson, see similarity); the local adapter
                 gets lambda, the global one 1 - lambda (mix), per example inside a batch
                 (evaluation.answer)

Each client owns a *global* adapter, averaged by the server every round (it learns what all clients
share: test-time personalization), and a *local* adapter that never leaves it (its own task:
personalization). A client's local adapter stays on it across the rounds it is not sampled in; a
client that never trained one is evaluated with the global adapter alone (and the results say so).
Baselines on the same model and data: the base model (no adapter), Local (each client alone), FedIT
(one federated adapter), Centralized (one adapter on the pooled data).

Beyond the paper, a calibrated dynamic weight (the "-calibrated" rows): the paper's lambda ranks
instances well but moves little (cosines of these representations all sit near 1), so every instance
gets the local adapter at about s / 2. The calibrated weight uses only what a client has, its own
training instructions and public text: representations centred on the mean of generic instructions
this file ships, the top-k similarity to M of the client's instructions, and a scale set by the
client's own instructions' leave-one-out similarities, so that lambda spans [0, s].

Top to bottom: the methods (one table); the recipe and the mix; the client steps; the training
phases (one table), each phase's clients, schedule and result, and run_phase; the paper's dynamic
weight and the calibrated one. Not here: the LoRA layers (lora.py), the round loop, local training,
FedAvg and the seeds (fed.py), scoring (evaluation.py), checkpoints and resume (runs.py), speed (fast.py).
"""
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F

import lora
from data import encode_prompt, pad_left
from fed import DP, Client, Federation, LocalTrain, Update, averaging, in_process, run_rounds, sample_clients, seeded, train_adapter


@dataclass(frozen=True)
class Method:
    """A row of the comparison: the training phase whose adapters it is evaluated with, and how it
    mixes them at inference (evaluation.evaluate_client reads `mixing`)."""
    phase: str | None     # None: the base model, no adapter
    mixing: str           # one of MIXINGS
    shared: bool = False  # one model for every client (no local adapter): evaluated once

    def __post_init__(self):
        if self.mixing not in MIXINGS:
            raise ValueError(f"unknown mixing {self.mixing!r}; choose from {', '.join(MIXINGS)}")


# How a method mixes its adapters at inference (its mixing): "none" (the base model); "global" or "local" alone;
# "fixed", the training mix a for every instance (the paper's ablation); "paper", the paper's
# instance-wise dynamic weight; "calibrated", the calibrated dynamic weight (beyond the paper, below);
# "oracle", the training mix on the client's own task and the global adapter alone on the others: it
# reads the test instance's task, so it is a bound on any mixing rule, not a method; "sum", both adapters
# at weight 1 (the rule most follow-up work on dual adapters uses).
MIXINGS = ("none", "global", "local", "fixed", "paper", "calibrated", "oracle", "sum")

# Every method, in the table's order. Adding a method is one entry here.
METHODS = {
    "base": Method(None, "none", shared=True),
    "local": Method("local", "local"),
    "fedit": Method("fedit", "global", shared=True),
    "centralized": Method("centralized", "global", shared=True),
    "feddpa-f": Method("feddpa-f", "paper"),
    "feddpa-f-fixed": Method("feddpa-f", "fixed"),
    "feddpa-f-calibrated": Method("feddpa-f", "calibrated"),
    "feddpa-f-oracle": Method("feddpa-f", "oracle"),
    "feddpa-t": Method("feddpa-t", "paper"),
    "feddpa-t-fixed": Method("feddpa-t", "fixed"),
    "feddpa-t-calibrated": Method("feddpa-t", "calibrated"),
    "feddpa-t-oracle": Method("feddpa-t", "oracle"),
    # not for FedDPA-F: its local adapter is a fine-tuned copy of its global one, which a sum counts twice
    "feddpa-t-sum": Method("feddpa-t", "sum"),
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
    calibration_refs: int = 40      # M training instructions per client for the calibrated weight
    pool: str = "last"              # instance representation: 'last' prompt token or 'mean'
    similarity: str = "cosine"      # sim of the paper's lambda: 'cosine', 'l2' or 'pearson' (similarity)
    lambda_to: str = "local"        # which adapter gets lambda; 'global' is what the official code does
    weighting: str = "count"        # FedAvg's weights: by example count, or 'uniform'
    dp: DP | None = None            # client-level DP-FedAvg on the global adapter (the phases marked dp), or none
    seed: int = 0


def mix(lam, to: str = "local") -> dict:
    """The two adapters' weights when adapter `to` gets lam (a float or a (batch,) tensor) and the other
    1 - lam: the only way the two are ever mixed, in training and in evaluation."""
    other = "global" if to == "local" else "local"
    return {to: lam, other: 1 - lam}


# ----------------------------------------------------------------------------------------------
# Client steps: what one selected client does in one round, given the global adapter it received.
# They return the Update message (global adapter + example count), the client's local adapter (which
# it keeps: None where it has none) and local metrics. The model holds nothing between them.

def fedit_step(model, pad_id, train: LocalTrain, *, recipe=None, start=None):
    """FedIT (plain federated LoRA) and FedDPA-T's round 0: train the global adapter alone."""
    def step(round_, client: Client, global_adapter):
        trained, metrics = train_adapter(model, client, adapters={"global": global_adapter}, weights={"global": 1.0},
                                         trains="global", train=train, pad_id=pad_id)
        return Update(trained, len(client.data)), client.local, metrics
    return step


def fresh_local(model, seed: int, client_id: int) -> dict:
    """A client's own initial local adapter for FedDPA-T, as the official code adds one per client at its
    first local round: A kaiming-uniform from the client's seeded draw, B = 0."""
    return lora.new_adapter(model, seeded(seed, "fresh local adapter", client_id))


def feddpa_t_step(model, pad_id, train: LocalTrain, *, recipe: "Recipe", start=None):
    """FedDPA-T (iterative learning): local adapter with the frozen global one mixed in (recipe.local_weight),
    then the global alone."""
    global_step = fedit_step(model, pad_id, train)
    local_weight, seed = recipe.local_weight, recipe.seed

    def step(round_, client: Client, global_adapter):
        if round_ == 0:
            return global_step(round_, client, global_adapter)
        start = client.local if client.local is not None else fresh_local(model, seed, client.id)
        local, lm = train_adapter(model, client, adapters={"global": global_adapter, "local": start},
                                  weights=mix(local_weight), trains="local", train=train, pad_id=pad_id)
        update, _, gm = global_step(round_, client, global_adapter)
        return update, local, {"loss": (lm["loss"] + gm["loss"]) / 2, "local_loss": lm["loss"], "global_loss": gm["loss"],
                               "steps": lm["steps"] + gm["steps"], "examples": lm["examples"] + gm["examples"]}
    return step


def local_step(model, pad_id, train: LocalTrain, *, recipe=None, start: dict | None = None):
    """Train the client's own adapter alone; nothing is sent (an empty Update). Used for FedDPA-F's
    second stage (start = the final global adapter, one round) and the Local baseline (start = the
    initial adapter, R rounds). The adapter carries over between rounds."""
    def step(round_, client: Client, global_adapter):
        local, metrics = train_adapter(model, client, adapters={"local": client.local if client.local is not None else start},
                                       weights={"local": 1.0}, trains="local", train=train, pad_id=pad_id)
        return Update({}, len(client.data)), local, metrics
    return step


# ----------------------------------------------------------------------------------------------
# Training phases: each is one federated run (fed.run_rounds) of some clients with one client step.

@dataclass(frozen=True)
class PhaseSpec:
    """A training phase: the client step its clients take, the adapter it starts from, and its schedule."""
    client_step: Callable          # fedit_step, feddpa_t_step or local_step: (model, pad_id, train, *, recipe, start) -> step
    starts_from: str | None = None # a phase whose final global adapter it starts from and keeps as its own; None: init
    sends: bool = True             # the server sends the global adapter (Local's clients train alone)
    finetune: bool = False         # one round of recipe.finetune_rounds' local training, every client (FedDPA-F)
    pooled: bool = False           # one client holding all the data, as many optimizer steps as all (Centralized)
    dp: bool = False               # its clients send a trained global adapter back: DP-FedAvg applies (recipe.dp)
    note: str = ""                 # said after its schedule in the run's "work ahead" line


# Every training phase, in the order they run. Adding a phase is one entry here.
PHASES = {
    "fedit": PhaseSpec(fedit_step, dp=True),
    "feddpa-f": PhaseSpec(local_step, starts_from="fedit", finetune=True),  # fine-tunes a copy of FedIT's
    "feddpa-t": PhaseSpec(feddpa_t_step, dp=True, note=", two adapters from round 2"),
    "local": PhaseSpec(local_step, sends=False),         # sampled as FedIT is: the same clients and rounds
    "centralized": PhaseSpec(fedit_step, pooled=True),
}


def phases_of(method: str) -> list:
    """The training phases `method` needs, in the order they run."""
    phase = METHODS[method].phase
    return [] if phase is None else [p for p in (PHASES[phase].starts_from, phase) if p]


@dataclass
class Phase:
    """A training phase set up to run."""
    clients: list          # fed.Client, each with its own seeded data order
    step: Callable         # the client step
    rounds: int
    fraction: float        # clients sampled per round
    start: dict            # the global adapter sent in round 0 ({}: none is sent)
    seed: int              # the clients drawn each round, and the phase's dropout draws
    weighting: str         # FedAvg's (recipe.weighting)
    dp: DP | None = None   # DP-FedAvg's settings, where it applies (PhaseSpec.dp and recipe.dp)


def scaled(train: LocalTrain, factor: float) -> LocalTrain:
    return replace(train, epochs=train.epochs * factor, max_steps=round(train.max_steps * factor))


def phase_schedule(spec: PhaseSpec, recipe: Recipe, n_clients: int) -> tuple:
    """(rounds, fraction of its clients sampled per round, local training) of a phase on n_clients clients."""
    if spec.finetune:
        return 1, 1.0, scaled(recipe.train, recipe.finetune_rounds)
    if spec.pooled:  # the same total number of optimizer steps as the clients' (an epoch budget: its pooled data's)
        return recipe.rounds, 1.0, scaled(recipe.train, n_clients) if recipe.train.max_steps else recipe.train
    return recipe.rounds, recipe.fraction, recipe.train


def setup_phase(name: str, model, *, pad_id: int, recipe: Recipe, datasets: dict, init: dict, trained: dict) -> Phase:
    """Phase `name` on the clients' encoded datasets ({client id: examples}: a client's id names its
    seeds, so a client is the same in a run of a subset of the clients), every adapter starting from
    init; trained holds the phases already run ({phase: {"global": adapter, "locals": [...]}}): FedDPA-F
    starts from FedIT's."""
    spec = PHASES[name]
    start = trained[spec.starts_from]["global"] if spec.starts_from else init
    sets = {0: [e for d in datasets.values() for e in d]} if spec.pooled else datasets
    clients = [Client(i, d, seeded(recipe.seed, name, "client", i)) for i, d in sets.items()]
    rounds, fraction, train = phase_schedule(spec, recipe, len(datasets))
    step = spec.client_step(model, pad_id, train, recipe=recipe, start=start)
    return Phase(clients, step, rounds, fraction, start if spec.sends else {}, recipe.seed, recipe.weighting,
                 recipe.dp if spec.dp else None)


def schedule(name: str, recipe: Recipe, n_clients: int) -> str:
    """The work of phase `name` in words, for the line that states a run's work ahead."""
    spec = PHASES[name]
    rounds, fraction, t = phase_schedule(spec, recipe, n_clients)
    k = max(1, round(fraction * (1 if spec.pooled else n_clients)))  # as fed.sample_clients draws them
    work = (f"{t.max_steps} step{'s' * (t.max_steps != 1)}" if t.max_steps
            else f"{t.epochs:g} epoch{'s' * (t.epochs != 1)}")
    return f"{rounds} round{'s' * (rounds != 1)} x {k} client{'s' * (k != 1)} x {work}{spec.note}"


def phase_result(name: str, global_adapter: dict, clients: list, *, trained: dict) -> dict:
    """What a finished phase leaves for evaluation: its global adapter (a phase that starts from another's
    keeps that one's: FedDPA-F's is FedIT's) and each client's local adapter (None where it trained none)."""
    spec = PHASES[name]
    return {"global": trained[spec.starts_from]["global"] if spec.starts_from else global_adapter,
            "locals": [c.local for c in clients]}


def run_phase(name: str, phase: Phase, *, federation=None, train_round=None, on_round_end=None,
              progress: bool = False) -> Federation:
    """Phase `name` end to end: its rounds of fed.run_rounds, each chosen client taking phase.step in this
    process (or reached by train_round elsewhere: over Flower), FedAvg with phase.weighting. federation:
    the state of a resumed phase (runs.py restores its clients' generators). on_round_end(federation)
    after every round (runs.py: the checkpoint). With phase.dp, the server's step is DP-FedAvg (fed.averaging).
    Returns the federation; phase_result says what it leaves for evaluation."""
    federation = federation or Federation(phase.start, len(phase.clients))
    reach = train_round or in_process(phase.clients, phase.step, progress)
    def sample(n, round_):  # the clients of a round: a seeded draw of a fraction of them
        return sample_clients(n, phase.fraction, seed=phase.seed, round_=round_)
    aggregate = averaging(phase.weighting, phase.dp, seed=phase.seed, stream=(name,))
    return run_rounds(federation, reach, rounds=phase.rounds, sample=sample, aggregate=aggregate,
                      on_round_end=on_round_end, progress=name if progress else None)


# ----------------------------------------------------------------------------------------------
# Instance-wise dynamic weighting mechanism (inference)

def prompt_batches(tok, records, batch_size, *, cutoff=512):
    """Encoded, left-padded prompts in batches of similar length; yields (indices, ids, mask)."""
    enc = [encode_prompt(tok, r, cutoff) for r in records]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask = pad_left([enc[i] for i in idx], tok.pad_id)
        yield idx, ids, mask


@torch.no_grad()
def represent(model, ids, mask, *, pool):
    """r(x): the instruction's representation with only the local adapter active, (B, dim); the
    caller's mix is untouched."""
    with lora.mixed(model, {"local": 1.0}):
        return model.pooled(ids, mask, pool)


def draw_references(records, k: int, *, seed: int, client_id: int) -> list:
    """The K training instructions a client compares test instances with: drawn once, seeded."""
    order = torch.randperm(len(records), generator=seeded(seed, "references", client_id))
    return [records[i] for i in order[:k].tolist()]


@torch.no_grad()
def reference_reps(model, tok, refs, *, pool, device, cutoff=512) -> torch.Tensor:
    """Cached representations of the client's reference instructions, (K, dim); local adapter loaded."""
    reps = torch.empty(len(refs), model.config.dim, device=device, dtype=precise(model.lm_head.weight.dtype))
    for idx, ids, mask in prompt_batches(tok, refs, len(refs), cutoff=cutoff):
        reps[idx] = represent(model, ids.to(device), mask.to(device), pool=pool).to(reps.dtype)
    return reps


def precise(dtype):
    """The dtype lambda is computed in: float32, or float64 for a float64 model (the same on any CPU)."""
    return torch.promote_types(dtype, torch.float32)


SIMILARITIES = ("cosine", "l2", "pearson")


def similarity(a, b, kind: str = "cosine"):
    """sim(a, b) of the paper's similarity-metric ablation, row by row, (B, 1, dim) with (1, K, dim) -> (B, K):
      cosine   a.b / (|a| |b|), in [-1, 1] (the paper's choice)
      pearson  the correlation of a's and b's coordinates: the cosine of a - mean(a) and b - mean(b), in [-1, 1]
      l2       1 - |a - b| / (|a| + |b|), in [0, 1]: 1 where a = b, 0 where they point opposite ways. It
               reads the raw representations, norms included (a distance on unit vectors would only
               re-rank the cosine), and the triangle inequality keeps it in [0, 1] at any scale.
    Each then enters lambda as the cosine does: clamp(scale * mean_k sim, 0, 1)."""
    if kind == "cosine":
        return F.cosine_similarity(a, b, dim=-1)
    if kind == "pearson":
        return F.cosine_similarity(a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True), dim=-1)
    if kind == "l2":
        return 1 - (a - b).norm(dim=-1) / (a.norm(dim=-1) + b.norm(dim=-1)).clamp_min(torch.finfo(a.dtype).tiny)
    raise ValueError(f"unknown similarity {kind!r}; choose from {', '.join(SIMILARITIES)}")


def dynamic_lambda(reps, ref_reps, scale: float, *, kind: str = "cosine"):
    """lambda = clamp(scale * mean_k sim(r(x), r(x_k)), 0, 1), per instance: (B, dim), (K, dim) -> (B,)."""
    sim = similarity(reps.to(ref_reps.dtype)[:, None, :], ref_reps[None, :, :], kind)  # (B, K)
    return (scale * sim.mean(-1)).clamp(0.0, 1.0)


def paper_weight(model, tok, records, *, recipe: Recipe, client_id: int, device, cutoff=512) -> "PaperWeight":
    """A client's dynamic weight as the paper has it, from K of its training instructions (drawn once,
    seeded); its local adapter must be loaded."""
    refs = draw_references(records, recipe.k_refs, seed=recipe.seed, client_id=client_id)
    return PaperWeight(reference_reps(model, tok, refs, pool=recipe.pool, device=device, cutoff=cutoff),
                       recipe.lambda_scale, recipe.pool, recipe.lambda_to, recipe.similarity)


@dataclass
class PaperWeight:
    """A client's dynamic weight: its cached reference representations and how lambda is applied."""
    ref_reps: torch.Tensor     # (K, dim)
    scale: float               # lambda_scale
    pool: str
    to: str                    # the adapter that gets lambda
    similarity: str = "cosine"

    def lam(self, r):
        """lambda per instance, (B,), from the instances' representations r (B, dim) = represent(...)."""
        return dynamic_lambda(r, self.ref_reps, self.scale, kind=self.similarity)


# ----------------------------------------------------------------------------------------------
# The calibrated dynamic weight (beyond the paper)

GENERIC_INSTRUCTIONS = (  # public text, no client's: the centre of instruction representations
    "Write a short story about a dragon who is afraid of the dark.", "Summarize the following paragraph in one sentence.",
    "Translate the sentence into French: I would like a cup of tea.", "List three benefits of regular exercise.",
    "Explain how a rainbow forms.", "Write a haiku about autumn leaves.", "What is the capital of Australia?",
    "Give me a recipe for pancakes.", "Convert 100 degrees Fahrenheit to Celsius.",
    "Write an email asking a colleague for a meeting next week.", "Describe the water cycle to a ten-year-old.",
    "Suggest a name for a new coffee shop.", "Correct the grammar: she dont like apples.",
    "Write a Python function that reverses a string.", "What are the main causes of climate change?",
    "Compose a limerick about a cat.", "Give two arguments for and against school uniforms.",
    "How many legs does a spider have?", "Rewrite this sentence in the passive voice: The dog chased the ball.",
    "Plan a three-day trip to Rome.", "Define the word 'ephemeral'.", "Write a tweet announcing a product launch.",
    "Sort these numbers from smallest to largest: 7, 2, 9, 4.", "Explain the difference between weather and climate.",
)


def top_k_similarity(c, refs, k: int):
    """Mean of the k largest cosines of each unit row of c (B, dim) with the unit rows of refs (M, dim): (B,)."""
    return (c @ refs.T).topk(k, dim=-1).values.mean(-1)


@dataclass
class Calibrated:
    """lambda(x) = s * clamp((sim(x) - lo) / (mid - lo), 0, 1), sim(x) = top_k_similarity of the centred,
    normalised r(x) to the client's M references. mid is the median of the references' own leave-one-out
    similarities, lo as far below their minimum as mid is above it: instances as typical of the client's
    data as its own instructions get s, instances unlike any of them 0."""
    centre: torch.Tensor       # (dim,) mean representation of GENERIC_INSTRUCTIONS
    refs: torch.Tensor         # (M, dim) centred, unit-norm representations of the client's references
    k: int
    lo: float
    mid: float
    scale: float
    pool: str
    to: str

    def lam(self, r):
        """lambda per instance, (B,), from the instances' representations r (B, dim) = represent(...)."""
        c = F.normalize(r.to(self.centre.dtype) - self.centre, dim=-1)
        unit = ((top_k_similarity(c, self.refs, self.k) - self.lo) / (self.mid - self.lo)).clamp(0.0, 1.0)
        return (self.scale * unit).clamp(max=1.0)  # (B,); as the paper's, never above 1


def calibrated(model, tok, records, *, recipe: Recipe, client_id: int, device, cutoff=512) -> Calibrated:
    """A client's calibrated weight, from M of its training instructions (drawn once, seeded) and the
    generic instructions; its local adapter must be loaded."""
    refs = draw_references(records, min(recipe.calibration_refs, len(records)), seed=recipe.seed, client_id=client_id)
    k = max(1, min(recipe.k_refs, len(refs) - 1))
    generic = [{"instruction": g} for g in GENERIC_INSTRUCTIONS]
    centre = reference_reps(model, tok, generic, pool=recipe.pool, device=device, cutoff=cutoff).mean(0)
    unit = F.normalize(reference_reps(model, tok, refs, pool=recipe.pool, device=device, cutoff=cutoff) - centre, dim=-1)  # (M, dim)
    loo = unit @ unit.T                                                    # (M, M)
    loo.fill_diagonal_(-2.0)                                               # leave each one out
    own = loo.topk(k, dim=-1).values.mean(-1) if len(refs) > 1 else torch.ones(1)
    mid, low = own.median().item(), own.min().item()
    lo = 2 * low - mid if mid > low else mid - 1e-3
    return Calibrated(centre, unit, k, lo, mid, recipe.lambda_scale, recipe.pool, recipe.lambda_to)
