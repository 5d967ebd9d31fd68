"""model.py and generate.py: logits, greedy and beam search equal to transformers' LlamaForCausalLM
(random tiny models with grouped-query attention, tied and untied, and a real pretrained checkpoint),
the representation, and the training loss against full logits and F.cross_entropy (fast.py's faster
forwards: tests/test_fast.py)."""
import pytest
import torch
import torch.nn.functional as F

import hf
import model
from conftest import hf_tiny, left_padded, smollm2_dir, until_eos
import lora
from generate import generate

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


def test_training_loss_is_cross_entropy_of_the_labelled_next_tokens():
    """forward(labels): the mean over labelled positions of -log softmax(logits)[next token], computed here
    by hand, where a label on a row's first real token (only padding before it) counts for nothing."""
    torch.manual_seed(0)
    m = model.Llama(model.PRESETS["tiny"]).double()
    ids, mask = left_padded(1024)
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, -3:] = -100                                # an unlabelled tail
    logits, loss = m(ids, mask, labels)
    logp = logits.log_softmax(-1)
    terms = [-logp[b, t, labels[b, t + 1]] for b in range(len(ids)) for t in range(ids.shape[1] - 1)
             if labels[b, t + 1] != -100 and mask[b, t]]
    padded_rows = int((mask[:, 0] == 0).sum())                # their first real token's label is not counted
    assert len(terms) == int((labels[:, 1:] != -100).sum()) - padded_rows
    assert torch.allclose(loss, torch.stack(terms).mean(), rtol=1e-12)


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
