"""hf.py: HF directories that transformers reads and writes, every standard weight layout, safetensors
by hand equal to the library, atomic writes, and nothing unpickled but through weights_only."""
import os
import re
import sys

import pytest
import torch

import hf
import model
from conftest import ROOT, hf_tiny, left_padded

def test_save_pretrained_roundtrip_and_transformers_reads_it(tmp_path):
    from transformers import LlamaForCausalLM
    ours = model.Llama(model.PRESETS["tiny"]).eval()
    hf.save_pretrained(ours, str(tmp_path))
    again = hf.from_pretrained(str(tmp_path)).eval()
    theirs = LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids, mask = left_padded(1024)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a, b = ours(ids, mask)[0], again(ids, mask)[0]
        c = theirs(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert torch.equal(a, b)
    assert (a - c)[mask.bool()].abs().max() <= 1e-4


def test_sharded_and_bin_checkpoints_load(tmp_path):
    theirs = hf_tiny(tmp_path / "a")
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    torch.save(theirs.state_dict(), tmp_path / "bin.pt")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    os.replace(tmp_path / "bin.pt", tmp_path / "bin" / "pytorch_model.bin")
    ref = hf.from_pretrained(str(tmp_path / "a")).state_dict()
    for d in ("sharded", "bin"):
        sd = hf.from_pretrained(str(tmp_path / d)).state_dict()
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)


def test_safetensors_by_hand_matches_the_library(tmp_path):
    from safetensors.torch import load_file, save_file
    ts = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.randn(2, 2, 2).half()}
    save_file(ts, tmp_path / "lib.safetensors")
    hf.write_safetensors(ts, str(tmp_path / "ours.safetensors"))
    for got in (hf.read_safetensors(str(tmp_path / "lib.safetensors")), load_file(tmp_path / "ours.safetensors")):
        assert all(torch.equal(got[k], ts[k]) and got[k].dtype == ts[k].dtype for k in ts)


def test_atomic_write_interrupted_keeps_the_old_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"old")

    def chunks():
        yield b"new, half"
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        hf.atomic_write(str(path), chunks())
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_nothing_is_unpickled_but_through_weights_only_torch_load():
    for path in [*ROOT.glob("*.py"), *ROOT.glob("extras/*.py"), *ROOT.glob("tools/*.py")]:
        if path.name.startswith("test_"):  # the patterns below are in this file
            continue
        src = path.read_text()
        assert not re.search(r"pickle\.loads?\(|Unpickler|allow_pickle=True|weights_only=False", src), path
        for call in re.findall(r"torch\.load\([^)]*\)", src):
            assert "weights_only=True" in call, (path, call)


def test_a_model_that_is_no_folder_is_a_hub_id_with_one_line_errors(tmp_path, monkeypatch):
    assert hf.resolve(str(tmp_path)) == str(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no test needs the network
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hub"))
    with pytest.raises(hf.CheckpointError) as e:
        hf.resolve("someone/no-such-model")
    assert "\n" not in str(e.value) and "the hub could not provide it" in str(e.value)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if the optional package were absent
    with pytest.raises(hf.CheckpointError, match="not a folder; to fetch it from the Hugging Face hub: pip install huggingface_hub"):
        hf.resolve("someone/no-such-model")
