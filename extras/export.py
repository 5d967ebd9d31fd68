"""Use what a run trained elsewhere: its adapters as PEFT adapter folders, a client's fixed mix merged
into a plain Hugging Face model, and a PEFT adapter folder read back as an initial adapter.

    python export.py OUT DIR                              # every adapter of run OUT as PEFT folders
    python export.py OUT DIR --merge feddpa-t --client 3  # client 3's FedDPA-T model, training mix merged

PEFT folders (DIR/<phase>/global, DIR/<phase>/client<i>_local) hold adapter_config.json and
adapter_model.safetensors as peft writes them: PeftModel.from_pretrained(base, folder) gives the model
with that one adapter. The dynamic (per-instance) mix cannot be merged: it changes with every input,
while a merged model has one weight matrix. A porter can skip this file.
"""
import argparse
import json
import os
import shutil
import sys

import torch

import hf
import lora
import pretrain
from model import Llama



def lora_settings(config: dict) -> dict:
    """The LoRA settings of a run's config.json."""
    return {"r": config["lora_r"], "lora_alpha": config["lora_alpha"], "lora_dropout": config["lora_dropout"],
            "target_modules": sorted(config["targets"].split(","))}


def write_peft(adapter: dict, d: str, base: str, settings: dict):
    """One adapter (keyed as lora.get_adapter) as a PEFT adapter folder."""
    os.makedirs(d, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
              "use_rslora": False, "use_dora": False, **settings}
    hf.write_safetensors({hf.PEFT_PREFIX + k: v.float() for k, v in adapter.items()}, os.path.join(d, "adapter_model.safetensors"))
    hf.atomic_write(os.path.join(d, "adapter_config.json"), [json.dumps(config, indent=2).encode()])


def merged_model(model, weights: dict) -> Llama:
    """A plain Llama whose weights are model's base weights plus a fixed mix {adapter: weight} of the
    adapters in its slots folded in, W + sum_name weight * scaling * B A; model is not changed."""
    sd = {k.replace(".base_layer.", "."): v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    with torch.no_grad():
        for path, layer in lora.lora_layers(model):
            w = sd[f"{path}.weight"]
            for name, weight in weights.items():
                w += weight * layer.delta_weight(name).to(w.dtype)
    plain = Llama(model.config)
    plain.load_state_dict(sd, strict=False)
    if model.config.tie_embeddings:
        plain.lm_head.weight = plain.model.embed_tokens.weight
    return plain


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="a finished run's folder (train.py --out)")
    ap.add_argument("dest", help="where to write")
    ap.add_argument("--merge", metavar="PHASE", help="merge a client's adapters of this phase into a plain HF model")
    ap.add_argument("--client", type=int, default=0, help="with --merge: whose model (default 0)")
    ap.add_argument("--local-weight", type=float, help="with --merge: the local adapter's weight (default: the run's)")
    args = ap.parse_args(argv)
    try:
        with open(os.path.join(args.out, "config.json")) as f:
            config = json.load(f)
        base = config["model"] if config["model"] != "builtin" else builtin_base(config)
        settings = lora_settings(config)
        adapters = os.path.join(args.out, "adapters")
        if not args.merge:
            for phase in sorted(os.listdir(adapters)):
                for name in sorted(os.listdir(os.path.join(adapters, phase))):
                    state = hf.read_safetensors(os.path.join(adapters, phase, name))
                    write_peft(state, os.path.join(args.dest, phase, name.removesuffix(".safetensors")), base, settings)
            print(f"{args.dest}: every adapter of {args.out} as a PEFT folder (base {base})")
            return 0
        model = lora.inject(hf.from_pretrained(base), settings["target_modules"], r=settings["r"],
                            lora_alpha=settings["lora_alpha"], dropout=0.0)
        d = os.path.join(adapters, args.merge)
        lora.load_adapter(model, "global", hf.read_safetensors(os.path.join(d, "global.safetensors")))
        lora.load_adapter(model, "local", hf.read_safetensors(os.path.join(d, f"client{args.client}_local.safetensors")))
        w = config["local_weight"] if args.local_weight is None else args.local_weight
        hf.save_pretrained(merged_model(model, {"local": w, "global": 1 - w}), args.dest)
        for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            if os.path.isfile(os.path.join(base, name)):
                shutil.copy(os.path.join(base, name), os.path.join(args.dest, name))
        print(f"{args.dest}: client {args.client}'s {args.merge} model, local adapter at {w}, global at {1 - w}, merged")
        return 0
    except (OSError, KeyError, ValueError, hf.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def builtin_base(config: dict) -> str:
    """The built-in base a run used: its cached HF folder (pretrained anew, bit for bit, if the cache is gone)."""
    return pretrain.base_model(config["cache"], config["seed"], config["pretrain_steps"], torch.device("cpu"),
                               config["dtype"] == "bfloat16")


if __name__ == "__main__":
    sys.exit(main())
