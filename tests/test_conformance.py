"""Conformance vectors for ports (JAX, MLX, ...): tests/conformance.json, and the test that holds this
implementation to them.

CASE is a tiny fixed model and data that any port can build without torch's random numbers: every
weight is given by a formula of its position (weight()), the data are token ids, every batch is a
client's whole data set (so the shuffled order does not matter), dropout is 0, every client takes part
in every round, FedDPA-T's fresh local adapters are given by the same kind of formula. compute()
runs this implementation on it, in float64: the loss and gradient norm of one step, every adapter after
every method's training, lambda of a few instances with either pooling, the scores, P and TTP of a
tiny evaluation. tools/record_conformance.py writes its output; docs/conformance.md says how a port
reproduces them and within what.
"""
import json
import math

import torch

import evaluation
import fed
import feddpa
import lora
from model import IGNORE_INDEX, Llama, ModelConfig

VECTORS = __import__("pathlib").Path(__file__).resolve().parent / "conformance.json"
RTOL = 1e-10  # float64, another summation order: ~1e-15 relative

CASE = {
    "model": dict(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=16, hidden_dim=12, norm_eps=1e-5,
                  rope_theta=10000.0, max_seq_len=32, tie_embeddings=False, bos_id=1, eos_id=2),
    "pad_id": 0,
    "lora": dict(targets=["q_proj", "v_proj"], r=2, lora_alpha=4.0),
    "train": dict(lr=0.01, max_steps=2, batch_size=3, micro_batch_size=3, max_grad_norm=1.0),
    "rounds": 2, "local_weight": 0.3, "lambda_scale": 0.5,
    # two clients, three examples each: a prompt (label -100) and a response; left-padded in batches
    "clients": [[([1, 5, 6, 7], [8, 9, 2]), ([1, 5, 7], [9, 2]), ([1, 6, 6, 5, 7], [8, 2])],
                [([1, 10, 11], [12, 13, 2]), ([1, 11, 10, 11], [13, 2]), ([1, 10, 12, 11], [14, 12, 2])]],
    "instances": [[1, 10, 11], [1, 10, 11, 12], [1, 5, 6], [1, 11, 12, 10, 13]],  # prompts whose lambda is given
    # a tiny evaluation: client i's answers to every task's references; client i's own task is task i
    "answers": [{"a": ["the cat sat", "yes"], "b": ["no", "a dog ran far"]},
                {"a": ["the cat", "no"], "b": ["no", "a dog ran"]}],
    "references": {"a": ["the cat sat", "yes"], "b": ["yes", "a dog ran"]},
}


def weight(shape, k: int, scale: float, offset: float = 0.0) -> torch.Tensor:
    """The k-th tensor of a sorted list, element j (row-major): offset + scale * sin(0.7 j + k)."""
    j = torch.arange(math.prod(shape), dtype=torch.float64)
    return (offset + scale * torch.sin(0.7 * j + k)).view(shape)


def base_model() -> Llama:
    """The base: matrices sin-valued / sqrt(in), norm weights 1 + 0.1 sin, tensors numbered in sorted name order."""
    model = Llama(ModelConfig(**CASE["model"])).double()
    state = model.state_dict()
    model.load_state_dict({name: weight(t.shape, k, 0.1, 1.0) if t.dim() == 1 else weight(t.shape, k, 1 / math.sqrt(t.shape[-1]))
                           for k, (name, t) in enumerate(sorted(state.items()))})
    return model.eval()


def adapter(model, k0: int) -> dict:
    """An initial adapter: each lora_A (sorted keys, numbered from k0) 0.3 sin / sqrt(in), each lora_B 0."""
    shapes = {k: v.shape for k, v in lora.get_adapter(model, "global").items()}
    return {key: weight(s, k0 + k, 0.3 / math.sqrt(s[-1])) if "lora_A" in key else torch.zeros(s, dtype=torch.float64)
            for k, (key, s) in enumerate(sorted(shapes.items()))}


def examples(client):
    return [{"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r} for p, r in client]


def plain(state: dict) -> dict:
    return {k: v.flatten().tolist() for k, v in sorted(state.items())}


def compute() -> dict:
    """Every vector of CASE, computed by this implementation."""
    model = base_model()
    lora.inject(model, CASE["lora"]["targets"], r=CASE["lora"]["r"], lora_alpha=CASE["lora"]["lora_alpha"], dropout=0.0,
                dtype=torch.float64).eval()
    init = adapter(model, 0)
    datasets = [examples(c) for c in CASE["clients"]]
    pad = CASE["pad_id"]
    out = {}

    # one step's loss and gradient norm (before clipping): client 0's batch, the global adapter at init with
    # B = 1 sin-valued, so that every tensor of it has a gradient
    start = {k: v if "lora_A" in k else weight(v.shape, 50 + i, 0.2) for i, (k, v) in enumerate(sorted(init.items()))}
    lora.load_adapter(model, "global", start)
    ids, mask, labels = fed.collate(datasets[0], pad)
    with lora.mixed(model, {"global": 1.0}), lora.training(model, "global", torch.Generator().manual_seed(0)) as params:
        loss = model(ids, mask, labels)[1]
        loss.backward()
        grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)).item()
        for p in params:
            p.grad = None
    out["step"] = {"start": plain(start), "loss": loss.item(), "grad_norm": grad_norm}

    # every method's adapters after CASE["rounds"] rounds; FedDPA-T's fresh local adapters as CASE gives them
    fresh = [adapter(model, 100 * (i + 1)) for i in range(len(datasets))]
    real_fresh = feddpa.fresh_local
    feddpa.fresh_local = lambda model_, seed, client_id: fresh[client_id]
    try:
        recipe = feddpa.Recipe(train=fed.LocalTrain(**CASE["train"]), rounds=CASE["rounds"], local_weight=CASE["local_weight"],
                               lambda_scale=CASE["lambda_scale"])
        trained = {}
        for name in feddpa.PHASES:
            phase = feddpa.setup_phase(name, model, pad_id=pad, recipe=recipe, datasets=dict(enumerate(datasets)), init=init, trained=trained)
            federation = feddpa.run_phase(name, phase)
            trained[name] = feddpa.phase_result(name, federation.global_adapter, phase.clients, trained=trained)
    finally:
        feddpa.fresh_local = real_fresh
    out["init"] = plain(init)
    out["fresh_locals"] = [plain(f) for f in fresh]
    out["adapters"] = {name: {"global": plain(r["global"]) if r["global"] else None,
                              "locals": [None if a is None else plain(a) for a in r["locals"]]} for name, r in trained.items()}

    # lambda of each instance for client 1's FedDPA-T adapters, its whole data's prompts the references
    lora.load_adapter(model, "global", trained["feddpa-t"]["global"])
    lora.load_adapter(model, "local", trained["feddpa-t"]["locals"][1])
    refs = feddpa.pad_left([p for p, _ in CASE["clients"][1]], pad)
    inst = feddpa.pad_left(CASE["instances"], pad)
    out["lambda"] = {pool: feddpa.dynamic_lambda(feddpa.represent(model, *inst, pool=pool),
                                                 feddpa.represent(model, *refs, pool=pool), CASE["lambda_scale"]).tolist()
                     for pool in ("last", "mean")}

    # the scores of the tiny evaluation, P and TTP
    # the paper's scores (each instance's ROUGE-1, which paired intervals resample, is not a vector)
    per_client = [{t: {k: v for k, v in evaluation.score(a[t], CASE["references"][t]).items() if k != "rouge1_each"}
                   for t in CASE["references"]} for a in CASE["answers"]]
    out["scores"] = {"per_client": per_client, **evaluation.p_and_ttp(per_client, list(CASE["references"]))}
    return out


def mismatches(got, want, path=""):
    """Where got and want differ: floats by more than RTOL of the largest value of their list (or of themselves)."""
    if isinstance(want, dict):
        assert set(got) == set(want), path
        return [m for k in want for m in mismatches(got[k], want[k], f"{path}/{k}")]
    if isinstance(want, list):
        assert len(got) == len(want), path
        scale = max([abs(x) for x in want if isinstance(x, float)] or [0.0])
        if scale:
            return [f"{path}[{i}]: {a} != {b}" for i, (a, b) in enumerate(zip(got, want)) if abs(a - b) > RTOL * scale]
        return [m for i, (a, b) in enumerate(zip(got, want)) for m in mismatches(a, b, f"{path}[{i}]")]
    if isinstance(want, float):
        return [f"{path}: {got} != {want}"] * (abs(got - want) > RTOL * max(abs(want), 1e-300))
    return [f"{path}: {got!r} != {want!r}"] * (got != want)


def test_this_implementation_reproduces_the_conformance_vectors():
    """compute() against tests/conformance.json, every float within RTOL; and the vectors say something:
    every method's adapters trained, the two adapters of FedDPA-T differ, lambda is not constant."""
    recorded = json.loads(VECTORS.read_text())
    assert recorded["case"] == json.loads(json.dumps(CASE)), "CASE changed: python -m tools.record_conformance"
    got = compute()
    problems = mismatches(got, recorded["vectors"])
    assert not problems, f"{len(problems)} mismatches, first: " + "; ".join(problems[:5])
    for name, r in got["adapters"].items():
        for a in [r["global"], *r["locals"]]:
            if a is not None:
                assert any(x != y for k in a for x, y in zip(a[k], got["init"][k])), name
    t = got["adapters"]["feddpa-t"]
    assert t["locals"][1] != t["global"] and max(got["lambda"]["last"]) - min(got["lambda"]["last"]) > 1e-4
