"""Fuzz: random damage to valid data files and safetensors gives a one-line DataError / CheckpointError
or loads; never another exception, never a hang."""
import json
import re
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import builtin
import data
import hf
from conftest import safetensors_bytes

# ----------------------------------------------------------------------------------------------
# Fuzz: random damage to valid files gives a one-line DataError / CheckpointError or loads; never
# another exception, never a hang.

def mutations():
    """A function that damages bytes: flip, insert, delete, truncate, or splice in JSON-ish text."""
    tokens = st.sampled_from([b"{", b"}", b"[", b"]", b'"', b",", b":", b"null", b"1e999", b"-1", b"\\ud800",
                              b"\xff", b"\n", b'"shape"', b'"dtype"', b'"data_offsets"', b'"F32"', b"[" * 2000,
                              b"9" * 5000, b"true", b"0"])
    op = st.one_of(
        st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 255)),
        st.tuples(st.just("insert"), st.floats(0, 1), tokens),
        st.tuples(st.just("delete"), st.floats(0, 1), st.integers(1, 40)),
        st.tuples(st.just("truncate"), st.floats(0, 1), st.none()))

    def apply(raw: bytes, ops, limit=None) -> bytes:
        b = bytearray(raw)
        for kind, where, arg in ops:
            i = int(where * min(len(b), limit or len(b)))
            if kind == "flip" and i < len(b):
                b[i] = arg
            elif kind == "insert":
                b[i:i] = arg
            elif kind == "delete":
                del b[i:i + arg]
            elif kind == "truncate":
                del b[i:]
        return bytes(b)
    return st.lists(op, min_size=1, max_size=4), apply


def json_edits():
    """Replace one value deep inside a JSON document with another JSON value."""
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-2, 2 ** 64), st.floats(allow_nan=True),
                     st.text(max_size=5), st.sampled_from(["F32", "BF16", "I64", "", "\ud800"]))
    return st.recursive(leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                        max_leaves=6)


def replace_somewhere(doc, path_choices, value):
    """doc with the value at a path chosen by path_choices (floats in [0, 1)) replaced."""
    if not path_choices or not isinstance(doc, (dict, list)) or not doc:
        return value
    keys = list(doc) if isinstance(doc, dict) else list(range(len(doc)))
    k = keys[int(path_choices[0] * len(keys))]
    new = dict(doc) if isinstance(doc, dict) else list(doc)
    new[k] = replace_somewhere(doc[k], path_choices[1:], value)
    return new


MUTATE, APPLY = mutations()
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def fuzz_dir():
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        data.write_federated(builtin.benchmark(seed=0, n_train=3, n_test=2), d / "data")
        torch.manual_seed(0)
        hf.write_safetensors({"a": torch.randn(2, 3), "b": torch.randn(4).bfloat16(), "c": torch.zeros(0, 5)},
                                str(d / "w.safetensors"))
        yield d


def one_line_or_ok(fn, error, *args):
    try:
        return fn(*args)
    except error as e:
        assert "\n" not in str(e) and str(e), repr(e)


def text_a_tokenizer_takes(fd):
    for recs in [*fd.clients, *fd.tests.values()]:
        for rec in recs:
            for v in rec.values():
                v.encode("utf-8") if isinstance(v, str) else None


@FUZZ
@given(target=st.sampled_from(["8/local_training_0.json", "test.jsonl"]), ops=MUTATE,
       edit=st.tuples(st.lists(st.floats(0, 0.999), max_size=4), json_edits()), structural=st.booleans())
def test_fuzzed_data_files_give_data_errors(fuzz_dir, target, ops, edit, structural):
    path = fuzz_dir / "data" / target
    raw = path.read_bytes()
    try:
        if structural:  # valid JSON, wrong content
            if target == "test.jsonl":
                lines = raw.decode().split("\n")
                i = int(edit[0][0] * len(lines)) if edit[0] else 0
                lines[i] = json.dumps(replace_somewhere(json.loads(lines[i] or "{}"), edit[0][1:], edit[1]))
                path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
            else:
                path.write_bytes(json.dumps(replace_somewhere(json.loads(raw), edit[0], edit[1])).encode())
        else:
            path.write_bytes(APPLY(raw, ops))
        fd = one_line_or_ok(data.load_federated, data.DataError, fuzz_dir / "data")
        if fd is not None:  # what loads can be trained on
            text_a_tokenizer_takes(fd)
    finally:
        path.write_bytes(raw)


@FUZZ
@given(ops=MUTATE, edit=st.tuples(st.lists(st.floats(0, 0.999), max_size=3), json_edits()),
       structural=st.booleans(), header_only=st.booleans())
def test_fuzzed_safetensors_give_checkpoint_errors(fuzz_dir, ops, edit, structural, header_only):
    raw = (fuzz_dir / "w.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    if structural:  # a valid JSON header with one value replaced, the length field kept right
        bad = safetensors_bytes(replace_somewhere(json.loads(raw[8:8 + n]), edit[0], edit[1]), raw[8 + n:])
    else:           # damaged bytes, mostly in the header length and the header
        bad = APPLY(raw, ops, limit=8 + n if header_only else None)
    path = fuzz_dir / "fuzzed.safetensors"
    path.write_bytes(bad)
    one_line_or_ok(hf.read_safetensors, hf.CheckpointError, str(path))


JSON_EDGES = {  # what json.loads raises besides JSONDecodeError, and what it lets through
    "nesting too deep": (b"[" * 100_000, "invalid JSON: maximum recursion depth"),
    "number too long": (b"[" + b"9" * 5000 + b"]", "invalid JSON: Exceeds the limit (4300 digits)"),
    "lone surrogate": (b'[{"instruction": "a\\udc00", "output": "b", "category": "c"}]', "'instruction' holds a lone surrogate"),
}


@pytest.mark.parametrize("case", JSON_EDGES)
def test_json_edge_cases_are_data_errors(case, fuzz_dir, tmp_path):
    text, piece = JSON_EDGES[case]
    shutil.copytree(fuzz_dir / "data", tmp_path / "data")
    (tmp_path / "data" / "8" / "local_training_0.json").write_bytes(text)
    with pytest.raises(data.DataError, match=r"local_training_0.json: .*" + re.escape(piece)):
        data.load_federated(tmp_path / "data")
    (tmp_path / "data" / "8" / "local_training_0.json").unlink()
    (tmp_path / "data" / "8" / "local_training_0.json").mkdir()  # a folder where a file should be
    with pytest.raises(data.DataError, match="local_training_0.json: cannot read"):
        data.load_federated(tmp_path / "data")


SAFETENSORS_EDGES = {
    "nesting too deep": (struct.pack("<Q", 100_000) + b"[" * 100_000, "header is not valid JSON"),
    "dimension past int64": (safetensors_bytes({"a": {"dtype": "F32", "shape": [0, 2 ** 63], "data_offsets": [0, 0]}}, b""),
                             "malformed shape"),
    "shape not a list": (safetensors_bytes({"a": {"dtype": "F32", "shape": "ab", "data_offsets": [0, 0]}}, b""), "malformed shape"),
    "offsets not a pair": (safetensors_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, b"\0" * 8),
                           "malformed header entry"),
}


@pytest.mark.parametrize("case", SAFETENSORS_EDGES)
def test_safetensors_edge_cases_are_checkpoint_errors(case, tmp_path):
    raw, piece = SAFETENSORS_EDGES[case]
    (tmp_path / "m.safetensors").write_bytes(raw)
    with pytest.raises(hf.CheckpointError, match="m.safetensors: .*" + re.escape(piece)):
        hf.read_safetensors(str(tmp_path / "m.safetensors"))
