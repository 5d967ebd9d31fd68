"""Entry point: train every method on one federated data set and print the paper's comparison.

    python train.py                                    # built-in benchmark, built-in tiny base model
    python train.py --data DIR --model DIR --device cuda --dtype bfloat16

Top to bottom: the config (every field is a flag) and its checks; the device (decided here only); the
data and the foundation model (with no --model, pretrain.py's tiny Llama); run: each training phase the
methods need (feddpa.setup_phase, checkpointed by runs.run_phase), each method's evaluation
(evaluation.evaluate_method), the table and results.json; run_seeds: the same per seed, mean ± std.
"""
import argparse
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
from tqdm import tqdm

import builtin
import data
import evaluation
import fast
import fed
import feddpa
import hf
import lora
import pretrain
import runs
from runs import UserError


def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    data: str = opt("builtin", "'builtin' benchmark or a directory in the paper's federated format")
    model: str = opt("builtin", "'builtin' tiny base (pretrained here, cached), an HF Llama folder, or a hub id")
    methods: str = opt(",".join(m for m in feddpa.METHODS if m != "feddpa-t-sum"),  # the sum row: asked for by name
                       "comma-separated methods to run")
    rounds: int = opt(12, "communication rounds R (the paper: 20)")
    local_epochs: float = opt(1.0, "epochs over a client's data per round (when --local-steps is 0)")
    local_steps: int = opt(3, "optimizer steps per client per round; 0 = use --local-epochs")
    batch_size: int = opt(4, "examples per optimizer step (the paper: 64)")
    micro_batch_size: int = opt(4, "examples per forward pass (gradient accumulation)")
    lr: float = opt(5e-3, "AdamW learning rate (the paper: 3e-4, for a 7B model; the tiny base needs more)")
    max_grad_norm: float = opt(1.0, "clip each step's gradient to this global norm, as the official Trainer (0 = off)")
    lora_r: int = opt(8, "LoRA rank")
    lora_alpha: float = opt(16.0, "LoRA alpha (scaling lora_alpha / r)")
    lora_dropout: float = opt(0.05, "LoRA dropout")
    targets: str = opt(",".join(lora.TARGETS), "projections that get adapters (the paper: q_proj,v_proj)")
    fraction: float = opt(1.0, "fraction of clients sampled each round")
    weighting: str = opt("count", "FedAvg weights: 'count' (by examples) or 'uniform' (with --dp-clip: always equal)")
    dp_clip: float = opt(0.0, "client-level DP-FedAvg on the global adapter (FedIT, FedDPA-T): clip each client's "
                         "update to this L2 norm over the whole adapter (0 = no DP)")
    dp_noise: float = opt(0.0, "with --dp-clip: the noise multiplier sigma, Gaussian noise of std sigma * clip / n on "
                          "the mean of the n clients' clipped updates")
    dp_delta: float = opt(1e-5, "with --dp-clip: the delta that the guarantee's epsilon is reported at")
    clients: int = opt(0, "0: one client per released client file / task; N: Dirichlet split over tasks")
    dirichlet_alpha: float = opt(0.5, "Dirichlet concentration for --clients N")
    min_client_size: int = opt(10, "minimum examples per client in a Dirichlet split")
    tasks: str = opt("", "comma-separated tasks: only their clients take part (each keeping its id and seeds) and "
                     "only they are tested; with --clients N their records are kept before the split")
    cutoff: int = opt(512, "maximum tokens per training example")
    max_dropped: float = opt(0.2, "refuse a run where a client loses more than this share of its records to --cutoff")
    local_weight: float = opt(0.5, "FedDPA-T: local adapter weight a while training it; the -fixed rows' weight")
    lambda_scale: float = opt(0.5, "dynamic weighting: lambda = lambda_scale * mean cosine similarity")
    k_refs: int = opt(5, "dynamic weighting: K training instructions per client")
    pool: str = opt("last", "instance representation: 'last' prompt token or 'mean'")
    lambda_to: str = opt("local", "adapter that gets lambda: 'local' (the paper's text) or 'global' (official code)")
    similarity: str = opt("cosine", "dynamic weighting: the similarity lambda averages: cosine, l2 or pearson")
    finetune_rounds: float = opt(1.0, "FedDPA-F: local fine-tuning after FedIT, in rounds of local training (the paper: 1)")
    test_per_task: int = opt(15, "test instances per task (0 = all)")
    test_data: str = opt("", "a second federated folder whose test sets every method also answers: tasks no "
                         "client trained on (the paper's unseen tasks), reported as TTP")
    max_new_tokens: int = opt(24, "generation length (the paper: 80)")
    num_beams: int = opt(1, "beam search width (the paper: 4)")
    eval_batch_size: int = opt(64, "prompts per generation batch")
    eval_every: int = opt(0, "score each running phase's adapters every N rounds and after its last, on "
                          "--curve-per-task test instances per task: the convergence curve (0 = off)")
    curve_per_task: int = opt(10, "test instances per task of the curve: a fixed seeded subset")
    curve_methods: str = opt("", "comma-separated methods the curve scores (default: every method run)")
    rescore: str = opt("", "evaluate the adapters the run in this folder trained, with the inference flags "
                       "given, into --out (training flags are refused)")
    pretrain_steps: int = opt(200, "steps of pretraining for the built-in base model")
    init_adapter: str = opt("", "start every adapter from this PEFT adapter folder (e.g. one export.py wrote; "
                            "its adapter_config.json must give --lora-r, --lora-alpha and --targets)")
    seed: int = opt(0, "seed for everything")
    seeds: str = opt("", "comma-separated seeds, e.g. 0,1,2: the whole comparison once per seed in OUT/seed<N>, then mean ± std")
    device: str = opt("auto", "auto, cpu or cuda")
    plain: bool = opt(False, "the plain reference alone, without fast.py's faster forwards (the same numbers up to rounding)")
    dtype: str = opt("float32", "float32; bfloat16: the frozen base in bfloat16, autocast, float32 adapters; "
                     "float64: every weight (the built-in base's pretraining too), for runs that agree across CPU kinds")
    out: str = opt("runs/default", "output folder")
    cache: str = opt("~/.cache/feddpa", "where the built-in base model is cached")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}  # --dtype: the base's
ALIASES = {"lambda_scale": "alpha", "local_weight": "mix"}  # earlier flag and config.json names, still accepted
ALIASES_BACK = {old: new for new, old in ALIASES.items()}
RUNTIME = ("device", "plain")  # how a run is computed, not what: a resume may change them
# what --rescore may change: how trained adapters are evaluated (FedDPA-T trains with --local-weight)
INFERENCE = ("methods", "k_refs", "pool", "similarity", "lambda_scale", "lambda_to", "num_beams", "max_new_tokens",
             "test_per_task", "test_data", "eval_batch_size")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in fields(Config):
        names = ["--" + n.replace("_", "-") for n in (f.name, ALIASES.get(f.name)) if n]
        if f.type is bool or type(f.default) is bool:
            ap.add_argument(*names, dest=f.name, action="store_true", help=f.metadata["help"])
            continue
        ap.add_argument(*names, dest=f.name, type=type(f.default), default=f.default,
                        help=f.metadata["help"] + f" (default: {f.default})")
    ap.add_argument("--resume", metavar="OUT", help="continue the run in OUT from its last complete round")
    ap.add_argument("--overwrite", action="store_true", help="replace the results of another run in --out")
    ap.add_argument("-v", "--verbose", action="store_true", help="print per-client scores")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-round lines (on stderr)")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    args = ap.parse_args(argv)
    cfg = Config(**{f.name: getattr(args, f.name) for f in fields(Config)})
    args.given = [f.name for f in fields(Config) if getattr(cfg, f.name) != f.default]  # set on the command line
    args.weighting_given = any(a.split("=")[0] == "--weighting" for a in (sys.argv[1:] if argv is None else argv))
    if cfg.dp_clip > 0 and not args.weighting_given:  # DP-FedAvg weighs every client alike: the config says so
        cfg = replace(cfg, weighting="uniform")
    return cfg, args


def check_flags(cfg: Config, args):
    """Flags that would be ignored are refused, not ignored."""
    ignored = [name for name in args.given if name not in RUNTIME]
    if args.resume and ignored:  # the run's own settings win
        raise UserError(f"--resume takes every setting from {args.resume}/config.json (only --device and --plain may change); "
                        f"drop --{ignored[0].replace('_', '-')}")
    if "local_epochs" in args.given and cfg.local_steps:
        raise UserError(f"--local-epochs is used only with --local-steps 0 (now {cfg.local_steps})")
    training = [n for n in args.given if n not in (*INFERENCE, *RUNTIME, "out", "rescore")]
    if cfg.rescore and training:
        raise UserError(f"--rescore changes only how {cfg.rescore}'s adapters are evaluated; --{training[0].replace('_', '-')} "
                        f"is a training setting: drop it")
    if cfg.dp_clip > 0 and getattr(args, "weighting_given", False) and cfg.weighting == "count":
        raise UserError("--weighting count weighs clients by their data; DP-FedAvg (--dp-clip) weighs every client "
                        "alike, so that one client moves the mean by at most clip / n: drop --weighting")
    if cfg.rescore and args.resume:
        raise UserError("--rescore starts a new run in --out; a re-scoring run is resumed with --resume alone")


def rescored_config(cfg: Config, args) -> Config:
    """The settings of the run in cfg.rescore, with the inference flags given (check_flags refused any other)."""
    run = resumed_config(cfg, cfg.rescore)
    return replace(run, **{name: getattr(cfg, name) for name in args.given if name in INFERENCE},
                   out=cfg.out, rescore=cfg.rescore, eval_every=0, curve_methods="")  # a re-scoring draws no curve


def resumed_config(cfg: Config, out: str) -> Config:
    """The settings of the run in out (only --device and --plain may change; the folder may have moved)."""
    saved = runs.read_config(out)
    saved = {ALIASES_BACK.get(k, k): v for k, v in saved.items()}
    path = os.path.join(out, "config.json")
    try:
        cfg = Config(**{**saved, **{name: getattr(cfg, name) for name in RUNTIME}, "out": out})
    except TypeError as e:
        raise UserError(f"{path}: cannot resume from it ({hf.first_line(e)})") from None
    for f in fields(Config):
        v, want = getattr(cfg, f.name), type(f.default)
        if not (type(v) is want or want is float and type(v) is int):
            raise UserError(f"{path}: {f.name} is {v!r}, not a {want.__name__}")
    return cfg


def check_config(cfg: Config):
    # every float setting is a finite number: a comparison with nan is False, so the range checks
    # below would let --lr nan through to fail inside AdamW once the run has started
    for f in fields(Config):
        v = getattr(cfg, f.name)
        if type(f.default) is float and not math.isfinite(v):
            raise UserError(f"--{f.name.replace('_', '-')} {v} must be a finite number")
    bad = [m for m in cfg.methods.split(",") if m not in feddpa.METHODS]
    if bad:
        raise UserError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(feddpa.METHODS)}")
    bad = [m for m in cfg.curve_methods.split(",") if cfg.curve_methods and m not in cfg.methods.split(",")]
    if bad:
        raise UserError(f"--curve-methods: {', '.join(bad)} not among --methods")
    problems = [(not 0 < cfg.fraction <= 1, f"--fraction {cfg.fraction} must be in (0, 1]"),
                (cfg.lora_r < 1, f"--lora-r {cfg.lora_r} must be >= 1"),
                (cfg.rounds < 1, f"--rounds {cfg.rounds} must be >= 1"),
                (cfg.local_steps < 0 or (cfg.local_steps == 0 and cfg.local_epochs <= 0),
                 "local training needs --local-steps > 0 or --local-epochs > 0"),
                (cfg.batch_size < 1 or cfg.micro_batch_size < 1, "batch sizes must be >= 1"),
                (cfg.lr <= 0, f"--lr {cfg.lr} must be > 0"),
                (cfg.max_grad_norm < 0, f"--max-grad-norm {cfg.max_grad_norm} must be >= 0"),
                (cfg.weighting not in ("count", "uniform"), f"--weighting {cfg.weighting!r}: count or uniform"),
                (cfg.pool not in ("last", "mean"), f"--pool {cfg.pool!r}: last or mean"),
                (cfg.lambda_to not in ("local", "global"), f"--lambda-to {cfg.lambda_to!r}: local or global"),
                (cfg.similarity not in feddpa.SIMILARITIES,
                 f"--similarity {cfg.similarity!r}: {', '.join(feddpa.SIMILARITIES)}"),
                (cfg.eval_every < 0 or cfg.curve_per_task < 1, "--eval-every must be >= 0 and --curve-per-task >= 1"),
                (cfg.dtype not in DTYPES, f"--dtype {cfg.dtype!r}: float32, bfloat16 or float64"),
                (cfg.device not in ("auto", "cpu", "cuda"), f"--device {cfg.device!r}: auto, cpu or cuda"),
                (cfg.k_refs < 1, f"--k-refs {cfg.k_refs} must be >= 1"),
                (cfg.num_beams < 1 or cfg.max_new_tokens < 1, "--num-beams and --max-new-tokens must be >= 1"),
                (cfg.clients < 0, f"--clients {cfg.clients} must be >= 0"),
                (cfg.dirichlet_alpha <= 0, f"--dirichlet-alpha {cfg.dirichlet_alpha} must be > 0"),
                (cfg.cutoff < 2, f"--cutoff {cfg.cutoff} must be >= 2"),
                (not 0 <= cfg.max_dropped <= 1, f"--max-dropped {cfg.max_dropped} must be in [0, 1]"),
                (not 0 <= cfg.local_weight <= 1, f"--local-weight {cfg.local_weight} must be in [0, 1]"),
                (not 0 <= cfg.lora_dropout < 1, f"--lora-dropout {cfg.lora_dropout} must be in [0, 1)"),
                (cfg.finetune_rounds <= 0, f"--finetune-rounds {cfg.finetune_rounds} must be > 0"),
                (cfg.test_per_task < 0, f"--test-per-task {cfg.test_per_task} must be >= 0"),
                (cfg.eval_batch_size < 1 or cfg.pretrain_steps < 1, "--eval-batch-size and --pretrain-steps must be >= 1"),
                (cfg.dp_clip < 0 or cfg.dp_noise < 0, "--dp-clip and --dp-noise must be >= 0"),
                (cfg.dp_noise > 0 and cfg.dp_clip == 0, f"--dp-noise {cfg.dp_noise} needs --dp-clip > 0: the noise's scale "
                 "is sigma * clip / n"),
                (not 0 < cfg.dp_delta < 1, f"--dp-delta {cfg.dp_delta} must be in (0, 1)")]
    for failed, msg in problems:
        if failed:
            raise UserError(msg)
    if cfg.seeds and not all(s.strip().isdigit() for s in cfg.seeds.split(",")):
        raise UserError(f"--seeds {cfg.seeds!r}: comma-separated non-negative integers")
    for t in cfg.targets.split(","):
        if t not in lora.TARGETS:
            raise UserError(f"--targets: unknown projection {t!r}; choose from {', '.join(lora.TARGETS)}")


def choose_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def recipe(cfg: Config) -> feddpa.Recipe:
    train = fed.LocalTrain(lr=cfg.lr, epochs=cfg.local_epochs, max_steps=cfg.local_steps, batch_size=cfg.batch_size,
                           micro_batch_size=cfg.micro_batch_size, max_grad_norm=cfg.max_grad_norm,
                           bf16=cfg.dtype == "bfloat16")
    return feddpa.Recipe(train=train, rounds=cfg.rounds, fraction=cfg.fraction, local_weight=cfg.local_weight,
                         finetune_rounds=cfg.finetune_rounds, lambda_scale=cfg.lambda_scale, k_refs=cfg.k_refs,
                         pool=cfg.pool, lambda_to=cfg.lambda_to, similarity=cfg.similarity, weighting=cfg.weighting,
                         dp=fed.DP(cfg.dp_clip, cfg.dp_noise, cfg.dp_delta) if cfg.dp_clip > 0 else None, seed=cfg.seed)


# ----------------------------------------------------------------------------------------------
# Data and model

def load_data(name: str, seed: int, clients: int, dirichlet_alpha: float, min_client_size: int,
              test_per_task: int, tasks: str = "") -> data.FedData:
    fd = builtin.benchmark(seed) if name == "builtin" else data.load_federated(name)
    if tasks:
        try:
            fd = data.select_tasks(fd, tasks.split(","), records=bool(clients))
        except ValueError as e:
            raise UserError(f"{name}: --tasks: {e}") from None
    if clients:
        try:
            fd = data.partition(fd, clients, dirichlet_alpha, min_client_size, seed)
        except ValueError as e:  # e.g. more clients than examples
            raise UserError(f"{name}: --clients {clients}: {e}") from None
    if test_per_task:
        fd.tests = {task: recs[:test_per_task] for task, recs in fd.tests.items()}
    return fd


def base_and_tokenizer(cfg: Config, device, progress: bool) -> tuple:
    """The foundation model's folder (with no --model, pretrain.py's tiny Llama, cached) and its tokenizer."""
    if cfg.model == "builtin" and cfg.dtype == "float64":  # pretrained in float64, cached apart from the float32 base
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            model_dir = pretrain.base_model(os.path.join(cfg.cache, "float64"), cfg.seed, cfg.pretrain_steps, device,
                                            False, progress, cfg.plain)
        finally:
            torch.set_default_dtype(default)
    else:
        model_dir = (pretrain.base_model(cfg.cache, cfg.seed, cfg.pretrain_steps, device, cfg.dtype == "bfloat16", progress,
                                         cfg.plain)
                     if cfg.model == "builtin" else hf.resolve(cfg.model))
    return model_dir, hf.load_tokenizer(model_dir, hf.config_from_hf(os.path.join(model_dir, "config.json")))


def load_model(cfg: Config, model_dir: str, device):
    """The frozen foundation model with its two LoRA slots, each at the seeded initial adapter."""
    # bfloat16: the frozen base is stored in bfloat16 (half the memory, no cast at every step); the
    # adapters, which train, stay float32, and autocast runs the matmuls in bfloat16
    model = hf.from_pretrained(model_dir, dtype=DTYPES[cfg.dtype], device=device)
    lora.inject(model, cfg.targets.split(","), r=cfg.lora_r, lora_alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                seed=cfg.seed, dtype=torch.float64 if cfg.dtype == "float64" else torch.float32)
    return model.eval()


# ----------------------------------------------------------------------------------------------

def check_init_adapter(cfg: Config):
    """--init-adapter's adapter_config.json against this run's LoRA settings (its tensors are read, and
    checked by name and shape, once the model is loaded). A resumed run has its initial adapter in its
    checkpoint and reads no folder."""
    if cfg.init_adapter:
        hf.check_peft_config(cfg.init_adapter, cfg.lora_r, cfg.lora_alpha, cfg.targets.split(","))


def open_run(cfg: Config, args) -> tuple:
    """The run's settings, checked, and its saved state (None for a new run; nothing is written yet)."""
    check_flags(cfg, args)
    if args.resume:
        cfg = resumed_config(cfg, args.resume)
        state = runs.load_state(cfg.out)
    else:
        if cfg.rescore and "rescore" in args.given:  # (a seed of a re-scored study comes with its settings)
            cfg = rescored_config(cfg, args)
        state = runs.rescored_state(cfg.rescore, cfg.out, cfg.methods.split(",")) if cfg.rescore else None
        runs.check_new(cfg.out, args.overwrite)
    check_config(cfg)
    if state is None:
        check_init_adapter(cfg)
    return cfg, state


def run(cfg: Config, args):
    """Everything is read and checked before the first write, so a run that fails on bad input leaves
    any existing output folder exactly as it was."""
    t_start = time.time()
    cfg, state = open_run(cfg, args)
    device = choose_device(cfg.device)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    fd = load_data(cfg.data, cfg.seed, cfg.clients, cfg.dirichlet_alpha, cfg.min_client_size, cfg.test_per_task, cfg.tasks)
    unseen = (load_data(cfg.test_data, cfg.seed, 0, cfg.dirichlet_alpha, cfg.min_client_size, cfg.test_per_task).tests
              if cfg.test_data else {})  # only its tests: clients 0, as released
    t0 = time.time()
    model_dir, tok = base_and_tokenizer(cfg, device, not args.quiet)
    encoded = dict(zip(fd.client_ids, data.encode_clients(fd.clients, tok, cfg.cutoff, cfg.max_dropped)))  # by client id
    client_data = dict(zip(fd.client_ids, fd.clients))
    # keys kept apart: the two data sets may name a task alike
    every_test = {**fd.tests, **{f"{cfg.test_data}: {t}": recs for t, recs in unseen.items()}}
    data.check_lengths(cfg.model, tok, hf.config_from_hf(os.path.join(model_dir, "config.json")).context, every_test,
                       list(encoded.values()), cfg.cutoff, cfg.max_new_tokens)
    model = load_model(cfg, model_dir, device)
    pretrain_seconds = time.time() - t0
    bf16, progress = cfg.dtype == "bfloat16", not args.quiet

    # the run's wall time over all its processes: each checkpoint holds the seconds up to it ("elapsed"),
    # so a resumed part adds its own to those of the parts before it (a killed part's time after its
    # last checkpoint is lost with the work it did), and a resume that finds nothing to do adds none
    before = state.get("elapsed", 0.0) if state is not None else 0.0

    def save(s):
        s["elapsed"] = before + time.time() - t_start
        runs.save_state(cfg.out, s)
    if state is None:
        init = hf.read_peft(cfg.init_adapter, lora.adapter_tensors(model, "global")) if cfg.init_adapter else lora.get_adapter(model, "global")
        state = {"init": init, "trained": {}, "results": {}, "unseen": {}, "curves": {}, "current": None,
                 "pretrain_seconds": pretrain_seconds, "elapsed": time.time() - t_start}
        runs.start(cfg.out, asdict(cfg), state)
    elif cfg.rescore and not os.path.isfile(os.path.join(cfg.out, "checkpoint.pt")):  # a re-scoring run's start
        runs.check_state(state, model, len(fd.clients), os.path.join(cfg.rescore, "checkpoint.pt"))
        runs.start(cfg.out, asdict(cfg), state)
    else:
        runs.check_state(state, model, len(fd.clients), os.path.join(cfg.out, "checkpoint.pt"))
        runs.remove_partial_writes(cfg.out)
    methods = cfg.methods.split(",")
    rec = recipe(cfg)
    print(f"data: {fd.name}, {len(fd.clients)} clients, {sum(map(len, encoded.values()))} training examples, "
          f"{len(fd.tests)} test tasks x <= {max(map(len, fd.tests.values()))}; model: {model_dir} "
          f"({sum(p.numel() for p in model.parameters() if not p.requires_grad):,} frozen parameters); device {device}")
    for note in fd.notes:
        print(f"note: {note}")
    needed = {p for m in methods for p in feddpa.phases_of(m)}
    todo_phases = [p for p in feddpa.PHASES if p in needed and p not in state["trained"]]
    state.setdefault("unseen", {})  # a checkpoint written before --test-data existed has none
    state.setdefault("curves", {})  # nor one written before --eval-every
    todo_methods = [m for m in methods if m not in state["results"]]
    todo_unseen = [m for m in methods if unseen and m not in state["unseen"]]
    answers = (sum(evaluation.answers_needed(todo_methods, fd.tests, fd.client_ids).values())
               + sum(evaluation.answers_needed(todo_unseen, unseen, fd.client_ids, own_tasks=False).values()))
    print("work ahead: " + "; ".join(f"{p} {feddpa.schedule(p, rec, len(fd.clients))}" for p in todo_phases)
          + f"{'; ' if todo_phases else ''}{answers:,} answers of up to {cfg.max_new_tokens} tokens for {len(todo_methods)} methods")

    dec = evaluation.Decode(cfg.max_new_tokens, cfg.num_beams, cfg.eval_batch_size, cfg.cutoff)
    # fast.py's forwards, entered once for training and once for evaluation (--plain: never); rows is a
    # layout hint: about a micro-batch's real tokens, then a generation batch's rows
    with fast.enabled(model, rows=64 * cfg.micro_batch_size, on=not cfg.plain):
        for name in todo_phases:
            phase = feddpa.setup_phase(name, model, pad_id=tok.pad_id, recipe=rec, datasets=encoded, init=state["init"],
                                       trained=state["trained"])
            runs.run_phase(name, phase, state, save, out=cfg.out, progress=progress,
                           on_round=curve(cfg, state, evaluation.Evaluator(model, tok, dec, device, rec), fd)
                           if cfg.eval_every else None)

    def has_local(phase, k):
        return state["trained"][phase]["locals"][k] is not None
    # each method on the data set's own tests, then (--test-data) on the unseen tasks' tests; the answer
    # sets a method shares with one before it are generated once (evaluation.answer_key)
    with fast.enabled(model, rows=cfg.eval_batch_size * cfg.num_beams, on=not cfg.plain):
        for key, tests, client_tasks, todo in (("results", fd.tests, fd.client_tasks, todo_methods),
                                               ("unseen", unseen, None, todo_unseen)):
            ev = evaluation.Evaluator(model, tok, dec, device, rec)  # one per test set: its answer sets shared
            for method in todo:
                n = evaluation.answers_needed([method], tests, fd.client_ids, has_local=has_local, known=ev.answered,
                                              own_tasks=client_tasks is not None)
                bar = tqdm(total=n[method], unit="answer", leave=False,
                           desc=f"evaluating {method}{' on unseen tasks' if key == 'unseen' else ''}", disable=not progress)
                with bar, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    state[key][method] = evaluation.evaluate_method(method, ev, tests, client_data=client_data,
                                                                    client_tasks=client_tasks, trained=state["trained"],
                                                                    progress=bar)
                save(state)
    if todo_phases or todo_methods or todo_unseen or "elapsed" not in state:  # (a checkpoint from before "elapsed")
        save(state)  # the total that results.json gives, kept for a resume of the finished run
    res = runs.write_results(cfg.out, asdict(cfg), state, fd.client_tasks, state["elapsed"], fd.client_ids)
    runs.print_table(state["results"], list(fd.tests), fd.client_tasks, args.verbose)
    runs.print_privacy(res["training"])
    if unseen:
        runs.print_unseen(state["unseen"], cfg.test_data, list(unseen))
    runs.print_times(res["seconds"])
    print(f"\nresults: {os.path.join(cfg.out, 'results.json')}  ({time.time() - t_start:.0f}s)")


def curve(cfg: Config, state: dict, ev, fd: data.FedData):
    """--eval-every's hook for runs.run_phase: after every cfg.eval_every rounds of a phase, and after its
    last, the scores of the methods of that phase on a fixed seeded subset of cfg.curve_per_task test
    instances per task (ROUGE-1, exact match, and the teacher-forced loss on the reference answers:
    P_loss, TTP_loss), appended to state["curves"] (saved with the round's checkpoint). ev: an
    Evaluator, copied for each point (its answer sets are a point's own). Evaluating draws nothing from
    the clients' generators and leaves the model as it found it: training goes on as without it."""
    tests = {task: [recs[i] for i in sorted(torch.randperm(len(recs), generator=fed.seeded(cfg.seed, "curve", task))
                                            [:cfg.curve_per_task].tolist())] for task, recs in fd.tests.items()}
    client_data = dict(zip(fd.client_ids, fd.clients))

    def point(name: str, phase, federation):
        if federation.round % cfg.eval_every and federation.round != phase.rounds:
            return
        before = feddpa.PHASES[name].starts_from  # FedDPA-F's round comes after FedIT's
        rounds = federation.round + (len(state["trained"][before]["history"]) if before else 0)
        now = {**state["trained"],
               name: feddpa.phase_result(name, federation.global_adapter, phase.clients, trained=state["trained"])}
        one = replace(ev, answered={}, losses=True)
        for method in (m for m in (cfg.curve_methods or cfg.methods).split(",") if feddpa.METHODS[m].phase == name):
            with torch.autocast(torch.device(ev.device).type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
                r = evaluation.evaluate_method(method, one, tests, client_data=client_data,
                                               client_tasks=fd.client_tasks, trained=now)
            loss = evaluation.p_and_ttp(r["per_client"], fd.client_tasks, "loss")
            state["curves"].setdefault(method, []).append({"round": rounds, "P": r["P"], "TTP": r["TTP"],
                                                           "P_exact": r["exact"]["P"], "TTP_exact": r["exact"]["TTP"],
                                                           "P_loss": loss["P"], "TTP_loss": loss["TTP"]})
    return point


def run_seeds(cfg: Config, args):
    """The whole comparison once per seed, each in its own folder (resumed where it has begun), then the
    mean and standard deviation over seeds of every method's scores, in OUT/results.json and a table."""
    check_flags(cfg, args)
    if args.resume:
        cfg = resumed_config(cfg, args.resume)
    else:
        cfg = rescored_config(cfg, args) if cfg.rescore else cfg
        runs.check_new(cfg.out, args.overwrite)
    check_config(cfg)
    if not args.resume and not cfg.rescore:  # before OUT/config.json is written (a resumed study's new seeds: in open_run)
        check_init_adapter(cfg)

    def one(seed, out, begun):  # a re-scored study re-scores each of its seeds' runs
        rescore = os.path.join(cfg.rescore, f"seed{seed}") if cfg.rescore else ""
        run(replace(cfg, seed=seed, seeds="", out=out, rescore=rescore),
            argparse.Namespace(**{**vars(args), "resume": out if begun else None, "given": []}))
    runs.run_seeds(cfg.out, [int(s) for s in cfg.seeds.split(",")], asdict(cfg), one, defaults=asdict(Config()))


def main(argv=None):
    cfg, args = parse_args(argv)
    try:
        study = (cfg.seeds or (args.resume and runs.read_config(args.resume).get("seeds"))
                 or (cfg.rescore and not args.resume and runs.read_config(cfg.rescore).get("seeds")))
        run_seeds(cfg, args) if study else run(cfg, args)
    except KeyboardInterrupt:
        out = args.resume or cfg.out
        if os.path.isfile(os.path.join(out, "config.json")):
            print(f"interrupted; completed rounds are saved. Resume with: python train.py --resume {out}", file=sys.stderr)
        else:
            print("interrupted before the run started; nothing was saved", file=sys.stderr)
        sys.exit(130)
    except (UserError, data.DataError, hf.CheckpointError, fed.Diverged, ValueError, OSError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
