"""Inference benchmark (bench.py runs it): FedDPA's instance-wise dynamic weighting as evaluation.answer does
it, per-example weights inside batches with each client's references encoded once, against the official
code's procedure, one test instance at a time with its references drawn and encoded afresh.
"""
import random
import time

import torch

import data
import evaluation
import feddpa
import hf
import lora
from generate import generate


def one_at_a_time(m, tok, records, train_records, dec: evaluation.Decode, recipe: feddpa.Recipe, seed: int = 0):
    """The official code's procedure: for each test instance, draw K training instructions afresh,
    represent them and the instance (one batch of K + 1, local adapter alone), set lambda as a
    scalar weight, then generate that instance alone."""
    rng = random.Random(seed)
    out = []
    for rec in records:
        prompts = [data.encode_prompt(tok, r, dec.cutoff) for r in rng.sample(train_records, recipe.k_refs) + [rec]]
        ids, mask = data.pad_left(prompts, tok.pad_id)
        reps = feddpa.represent(m, ids, mask, recipe.pool).float()
        lam = feddpa.dynamic_lambda(reps[-1:], reps[:-1], recipe.lambda_scale).item()
        prompt = torch.tensor([prompts[-1]])
        with lora.mixed(m, feddpa.mix(lam, recipe.lambda_to)):
            out.append(generate(m, prompt, torch.ones_like(prompt), dec.max_new_tokens, tok.eos_id, tok.pad_id))
    return out


def bench_inference(d: str, tok, fd, n: int = 64):
    """Instances/s of both procedures on client 0's own task: the default base model with all seven
    projections adapted, random non-zero global and local adapters, 32 greedy tokens."""
    m = lora.inject(hf.from_pretrained(d), lora.TARGETS, r=8, lora_alpha=16, dropout=0.05).eval()
    g = torch.Generator().manual_seed(0)
    for _, layer in lora.lora_layers(m):
        for name in lora.ADAPTERS:
            layer.lora_B[name].weight.data.normal_(0, 0.02, generator=g)
    records = fd.tests[fd.client_tasks[0]][:n]
    dec, recipe = evaluation.Decode(max_new_tokens=32, batch_size=64), feddpa.Recipe()

    def ours():
        evaluation.answer(m, tok, records, dec, "cpu", dynamic=feddpa.paper_weight(m, tok, fd.clients[0], recipe, 0, "cpu"))
    rate = {}
    for name, run in (("batched", ours), ("single", lambda: one_at_a_time(m, tok, records, fd.clients[0], dec, recipe))):
        for _ in range(2):  # the faster of two runs, as for training
            t0 = time.perf_counter()
            run()
            rate[name] = max(rate.get(name, 0), n / (time.perf_counter() - t0))
    return rate["batched"], rate["single"]


def until_eos(row, eos: int) -> list:
    row = row.tolist()
    return row[:row.index(eos) + 1] if eos in row else row


def bench_generation(model_dir: str, records: list, num_beams: int, max_new_tokens: int = 80, batch: int = 8):
    """Our generate against transformers' generate on the same left-padded batch of prompts, taking
    turns, the faster of two runs each: (ours seconds, transformers seconds, tokens identical?, new tokens)."""
    from transformers import AutoModelForCausalLM
    ours = hf.from_pretrained(model_dir).eval()
    tok = hf.load_tokenizer(model_dir, ours.config)
    theirs = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids, mask = data.pad_left([data.encode_prompt(tok, r) for r in records[:batch]], tok.pad_id)
    best = {"ours": float("inf"), "hf": float("inf")}
    for _ in range(2):
        t0 = time.perf_counter()
        a = generate(ours, ids, mask, max_new_tokens, tok.eos_id, tok.pad_id, num_beams)
        best["ours"] = min(best["ours"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad():
            b = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                num_beams=num_beams, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)[:, ids.shape[1]:]
        best["hf"] = min(best["hf"], time.perf_counter() - t0)
    same = [until_eos(x, tok.eos_id) for x in a] == [until_eos(y, tok.eos_id) for y in b]
    return best["ours"], best["hf"], same, sum(len(until_eos(x, tok.eos_id)) for x in a)
