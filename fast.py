"""Speed, optional to port: faster forwards for model.py's Llama, the same numbers up to rounding.

    with fast.enabled(model, rows=...):   # train.py: once for the training phases, once for evaluation
        ...                               # model(...), model.hidden(...), model.pooled(...) run faster

Nothing else in the project calls this module's functions, and nothing here changes what a forward
computes: tests/test_fast.py holds every path equal to the plain one (float64 for the reshaped
computations, a stated rounding bound for oneDNN's float32 and bfloat16 products), and `python
train.py --plain` runs without it. A port can leave this file out. LoRA dropout drops the same units
on both paths: a layer on packed tokens takes its mask's rows from the padded batch's mask.

Inside the block:
- the training loss runs the blocks on the real tokens only (padding is up to a third of a batch of
  examples of mixed lengths; only attention needs the padded layout, so only it unpacks), forms the
  last block's queries, attention output and MLP only at labelled positions, and projects onto the
  vocabulary only there, in chunks whose gradients are formed in the same pass (LinearCrossEntropy);
  plainly: full logits and F.cross_entropy (model.Llama.forward);
- the representation 'last' forms the last block's outputs at one position per row;
- a decoding step of grouped-query attention folds the query heads that share a kv head into queries
  of it (as transformers does): on CPU the kernel runs one query per head slowly, five times slower in
  bfloat16;
- on CPU, the frozen projections and lm_head (not LoRA's own matrices) multiply through oneDNN with
  each weight reordered once into a blocked layout (as torch.compile does on CPU), W.T too where the
  input's gradient needs it: on this project's AMD EPYC machines the default BLAS runs float32
  products 2-3x slower than oneDNN, a decoding step's few rows up to 6x (docs/speed.md).
The weights of the base must not change inside the block (they are frozen while FedDPA trains).
"""
import os
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from model import IGNORE_INDEX, Llama, apply_rope


@contextmanager
def enabled(model: Llama, rows: int, on: bool = True):
    """Inside the block, model's forward, hidden and pooled run the faster paths below, and on CPU its
    frozen products run through oneDNN, reordered for products of about `rows` rows; after it, however
    it ends, the model is the plain one. A block inside another changes nothing, nor one with on False
    (train.py --plain)."""
    if not on or "hidden" in model.__dict__:
        yield model
        return
    model.forward = lambda input_ids, attention_mask=None, labels=None: forward(model, input_ids, attention_mask, labels)
    model.hidden = lambda input_ids, attention_mask=None, cache=None: hidden(model, input_ids, attention_mask, cache)
    model.pooled = lambda input_ids, attention_mask, pool="last": pooled(model, input_ids, attention_mask, pool)
    layers = onednn_layers(model)
    for m in layers:
        m.forward = onednn_forward(m, rows)
    try:
        yield model
    finally:
        for m in [model, *layers]:
            for name in ("forward", "hidden", "pooled"):
                m.__dict__.pop(name, None)


# ----------------------------------------------------------------------------------------------
# Packed tokens: the blocks on real tokens only, the last block only where outputs are wanted

class Packing(NamedTuple):
    """Where N packed tokens sit in a padded (B, T) batch: their flat positions b * T + t, in order."""
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
    """model.Context, and where x's tokens sit."""
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    cache: object = None
    packing: Packing | None = None     # x is packed: the (N, dim) real tokens of a (B, T) batch
    out: torch.Tensor | None = None    # (M,) rows of packed x whose outputs are wanted (last block)


def attention(self, x, ctx: Context):
    """model.Attention.forward on x (B, T, dim), or packed, (N, dim) (ctx.packing); queries are formed only
    at the rows ctx.out of packed x."""
    packing = qpacking = ctx.packing
    xq = x
    if ctx.out is not None:
        xq, qpacking = x[ctx.out], packing._replace(index=packing.index[ctx.out])
    q, k, v = project(self.q_proj, xq, qpacking), project(self.k_proj, x, packing), project(self.v_proj, x, packing)
    if packing is not None:
        q, k, v = unpack(q, qpacking), unpack(k, packing), unpack(v, packing)  # (B, T, heads * hd)
    B, T, _ = q.shape
    q = q.view(B, T, self.n_heads, self.hd).transpose(1, 2)                # (B, nh, T, hd)
    k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)                   # (B, nkv, T, hd)
    v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
    if hasattr(self, "q_norm"):
        q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
    if ctx.cache is not None:
        k, v = ctx.cache.update(self.layer, k, v)                          # (B, nkv, S, hd)
    gqa = self.n_kv != self.n_heads
    if gqa and T == 1 and ctx.cache is not None:
        # a decoding step: the query heads that share a kv head become that many queries of it, (B, nkv, group, hd)
        y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, -1, self.hd), k, v, attn_mask=ctx.mask)
        y = y.reshape(B, self.n_heads, 1, self.hd)                         # (B, nh, 1, hd)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.mask is None, enable_gqa=gqa)
    y = y.transpose(1, 2).reshape(B, T, -1)                                # (B, T, nh * hd)
    return project(self.o_proj, y if packing is None else pack(y, qpacking), qpacking)


def block(self, x, ctx: Context):
    """model.Block.forward; ctx.out: only those rows go on."""
    h = attention(self.self_attn, self.input_layernorm(x), ctx)
    rows = ctx.packing
    if ctx.out is not None:
        x, rows = x[ctx.out], rows._replace(index=rows.index[ctx.out])
    x = x + h
    z, m = self.post_attention_layernorm(x), self.mlp                          # model.MLP.forward, in its order
    return x + project(m.down_proj, F.silu(project(m.gate_proj, z, rows)) * project(m.up_proj, z, rows), rows)


def project(layer, x, packing: Packing | None):
    """layer(x); for a LoRA layer on packed rows, each adapter's dropout mask is the padded batch's
    (lora.Dropout.mask over (B * T, in)) at those rows, so that the same units drop as in the plain model."""
    if packing is None or not isinstance(layer, lora.LoRALinear):
        return layer(x)
    out = layer.base_layer(x)                                                   # (N, out)
    for name, w in layer.weights.items():
        if torch.is_tensor(w) or w != 0:
            d = layer.lora_dropout[name]
            if d.training and d.p > 0:
                mask = d.mask((packing.B * packing.T, x.shape[-1]), layer.lora_A[name].weight.dtype)
                dropout = lambda v, mask=mask.to(x.device).index_select(0, packing.index): v * mask  # noqa: E731
            else:
                dropout = lambda v: v  # noqa: E731
            out = out + layer.update(name, w, x, dropout=dropout).to(out.dtype)
    return out


def hidden(model: Llama, input_ids, attention_mask=None, cache=None, keep=None):
    """model.Llama.hidden; given keep (B, T) bool, only those positions' states, (M, dim) in row-major
    order. With padding the blocks run on the real tokens only, packed as (N, dim), and the last block
    forms its outputs only at the kept positions, the others serving there as keys and values. Without
    padding nothing is packed (it would only copy)."""
    if keep is not None and cache is not None:
        raise ValueError("keep selects positions of whole sequences, not of decoding with a cache")
    ctx = Context(*model.context(input_ids, attention_mask, cache))
    packing = out = None
    if keep is not None and ctx.mask is not None:  # padding: pack the real tokens
        valid = attention_mask.bool()
        packing = Packing(*input_ids.shape, valid.flatten().nonzero().squeeze(1))  # (N,) the real tokens
        out = keep[valid].nonzero().squeeze(1)                                    # (M,) rows of packed x
    x = model.model.embed_tokens(input_ids if packing is None else input_ids.flatten()[packing.index])
    ctx = ctx._replace(packing=packing)
    last = len(model.model.layers) - 1
    for i, b in enumerate(model.model.layers):
        x = block(b, x, ctx if i < last else ctx._replace(out=out))
    if cache is not None:
        cache.len += input_ids.shape[1]
    if keep is not None and packing is None:  # no padding, nothing packed: the kept states are picked here
        x = x[keep]
    return model.model.norm(x)


def forward(model: Llama, input_ids, attention_mask=None, labels=None):
    """model.Llama.forward, except that with labels the logits are not formed: returns (None, loss)."""
    if labels is None:
        return model.lm_head(hidden(model, input_ids, attention_mask)), None
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): the token each position predicts
    keep = targets != IGNORE_INDEX
    if attention_mask is not None:
        keep &= attention_mask.bool()
    h = hidden(model, input_ids, attention_mask, keep=keep)     # (M, dim)
    return None, linear_cross_entropy(h, model.lm_head.weight, targets[keep])


def pooled(model: Llama, input_ids, attention_mask, pool: str = "last"):
    """model.Llama.pooled; 'last' forms the last block's outputs at one position per row."""
    if pool == "mean":
        return Llama.pooled(model, input_ids, attention_mask, pool)
    B, T = attention_mask.shape
    last = (attention_mask * torch.arange(T, device=attention_mask.device)).argmax(-1)  # (B,)
    keep = torch.zeros(B, T, dtype=torch.bool, device=attention_mask.device)
    keep[torch.arange(B, device=keep.device), last] = True
    return hidden(model, input_ids, attention_mask, keep=keep)  # (B, dim)


# ----------------------------------------------------------------------------------------------
# The chunked cross-entropy

class LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(h_i @ weight.T, target_i), and its gradients, a chunk of rows at a time.

    The plain way holds (N, vocab) logits and passes over them about six times (log-softmax, its
    gradient, a zero-filled NLL gradient), a tensor too big for any cache. Here each chunk's logits
    go straight to its loss and, when a gradient is needed, to d loss / d logits = (softmax - onehot) / N
    and on to the gradients of h and weight, which backward only scales. Same FLOPs, one pass.
    (`fn` is autograd's context object.)
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
# The frozen products through oneDNN (CPU)

TRAIN_PACK_MIN = 2 ** 16  # elements of the smallest weight reordered for training (see onednn_forward)


def _physical_memory() -> int:
    """Bytes of memory this machine has (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def onednn_layers(model: nn.Module) -> list:
    """The model's plain nn.Linear layers (LoRA's own matrices excluded) that may multiply through oneDNN:
    none off CPU, for dtypes other than float32 and bfloat16 (bfloat16 where the CPU has its
    instructions), or where the reordered copies (W and W.T) would take more than a quarter of memory."""
    layers = [m for name, m in model.named_modules() if type(m) is nn.Linear and ".lora_" not in name]
    w = layers[0].weight if layers else None
    usable = (w is not None and w.device.type == "cpu" and torch.backends.mkldnn.is_available()
              and (w.dtype == torch.float32
                   or (w.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()))
              and 8 * sum(m.weight.numel() * m.weight.element_size() for m in layers) < _physical_memory())
    return layers if usable else []


class OneDNNLinear(torch.autograd.Function):
    """x @ W.T + b with W frozen, W.T and W each reordered once for oneDNN: forward multiplies by the
    one, backward (the input's gradient; a frozen W needs none of its own) by the other."""

    @staticmethod
    def forward(fn, x, w, w_t, b):                 # x: (..., in); w: W (out, in) reordered; w_t: W.T reordered
        fn.w_t = w_t
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")

    @staticmethod
    def backward(fn, g):                           # g: (..., out) -> (..., in)
        return torch.ops.mkldnn._linear_pointwise(g, fn.w_t, None, "none", [], ""), None, None, None


def onednn_forward(m: nn.Linear, rows: int):
    """m's forward through oneDNN, W reordered at its first product and W.T at the first that needs the
    input's gradient. The plain way where the weight trains, under autocast or in another dtype; and,
    while autograd records, for a weight under TRAIN_PACK_MIN elements: a product with it is cheap, and
    the autograd step around oneDNN's costs more than it saves (the built-in base, 128 wide, trained
    10-15% slower so; SmolLM2, 576 wide, 1.6x faster)."""
    reordered = {}

    def forward(x):
        grad = torch.is_grad_enabled()
        if (m.weight.requires_grad or x.dtype != m.weight.dtype or torch.is_autocast_enabled(x.device.type)
                or (grad and m.weight.numel() < TRAIN_PACK_MIN)):
            return F.linear(x, m.weight, m.bias)
        if "w" not in reordered:
            reordered["w"] = torch.ops.mkldnn._reorder_linear_weight(m.weight, rows)
        if grad and x.requires_grad:
            if "w_t" not in reordered:
                reordered["w_t"] = torch.ops.mkldnn._reorder_linear_weight(m.weight.t().contiguous(), rows)
            return OneDNNLinear.apply(x, reordered["w"], reordered["w_t"], m.bias)
        return torch.ops.mkldnn._linear_pointwise(x, reordered["w"], m.bias, "none", [], "")
    return forward
