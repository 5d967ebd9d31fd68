"""LoRA by hand, by composition around a frozen nn.Linear, with FedDPA's two named adapters.

LoRA (Hu et al., 2022) adds a low-rank update to a frozen weight: y = W x + (lora_alpha / r) * B A x, with
A (r, in) kaiming-uniform and B (out, r) zero, so training starts from the base model exactly.
FedDPA (Yang et al., 2024) keeps two such updates per layer, a *global* adapter that
the server averages and a *local* one that never leaves the client, and mixes them:

    y = W x + sum_name w_name * (lora_alpha / r) * B_name A_name dropout(x)

where the weights {name: w} are the mix (feddpa.mix says which mix each method uses). Each w is a
float or a (batch,) tensor, so instance-wise weights apply per example inside one batch. Exactly one
adapter (or none) trains at a time; the others contribute under no-grad, as the paper's code detaches them.

The adapters and the mix are inputs of every forward pass, given at the call: `with using(model,
{"global": g, "local": l}, weights): model(...)` loads the adapters into their slots and puts the mix
on the layers for the block only, and restores what was there before, so no function ever reads an
adapter or a mix that another left behind; outside any block the layers add no adapter (the base model
alone). A functional port (JAX, MLX) passes the adapters and `weights` as arguments of the forward
function instead, down to each LoRA layer. `mixed(model, weights)` scopes a mix alone (inside a
`using` block), and `training(model, name)` which adapter trains, and training mode, the same way.

Parameter names follow peft's layout (`q_proj.base_layer`, `q_proj.lora_A.<adapter>.weight`), and an
adapter's state dict drops the adapter name, so a global adapter can be loaded as a local one.
Not here: which adapter trains when, and with which mix (fed.py, feddpa.py).
"""
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import state_mismatch

ADAPTERS = ("global", "local")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Dropout(nn.Module):
    """Inverted dropout (kept units scale by 1 / (1 - p)): in training each unit is dropped independently
    with probability p, drawn from `generator`, the training client's own, which lora.training sets for
    its block (so a client's draws do not depend on which clients trained before it).

    The draws are the gaps between drops: in a sequence of Bernoulli(p) trials they are independent
    Geometric(p), so about p * numel draws give exactly the distribution of numel (20x fewer at p = 0.05;
    a CPU draws one number per ~2.5 ns, and one per unit would cost a small model's LoRA step as much as
    its matmuls). The masks are those of the whole padded batch, so fast.py, which runs a layer on the
    real tokens only, drops the same units (mask(), then its rows).
    """
    sigmas = 4.0  # gaps drawn at first beyond the expected count, in standard deviations of the drop count

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.generator = None  # set by lora.training for its block

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        return x * self.mask(x.shape, x.dtype).to(x.device)

    def mask(self, shape, dtype):
        """A tensor of `shape`: 0 where a unit drops, 1 / (1 - p) where it is kept (on the CPU)."""
        if self.generator is None:
            raise RuntimeError("LoRA dropout draws from the training client's generator: train inside lora.training")
        p, n = self.p, math.prod(shape)
        drops, end = [], 0                    # end: the first position not yet decided
        while end < n:
            k = max(1, int((n - end) * p + self.sigmas * math.sqrt((n - end) * p)) + 1)
            at = end - 1 + torch.empty(k, dtype=torch.long).geometric_(p, generator=self.generator).cumsum(0)
            drops.append(at)                  # (k,) increasing drop positions
            end = int(at[-1]) + 1
        at = torch.cat(drops)
        keep = torch.full((n,), 1 / (1 - p), dtype=dtype)
        return keep.index_fill_(0, at[at < n], 0).view(shape)


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, *, names=ADAPTERS, r: int = 8, lora_alpha: float = 16, dropout: float = 0.05,
                 dtype=None):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.base_layer = base.requires_grad_(False)
        self.scaling = lora_alpha / r
        # dtype: the adapters' own (default the base's); a bfloat16 base keeps float32 adapters, which train
        dev, dt = base.weight.device, dtype or base.weight.dtype
        self.lora_A = nn.ModuleDict({n: nn.Linear(base.in_features, r, bias=False, device=dev, dtype=dt) for n in names})
        self.lora_B = nn.ModuleDict({n: nn.Linear(r, base.out_features, bias=False, device=dev, dtype=dt) for n in names})
        self.lora_dropout = nn.ModuleDict({n: Dropout(dropout) for n in names})
        for n in names:
            self.reset(n)
        self.weights = {}                       # the mix, set only inside lora.mixed: floats or (batch,) tensors

    def reset(self, name: str, generator=None):
        # A as nn.Linear's default (kaiming-uniform, a=sqrt(5)), as peft does; B = 0 so the update starts at 0
        with torch.no_grad():
            self.lora_A[name].weight.uniform_(-self.a_bound(), self.a_bound(), generator=generator)
            self.lora_B[name].weight.zero_()

    def a_bound(self) -> float:
        return 1 / math.sqrt(self.base_layer.in_features)

    def forward(self, x):                                   # x: (B, T, in)
        out = self.base_layer(x)                            # (B, T, out)
        for name, w in self.weights.items():
            if torch.is_tensor(w) or w != 0:
                out = out + self.update(name, w, x, dropout=self.lora_dropout[name]).to(out.dtype)
        return out

    def update(self, name: str, w, x, *, dropout):
        """Adapter `name`'s term w * scaling * B A dropout(x), (..., out); w a float or (B,) per example."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight   # (r, in), (out, r)
        # an adapter that is not training is a constant here: no graph, no gradient
        with torch.set_grad_enabled(torch.is_grad_enabled() and A.requires_grad):
            h = F.linear(dropout(x.to(A.dtype)), A)         # (B, T, r)
            if torch.is_tensor(w):                          # one weight per example: (B,) -> (B, 1, 1)
                if x.dim() != 3 or len(w) != len(x):
                    raise ValueError(f"per-example weights ({len(w)}) need a padded batch (B, T, features) "
                                     f"of as many examples, got input {tuple(x.shape)}")
                w = w.to(h.dtype).view(-1, 1, 1)
            # w * scaling scales the rank-r activations: a pass over r features, not out_features
            return F.linear(h * (w * self.scaling), B)

    def delta_weight(self, name: str):
        """The adapter as a dense update of the base weight, (out, in)."""
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling


# ----------------------------------------------------------------------------------------------
# Whole-model helpers

def inject(model: nn.Module, targets=("q_proj", "v_proj"), *, r: int = 8, lora_alpha: float = 16,
           dropout: float = 0.05, seed: int = 0, dtype=None) -> nn.Module:
    """Freeze the model and wrap every nn.Linear whose attribute name is in targets (the paper: q and v)."""
    bad = set(targets) - set(TARGETS)
    if bad:
        raise ValueError(f"unknown LoRA target(s) {sorted(bad)}; choose from {TARGETS}")
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if attr in targets and isinstance(child, nn.Linear):
                wrapped = LoRALinear(child, r=r, lora_alpha=lora_alpha, dropout=dropout, dtype=dtype).train(model.training)
                for n in ADAPTERS:
                    wrapped.reset(n, gen)
                setattr(parent, attr, wrapped)
    set_trainable(model, None)
    return model


def lora_layers(model: nn.Module):
    return [(path, module) for path, module in model.named_modules() if isinstance(module, LoRALinear)]


def set_trainable(model: nn.Module, name):
    """Make exactly one adapter trainable (or none); the base model never trains."""
    for _, layer in lora_layers(model):
        for n in layer.lora_A:
            layer.lora_A[n].weight.requires_grad_(n == name)
            layer.lora_B[n].weight.requires_grad_(n == name)


@contextmanager
def _swapped(model: nn.Module, new_weights):
    """Every LoRA layer's mix replaced by new_weights(layer) inside the block, and back after it,
    however it ends."""
    layers = [layer for _, layer in lora_layers(model)]
    before = [layer.weights for layer in layers]
    for layer in layers:
        layer.weights = new_weights(layer)
    try:
        yield model
    finally:
        for layer, w in zip(layers, before):
            layer.weights = w


def mixed(model: nn.Module, weights: dict):
    """Forward passes inside the block use the mix {adapter: float or (batch,) tensor}; adapters not
    named get weight 0. The mix that was there before comes back when the block ends, however it ends."""
    return _swapped(model, lambda layer: {n: weights.get(n, 0.0) for n in layer.lora_A})


@contextmanager
def using(model: nn.Module, adapters: dict, weights: dict | None = None):
    """Inside the block the slots named in adapters ({slot: state dict as get_adapter gives}) hold those
    adapters and forward passes use the mix `weights` (None: no adapter); after it, however it ends, every
    slot and the mix hold what they held before. Every adapter the mix weighs must be given, so no
    forward reads an adapter that another function left in a slot."""
    weights = weights or {}
    missing = sorted(n for n, w in weights.items() if n not in adapters and (torch.is_tensor(w) or w != 0))
    if missing:
        raise ValueError(f"the mix weighs adapter(s) {missing} that are not given")
    before = {name: get_adapter(model, name) for name in adapters}
    try:
        for name, state in adapters.items():
            load_adapter(model, name, state)
        with mixed(model, weights):
            yield model
    finally:
        for name, state in before.items():
            load_adapter(model, name, state)


@contextmanager
def training(model: nn.Module, name: str, generator: torch.Generator):
    """Inside the block adapter `name` (only it) trains, in training mode, its dropout drawing from
    `generator` (the client's); after it, the model is back in the mode it had, no adapter trains and
    no dropout holds a generator."""
    was_training = model.training
    dropouts = [d for _, layer in lora_layers(model) for d in layer.lora_dropout.values()]
    set_trainable(model, name)
    model.train()
    for d in dropouts:
        d.generator = generator
    try:
        yield list(adapter_tensors(model, name).values())
    finally:
        model.train(was_training)
        set_trainable(model, None)
        for d in dropouts:
            d.generator = None


def adapter_tensors(model: nn.Module, name: str) -> dict:
    """Adapter `name`'s parameters, keyed without the adapter name: '<layer path>.lora_A.weight'."""
    return {f"{path}.{ab}.weight": getattr(layer, ab)[name].weight
            for path, layer in lora_layers(model) for ab in ("lora_A", "lora_B")}


def new_adapter(model: nn.Module, generator: torch.Generator) -> dict:
    """A freshly initialised adapter as a state dict (A kaiming-uniform from generator's draws, B = 0),
    on the CPU, keyed as adapter_tensors; the model is not touched."""
    out = {}
    for path, layer in lora_layers(model):
        A, B = next(iter(layer.lora_A.values())).weight, next(iter(layer.lora_B.values())).weight
        bound = layer.a_bound()
        out[f"{path}.lora_A.weight"] = torch.empty(A.shape, dtype=A.dtype).uniform_(-bound, bound, generator=generator)
        out[f"{path}.lora_B.weight"] = torch.zeros(B.shape, dtype=B.dtype)
    return out


def get_adapter(model: nn.Module, name: str) -> dict:
    """A copy of one adapter's tensors, keyed as adapter_tensors."""
    return {key: p.detach().clone() for key, p in adapter_tensors(model, name).items()}


def check_adapter(model: nn.Module, state: dict, name: str = "global"):
    """Adapter `name`'s parameters by key; ValueError naming the first tensor of `state` that is missing,
    unexpected or of another shape."""
    own = adapter_tensors(model, name)
    problem = state_mismatch(own, state, "adapter tensor")
    if problem:
        raise ValueError(problem)
    return own


def load_adapter(model: nn.Module, name: str, state: dict):
    """Load get_adapter()'s output into adapter `name`; every tensor must match by name and shape."""
    own = check_adapter(model, state, name)
    with torch.no_grad():
        for key, p in own.items():
            p.copy_(state[key])
