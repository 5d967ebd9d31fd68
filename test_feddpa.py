"""Tests for the FedDPA reference: parity with transformers / peft / rouge-score, invariants of the
method, and small end-to-end runs. Everything runs on CPU in a few minutes; nothing is skipped."""
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lora
import model

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared"
FLAN = SHARED / "data" / "feddpa-flan1"


@functools.cache
def smollm2_dir() -> str:
    """Build (once; the tool caches it) the offline HF copy of SmolLM2-135M-Instruct."""
    r = subprocess.run([sys.executable, str(SHARED / "tools" / "get_smollm2.py")],
                       capture_output=True, text=True, check=True)
    return r.stdout.strip().splitlines()[-1].rsplit(" ", 1)[0]

# ==============================================================================================
# model.py: parity with transformers' LlamaForCausalLM

def hf_tiny(d, tie=False, seed=0, vocab=96):
    """A random tiny HF Llama with grouped-query attention, saved by transformers to directory d."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than HF's init, so the logits are far from uniform
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    hf.save_pretrained(d)
    return hf


def left_padded(vocab, seed=1, lengths=(5, 9, 7), pad=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, T - n:] = 1
    return ids.masked_fill(mask == 0, pad), mask


@pytest.mark.parametrize("tie", [False, True])
def test_logits_and_greedy_match_transformers(tmp_path, tie):
    hf = hf_tiny(tmp_path, tie=tie)
    ours = model.from_pretrained(str(tmp_path)).eval()
    assert ours.cfg.tie_embeddings == tie and ours.cfg.n_kv_heads == 2
    ids, mask = left_padded(96)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # HF's generate() positions for left padding
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got, _ = ours(ids, mask)
    assert (ref - got)[mask.bool()].abs().max() <= 1e-4
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                       eos_token_id=2, pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(ours.generate(ids, mask, 20, eos_id=-1, pad_id=0), want)


def until_eos(row, eos=2):
    row = row.tolist()
    return row[:row.index(eos) + 1] if eos in row else row


@pytest.mark.parametrize("seed", range(4))
def test_beam_search_matches_transformers(tmp_path, seed):
    hf = hf_tiny(tmp_path, seed=seed, vocab=48)
    with torch.no_grad():  # make EOS likely so that beams finish at different lengths
        hf.lm_head.weight[2] += 0.4 * seed * hf.lm_head.weight[2].sign()
    hf.save_pretrained(tmp_path)
    ours = model.from_pretrained(str(tmp_path)).eval()
    ids, mask = left_padded(48, seed=seed, lengths=(4, 6, 3, 6))
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=12, num_beams=4, do_sample=False,
                       eos_token_id=2, pad_token_id=0)[:, ids.shape[1]:]
    got = ours.generate(ids, mask, 12, eos_id=2, pad_id=0, num_beams=4)
    assert [until_eos(r) for r in got] == [until_eos(r) for r in want]


def test_save_pretrained_roundtrip_and_transformers_reads_it(tmp_path):
    from transformers import LlamaForCausalLM
    ours = model.Llama(model.PRESETS["tiny"]).eval()
    model.save_pretrained(ours, str(tmp_path))
    again = model.from_pretrained(str(tmp_path)).eval()
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids, mask = left_padded(1024)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a, b = ours(ids, mask)[0], again(ids, mask)[0]
        c = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert torch.equal(a, b)
    assert (a - c)[mask.bool()].abs().max() <= 1e-4


def test_sharded_and_bin_checkpoints_load(tmp_path):
    hf = hf_tiny(tmp_path / "a")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    torch.save(hf.state_dict(), tmp_path / "bin.pt")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    os.replace(tmp_path / "bin.pt", tmp_path / "bin" / "pytorch_model.bin")
    ref = model.from_pretrained(str(tmp_path / "a")).state_dict()
    for d in ("sharded", "bin"):
        sd = model.from_pretrained(str(tmp_path / d)).state_dict()
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)


def test_safetensors_by_hand_matches_the_library(tmp_path):
    from safetensors.torch import load_file, save_file
    ts = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.randn(2, 2, 2).half()}
    save_file(ts, tmp_path / "lib.safetensors")
    model.write_safetensors(ts, str(tmp_path / "ours.safetensors"))
    for got in (model.read_safetensors(str(tmp_path / "lib.safetensors")), load_file(tmp_path / "ours.safetensors")):
        assert all(torch.equal(got[k], ts[k]) and got[k].dtype == ts[k].dtype for k in ts)


def test_represent_last_and_mean_ignore_padding():
    m = model.Llama(model.PRESETS["tiny"]).eval()
    ids, mask = left_padded(1024)
    with torch.no_grad():
        last, mean = m.represent(ids, mask, "last"), m.represent(ids, mask, "mean")
        for i in range(len(ids)):
            alone = ids[i:i + 1, mask[i].bool()]
            h = m.hidden(alone)
            assert torch.allclose(last[i], h[0, -1], atol=1e-5)
            assert torch.allclose(mean[i], h[0].mean(0), atol=1e-5)


def test_loss_projects_only_labelled_positions():
    m = model.Llama(model.PRESETS["tiny"])
    ids, mask = left_padded(1024)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :-3] = -100  # loss on the last 3 tokens only
    logits, loss = m(ids, mask, labels)
    full, _ = m(ids, mask)
    ref = F.cross_entropy(full[:, :-1].reshape(-1, 1024), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert logits.shape == (3 * 3, 1024)  # 3 rows x 3 labelled targets
    assert torch.allclose(loss, ref, atol=1e-6)


# ==============================================================================================
# lora.py: parity with peft, invariants

def test_lora_matches_peft(tmp_path):
    from peft import LoraConfig, get_peft_model
    hf = hf_tiny(tmp_path)
    ours = lora.inject(model.from_pretrained(str(tmp_path)), r=4, alpha=8, dropout=0.0).eval()
    ref = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(3)
    for name, m in ref.named_modules():
        if hasattr(m, "lora_B") and "default" in getattr(m, "lora_B", {}):
            m.lora_B["default"].weight.data.normal_(0, 0.1)
    state = {k.removeprefix("base_model.model.").replace(".default", ""): v
             for k, v in ref.state_dict().items() if "lora_" in k}
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)
    lora.set_adapter(ours, "global", state)
    lora.set_weights(ours, {"global": 1.0})
    ids, mask = left_padded(96)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got, _ = ours(ids, mask)
    assert (want - got)[mask.bool()].abs().max() <= 1e-5


def tiny_lora(seed=0):
    torch.manual_seed(seed)
    m = lora.inject(model.Llama(model.PRESETS["tiny"]), r=4, alpha=8, dropout=0.0)
    for _, layer in lora.lora_layers(m):  # nonzero B so both adapters matter
        for n in lora.ADAPTERS:
            layer.lora_B[n].weight.data.normal_(0, 0.05)
    return m


def test_zero_B_gives_the_base_output_exactly():
    base = model.Llama(model.PRESETS["tiny"]).eval()
    ids, mask = left_padded(1024)
    with torch.no_grad():
        want = base(ids, mask)[0]
        lora.inject(base)  # fresh adapters: B = 0
        lora.set_weights(base, {"global": 0.7, "local": torch.tensor([0.1, 0.5, 0.9])})
        got = base(ids, mask)[0]
    assert torch.equal(want, got)


@pytest.mark.parametrize("train", lora.ADAPTERS)
def test_a_step_changes_only_the_trained_adapter(train):
    m = tiny_lora()
    frozen = "local" if train == "global" else "global"
    lora.set_trainable(m, train)
    lora.set_weights(m, {"global": 0.5, "local": 0.5})
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = left_padded(1024)
    m(ids, mask, ids.masked_fill(mask == 0, -100))[1].backward()
    assert all(p.grad is None for p in lora.adapter_params(m, frozen))
    assert all(p.grad is not None for p in lora.adapter_params(m, train))
    opt.step()
    after = m.state_dict()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        assert changed == (f".{train}." in k and "lora_" in k), k


def test_merge_then_unmerge_restores_and_matches_unmerged():
    m = tiny_lora().eval()
    ids, mask = left_padded(1024)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    mix = {"global": 0.3, "local": 0.7}
    lora.set_weights(m, mix)
    with torch.no_grad():
        want = m(ids, mask)[0]
        lora.merge(m, mix)
        got = m(ids, mask)[0]
        lora.unmerge(m)
    assert (want - got).abs().max() < 1e-5
    assert all(torch.allclose(before[k], v, atol=1e-6) for k, v in m.state_dict().items())


def test_per_example_weights_equal_examples_run_alone():
    m = tiny_lora().eval()
    ids, mask = left_padded(1024)
    lam = torch.tensor([0.0, 0.35, 1.0])
    with torch.no_grad():
        lora.set_weights(m, {"local": lam, "global": 1 - lam})
        batched = m(ids, mask)[0]
        for i in range(3):
            lora.set_weights(m, {"local": lam[i].item(), "global": 1 - lam[i].item()})
            alone = m(ids[i:i + 1, mask[i].bool()])[0]
            assert (batched[i, mask[i].bool()] - alone[0]).abs().max() < 1e-5


def test_adapter_state_roundtrip_and_mismatch_is_named():
    m = tiny_lora()
    g = lora.get_adapter(m, "global")
    lora.set_adapter(m, "local", g)
    assert all(torch.equal(g[k], v) for k, v in lora.get_adapter(m, "local").items())
    bad = dict(g)
    key = next(iter(bad))
    bad[key] = torch.zeros(1, 1)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        lora.set_adapter(m, "local", bad)


def test_real_checkpoint_smollm2_matches_transformers():
    """SmolLM2-135M-Instruct, a real pretrained Llama, built offline by ../shared/tools/get_smollm2.py."""
    from transformers import AutoModelForCausalLM
    d = smollm2_dir()
    ours = model.from_pretrained(d).eval()
    tok = model.load_tokenizer(d, ours.cfg)
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    enc = [tok.encode(p) for p in ("The capital of France is", "def fibonacci(n):", "Once upon a time")]
    T = max(map(len, enc))
    ids = torch.tensor([[tok.pad_id] * (T - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (T - len(e)) + [1] * len(e) for e in enc])
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        got, _ = ours(ids, mask)
    assert (want - got)[mask.bool()].abs().max() <= 1e-4
    chat = tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    x = torch.tensor([chat])
    out = ours.generate(x, torch.ones_like(x), 24, tok.eos_id, tok.pad_id)
    ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False)[:, len(chat):]
    assert until_eos(out[0], tok.eos_id) == until_eos(ref[0], tok.eos_id)
    assert "Paris" in tok.decode(out[0])
