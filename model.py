"""A compact Llama-family decoder in plain PyTorch: the frozen foundation model FedDPA fine-tunes.

This file is the model and nothing else: no files (hf.py reads and writes checkpoints), no decoding
loop (generate.py), no data, no federation, no device decisions, no speed tricks (fast.py, optional,
replaces some of these forwards with faster ones proven equal). Parameter names follow the Hugging
Face Llama layout (`model.layers.N.self_attn.q_proj.weight`, ..., `lm_head.weight`), so real
checkpoints load key by key.

Top to bottom: config and presets; RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP,
each block taking (x, ctx) where ctx carries what attention needs (rotary tables, mask, KV cache); the
model with its training loss (full logits, F.cross_entropy), its hidden states and FedDPA's instance
representation.
"""
import math
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


class Context(NamedTuple):
    """What a block needs besides x, built once per forward by Llama.context."""
    cos: torch.Tensor                  # (B, 1, T, hd) rotary tables at each token's position
    sin: torch.Tensor
    mask: torch.Tensor | None          # (B, 1, T, S) bool, True = may attend; None = plain causal
    cache: object = None               # a KV cache (generate.KVCache) while decoding


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

    def forward(self, x, ctx: Context):                                        # x: (B, T, dim)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)   # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)      # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if hasattr(self, "q_norm"):                                            # per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer, k, v)                          # (B, nkv, S, hd)
        # grouped-query attention: each kv head serves n_heads / n_kv query heads (enable_gqa shares it
        # inside the kernel instead of copying k and v); mask None: no padding and no cache, plain causal
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.mask is None,
                                           enable_gqa=self.n_kv != self.n_heads)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))               # (B, T, dim)


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
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The `model.` prefix of the HF layout: embeddings, blocks, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)


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

    def init_rope(self):
        # non-persistent: derived from the config, never part of a checkpoint
        c = self.config
        cos, sin = rope_tables(c.head_dim, c.max_seq_len, c.rope_theta, c.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def context(self, input_ids, attention_mask=None, cache=None) -> Context:
        """The rotary tables and mask of a forward over input_ids (B, T). attention_mask (B, S) marks real
        tokens with 1 and padding with 0 over every slot seen so far (S = cache length + T when decoding).
        Positions count real tokens only, so a left-padded prompt is encoded exactly as the same prompt alone."""
        B, T = input_ids.shape
        start = cache.len if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, start + T, dtype=torch.long, device=input_ids.device)
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.config.max_seq_len}")
        if start + T > self.config.context:
            raise ValueError(f"sequence of {start + T} tokens exceeds the sliding window of {self.config.sliding_window} "
                             "tokens (sliding-window attention is not supported)")
        valid = attention_mask.bool()                                             # (B, S)
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]      # (B, T)
        cos, sin = self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)  # (B, 1, T, hd)
        mask = None                                                               # causal, see Attention
        if cache is not None or not bool(valid.all()):
            q_slot = torch.arange(start, start + T, device=input_ids.device)[:, None]  # (T, 1)
            k_slot = torch.arange(start + T, device=input_ids.device)[None, :]         # (1, S)
            # causal and padding mask, (B, 1, T, S); every query may see itself, so padded rows stay finite
            mask = ((k_slot <= q_slot) & valid[:, None, None, :]) | (k_slot == q_slot)
        dtype = self.model.embed_tokens.weight.dtype
        return Context(cos.to(dtype), sin.to(dtype), mask, cache)

    def hidden(self, input_ids, attention_mask=None, cache=None):
        """Final normalised hidden states, (B, T, dim); with a KV cache, of the T new tokens after it."""
        ctx = self.context(input_ids, attention_mask, cache)
        x = self.model.embed_tokens(input_ids)                                    # (B, T, dim)
        for block in self.model.layers:
            x = block(x, ctx)
        if cache is not None:
            cache.len += input_ids.shape[1]
        return self.model.norm(x)

    def forward(self, input_ids, attention_mask=None, labels=None):
        """Returns (logits (B, T, vocab), loss): with labels (IGNORE_INDEX = ignored), the mean
        cross-entropy of next-token prediction over labelled positions, in float32 or wider; else None."""
        logits = self.lm_head(self.hidden(input_ids, attention_mask))
        if labels is None:
            return logits, None
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): the token each position predicts
        if attention_mask is not None:  # a label on a row's first real token is dropped: only padding precedes it
            targets = targets.masked_fill(attention_mask == 0, IGNORE_INDEX)
        acc = torch.promote_types(logits.dtype, torch.float32)
        return logits, F.cross_entropy(logits.flatten(0, 1).to(acc), targets.flatten(), ignore_index=IGNORE_INDEX)

    def pooled(self, input_ids, attention_mask, pool: str = "last"):
        """An instance's representation (FedDPA's dynamic weighting), (B, dim): the final normalised hidden
        state at the last real token ('last'), or its masked mean over real tokens ('mean')."""
        h = self.hidden(input_ids, attention_mask)                                # (B, T, dim)
        if pool == "mean":
            real = attention_mask.to(h.dtype)                                    # (B, T)
            return (h * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp(min=1)
        B, T = attention_mask.shape
        last = (attention_mask * torch.arange(T, device=attention_mask.device)).argmax(-1)  # (B,)
        return h[torch.arange(B, device=h.device), last]


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
