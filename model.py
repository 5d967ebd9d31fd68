"""A compact Llama-family decoder in plain PyTorch, with Hugging Face-compatible checkpoints.

FedDPA (Yang et al., NeurIPS 2024) fine-tunes a *frozen* foundation model; this file is that
model and nothing else: no data, no federation, no device decisions. Parameter names follow the
Hugging Face Llama layout (`model.layers.N.self_attn.q_proj.weight`, ..., `lm_head.weight`) so real
checkpoints load key by key, and `save_pretrained` writes an ordinary HF directory.

Contents, top to bottom: config and presets; RMSNorm, rotary embeddings, grouped-query attention
(with packed batches: padding removed outside attention), SwiGLU MLP; the chunked cross-entropy; the
model with its loss, instance representation and KV-cached greedy / beam decoding; safetensors read
and written by hand; loading and saving HF directories; tokenizers.
"""
import json
import math
import os
import struct
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# Config

@dataclass
class ModelConfig:
    dim: int = 128                # hidden size
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2           # < n_heads: grouped-query attention
    vocab_size: int = 1024
    hidden_dim: int = 344         # SwiGLU inner size
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 256
    tie_embeddings: bool = True
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self):
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim}, n_heads {self.n_heads}, n_kv_heads {self.n_kv_heads}: "
                             "dim must divide by n_heads and n_heads by n_kv_heads")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


PRESETS = {
    # tiny: a few hundred thousand parameters, what the tests use
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1024, hidden_dim=176),
    # the built-in foundation model that `python train.py` pretrains on the built-in corpus
    "base": ModelConfig(),
    # the shape of Llama-2-7B, for reference and for sizing
    "llama2-7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000,
                             hidden_dim=11008, norm_eps=1e-5, max_seq_len=4096, tie_embeddings=False),
}


# ----------------------------------------------------------------------------------------------
# Blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 whatever the working dtype, as the reference Llama does
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(head_dim: int, max_len: int, theta: float):
    """cos/sin tables, (max_len, head_dim), in the HF 'rotate half' layout (not interleaved pairs)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """x: (B, h, T, hd); cos, sin: (B, 1, T, hd) gathered at each token's position."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Preallocated keys/values per layer, (B, n_kv, max_len, hd): decoding never reallocates them."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype, device):
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
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


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.hd = layer, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * self.hd, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, real=None, out=None):
        """x: (B, T, dim); or packed, (N, dim): the tokens at flat positions real.index of a (B, T) batch
        (its real ones). Only attention needs the padded layout, so only it unpacks, and packs again.
        out (M,): the rows of packed x whose outputs are wanted; queries are formed only there."""
        xq, qreal = (x, real) if out is None else (x[out], real._replace(index=real.index[out]))
        q, k, v = self.q_proj(xq), self.k_proj(x), self.v_proj(x)              # (..., heads * hd)
        if real is not None:
            q, k, v = unpack(q, qreal), unpack(k, real), unpack(v, real)        # (B, T, heads * hd)
        B, T, _ = q.shape
        q = q.view(B, T, self.n_heads, self.hd).transpose(1, 2)                # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)                   # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                              # (B, nkv, S, hd)
        # grouped-query attention: each kv head serves n_heads / n_kv query heads; enable_gqa shares it
        # inside the kernel instead of copying k and v (and, when decoding, the whole cache every step).
        # mask None: no padding and no cache, so plain causal attention
        gqa = self.n_kv != self.n_heads
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, -1)                                # (B, T, nh * hd)
        return self.o_proj(y if real is None else pack(y, qreal))


class Packing(NamedTuple):
    """Where N packed tokens sit in a padded (B, T) batch: their flat positions b * T + t, in order."""
    B: int
    T: int
    index: torch.Tensor  # (N,)


def unpack(t, real: Packing):
    """Packed tokens (N, C) to the padded layout (B, T, C), zeros elsewhere."""
    return t.new_zeros(real.B * real.T, t.shape[-1]).index_copy(0, real.index, t).view(real.B, real.T, -1)


def pack(t, real: Packing):
    """(B, T, C) to the packed tokens only, (N, C)."""
    return t.reshape(real.B * real.T, -1).index_select(0, real.index)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, real=None, out=None):
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, real, out)
        x = (x if out is None else x[out]) + h                   # out: only those rows go on
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The `model.` prefix of the HF layout: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(h_i @ weight.T, target_i), and its gradients, a chunk of rows at a time.

    The plain way holds (N, vocab) logits and passes over them about six times (log-softmax, its
    gradient, a zero-filled NLL gradient), a tensor too big for any cache. Here each chunk's logits
    go straight to its loss and, when a gradient is needed, to d loss / d logits = (softmax - onehot) / N
    and on to the gradients of h and weight, which backward only scales. Same FLOPs, one pass.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, rows, grad):  # h: (N, dim), weight: (vocab, dim), targets: (N,)
        N = h.shape[0]
        need_h, need_w = grad and ctx.needs_input_grad[0], grad and ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        for i in range(0, N, rows):
            hc, tc = h[i:i + rows], targets[i:i + rows]
            logp = torch.log_softmax(F.linear(hc, weight).float(), -1)       # (c, vocab)
            loss -= logp.gather(1, tc[:, None]).sum()
            if need_h or need_w:
                d = logp.exp_()                                                # softmax, in place
                d[torch.arange(len(tc), device=d.device), tc] -= 1             # softmax - onehot = N dloss/dlogits
                if need_h:
                    grad_h[i:i + rows] = (d.to(weight.dtype) @ weight) / N     # (c, dim)
                if need_w:
                    grad_w += d.t().to(hc.dtype) @ hc / N                      # (vocab, dim)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss / N

    @staticmethod
    def backward(ctx, g):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * g.to(grad_h.dtype),
                None if grad_w is None else (grad_w * g).to(ctx.weight_dtype), None, None, None)


def linear_cross_entropy(h, weight, targets, rows: int = 0):
    """Mean cross-entropy of F.linear(h, weight) against targets, in chunks of `rows` (default: about
    2^22 logits, 16 MB, per chunk). Gradients are formed only where autograd is recording."""
    rows = rows or max(1, 2 ** 22 // weight.shape[0])
    return LinearCrossEntropy.apply(h, weight, targets, rows, torch.is_grad_enabled())


# ----------------------------------------------------------------------------------------------
# The model

class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_rope()
        self.apply(self._init_weights)

    def init_rope(self, device=None):
        # non-persistent: derived from the config, never part of a checkpoint
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def hidden(self, input_ids, attention_mask=None, cache=None, keep=None):
        """Final normalised hidden states, (B, T, dim); or, given keep (B, T) bool marking real tokens,
        only those positions' states, (M, dim) in row-major order.

        attention_mask (B, S) marks real tokens with 1 and padding with 0 over every slot seen so far
        (S = cache length + T when decoding). Positions count real tokens only, so a left-padded
        prompt is encoded exactly as the same prompt alone.

        With keep (training: the positions that predict a label), work follows need. If there is padding,
        the blocks run on the real tokens only, packed as (N, dim): in a batch of examples of mixed
        lengths a third of the tokens can be padding, and only attention needs the padded layout; and the
        last block forms queries, attention output and MLP only at the kept positions, the others serving
        there as keys and values. Without padding nothing is packed (it would only copy).
        """
        B, T = input_ids.shape
        start = cache.len if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, start + T, dtype=torch.long, device=input_ids.device)
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        if keep is not None and cache is not None:
            raise ValueError("keep selects positions of whole sequences, not of decoding with a cache")
        valid = attention_mask.bool()                                             # (B, S)
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]      # (B, T)
        cos, sin = self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)  # (B, 1, T, hd)
        mask = None                                                               # causal, see Attention
        if cache is not None or not bool(valid.all()):
            q_slot = torch.arange(start, start + T, device=input_ids.device)[:, None]  # (T, 1)
            k_slot = torch.arange(start + T, device=input_ids.device)[None, :]         # (1, S)
            # causal and padding mask, (B, 1, T, S); every query may see itself, so padded rows stay finite
            mask = ((k_slot <= q_slot) & valid[:, None, None, :]) | (k_slot == q_slot)
        real = out = None
        if keep is not None and mask is not None:  # padding: pack the real tokens
            real = Packing(B, T, valid.flatten().nonzero().squeeze(1))            # (N,) the real tokens
            out = keep[valid].nonzero().squeeze(1)                                # (M,) rows of packed x
        x = self.model.embed_tokens(input_ids if real is None else input_ids.flatten()[real.index])  # (B, T, dim) or (N, dim)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        last = len(self.model.layers) - 1
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, mask, cache, real, out if i == last else None)
        if cache is not None:
            cache.len += T
        if keep is not None and real is None:  # no padding, nothing packed: the kept states are picked here
            x = x[keep]
        return self.model.norm(x)

    def forward(self, input_ids, attention_mask=None, labels=None):
        """Returns (logits, loss).

        Without labels: logits (B, T, vocab), loss None. With labels (-100 = ignored): logits None and
        the mean cross-entropy of next-token prediction over labelled positions. Training computes only
        what the loss needs (hidden(keep=...)), and the vocabulary projection, which dominates the cost
        of small models, only at labelled positions and in chunks (linear_cross_entropy).
        """
        if labels is None:
            return self.lm_head(self.hidden(input_ids, attention_mask)), None
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)      # (B, T): the token each position predicts
        keep = targets != -100
        if attention_mask is not None:  # a label on a row's first real token is dropped: only padding precedes it
            keep &= attention_mask.bool()
        h = self.hidden(input_ids, attention_mask, keep=keep)  # (M, dim)
        return None, linear_cross_entropy(h, self.lm_head.weight, targets[keep])

    def represent(self, input_ids, attention_mask, pool: str = "last"):
        """An instance's representation (FedDPA's dynamic weighting), (B, dim): the final normalised hidden
        state at the last real token ('last'), or its masked mean over real tokens ('mean')."""
        if pool == "mean":
            h = self.hidden(input_ids, attention_mask)
            m = attention_mask.to(h.dtype)
            return (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
        B, T = attention_mask.shape
        last = (attention_mask * torch.arange(T, device=attention_mask.device)).argmax(-1)  # (B,)
        keep = torch.zeros(B, T, dtype=torch.bool, device=attention_mask.device)
        keep[torch.arange(B, device=keep.device), last] = True
        return self.hidden(input_ids, attention_mask, keep=keep)  # (B, dim): one kept position per row

    # ------------------------------------------------------------------------------------------
    # Decoding: prompts are left-padded, so every sequence's next token goes in the same cache slot.

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, max_new_tokens: int, eos_id: int, pad_id: int,
                 num_beams: int = 1):
        """New tokens, (B, L) with L <= max_new_tokens: each row ends at its EOS (kept), then pad_id.
        Greedy for num_beams=1, else beam search with the semantics of HF `generate(num_beams=k)`."""
        if num_beams > 1:
            return self._beam_search(input_ids, attention_mask, max_new_tokens, eos_id, pad_id, num_beams)
        B, T = input_ids.shape
        cache = KVCache(self.cfg, B, T + max_new_tokens, self.lm_head.weight.dtype, input_ids.device)
        mask = attention_mask.long()
        logits = self.lm_head(self.hidden(input_ids, mask, cache)[:, -1])        # (B, vocab)
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        out = []
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1).masked_fill(done, pad_id)                     # (B,)
            out.append(nxt)
            done |= nxt == eos_id
            if done.all() or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits = self.lm_head(self.hidden(nxt[:, None], mask, cache)[:, -1])
        return torch.stack(out, dim=1)

    def _beam_search(self, input_ids, attention_mask, max_new_tokens, eos_id, pad_id, k):
        """Beam search as HF transformers does it (length_penalty 1, early_stopping False): each step
        keeps the 2k best continuations of the k live beams; those ending in EOS become finished
        hypotheses scored by sum log-prob / generated length; the k best others live on. A batch
        element stops once no live beam can beat its k-th finished hypothesis."""
        B, T = input_ids.shape
        dev = input_ids.device
        ids = input_ids.repeat_interleave(k, dim=0)                              # (B*k, T)
        mask = attention_mask.long().repeat_interleave(k, dim=0)
        cache = KVCache(self.cfg, B * k, T + max_new_tokens, self.lm_head.weight.dtype, dev)
        logits = self.lm_head(self.hidden(ids, mask, cache)[:, -1]).float()      # (B*k, vocab)
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
                    if tok[b, j] == eos_id:
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
            logits = self.lm_head(self.hidden(new_tok.view(-1, 1), mask, cache)[:, -1]).float()
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


# ----------------------------------------------------------------------------------------------
# safetensors, by hand: 8-byte little-endian header length, a JSON header naming each tensor's
# dtype, shape and [begin, end) byte offsets into the raw buffer that follows.

class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line naming the file."""


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_safetensors(path: str) -> dict:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
        n = struct.unpack("<Q", head)[0]
        if 8 + n > size:
            raise CheckpointError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, an over-long number
            raise CheckpointError(f"{path}: header is not valid JSON ({str(e).splitlines()[0][:200]})") from None
        buf = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8) if size > 8 + n else torch.empty(0, dtype=torch.uint8)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
            ok = type(shape) is list and all(type(d) is int and 0 <= d < 1 << 63 for d in [*shape, begin, end])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if not ok:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed shape or offsets")
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']!r}")
        nbytes = math.prod(shape) * dtype.itemsize
        if not begin <= end <= buf.numel() or end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} offsets [{begin}, {end}) do not fit its "
                                  f"shape {shape} or the {buf.numel()}-byte buffer")
        # clone: a fresh, aligned buffer per tensor (offsets need not be multiples of the item size)
        out[name] = buf[begin:end].clone().view(dtype).reshape(shape)
    return out


def write_safetensors(tensors: dict, path: str):
    rev = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        b = t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": rev[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        chunks.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)  # pad so the buffer starts 8-byte aligned
    atomic_write(path, [struct.pack("<Q", len(h)), h, *chunks])


def atomic_write(path: str, chunks):
    """Write bytes to path via a temporary file, fsync and rename: never a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C included: the old file stays, the partial one goes
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ----------------------------------------------------------------------------------------------
# Hugging Face directories: config.json plus model.safetensors, sharded safetensors with an index,
# or pytorch_model.bin.

HF_KEYS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
           "n_kv_heads": "num_key_value_heads", "vocab_size": "vocab_size", "hidden_dim": "intermediate_size",
           "norm_eps": "rms_norm_eps", "max_seq_len": "max_position_embeddings",
           "tie_embeddings": "tie_word_embeddings", "bos_id": "bos_token_id", "eos_id": "eos_token_id"}


def config_from_hf(path: str) -> ModelConfig:
    try:
        with open(path) as f:
            hf = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read config ({e})") from None
    if hf.get("model_type") != "llama":
        raise CheckpointError(f"{path}: model_type {hf.get('model_type')!r} is not 'llama'")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"{path}: rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise CheckpointError(f"{path}: attention or MLP biases are not supported")
    kw = {ours: hf[theirs] for ours, theirs in HF_KEYS.items() if hf.get(theirs) is not None}
    kw.setdefault("n_kv_heads", kw.get("n_heads"))
    kw.setdefault("tie_embeddings", False)  # HF's LlamaConfig default
    for key in ("bos_id", "eos_id"):  # some checkpoints list several EOS ids; the first is the main one
        if isinstance(kw.get(key), list):
            kw[key] = kw[key][0]
    kw["rope_theta"] = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    try:
        cfg = ModelConfig(**kw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    if hf.get("head_dim", cfg.head_dim) != cfg.head_dim:
        raise CheckpointError(f"{path}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    return cfg


def read_weights(d: str) -> dict:
    """All tensors of an HF directory, whichever of the standard weight layouts it uses."""
    def path(name):
        return os.path.join(d, name)
    if os.path.isfile(path("model.safetensors")):
        return read_safetensors(path("model.safetensors"))
    for index, reader in (("model.safetensors.index.json", read_safetensors),
                          ("pytorch_model.bin.index.json", read_bin)):
        if os.path.isfile(path(index)):
            try:
                with open(path(index)) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{path(index)}: unreadable shard index ({e})") from None
            out = {}
            for shard in shards:
                out.update(reader(path(shard)))
            return out
    if os.path.isfile(path("pytorch_model.bin")):
        return read_bin(path("pytorch_model.bin"))
    raise CheckpointError(f"{d}: no model.safetensors, sharded safetensors index or pytorch_model.bin")


def read_bin(path: str) -> dict:
    try:  # weights_only: a checkpoint is data, never code to unpickle
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def from_pretrained(d: str, dtype=torch.float32, device="cpu") -> Llama:
    cfg = config_from_hf(os.path.join(d, "config.json"))
    sd = {k: v for k, v in read_weights(d).items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    with torch.device("meta"):  # no memory for weights that are about to be replaced
        model = Llama(cfg)
    expected = {k: v for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    for k in sorted(set(expected) | set(sd)):
        if k not in sd:
            raise CheckpointError(f"{d}: tensor {k} is missing from the checkpoint")
        if k not in expected:
            raise CheckpointError(f"{d}: unexpected tensor {k} in the checkpoint")
        if tuple(sd[k].shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{d}: tensor {k} has shape {tuple(sd[k].shape)}, "
                                  f"the config implies {tuple(expected[k].shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_rope()
    return model.to(device)


def save_pretrained(model: Llama, d: str):
    """Write config.json and model.safetensors as HF's LlamaForCausalLM would."""
    cfg = model.cfg
    os.makedirs(d, exist_ok=True)
    hf = {theirs: getattr(cfg, ours) for ours, theirs in HF_KEYS.items()}
    hf.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rope_theta=cfg.rope_theta,
              head_dim=cfg.head_dim, attention_bias=False, mlp_bias=False,
              torch_dtype=str(model.lm_head.weight.dtype).removeprefix("torch."))
    sd = {k: v for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    write_safetensors(sd, os.path.join(d, "model.safetensors"))
    atomic_write(os.path.join(d, "config.json"), [json.dumps(hf, indent=2).encode()])


# ----------------------------------------------------------------------------------------------
# Tokenizers behind one interface: encode(text) -> ids (no special tokens), decode(ids) -> text,
# bos_id, eos_id, pad_id, add_bos (whether a sequence starts with BOS, as the model was trained).

class SentencePieceTokenizer:
    def __init__(self, path: str):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.add_bos = True
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list:
        return self.sp.encode(text, out_type=int)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


class HFTokenizer:
    """tokenizer.json through the optional `tokenizers` package."""

    def __init__(self, d: str, cfg: ModelConfig):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise SystemExit(f"{d}/tokenizer.json needs the 'tokenizers' package: pip install tokenizers") from None
        self.tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
        extra = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if os.path.isfile(os.path.join(d, name)):
                with open(os.path.join(d, name)) as f:
                    extra = {**json.load(f), **extra}
        pad = extra.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        self.bos_id, self.eos_id = cfg.bos_id, cfg.eos_id
        self.pad_id = self.tok.token_to_id(pad) if pad and self.tok.token_to_id(pad) is not None else self.eos_id
        self.add_bos = bool(extra.get("add_bos_token", False))
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, text: str) -> list:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(d: str, cfg: ModelConfig):
    if os.path.isfile(os.path.join(d, "tokenizer.model")):
        return SentencePieceTokenizer(os.path.join(d, "tokenizer.model"))
    if os.path.isfile(os.path.join(d, "tokenizer.json")):
        return HFTokenizer(d, cfg)
    raise CheckpointError(f"{d}: no tokenizer.model or tokenizer.json")
