"""fast.py, the optional speed layer, against the plain reference (model.py as it is): the packed,
chunked training loss and its gradients, the logits, the representations and a decoding step, in
float64, where only summation order can differ; the oneDNN products in float32 and bfloat16 within a
rounding bound; greedy and beam answers token for token; nothing left on the model after the block; and
a whole run with --plain equal to the golden run that the default (fast) path is held to."""
import contextlib
import json

import pytest
import torch

import fast
import lora
import model
from conftest import left_padded
from generate import generate

STATE = ("forward", "hidden", "pooled")  # what fast.enabled puts on the model, and must take away


def adapted(dtype, adapter_dtype=None, seed=0):
    """A tiny Llama with two different non-zero adapters on q and v, no dropout."""
    torch.manual_seed(seed)
    m = model.Llama(model.PRESETS["tiny"]).to(dtype)
    lora.inject(m, targets=("q_proj", "v_proj"), dropout=0.0, dtype=adapter_dtype or dtype)
    g = torch.Generator().manual_seed(seed + 1)
    for _, layer in lora.lora_layers(m):
        for name in lora.ADAPTERS:
            layer.lora_B[name].weight.data = 0.1 * torch.randn(layer.lora_B[name].weight.shape, generator=g).to(
                layer.lora_B[name].weight.dtype)
    return m.eval()


def outputs(m, ids, mask, labels):
    """Everything a run asks of the model: logits, the loss and the local adapter's gradients (global
    mixed in), both representations, and a prefill plus two decoding steps of a KV cache."""
    from generate import KVCache, next_logits
    local = [p for n, p in m.named_parameters() if ".local" in n]
    with lora.mixed(m, {"global": 0.4, "local": 0.6}):
        lora.set_trainable(m, "local")
        loss = m(ids, mask, labels)[1]
        grads = torch.autograd.grad(loss, local)
        lora.set_trainable(m, None)
        with torch.no_grad():
            logits = m(ids, mask)[0]
            last, mean = m.pooled(ids, mask, "last"), m.pooled(ids, mask, "mean")
            cache = KVCache(m.config, len(ids), ids.shape[1] + 2, m.lm_head.weight.dtype, ids.device)
            steps, step_mask = [next_logits(m, ids, mask, cache)], mask
            for _ in range(2):
                step_mask = torch.cat([step_mask, torch.ones_like(step_mask[:, :1])], 1)
                steps.append(next_logits(m, steps[-1].argmax(-1)[:, None], step_mask, cache))
    return {"loss": loss, "grads": grads, "logits": logits[mask.bool()], "last": last, "mean": mean,
            "decode": torch.stack(steps)}


def close(a, b, rtol):
    """|a - b| within rtol of b's largest magnitude, tensor by tensor."""
    if isinstance(a, (tuple, list)):
        return all(close(x, y, rtol) for x, y in zip(a, b))
    return bool((a.double() - b.double()).abs().max() <= rtol * b.double().abs().max())


@pytest.mark.parametrize("lengths", [(5, 9, 7), (9, 9, 9)])  # padded (packed path) and not (causal path)
def test_fast_forwards_equal_the_plain_ones_in_float64(lengths):
    """Packing, the last block at kept positions only, the chunked loss and the folded decoding step
    compute the same function as model.py: in float64 the two agree to summation order (1e-12)."""
    m = adapted(torch.float64)
    ids, mask = left_padded(1024, lengths=lengths)
    labels = ids.masked_fill(mask == 0, model.IGNORE_INDEX)
    labels[0, -2:] = model.IGNORE_INDEX                   # an unlabelled tail: the last block skips it
    plain = outputs(m, ids, mask, labels)
    with fast.enabled(m, rows=64):
        faster = outputs(m, ids, mask, labels)
    for key in plain:
        assert close(faster[key], plain[key], 1e-12), key


@pytest.mark.parametrize("lengths", [(5, 9, 7), (9, 9, 9)])
def test_lora_dropout_drops_the_same_units_on_both_paths(lengths):
    """In training, with LoRA dropout on q, v and the MLP (whose inputs the fast path packs, and whose last
    block it runs at labelled rows only), the loss and gradients of both paths agree in float64: each
    layer's mask is the padded batch's, drawn from the client's generator, at the rows a path computes."""
    torch.manual_seed(0)
    m = model.Llama(model.PRESETS["tiny"]).double().eval()
    lora.inject(m, targets=("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), dropout=0.3,
                dtype=torch.float64)
    for _, layer in lora.lora_layers(m):
        torch.nn.init.normal_(layer.lora_B["global"].weight, std=0.1)
    ids, mask = left_padded(1024, lengths=lengths)
    labels = ids.masked_fill(mask == 0, model.IGNORE_INDEX)
    labels[0, -2:] = model.IGNORE_INDEX
    local = [p for n, p in m.named_parameters() if ".local" in n]

    def step():
        g = torch.Generator().manual_seed(5)
        with lora.mixed(m, {"global": 0.5, "local": 0.5}), lora.training(m, "local", g):
            loss = m(ids, mask, labels)[1]
            return loss, torch.autograd.grad(loss, local), g.get_state()
    plain = step()
    with fast.enabled(m, rows=64):
        faster = step()
    assert close(faster[0], plain[0], 1e-12) and close(faster[1], plain[1], 1e-12)
    assert torch.equal(faster[2], plain[2])  # as many draws
    with torch.no_grad(), lora.mixed(m, {"global": 0.5, "local": 0.5}):
        assert not close(plain[0], m(ids, mask, labels)[1], 1e-6)  # the check has teeth: dropout changed the loss


def test_the_chunked_loss_equals_cross_entropy_in_every_chunking():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(50, (10,), generator=g)
    want = torch.nn.functional.cross_entropy(h @ w.T, t)
    want_grads = torch.autograd.grad(2.5 * want, (h, w))
    for rows in (1, 3, 10, 64):
        got = fast.linear_cross_entropy(h, w, t, rows)
        assert torch.allclose(got, want, rtol=1e-12)
        assert close(torch.autograd.grad(2.5 * got, (h, w)), want_grads, 1e-12)
        with torch.no_grad():
            assert torch.allclose(fast.linear_cross_entropy(h, w, t, rows), want, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_products_are_the_plain_ones_up_to_rounding(dtype, monkeypatch):
    """On CPU every frozen projection and lm_head multiplies through oneDNN with its reordered weight:
    logits, loss and LoRA gradients within 1e-4 (float32) or 0.05 (bfloat16) of their largest
    magnitude, about 100 and 10 units in the last place of a 64-term sum; a weight that trains (here the
    tied lm_head and embedding) runs plainly and gets its gradient."""
    m = adapted(dtype, torch.float32)
    monkeypatch.setattr(fast, "TRAIN_PACK_MIN", 0)  # every frozen weight reordered in training too
    ids, mask = left_padded(1024)
    labels = ids.masked_fill(mask == 0, model.IGNORE_INDEX)
    rtol = 1e-4 if dtype == torch.float32 else 0.05
    usable = dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    plain = outputs(m, ids, mask, labels)
    with fast.enabled(m, rows=len(ids)):
        layers = fast.onednn_layers(m)
        assert bool(layers) == usable and all(type(x) is torch.nn.Linear for x in layers)
        faster = outputs(m, ids, mask, labels)
    for key in plain:
        assert close(faster[key], plain[key], rtol), key
    m.lm_head.weight.requires_grad_(True)
    with lora.mixed(m, {"local": 1.0}):
        want = torch.autograd.grad(m(ids, mask, labels)[1], m.lm_head.weight)[0]
        with fast.enabled(m, rows=len(ids)):
            got = torch.autograd.grad(m(ids, mask, labels)[1], m.lm_head.weight)[0]
    assert close(got, want, rtol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beams", [1, 4])
def test_answers_are_the_plain_ones_token_for_token(dtype, beams):
    """Greedy and beam search with a per-example mix, as evaluation runs them."""
    m = adapted(dtype, seed=3)
    ids, mask = left_padded(1024, seed=3, lengths=(4, 8, 6, 8))
    lam = torch.tensor([0.1, 0.5, 0.9, 0.3]).repeat_interleave(beams)
    mix = {"local": lam, "global": 1 - lam}
    plain = generate(m, ids, mask, 10, eos_id=2, pad_id=0, num_beams=beams, mix=mix)
    with fast.enabled(m, rows=len(ids) * beams):
        faster = generate(m, ids, mask, 10, eos_id=2, pad_id=0, num_beams=beams, mix=mix)
    assert torch.equal(faster, plain)


def test_the_block_leaves_nothing_behind_however_it_ends():
    m = adapted(torch.float32)
    linears = [x for x in m.modules() if type(x) is torch.nn.Linear]
    with pytest.raises(RuntimeError), fast.enabled(m, rows=8):
        assert all(name in m.__dict__ for name in STATE)
        with fast.enabled(m, rows=8):  # a block inside another changes nothing, and takes nothing away
            pass
        assert all(name in m.__dict__ for name in STATE)
        raise RuntimeError("a failure inside the block")
    assert not any(name in x.__dict__ for x in [m, *linears] for name in STATE)


def test_a_plain_run_gives_the_fast_run_in_float64(tiny_run, tmp_path, monkeypatch):
    """python train.py --plain (no fast.py) and the default path, every method of a small float64 run with
    LoRA dropout: the same scores and lambdas, and adapters and losses within test_runs.RTOL."""
    import test_runs
    model_dir, data_dir, args = tiny_run
    args = [*args[:args.index("--methods")], "--dtype", "float64", "--lora-dropout", "0.2", "--quiet"]
    got, entered, enabled = {}, [], fast.enabled

    @contextlib.contextmanager
    def spy(model_, *a, **k):  # records the blocks that put the fast forwards on the model
        with enabled(model_, *a, **k):
            if "hidden" in model_.__dict__:
                entered.append(1)
            yield model_
    monkeypatch.setattr(fast, "enabled", spy)
    for name, extra in (("fast", []), ("plain", ["--plain"])):
        entered.clear()
        test_runs.train.main([*args, *extra, "--out", str(tmp_path / name)])
        assert bool(entered) == (name == "fast")  # training and evaluation, or neither
        res = json.loads((tmp_path / name / "results.json").read_text())
        got[name] = {"adapters": {str(p.relative_to(tmp_path / name)): test_runs.projections(p)
                                  for p in sorted((tmp_path / name / "adapters").rglob("*.safetensors"))},
                     "methods": {m: {k: v for k, v in r.items() if k != "eval_seconds"} for m, r in res["methods"].items()},
                     "training": {p: [{k: v for k, v in h.items() if k != "seconds"} for h in t["history"]]
                                  for p, t in res["training"].items()}}
    assert len(got["plain"]["adapters"]) > 10 and len(got["plain"]["methods"]) == 12
    problems = test_runs.differences(got["plain"], got["fast"])
    assert not problems, f"{len(problems)} differences, first: " + "; ".join(problems[:5])
