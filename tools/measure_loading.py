"""Measure the peak memory of loading a sharded bfloat16 checkpoint with hf.from_pretrained.

    python tools/measure_loading.py [--mb 300] [--shards 4] [--dtype bfloat16]

Writes a synthetic Llama checkpoint (random bfloat16 weights, about --mb MB, in --shards safetensors
shards with an index, as transformers shards big models) to a temporary folder, then loads it in a
fresh process and prints one line: the weights' size and the process's peak resident memory growth
while loading (VmHWM after minus VmRSS before, the peak reset first; Linux). A loader that keeps no second copy grows by about
the weights' size; one that reads a whole shard and then copies out of it grows by the weights plus
up to two shards.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_checkpoint(d: str, mb: int, shards: int, seed: int = 0):
    """A Llama of dim 1024 with as many layers as make about `mb` MB of bfloat16, in `shards` shards."""
    import torch

    import hf
    from model import Llama, ModelConfig
    per_layer = 2 * (4 * 1024 * 1024 + 3 * 1024 * 2816)            # bytes of one block's matrices
    layers = max(1, round((mb * 2 ** 20 - 2 * 2 * 1024 * 8192) / per_layer))
    config = ModelConfig(dim=1024, n_layers=layers, n_heads=16, n_kv_heads=16, vocab_size=8192, hidden_dim=2816,
                         max_seq_len=512, tie_embeddings=False)
    torch.manual_seed(seed)
    model = Llama(config).to(torch.bfloat16)
    hf.save_pretrained(model, d)                                   # config.json and one model.safetensors
    sd = hf.read_safetensors(os.path.join(d, "model.safetensors"))
    os.remove(os.path.join(d, "model.safetensors"))
    names = list(sd)
    weight_map = {}
    for i in range(shards):
        part = names[i * len(names) // shards:(i + 1) * len(names) // shards]
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        hf.write_safetensors({k: sd[k] for k in part}, os.path.join(d, shard))
        weight_map.update(dict.fromkeys(part, shard))
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return sum(t.numel() * t.element_size() for t in sd.values())


def status(key: str) -> int:
    """A memory figure of /proc/self/status, in bytes (ru_maxrss would not do: a child inherits its
    parent's peak across fork and exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def load(d: str, dtype: str):
    """In this process: load d, print weight bytes and peak RSS growth (bytes) as JSON."""
    import torch

    import hf
    with open("/proc/self/clear_refs", "w") as f:  # peak RSS (VmHWM) := current RSS
        f.write("5")
    before = status("VmRSS")
    model = hf.from_pretrained(d, dtype=getattr(torch, dtype))
    after = status("VmHWM")
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(json.dumps({"weights": weights, "growth": after - before,
                      "dtype": str(next(model.parameters()).dtype)}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=300)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--load", help=argparse.SUPPRESS)              # the child process: load this folder
    args = ap.parse_args(argv)
    if args.load:
        return load(args.load, args.dtype)
    res = measure(args.mb, args.shards, args.dtype)
    mib = 2 ** 20
    print(f"{res['on_disk'] / mib:.0f} MiB bfloat16 in {args.shards} shards, loaded as {res['dtype']}: weights "
          f"{res['weights'] / mib:.0f} MiB, peak memory growth {res['growth'] / mib:.0f} MiB "
          f"({res['growth'] / res['weights']:.2f}x the weights)")
    return res


def measure(mb: int, shards: int, dtype: str = "bfloat16") -> dict:
    """{on_disk, weights, growth (bytes), dtype} of loading a fresh synthetic checkpoint in a fresh process."""
    with tempfile.TemporaryDirectory() as d:
        on_disk = write_checkpoint(d, mb, shards)
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--load", d, "--dtype", dtype],
                           capture_output=True, text=True, check=True)
    return {"on_disk": on_disk, **json.loads(r.stdout.strip().splitlines()[-1])}


if __name__ == "__main__":
    main()
