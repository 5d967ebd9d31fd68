"""Entry point: train every method on one federated data set and print the paper's comparison.

    python train.py                                    # built-in benchmark, built-in tiny base model
    python train.py --data ../shared/data/feddpa-flan1 --model DIR --device cuda --dtype bfloat16

Top to bottom: the config (every field is a command-line flag); choosing the device; the data and
the foundation model (with no --model, a tiny Llama is pretrained on the built-in corpus and cached
as an HF directory); the training phases, checkpointed after every round; evaluation; the table and
results.json. `--resume OUT` continues an interrupted run from its last complete round.
"""
import argparse
import glob
import hashlib
import io
import json
import math
import os
import pickle
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
from tqdm import tqdm

import data
import feddpa
import fed
import lora
import model as llama


def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    data: str = opt("builtin", "'builtin' benchmark or a directory in the paper's federated format")
    model: str = opt("builtin", "'builtin' tiny base (pretrained here, cached) or an HF Llama directory")
    methods: str = opt(",".join(feddpa.METHODS), "comma-separated methods to run")
    rounds: int = opt(30, "communication rounds R (the paper: 20)")
    local_epochs: float = opt(1.0, "epochs over a client's data per round (when --local-steps is 0)")
    local_steps: int = opt(3, "optimizer steps per client per round; 0 = use --local-epochs")
    batch_size: int = opt(4, "examples per optimizer step (the paper: 64)")
    micro_batch_size: int = opt(4, "examples per forward pass (gradient accumulation)")
    lr: float = opt(3e-3, "AdamW learning rate (the paper: 3e-4, for a 7B model; the tiny base needs more)")
    lora_r: int = opt(8, "LoRA rank")
    lora_alpha: float = opt(16.0, "LoRA alpha (scaling alpha / r)")
    lora_dropout: float = opt(0.05, "LoRA dropout")
    targets: str = opt(",".join(lora.TARGETS), "projections that get adapters (the paper: q_proj,v_proj)")
    fraction: float = opt(1.0, "fraction of clients sampled each round")
    weighting: str = opt("count", "FedAvg weights: 'count' (by examples) or 'uniform'")
    clients: int = opt(0, "0: one client per released client file / task; N: Dirichlet split over tasks")
    dirichlet_alpha: float = opt(0.5, "Dirichlet concentration for --clients N")
    min_client_size: int = opt(10, "minimum examples per client in a Dirichlet split")
    cutoff: int = opt(512, "maximum tokens per training example")
    mix: float = opt(0.5, "FedDPA-T: local adapter weight while training it; the fixed-weight variants' weight")
    alpha: float = opt(0.5, "dynamic weighting: lambda = alpha * mean cosine similarity")
    k_refs: int = opt(5, "dynamic weighting: K training instructions per client")
    pool: str = opt("last", "instance representation: 'last' prompt token or 'mean'")
    lambda_to: str = opt("local", "adapter that gets lambda: 'local' (the paper's text) or 'global' (official code)")
    finetune_rounds: float = opt(10.0, "FedDPA-F: local fine-tuning budget, in rounds of local training")
    test_per_task: int = opt(30, "test instances per task (0 = all)")
    max_new_tokens: int = opt(32, "generation length (the paper: 80)")
    num_beams: int = opt(1, "beam search width (the paper: 4)")
    eval_batch_size: int = opt(64, "prompts per generation batch")
    pretrain_steps: int = opt(160, "steps of pretraining for the built-in base model")
    seed: int = opt(0, "seed for everything")
    device: str = opt("auto", "auto, cpu or cuda")
    dtype: str = opt("float32", "float32, or bfloat16: the frozen base in bfloat16, autocast, float32 adapters")
    out: str = opt("runs/default", "output folder")
    cache: str = opt("~/.cache/feddpa", "where the built-in base model is cached")


# ----------------------------------------------------------------------------------------------
# Errors the user can fix get one line on stderr and a non-zero exit; --debug shows the traceback.

class UserError(Exception):
    pass


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in fields(Config):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                        help=f.metadata["help"] + f" (default: {f.default})")
    ap.add_argument("--resume", metavar="OUT", help="continue the run in OUT from its last complete round")
    ap.add_argument("--overwrite", action="store_true", help="replace the results of another run in --out")
    ap.add_argument("-v", "--verbose", action="store_true", help="print per-client scores")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    args = ap.parse_args(argv)
    cfg = Config(**{f.name: getattr(args, f.name) for f in fields(Config)})
    return cfg, args


def check_config(cfg: Config):
    methods = cfg.methods.split(",")
    bad = [m for m in methods if m not in feddpa.METHODS]
    if bad:
        raise UserError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(feddpa.METHODS)}")
    problems = [(not 0 < cfg.fraction <= 1, f"--fraction {cfg.fraction} must be in (0, 1]"),
                (cfg.lora_r < 1, f"--lora-r {cfg.lora_r} must be >= 1"),
                (cfg.rounds < 1, f"--rounds {cfg.rounds} must be >= 1"),
                (cfg.local_steps < 0 or (cfg.local_steps == 0 and cfg.local_epochs <= 0),
                 "local training needs --local-steps > 0 or --local-epochs > 0"),
                (cfg.batch_size < 1 or cfg.micro_batch_size < 1, "batch sizes must be >= 1"),
                (cfg.lr <= 0, f"--lr {cfg.lr} must be > 0"),
                (cfg.weighting not in ("count", "uniform"), f"--weighting {cfg.weighting!r}: count or uniform"),
                (cfg.pool not in ("last", "mean"), f"--pool {cfg.pool!r}: last or mean"),
                (cfg.lambda_to not in ("local", "global"), f"--lambda-to {cfg.lambda_to!r}: local or global"),
                (cfg.dtype not in ("float32", "bfloat16"), f"--dtype {cfg.dtype!r}: float32 or bfloat16"),
                (cfg.device not in ("auto", "cpu", "cuda"), f"--device {cfg.device!r}: auto, cpu or cuda"),
                (cfg.k_refs < 1, f"--k-refs {cfg.k_refs} must be >= 1"),
                (cfg.num_beams < 1 or cfg.max_new_tokens < 1, "--num-beams and --max-new-tokens must be >= 1"),
                (cfg.clients < 0, f"--clients {cfg.clients} must be >= 0"),
                (cfg.dirichlet_alpha <= 0, f"--dirichlet-alpha {cfg.dirichlet_alpha} must be > 0"),
                (cfg.cutoff < 2, f"--cutoff {cfg.cutoff} must be >= 2"),
                (not 0 <= cfg.mix <= 1, f"--mix {cfg.mix} must be in [0, 1]"),
                (not 0 <= cfg.lora_dropout < 1, f"--lora-dropout {cfg.lora_dropout} must be in [0, 1)"),
                (cfg.finetune_rounds <= 0, f"--finetune-rounds {cfg.finetune_rounds} must be > 0"),
                (cfg.test_per_task < 0, f"--test-per-task {cfg.test_per_task} must be >= 0"),
                (cfg.eval_batch_size < 1 or cfg.pretrain_steps < 1, "--eval-batch-size and --pretrain-steps must be >= 1")]
    for failed, msg in problems:
        if failed:
            raise UserError(msg)
    for t in cfg.targets.split(","):
        if t not in lora.TARGETS:
            raise UserError(f"--targets: unknown projection {t!r}; choose from {', '.join(lora.TARGETS)}")


def choose_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


# ----------------------------------------------------------------------------------------------
# The foundation model. With no --model, a tiny Llama learns the built-in benchmark's language (not
# its tasks) from a plain-text corpus, and is saved as an ordinary HF directory for later runs.

def pretrain_base(cfg: Config, device) -> str:
    preset = llama.PRESETS["base"]
    key = hashlib.sha256(json.dumps([asdict(preset), cfg.seed, cfg.pretrain_steps]).encode()).hexdigest()[:12]
    d = os.path.join(os.path.expanduser(cfg.cache), f"base-{key}")
    if os.path.isfile(os.path.join(d, "model.safetensors")):
        return d
    tmp = f"{d}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    corpus = data.pretrain_corpus(cfg.seed)
    # the tokenizer also sees the benchmark's prompts, so its words are pieces rather than bytes;
    # the model itself never sees them before fine-tuning
    prompts = [data.format_prompt(r) + r["output"] for recs in data.builtin_benchmark(cfg.seed).clients for r in recs]
    data.train_tokenizer(corpus + prompts, os.path.join(tmp, "tokenizer.model"), preset.vocab_size)
    tok = llama.SentencePieceTokenizer(os.path.join(tmp, "tokenizer.model"))
    torch.manual_seed(cfg.seed)
    m = llama.Llama(llama.ModelConfig(**{**asdict(preset), "bos_id": tok.bos_id, "eos_id": tok.eos_id})).to(device)
    stream = torch.tensor([i for doc in corpus for i in [tok.bos_id, *tok.encode(doc), tok.eos_id]])
    T, B = 128, 32
    chunks = stream[:len(stream) // T * T].view(-1, T)                   # (N, T) packed documents
    opt_ = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), fused=True)
    warm = max(1, cfg.pretrain_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_, lambda s: min(1, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / cfg.pretrain_steps)))
    g = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.pretrain_steps), desc="pretraining the built-in base", leave=False)
    for _ in bar:
        x = chunks[torch.randint(len(chunks), (B,), generator=g)].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            loss = m(x, labels=x)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt_.step()
        sched.step()
        opt_.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    llama.save_pretrained(m.cpu(), tmp)
    os.replace(tmp, d) if not os.path.exists(d) else shutil.rmtree(tmp)
    return d


def load_data(cfg: Config) -> data.FedData:
    fd = data.builtin_benchmark(cfg.seed) if cfg.data == "builtin" else data.load_federated(cfg.data)
    if cfg.clients:
        try:
            fd = data.partition(fd, cfg.clients, cfg.dirichlet_alpha, cfg.min_client_size, cfg.seed)
        except ValueError as e:  # e.g. more clients than examples
            raise UserError(f"{cfg.data}: --clients {cfg.clients}: {e}") from None
    if cfg.test_per_task:
        fd.tests = {task: recs[:cfg.test_per_task] for task, recs in fd.tests.items()}
    return fd


def load_tokenizer(model_dir: str):
    cfg = llama.config_from_hf(os.path.join(model_dir, "config.json"))
    try:
        return llama.load_tokenizer(model_dir, cfg), cfg
    except llama.CheckpointError:
        raise
    except Exception as e:  # what sentencepiece or tokenizers raise for a damaged file
        raise UserError(f"{model_dir}: cannot load the tokenizer ({first_line(e)})") from None


def check_lengths(cfg: Config, tok, max_seq_len: int, fd: data.FedData, encoded: list):
    """Up front, not hours later: every training sequence and every test prompt plus its answer fits
    the model's context."""
    longest = max(len(e["input_ids"]) for ex in encoded for e in ex)
    if longest > max_seq_len:
        raise UserError(f"{cfg.model}: the model reads at most {max_seq_len} tokens, but a training example has "
                        f"{longest}; lower --cutoff")
    prompt = max(len(data.encode_prompt(tok, r, cfg.cutoff)) for recs in fd.tests.values() for r in recs)
    if prompt + cfg.max_new_tokens > max_seq_len:
        raise UserError(f"{cfg.model}: the model reads at most {max_seq_len} tokens, but a test prompt of {prompt} "
                        f"plus --max-new-tokens {cfg.max_new_tokens} needs {prompt + cfg.max_new_tokens}; "
                        "lower --cutoff or --max-new-tokens")


def encode_clients(fd: data.FedData, tok, cutoff: int) -> list:
    template = len(data.encode_prompt(tok, {"instruction": ""}, 1 << 30))  # BOS and the prompt's fixed text
    if cutoff <= template + 1:  # room for at least one token of instruction and one of response
        raise UserError(f"--cutoff {cutoff} is too short: the prompt template alone takes {template} tokens")
    encoded = []
    for i, recs in enumerate(fd.clients):
        ex = [e for e in (data.encode_example(tok, r, cutoff) for r in recs) if e is not None]
        if len(ex) < len(recs):
            print(f"client {i}: {len(recs) - len(ex)} records dropped (prompt longer than --cutoff {cutoff})")
        if not ex:
            raise UserError(f"client {i}: every record's prompt is longer than --cutoff {cutoff}")
        encoded.append(ex)
    return encoded


# ----------------------------------------------------------------------------------------------
# Training phases. Each is a federated run (fed.run_rounds) and is checkpointed after every round;
# the methods share them: FedDPA-F starts from FedIT's global adapter.

PHASES = {  # phase -> the methods that need it
    "fedit": {"fedit", "feddpa-f", "feddpa-f-fixed"},
    "feddpa-f": {"feddpa-f", "feddpa-f-fixed"},
    "feddpa-t": {"feddpa-t", "feddpa-t-fixed"},
    "local": {"local"},
    "centralized": {"centralized"},
}


def method_config(cfg: Config) -> feddpa.MethodConfig:
    train = fed.LocalTrain(lr=cfg.lr, epochs=cfg.local_epochs, max_steps=cfg.local_steps, batch_size=cfg.batch_size,
                           micro_batch_size=cfg.micro_batch_size, bf16=cfg.dtype == "bfloat16")
    return feddpa.MethodConfig(train=train, mix=cfg.mix, alpha=cfg.alpha, k_refs=cfg.k_refs, pool=cfg.pool,
                               lambda_to=cfg.lambda_to)


def scaled(train: fed.LocalTrain, factor: float) -> fed.LocalTrain:
    return replace(train, epochs=train.epochs * factor, max_steps=round(train.max_steps * factor))


def setup_phase(name, cfg: Config, mc: feddpa.MethodConfig, m, tok, encoded, state):
    """(clients, client step, rounds, fraction, initial global adapter) of one phase."""
    def clients_for(datasets):
        return [fed.Client(i, d, torch.Generator().manual_seed(cfg.seed * 1000 + i)) for i, d in enumerate(datasets)]
    init = state["init"]
    if name == "fedit":
        return clients_for(encoded), feddpa.fedit_step(m, tok.pad_id, mc), cfg.rounds, cfg.fraction, init
    if name == "feddpa-t":
        return clients_for(encoded), feddpa.feddpa_t_step(m, tok.pad_id, mc, init), cfg.rounds, cfg.fraction, init
    if name == "feddpa-f":
        start = state["trained"]["fedit"]["global"]
        return clients_for(encoded), feddpa.local_step(m, tok.pad_id, scaled(mc.train, cfg.finetune_rounds), start), 1, 1.0, {}
    if name == "local":
        return clients_for(encoded), feddpa.local_step(m, tok.pad_id, mc.train, init), cfg.rounds, 1.0, {}
    pooled = [e for d in encoded for e in d]  # centralized: one client holding everything, same total budget
    train = mc.train if not mc.train.max_steps else scaled(mc.train, len(encoded))
    return clients_for([pooled]), feddpa.fedit_step(m, tok.pad_id, replace(mc, train=train)), cfg.rounds, 1.0, init


def run_phase(name, cfg, mc, m, tok, encoded, state, save):
    clients, step, rounds, fraction, start = setup_phase(name, cfg, mc, m, tok, encoded, state)
    federation = fed.Federation(start, clients)
    resume = state.get("current")
    if resume and resume["phase"] == name:  # continue from the last complete round
        federation.global_adapter, federation.round, federation.history = resume["global"], resume["round"], resume["history"]
        for c, (local, gen) in zip(clients, resume["clients"]):
            c.local = local
            c.generator.set_state(gen)
        set_rng(resume["rng"])
    else:
        torch.manual_seed(cfg.seed * 7919 + list(PHASES).index(name))  # dropout, per phase

    def checkpoint(f: fed.Federation):
        h = f.history[-1]
        tqdm.write(f"{name:>12} round {h['round']:>2}: loss {h['loss']:.3f}, {len(h['clients'])} clients, "
                   f"{(h['bytes_down'] + h['bytes_up']) / 1e6:.2f} MB, {h['seconds']:.1f}s")
        state["current"] = {"phase": name, "global": f.global_adapter, "round": f.round, "history": f.history,
                            "clients": [(c.local, c.generator.get_state()) for c in f.clients], "rng": get_rng()}
        save(state)

    try:
        fed.run_rounds(federation, rounds, step, fraction, cfg.seed, cfg.weighting, desc=name, on_round_end=checkpoint)
    except fed.Diverged as e:  # nothing of the failed round is saved: the checkpoint keeps the last good one
        raise fed.Diverged(f"{name}: {e}; stopped, {os.path.join(cfg.out, 'checkpoint.pt')} keeps the last "
                           f"good round ({federation.round} of {rounds} complete)") from None
    hist = federation.history
    print(f"{name:>12}: {rounds} round(s), loss {hist[0]['loss']:.3f} -> {hist[-1]['loss']:.3f}, "
          f"{sum(h['bytes_up'] + h['bytes_down'] for h in hist) / 1e6:.2f} MB sent, {sum(h['seconds'] for h in hist):.1f}s")
    global_adapter = federation.global_adapter if name != "feddpa-f" else state["trained"]["fedit"]["global"]
    state["trained"][name] = {"global": global_adapter, "locals": [c.local for c in clients], "history": hist,
                              "seconds": sum(h["seconds"] for h in hist)}
    state["current"] = None
    save(state)


def get_rng():
    return {"python": random.getstate(), "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng(rng):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in rng["python"]))
    st = rng["numpy"]
    np.random.set_state((st[0], np.array(st[1], dtype=np.uint32), *st[2:]))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():  # a GPU run resumed on a CPU continues, not bit for bit
        torch.cuda.set_rng_state_all(rng["cuda"])


# ----------------------------------------------------------------------------------------------
# Evaluation: each client's model answers every task's test set.

def evaluate_method(method, cfg, mc, m, tok, fd, state, device) -> dict:
    dec = feddpa.Decode(cfg.max_new_tokens, cfg.num_beams, cfg.eval_batch_size, cfg.cutoff)
    n = len(fd.clients)
    t0 = time.time()
    if method in ("base", "fedit", "centralized"):  # one model shared by all clients: evaluate once
        if method != "base":
            lora.set_adapter(m, "global", state["trained"][method]["global"])
        scores = feddpa.evaluate(m, tok, fd.tests, dec, device, {} if method == "base" else {"global": 1.0})
        per_client = [scores] * n
    else:
        phase = method.removesuffix("-fixed")
        trained = state["trained"][phase]
        per_client = []
        for i in range(n):
            lora.set_adapter(m, "local", trained["locals"][i] if trained["locals"][i] is not None else state["init"])
            if method == "local":
                per_client.append(feddpa.evaluate(m, tok, fd.tests, dec, device, {"local": 1.0}))
                continue
            lora.set_adapter(m, "global", trained["global"])
            if method.endswith("-fixed"):
                mix = {"local": mc.mix, "global": 1 - mc.mix}
                per_client.append(feddpa.evaluate(m, tok, fd.tests, dec, device, mix))
            else:
                refs = feddpa.draw_references(fd.clients[i], mc.k_refs, cfg.seed, i)
                ref_reps = feddpa.reference_reps(m, tok, refs, mc.pool, device, cfg.cutoff)
                per_client.append(feddpa.evaluate(m, tok, fd.tests, dec, device, "dynamic", ref_reps, mc))
    return {**feddpa.p_and_ttp(per_client, fd.client_tasks), "per_client": per_client,
            "exact": feddpa.p_and_ttp(per_client, fd.client_tasks, "exact"), "eval_seconds": time.time() - t0}


# ----------------------------------------------------------------------------------------------
# Output folder: config.json, checkpoint.pt (after every round), results.json, adapters/

def save_state(out: str, state: dict):
    """The whole run after a round, written atomically (a kill at any moment leaves the previous one):
    adapters, round, metrics, every RNG and client generator. No optimizer state: each local run
    starts a fresh AdamW, so none carries over between rounds."""
    buf = io.BytesIO()
    torch.save(state, buf)
    llama.atomic_write(os.path.join(out, "checkpoint.pt"), [buf.getvalue()])


def first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e).strip() else type(e).__name__


def load_state(out: str) -> dict:
    path = os.path.join(out, "checkpoint.pt")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no checkpoint to resume from")
    try:  # weights_only: tensors and plain containers; a checkpoint is never code to unpickle
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path}: holds objects other than tensors and plain data; refusing to load it") from None
    except Exception as e:
        raise UserError(f"{path}: unreadable checkpoint ({first_line(e)})") from None


def check_state(state, m, n_clients: int, path: str):
    """Refuse, before anything is written, a checkpoint that does not fit this run: each adapter in it
    must have exactly the model's tensor names and shapes, each phase one entry per client, and the
    generator states must load."""
    def adapter(where, a, optional=False):
        if optional and not a:  # the Local baseline has no global adapter, a client may have no local one
            return
        try:
            lora.check_adapter(m, a)
        except ValueError as e:
            raise UserError(f"{path}: {where}: {e}") from None

    def clients(where, xs, phase):
        if len(xs) != (1 if phase == "centralized" else n_clients):
            raise UserError(f"{path}: {where} has {len(xs)} clients, the data {n_clients}")

    try:
        adapter("initial adapter", state["init"])
        for phase, t in state["trained"].items():
            adapter(f"{phase} global adapter", t["global"], optional=True)
            clients(phase, t["locals"], phase)
            for i, local in enumerate(t["locals"]):
                adapter(f"{phase} client {i} local adapter", local, optional=True)
            # read here what write_results and print_table read, so that a damaged entry fails now
            t["seconds"] + sum(h["seconds"] + h["bytes_up"] + h["bytes_down"] for h in t["history"])
        for r in state["results"].values():
            r["P"] + r["TTP"] + r["exact"]["P"] + r["exact"]["TTP"] + r["eval_seconds"] + len(r["per_client"])
        cur = state["current"]
        if cur is not None:
            adapter(f"{cur['phase']} global adapter", cur["global"], optional=True)
            clients(cur["phase"], cur["clients"], cur["phase"])
            for i, (local, gen) in enumerate(cur["clients"]):
                adapter(f"{cur['phase']} client {i} local adapter", local, optional=True)
                torch.Generator().set_state(gen)
            int(cur["round"]), list(cur["history"])
            saved = get_rng()
            set_rng(cur["rng"])
            set_rng(saved)
    except UserError:
        raise
    except Exception as e:  # a missing key, a wrong type: not a checkpoint of this program
        raise UserError(f"{path}: not a checkpoint of this program ({first_line(e)})") from None


def prepare_out(cfg: Config, args) -> tuple:
    """(config, state or None). Refuses to touch another run's results unless told to; reads only."""
    if args.resume:
        path = os.path.join(args.resume, "config.json")
        try:
            with open(path) as f:
                saved = json.load(f)
            cfg = Config(**{**saved, "device": cfg.device, "out": args.resume})  # the folder may have moved
        except (OSError, ValueError, TypeError) as e:
            raise UserError(f"{path}: cannot resume from it ({first_line(e)})") from None
        for f in fields(Config):
            v, want = getattr(cfg, f.name), type(f.default)
            if not (type(v) is want or want is float and type(v) is int):
                raise UserError(f"{path}: {f.name} is {v!r}, not a {want.__name__}")
        return cfg, load_state(cfg.out)
    taken = [f for f in OUTPUTS if os.path.exists(os.path.join(cfg.out, f))]
    if taken and not args.overwrite:
        raise UserError(f"{cfg.out}: holds another run ({taken[0]}); use --resume {cfg.out}, --overwrite, or another --out")
    return cfg, None


OUTPUTS = ("results.json", "checkpoint.pt", "config.json", "adapters")


def start_out(cfg: Config, state: dict, save):
    """A new run's first writes, once everything has been checked: the old run's files go (--overwrite),
    then the initial checkpoint and config.json, so that from here on --resume always works."""
    os.makedirs(cfg.out, exist_ok=True)
    for name in OUTPUTS:
        path = os.path.join(cfg.out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    save(state)
    llama.atomic_write(os.path.join(cfg.out, "config.json"), [json.dumps(asdict(cfg), indent=1).encode()])


def write_results(cfg: Config, state: dict, fd: data.FedData, seconds: float):
    res = {"config": asdict(cfg), "client_tasks": fd.client_tasks, "methods": {}, "training": {},
           "seconds": {"total": seconds, "pretrain": state.get("pretrain_seconds", 0.0)}}
    for method, r in state["results"].items():
        res["methods"][method] = {"P": r["P"], "TTP": r["TTP"], "P_exact": r["exact"]["P"],
                                  "TTP_exact": r["exact"]["TTP"], "eval_seconds": r["eval_seconds"],
                                  "per_client": r["per_client"]}
    for phase, t in state["trained"].items():
        res["training"][phase] = {"seconds": t["seconds"], "history": t["history"],
                                  "bytes": sum(h["bytes_up"] + h["bytes_down"] for h in t["history"])}
        d = os.path.join(cfg.out, "adapters", phase)
        os.makedirs(d, exist_ok=True)
        if t["global"]:
            llama.write_safetensors(t["global"], os.path.join(d, "global.safetensors"))
        for i, local in enumerate(t["locals"]):
            if local is not None:
                llama.write_safetensors(local, os.path.join(d, f"client{i}_local.safetensors"))
    llama.atomic_write(os.path.join(cfg.out, "results.json"), [json.dumps(res, indent=1).encode()])


def print_table(state: dict, fd: data.FedData, verbose: bool):
    print(f"\n{'method':<16}{'P':>8}{'TTP':>8}{'P(EM)':>8}{'TTP(EM)':>9}   (ROUGE-1 F1 / exact match, %)")
    for method, r in state["results"].items():
        print(f"{method:<16}{r['P']:8.1f}{r['TTP']:8.1f}{r['exact']['P']:8.1f}{r['exact']['TTP']:9.1f}")
    if verbose:
        tasks = list(fd.tests)
        for method, r in state["results"].items():
            print(f"\n{method}: ROUGE-1 per client (rows, own task marked *) and test task (columns)")
            print(" " * 10 + "".join(f"{t[:9]:>10}" for t in tasks))
            for i, scores in enumerate(r["per_client"]):
                print(f"client {i:<3}" + "".join(f"{scores[t]['rouge1']:9.1f}{'*' if t == fd.client_tasks[i] else ' '}"
                                                 for t in tasks))


# ----------------------------------------------------------------------------------------------

def run(cfg: Config, args):
    """Everything is read and checked before the first write, so a run that fails on bad input leaves
    any existing output folder exactly as it was."""
    t_start = time.time()
    cfg, state = prepare_out(cfg, args)
    check_config(cfg)
    device = choose_device(cfg.device)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    fd = load_data(cfg)
    t0 = time.time()
    model_dir = pretrain_base(cfg, device) if cfg.model == "builtin" else cfg.model
    tok, model_cfg = load_tokenizer(model_dir)
    encoded = encode_clients(fd, tok, cfg.cutoff)
    check_lengths(cfg, tok, model_cfg.max_seq_len, fd, encoded)
    # bfloat16: the frozen base is stored in bfloat16 (half the memory, no cast at every step); the
    # adapters, which train, stay float32, and autocast runs the matmuls in bfloat16
    base_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    m = llama.from_pretrained(model_dir, dtype=base_dtype, device=device)
    pretrain_seconds = time.time() - t0
    lora.inject(m, cfg.targets.split(","), r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, seed=cfg.seed,
                dtype=torch.float32)
    m.eval()

    def save(s):
        save_state(cfg.out, s)
    if state is None:
        state = {"init": lora.get_adapter(m, "global"), "trained": {}, "results": {}, "current": None,
                 "pretrain_seconds": pretrain_seconds}
        start_out(cfg, state, save)
    else:
        check_state(state, m, len(fd.clients), os.path.join(cfg.out, "checkpoint.pt"))
        for tmp in glob.glob(os.path.join(glob.escape(cfg.out), "**", "*.tmp[0-9]*"), recursive=True):
            os.remove(tmp)  # what a killed atomic_write left behind
    methods = cfg.methods.split(",")
    mc = method_config(cfg)
    print(f"data: {fd.name}, {len(fd.clients)} clients, {sum(map(len, fd.clients))} training examples, "
          f"{len(fd.tests)} test tasks x <= {max(map(len, fd.tests.values()))}; model: {model_dir} "
          f"({sum(p.numel() for p in m.parameters() if not p.requires_grad):,} frozen parameters); device {device}")
    for note in fd.notes:
        print(f"note: {note}")

    for phase, needed in PHASES.items():
        if needed & set(methods) and phase not in state["trained"]:
            run_phase(phase, cfg, mc, m, tok, encoded, state, save)
    for method in methods:
        if method not in state["results"]:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
                state["results"][method] = evaluate_method(method, cfg, mc, m, tok, fd, state, device)
            save(state)
    write_results(cfg, state, fd, time.time() - t_start)
    print_table(state, fd, args.verbose)
    print(f"\nresults: {os.path.join(cfg.out, 'results.json')}  ({time.time() - t_start:.0f}s)")


def main(argv=None):
    cfg, args = parse_args(argv)
    try:
        run(cfg, args)
    except KeyboardInterrupt:
        out = args.resume or cfg.out
        if os.path.isfile(os.path.join(out, "config.json")):
            print(f"interrupted; completed rounds are saved. Resume with: python train.py --resume {out}", file=sys.stderr)
        else:
            print("interrupted before the run started; nothing was saved", file=sys.stderr)
        sys.exit(130)
    except (UserError, data.DataError, llama.CheckpointError, fed.Diverged, ValueError, OSError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
