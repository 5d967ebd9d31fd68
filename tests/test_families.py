"""The Llama families beyond Llama 2 and SmolLM2: Llama 3.x rope scaling (llama3, linear), Qwen2 / Qwen2.5
(q/k/v biases, tied embeddings), Qwen3 (per-head q/k RMSNorm, its own head_dim) and Mistral (its sliding
window refused past its length). Each is held against transformers and peft on a tiny random model that
transformers builds and saves: logits with left padding, greedy and 4-beam generation, LoRA on every
target projection (forward and gradients), FedDPA's per-instance mix of two adapters, the PEFT and merged
exports, and a train.py run. Then what is refused, in one line; and byte-level BPE tokenizer.json files
with Llama 3's and Qwen's BOS/EOS conventions, against transformers' tokenizer and generate."""
import json
import sys

import pytest
import torch

import builtin
import data
import hf
import lora
import train
from conftest import TINY_RUN, left_padded, until_eos
from extras import export
from generate import generate

FAMILIES = ["llama3", "llama-linear", "qwen2", "qwen3", "mistral"]
WINDOW = 32  # the tiny Mistral's sliding window: the parity tests stay within it
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          # head_dim 16, theta 1e4: wavelengths 6.3 ... 2e4, so some are kept (< 64 / 4), some smoothed
          # (16 ... 64) and some divided by the factor (> 64)
          "original_max_position_embeddings": 64}
CLASSES = {"llama3": "LlamaForCausalLM", "llama-linear": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}


def family_config(name, vocab=96, **special):
    """transformers' own config class of the family, at a tiny shape with grouped-query attention."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
    shape = dict(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    own = {"llama3": (LlamaConfig, {"rope_scaling": dict(LLAMA3)}),  # a copy: transformers adds rope_theta to it
           "llama-linear": (LlamaConfig, {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
           "qwen2": (Qwen2Config, {"tie_word_embeddings": True}),     # Qwen2.5-0.5B ties its embeddings
           "qwen3": (Qwen3Config, {"head_dim": 24}),                  # not hidden / heads = 16
           "mistral": (MistralConfig, {"head_dim": 16, "sliding_window": WINDOW})}
    cls, kw = own[name]
    return cls(**{**shape, **kw, **special})


def hf_family(d, name, seed=0, vocab=96, **special):
    """A random tiny model of the family, saved by transformers to d: every weight, bias and norm random."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    theirs = AutoModelForCausalLM.from_config(family_config(name, vocab, **special)).eval()
    assert type(theirs).__name__ == CLASSES[name]
    with torch.no_grad():  # larger than HF's init, so logits are far from uniform; biases and norms not trivial
        for key, p in theirs.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in key else p.normal_(0, 0.3)
    theirs.save_pretrained(d)
    return theirs


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)  # HF's generate() positions for left padding


def hf_logits(theirs, ids, mask):
    with torch.no_grad():
        return theirs(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_with_left_padding(tmp_path, family):
    theirs = hf_family(tmp_path, family)
    ours = hf.from_pretrained(str(tmp_path)).eval()
    ids, mask = left_padded(96, lengths=(12, WINDOW - 2, 20))
    with torch.no_grad():
        got, _ = ours(ids, mask)
    assert (hf_logits(theirs, ids, mask) - got)[mask.bool()].abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_and_beam_search_match_transformers(tmp_path, family):
    theirs = hf_family(tmp_path, family, vocab=48)
    ours = hf.from_pretrained(str(tmp_path)).eval()
    ids, mask = left_padded(48, lengths=(5, 9, 7))
    want = theirs.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                           eos_token_id=2, pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(generate(ours, ids, mask, 20, eos_id=2, pad_id=0), want)
    with torch.no_grad():  # make EOS (2) and a second stop id (7) likely, so rows end at different lengths
        theirs.lm_head.weight[[2, 7]] *= 1.6
    theirs.save_pretrained(tmp_path)
    ours = hf.from_pretrained(str(tmp_path)).eval()
    want = theirs.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=[2, 7],
                           pad_token_id=0)[:, ids.shape[1]:]
    got = generate(ours, ids, mask, 20, eos_id=[2, 7], pad_id=0)
    assert torch.equal(got, want) and any(t in row for row in got.tolist() for t in (2, 7))
    ids, mask = left_padded(48, lengths=(4, 6, 3, 6))
    want = theirs.generate(ids, attention_mask=mask, max_new_tokens=12, num_beams=4, do_sample=False,
                           eos_token_id=2, pad_token_id=0)[:, ids.shape[1]:]
    got = generate(ours, ids, mask, 12, eos_id=2, pad_id=0, num_beams=4)
    assert [until_eos(r) for r in got] == [until_eos(r) for r in want]
    # a second stop id: the first token of the first row's best beam, so that stopping at it matters
    stops = [2, int(until_eos(got[0])[0])]
    want = theirs.generate(ids, attention_mask=mask, max_new_tokens=12, num_beams=4, do_sample=False,
                           eos_token_id=stops, pad_token_id=0)[:, ids.shape[1]:]
    multi = generate(ours, ids, mask, 12, eos_id=stops, pad_id=0, num_beams=4)
    assert stops[1] != 2 and [until_stop(r, stops) for r in multi] == [until_stop(r, stops) for r in want]
    assert [until_stop(r, stops) for r in multi] != [until_eos(r) for r in got]


def until_stop(row, stops):
    row = row.tolist()
    return row[:next((i + 1 for i, t in enumerate(row) if t in stops), len(row))]


def with_random_adapters(d):
    """Ours, LoRA on every target projection, both adapters random (B too, so they are not zero)."""
    model = lora.inject(hf.from_pretrained(d), lora.TARGETS, r=4, lora_alpha=8, dropout=0.0).eval()
    g = torch.Generator().manual_seed(5)
    for _, layer in lora.lora_layers(model):
        for name in lora.ADAPTERS:
            layer.lora_B[name].weight.data.normal_(0, 0.05, generator=g)
    return model


SETTINGS = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": sorted(lora.TARGETS)}


def peft_model(base, folders: dict, trainable=False):
    """transformers' model of base with the PEFT folders {adapter name: folder} loaded by peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    (first, d), *rest = folders.items()
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), d,
                                       adapter_name=first, is_trainable=trainable)
    for name, d in rest:
        theirs.load_adapter(d, adapter_name=name)
    return theirs


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_on_every_projection_equals_peft_forward_and_gradients(tmp_path, family):
    """Our adapters exported as PEFT folders: peft gives the same logits; and with labels the same loss and
    the same gradient for every LoRA matrix of every projection."""
    hf_family(tmp_path / "base", family)
    base = str(tmp_path / "base")
    ours = with_random_adapters(base)
    ids, mask = left_padded(96)
    labels = ids.masked_fill(mask == 0, -100)
    labels[torch.arange(3), (mask == 0).sum(1)] = -100  # each row's first token, as data.collate never labels it
    for name in lora.ADAPTERS:
        export.write_peft(lora.get_adapter(ours, name), str(tmp_path / name), base, SETTINGS)
        theirs = peft_model(base, {name: str(tmp_path / name)}, trainable=True)
        with lora.mixed(ours, {name: 1.0}):
            with torch.no_grad():
                got = ours(ids, mask)[0]
            assert (got - hf_logits(theirs, ids, mask))[mask.bool()].abs().max() <= 1e-5, name
            with lora.training(ours, name, torch.Generator()) as params:  # dropout 0: training mode changes nothing else
                mine = dict(zip(lora.adapter_tensors(ours, name), params))
                peft = {k.removeprefix(hf.PEFT_PREFIX).replace(f".{name}.", "."): p for k, p in theirs.named_parameters() if p.requires_grad}
                assert mine.keys() == peft.keys() and len(mine) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
                loss = ours(ids, mask, labels)[1]
                ref = theirs(input_ids=ids, attention_mask=mask, position_ids=positions(mask), labels=labels).loss
                assert torch.allclose(loss, ref, atol=1e-5)
                grads = zip(mine, torch.autograd.grad(loss, list(mine.values())), torch.autograd.grad(ref, [peft[k] for k in mine]))
                for k, g, h in grads:
                    assert torch.allclose(g, h, atol=1e-5, rtol=1e-4), (name, k)


@pytest.mark.parametrize("family", FAMILIES)
def test_feddpa_mix_per_instance_equals_the_oracle(tmp_path, family):
    """FedDPA's inference: each instance its own weight lam on the global adapter and 1 - lam on the
    local one (lora.mixed with (B,) tensors), against peft's two adapters mixed as the official
    LoRA layer does (the oracle of test_oracle.py, here per instance)."""
    from peft.tuners.lora import LoraLayer
    hf_family(tmp_path / "base", family)
    base = str(tmp_path / "base")
    ours = with_random_adapters(base)
    for name in lora.ADAPTERS:
        export.write_peft(lora.get_adapter(ours, name), str(tmp_path / name), base, SETTINGS)
    theirs = peft_model(base, {name: str(tmp_path / name) for name in lora.ADAPTERS}).eval()
    lam = torch.tensor([0.2, 0.9, 0.55])                                   # (B,)
    mix = {"global": lam, "local": 1 - lam}

    def mixed(layer):
        def forward(x, *args, **kwargs):
            out = layer.base_layer(x)
            for name, w in mix.items():
                out = out + w.view(-1, 1, 1) * layer.lora_B[name](layer.lora_A[name](x)) * layer.scaling[name]
            return out
        return forward
    layers = [m for m in theirs.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 7 * 2
    for m in layers:
        m.forward = mixed(m)
    ids, mask = left_padded(96)
    with lora.mixed(ours, mix), torch.no_grad():
        got = ours(ids, mask)[0]
    assert (got - hf_logits(theirs, ids, mask))[mask.bool()].abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_a_fixed_mix_merged_loads_in_transformers_as_its_family(tmp_path, family):
    from transformers import AutoModelForCausalLM
    hf_family(tmp_path / "base", family)
    ours = with_random_adapters(str(tmp_path / "base"))
    mix = {"local": 0.3, "global": 0.7}
    hf.save_pretrained(export.merged_model(ours, mix), str(tmp_path / "merged"))
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    assert type(theirs).__name__ == CLASSES[family]
    ids, mask = left_padded(96)
    with lora.mixed(ours, mix), torch.no_grad():
        got = ours(ids, mask)[0]
    assert (got - hf_logits(theirs, ids, mask))[mask.bool()].abs().max() <= 1e-4
    assert hf.config_from_hf(str(tmp_path / "merged" / "config.json")) == ours.config


# ----------------------------------------------------------------------------------------------
# Mistral's sliding window, and what is refused

def test_mistral_refuses_sequences_longer_than_its_sliding_window(tmp_path):
    """Within the window Mistral is full causal attention (the parity tests above); past it transformers
    masks what we would attend to, so we refuse, at the model and, before anything runs, in train.py."""
    theirs = hf_family(tmp_path, "mistral")
    ours = hf.from_pretrained(str(tmp_path)).eval()
    assert ours.config.context == WINDOW < ours.config.max_seq_len
    ids = torch.randint(3, 96, (1, WINDOW + 1))
    with torch.no_grad():
        ours(ids[:, :WINDOW])
        with pytest.raises(ValueError, match=f"sequence of {WINDOW + 1} tokens exceeds the sliding window of {WINDOW} tokens"):
            ours(ids)
        # the refusal is needed: past the window transformers' Mistral is no longer full attention
        # (the same weights, no window): over 2 windows, the later positions differ
        long = torch.randint(3, 96, (1, 2 * WINDOW))
        full = hf_logits(hf_family(tmp_path / "wide", "mistral", sliding_window=None), long, torch.ones_like(long))
        diff = (hf_logits(theirs, long, torch.ones_like(long)) - full)[0].abs().amax(-1)  # (2 * WINDOW,)
        assert diff[:WINDOW].max() <= 1e-4 and diff[WINDOW:].max() > 1e-2


def write_config(d, name, **changes):
    config = family_config(name).to_dict()
    config.update(changes)
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not ...}))
    return str(d / "config.json")


@pytest.mark.parametrize("family, changes, message", [
    ("llama3", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope scaling 'yarn' is not supported"),
    ("llama3", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope scaling 'dynamic' is not supported"),
    ("llama3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope scaling 'longrope' is not supported"),
    ("llama3", {"rope_parameters": {**LLAMA3, "low_freq_factor": ...}}, "rope scaling 'llama3' lacks 'low_freq_factor'"),
    ("qwen2", {"model_type": "gemma"}, "model_type 'gemma' is not supported (supported: llama, mistral, qwen2, qwen3)"),
    ("qwen2", {"use_sliding_window": True, "layer_types": ["sliding_attention"] * 2}, "sliding-window attention layers"),
    ("qwen3", {"attention_bias": True}, "attention or MLP biases are not supported"),
    ("mistral", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ("llama3", {"partial_rotary_factor": 0.5}, "partial rotary embeddings"),
])
def test_what_is_not_supported_is_one_line_naming_it(tmp_path, family, changes, message):
    if "rope_parameters" in changes:
        changes["rope_parameters"] = {k: v for k, v in changes["rope_parameters"].items() if v is not ...}
    path = write_config(tmp_path, family, **changes)
    with pytest.raises(hf.CheckpointError) as e:
        hf.config_from_hf(path)
    assert message in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith(path)


def test_legacy_rope_scaling_and_rope_theta_keys_read_as_the_new_ones(tmp_path):
    """Checkpoints written before transformers 5 say rope_scaling (type or rope_type) and rope_theta."""
    new = hf.config_from_hf(write_config(tmp_path / "new", "llama3"))
    legacy = {"rope_scaling": {**{k: v for k, v in LLAMA3.items() if k != "rope_type"}, "type": "llama3"},
              "rope_theta": 10000.0, "rope_parameters": ...}
    assert hf.config_from_hf(write_config(tmp_path / "old", "llama3", **legacy)) == new
    assert new.rope_scaling == LLAMA3 and new.family == "llama"


# ----------------------------------------------------------------------------------------------
# Byte-level BPE tokenizers (tokenizer.json) with each family's conventions

SPECIALS = {"llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],   # ids 0, 1, 2
            "qwen": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]}


def texts():
    world = builtin.benchmark(seed=0, n_train=20, n_test=5)
    return builtin.corpus(n_docs=200) + [data.format_prompt(r) + r["output"] for c in world.clients for r in c]


def bpe_folder(d, style):
    """A byte-level BPE tokenizer.json as Llama 3's (BOS prepended by its post-processor; EOS ids
    end_of_text and eot_id, the end of a turn) or Qwen's (no BOS; end of turn <|im_end|>), with the
    config files such a checkpoint carries. Returns the folder and the tokenizer's vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts(), trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS[style],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if style == "llama3":
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                           special_tokens=[("<|begin_of_text|>", 0)])
        extra = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
        ids = {"bos_token_id": 0, "eos_token_id": [1, 2]}
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        extra = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
        ids = {"bos_token_id": 0, "eos_token_id": 2}
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **extra}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1] if style == "llama3" else [2, 0]}))
    return d, tok.get_vocab_size(), ids


@pytest.fixture(scope="module", params=["llama3", "qwen"])
def bpe(request, tmp_path_factory):
    return request.param, *bpe_folder(tmp_path_factory.mktemp(request.param), request.param)


def test_bpe_tokenizer_encodes_as_transformers_with_the_family_bos(bpe, tmp_path):
    from transformers import AutoTokenizer
    style, d, vocab, ids = bpe
    (d / "config.json").write_text(family_config("llama3" if style == "llama3" else "qwen2", vocab, **ids).to_json_string())
    tok = hf.load_tokenizer(str(d), hf.config_from_hf(str(d / "config.json")))
    theirs = AutoTokenizer.from_pretrained(str(d))
    assert tok.add_bos == (style == "llama3") and tok.bos_id == 0
    assert tok.stop_ids == ([1, 2] if style == "llama3" else [2, 0]) and tok.pad_id == (1 if style == "llama3" else 0)
    for text in ["### Instruction:\nSay it\nwith  spaces.\n\n### Response:\n", "ünïcode ☕ café", " lead"]:
        assert theirs(text)["input_ids"] == [tok.bos_id] * tok.add_bos + tok.encode(text)
        assert tok.decode(tok.encode(text)) == text


def test_bpe_labels_are_the_joint_encoding_with_the_family_bos(bpe):
    """The paper's prompt and label boundary on byte-level BPE: the joint encoding of prompt + response,
    labels masked over the prompt's own encoding (with BOS where the family has one), then EOS."""
    style, d, vocab, ids = bpe
    (d / "config.json").write_text(family_config("llama3" if style == "llama3" else "qwen2", vocab, **ids).to_json_string())
    tok = hf.load_tokenizer(str(d), hf.config_from_hf(str(d / "config.json")))
    world = builtin.benchmark(seed=0, n_train=20, n_test=5)
    for rec in [c[0] for c in world.clients]:
        bos = [0] if style == "llama3" else []
        prompt = bos + tok.tok.encode(data.format_prompt(rec), add_special_tokens=False).ids
        full = bos + tok.tok.encode(data.format_prompt(rec) + rec["output"], add_special_tokens=False).ids + [tok.eos_id]
        assert full[:len(prompt)] == prompt  # the boundary falls between tokens for this prompt
        assert data.encode_example(tok, rec, cutoff=4096) == {"input_ids": full, "labels": [-100] * len(prompt) + full[len(prompt):]}
        assert tok.decode(full[len(prompt):-1]) == rec["output"]


def test_the_end_of_turn_token_ends_generation_as_in_transformers(bpe, tmp_path):
    """A chat model stops at its end-of-turn token, which is not config.json's (first) EOS: generate
    with the tokenizer's stop_ids equals transformers' generate with the folder's generation_config."""
    from transformers import AutoModelForCausalLM
    style, d, vocab, ids = bpe
    theirs = hf_family(tmp_path, "llama3" if style == "llama3" else "qwen2", vocab=vocab, **ids)
    with torch.no_grad():
        theirs.lm_head.weight[2] *= 2.0  # the end of turn (eot_id, im_end), likely
    theirs.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (tmp_path / name).write_bytes((d / name).read_bytes())
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ours = hf.from_pretrained(str(tmp_path)).eval()
    tok = hf.load_tokenizer(str(tmp_path), ours.config)
    assert 2 in tok.stop_ids and (tok.eos_id != 2) == (style == "llama3")
    x, mask = data.pad_left([[tok.bos_id] * tok.add_bos + tok.encode(p) for p in ("Hello there", "Say hi!!")], tok.pad_id)
    want = theirs.generate(x, attention_mask=mask, max_new_tokens=30, do_sample=False,
                           pad_token_id=tok.pad_id)[:, x.shape[1]:]
    got = generate(ours, x, mask, 30, tok.stop_ids, tok.pad_id)
    assert torch.equal(got, want) and 2 in got.tolist()[0] + got.tolist()[1]


def test_without_tokenizers_package_tokenizer_json_is_one_line(bpe, monkeypatch):
    style, d, vocab, ids = bpe
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(SystemExit, match=r"tokenizer.json needs the 'tokenizers' package: pip install tokenizers$"):
        hf.load_tokenizer(str(d), hf.ModelConfig())


# ----------------------------------------------------------------------------------------------
# Loading big checkpoints: no second copy

def test_a_bfloat16_checkpoint_loads_with_memory_growing_as_its_weights():
    """Peak memory of loading grows with the checkpoint as its weights do, not twice as fast (a whole-file
    buffer copied out, or a float32 copy): two sizes of one-shard bfloat16 checkpoint, a fixed process
    overhead cancelled by the difference. tools/measure_loading.py measures the bigger sizes of docs/models.md."""
    from tools.measure_loading import measure
    small, big = measure(16, 1), measure(96, 1)
    assert small["dtype"] == big["dtype"] == "torch.bfloat16"
    slope = (big["growth"] - small["growth"]) / (big["weights"] - small["weights"])
    assert 0.8 < slope < 1.15, slope


def test_dtype_bfloat16_keeps_the_frozen_base_in_bfloat16(tmp_path):
    """train.py --dtype bfloat16: the base as stored, bfloat16 (no float32 copy); the adapters float32."""
    hf_family(tmp_path, "qwen2")
    model = train.load_model(train.Config(model=str(tmp_path), dtype="bfloat16"), str(tmp_path), torch.device("cpu"))
    base = {k: p.dtype for k, p in model.named_parameters() if "lora_" not in k}
    adapters = {p.dtype for k, p in model.named_parameters() if "lora_" in k}
    assert set(base.values()) == {torch.bfloat16} and adapters == {torch.float32}
    assert any(k.endswith("q_proj.base_layer.bias") for k in base)


# ----------------------------------------------------------------------------------------------
# train.py --model DIR, end to end

@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3", "mistral"])
def test_train_runs_end_to_end(tmp_path, tiny_run, family, capsys):
    """A short federated run of FedIT and FedDPA-T on the family, with its byte-level BPE tokenizer."""
    style = "llama3" if family == "llama3" else "qwen"
    d, vocab, ids = bpe_folder(tmp_path / "model", style)
    # Mistral: a window longer than the run's cutoff (128) and answers, so nothing is refused
    hf_family(d, family, vocab=vocab, **ids, **({"max_position_embeddings": 512, "sliding_window": 256} if family == "mistral" else {}))
    _, data_dir, args = tiny_run
    args = [a if a != str(tiny_run[0]) else str(d) for a in args]
    train.main([*args, "--out", str(tmp_path / "run"), "-q"])
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(res["methods"]) == {"fedit", "feddpa-t"}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"] == str(d)


def test_train_refuses_a_mistral_window_shorter_than_the_run_in_one_line(tmp_path, tiny_run, capsys):
    d, vocab, ids = bpe_folder(tmp_path / "model", "qwen")
    hf_family(d, "mistral", vocab=vocab, **ids)  # window 32 < the run's prompts
    _, data_dir, args = tiny_run
    args = [a if a != str(tiny_run[0]) else str(d) for a in args]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main([*args, "--out", str(tmp_path / "run"), "-q"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and f"reads at most {WINDOW} tokens" in err
    assert not (tmp_path / "run").exists()
