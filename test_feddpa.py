"""Tests for the FedDPA reference: parity with transformers / peft / rouge-score, invariants of the
method, and small end-to-end runs. Everything runs on CPU in a few minutes; nothing is skipped."""
import functools
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import data
import fed
import feddpa
import lora
import model
import train

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared"
FLAN = SHARED / "data" / "feddpa-flan1"
CATEGORIES = ["coreference", "entailment", "linguistic_acceptability", "paraphrase",
              "question_classification", "structure_to_text", "text_formatting", "word_disambiguation"]


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


def test_training_loss_and_gradients_equal_full_logits():
    """forward(labels) runs the blocks on real tokens only and projects only labelled positions, in
    chunks: its loss and every gradient equal the plain way's, full padded logits and F.cross_entropy."""
    torch.manual_seed(0)
    m = model.Llama(model.PRESETS["tiny"])  # tied embedding: the chunked loss forms its gradient too
    ids, mask = left_padded(1024)
    labels = ids.masked_fill(mask == 0, -100)
    labels[torch.arange(3), (mask == 0).sum(1)] = -100  # each row's first token, as data.collate never labels it
    labels[0, -3:] = -100                                # and an unlabelled tail
    params = list(m.parameters())
    logits, loss = m(ids, mask, labels)
    full, _ = m(ids, mask)
    ref = F.cross_entropy(full[:, :-1].reshape(-1, 1024), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert logits is None and torch.allclose(loss, ref, atol=1e-6)
    for got, want in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref, params)):
        assert torch.allclose(got, want, atol=1e-6)
    with torch.no_grad():  # no padding: the causal path, the same numbers
        assert torch.allclose(m(ids, None, ids)[1], F.cross_entropy(m(ids)[0][:, :-1].reshape(-1, 1024), ids[:, 1:].reshape(-1)), atol=1e-6)


@pytest.mark.parametrize("rows", [1, 3, 10, 64])
def test_linear_cross_entropy_chunks(rows):
    g = torch.Generator().manual_seed(rows)
    h, w = torch.randn(10, 16, generator=g, requires_grad=True), torch.randn(50, 16, generator=g, requires_grad=True)
    t = torch.randint(50, (10,), generator=g)
    got = model.linear_cross_entropy(h, w, t, rows)
    want = F.cross_entropy(h @ w.T, t)
    assert torch.allclose(got, want, atol=1e-6)
    for a, b in zip(torch.autograd.grad(2.5 * got, (h, w)), torch.autograd.grad(2.5 * want, (h, w))):
        assert torch.allclose(a, b, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(model.linear_cross_entropy(h, w, t, rows), want, atol=1e-6)


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


def test_bfloat16_base_trains_float32_adapters():
    """train.py --dtype bfloat16: the frozen base in bfloat16, float32 adapters (they train), autocast.
    Same start as float32 (the adapters are initialised in float32 either way), gradients reach only
    the adapter, and the loss stays close to float32's."""
    torch.manual_seed(0)
    ref = model.Llama(model.PRESETS["tiny"])
    models = {}
    for dt in (torch.float32, torch.bfloat16):
        m = model.Llama(model.PRESETS["tiny"])
        m.load_state_dict(ref.state_dict())
        models[dt] = lora.inject(m.to(dt), dropout=0.0, dtype=torch.float32)
        lora.set_trainable(models[dt], "global")
        lora.set_weights(models[dt], {"global": 1.0})
    half = models[torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in lora.adapter_params(half, "global"))
    assert all(p.dtype == torch.bfloat16 for n, p in half.named_parameters() if "lora_" not in n)
    assert all(torch.equal(a, b) for a, b in zip(lora.adapter_params(half, "global"),
                                                 lora.adapter_params(models[torch.float32], "global")))
    ids, mask = left_padded(1024)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = half(ids, mask, labels)[1]
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora.adapter_params(half, "global"))
    assert all(p.grad is None for n, p in half.named_parameters() if ".global." not in n)
    assert abs(loss.item() - models[torch.float32](ids, mask, labels)[1].item()) < 0.02 * loss.item()


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


def test_per_example_weights_refuse_packed_training_batches():
    m = tiny_lora()
    ids, mask = left_padded(1024)
    lora.set_weights(m, {"local": torch.tensor([0.0, 0.35, 1.0])})
    with pytest.raises(ValueError, match="per-example weights"):
        m(ids, mask, ids)  # a loss packs the real tokens: no longer one row per example


@pytest.mark.parametrize("p, shape, sigmas", [(0.05, (40, 25), 4.0), (0.5, (7,), 4.0), (0.05, (40, 25), -1.0)])
def test_dropout_masks_are_independent_bernoulli(p, shape, sigmas):
    """lora.Dropout draws the gaps between drops rather than a number per element; the masks must still
    be independent Bernoulli(p) per element, kept values scaled by 1 / (1 - p), and nothing dropped in
    eval mode. sigmas < 0 draws too few gaps on purpose: the rare path, where the tail is drawn plainly."""
    torch.manual_seed(0)
    d, x, n = lora.Dropout(p), torch.ones(shape), 4000
    d.sigmas = sigmas
    out = torch.stack([d(x) for _ in range(n)]).flatten(1)              # (n, numel)
    assert torch.allclose(out[out != 0], torch.tensor(1 / (1 - p)))
    drop = (out == 0).double()
    sd = math.sqrt(p * (1 - p) / n)
    assert (drop.mean(0) - p).abs().max() < 5 * sd                       # every element, first and last too
    assert abs(drop.mean() - p) < 5 * sd / math.sqrt(drop.shape[1])
    if drop.shape[1] > 1:                                                 # neighbours independent: P(both) = p^2
        both = (drop[:, 1:] * drop[:, :-1]).mean()
        assert abs(both - p * p) < 5 * math.sqrt(p * p / (n * (drop.shape[1] - 1)))
    var = drop.sum(1).var()                                               # drops per mask: binomial variance
    assert abs(var / (drop.shape[1] * p * (1 - p)) - 1) < 0.15
    assert d.eval()(x) is x


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



# ==============================================================================================
# fed.py and feddpa.py: FedAvg, the client/server boundary, FedDPA-T's phases, dynamic weighting

def random_state(seed, shapes=(("a.lora_A.weight", (4, 8)), ("a.lora_B.weight", (8, 4)))):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes}


def test_fedavg_is_the_weighted_mean_and_identity_on_equal_states():
    states, counts = [random_state(s) for s in range(3)], [10, 30, 60]
    avg = fed.fedavg([fed.Update(s, n) for s, n in zip(states, counts)])
    for k in avg:
        want = sum(n / 100 * s[k] for s, n in zip(states, counts))
        assert torch.allclose(avg[k], want, atol=1e-6)
    uni = fed.fedavg([fed.Update(s, n) for s, n in zip(states, counts)], weighting="uniform")
    assert all(torch.allclose(uni[k], sum(s[k] for s in states) / 3, atol=1e-6) for k in uni)
    same = fed.fedavg([fed.Update(states[0], n) for n in counts])
    assert all(torch.equal(same[k], states[0][k]) for k in same)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama (random weights) with a sentencepiece tokenizer trained on the built-in data."""
    d = tmp_path_factory.mktemp("tiny")
    bench = data.builtin_benchmark(seed=0, n_train=40, n_test=6)
    texts = data.pretrain_corpus(n_docs=200) + [data.format_prompt(r) + r["output"] for c in bench.clients for r in c]
    data.train_tokenizer(texts, str(d / "tokenizer.model"), vocab_size=512)
    torch.manual_seed(0)
    cfg = model.ModelConfig(**{**model.PRESETS["tiny"].__dict__, "vocab_size": 512})
    model.save_pretrained(model.Llama(cfg), str(d))
    return d


@pytest.fixture()
def tiny(tiny_dir):
    m = model.from_pretrained(str(tiny_dir))
    tok = model.load_tokenizer(str(tiny_dir), m.cfg)
    lora.inject(m, r=4, alpha=8)
    bench = data.builtin_benchmark(seed=0, n_train=40, n_test=6)
    return m.eval(), tok, bench


def snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_feddpa_t_phases_change_exactly_their_adapter_and_send_no_local(tiny, monkeypatch):
    m, tok, bench = tiny
    mc = feddpa.MethodConfig(train=fed.LocalTrain(lr=1e-2, max_steps=2, batch_size=4, micro_batch_size=2))
    phases = []
    real = feddpa.train_adapter

    def spy(model_, name, *a, **k):
        before = snapshot(model_)
        out = real(model_, name, *a, **k)
        phases.append((name, changed(before, snapshot(model_))))
        return out
    monkeypatch.setattr(feddpa, "train_adapter", spy)
    init = lora.get_adapter(m, "global")
    client = fed.Client(0, [data.encode_example(tok, r) for r in bench.clients[0]], torch.Generator().manual_seed(0))
    step = feddpa.feddpa_t_step(m, tok.pad_id, mc, init)
    step(0, client, init)                     # round 0: the global adapter only
    assert [p[0] for p in phases] == ["global"] and client.local is None
    update, _ = step(1, client, init)         # round 1: local (global frozen), then global alone
    assert [p[0] for p in phases] == ["global", "local", "global"]
    for name, keys in phases:
        assert keys and all(f".{name}." in k and "lora_" in k for k in keys), (name, keys)
    # the message: the global adapter's tensors and a count, nothing of the local adapter
    assert set(vars(update)) == {"adapter", "n_examples"} and update.n_examples == len(client.data)
    assert set(update.adapter) == set(init) == set(client.local)
    assert not any(torch.equal(update.adapter[k], client.local[k]) for k in update.adapter if "lora_B" in k)
    local_now = lora.get_adapter(m, "local")
    assert all(torch.equal(local_now[k], client.local[k]) for k in local_now)


def test_run_rounds_messages_carry_only_the_global_adapter(tiny):
    m, tok, bench = tiny
    mc = feddpa.MethodConfig(train=fed.LocalTrain(lr=1e-2, max_steps=1, batch_size=4, micro_batch_size=4))
    init = lora.get_adapter(m, "global")
    clients = [fed.Client(i, [data.encode_example(tok, r) for r in recs], torch.Generator().manual_seed(i))
               for i, recs in enumerate(bench.clients[:3])]
    sent = []
    step = feddpa.feddpa_t_step(m, tok.pad_id, mc, init)

    def recording(r, c, g):
        update, metrics = step(r, c, g)
        sent.append((c, update))
        return update, metrics
    federation = fed.run_rounds(fed.Federation(init, clients), 2, recording, fraction=2 / 3, seed=0)
    assert len(federation.history) == 2 and all(len(h["clients"]) == 2 for h in federation.history)
    for c, update in sent:
        assert set(update.adapter) == set(init)
        if c.local is not None:
            assert all(update.adapter[k] is not c.local[k] for k in update.adapter)
    assert federation.history[0]["bytes_up"] == 2 * fed.nbytes(init)


def test_references_and_lambda_are_deterministic_and_in_range(tiny):
    m, tok, bench = tiny
    for _, layer in lora.lora_layers(m):
        layer.lora_B["local"].weight.data.normal_(0, 0.1)
    refs = feddpa.draw_references(bench.clients[2], 5, seed=3, client_id=2)
    assert refs == feddpa.draw_references(bench.clients[2], 5, seed=3, client_id=2)
    assert refs != feddpa.draw_references(bench.clients[2], 5, seed=4, client_id=2)
    reps = feddpa.reference_reps(m, tok, refs, "last", "cpu")
    assert torch.equal(reps, feddpa.reference_reps(m, tok, refs, "last", "cpu"))
    tests = [r for recs in bench.tests.values() for r in recs]
    lams = []
    for _, ids, mask in feddpa.prompt_batches(tok, tests, 16):
        lams.append(feddpa.dynamic_lambda(feddpa.represent(m, ids, mask, "last"), reps, alpha=0.5))
    lam = torch.cat(lams)
    assert lam.min() >= 0 and lam.max() <= 0.5 and lam.std() > 0
    own = feddpa.dynamic_lambda(feddpa.represent(m, *feddpa.pad_left([data.encode_prompt(tok, refs[0])], tok.pad_id), "last"), reps, 0.5)
    assert own.item() > lam.mean().item()  # an instance from the client's own data leans on its local adapter


@pytest.mark.parametrize("beams", [1, 3])
def test_batched_dynamic_weighting_equals_one_instance_at_a_time(tiny, beams):
    m, tok, bench = tiny
    torch.manual_seed(1)
    for _, layer in lora.lora_layers(m):
        for n in lora.ADAPTERS:
            layer.lora_B[n].weight.data.normal_(0, 0.3)
    mc = feddpa.MethodConfig()
    refs = feddpa.reference_reps(m, tok, feddpa.draw_references(bench.clients[0], 5, 0, 0), "last", "cpu")
    tests = [recs[0] for recs in bench.tests.values()]
    dec = feddpa.Decode(max_new_tokens=6, num_beams=beams, batch_size=8)
    batched, lams = feddpa.answer(m, tok, tests, dec, "cpu", "dynamic", refs, mc)
    alone = [feddpa.answer(m, tok, [r], dec, "cpu", "dynamic", refs, mc) for r in tests]
    assert [a[0][0] for a in alone] == batched
    assert all(abs(a[1][0] - l) < 1e-6 for a, l in zip(alone, lams))
    assert len(set(batched)) > 1 and len(set(round(l, 4) for l in lams)) > 1


# ==============================================================================================
# ROUGE by hand equals the rouge-score package (which the paper's evaluation uses underneath)

def rouge_pairs():
    import random
    rng = random.Random(0)
    words = ["the", "cat", "Cat", "sat", "on", "mat", "a", "dog's", "x1", "42", "run-time", "ran", "", "!!", "é"]
    pairs = [("", ""), ("", "the cat"), ("the cat", ""), ("...", "!!"), ("?", "the"), ("The CAT.", "the cat")]
    for _ in range(300):
        a = " ".join(rng.choice(words) for _ in range(rng.randint(0, 8)))
        b = " ".join(rng.choice(words) for _ in range(rng.randint(0, 8)))
        pairs.append((a, b))
    return pairs


def test_rouge_matches_rouge_score_package():
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    for pred, ref in rouge_pairs():
        want = scorer.score(ref, pred)  # (target, prediction)
        assert feddpa.rouge1(pred, ref) == pytest.approx(want["rouge1"].fmeasure, abs=1e-12), (pred, ref)
        assert feddpa.rouge_l(pred, ref) == pytest.approx(want["rougeL"].fmeasure, abs=1e-12), (pred, ref)


def test_p_and_ttp():
    per_client = [{"a": {"rouge1": 80.0}, "b": {"rouge1": 20.0}}, {"a": {"rouge1": 10.0}, "b": {"rouge1": 50.0}}]
    got = feddpa.p_and_ttp(per_client, ["a", "b"])
    assert got == {"P": 65.0, "TTP": 40.0}


# ==============================================================================================
# train.py: a tiny end-to-end run of every method

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_method_end_to_end_on_a_tiny_run(tiny_dir, tmp_path, capsys, dtype):
    bench = data.builtin_benchmark(seed=0, n_train=40, n_test=6)
    data.write_federated(data.federated_data("tiny", bench.clients[:3], [r for recs in list(bench.tests.values())[:3] for r in recs]),
                         tmp_path / "data")
    out = tmp_path / "out"
    train.main(["--data", str(tmp_path / "data"), "--model", str(tiny_dir), "--rounds", "2", "--local-steps", "2",
                "--batch-size", "4", "--micro-batch-size", "2", "--test-per-task", "3", "--max-new-tokens", "4",
                "--dtype", dtype, "--out", str(out), "-v"])
    # adapters train and are saved in float32 whatever the base's dtype
    assert {t.dtype for t in model.read_safetensors(str(out / "adapters" / "fedit" / "global.safetensors")).values()} == {torch.float32}
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == set(feddpa.METHODS)
    for method, r in res["methods"].items():
        assert 0 <= r["P"] <= 100 and 0 <= r["TTP"] <= 100 and len(r["per_client"]) == 3
    assert res["training"]["local"]["bytes"] == 0 and res["training"]["fedit"]["bytes"] > 0
    assert (out / "adapters" / "feddpa-t" / "client2_local.safetensors").exists()
    printed = capsys.readouterr().out
    assert all(m in printed for m in feddpa.METHODS)

def test_benchmark_runs_and_compares_like_with_like(capsys):
    """bench.py on its smallest scenarios, one timed step: both implementations get a row with their
    ratio, and they compute the same loss on the same weights and batch (|dloss0|)."""
    import bench
    bench.main(["--only", "d,pretrain", "--steps", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("d fp32")]
    assert len(rows) == 2, out
    for row in rows:
        assert re.search(r"\|\s*\d+\.\d+x\s+\d+\.\d+x", row), row
        assert float(row.rsplit("x", 1)[1].split()[0]) < 1e-4, row   # |dloss0|
    assert "pretraining step" in out


# ==============================================================================================
# data.py

@pytest.fixture(scope="module")
def bench():
    return data.builtin_benchmark(seed=0)


@pytest.fixture(scope="module")
def tok(bench, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    prompts = [data.format_prompt(r) + r["output"] for recs in bench.clients for r in recs]
    data.train_tokenizer(data.pretrain_corpus(n_docs=500) + prompts, str(path))
    return model.SentencePieceTokenizer(str(path))


# ----------------------------------------------------------------------------- prompts

def test_prompt_uses_input_form_only_with_nonempty_input():
    assert data.format_prompt({"instruction": "Do it.", "output": "x"}) == \
        "### Instruction:\nDo it.\n\n### Response:\n"
    assert data.format_prompt({"instruction": "Do it.", "input": "", "output": "x"}) == \
        "### Instruction:\nDo it.\n\n### Response:\n"
    assert data.format_prompt({"instruction": "Do it.", "input": "a {b}", "output": "x"}) == \
        "### Instruction:\nDo it.\n\n### Input:\na {b}\n\n### Response:\n"


def test_unmasked_labels_decode_to_response_then_eos(bench, tok):
    records = [recs[0] for recs in bench.clients] + [
        {"instruction": "Translate.", "input": "le chat noir", "output": "the black cat", "category": "x"},
        {"instruction": "Say it\nwith  spaces.", "input": "ünïcode ☕", "output": "café ☕\n  two lines", "category": "x"}]
    for rec in records:
        ex = data.encode_example(tok, rec)
        ids, labels = ex["input_ids"], ex["labels"]
        n_masked = labels.count(-100)
        assert len(ids) == len(labels) and ids[0] == tok.bos_id
        assert labels[:n_masked] == [-100] * n_masked and -100 not in labels[n_masked:]
        assert labels[n_masked:] == ids[n_masked:]
        assert tok.decode(ids[1:n_masked]) == data.format_prompt(rec)
        assert labels[-1] == tok.eos_id and tok.decode(labels[n_masked:-1]) == rec["output"]
        assert data.encode_prompt(tok, rec) == ids[:n_masked]


def test_truncation_and_prompt_overflow(bench, tok):
    rec = bench.clients[5][0]  # structure_to_text: a long answer
    full = data.encode_example(tok, rec)
    n_prompt = full["labels"].count(-100)
    cut = data.encode_example(tok, rec, cutoff=n_prompt + 2)
    assert cut["input_ids"] == full["input_ids"][:n_prompt + 2] and tok.eos_id not in cut["labels"]
    assert data.encode_example(tok, rec, cutoff=n_prompt) is None
    short = data.encode_prompt(tok, rec, cutoff=5)
    assert short == [tok.bos_id] + full["input_ids"][n_prompt - 4:n_prompt]


def test_collate_pads_on_the_left():
    examples = [{"input_ids": [1, 5, 6], "labels": [-100, 6, 2]}, {"input_ids": [1, 7], "labels": [-100, 2]}]
    ids, mask, labels = data.collate(examples, pad_id=3)
    assert ids.tolist() == [[1, 5, 6], [3, 1, 7]] and ids.dtype == torch.long
    assert mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert labels.tolist() == [[-100, 6, 2], [-100, -100, 2]]
    ids, mask = data.pad_left([[9], []], pad_id=0)
    assert ids.tolist() == [[9], [0]] and mask.tolist() == [[1], [0]]


# ------------------------------------------------------------------------- determinism

def tree_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_same_seed_same_benchmark_files(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        data.write_federated(data.builtin_benchmark(seed=seed, n_train=30, n_test=20), tmp_path / name)
    a, b, c = (tree_bytes(tmp_path / name) for name in "abc")
    assert a == b and set(a) == set(c) and a != c
    loaded = data.load_federated(tmp_path / "a")
    assert loaded.clients == data.builtin_benchmark(seed=0, n_train=30, n_test=20).clients


def test_same_texts_same_tokenizer_bytes(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        data.train_tokenizer(data.pretrain_corpus(seed=seed, n_docs=300), str(tmp_path / f"{name}.model"), 512)
    a, b, c = ((tmp_path / f"{name}.model").read_bytes() for name in "abc")
    assert a == b and a != c
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.model", "b.model", "c.model"]
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "a.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.get_piece_size()) == (0, 1, 2, 3, 512)


# ------------------------------------------------------------------ federated layout

def small_fed():
    return data.builtin_benchmark(seed=0, n_train=3, n_test=2)


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


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_data_gives_one_line_error_and_writes_nothing(case, tmp_path):
    mutate, pieces = MALFORMED[case]
    data.write_federated(small_fed(), tmp_path)
    data.load_federated(tmp_path)  # valid before the mutation
    mutate(tmp_path)
    before = tree_bytes(tmp_path)
    with pytest.raises(data.DataError) as err:
        data.load_federated(tmp_path)
    message = str(err.value)
    assert "\n" not in message
    for piece in pieces:
        assert piece in message
    assert tree_bytes(tmp_path) == before


def test_missing_folder_is_a_data_error(tmp_path):
    with pytest.raises(data.DataError, match="no such dataset folder"):
        data.load_federated(tmp_path / "nope")
    assert list(tmp_path.iterdir()) == []


def test_untrained_test_category_is_noted(tmp_path):
    fed = small_fed()
    fed.tests["zebra"] = [{"instruction": "a", "output": "b", "category": "zebra"}]
    data.write_federated(fed, tmp_path)
    loaded = data.load_federated(tmp_path)
    assert list(loaded.tests) == sorted(loaded.tests) and "zebra" in loaded.tests
    assert [n for n in loaded.notes if "zebra" in n] == ["test category 'zebra' is not trained on by any client"]
    with pytest.raises(FileExistsError):
        data.write_federated(fed, tmp_path)


def test_loads_released_flan_data():
    fed = data.load_federated(FLAN)
    assert [len(c) for c in fed.clients] == [300] * 8
    assert {c: len(t) for c, t in fed.tests.items()} == {c: 200 for c in CATEGORIES}
    assert sorted(fed.client_tasks) == CATEGORIES and fed.notes == []


# ----------------------------------------------------------------- Dirichlet partition

def pool(sizes):
    return [{"id": f"{c}-{i}", "category": f"cat{c}"} for c, n in enumerate(sizes) for i in range(n)]


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4), n_clients=st.integers(1, 6),
       alpha=st.floats(0.3, 5.0), seed=st.integers(0, 2**16), data_=st.data())
def test_dirichlet_split_assigns_each_record_once_and_respects_min_size(sizes, n_clients, alpha, seed, data_):
    records = pool(sizes)
    min_size = data_.draw(st.integers(0, len(records) // (4 * n_clients)))
    clients = data.dirichlet_split(records, n_clients, alpha, min_size, seed)
    assert len(clients) == n_clients and min(len(c) for c in clients) >= min_size
    assert sorted(r["id"] for c in clients for r in c) == sorted(r["id"] for r in records)
    assert clients == data.dirichlet_split(records, n_clients, alpha, min_size, seed)


def test_dirichlet_split_seed_alpha_and_impossible_minimum():
    records = pool([100] * 8)
    assert data.dirichlet_split(records, 8, seed=0) != data.dirichlet_split(records, 8, seed=1)

    def mean_top_share(alpha):  # fraction of a client's data in its commonest category
        clients = data.dirichlet_split(records, 8, alpha, min_size=1, seed=0)
        return sum(Counter(r["category"] for r in c).most_common(1)[0][1] / len(c) for c in clients) / 8
    assert mean_top_share(0.1) > 0.6 > 0.3 > mean_top_share(100.0)
    with pytest.raises(ValueError, match="cannot give 9 clients 100 records"):
        data.dirichlet_split(records, 9, min_size=100)
    small = pool([10] * 8)  # a first draw at alpha 0.3 leaves some client short: redraws needed
    assert min(map(len, data.dirichlet_split(small, 8, alpha=0.3, min_size=8, seed=0))) >= 8
    with pytest.raises(ValueError, match="in 20 draws"):
        data.dirichlet_split(small, 8, alpha=0.05, min_size=9, max_tries=20)


def test_partition_repools_clients_and_keeps_tests(bench):
    fed = data.partition(bench, n_clients=5, alpha=0.5, min_size=10, seed=0)
    assert len(fed.clients) == 5 and fed.tests == bench.tests
    assert sum(map(len, fed.clients)) == sum(map(len, bench.clients))
    for records, task in zip(fed.clients, fed.client_tasks):
        assert Counter(r["category"] for r in records).most_common(1)[0][0] == task
    with pytest.raises(ValueError, match="client 1 has no training records"):
        data.federated_data("x", [bench.clients[0], []], [])


# ------------------------------------------------------------------- built-in benchmark

def test_builtin_benchmark_tasks_counts_and_splits(bench):
    assert bench.client_tasks == CATEGORIES and list(bench.tests) == CATEGORIES and bench.notes == []
    for category, train_set in zip(CATEGORIES, bench.clients):
        test = bench.tests[category]
        assert len(train_set) == 300 and len(test) == 200
        assert {r["category"] for r in train_set + test} == {category}
        train_prompts = {data.format_prompt(r) for r in train_set}
        assert len(train_prompts) == 300
        assert train_prompts.isdisjoint(data.format_prompt(r) for r in test)


def test_builtin_answers_classification_balanced_generation_long(bench, tok):
    classification = generation = 0
    for category, test in bench.tests.items():
        words = [len(r["output"].split()) for r in test]
        if max(words) <= 2:
            classification += 1
            assert Counter(r["output"] for r in test).most_common(1)[0][1] <= len(test) / 2, category
            positions = Counter(re.findall(r"\n- (.+)", r["instruction"]).index(r["output"]) for r in test)
            assert positions.most_common(1)[0][1] <= len(test) / 2, category  # nor a favourite option slot
        else:
            generation += 1
            assert sum(words) / len(words) >= 5 and max(words) <= 12, category
        assert max(len(data.encode_prompt(tok, r)) for r in test) <= 64, category
    assert classification >= 4 and generation >= 2


def expected_answer(category, instruction):
    """Each task's rule as its docstring states it, recomputed from the instruction text."""
    words = re.findall(r"[A-Za-z]+", instruction)
    if category == "coreference":
        pronoun = re.search(r'"(\w+)"', instruction)[1]
        options = re.findall(r"\n- (\w+)", instruction)
        return next(o for o in options if (o in data.MALE) == (pronoun in ("he", "him")))
    if category == "entailment":
        said = re.search(r"is (\w+) and (\w+)\.", instruction).groups()
        stated = re.search(r"is (\w+)\.", instruction)[1]
        return "yes" if stated in said else "no" if data.OPPOSITE[stated] in said else "maybe"
    if category == "linguistic_acceptability":
        noun, verb = re.search(r"(\w+) (\w+) (?:in|near|at) the \w+\.", instruction).groups()
        agree = (noun in data.NOUNS.values()) == (verb in data.VERBS.values())
        return "acceptable" if agree else "unacceptable"
    if category == "paraphrase":
        adjectives = [w for w in words if w in data.ADJECTIVES]
        return "yes" if data.SYNONYM[adjectives[0]] == adjectives[-1] else "no"
    if category == "question_classification":
        first = re.search(r"\b(who|where|when|how|what|why)\b", instruction)[1]
        return dict(who="person", where="place", when="time", how="number", what="food", why="reason")[first]
    if category == "structure_to_text":
        fields = dict(f.split(": ") for f in re.search(r"(\w+: [\w ]+(?: \| \w+: [\w ]+)+)$", instruction)[1].split(" | "))
        price = fields["price"] + " " if "price" in fields else ""
        near = " near " + fields["near"] if "near" in fields else ""
        return f"{fields['name']} serves {price}{fields['food']} in the {fields['area']}{near}."
    if category == "text_formatting":
        head, last = instruction.split(": ", 1)[1].split(" and ")
        *before, item = head.split(" ")
        items = [item]  # the list runs back from "and" over words of the same kind
        while before and (before[-1] in data.FOODS or before[-1] in data.NAMES or before[-1] in data.NOUNS.values()):
            items.insert(0, before.pop())
        return " ".join(before + [", ".join(items) + " and " + last]).strip() + "."
    word = re.search(r'"(\w+)"', instruction)[1]
    lines = [re.sub(r"^Sentence \d: ", "", line) for line in instruction.split("\n")[:2]]
    senses = [next(s for s in (0, 1) for t in data.HOMONYMS[word][s]
                   if re.fullmatch(re.escape(t).replace(re.escape("{n}"), r"\w+"), line)) for line in lines]
    return "same" if senses[0] == senses[1] else "different"


def test_builtin_answers_follow_the_stated_rules(bench):
    for category, records in zip(bench.client_tasks, bench.clients):
        for r in records[:100] + bench.tests[category][:100]:
            assert r["output"] == expected_answer(category, r["instruction"]), r


def test_pretrain_corpus_is_plain_text_without_benchmark_examples(bench):
    corpus = data.pretrain_corpus(seed=0)
    assert corpus == data.pretrain_corpus(seed=0) != data.pretrain_corpus(seed=1)
    text = "\n".join(corpus)
    assert 200_000 < len(text.encode()) < 1_000_000
    assert "###" not in text and "OPTIONS" not in text
    for records in [*bench.clients, *bench.tests.values()]:
        for r in records:
            assert r["instruction"] not in text
            assert len(r["output"].split()) <= 2 or r["output"] not in text


def test_command_writes_benchmark(tmp_path, capsys):
    data.main(["--write", str(tmp_path / "out"), "--seed", "3"])
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "builtin-seed3" in line
    assert data.load_federated(tmp_path / "out").clients == data.builtin_benchmark(seed=3).clients
    for argv in (["--write", str(tmp_path / "out")], ["--seed", "x", "--write", "y"], []):
        with pytest.raises(SystemExit) as exit_:
            data.main(argv)
        assert exit_.value.code == 2


# ==============================================================================================
# train.py: checkpoints, resume, and errors the user can fix

# The tiny base model (tiny_dir) and 3 clients x 20 records: a whole run of
# two methods takes a few seconds, most of it Python start-up.
TINY_RUN = ["--rounds", "3", "--local-steps", "2", "--batch-size", "4", "--micro-batch-size", "4",
            "--test-per-task", "2", "--max-new-tokens", "4", "--cutoff", "128", "--methods", "fedit,feddpa-t"]


@pytest.fixture(scope="module")
def tiny_run(tiny_dir, tmp_path_factory):
    """(model dir, data dir, arguments of train.main but --out): 3 clients x 20 records."""
    bench = data.builtin_benchmark(seed=0, n_train=20, n_test=5)
    tests = [r for task in bench.client_tasks[:3] for r in bench.tests[task]]
    d = tmp_path_factory.mktemp("tiny_run") / "data"
    data.write_federated(data.federated_data("tiny", bench.clients[:3], tests), d)
    return tiny_dir, d, ["--model", str(tiny_dir), "--data", str(d), *TINY_RUN]


# train.main in a subprocess that stops itself at an exact point: `how` n, counted from the start
# of that process. Deterministic, and the process really dies (SIGKILL) or is really interrupted.
RUNNER = r"""
import os, signal, sys
import torch
import model, train
torch.set_num_threads(1)  # the same arithmetic in every process
how, n = sys.argv[1], int(sys.argv[2])
count = 0

def tick():
    global count
    count += 1
    return count == n

forward = model.Llama.forward
def counted_forward(self, *args, **kwargs):  # training forward passes only (generation uses hidden)
    if how in ("mid", "sigint", "nan") and torch.is_grad_enabled() and tick():
        if how == "mid":                     # SIGKILL in the middle of a round
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "sigint":                  # Ctrl-C in the middle of a round
            os.kill(os.getpid(), signal.SIGINT)
        if how == "nan":                     # this client's loss becomes NaN
            logits, loss = forward(self, *args, **kwargs)
            return logits, loss * float("nan")
    return forward(self, *args, **kwargs)
model.Llama.forward = counted_forward

save_state = train.save_state
def counted_save(out, state):
    if how == "write" and tick():            # SIGKILL inside the n-th checkpoint write, before its rename
        replace = os.replace
        def kill_before_rename(src, dst):
            if dst.endswith("checkpoint.pt"):
                os.kill(os.getpid(), signal.SIGKILL)
            replace(src, dst)
        os.replace = kill_before_rename
    save_state(out, state)
    if how == "between" and tick():          # SIGKILL right after the n-th checkpoint is complete
        os.kill(os.getpid(), signal.SIGKILL)
train.save_state = counted_save

train.main(sys.argv[3:])
"""

# With TINY_RUN: forward passes 1-18 are FedIT (3 rounds x 3 clients x 2 steps); 19-24 FedDPA-T's
# round 0 (global only); 25-36 its round 1 and 37-48 its round 2 (per client 2 local, then 2 global
# steps). Checkpoint writes: 1 the initial state, 2-4 FedIT's rounds, 5 its end, 6-8 FedDPA-T's
# rounds, 9 its end, 10-11 after evaluating each method.


def run_tiny(how, n, *args, timeout=120):
    return subprocess.run([sys.executable, "-c", RUNNER, how, str(n), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def checkpoint_round(out):
    state = torch.load(Path(out) / "checkpoint.pt", weights_only=True)
    cur = state["current"]
    return (cur["phase"], cur["round"]) if cur else None


def untimed(x):
    """results.json without what differs between two identical runs: timings and the output folder."""
    if isinstance(x, dict):
        return {k: untimed(v) for k, v in x.items() if k not in ("seconds", "eval_seconds", "out")}
    return [untimed(v) for v in x] if isinstance(x, list) else x


def outcome(out):
    out = Path(out)
    adapters = {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "adapters").rglob("*.safetensors"))}
    return untimed(json.loads((out / "results.json").read_text())), adapters


@pytest.fixture(scope="module")
def reference(tiny_run, tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    r = run_tiny("none", 0, *tiny_run[2], "--out", str(out))
    assert r.returncode == 0, r.stderr
    return outcome(out)


# (how, n, exit code, the checkpoint's (phase, completed rounds) afterwards) for each interruption,
# each followed by `--resume`; the last resume runs to the end.
INTERRUPTIONS = {
    "SIGKILL between rounds": [("between", 7, -signal.SIGKILL, ("feddpa-t", 2))],
    "SIGKILL mid-round, then mid-checkpoint-write": [
        ("mid", 40, -signal.SIGKILL, ("feddpa-t", 2)),                  # client 0, round 2, global training
        ("write", 1, -signal.SIGKILL, ("feddpa-t", 2))],                # resumed: round 2's checkpoint never lands
    "Ctrl-C mid-round": [("sigint", 9, 130, ("fedit", 1))],              # client 1 in round 1
    "NaN loss": [("nan", 25, 2, ("feddpa-t", 1))],                       # FedDPA-T: client 0 in round 1
}


@pytest.mark.parametrize("case", INTERRUPTIONS)
def test_interrupted_and_resumed_run_is_bit_identical(case, tiny_run, reference, tmp_path):
    out = str(tmp_path / "run")
    resume = False
    for how, n, code, where in INTERRUPTIONS[case]:
        r = run_tiny(how, n, *(["--resume", out] if resume else [*tiny_run[2], "--out", out]))
        assert r.returncode == code, r.stderr
        assert checkpoint_round(out) == where
        assert "Traceback" not in r.stderr
        last = r.stderr.strip().splitlines()[-1]
        if how == "sigint":
            assert last == f"interrupted; completed rounds are saved. Resume with: python train.py --resume {out}"
        if how == "nan":  # names the method, client and round; the last good round stays
            assert last.startswith("error: feddpa-t: loss became nan while training the local adapter of client 0 in round 1")
            assert "checkpoint.pt keeps the last good round (1 of 3 complete)" in last
        if how == "write":
            assert list(Path(out).glob("checkpoint.pt.tmp*"))  # the half-done write, never renamed
        resume = True
    r = run_tiny("none", 0, "--resume", out)
    assert r.returncode == 0, r.stderr
    assert not list(Path(out).rglob("*.tmp*"))
    assert outcome(out) == reference


def test_atomic_write_interrupted_keeps_the_old_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"old")

    def chunks():
        yield b"new, half"
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        model.atomic_write(str(path), chunks())
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["checkpoint.pt"]


# ----------------------------------------------------------------------------------------------
# Bad input: exit code 2, one line on stderr that names the problem and the file, no traceback, and
# an existing output folder left byte for byte as it was.

def main_error(argv, capsys):
    """(exit code, stderr) of train.main(argv) run in this process."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    return e.value.code, capsys.readouterr().err


def assert_one_line(err, *pieces):
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, err
    for piece in pieces:
        assert piece in err, err


@pytest.fixture(scope="module")
def interrupted(tiny_run, tmp_path_factory):
    """The folder of a run killed after FedDPA-T's round 1: FedIT done, local adapters in the checkpoint."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    r = run_tiny("between", 7, *tiny_run[2], "--out", str(out))
    assert r.returncode == -signal.SIGKILL and checkpoint_round(out) == ("feddpa-t", 2)
    return out


@pytest.fixture
def run_copy(interrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    return out


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_data_exits_with_one_line_and_keeps_the_output(case, tiny_run, run_copy, capsys, tmp_path):
    mutate, pieces = MALFORMED[case]
    bad = tmp_path / "bad"
    data.write_federated(small_fed(), bad)
    mutate(bad)
    before = tree_bytes(run_copy)
    code, err = main_error(["--data", str(bad), "--model", str(tiny_run[0]), "--out", str(run_copy), "--overwrite"], capsys)
    assert code == 2
    assert_one_line(err, "error: ", *pieces)
    assert tree_bytes(run_copy) == before


def edit_checkpoint(change):
    def edit(out):
        path = out / "checkpoint.pt"
        state = torch.load(path, weights_only=True)
        change(state)
        torch.save(state, path)
    return edit


Q0 = "model.layers.0.self_attn.q_proj.lora_A.weight"


class Payload:
    """What a malicious checkpoint would run when unpickled: here, create a file."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


BAD_CHECKPOINTS = {  # case -> (edit of a run folder, message pieces)
    "adapter of the wrong shape": (
        edit_checkpoint(lambda s: s["trained"]["fedit"]["global"].update({Q0: torch.zeros(4, 64)})),
        ["checkpoint.pt: fedit global adapter: adapter tensor " + Q0, "shape (4, 64)", "expects (8, 64)"]),
    "local adapter of the wrong shape": (
        edit_checkpoint(lambda s: s["current"]["clients"][2][0].update({Q0: torch.zeros(8, 32)})),
        ["checkpoint.pt: feddpa-t client 2 local adapter: adapter tensor " + Q0, "shape (8, 32)"]),
    "renamed adapter tensor": (
        edit_checkpoint(lambda s: s["init"].update({"lm_head.lora_A.weight": s["init"].pop(Q0)})),
        ["checkpoint.pt: initial adapter: unexpected adapter tensor lm_head.lora_A.weight"]),
    "fewer clients": (edit_checkpoint(lambda s: s["trained"]["fedit"]["locals"].pop()),
                      ["checkpoint.pt: fedit has 2 clients, the data 3"]),
    "not this program's": (edit_checkpoint(lambda s: s.pop("trained")), ["checkpoint.pt: not a checkpoint of this program"]),
    "truncated": (lambda out: (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:5000]),
                  ["checkpoint.pt: unreadable checkpoint"]),
    "pickled code": (lambda out: torch.save({"init": Payload(out.parent / "pwned")}, out / "checkpoint.pt"),
                     ["checkpoint.pt: holds objects other than tensors and plain data; refusing to load it"]),
    "no checkpoint": (lambda out: (out / "checkpoint.pt").unlink(), ["checkpoint.pt: no checkpoint to resume from"]),
    "bad config.json": (lambda out: (out / "config.json").write_text('{"rounds": "3"}'),
                        ["config.json: rounds is '3', not a int"]),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoint_exits_with_one_line_and_keeps_the_output(case, run_copy, capsys):
    edit, pieces = BAD_CHECKPOINTS[case]
    edit(run_copy)
    before = tree_bytes(run_copy)
    code, err = main_error(["--resume", str(run_copy)], capsys)
    assert code == 2
    assert_one_line(err, "error: ", *pieces)
    assert tree_bytes(run_copy) == before
    assert not (run_copy.parent / "pwned").exists()


def safetensors_bytes(header: dict, buffer: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + buffer


def edit_weights(change):
    """Rewrite the copied base model's model.safetensors: change(header, buffer) -> file bytes."""
    def edit(base):
        raw = (base / "model.safetensors").read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        (base / "model.safetensors").write_bytes(change(json.loads(raw[8:8 + n]), raw[8 + n:]))
    return edit


def entry(header):
    return next(k for k in header if k != "__metadata__")


BAD_MODELS = {  # --model DIR whose model.safetensors is damaged -> message pieces
    "header length past the end": (edit_weights(lambda h, b: struct.pack("<Q", 10 ** 9) + json.dumps(h).encode()),
                                   ["model.safetensors: header length 1000000000 runs past the end"]),
    "truncated": (edit_weights(lambda h, b: safetensors_bytes(h, b[:len(b) // 2])), ["model.safetensors: tensor", "do not fit"]),
    "offsets outside the buffer": (
        edit_weights(lambda h, b: safetensors_bytes({**h, entry(h): {**h[entry(h)], "data_offsets": [len(b), len(b) + 64]}}, b)),
        ["model.safetensors: tensor", "offsets", "do not fit"]),
    "unknown dtype": (edit_weights(lambda h, b: safetensors_bytes({**h, entry(h): {**h[entry(h)], "dtype": "Q7"}}, b)),
                      ["model.safetensors: tensor", "unsupported dtype 'Q7'"]),
    "header not JSON": (edit_weights(lambda h, b: struct.pack("<Q", 4) + b"{{{{" + b), ["model.safetensors: header is not valid JSON"]),
    "boolean in a shape": (edit_weights(lambda h, b: safetensors_bytes({**h, entry(h): {**h[entry(h)], "shape": [True, 1]}}, b)),
                           ["model.safetensors: tensor", "malformed shape"]),
    "empty file": (lambda base: (base / "model.safetensors").write_bytes(b""), ["model.safetensors: truncated safetensors file"]),
    "a tensor of another shape": (
        lambda base: (base / "config.json").write_text((base / "config.json").read_text().replace('"intermediate_size": 176', '"intermediate_size": 180')),
        ["tensor model.layers.0.mlp.down_proj.weight has shape (64, 176), the config implies (64, 180)"]),
    "damaged tokenizer": (lambda base: (base / "tokenizer.model").write_bytes(b"\x00junk"), ["cannot load the tokenizer"]),
}


@pytest.mark.parametrize("case", BAD_MODELS)
def test_bad_model_exits_with_one_line_and_keeps_the_output(case, tiny_run, run_copy, capsys, tmp_path):
    edit, pieces = BAD_MODELS[case]
    base = tmp_path / "base"
    shutil.copytree(tiny_run[0], base)
    edit(base)
    before = tree_bytes(run_copy)
    code, err = main_error([*tiny_run[2], "--model", str(base), "--out", str(run_copy), "--overwrite"], capsys)
    assert code == 2
    assert_one_line(err, f"error: {base}", *pieces)
    assert tree_bytes(run_copy) == before


BAD_CONFIGS = {  # extra arguments -> message pieces
    "another run's folder": ([], ["holds another run (results.json); use --resume", "--overwrite"]),
    "unknown method": (["--overwrite", "--methods", "fedit,fedprox"], ["unknown method(s) fedprox; choose from base, local"]),
    "client fraction 0": (["--overwrite", "--fraction", "0"], ["--fraction 0.0 must be in (0, 1]"]),
    "rank 0": (["--overwrite", "--lora-r", "0"], ["--lora-r 0 must be >= 1"]),
    "cutoff shorter than the prompt": (["--overwrite", "--cutoff", "8"], ["--cutoff 8 is too short: the prompt template alone takes"]),
    "more clients than examples": (["--overwrite", "--clients", "100", "--min-client-size", "1"],
                                   ["data: --clients 100: cannot give 100 clients 1 records each from 60 records"]),
    "longer than the model reads": (["--overwrite", "--cutoff", "512", "--max-new-tokens", "250"],
                                    ["the model reads at most 256 tokens", "--max-new-tokens 250"]),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_impossible_config_exits_with_one_line_and_keeps_the_output(case, tiny_run, run_copy, capsys):
    extra, pieces = BAD_CONFIGS[case]
    (run_copy / "results.json").write_text("{}")  # as a finished run has one
    before = tree_bytes(run_copy)
    code, err = main_error([*tiny_run[2], "--out", str(run_copy), *extra], capsys)
    assert code == 2
    assert_one_line(err, "error: ", *pieces)
    assert tree_bytes(run_copy) == before


def test_diverging_run_stops_naming_client_and_round(tiny_run, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = main_error([*tiny_run[2], "--out", str(out), "--lr", "1e30"], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: fedit: loss became")
    assert "of client 0 in round 0; stopped" in err and "keeps the last good round (0 of 3 complete)" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["current"] is None  # the initial state


def test_errors_in_a_subprocess_are_one_line_without_traceback(tiny_run, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_run[0], base)
    BAD_MODELS["offsets outside the buffer"][0](base)
    for args in ([*tiny_run[2], "--model", str(base), "--out", str(tmp_path / "a")],
                 [*tiny_run[2], "--out", str(tmp_path / "b"), "--methods", "fedavg"]):
        r = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stdout == ""
        assert_one_line(r.stderr, "error: ")
        assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    r = subprocess.run([sys.executable, "train.py", *args, "--debug"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" in r.stderr and "UserError: unknown method(s) fedavg" in r.stderr


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
        data.write_federated(data.builtin_benchmark(seed=0, n_train=3, n_test=2), d / "data")
        torch.manual_seed(0)
        model.write_safetensors({"a": torch.randn(2, 3), "b": torch.randn(4).bfloat16(), "c": torch.zeros(0, 5)},
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
    one_line_or_ok(model.read_safetensors, model.CheckpointError, str(path))


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
    with pytest.raises(model.CheckpointError, match="m.safetensors: .*" + re.escape(piece)):
        model.read_safetensors(str(tmp_path / "m.safetensors"))


def test_nothing_is_unpickled_but_through_weights_only_torch_load():
    for path in ROOT.glob("*.py"):
        if path.name.startswith("test_"):  # the patterns below are in this file
            continue
        src = path.read_text()
        assert not re.search(r"pickle\.loads?\(|Unpickler|allow_pickle=True|weights_only=False", src), path
        for call in re.findall(r"torch\.load\([^)]*\)", src):
            assert "weights_only=True" in call, (path, call)
