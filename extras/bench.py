"""Throughput benchmark: LoRA training and generation (ours vs transformers + peft), FedDPA inference, pretraining.

    python -m extras.bench                           # every scenario (several minutes on 2 cores)
    python -m extras.bench --only a,infer --steps 3  # some: a b c d (31M / built-in), smol gen (SmolLM2), infer itime pretrain
    python -m extras.bench --e2e                     # also time the default `python train.py` (minutes)
    python -m extras.bench --only a --profile        # plus a torch.profiler table of our training step

Everything but --e2e runs in this one process on the CPU, with torch's default thread count.
Timings are only as quiet as the machine: take numbers worth quoting with nothing else running.

What is counted (tok/s, median, |dloss0|, FLOPs, %peak): see the README's Speed section.
"""
import argparse
import contextlib
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings

import torch

from extras import bench_infer
import builtin
import data
import fast
import hf
import lora
import pretrain
from model import IGNORE_INDEX, PRESETS, Llama, ModelConfig

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import peft  # noqa: F401
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # peft calls a deprecated transformers API
    HAVE_HF = True
except ImportError:
    HAVE_HF = False

# Scenarios a-c: a 31.4M-parameter Llama (23.2M in the blocks, 8.2M in the tied embedding / vocabulary
# projection). The vocabulary is 16000 because the 2,400 FLAN training texts support at most 30,640
# SentencePiece pieces, so Llama's 32000 cannot be trained on them.
MID = ModelConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, hidden_dim=1376, vocab_size=16000,
                        max_seq_len=512)
QV = ("q_proj", "v_proj")  # the paper's targets
SCENARIOS = ("a", "b", "c", "d", "infer", "itime", "gen", "smol", "pretrain")


# ----------------------------------------------------------------------------------------------
# The machine and its matmul peak

def machine() -> str:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    hf = f"transformers {transformers.__version__}, peft {peft.__version__}" if HAVE_HF else "transformers/peft absent"
    return (f"cpu: {cpu}, {os.cpu_count()} logical cores ({len(os.sched_getaffinity(0))} usable); torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads; {hf}; load average {os.getloadavg()[0]:.2f}")


def matmul_peak(dtype, n: int = 2048, reps: int = 10) -> float:
    """GFLOP/s of the best of `reps` n^3 matmuls, the faster of torch.mm (the default BLAS) and oneDNN
    with a reordered weight (fast.py's products: on AMD EPYC the default BLAS runs float32 at about
    half of what oneDNN reaches)."""
    return max(matmul_rates(dtype, n, reps).values())


def matmul_rates(dtype, n: int = 2048, reps: int = 10) -> dict:
    """{"torch.mm": GFLOP/s, "oneDNN": GFLOP/s} of the best of `reps` n^3 products each."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    runs = {"torch.mm": lambda: torch.mm(a, b)}
    if torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), n)  # a @ b as F.linear(a, b.T)
        runs["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
    out = {}
    for name, run in runs.items():
        run()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t0)
        out[name] = 2 * n ** 3 / best / 1e9
    return out


def step_flops(cfg: ModelConfig, tokens: int, labelled: int, per_weight: int = 4) -> int:
    """Matmul FLOPs of training steps over `tokens` real tokens, `labelled` of them with a label."""
    attn = cfg.dim * cfg.head_dim * 2 * (cfg.n_heads + cfg.n_kv_heads)   # q, o and k, v
    blocks = cfg.n_layers * (attn + 3 * cfg.dim * cfg.hidden_dim)
    return per_weight * (blocks * tokens + cfg.dim * cfg.vocab_size * labelled)


def describe(cfg: ModelConfig) -> str:
    with torch.device("meta"):
        n = sum(p.numel() for p in Llama(cfg).parameters())
    return (f"dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads / {cfg.n_kv_heads} kv, SwiGLU {cfg.hidden_dim}, "
            f"vocab {cfg.vocab_size}{' tied' if cfg.tie_embeddings else ''}: {n / 1e6:.1f}M parameters")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


# ----------------------------------------------------------------------------------------------
# Data: tokenizers trained as the project trains them, and batches as (ids, mask, labels)

def flan_data(path: str):
    """FLAN training texts and records, or (None, None) without the data set."""
    if not os.path.isdir(path):
        return None, None
    records = [r for client in data.load_federated(path).clients for r in client]
    return [data.format_prompt(r) + r["output"] for r in records], records


def packed_batches(tok, texts, n: int, B: int = 8, T: int = 256) -> list:
    """Texts as one [BOS] text [EOS] stream cut into (B, T) batches, labels on every token."""
    rows = pretrain.token_rows(tok, texts, T)
    out = [rows[i * B:(i + 1) * B] for i in range(min(n, len(rows) // B))]
    return [(x, torch.ones_like(x), x) for x in out]


def example_batches(tok, records, n: int, B: int = 8, seed: int = 0) -> list:
    """Random batches of B examples, labels on the response only, left-padded by data.collate."""
    examples = [e for e in (data.encode_example(tok, r, 512) for r in records) if e is not None]
    g = torch.Generator().manual_seed(seed)
    return [data.collate([examples[i] for i in torch.randperm(len(examples), generator=g)[:B].tolist()], tok.pad_id)
            for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# Models: one set of random base weights in an HF directory, loaded fresh by both implementations

def save_base(cfg: ModelConfig, d: str) -> str:
    torch.manual_seed(0)
    hf.save_pretrained(Llama(cfg), d)
    return d


def build(d: str, targets, is_hf: bool, bf16: bool = False):
    """A fresh LoRA model (r=8, alpha=16, dropout 0.05) on the weights in d: ours, as train.py builds
    it (one adapter trains, alone), or LlamaForCausalLM + peft. bf16: the frozen base in bfloat16,
    float32 adapters, as train.py --dtype bfloat16 and peft (autocast_adapter_dtype) both do."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if bf16 else torch.float32
    if not is_hf:
        m = lora.inject(hf.from_pretrained(d, dtype=dtype), targets, r=8, lora_alpha=16, dropout=0.05, dtype=torch.float32)
        lora.set_trainable(m, "global")
        return m
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    return get_peft_model(LlamaForCausalLM.from_pretrained(d, dtype=dtype),
                          LoraConfig(r=8, lora_alpha=16, target_modules=list(targets), lora_dropout=0.05))


def loss_of(m, is_hf: bool, batch, bf16: bool = False):
    ids, mask, labels = batch
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if is_hf:  # positions count real tokens, as ours do, so left-padded rows match
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            return m(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels).loss
        with lora.mixed(m, {"global": 1.0}):  # the adapter that trains, alone
            return m(ids, mask, labels)[1]


def stepper(m, is_hf: bool, bf16: bool = False, lr: float = 3e-3):
    """A function that takes one AdamW step of m on a batch and returns (seconds, real tokens, labelled
    tokens, loss)."""
    # fused AdamW for both: what fed.train_adapter uses, and transformers' Trainer default (adamw_torch_fused)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, fused=True)
    g = torch.Generator().manual_seed(1)  # ours: LoRA dropout's draws, the same for every run (as a client's)

    def step(batch):
        m.train()
        t0 = time.perf_counter()
        with contextlib.nullcontext() if is_hf else lora.training(m, "global", g):
            loss = loss_of(m, is_hf, batch, bf16)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, int(batch[1].sum()), int((batch[2][:, 1:] != IGNORE_INDEX).sum()), loss.item()
    return step


def train(m, is_hf: bool, batches, steps: int, warmup: int = 2, bf16: bool = False) -> list:
    """AdamW steps over batches (cycled); the (seconds, tokens, labelled, loss) of the last `steps`.
    Ours runs as train.py runs it, with fast.py's forwards."""
    step = stepper(m, is_hf, bf16)
    torch.manual_seed(1)  # the same LoRA dropout masks for every run (transformers + peft: torch's generator)
    with contextlib.nullcontext() if is_hf else fast.enabled(m, rows=512):
        return [step(batches[i % len(batches)]) for i in range(warmup + steps)][warmup:]


def rates(cfg, steps, peak: float, per_weight: int = 4) -> tuple:
    """(tok/s, GFLOP/s, % of peak) of the fastest step: like the peak, the machine at its quietest."""
    secs, tokens, labelled, _ = max(steps, key=lambda s: s[1] / s[0])
    gflops = step_flops(cfg, tokens, labelled, per_weight) / secs / 1e9
    return tokens / secs, gflops, 100 * gflops / peak


def compare(cfg, d: str, targets, batches, steps: int, peak: float, bf16: bool = False, profile: bool = False) -> dict:
    """One row: ours and transformers + peft, each fresh from d, taking turns step by step on the same
    batches, so that a slow spell of a shared machine hits both. With bf16, transformers + peft in
    float32 takes its turn too (row["hf32"]): target c compares against it. profile: then one more
    step of each under the profiler (row["share"], bench_infer.kernel_share)."""
    runs = {"ours": (False, bf16)}  # name: (transformers + peft?, bf16?)
    if HAVE_HF:
        runs["hf"] = (True, bf16)
        if bf16:
            runs["hf32"] = (True, False)
    models = {name: build(d, targets, is_hf=is_hf, bf16=half) for name, (is_hf, half) in runs.items()}
    with fast.enabled(models["ours"], rows=512):  # as train.py runs it
        return compare_built(cfg, models, runs, batches, steps, peak, profile)


def compare_built(cfg, models: dict, runs: dict, batches, steps: int, peak: float, profile: bool) -> dict:
    row = {}
    with torch.no_grad():
        for name, (is_hf, half) in runs.items():
            row[name + "_loss0"] = loss_of(models[name].eval(), is_hf, batches[0], half).item()
    steps_of = {name: stepper(models[name], is_hf, half) for name, (is_hf, half) in runs.items()}
    timed = {name: [] for name in runs}
    torch.manual_seed(1)
    for i in range(2 + steps):  # 2 untimed warmup steps
        for name in runs:
            s = steps_of[name](batches[i % len(batches)])
            if i >= 2:
                timed[name].append(s)
    for name in runs:
        row[name] = rates(cfg, timed[name], peak)
    if HAVE_HF:  # the ratio of step times, step by step, is steadier than the ratio of the best steps
        row["median"] = sorted(h[0] / o[0] for o, h in zip(timed["ours"], timed["hf"]))[steps // 2]
    if profile and HAVE_HF:
        row["share"] = {name: bench_infer.kernel_share(lambda: steps_of[name](batches[0])) for name in ("ours", "hf")}
    return row


def print_row(name: str, row: dict):
    def cols(impl):
        return "{:>9.0f} {:>8.1f} {:>5.1f}%".format(*row[impl]) if impl in row else f"{'-':>9} {'-':>8} {'-':>6}"
    ratio = f"{row['ours'][0] / row['hf'][0]:6.2f}x {row['median']:5.2f}x" if "hf" in row else f"{'-':>7} {'-':>6}"
    dloss = f"{abs(row['ours_loss0'] - row['hf_loss0']):9.1e}" if "hf" in row else f"{'-':>9}"
    print(f"{name:<34}{cols('ours')} |{cols('hf')} |{ratio} {dloss} {rss_mb():7.0f}", flush=True)


# ----------------------------------------------------------------------------------------------
# Pretraining the built-in base, and the default run end to end

def bench_pretrain(tok, steps: int, peak: float, warmup: int = 2):
    """pretrain.pretrain, the loop that trains the built-in base: batch pretrain.BATCH x 128, AdamW + clipping."""
    torch.manual_seed(0)
    log = pretrain.pretrain(Llama(PRESETS["base"]), pretrain.token_rows(tok, builtin.corpus(0)), warmup + steps)
    return rates(PRESETS["base"], [(secs, pretrain.BATCH * 128, pretrain.BATCH * 127, loss) for secs, loss in log[warmup:]],
                 peak, per_weight=6)


def bench_e2e() -> tuple:
    """Seconds and peak RSS (MB) of `python train.py` with a cold cache (so pretraining included).
    The peak is the child's own VmHWM: its ru_maxrss would start from this process's peak."""
    child = ("import atexit, runpy, sys\n"
             "atexit.register(lambda: print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0], file=sys.stderr))\n"
             "sys.argv = sys.argv[1:]\n"
             "runpy.run_path('train.py', run_name='__main__')")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", child, "train.py", "--out", f"{tmp}/out", "--cache", f"{tmp}/cache"],
                           cwd=HERE, capture_output=True, text=True)
        secs = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"train.py failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return secs, int(r.stderr.split()[-1]) / 1024  # kB


def profile(d: str, batches, steps: int = 3):
    """torch.profiler's table of our LoRA training step (scenario a)."""
    m = build(d, QV, is_hf=False)
    train(m, False, batches, steps=0)
    with torch.profiler.profile() as prof:
        train(m, False, batches, steps=steps, warmup=0)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


# ----------------------------------------------------------------------------------------------
# The report

def flan_rows(args, only, peak32, peak16, tmp):
    """Scenarios a-c on the 31M model; with --profile, the profiler's table of scenario a's step."""
    texts, records = flan_data(args.flan)
    d = save_base(MID, os.path.join(tmp, "mid"))
    if texts is None:
        print(f"  (no FLAN data at {args.flan}: a and c use the built-in corpus, b is skipped)")
        texts = builtin.corpus(0)
    data.train_tokenizer(texts, os.path.join(d, "tokenizer.model"), 16000 if records else 1024)
    tok = hf.SentencePieceTokenizer(os.path.join(d, "tokenizer.model"))
    print(f"  a-c model: {describe(MID)}; tokenizer: {tok.vocab_size} pieces trained on the "
          f"{'FLAN training texts' if records else 'built-in corpus'}; LoRA on q_proj, v_proj")
    n = args.steps + 2
    packed = packed_batches(tok, texts, max(n, args.check_steps))
    if "a" in only:
        print_row("a fp32, 31M, 8x256, all labelled", compare(MID, d, QV, packed[:n], args.steps, peak32))
    if "b" in only and records:
        flan = example_batches(tok, records, n)
        shape = f"8x{sum(b[0].shape[1] for b in flan) / n:.0f}"
        print_row(f"b fp32, 31M, FLAN {shape}, response", compare(MID, d, QV, flan, args.steps, peak32))
    if "c" in only:
        print_row("c bf16 base + autocast (both), as a", c := compare(MID, d, QV, packed[:n], args.steps, peak16, bf16=True))
        if "hf32" in c:
            print(f"  c: ours in bf16 / transformers + peft in float32, taking turns in the same run: "
                  f"{c['ours'][0] / c['hf32'][0]:.2f}x ({c['hf32'][0]:.0f} tok/s)")
        final = [train(build(d, QV, is_hf=False, bf16=bf16), False, packed, args.check_steps, warmup=0, bf16=bf16)[-1][3]
                 for bf16 in (False, True)]
        diff = 100 * abs(final[1] - final[0]) / final[0]
        print(f"  c: loss after {args.check_steps} steps from the same init on the same batches: float32 "
              f"{final[0]:.4f}, bf16 {final[1]:.4f} ({diff:.2f}%, {'within' if diff <= 1 else 'NOT within'} 1%)")
    if args.profile:
        profile(d, packed)


def dtypes(choice: str, peak32: float) -> list:
    """The (dtype, matmul peak) pairs of scenarios gen and smol. auto: bfloat16 only where it is fast here:
    without bfloat16 instructions (AVX-512 BF16, AMX) torch multiplies bfloat16 matrices tens of times
    slower than float32."""
    names = ["float32", "bfloat16"] if choice == "auto" else choice.split(",")
    if set(names) - {"float32", "bfloat16"}:
        raise SystemExit(f"--dtypes {choice!r}: float32, bfloat16 or both, comma-separated")
    peak16 = matmul_peak(torch.bfloat16, n=512, reps=3) if "bfloat16" in names else 0.0
    if choice == "auto" and peak16 < peak32 / 2:
        print(f"\n(bfloat16 left out of gen and smol: this CPU multiplies bfloat16 matrices at {peak16:.1f} GFLOP/s "
              f"(512^3), float32 at {peak32:.1f}; --dtypes float32,bfloat16 runs it anyway)")
        names.remove("bfloat16")
    return [(getattr(torch, name), peak32 if name == "float32" else peak16) for name in names]


def smollm2_rows(args, only, kinds: list):
    """Scenarios on SmolLM2-135M-Instruct: the LoRA training step on FLAN batches of 8 (smol) and
    generation on FLAN test prompts (gen), against transformers (+ peft), in each dtype of `kinds`, with
    each side's share of time in matrix-product and attention kernels (bench_infer.kernel_share)."""
    if not (os.path.isdir(args.flan) and os.path.isdir(args.smollm2)):
        print("\n(gen and smol skipped: they need --flan data and --smollm2 model directories)")
        return
    fd = data.load_federated(args.flan)
    cfg = hf.config_from_hf(os.path.join(args.smollm2, "config.json"))
    tok = hf.load_tokenizer(args.smollm2, cfg)
    if "smol" in only and HAVE_HF:
        records = [r for client in fd.clients for r in client]
        batches = example_batches(tok, records, args.steps + 2)
        shape = f"8x{sum(b[0].shape[1] for b in batches) / len(batches):.0f}"
        print(f"\n1b. LoRA training step, SmolLM2-135M-Instruct ({describe(cfg)}), q_proj and v_proj, FLAN {shape}")
        for dtype, peak in kinds:
            bf16 = dtype == torch.bfloat16
            row = compare(cfg, args.smollm2, QV, batches, args.steps, peak, bf16=bf16, profile=True)
            print_row(f"s {'bf16 base' if bf16 else 'fp32'}, SmolLM2, FLAN {shape}", row)
            print_share("s", row["share"])
    if "gen" in only and HAVE_HF:
        tests = [r for rs in zip(*fd.tests.values()) for r in rs]  # the tasks in turn
        print(f"\n2b. generation, SmolLM2-135M-Instruct, {args.gen_batch} FLAN test prompts left-padded, "
              f"{args.gen_tokens} new tokens, the faster of 2 runs each; memory read here: "
              f"{bench_infer.read_bandwidth():.1f} GB/s")
        from transformers import AutoModelForCausalLM
        fp32_rows = {}
        for dtype, _ in kinds:
            ours = hf.from_pretrained(args.smollm2, dtype=dtype).eval().requires_grad_(False)  # frozen, as train.py's base
            theirs = AutoModelForCausalLM.from_pretrained(args.smollm2, dtype=dtype).eval()
            for beams in (1, 4):
                g = bench_infer.bench_generation(ours, theirs, tok, tests, beams, args.gen_tokens, args.gen_batch,
                                                 reference=fp32_rows.get(beams))
                fp32_rows.setdefault(beams, g["rows"])
                same = "identical" if g["same"] else "NOT identical"
                ref = "" if g["equal_to_reference"] is None else f", {g['equal_to_reference']}/{args.gen_batch} rows as in float32"
                print(f"   {str(dtype).split('.')[1]:>8} {beams} beam(s): ours {g['ours']:6.2f}s, transformers "
                      f"{g['hf']:6.2f}s: ours {g['hf'] / g['ours']:.2f}x; {g['tokens']} tokens, {same}{ref}")
                print(f"      ours: prefill {g['prefill']:.2f}s, then {1e3 * g['step']:.0f} ms a decoding step "
                      f"(reads {g['weight_bytes'] / 1e6:.0f} MB of weights: {g['weight_bytes'] / g['step'] / 1e9:.1f} GB/s)")
                print_share("      ", g["share"])


def print_share(prefix: str, share: dict):
    """Each side's seconds and kernel seconds, and the bound they set: transformers' time over the
    smaller kernel time is the most that any implementation calling these kernels can gain."""
    (t_o, k_o), (t_h, k_h) = share["ours"], share["hf"]
    print(f"{prefix}  profiled: ours {t_o:.2f}s, {100 * k_o / t_o:.0f}% in matmul/attention kernels; transformers "
          f"{t_h:.2f}s, {100 * k_h / t_h:.0f}%: with these kernels at most {t_h / min(k_o, k_h):.2f}x", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per scenario, after 2 warmup steps (default 8)")
    ap.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios (default: all)")
    ap.add_argument("--check-steps", type=int, default=50, help="scenario c: steps of the bf16 vs fp32 loss check")
    ap.add_argument("--flan", default=os.environ.get("FEDDPA_FLAN", "data/feddpa-flan1"),
                    help="FLAN data set 1 (python fetch.py DIR; default $FEDDPA_FLAN or data/feddpa-flan1)")
    ap.add_argument("--smollm2", default=os.environ.get("FEDDPA_SMOLLM2", os.path.expanduser("~/.cache/feddpa/smollm2-135m-instruct")),
                    help="scenarios gen and smol: an HF folder of SmolLM2-135M-Instruct (python tools/get_smollm2.py)")
    ap.add_argument("--dtypes", default="auto", help="gen and smol: float32,bfloat16 or one of them; auto (default): "
                    "bfloat16 too where this CPU multiplies bfloat16 matrices at least half as fast as float32")
    ap.add_argument("--gen-batch", type=int, default=16, help="gen: prompts per batch (default 16; evaluation uses 64)")
    ap.add_argument("--gen-tokens", type=int, default=32, help="gen: new tokens (default 32)")
    ap.add_argument("--e2e", action="store_true", help="also time `python train.py` end to end (minutes)")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's table of our step (scenario a)")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    if only - set(SCENARIOS):
        ap.error(f"--only: unknown scenario(s) {', '.join(sorted(only - set(SCENARIOS)))}; choose from {', '.join(SCENARIOS)}")
    print(machine())
    if os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.2f}: if other processes are running, the numbers below are noisy")
    # bfloat16's peak only where a bfloat16 scenario needs it: a CPU without bfloat16 instructions (AVX2
    # only) runs a 2048^3 bfloat16 matmul in about a minute and a half
    rates32 = matmul_rates(torch.float32)
    peak32, peak16 = max(rates32.values()), matmul_peak(torch.bfloat16) if "c" in only else float("nan")
    print(f"matmul peak (2048^3, best of 10): float32 {peak32:.1f} GFLOP/s ("
          + ", ".join(f"{k} {v:.1f}" for k, v in rates32.items()) + ")"
          + (f", bfloat16 {peak16:.1f} GFLOP/s" if "c" in only else ""))
    if not HAVE_HF:
        print("transformers / peft are not installed: their column is skipped")
    tmp = tempfile.TemporaryDirectory()

    if only & {"a", "b", "c", "d"}:
        print(f"\n1. LoRA training step (r=8, alpha 16, dropout 0.05, AdamW); fastest of {args.steps} steps after 2 warmup")
        print(f"{'':<34}{'ours':^25}|{'transformers + peft':^25}|{'ours/HF':^14} {'|dloss0|':>9} {'RSS MB':>7}")
        print(f"{'scenario':<34}{'tok/s':>9} {'GFLOP/s':>8} {'peak':>6} |{'tok/s':>9} {'GFLOP/s':>8} {'peak':>6} |"
              f"{'best':>7} {'median':>6}")
    if only & {"a", "b", "c"}:
        flan_rows(args, only, peak32, peak16, tmp.name)
    if only & {"d", "infer", "itime", "pretrain"}:
        tok, fd = pretrain.train_tokenizer(os.path.join(tmp.name, "tok.model")), builtin.benchmark(0)
        d = save_base(PRESETS["base"], os.path.join(tmp.name, "base"))
    if "d" in only:
        print(f"  d model: the built-in base, {describe(PRESETS['base'])}; LoRA on all seven projections")
        records = [r for client in fd.clients for r in client]
        for B in (8, 4):  # 4: the batch of the default run
            batches = example_batches(tok, records, args.steps + 2, B=B)
            row = compare(PRESETS["base"], d, lora.TARGETS, batches, args.steps, peak32)
            print_row(f"d fp32, default base, batch {B}", row)
    if "infer" in only:
        batched, single = bench_infer.bench_inference(d, tok, fd)
        print(f"\n2. FedDPA inference, dynamic weighting, default base, 64 instances, 32 greedy tokens\n"
              f"   batched per-example weights, cached references (ours)   {batched:8.2f} instances/s\n"
              f"   one at a time, references drawn per instance (official) {single:8.2f} instances/s"
              f"   ours {batched / single:.1f}x")
    if "itime" in only:
        times = bench_infer.inference_time(d, tok, fd)
        print("\n2b. inference time per instance (the paper's table), default base, 64 instances of one task, "
              "32 greedy tokens, nothing shared\n" + f"   {'':<24}{'batch 1':>12}{'batch 64':>12}")
        for mode in bench_infer.INFERENCE_MODES:
            print(f"   {mode:<24}" + "".join(f"{1000 * times[mode, b]:>9.1f} ms" for b in (1, 64)))
    if only & {"gen", "smol"}:
        smollm2_rows(args, only, dtypes(args.dtypes, peak32))
    if "pretrain" in only or args.e2e:
        print("\n3. the built-in base and the default run")
    if "pretrain" in only:
        tps, gflops, pct = bench_pretrain(tok, args.steps, peak32)
        print(f"   pretraining step (batch {pretrain.BATCH} x 128, all weights, AdamW + clipping): {tps:.0f} tok/s, "
              f"{gflops:.1f} GFLOP/s ({pct:.1f}% of float32 peak)")
    if args.e2e:
        secs, child = bench_e2e()
        print(f"   `python train.py` end to end, cold cache (pretraining included): {secs:.0f}s, peak RSS {child:.0f} MB")
    print(f"peak RSS of this process: {rss_mb():.0f} MB; load average now {os.getloadavg()[0]:.2f}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
