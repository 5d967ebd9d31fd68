"""Shared fixtures and helpers of the test suite: the tiny models, the built-in world's data, small
federated folders, and the paths of the real data and model that only some machines have."""
import functools
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import builtin
import data
import hf
import lora
from model import PRESETS, Llama, ModelConfig

ROOT = Path(__file__).resolve().parent
# The real data and model, where this machine has them: FEDDPA_FLAN (python -m extras.fetch DIR makes
# it) and FEDDPA_SMOLLM2 (python tools/get_smollm2.py makes it); by default the copies beside this checkout.
FLAN = Path(os.environ.get("FEDDPA_FLAN", ROOT.parent / "shared" / "data" / "feddpa-flan1"))
needs_flan = pytest.mark.skipif(not FLAN.is_dir(), reason=f"FLAN data set 1 is not at {FLAN}: "
                                "python -m extras.fetch DIR, then FEDDPA_FLAN=DIR")
CATEGORIES = ["coreference", "entailment", "linguistic_acceptability", "paraphrase",
              "question_classification", "structure_to_text", "text_formatting", "word_disambiguation"]


@functools.cache
def smollm2_dir() -> str:
    """The offline HF folder of SmolLM2-135M-Instruct: FEDDPA_SMOLLM2, else built (once; cached) by
    tools/get_smollm2.py; the calling test skips, saying why, where neither can be had."""
    if os.environ.get("FEDDPA_SMOLLM2"):
        return os.environ["FEDDPA_SMOLLM2"]
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "get_smollm2.py")], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"no SmolLM2-135M-Instruct ({(r.stderr.strip().splitlines() or ['?'])[-1]}): "
                    "python tools/get_smollm2.py, or FEDDPA_SMOLLM2=DIR")
    return r.stdout.strip().splitlines()[-1].rsplit(" ", 1)[0]


def hf_tiny(d, tie=False, seed=0, vocab=96):
    """A random tiny HF Llama with grouped-query attention, saved by transformers to directory d."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    theirs = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than HF's init, so the logits are far from uniform
        for p in theirs.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    theirs.save_pretrained(d)
    return theirs


def left_padded(vocab, seed=1, lengths=(5, 9, 7), pad=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, T - n:] = 1
    return ids.masked_fill(mask == 0, pad), mask


def until_eos(row, eos=2):
    row = row.tolist()
    return row[:row.index(eos) + 1] if eos in row else row


def tree_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def safetensors_bytes(header: dict, buffer: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + buffer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama (random weights) with a sentencepiece tokenizer trained on the built-in data."""
    d = tmp_path_factory.mktemp("tiny")
    world = builtin.benchmark(seed=0, n_train=40, n_test=6)
    texts = builtin.corpus(n_docs=200) + [data.format_prompt(r) + r["output"] for c in world.clients for r in c]
    data.train_tokenizer(texts, str(d / "tokenizer.model"), vocab_size=512)
    torch.manual_seed(0)
    config = ModelConfig(**{**PRESETS["tiny"].__dict__, "vocab_size": 512})
    hf.save_pretrained(Llama(config), str(d))
    return d


@pytest.fixture()
def tiny(tiny_dir):
    m = hf.from_pretrained(str(tiny_dir))
    tok = hf.load_tokenizer(str(tiny_dir), m.config)
    lora.inject(m, r=4, lora_alpha=8)
    world = builtin.benchmark(seed=0, n_train=40, n_test=6)
    return m.eval(), tok, world


@pytest.fixture(scope="module")
def world():
    return builtin.benchmark(seed=0)


@pytest.fixture(scope="module")
def tok(world, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    prompts = [data.format_prompt(r) + r["output"] for recs in world.clients for r in recs]
    data.train_tokenizer(builtin.corpus(n_docs=500) + prompts, str(path))
    return hf.SentencePieceTokenizer(str(path))


def write_three_clients(path, n_train: int, n_test: int):
    """The built-in benchmark's first three clients and their tasks' tests, in the paper's layout at path."""
    world = builtin.benchmark(seed=0, n_train=n_train, n_test=n_test)
    tests = [r for recs in list(world.tests.values())[:3] for r in recs]
    data.write_federated(data.federated_data("tiny", world.clients[:3], tests), path)
    return path


def small_fed():
    return builtin.benchmark(seed=0, n_train=3, n_test=2)


def set_client(path, i, text):
    (path / "8" / f"local_training_{i}.json").write_text(text, encoding="utf-8")


def edit_record(i, **changes):
    def mutate(path):
        records = json.loads((path / "8" / f"local_training_{i}.json").read_text(encoding="utf-8"))
        records[0].update(changes)
        records[0] = {k: v for k, v in records[0].items() if v is not ...}  # ... deletes the key
        set_client(path, i, json.dumps(records))
    return mutate


def edit_test_line(number, text):
    def mutate(path):
        lines = (path / "test.jsonl").read_text(encoding="utf-8").split("\n")
        lines[number - 1] = text
        (path / "test.jsonl").write_text("\n".join(lines), encoding="utf-8")
    return mutate


def remove(*names):
    def mutate(path):
        for name in names:
            target = path / name
            for child in sorted(target.rglob("*"), reverse=True) if target.is_dir() else []:
                child.unlink()
            target.rmdir() if target.is_dir() else target.unlink()
    return mutate


MALFORMED = {  # case -> (mutation, pieces the message must contain)
    "invalid JSON": (lambda p: set_client(p, 1, '[{"instruction": '), ["local_training_1.json", "line 1", "invalid JSON"]),
    "invalid JSONL": (edit_test_line(2, '{"instruction": "x",'), ["test.jsonl", "line 2", "invalid JSON"]),
    "top level not a list": (lambda p: set_client(p, 0, '{"instruction": "x"}'), ["local_training_0.json", "must be a list"]),
    "record not an object": (lambda p: set_client(p, 2, '[["a"]]'), ["local_training_2.json", "record 0", "JSON object"]),
    "missing instruction": (edit_record(3, instruction=...), ["local_training_3.json", "record 0", "missing 'instruction'"]),
    "missing output": (edit_record(3, output=...), ["local_training_3.json", "missing 'output'"]),
    "empty output": (edit_record(4, output="  "), ["local_training_4.json", "record 0", "'output' is empty"]),
    "empty instruction": (edit_record(4, instruction=""), ["local_training_4.json", "'instruction' is empty"]),
    "category not a string": (edit_record(5, category=7), ["local_training_5.json", "'category' must be a string"]),
    "missing category": (edit_test_line(3, '{"instruction": "a", "output": "b"}'), ["test.jsonl", "line 3", "missing 'category'"]),
    "input not a string": (edit_record(6, input=["a"]), ["local_training_6.json", "'input' must be a string, not a list"]),
    "task not a string": (edit_record(6, task=None), ["local_training_6.json", "'task' must be a string, not null"]),
    "empty client file": (lambda p: set_client(p, 7, "[]"), ["local_training_7.json", "no records"]),
    "no client files": (remove(*(f"8/local_training_{i}.json" for i in range(8))), ["8", "no local_training"]),
    "no client folder": (remove("8"), ["<n_clients>/", "found 0"]),
    "count mismatch": (lambda p: (p / "8").rename(p / "9"), ["9", "says 9 clients", "holds 8"]),
    "index gap": (remove("8/local_training_3.json"), ["local_training_3.json is missing"]),
    "bad client file name": (lambda p: set_client(p, "x", "[]"), ["local_training_x.json", "named"]),
    "no test file": (remove("test.jsonl"), ["test .jsonl", "found 0"]),
    "two test files": (lambda p: (p / "more.jsonl").write_text("{}\n"), ["test .jsonl", "found 2"]),
    "non-UTF-8 client": (lambda p: (p / "8" / "local_training_0.json").write_bytes(b'[{"instruction": "\xff"}]'),
                         ["local_training_0.json", "line 1", "not UTF-8"]),
    "non-UTF-8 test": (lambda p: (p / "test.jsonl").write_bytes(b'{}\n{"a": "\xc3"}\n'), ["test.jsonl", "line 2", "not UTF-8"]),
    "empty test file": (lambda p: (p / "test.jsonl").write_text("\n"), ["test.jsonl", "no records"]),
}


# The tiny base model (tiny_dir) and 3 clients x 20 records: a whole run of
# two methods takes a few seconds, most of it Python start-up.
TINY_RUN = ["--rounds", "3", "--local-steps", "2", "--batch-size", "4", "--micro-batch-size", "4",
            "--test-per-task", "2", "--max-new-tokens", "4", "--cutoff", "128", "--methods", "fedit,feddpa-t"]


@pytest.fixture(scope="module")
def tiny_run(tiny_dir, tmp_path_factory):
    """(model dir, data dir, arguments of train.main but --out): 3 clients x 20 records."""
    world = builtin.benchmark(seed=0, n_train=20, n_test=5)
    tests = [r for task in world.client_tasks[:3] for r in world.tests[task]]
    d = tmp_path_factory.mktemp("tiny_run") / "data"
    data.write_federated(data.federated_data("tiny", world.clients[:3], tests), d)
    return tiny_dir, d, ["--model", str(tiny_dir), "--data", str(d), *TINY_RUN]

