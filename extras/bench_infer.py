"""Inference benchmarks (bench.py runs them): FedDPA's instance-wise dynamic weighting as evaluation.answer
does it, per-example weights inside batches with each client's references encoded once, against the
official code's procedure, one test instance at a time with its references drawn and encoded afresh;
the paper's inference-time table (the global adapter alone, the fixed mix, the dynamic weight, at
batch 1 and batched); and our generate against transformers' on a real checkpoint, with where each
one's time goes.
"""
import random
import time

import torch

import data
import evaluation
import fast
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
        reps = feddpa.represent(m, ids, mask, pool=recipe.pool).float()
        lam = feddpa.dynamic_lambda(reps[-1:], reps[:-1], recipe.lambda_scale).item()
        prompt = torch.tensor([prompts[-1]])
        out.append(generate(m, prompt, torch.ones_like(prompt), dec.max_new_tokens, tok.eos_id, tok.pad_id,
                            mix=feddpa.mix(lam, recipe.lambda_to)))
    return out


def adapted_base(d: str):
    """The model in folder d with all seven projections adapted, random non-zero global and local adapters."""
    m = lora.inject(hf.from_pretrained(d), lora.TARGETS, r=8, lora_alpha=16, dropout=0.05).eval()
    g = torch.Generator().manual_seed(0)
    for _, layer in lora.lora_layers(m):
        for name in lora.ADAPTERS:
            layer.lora_B[name].weight.data.normal_(0, 0.02, generator=g)
    return m


def bench_inference(d: str, tok, fd, n: int = 64):
    """Instances/s of both procedures on client 0's own task: the default base model (adapted_base), 32
    greedy tokens."""
    m = adapted_base(d)
    records = fd.tests[fd.client_tasks[0]][:n]
    dec, recipe = evaluation.Decode(max_new_tokens=32, batch_size=64), feddpa.Recipe()

    def ours():
        dynamic = feddpa.paper_weight(m, tok, fd.clients[0], recipe=recipe, client_id=0, device="cpu")
        evaluation.answer_dynamic(evaluation.Evaluator(m, tok, dec, "cpu", recipe), records, dynamic)
    rate = {}
    with fast.enabled(m, dec.batch_size):  # as train.py evaluates
        for name, run in (("batched", ours), ("single", lambda: one_at_a_time(m, tok, records, fd.clients[0], dec, recipe))):
            for _ in range(2):  # the faster of two runs, as for training
                t0 = time.perf_counter()
                run()
                rate[name] = max(rate.get(name, 0), n / (time.perf_counter() - t0))
    return rate["batched"], rate["single"]


INFERENCE_MODES = ("global adapter alone", "fixed mix", "dynamic weight")


def inference_time(d: str, tok, fd, n: int = 64, batches=(1, 64), max_new_tokens: int = 32) -> dict:
    """The paper's inference-time table: seconds per test instance of answering n instances of client 0's
    own task with the global adapter alone, the fixed mix a = 0.5, and the paper's dynamic weight, at
    each batch size, greedy, nothing shared between runs (each dynamic run draws and encodes the
    client's K references, then every instance's r(x), then answers). The default base model with all
    seven projections adapted (adapted_base); the faster of two runs. {(mode, batch): s}."""
    m = adapted_base(d)
    adapters = {name: lora.get_adapter(m, name) for name in lora.ADAPTERS}
    records, recipe = fd.tests[fd.client_tasks[0]][:n], feddpa.Recipe()
    times = {}
    for batch in batches:
        ev = evaluation.Evaluator(m, tok, evaluation.Decode(max_new_tokens=max_new_tokens, batch_size=batch), "cpu", recipe)

        def dynamic():
            weight = feddpa.paper_weight(m, tok, fd.clients[0], recipe=recipe, client_id=0, device="cpu")
            evaluation.answer_dynamic(ev, records, weight)
        runs = {"global adapter alone": ({"global": adapters["global"]}, lambda: evaluation.answer(ev, records, weights={"global": 1.0})),
                "fixed mix": (adapters, lambda: evaluation.answer(ev, records, weights=feddpa.mix(recipe.local_weight))),
                "dynamic weight": (adapters, dynamic)}
        with fast.enabled(m, batch):  # as train.py evaluates
            for mode, (loaded, run) in runs.items():
                with lora.using(m, loaded):
                    for _ in range(2):
                        t0 = time.perf_counter()
                        run()
                        times[mode, batch] = min(times.get((mode, batch), float("inf")), (time.perf_counter() - t0) / n)
    return times


def until_eos(row, eos: int) -> list:
    row = row.tolist()
    return row[:row.index(eos) + 1] if eos in row else row


# the products and attention both sides call; attention's backward is its own kernel (training)
KERNELS = ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise", "aten::bmm", "aten::baddbmm",
           "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def kernel_share(fn) -> tuple:
    """(seconds, of them in matrix products and attention kernels) of fn() under torch.profiler, by the
    kernels' self CPU time. Two implementations that do the same products spend the same time in
    them, so total / kernel seconds bounds how much faster any implementation can be with these kernels;
    the profiler's own cost per operation inflates the rest, so the bound errs on the generous side."""
    with torch.profiler.profile() as prof:
        t0 = time.perf_counter()
        fn()
        secs = time.perf_counter() - t0
    kernels = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in KERNELS) / 1e6
    return secs, kernels


def read_bandwidth(n_bytes: int = 1 << 30, reps: int = 5) -> float:
    """GB/s at which this machine reads memory: the best of `reps` sums over an n_bytes float32 tensor."""
    x = torch.ones(n_bytes // 4)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return n_bytes / best / 1e9


def bench_generation(ours, theirs, tok, records: list, num_beams: int, max_new_tokens: int = 32, batch: int = 16,
                     reference=None) -> dict:
    """Our generate (model `ours`) against transformers' (`theirs`, the same checkpoint in the same dtype)
    on the same left-padded batch of prompts, taking turns, the faster of two runs each. Returns seconds
    (ours, hf), whether the new tokens are identical, how many there are, our prefill's seconds and a
    decoding step's (from a run of one new token), the weights' bytes, each side's kernel share
    (kernel_share), our rows, and, given `reference` (rows from another run, e.g. float32), how many
    rows equal it."""
    ids, mask = data.pad_left([data.encode_prompt(tok, r) for r in records[:batch]], tok.pad_id)
    runs = {"ours": lambda n=max_new_tokens: generate(ours, ids, mask, n, tok.eos_id, tok.pad_id, num_beams),
            "hf": lambda: theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                          do_sample=False, num_beams=num_beams, eos_token_id=tok.eos_id,
                                          pad_token_id=tok.pad_id)[:, ids.shape[1]:]}
    best, rows = {"ours": float("inf"), "hf": float("inf"), "prefill": float("inf")}, {}
    with torch.no_grad(), fast.enabled(ours, batch * num_beams):  # ours as train.py evaluates
        for _ in range(2):
            for name, run in runs.items():
                t0 = time.perf_counter()
                rows[name] = [until_eos(x, tok.eos_id) for x in run()]
                best[name] = min(best[name], time.perf_counter() - t0)
            t0 = time.perf_counter()
            runs["ours"](1)
            best["prefill"] = min(best["prefill"], time.perf_counter() - t0)
        share = {name: kernel_share(run) for name, run in runs.items()}
    steps = max(len(r) for r in rows["ours"])
    weights = sum(p.numel() * p.element_size() for p in ours.parameters())  # a tied matrix counts once
    return {"ours": best["ours"], "hf": best["hf"], "same": rows["ours"] == rows["hf"], "rows": rows["ours"],
            "tokens": sum(map(len, rows["ours"])), "prefill": best["prefill"],
            "step": (best["ours"] - best["prefill"]) / max(steps - 1, 1), "weight_bytes": weights, "share": share,
            "equal_to_reference": None if reference is None else sum(a == b for a, b in zip(rows["ours"], reference))}
