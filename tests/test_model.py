"""model.py and generate.py: logits, greedy and beam search equal to transformers' LlamaForCausalLM
(random tiny models with grouped-query attention, tied and untied, and a real pretrained checkpoint),
the representation, and the training loss and gradients of the packed, chunked forward."""
import pytest
import torch
import torch.nn.functional as F

import hf
import model
from conftest import hf_tiny, left_padded, smollm2_dir, until_eos
import lora
from generate import generate, packed_linears

@pytest.mark.parametrize("tie", [False, True])
def test_logits_and_greedy_match_transformers(tmp_path, tie):
    theirs = hf_tiny(tmp_path, tie=tie)
    ours = hf.from_pretrained(str(tmp_path)).eval()
    assert ours.config.tie_embeddings == tie and ours.config.n_kv_heads == 2
    ids, mask = left_padded(96)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # HF's generate() positions for left padding
    with torch.no_grad():
        ref = theirs(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got, _ = ours(ids, mask)
    assert (ref - got)[mask.bool()].abs().max() <= 1e-4
    want = theirs.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                       eos_token_id=2, pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(generate(ours, ids, mask, 20, eos_id=-1, pad_id=0), want)


@pytest.mark.parametrize("seed", range(4))
def test_beam_search_matches_transformers(tmp_path, seed):
    theirs = hf_tiny(tmp_path, seed=seed, vocab=48)
    with torch.no_grad():  # make EOS likely so that beams finish at different lengths
        theirs.lm_head.weight[2] += 0.4 * seed * theirs.lm_head.weight[2].sign()
    theirs.save_pretrained(tmp_path)
    ours = hf.from_pretrained(str(tmp_path)).eval()
    ids, mask = left_padded(48, seed=seed, lengths=(4, 6, 3, 6))
    want = theirs.generate(ids, attention_mask=mask, max_new_tokens=12, num_beams=4, do_sample=False,
                       eos_token_id=2, pad_token_id=0)[:, ids.shape[1]:]
    got = generate(ours, ids, mask, 12, eos_id=2, pad_id=0, num_beams=4)
    assert [until_eos(r) for r in got] == [until_eos(r) for r in want]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linears_give_the_plain_products_and_leave_nothing_behind(dtype, monkeypatch):
    """model.packed_linears: inside the block, on CPU, each frozen projection and lm_head multiplies
    through oneDNN with its reordered weight: the same logits as the plain model with a LoRA mix on top,
    and in training the same loss and LoRA gradients, up to rounding; a weight that trains stays plain;
    after the block, however it ends, the model is the plain one."""
    m = model.Llama(model.PRESETS["tiny"]).to(dtype)
    lora.inject(m, targets=("q_proj", "v_proj"), dtype=torch.float32).eval()
    for _, layer in lora.lora_layers(m):
        torch.nn.init.normal_(layer.lora_B["local"].weight, std=0.1)
    ids, mask = left_padded(1024)
    labels = ids.masked_fill(mask == 0, model.IGNORE_INDEX)
    linears = [mod for name, mod in m.named_modules() if type(mod) is torch.nn.Linear and ".lora_" not in name]
    usable = dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    tol = 1e-4 if dtype == torch.float32 else 0.05

    def run():  # logits without gradients; loss and the local adapter's gradients with them
        with torch.no_grad():
            logits, _ = m(ids, mask)
        loss = m(ids, mask, labels)[1]
        grads = torch.autograd.grad(loss, [p for n, p in m.named_parameters() if ".local" in n])
        return logits.float(), loss.float(), grads

    with lora.mixed(m, {"local": 0.7}):  # (training packs a batch's real tokens: one weight for all)
        lora.set_trainable(m, "local")
        q = m.model.layers[0].self_attn.q_proj.base_layer
        with packed_linears(m, rows=len(ids)):  # in training a weight this small stays plain
            assert q.weight.numel() < model.TRAIN_PACK_MIN and "forward" not in q.__dict__
        monkeypatch.setattr(model, "TRAIN_PACK_MIN", 0)  # from here every frozen weight is packed
        plain = run()
        with packed_linears(m, rows=len(ids)):
            assert all(("forward" in mod.__dict__) == usable for mod in linears)  # CPU with oneDNN: packed
            packed = run()
        with pytest.raises(RuntimeError), packed_linears(m, rows=len(ids)):
            raise RuntimeError("a failure inside the block")
        assert not any("forward" in mod.__dict__ for mod in linears)
        m.lm_head.weight.requires_grad_(True)  # a weight that trains (tied: the embedding) is not packed
        with packed_linears(m, rows=len(ids)):
            assert "forward" not in m.lm_head.__dict__
    scale = plain[0].abs().max()
    assert (packed[0] - plain[0])[mask.bool()].abs().max() <= tol * scale
    assert (packed[1] - plain[1]).abs() <= tol * plain[1].abs()
    for a, b in zip(packed[2], plain[2]):
        assert (a - b).abs().max() <= tol * b.abs().max()


def test_represent_last_and_mean_ignore_padding():
    m = model.Llama(model.PRESETS["tiny"]).eval()
    ids, mask = left_padded(1024)
    with torch.no_grad():
        last, mean = m.pooled(ids, mask, "last"), m.pooled(ids, mask, "mean")
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


def test_real_checkpoint_smollm2_matches_transformers():
    """SmolLM2-135M-Instruct, a real pretrained Llama, built offline by tools/get_smollm2.py."""
    from transformers import AutoModelForCausalLM
    d = smollm2_dir()
    ours = hf.from_pretrained(d).eval()
    tok = hf.load_tokenizer(d, ours.config)
    theirs = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    enc = [tok.encode(p) for p in ("The capital of France is", "def fibonacci(n):", "Once upon a time")]
    T = max(map(len, enc))
    ids = torch.tensor([[tok.pad_id] * (T - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (T - len(e)) + [1] * len(e) for e in enc])
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        got, _ = ours(ids, mask)
    assert (want - got)[mask.bool()].abs().max() <= 1e-4
    chat = tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    x = torch.tensor([chat])
    out = generate(ours, x, torch.ones_like(x), 24, tok.eos_id, tok.pad_id)
    ref = theirs.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False)[:, len(chat):]
    assert until_eos(out[0], tok.eos_id) == until_eos(ref[0], tok.eos_id)
    assert "Paris" in tok.decode(out[0])
