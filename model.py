"""A compact Llama-family decoder in plain PyTorch: the frozen foundation model FedDPA fine-tunes.

This file is the model and nothing else: no files (hf.py reads and writes checkpoints), no decoding
loop (generate.py), no data, no federation, no device decisions. Parameter names follow the Hugging
Face Llama layout (`model.layers.N.self_attn.q_proj.weight`, ..., `lm_head.weight`), so real
checkpoints load key by key.

Top to bottom: config and presets; RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP,
each block taking (x, ctx) where ctx carries what attention needs (rotary tables, mask, KV cache, and
for training batches where the real tokens sit); the chunked cross-entropy; the frozen weights'
products through oneDNN on CPU (packed_linears, scoped by its callers); the model with its training
loss, its hidden states and FedDPA's instance representation.
"""
import math
import os
from contextlib import contextmanager
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
    # What sets the Llama families apart (Llama 2 / SmolLM2 leave them all at their defaults):
    head_dim: int = 0             # per-head width; 0: dim // n_heads (Qwen3 gives its own)
    qkv_bias: bool = False        # biases on q, k, v (Qwen2, Qwen2.5)
    qk_norm: bool = False         # per-head RMSNorm of queries and keys before RoPE (Qwen3)
    rope_scaling: dict | None = None   # {"rope_type": "llama3" or "linear", "factor": ..., ...} (Llama 3.x)
    sliding_window: int | None = None  # Mistral: attention span; longer sequences are refused
    family: str = "llama"         # the Hugging Face model_type, written back on save

    def __post_init__(self):
        if not self.head_dim and self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim}, n_heads {self.n_heads}, n_kv_heads {self.n_kv_heads}: "
                             "dim must divide by n_heads and n_heads by n_kv_heads")
        self.head_dim = self.head_dim or self.dim // self.n_heads

    @property
    def context(self) -> int:
        """The longest sequence read exactly: max_seq_len, or a shorter sliding window (whose mask is not
        implemented here, so longer sequences are refused rather than read as full attention)."""
        return min(self.max_seq_len, self.sliding_window or self.max_seq_len)


IGNORE_INDEX = -100  # a label the loss skips (F.cross_entropy's default ignore_index)

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
        # normalise in float32 (float64 in a float64 model) whatever the working dtype, as the reference Llama does
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(head_dim: int, max_len: int, theta: float, scaling: dict | None = None):
    """cos/sin tables, (max_len, head_dim), in the HF 'rotate half' layout (not interleaved pairs)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))  # (hd/2,)
    if scaling:
        inv_freq = scale_rope(inv_freq, scaling)
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def scale_rope(inv_freq, scaling: dict):
    """Rotary frequencies stretched for a longer context, as transformers' rope init functions do.
    linear: every frequency / factor. llama3 (Llama 3.1+): wavelengths above the original context / low
    factor are divided by factor, those below it / high factor kept, and those between interpolated."""
    kind, factor = scaling["rope_type"], scaling["factor"]
    if kind == "linear":
        return inv_freq / factor
    low, high, context = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)                     # 0 at the long end, 1 at the short
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def apply_rope(x, cos, sin):
    """x: (B, h, T, hd); cos, sin: (B, 1, T, hd) gathered at each token's position."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Packing(NamedTuple):
    """Where N packed tokens sit in a padded (B, T) batch: their flat positions b * T + t, in order.
    Optional to port (speed only): the plain way runs every block on the padded batch and keeps h[keep]."""
    B: int
    T: int
    index: torch.Tensor  # (N,)


def unpack(t, packing: Packing):
    """Packed tokens (N, C) to the padded layout (B, T, C), zeros elsewhere."""
    return t.new_zeros(packing.B * packing.T, t.shape[-1]).index_copy(0, packing.index, t).view(packing.B, packing.T, -1)


def pack(t, packing: Packing):
    """(B, T, C) to the packed tokens only, (N, C)."""
    return t.reshape(packing.B * packing.T, -1).index_select(0, packing.index)


class Context(NamedTuple):
    """What a block needs besides x, built once per forward by Llama.hidden."""
    cos: torch.Tensor                  # (B, 1, T, hd) rotary tables at each token's position
    sin: torch.Tensor
    mask: torch.Tensor | None          # (B, 1, T, S) bool, True = may attend; None = plain causal
    cache: object = None               # a KV cache (generate.KVCache) while decoding
    packing: Packing | None = None     # x is packed: the (N, dim) real tokens of a (B, T) batch
    out: torch.Tensor | None = None    # (M,) rows of packed x whose outputs are wanted (last block)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.hd = layer, config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.dim, config.n_heads * self.hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * self.hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * self.hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_heads * self.hd, config.dim, bias=False)
        if config.qk_norm:  # Qwen3: one RMSNorm over each head's hd features, shared by all heads
            self.q_norm, self.k_norm = RMSNorm(self.hd, config.norm_eps), RMSNorm(self.hd, config.norm_eps)

    def forward(self, x, ctx: Context):
        """x: (B, T, dim); or packed, (N, dim): the real tokens of a (B, T) batch (ctx.packing). Only
        attention needs the padded layout, so only it unpacks, and packs again. ctx.out (M,): the rows
        of packed x whose outputs are wanted; queries are formed only there."""
        packing = qpacking = ctx.packing
        xq = x
        if ctx.out is not None:
            xq, qpacking = x[ctx.out], packing._replace(index=packing.index[ctx.out])
        q, k, v = self.q_proj(xq), self.k_proj(x), self.v_proj(x)              # (..., heads * hd)
        if packing is not None:
            q, k, v = unpack(q, qpacking), unpack(k, packing), unpack(v, packing)  # (B, T, heads * hd)
        B, T, _ = q.shape
        q = q.view(B, T, self.n_heads, self.hd).transpose(1, 2)                # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)                   # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if hasattr(self, "q_norm"):                                            # per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer, k, v)                          # (B, nkv, S, hd)
        # grouped-query attention: each kv head serves n_heads / n_kv query heads; enable_gqa shares it
        # inside the kernel instead of copying k and v (and, when decoding, the whole cache every step).
        # mask None: no padding and no cache, so plain causal attention
        gqa = self.n_kv != self.n_heads
        if gqa and T == 1 and ctx.cache is not None:
            # a decoding step: the n_heads / n_kv query heads that share a kv head become that many queries
            # of it, (B, nkv, group, hd), one plain attention (as transformers does): the same attention, up
            # to rounding; on CPU the kernel runs one query per head slowly, in bfloat16 five times slower.
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, -1, self.hd), k, v, attn_mask=ctx.mask)
            y = y.reshape(B, self.n_heads, 1, self.hd)                         # (B, nh, 1, hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.mask is None, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, -1)                                # (B, T, nh * hd)
        return self.o_proj(y if packing is None else pack(y, qpacking))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, ctx: Context):
        h = self.self_attn(self.input_layernorm(x), ctx)
        x = (x if ctx.out is None else x[ctx.out]) + h           # ctx.out: only those rows go on
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The `model.` prefix of the HF layout: embeddings, blocks, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)


class LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(h_i @ weight.T, target_i), and its gradients, a chunk of rows at a time.

    The plain way holds (N, vocab) logits and passes over them about six times (log-softmax, its
    gradient, a zero-filled NLL gradient), a tensor too big for any cache. Here each chunk's logits
    go straight to its loss and, when a gradient is needed, to d loss / d logits = (softmax - onehot) / N
    and on to the gradients of h and weight, which backward only scales. Same FLOPs, one pass.
    Optional to port: the plain equivalent is F.cross_entropy(F.linear(h, weight).float(), targets).
    (`fn` is autograd's context object, named apart from the blocks' Context.)
    """

    @staticmethod
    def forward(fn, h, weight, targets, rows, grad):  # h: (N, dim), weight: (vocab, dim), targets: (N,)
        N = h.shape[0]
        need_h, need_w = grad and fn.needs_input_grad[0], grad and fn.needs_input_grad[1]
        acc = torch.promote_types(h.dtype, torch.float32)                    # float32, or float64 in a float64 model
        loss = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None
        for i in range(0, N, rows):
            hc, tc = h[i:i + rows], targets[i:i + rows]
            logp = torch.log_softmax(F.linear(hc, weight).to(acc), -1)       # (c, vocab)
            loss -= logp.gather(1, tc[:, None]).sum()
            if need_h or need_w:
                d = logp.exp_()                                                # softmax, in place
                d[torch.arange(len(tc), device=d.device), tc] -= 1             # softmax - onehot = N dloss/dlogits
                if need_h:
                    grad_h[i:i + rows] = (d.to(weight.dtype) @ weight) / N     # (c, dim)
                if need_w:
                    grad_w += d.t().to(hc.dtype) @ hc / N                      # (vocab, dim)
        fn.save_for_backward(grad_h, grad_w)
        fn.weight_dtype = weight.dtype
        return loss / N

    @staticmethod
    def backward(fn, g):
        grad_h, grad_w = fn.saved_tensors
        return (None if grad_h is None else grad_h * g.to(grad_h.dtype),
                None if grad_w is None else (grad_w * g).to(fn.weight_dtype), None, None, None)


def linear_cross_entropy(h, weight, targets, rows: int = 0):
    """Mean cross-entropy of F.linear(h, weight) against targets, in chunks of `rows` (default: about
    2^22 logits, 16 MB, per chunk). Gradients are formed only where autograd is recording."""
    rows = rows or max(1, 2 ** 22 // weight.shape[0])
    return LinearCrossEntropy.apply(h, weight, targets, rows, torch.is_grad_enabled())


# ----------------------------------------------------------------------------------------------
# The products through oneDNN (optional to port)

def _physical_memory() -> int:
    """Bytes of memory this machine has (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


TRAIN_PACK_MIN = 2 ** 16  # elements of the smallest weight packed for training (see packed_linears)


class PackedLinear(torch.autograd.Function):
    """x @ W.T + b with W frozen, W.T and W each reordered once for oneDNN: forward multiplies by the
    one, backward (the input's gradient; a frozen W needs none of its own) by the other."""

    @staticmethod
    def forward(fn, x, w, w_t, b):                 # x: (..., in); w: W (out, in) packed; w_t: W.T packed
        fn.w_t = w_t
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")

    @staticmethod
    def backward(fn, g):                           # g: (..., out) -> (..., in)
        return torch.ops.mkldnn._linear_pointwise(g, fn.w_t, None, "none", [], ""), None, None, None


@contextmanager
def packed_linears(model: nn.Module, rows: int):
    """Inside the block, on CPU, the model's frozen projections and lm_head (not LoRA's own matrices)
    multiply through oneDNN, each weight reordered once (at its first such product) into a blocked layout for products of about
    `rows` rows (as torch.compile does on CPU; torch.ops.mkldnn), in inference and in training (where
    W.T is reordered too, for the input's gradient). Why: on this project's AMD EPYC machines the
    default BLAS runs float32 products 2-3x slower than oneDNN, those of a decoding step's few rows up to
    6x (docs/speed.md). The same products, up to rounding. The weights must not change inside the block.
    A weight that trains, a call under autocast or in another dtype runs the plain way; the block does
    nothing off CPU, for dtypes other than float32 and bfloat16 (bfloat16 where the CPU has its
    instructions), inside a block already packed, or where the reordered copies would take more than a
    quarter of the machine's memory. Optional to port: without it, the block is the plain model."""
    train = torch.is_grad_enabled()                  # then W.T too, for the input's gradient
    # under no_grad every weight is a constant. In training a small weight stays plain: a product with it
    # is cheap, and the autograd step around oneDNN's costs more than it saves (the built-in base, 128
    # wide, trained 10-15% slower packed; SmolLM2, 576 wide, 1.6x faster)
    layers = [m for name, m in model.named_modules()
              if type(m) is nn.Linear and ".lora_" not in name
              and not (train and (m.weight.requires_grad or m.weight.numel() < TRAIN_PACK_MIN))]
    w = layers[0].weight if layers else None
    usable = (w is not None and w.device.type == "cpu" and torch.backends.mkldnn.is_available()
              and (w.dtype == torch.float32
                   or (w.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()))
              and not any("forward" in m.__dict__ for m in layers)
              and 4 * (1 + train) * sum(m.weight.numel() * m.weight.element_size() for m in layers) < _physical_memory())
    if not usable:
        yield model
        return
    for m in layers:
        m.forward = _packed_forward(m, rows, train)
    try:
        yield model
    finally:
        for m in layers:
            del m.forward


def _packed_forward(m: nn.Linear, rows: int, train: bool):
    packed = []  # [W, W.T or None] reordered, at the first call that uses them: under autocast none does

    def forward(x):
        if x.dtype != m.weight.dtype or torch.is_autocast_enabled(x.device.type):
            return F.linear(x, m.weight, m.bias)
        if not packed:
            packed.extend([torch.ops.mkldnn._reorder_linear_weight(m.weight, rows),
                           torch.ops.mkldnn._reorder_linear_weight(m.weight.t().contiguous(), rows) if train else None])
        w, w_t = packed
        if w_t is not None and torch.is_grad_enabled() and x.requires_grad:
            return PackedLinear.apply(x, w, w_t, m.bias)
        return torch.ops.mkldnn._linear_pointwise(x, w, m.bias, "none", [], "")
    return forward


# ----------------------------------------------------------------------------------------------
# The model

class Llama(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_rope()
        self.apply(self._init_weights)

    def init_rope(self, device=None):
        # non-persistent: derived from the config, never part of a checkpoint
        c = self.config
        cos, sin = rope_tables(c.head_dim, c.max_seq_len, c.rope_theta, c.rope_scaling)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

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
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.config.max_seq_len}")
        if start + T > self.config.context:
            raise ValueError(f"sequence of {start + T} tokens exceeds the sliding window of {self.config.sliding_window} "
                             "tokens (sliding-window attention is not supported)")
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
        packing = out = None
        if keep is not None and mask is not None:  # padding: pack the real tokens
            packing = Packing(B, T, valid.flatten().nonzero().squeeze(1))         # (N,) the real tokens
            out = keep[valid].nonzero().squeeze(1)                                # (M,) rows of packed x
        x = self.model.embed_tokens(input_ids if packing is None else input_ids.flatten()[packing.index])  # (B, T, dim) or (N, dim)
        ctx = Context(cos.to(x.dtype), sin.to(x.dtype), mask, cache, packing)
        last = len(self.model.layers) - 1
        for i, block in enumerate(self.model.layers):
            x = block(x, ctx if i < last else ctx._replace(out=out))
        if cache is not None:
            cache.len += T
        if keep is not None and packing is None:  # no padding, nothing packed: the kept states are picked here
            x = x[keep]
        return self.model.norm(x)

    def forward(self, input_ids, attention_mask=None, labels=None):
        """Returns (logits, loss).

        Without labels: logits (B, T, vocab), loss None. With labels (IGNORE_INDEX = ignored): logits None and
        the mean cross-entropy of next-token prediction over labelled positions. Training computes only
        what the loss needs (hidden(keep=...)), and the vocabulary projection, which dominates the cost
        of small models, only at labelled positions and in chunks (linear_cross_entropy).
        """
        if labels is None:
            return self.lm_head(self.hidden(input_ids, attention_mask)), None
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): the token each position predicts
        keep = targets != IGNORE_INDEX
        if attention_mask is not None:  # a label on a row's first real token is dropped: only padding precedes it
            keep &= attention_mask.bool()
        h = self.hidden(input_ids, attention_mask, keep=keep)  # (M, dim)
        return None, linear_cross_entropy(h, self.lm_head.weight, targets[keep])

    def pooled(self, input_ids, attention_mask, pool: str = "last"):
        """An instance's representation (FedDPA's dynamic weighting), (B, dim): the final normalised hidden
        state at the last real token ('last'), or its masked mean over real tokens ('mean')."""
        if pool == "mean":
            h = self.hidden(input_ids, attention_mask)
            real = attention_mask.to(h.dtype)                                    # (B, T)
            return (h * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp(min=1)
        B, T = attention_mask.shape
        last = (attention_mask * torch.arange(T, device=attention_mask.device)).argmax(-1)  # (B,)
        keep = torch.zeros(B, T, dtype=torch.bool, device=attention_mask.device)
        keep[torch.arange(B, device=keep.device), last] = True
        return self.hidden(input_ids, attention_mask, keep=keep)  # (B, dim): one kept position per row


def state_mismatch(expected: dict, given: dict, noun: str = "tensor", source: str = "the model expects"):
    """The first tensor of `given` that is missing, unexpected or of another shape than in `expected`
    (both {name: tensor}), as a phrase for an error message; None if they match."""
    for key in sorted(set(expected) | set(given)):
        if key not in given:
            return f"{noun} {key} is missing"
        if key not in expected:
            return f"unexpected {noun} {key}"
        if tuple(given[key].shape) != tuple(expected[key].shape):
            return f"{noun} {key} has shape {tuple(given[key].shape)}, {source} {tuple(expected[key].shape)}"
    return None
