"""An independent statement of FedDPA and its baselines, to hold the project's code against.

Each method is re-implemented here plainly on transformers + peft, the way the official code works:
one PeftModel with two named adapters; the adapter that is not training mixed in detached, with fixed
weights; `set_adapter` to choose what trains; transformers' loss; AdamW with linear decay and gradient
clipping as its Trainer. It shares nothing with feddpa.py, fed.py or lora.py but the data (data.py)
and the initial adapter tensors. With dropout 0 and the same batches in the same order, after 3
rounds of 3 clients every client's global and local adapter must equal the project's, for FedIT,
FedDPA-T, FedDPA-F, Local and Centralized; at inference, each instance's lambda (given to either
adapter) and the answers must equal the oracle's, computed one instance at a time.

test_every_setting_equals_the_oracle then varies, one at a time, every setting a user can choose
(SETTINGS): the mix a, micro-batches, epoch budgets, FedAvg's weights, partial participation,
FedDPA-F's fine-tuning budget, LoRA dropout, beam search, pooling, the adapter lambda goes to.
"""
import hashlib
import json
import math
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import builtin
import data
import fed
import evaluation
import feddpa
import hf
import lora

ROUNDS, STEPS, BATCH, MICRO, LR, CLIP = 3, 2, 4, 2, 2e-3, 0.05  # CLIP small enough to act here
TARGETS, R, ALPHA, A_MIX, SEED, K = ["q_proj", "v_proj", "down_proj"], 4, 8, 0.5, 0, 3
# Both sides in float64. AdamW divides each gradient by its running magnitude, so in float32 a rounding
# difference in a near-zero gradient (one CPU kind's BLAS summation order against another's) becomes a
# sizeable step: the CI machine saw 2.8e-5 where this AMD EPYC saw < 1e-5. In float64 the adapters
# agree to < 5e-7 here, with 1 or 2 threads alike; what is left is transformers computing RoPE's cos
# and sin in float32 even for a float64 model (the logits differ by ~1e-7), not summation order.
DTYPE = torch.float64


class Oracle:
    """LlamaForCausalLM + peft with adapters "global" and "local", mixed as the official LoRA layer does:
    out = W x + sum_name w_name * B_name A_name x * scaling, the branch of the adapter not training detached."""

    def __init__(self, model_dir):
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer
        from transformers import LlamaForCausalLM
        config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)
        self.model = get_peft_model(LlamaForCausalLM.from_pretrained(model_dir, dtype=DTYPE), config,
                                    adapter_name="global")
        self.model.add_adapter("local", config)
        self.weights, self.training = {"global": 1.0}, None
        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                module.forward = self.mixed(module)

    def mixed(self, layer):
        def forward(x, *args, **kwargs):
            out = layer.base_layer(x)
            for name, w in self.weights.items():
                delta = layer.lora_B[name](layer.lora_A[name](x)) * layer.scaling[name]
                out = out + w * (delta if name == self.training else delta.detach())
            return out
        return forward

    def params(self, name):
        """Adapter `name`'s parameters keyed as the project keys adapters: '<layer path>.lora_A.weight'."""
        return {k.removeprefix("base_model.model.").replace(f".{name}.weight", ".weight"): p
                for k, p in self.model.named_parameters() if f".{name}.weight" in k and "lora_" in k}

    def load(self, name, state):
        own = self.params(name)
        assert set(own) == set(state) and all(p.dtype == DTYPE for p in own.values())
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(state[k])

    def get(self, name):
        return {k: p.detach().clone() for k, p in self.params(name).items()}

    def train(self, name, examples, weights, generator, steps, pad_id, batch=BATCH, micro=MICRO):
        """`steps` AdamW steps of adapter `name` alone, the others mixed in with fixed weights; each step
        `batch` examples in forward passes of `micro`, the mean loss of each divided by their number."""
        self.model.set_adapter(name)  # peft: only this adapter requires grad
        self.training, self.weights = name, weights
        params = [p for p in self.model.parameters() if p.requires_grad]
        assert {id(p) for p in params} == {id(p) for p in self.params(name).values()}
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
        order = []
        self.model.train()
        for _ in range(steps):
            while len(order) < batch:  # the client's seeded data order
                order += torch.randperm(len(examples), generator=generator).tolist()
            chosen, order = order[:batch], order[batch:]
            starts = range(0, batch, micro)
            for i in starts:
                ids, mask, labels = data.collate([examples[j] for j in chosen[i:i + micro]], pad_id)
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
                (out.loss / len(starts)).backward()
            torch.nn.utils.clip_grad_norm_(params, CLIP)
            opt.step()
            sched.step()
            opt.zero_grad()
        self.model.eval()
        self.training = None

    def represent(self, prompt, pool="last"):
        """The final normalised hidden state at the prompt's last token ('last') or its mean over the
        prompt's tokens ('mean'), local adapter alone."""
        self.weights = {"local": 1.0}
        with torch.no_grad():
            h = self.model.base_model.model.model(input_ids=torch.tensor([prompt])).last_hidden_state[0]  # (T, dim)
        return h[-1] if pool == "last" else h.mean(0)

    def answer(self, prompt, weights, tok, max_new_tokens, num_beams=1):
        """transformers' greedy decoding or beam search (length penalty 1, no early stopping: its defaults)."""
        self.weights = weights
        x = torch.tensor([prompt])
        with torch.no_grad():
            out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                      do_sample=False, num_beams=num_beams, eos_token_id=tok.eos_id,
                                      pad_token_id=tok.pad_id)
        row = out[0, len(prompt):].tolist()
        return tok.decode(row[:row.index(tok.eos_id)] if tok.eos_id in row else row).strip()


def seeded(*names) -> torch.Generator:
    """The generator of one stream of draws, as a port must seed it (docs/conformance.md): sha256 of the
    JSON list [seed, *names], its first 8 bytes little-endian, less the top bit."""
    digest = hashlib.sha256(json.dumps([SEED, *names]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))


def fedavg(updates):
    """n_k / n-weighted mean of each tensor, A and B separately."""
    total = sum(n for _, n in updates)
    return {k: sum(state[k] * (n / total) for state, n in updates) for k in updates[0][0]}


def oracle_run(model_dir, datasets, init, fresh, pad_id) -> dict:
    """Every method's adapters, computed plainly. fresh[i]: client i's initial FedDPA-T local adapter."""
    o, n = Oracle(model_dir), len(datasets)

    def generators(phase):  # each client's draws in a phase: data order and dropout
        return [seeded(phase, "client", i) for i in range(n)]
    out = {}
    g, glob = generators("fedit"), init                                 # FedIT
    for _ in range(ROUNDS):
        updates = []
        for i, examples in enumerate(datasets):
            o.load("global", glob)
            o.train("global", examples, {"global": 1.0}, g[i], STEPS, pad_id)
            updates.append((o.get("global"), len(examples)))
        glob = fedavg(updates)
    out["fedit"] = {"global": glob, "locals": [None] * n}
    g, locals_ = generators("feddpa-f"), []                             # FedDPA-F: one round of fine-tuning
    for i, examples in enumerate(datasets):
        o.load("local", out["fedit"]["global"])
        o.train("local", examples, {"local": 1.0}, g[i], STEPS, pad_id)
        locals_.append(o.get("local"))
    out["feddpa-f"] = {"global": out["fedit"]["global"], "locals": locals_}
    g, glob, locals_ = generators("feddpa-t"), init, [None] * n          # FedDPA-T
    for r in range(ROUNDS):
        updates = []
        for i, examples in enumerate(datasets):
            o.load("global", glob)
            if r > 0:  # the local adapter with the frozen global one mixed in, then the global alone
                o.load("local", locals_[i] if locals_[i] is not None else fresh[i])
                o.train("local", examples, {"local": A_MIX, "global": 1 - A_MIX}, g[i], STEPS, pad_id)
                locals_[i] = o.get("local")
            o.train("global", examples, {"global": 1.0}, g[i], STEPS, pad_id)
            updates.append((o.get("global"), len(examples)))
        glob = fedavg(updates)
    out["feddpa-t"] = {"global": glob, "locals": locals_}
    g, locals_ = generators("local"), [init] * n                         # Local
    for _ in range(ROUNDS):
        for i, examples in enumerate(datasets):
            o.load("local", locals_[i])
            o.train("local", examples, {"local": 1.0}, g[i], STEPS, pad_id)
            locals_[i] = o.get("local")
    out["local"] = {"global": {}, "locals": locals_}
    g, glob = generators("centralized"), init                            # Centralized: one client, all steps
    pooled = [e for examples in datasets for e in examples]
    for _ in range(ROUNDS):
        o.load("global", glob)
        o.train("global", pooled, {"global": 1.0}, g[0], STEPS * n, pad_id)
        glob = o.get("global")
    out["centralized"] = {"global": glob, "locals": [None]}
    return out


@pytest.fixture(scope="module")
def setting(tiny_dir):
    model = hf.from_pretrained(str(tiny_dir), dtype=DTYPE)
    tok = hf.load_tokenizer(str(tiny_dir), model.config)
    lora.inject(model, TARGETS, r=R, lora_alpha=ALPHA, dropout=0.0, seed=SEED)
    world = builtin.benchmark(seed=0, n_train=10, n_test=3)
    datasets = [[data.encode_example(tok, r) for r in recs] for recs in world.clients[:3]]
    datasets[2] = datasets[2][:7]  # unequal sizes, so that FedAvg's weights matter
    return model.eval(), tok, world, datasets


@pytest.fixture(scope="module")
def runs(setting, tiny_dir):
    """(project's adapters, oracle's adapters) of every method."""
    model, tok, _, datasets = setting
    init = lora.get_adapter(model, "global")
    train = fed.LocalTrain(lr=LR, max_steps=STEPS, batch_size=BATCH, micro_batch_size=MICRO, max_grad_norm=CLIP)
    recipe = feddpa.Recipe(train=train, rounds=ROUNDS, local_weight=A_MIX, finetune_rounds=1.0, seed=SEED)
    ours = {}
    for name in feddpa.PHASES:
        phase = feddpa.setup_phase(name, model, pad_id=tok.pad_id, recipe=recipe, datasets=dict(enumerate(datasets)), init=init,
                                   trained=ours)
        federation = fed.run_rounds(fed.Federation(phase.start, len(phase.clients)), fed.in_process(phase.clients, phase.step),
                                    rounds=phase.rounds,
                                    sample=lambda n, r: fed.sample_clients(n, phase.fraction, seed=SEED, round_=r))
        ours[name] = feddpa.phase_result(name, federation.global_adapter, phase.clients, trained=ours)
    fresh = [feddpa.fresh_local(model, SEED, i) for i in range(len(datasets))]
    return ours, oracle_run(str(tiny_dir), datasets, init, fresh, tok.pad_id), init


def max_diff(a, b):
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("phase", list(feddpa.PHASES))
def test_every_adapter_equals_the_oracle(runs, phase):
    ours, oracle, init = runs
    mine, theirs = ours[phase], oracle[phase]
    if theirs["global"]:
        assert max_diff(mine["global"], init) > 1e-3                   # it trained
        assert max_diff(mine["global"], theirs["global"]) < 1e-5, "global adapter"
    else:
        assert not mine["global"]
    assert len(mine["locals"]) == len(theirs["locals"])
    for i, (a, b) in enumerate(zip(mine["locals"], theirs["locals"])):
        assert (a is None) == (b is None), i
        if a is not None:
            assert max_diff(a, init) > 1e-3
            assert max_diff(a, b) < 1e-5, f"client {i}'s local adapter"


@pytest.mark.parametrize("to", ["local", "global"])
def test_dynamic_weighting_equals_the_oracle_one_instance_at_a_time(setting, runs, tiny_dir, to):
    """Client 1's FedDPA-T model answers two test instances of every task: the project batches them with
    per-example weights; the oracle draws the same K references, represents each instance alone,
    computes lambda and generates that instance alone. The trained adapters get random B added, so that
    the two differ enough for the mix to change the answers of this tiny random model."""
    model, tok, world, _ = setting
    ours, _, _ = runs
    g = torch.Generator().manual_seed(7)
    trained = {name: {k: v + (torch.randn(v.shape, generator=g) * 0.5 if "lora_B" in k else 0) for k, v in adapter.items()}
               for name, adapter in (("global", ours["feddpa-t"]["global"]), ("local", ours["feddpa-t"]["locals"][1]))}
    lora.load_adapter(model, "global", trained["global"])
    lora.load_adapter(model, "local", trained["local"])
    refs = feddpa.draw_references(world.clients[1], K, seed=SEED, client_id=1)
    dynamic = feddpa.PaperWeight(feddpa.reference_reps(model, tok, refs, pool="last", device="cpu"), 0.5, "last", to)
    tests = [recs[i] for recs in world.tests.values() for i in range(2)]
    dec = evaluation.Decode(max_new_tokens=6, num_beams=1, batch_size=8)
    answers, lams = evaluation.answer_dynamic(evaluation.Evaluator(model, tok, dec, "cpu"), tests, dynamic)

    o = Oracle(str(tiny_dir))
    o.load("global", trained["global"])
    o.load("local", trained["local"])
    g = seeded("references", 1)                                         # the client's references, drawn once
    ref_reps = [o.represent(data.encode_prompt(tok, world.clients[1][j]))
                for j in torch.randperm(len(world.clients[1]), generator=g)[:K].tolist()]
    other = "global" if to == "local" else "local"
    for rec, answer, lam in zip(tests, answers, lams):
        prompt = data.encode_prompt(tok, rec)
        rep = o.represent(prompt)
        want = min(max(0.5 * sum(F.cosine_similarity(rep, r, dim=0).item() for r in ref_reps) / K, 0.0), 1.0)
        assert abs(lam - want) < 1e-5
        assert answer == o.answer(prompt, {to: want, other: 1 - want}, tok, dec.max_new_tokens)
    assert len(set(answers)) > 1 and max(lams) - min(lams) > 1e-3


def test_every_method_is_evaluated_with_its_own_adapters_and_mix(setting, tiny_dir):
    """evaluation.evaluate_method for every method and client, against the oracle's answers with the adapters
    and mix the method prescribes: base none; FedIT and Centralized their global adapter; Local the
    client's own local adapter; the -fixed rows the client's local adapter at a and the global at 1 - a;
    FedDPA the dynamic weight. The test outputs are client 0's oracle answers, so each client's scores
    say whose answers it gave."""
    model, tok, world, _ = setting
    g = torch.Generator().manual_seed(11)
    init = lora.get_adapter(model, "global")

    def random_adapter():
        return {k: v + (torch.randn(v.shape, generator=g) * 0.5 if "lora_B" in k else 0) for k, v in init.items()}
    trained = {"fedit": {"global": random_adapter(), "locals": [None] * 3},
               "feddpa-t": {"global": random_adapter(), "locals": [random_adapter() for _ in range(3)]},
               "local": {"global": {}, "locals": [random_adapter() for _ in range(3)]},
               "centralized": {"global": random_adapter(), "locals": [None]}}
    trained["feddpa-f"] = {"global": trained["fedit"]["global"], "locals": [random_adapter() for _ in range(3)]}
    recipe = feddpa.Recipe(local_weight=0.3, k_refs=K, seed=SEED)
    dec = evaluation.Decode(max_new_tokens=5, num_beams=1, batch_size=8)
    tasks = list(world.tests)[:2]
    o = Oracle(str(tiny_dir))

    client_tasks = tasks + tasks[:1]

    def oracle_answers(method, client):
        """The answers of `client` under `method`, one instance at a time."""
        name = method[:len("feddpa-t")] if method.startswith("feddpa") else method
        phase = trained.get(name, {"global": {}, "locals": [None] * 3})
        local = phase["locals"][client] if method not in ("fedit", "centralized", "base") else None
        o.load("global", phase["global"] or init)
        o.load("local", local or init)
        records = world.clients[client]
        order = torch.randperm(len(records), generator=seeded("references", client)).tolist()
        if method.endswith("-calibrated"):  # the calibrated weight, restated
            centre = torch.stack([o.represent(data.encode_prompt(tok, {"instruction": t})) for t in feddpa.GENERIC_INSTRUCTIONS]).mean(0)
            refs = F.normalize(torch.stack([o.represent(data.encode_prompt(tok, records[j])) for j in order[:40]]) - centre, dim=-1)
            k = min(K, len(refs) - 1)
            loo = refs @ refs.T - 3 * torch.eye(len(refs))
            own = loo.topk(k, dim=-1).values.mean(-1)
            mid, low = own.median().item(), own.min().item()
            lo = 2 * low - mid
        else:
            refs = [o.represent(data.encode_prompt(tok, records[j])) for j in order[:K]]
        out = {}
        for task in tasks:
            out[task] = []
            for rec in world.tests[task][:2]:
                prompt = data.encode_prompt(tok, rec)
                if method == "base":
                    weights = {}
                elif local is None:
                    weights = {"global": 1.0}
                elif method == "local":
                    weights = {"local": 1.0}
                elif method.endswith("-fixed"):
                    weights = {"local": 0.3, "global": 0.7}
                elif method.endswith("-sum"):
                    weights = {"local": 1.0, "global": 1.0}
                elif method.endswith("-oracle"):
                    weights = {"local": 0.3, "global": 0.7} if task == client_tasks[client] else {"global": 1.0}
                elif method.endswith("-calibrated"):
                    c = F.normalize(o.represent(prompt) - centre, dim=0)
                    sim = (refs @ c).topk(k).values.mean().item()
                    lam = 0.5 * min(max((sim - lo) / (mid - lo), 0.0), 1.0)
                    weights = {"local": lam, "global": 1 - lam}
                else:
                    rep = o.represent(prompt)
                    lam = min(max(0.5 * sum(F.cosine_similarity(rep, r, dim=0).item() for r in refs) / K, 0.0), 1.0)
                    weights = {"local": lam, "global": 1 - lam}
                out[task].append(o.answer(prompt, weights, tok, dec.max_new_tokens))
        return out

    for method in feddpa.METHODS:
        answers = [oracle_answers(method, c) for c in range(3)]
        tests = {task: [{**rec, "output": answers[0][task][i] or "-"} for i, rec in enumerate(world.tests[task][:2])]
                 for task in tasks}
        got = evaluation.evaluate_method(method, evaluation.Evaluator(model, tok, dec, "cpu", recipe), tests,
                                         client_data=dict(enumerate(world.clients[:3])), client_tasks=client_tasks, trained=trained)
        for c in range(3):
            for task in tasks:
                want = evaluation.score(answers[c][task], [r["output"] for r in tests[task]])
                have = {k: v for k, v in got["per_client"][c][task].items() if k not in ("lambda", "lambdas")}
                assert have.pop("rouge1_each") == pytest.approx(want.pop("rouge1_each")), (method, c, task)
                assert have == pytest.approx(want), (method, c, task)
        assert got["per_client"][0][tasks[0]]["exact"] == 100.0, method
    distinct = {m: len({str(oracle_answers(m, c)) for c in range(3)})
                for m in ("local", "feddpa-t", "feddpa-t-fixed", "feddpa-t-calibrated", "feddpa-t-oracle")}
    assert all(n > 1 for n in distinct.values()), distinct  # the clients' answers differ: the check has teeth


# ----------------------------------------------------------------------------------------------
# Every setting a user can choose, one at a time, against the oracle

@dataclass(frozen=True)
class Setting:
    """One point of the grid: the flags of train.py it sets, and the phases it trains (in order)."""
    phases: tuple = ()       # training phases compared with the oracle's
    rounds: int = 2
    steps: int = STEPS       # optimizer steps per round (--local-steps); 0: an epoch budget
    epochs: float = 1.0      # --epochs, when steps is 0
    batch: int = BATCH
    micro: int = MICRO
    a: float = A_MIX         # --local-weight
    weighting: str = "count"  # --weighting
    fraction: float = 1.0    # --fraction
    finetune: float = 1.0    # --finetune-rounds
    dropout: float = 0.0     # --lora-dropout
    beams: int = 1           # --num-beams
    pool: str = "last"       # --pool
    to: str = "local"        # --lambda-to
    similarity: str = "cosine"  # --similarity
    answers: bool = False    # compare client 1's lambdas and answers with the oracle's too


SETTINGS = {
    "a=0.3": Setting(phases=("feddpa-t",), a=0.3),
    "a=0.7": Setting(phases=("feddpa-t",), a=0.7),
    "micro-batch 1 of 4": Setting(phases=("feddpa-t",), micro=1),
    "epoch budget": Setting(phases=("fedit", "feddpa-f", "centralized"), steps=0, epochs=1.0),
    "uniform FedAvg": Setting(phases=("feddpa-t",), weighting="uniform"),
    "fraction 0.5": Setting(phases=("fedit", "feddpa-t", "local"), fraction=0.5, rounds=3),
    "finetune-rounds 2": Setting(phases=("fedit", "feddpa-f"), finetune=2.0),
    "dropout 0.2": Setting(phases=("feddpa-t",), dropout=0.2, answers=True),
    "4 beams": Setting(beams=4, answers=True),
    "4 beams, lambda to global": Setting(beams=4, to="global", answers=True),
    "mean pooling": Setting(pool="mean", answers=True),
    "L2 similarity": Setting(similarity="l2", answers=True),
    "Pearson similarity": Setting(similarity="pearson", answers=True),
}


def sim(a, b, kind: str) -> float:
    """The similarity of two representations (dim,), restated: the cosine, Pearson's r of their
    coordinates (numpy's corrcoef), or 1 - |a - b| / (|a| + |b|)."""
    a, b = a.double().numpy(), b.double().numpy()
    if kind == "pearson":
        return float(np.corrcoef(a, b)[0, 1])
    if kind == "l2":
        return float(1 - np.linalg.norm(a - b) / (np.linalg.norm(a) + np.linalg.norm(b)))
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def sampled(n: int, fraction: float, round_: int) -> list:
    """The clients of a round, the seeded draw a port must make as the project does: the first
    max(1, round(f n)) of torch.randperm(n) from the stream ("clients", round), sorted."""
    return sorted(torch.randperm(n, generator=seeded("clients", round_))[:max(1, round(fraction * n))].tolist())


def budget(s: Setting, n_examples: int, factor: float = 1.0) -> int:
    """Optimizer steps of one client's round: the step budget, or ceil(epochs * n / batch) steps."""
    return round(s.steps * factor) if s.steps else max(1, math.ceil(s.epochs * factor * n_examples / s.batch))


def average(updates, weighting):
    """FedAvg: weights n_k / n ('count') or 1 / K ('uniform')."""
    return fedavg(updates if weighting == "count" else [(state, 1) for state, _ in updates])


def oracle_phases(o: Oracle, s: Setting, datasets, init, fresh, pad_id) -> dict:
    """The adapters of s.phases, computed plainly with the oracle, each client's data order its own
    seeded generator, advanced only in the rounds the client takes part in."""
    n, out = len(datasets), {}

    def train(name, i, examples, weights, g, factor=1.0):
        o.train(name, examples, weights, g, budget(s, len(examples), factor), pad_id, batch=s.batch, micro=s.micro)
        return o.get(name)

    for phase in s.phases:
        g = [seeded(phase, "client", i) for i in range(n)]
        if phase == "fedit":
            glob = init
            for r in range(s.rounds):
                updates = []
                for i in sampled(n, s.fraction, r):
                    o.load("global", glob)
                    updates.append((train("global", i, datasets[i], {"global": 1.0}, g[i]), len(datasets[i])))
                glob = average(updates, s.weighting)
            out[phase] = {"global": glob, "locals": [None] * n}
        elif phase == "feddpa-f":  # every client, one round of `finetune` rounds' budget, from FedIT's adapter
            locals_ = []
            for i in range(n):
                o.load("local", out["fedit"]["global"])
                locals_.append(train("local", i, datasets[i], {"local": 1.0}, g[i], s.finetune))
            out[phase] = {"global": out["fedit"]["global"], "locals": locals_}
        elif phase == "feddpa-t":
            glob, locals_ = init, [None] * n
            for r in range(s.rounds):
                updates = []
                for i in sampled(n, s.fraction, r):
                    o.load("global", glob)
                    if r > 0:
                        o.load("local", locals_[i] if locals_[i] is not None else fresh[i])
                        locals_[i] = train("local", i, datasets[i], {"local": s.a, "global": 1 - s.a}, g[i])
                    updates.append((train("global", i, datasets[i], {"global": 1.0}, g[i]), len(datasets[i])))
                glob = average(updates, s.weighting)
            out[phase] = {"global": glob, "locals": locals_}
        elif phase == "local":  # sampled as FedIT is
            locals_ = [None] * n
            for r in range(s.rounds):
                for i in sampled(n, s.fraction, r):
                    o.load("local", locals_[i] if locals_[i] is not None else init)
                    locals_[i] = train("local", i, datasets[i], {"local": 1.0}, g[i])
            out[phase] = {"global": {}, "locals": locals_}
        elif phase == "centralized":  # one client: a step budget n times as large, or the same epochs
            pooled, glob = [e for d in datasets for e in d], init
            for _ in range(s.rounds):
                o.load("global", glob)
                glob = train("global", 0, pooled, {"global": 1.0}, g[0], n if s.steps else 1.0)
            out[phase] = {"global": glob, "locals": [None]}
    return out


def with_random_B(adapter, g):
    """The adapter with random B added: the two adapters then differ enough that the mix changes the
    answers of this tiny random model."""
    return {k: v + (torch.randn(v.shape, generator=g) * 0.5 if "lora_B" in k else 0) for k, v in adapter.items()}


class DropoutRate:
    """Counts, over the calls of every LoRA dropout module, the elements set to 0 that were not 0, and the
    calls that returned their input unchanged; where one changed it, the elements kept must be scaled
    by 1 / (1 - p)."""

    def __init__(self, model, p):
        self.dropped = self.seen = self.calls = self.unchanged = 0
        self.p = p
        self.handles = [m.register_forward_hook(self.hook) for _, layer in lora.lora_layers(model)
                        for m in layer.lora_dropout.values()]

    def hook(self, module, inputs, output):
        x = inputs[0]
        nonzero = x != 0
        zeroed = nonzero & (output == 0)
        kept = nonzero & ~zeroed
        if torch.equal(output, x):
            self.unchanged += 1
        else:
            assert torch.allclose(output[kept], x[kept] / (1 - self.p), rtol=1e-6, atol=0)
        self.calls += 1
        self.dropped += int(zeroed.sum())
        self.seen += int(nonzero.sum())

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("name", list(SETTINGS))
def test_every_setting_equals_the_oracle(setting, tiny_dir, name):
    """Setting `name`: the project's phases (feddpa.setup_phase, feddpa.run_phase, as train.py runs them)
    against the oracle's, adapter by adapter; where s.answers, client 1's lambdas and answers (FedDPA's
    dynamic weight, the given pooling and decoding) against the oracle's, one instance at a time.

    LoRA dropout draws its masks from each client's generator, as gaps between drops, which peft's
    nn.Dropout (torch's global generator, one draw per unit) cannot reproduce; it is checked
    statistically instead: in training
    its modules zero a fraction p of their inputs' elements (within 5 standard deviations) and scale the
    rest by 1 / (1 - p), the adapters differ from a dropout-free run's, and at evaluation the model is in
    evaluation mode and equals the oracle's, which has no dropout."""
    s = SETTINGS[name]
    _, tok, world, datasets = setting
    model = hf.from_pretrained(str(tiny_dir), dtype=DTYPE)
    lora.inject(model, TARGETS, r=R, lora_alpha=ALPHA, dropout=s.dropout, seed=SEED)
    model.eval()
    init = lora.get_adapter(model, "global")
    train = fed.LocalTrain(lr=LR, max_steps=s.steps, epochs=s.epochs, batch_size=s.batch, micro_batch_size=s.micro,
                           max_grad_norm=CLIP)
    recipe = feddpa.Recipe(train=train, rounds=s.rounds, fraction=s.fraction, local_weight=s.a,
                           finetune_rounds=s.finetune, k_refs=K, pool=s.pool, lambda_to=s.to, weighting=s.weighting,
                           similarity=s.similarity, seed=SEED)
    rate = DropoutRate(model, s.dropout)
    ours = {}
    for phase in s.phases:
        run = feddpa.setup_phase(phase, model, pad_id=tok.pad_id, recipe=recipe, datasets=dict(enumerate(datasets)), init=init,
                                 trained=ours)
        federation = feddpa.run_phase(phase, run)
        ours[phase] = feddpa.phase_result(phase, federation.global_adapter, run.clients, trained=ours)
    rate.close()
    assert not model.training, "training left the model in training mode"
    fresh = [feddpa.fresh_local(model, SEED, i) for i in range(len(datasets))]
    o = Oracle(str(tiny_dir))
    theirs = oracle_phases(o, replace(s, dropout=0.0), datasets, init, fresh, tok.pad_id)

    for phase in s.phases:
        mine, want = ours[phase], theirs[phase]
        pairs = [(mine["global"], want["global"])] if want["global"] else []
        assert bool(mine["global"]) == bool(want["global"]), phase
        assert [a is None for a in mine["locals"]] == [b is None for b in want["locals"]], phase
        pairs += [(a, b) for a, b in zip(mine["locals"], want["locals"]) if b is not None]
        for a, b in pairs:
            assert max_diff(b, init) > 1e-3                                # it trained
            if s.dropout:  # applied: the adapters are not those of the run without it
                assert max_diff(a, b) > 1e-4, phase
            else:
                assert max_diff(a, b) < 1e-5, phase
    if s.dropout:
        n, p = rate.seen, s.dropout
        assert rate.calls and abs(rate.dropped - n * p) < 5 * math.sqrt(n * p * (1 - p)), (rate.dropped, n)
    if not s.answers:
        return

    g = torch.Generator().manual_seed(7)
    source = ours.get("feddpa-t", {"global": init, "locals": [init] * 3})
    glob, local = with_random_B(source["global"], g), with_random_B(source["locals"][1], g)
    lora.load_adapter(model, "global", glob)
    lora.load_adapter(model, "local", local)
    rate = DropoutRate(model, s.dropout)
    dynamic = feddpa.paper_weight(model, tok, world.clients[1], recipe=recipe, client_id=1, device="cpu")
    tests = [recs[0] for recs in world.tests.values()]
    dec = evaluation.Decode(max_new_tokens=8, num_beams=s.beams, batch_size=8)
    answers, lams = evaluation.answer_dynamic(evaluation.Evaluator(model, tok, dec, "cpu"), tests, dynamic)
    rate.close()
    assert rate.calls and rate.unchanged == rate.calls, "dropout at evaluation"

    o.load("global", glob)
    o.load("local", local)
    order = torch.randperm(len(world.clients[1]), generator=seeded("references", 1))
    refs = [o.represent(data.encode_prompt(tok, world.clients[1][j]), s.pool) for j in order[:K].tolist()]
    other = "global" if s.to == "local" else "local"
    swapped = greedy = 0  # instances whose answer the other assignment of lambda, or greedy decoding, changes
    for rec, answer, lam in zip(tests, answers, lams):
        prompt = data.encode_prompt(tok, rec)
        rep = o.represent(prompt, s.pool)
        want = min(max(0.5 * sum(sim(rep, r, s.similarity) for r in refs) / K, 0.0), 1.0)
        assert abs(lam - want) < 1e-5, (rec["instruction"], lam, want)
        assert answer == o.answer(prompt, {s.to: want, other: 1 - want}, tok, dec.max_new_tokens, s.beams)
        swapped += answer != o.answer(prompt, {other: want, s.to: 1 - want}, tok, dec.max_new_tokens, s.beams)
        greedy += answer != o.answer(prompt, {s.to: want, other: 1 - want}, tok, dec.max_new_tokens, 1)
    assert swapped and max(lams) - min(lams) > 1e-3  # the check has teeth: which adapter gets lambda matters
    if s.beams > 1:
        assert greedy, "beam search answers as greedy decoding does here: the check has no teeth"
