"""lora.py: parity with peft, and the invariants of two named adapters."""
import math

import pytest
import torch

import fast
import hf
import lora
import model
from conftest import hf_tiny, left_padded


def params(m, name):
    return list(lora.adapter_tensors(m, name).values())


def test_lora_matches_peft(tmp_path):
    from peft import LoraConfig, get_peft_model
    theirs = hf_tiny(tmp_path)
    ours = lora.inject(hf.from_pretrained(str(tmp_path)), r=4, lora_alpha=8, dropout=0.0).eval()
    ref = get_peft_model(theirs, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(3)
    for name, m in ref.named_modules():
        if hasattr(m, "lora_B") and "default" in getattr(m, "lora_B", {}):
            m.lora_B["default"].weight.data.normal_(0, 0.1)
    state = {k.removeprefix("base_model.model.").replace(".default", ""): v
             for k, v in ref.state_dict().items() if "lora_" in k}
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)
    lora.load_adapter(ours, "global", state)
    ids, mask = left_padded(96)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), lora.mixed(ours, {"global": 1.0}):
        want = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got, _ = ours(ids, mask)
    assert (want - got)[mask.bool()].abs().max() <= 1e-5


def tiny_lora(seed=0):
    torch.manual_seed(seed)
    m = lora.inject(model.Llama(model.PRESETS["tiny"]), r=4, lora_alpha=8, dropout=0.0)
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
        with lora.mixed(base, {"global": 0.7, "local": torch.tensor([0.1, 0.5, 0.9])}):
            got = base(ids, mask)[0]
    assert torch.equal(want, got)


@pytest.mark.parametrize("train", lora.ADAPTERS)
def test_a_step_changes_only_the_trained_adapter(train):
    m = tiny_lora()
    frozen = "local" if train == "global" else "global"
    lora.set_trainable(m, train)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = left_padded(1024)
    with lora.mixed(m, {"global": 0.5, "local": 0.5}):
        m(ids, mask, ids.masked_fill(mask == 0, -100))[1].backward()
    assert all(p.grad is None for p in params(m, frozen))
    assert all(p.grad is not None for p in params(m, train))
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
    half = models[torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in params(half, "global"))
    assert all(p.dtype == torch.bfloat16 for n, p in half.named_parameters() if "lora_" not in n)
    assert all(torch.equal(a, b) for a, b in zip(params(half, "global"),
                                                 params(models[torch.float32], "global")))
    ids, mask = left_padded(1024)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.autocast("cpu", dtype=torch.bfloat16), lora.mixed(half, {"global": 1.0}):
        loss = half(ids, mask, labels)[1]
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params(half, "global"))
    assert all(p.grad is None for n, p in half.named_parameters() if ".global." not in n)
    with lora.mixed(models[torch.float32], {"global": 1.0}):
        full = models[torch.float32](ids, mask, labels)[1].item()
    assert abs(loss.item() - full) < 0.02 * loss.item()


def test_a_merged_mix_gives_the_mixed_logits_and_leaves_the_model_as_it_was():
    """extras.export.merged_model folds a fixed mix into a plain Llama's weights: its logits are the mixed
    model's, and the model it came from is not changed."""
    from extras import export
    m = tiny_lora().eval()
    ids, mask = left_padded(1024)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    mix = {"global": 0.3, "local": 0.7}
    with torch.no_grad():
        with lora.mixed(m, mix):
            want = m(ids, mask)[0]
        got = export.merged_model(m, mix).eval()(ids, mask)[0]
    assert (want - got).abs().max() < 1e-5 and (want - m(ids, mask)[0]).abs().max() > 1e-3
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_per_example_weights_equal_examples_run_alone():
    m = tiny_lora().eval()
    ids, mask = left_padded(1024)
    lam = torch.tensor([0.0, 0.35, 1.0])
    with torch.no_grad():
        with lora.mixed(m, {"local": lam, "global": 1 - lam}):
            batched = m(ids, mask)[0]
        for i in range(3):
            with lora.mixed(m, {"local": lam[i].item(), "global": 1 - lam[i].item()}):
                alone = m(ids[i:i + 1, mask[i].bool()])[0]
            assert (batched[i, mask[i].bool()] - alone[0]).abs().max() < 1e-5


def test_per_example_weights_refuse_packed_training_batches():
    m = tiny_lora()
    ids, mask = left_padded(1024)
    with lora.mixed(m, {"local": torch.tensor([0.0, 0.35, 1.0])}):
        m(ids, mask, ids)  # the plain model's batch is padded: one row per example
        with fast.enabled(m, rows=8), pytest.raises(ValueError, match="per-example weights"):
            m(ids, mask, ids)  # fast.py's loss packs the real tokens: no longer one row per example


@pytest.mark.parametrize("p, shape, sigmas", [(0.05, (40, 25), 4.0), (0.5, (7,), 4.0), (0.05, (40, 25), -1.0)])
def test_dropout_masks_are_independent_bernoulli(p, shape, sigmas):
    """lora.Dropout draws the gaps between drops rather than a number per element; the masks must still
    be independent Bernoulli(p) per element, kept values scaled by 1 / (1 - p), and nothing dropped in
    eval mode. sigmas < 0 draws too few gaps at first on purpose: the path that draws more. The draws
    are the generator's: the same generator state gives the same mask, and none draws from torch's."""
    d, x, n = lora.Dropout(p), torch.ones(shape), 4000
    d.sigmas = sigmas
    d.generator = torch.Generator().manual_seed(0)
    torch.manual_seed(1)
    before = torch.random.get_rng_state()
    state = d.generator.get_state()
    first = d(x)
    d.generator.set_state(state)
    assert torch.equal(d(x), first) and torch.equal(torch.random.get_rng_state(), before)
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
    lora.load_adapter(m, "local", g)
    assert all(torch.equal(g[k], v) for k, v in lora.get_adapter(m, "local").items())
    bad = dict(g)
    key = next(iter(bad))
    bad[key] = torch.zeros(1, 1)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        lora.load_adapter(m, "local", bad)


def test_initialisation_is_peft_s_and_each_clients_fresh_local_adapter_its_own(tmp_path):
    """peft's LoRA initialisation, as its default (init_lora_weights=True) draws it: A kaiming-uniform
    (a = sqrt 5), B = 0. Ours on the same model: B exactly 0; A within peft's bound and filling it, with
    the same distribution (two-sample Kolmogorov-Smirnov distance under 0.06: p < 1e-6 for 4096 draws
    each under the same law). FedDPA-T's fresh local adapters (feddpa.fresh_local): the same law, one
    per client (each its own draw, the same on every call), none equal to another or to the slots'."""
    import feddpa
    from peft import LoraConfig, get_peft_model
    theirs = hf_tiny(tmp_path)
    torch.manual_seed(0)
    peft_model = get_peft_model(theirs, LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    peft_A = {k: v for k, v in peft_model.state_dict().items() if "lora_A" in k}
    assert all(not v.any() for k, v in peft_model.state_dict().items() if "lora_B" in k)
    ours = lora.inject(hf.from_pretrained(str(tmp_path)), ["q_proj", "v_proj"], r=16, lora_alpha=16, seed=0)
    slots = {name: lora.get_adapter(ours, name) for name in lora.ADAPTERS}
    fresh = [feddpa.fresh_local(ours, 0, i) for i in range(3)]
    assert all(torch.equal(fresh[1][k], v) for k, v in feddpa.fresh_local(ours, 0, 1).items())

    def ks(a, b):
        a, b = a.flatten().sort().values, b.flatten().sort().values
        grid = torch.cat([a, b])
        cdf = lambda s: torch.searchsorted(s, grid, right=True) / len(s)  # noqa: E731
        return (cdf(a) - cdf(b)).abs().max().item()
    want = torch.cat([v.flatten() for v in peft_A.values()])
    bound = want.abs().max().item()
    for adapter in [*slots.values(), *fresh]:
        assert all(not v.any() for k, v in adapter.items() if "lora_B" in k)
        A = torch.cat([v.flatten() for k, v in adapter.items() if "lora_A" in k])
        assert len(A) == len(want) == 4096
        assert 0.97 * bound < A.abs().max().item() <= bound / 0.999, (A.abs().max().item(), bound)
        assert ks(A, want) < 0.06
    A_of = [torch.cat([v.flatten() for k, v in a.items() if "lora_A" in k]) for a in [*slots.values(), *fresh]]
    assert all(not torch.equal(A_of[i], A_of[j]) for i in range(len(A_of)) for j in range(i))
