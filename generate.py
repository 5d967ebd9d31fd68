"""Decoding with a KV cache: greedy and beam search, with the semantics of Hugging Face `generate`.

FedDPA is evaluated by generating answers (the paper: 4 beams, 80 new tokens). Prompts are
left-padded (data.pad_left), so every sequence's next token goes in the same cache slot, and
positions count real tokens only (model.Llama.hidden), so a padded prompt decodes as it would alone.
The LoRA mix (lora.py) is an argument: per-example weights follow the rows, beams laid out
example-major, and beam search encodes each prompt once, with its first beam's weights, then copies its
cache to its beams.

Not here: the model (model.py), which adapters are mixed and how (feddpa.py).
"""
import torch
import torch.nn.functional as F

import lora
from model import Llama, ModelConfig


class KVCache:
    """Preallocated keys/values per layer, (B, n_kv, max_len, hd): decoding never reallocates them."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype, device):
        shape = (batch, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.len = 0  # slots filled so far (the same for every sequence: prompts are left-padded)

    def update(self, layer: int, k, v):
        T = k.shape[2]
        self.k[layer][:, :, self.len:self.len + T] = k
        self.v[layer][:, :, self.len:self.len + T] = v
        return self.k[layer][:, :, :self.len + T], self.v[layer][:, :, :self.len + T]

    def reorder(self, index):
        """Beam search: row i of the cache becomes old row index[i]."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]

def next_logits(model: Llama, ids, mask, cache):
    """The next token's logits after ids (B, T), (B, vocab), in float32 as transformers takes them
    (on CPU, bfloat16's argmax over the vocabulary is several times slower)."""
    return model.lm_head(model.hidden(ids, mask, cache)[:, -1]).float()


@torch.no_grad()
def generate(model: Llama, input_ids, attention_mask, max_new_tokens: int, eos_id, pad_id: int,
             num_beams: int = 1, mix: dict | None = None):
    """New tokens, (B, L) with L <= max_new_tokens: each row ends at its EOS (kept), then pad_id.
    eos_id: an id, or a list of ids any of which ends a row (tokenizer.stop_ids; Llama 3 has several).
    Greedy for num_beams=1, else beam search with the semantics of HF `generate(num_beams=k)`. mix: the
    LoRA mix of every forward pass (lora.mixed; a per-example weight has B * num_beams rows, beams
    example-major); None: no adapter, the base model."""
    eos_id = torch.tensor(eos_id, device=input_ids.device).view(-1)          # (n_eos,)
    mix = mix or {}
    with lora.mixed(model, mix):
        if num_beams > 1:
            return beam_search(model, input_ids, attention_mask, max_new_tokens, eos_id, pad_id, num_beams, mix)
        return greedy(model, input_ids, attention_mask, max_new_tokens, eos_id, pad_id)


@torch.no_grad()
def greedy(model: Llama, input_ids, attention_mask, max_new_tokens: int, eos_id, pad_id: int):  # eos_id: (n_eos,)
    """Each row takes its most likely next token until it ends in EOS, as HF `generate(do_sample=False)`."""
    B, T = input_ids.shape
    cache = KVCache(model.config, B, T + max_new_tokens, model.lm_head.weight.dtype, input_ids.device)
    mask = attention_mask.long()
    logits = next_logits(model, input_ids, mask, cache)                       # (B, vocab)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    out = []
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1).masked_fill(done, pad_id)                     # (B,)
        out.append(nxt)
        done |= torch.isin(nxt, eos_id)
        if done.all() or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = next_logits(model, nxt[:, None], mask, cache)
    return torch.stack(out, dim=1)


@torch.no_grad()
def beam_search(model: Llama, input_ids, attention_mask, max_new_tokens, eos_id, pad_id, k, mix):  # eos_id: (n_eos,)
    """Beam search as HF transformers does it (length_penalty 1, early_stopping False): each step
    keeps the 2k best continuations of the k live beams; those ending in EOS become finished
    hypotheses scored by sum log-prob / generated length; the k best others live on. A batch
    element stops once no live beam can beat its k-th finished hypothesis. mix: generate's, (B * k) rows."""
    B, T = input_ids.shape
    dev = input_ids.device
    eos = set(eos_id.tolist())
    # the k beams of a prompt start identical: encode each prompt once, then copy its cache k times
    cache = KVCache(model.config, B, T + max_new_tokens, model.lm_head.weight.dtype, dev)
    first_beams = torch.arange(0, B * k, k, device=dev)                      # (B,) each example's first beam
    with lora.mixed(model, {n: w.index_select(0, first_beams) if torch.is_tensor(w) else w for n, w in mix.items()}):
        logits = next_logits(model, input_ids, attention_mask.long(), cache)  # (B, vocab)
    first = torch.arange(B, device=dev).repeat_interleave(k)                 # (B*k,) beam -> its prompt
    cache.reorder(first)
    logits, mask = logits.index_select(0, first), attention_mask.long().index_select(0, first)
    V = logits.shape[-1]
    scores = torch.full((B, k), -1e9, device=dev)
    scores[:, 0] = 0.0                      # all k beams start identical: count only the first
    seqs = torch.zeros(B, k, 0, dtype=torch.long, device=dev)                # generated so far
    finished = [[] for _ in range(B)]       # per element: (score, tokens) of ended hypotheses
    done = [False] * B
    for step in range(max_new_tokens):
        cand = (scores[..., None] + F.log_softmax(logits, -1).view(B, k, V)).view(B, k * V)
        top, idx = cand.topk(2 * k, dim=-1)                                  # (B, 2k)
        beam, tok = idx // V, idx % V
        new_scores = torch.full((B, k), -1e9, device=dev)
        new_beam = torch.zeros(B, k, dtype=torch.long, device=dev)
        new_tok = torch.full((B, k), pad_id, dtype=torch.long, device=dev)
        for b in range(B):
            if done[b]:
                continue
            n = 0
            for j in range(2 * k):
                prev = seqs[b, beam[b, j]]
                if tok[b, j].item() in eos:
                    # only candidates ranked among the k best may finish (as HF does)
                    if j < k:
                        finished[b].append((top[b, j].item() / (step + 1),
                                            torch.cat([prev, tok[b, j:j + 1]])))
                    continue
                new_scores[b, n], new_beam[b, n], new_tok[b, n] = top[b, j], beam[b, j], tok[b, j]
                n += 1
                if n == k:
                    break
            finished[b] = sorted(finished[b], key=lambda h: -h[0])[:k]
            # early_stopping=False: stop when the best live beam, at this length, cannot win
            if len(finished[b]) == k and new_scores[b, 0].item() / (step + 1) <= finished[b][-1][0]:
                done[b] = True
        scores = new_scores
        seqs = torch.cat([seqs.gather(1, new_beam[..., None].expand(-1, -1, seqs.shape[2])),
                          new_tok[..., None]], dim=2)
        if all(done) or step == max_new_tokens - 1:
            break
        flat = (new_beam + torch.arange(B, device=dev)[:, None] * k).view(-1)  # (B*k,) rows to keep
        cache.reorder(flat)
        mask = torch.cat([mask.index_select(0, flat), torch.ones_like(mask[:, :1])], dim=1)
        logits = next_logits(model, new_tok.view(-1, 1), mask, cache)
    best = []
    for b in range(B):
        hyps = list(finished[b])
        if not done[b]:  # out of steps: live beams compete with what finished
            hyps += [(scores[b, i].item() / seqs.shape[2], seqs[b, i]) for i in range(k)]
        best.append(max(hyps, key=lambda h: h[0])[1])
    L = max(len(s) for s in best)
    out = torch.full((B, L), pad_id, dtype=torch.long, device=dev)
    for b, s in enumerate(best):
        out[b, :len(s)] = s
    return out


