"""Pretraining the built-in foundation model: a tiny Llama (model.PRESETS["base"]) that learns the
built-in world's language, where its outsiders live and how each task is done about them, from its
corpus (builtin.corpus), cached as an HF directory.

A porter can skip this file: with a real checkpoint (--model DIR) nothing here runs. bench.py times
the same loop.
"""
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

import builtin
import data
import fast
import hf
from model import PRESETS, Llama, ModelConfig


def tokenizer_texts(seed: int = 0) -> list:
    """What the base's tokenizer is trained on: the corpus and the benchmark's training prompts, so that
    their words are pieces rather than bytes (the model itself never sees those records before fine-tuning)."""
    return builtin.corpus(seed) + [data.format_prompt(r) + r["output"] for recs in builtin.benchmark(seed).clients
                                   for r in recs]


def train_tokenizer(path: str, seed: int = 0):
    """The base's tokenizer (on tokenizer_texts)."""
    data.train_tokenizer(tokenizer_texts(seed), path, PRESETS["base"].vocab_size)
    return hf.SentencePieceTokenizer(path)


def token_rows(tok, texts: list, T: int = 128) -> torch.Tensor:
    """Texts as one [BOS] text [EOS] ... stream cut into rows of T tokens, (N, T)."""
    stream = torch.tensor([i for text in texts for i in [tok.bos_id, *tok.encode(text), tok.eos_id]])
    return stream[:len(stream) // T * T].view(-1, T)


BATCH = 16  # rows of 128 tokens per step: on a 2-core CPU, 200 steps of 16 reach a lower loss than 100 of 32 in less time


def pretrain(model: Llama, rows: torch.Tensor, steps: int, seed: int = 0, bf16: bool = False, batch: int = BATCH,
             lr: float = 3e-3, progress: bool = False, plain: bool = False) -> list:
    """Train every weight of model on random rows (N, T) of token_rows: AdamW, warmup then cosine decay,
    gradient clipping at 1.0; plain: without fast.py's forwards. Returns (seconds, loss) per step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95), fused=True)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(seed)
    device = model.lm_head.weight.device
    log = []
    bar = tqdm(range(steps), desc="pretraining the built-in base", leave=False, disable=not progress)
    with fast.enabled(model, rows=batch * rows.shape[1], on=not plain):
        for _ in bar:
            t0 = time.perf_counter()
            x = rows[torch.randint(len(rows), (batch,), generator=g)].to(device)  # (batch, T)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(x, labels=x)[1]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            log.append((time.perf_counter() - t0, loss.item()))
            bar.set_postfix(loss=f"{log[-1][1]:.3f}")
    return log


def cache_dir(cache: str, seed: int, steps: int, bf16: bool = False) -> str:
    """Where base_model keeps the base: named by a hash of its settings and of every text it is made
    from (the corpus, the tokenizer's texts), so that a changed world is a new base, never a stale one."""
    texts = hashlib.sha256("\0".join(tokenizer_texts(seed)).encode()).hexdigest()
    key = json.dumps([asdict(PRESETS["base"]), seed, steps, BATCH, texts] + (["bfloat16"] if bf16 else []))
    return os.path.join(os.path.expanduser(cache), f"base-{hashlib.sha256(key.encode()).hexdigest()[:12]}")


def base_model(cache: str, seed: int, steps: int, device, bf16: bool = False, progress: bool = False,
               plain: bool = False) -> str:
    """The HF directory of the built-in base, pretrained for `steps` on first use and cached under `cache`."""
    preset = PRESETS["base"]
    d = cache_dir(cache, seed, steps, bf16)
    if os.path.isfile(os.path.join(d, "model.safetensors")):
        return d
    tmp = f"{d}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    tok = train_tokenizer(os.path.join(tmp, "tokenizer.model"), seed)
    torch.manual_seed(seed)
    model = Llama(ModelConfig(**{**asdict(preset), "bos_id": tok.bos_id, "eos_id": tok.eos_id})).to(device)
    pretrain(model, token_rows(tok, builtin.corpus(seed)), steps, seed, bf16, progress=progress, plain=plain)
    hf.save_pretrained(model.cpu(), tmp)
    os.replace(tmp, d) if not os.path.exists(d) else shutil.rmtree(tmp)
    return d
