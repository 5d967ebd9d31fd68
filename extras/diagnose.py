"""Why the dynamic weight moves little: how large each adapter's output is, layer by layer, on a client's
own task and on the others, from a finished run's saved adapters.

    python -m extras.diagnose OUT [--phase feddpa-t] [--per-task 10]   ->  OUT/diagnostics.json

For every client that trained a local adapter in the phase, and every LoRA layer: the root mean square,
over the real tokens of test prompts, of the global adapter's term (lora_alpha / r) B_g A_g x and of the
local adapter's (lora_alpha / r) B_l A_l x, each at weight 1, with x the layer's input in the model that
mixes the two at the training mix a (the -fixed row's model); beside them the base layer's own output W x,
for scale. Prompts: the first --per-task test instances of the client's own task ("own") and of every
other task ("other"). Each figure is the mean over clients of a client's RMS; for a study (--seeds),
one set per seed. `python -m extras.plot OUT` draws them (rms.png). A porter can skip this file.
"""
import argparse
import json
import os
import sys

import torch

import data
import feddpa
import hf
import lora
import runs
import train

TERMS = ("global", "local", "base")


@torch.no_grad()
def layer_rms(model, tok, records: list, adapters: dict, weights: dict, *, cutoff: int, batch_size: int = 16,
              bf16: bool = False) -> dict:
    """{term: [RMS per LoRA layer]} over the real tokens of records' prompts, term in TERMS: each adapter's
    own term at weight 1 and the base layer's output, at each layer's input in the model with `adapters`
    loaded and mixed by `weights`."""
    layers = [layer for _, layer in lora.lora_layers(model)]
    sums = {t: torch.zeros(len(layers), dtype=torch.float64) for t in TERMS}
    count, real = 0, None

    def hook(i):
        def fn(layer, args, out):
            x = args[0]                                                  # (B, T, in)
            for t in TERMS:
                y = layer.base_layer(x) if t == "base" else layer.update(t, 1.0, x, dropout=lambda v: v)  # (B, T, out)
                sums[t][i] += (y.double() ** 2).mean(-1)[real].sum().item()  # per token: its mean square
        return fn
    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with lora.using(model, adapters, weights), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for _, ids, mask in feddpa.prompt_batches(tok, records, batch_size, cutoff=cutoff):
                real = mask.bool()
                model.hidden(ids, mask)
                count += int(real.sum())
    finally:
        for h in handles:
            h.remove()
    return {t: (s / count).sqrt().tolist() for t, s in sums.items()}


def diagnose_run(run: str, phase: str, per_task: int, models: dict) -> dict:
    """The RMS of each term per layer, on own-task and other-task prompts, averaged over the run's clients.
    models: {model folder: (model, tokenizer)}, loaded once for every run that shares a base (the built-in
    base is pretrained per seed; a real checkpoint is one for all); the saved adapters replace its own."""
    cfg = train.resumed_config(train.Config(), run)
    fd = train.load_data(cfg.data, cfg.seed, cfg.clients, cfg.dirichlet_alpha, cfg.min_client_size, 0, cfg.tasks)
    model_dir, tok = train.base_and_tokenizer(cfg, torch.device("cpu"), False)
    if model_dir not in models:
        models[model_dir] = train.load_model(cfg, model_dir, torch.device("cpu")), tok
    model, tok = models[model_dir]
    d = os.path.join(run, "adapters", phase)
    g = hf.read_safetensors(os.path.join(d, "global.safetensors"))
    per_client = []
    for cid, task in zip(fd.client_ids, fd.client_tasks):
        path = os.path.join(d, f"client{cid}_local.safetensors")
        if not os.path.isfile(path):  # a client that never trained a local adapter
            continue
        adapters = {"global": g, "local": hf.read_safetensors(path)}
        own = fd.tests[task][:per_task]
        other = [r for t, recs in fd.tests.items() if t != task for r in recs[:per_task]]
        per_client.append({where: layer_rms(model, tok, recs, adapters, feddpa.mix(cfg.local_weight), cutoff=cfg.cutoff,
                                            bf16=cfg.dtype == "bfloat16")
                           for where, recs in (("own", own), ("other", other))})
    if not per_client:
        raise ValueError(f"{d}: no client's local adapter")
    mean = {f"{t}_{w}": [sum(c[w][t][i] for c in per_client) / len(per_client) for i in range(len(per_client[0][w][t]))]
            for t in TERMS for w in ("own", "other")}
    return {"clients": len(per_client), **mean}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="a finished run's folder, or a study's (train.py --seeds)")
    ap.add_argument("--phase", default="feddpa-t", help="the phase whose adapters to read (feddpa-t or feddpa-f)")
    ap.add_argument("--per-task", type=int, default=10, help="test prompts of each task (default 10)")
    args = ap.parse_args(argv)
    try:
        config = runs.read_config(args.out)
        seeds = [int(s) for s in config["seeds"].split(",")] if config.get("seeds") else None
        where = {s: os.path.join(args.out, f"seed{s}") for s in seeds} if seeds else {config["seed"]: args.out}
        models = {}
        per_seed = {str(s): diagnose_run(d, args.phase, args.per_task, models) for s, d in where.items()}
        model = next(iter(models.values()))[0]
        local_weight = train.resumed_config(train.Config(), next(iter(where.values()))).local_weight  # old names too
        result = {"phase": args.phase, "per_task": args.per_task, "local_weight": local_weight,
                  "layers": [path for path, _ in lora.lora_layers(model)], "per_seed": per_seed}
    except (OSError, KeyError, ValueError, runs.UserError, hf.CheckpointError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    hf.atomic_write(os.path.join(args.out, "diagnostics.json"), [json.dumps(result, indent=1).encode()])
    print(os.path.join(args.out, "diagnostics.json"))
    for s, r in per_seed.items():
        n = len(r["global_own"])
        print(f"seed {s}, {r['clients']} clients, mean over {n} layers: " + ", ".join(
            f"{k} {sum(v) / n:.4g}" for k, v in r.items() if k != "clients"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
