"""Files: safetensors by hand, atomic writes, and Hugging Face Llama directories (config, weights,
tokenizer), read and written so that transformers reads what we write and we read what it writes.

A porter can skip this file: it holds no part of the method. Everything that cannot be used raises
CheckpointError with one line naming the file and the problem; nothing is unpickled but through
torch.load(..., weights_only=True).

Top to bottom: safetensors (read, write); atomic_write; HF directories (config.json, the standard
weight layouts, from_pretrained / save_pretrained); tokenizers behind one interface.
"""
import json
import math
import os
import struct

import torch

from model import Llama, ModelConfig, state_mismatch


def first_line(e: Exception) -> str:
    """An exception as one line, for error messages."""
    return f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e).strip() else type(e).__name__


# ----------------------------------------------------------------------------------------------
# safetensors, by hand: 8-byte little-endian header length, a JSON header naming each tensor's
# dtype, shape and [begin, end) byte offsets into the raw buffer that follows.

class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line naming the file."""


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def read_safetensors(path: str, dtype=None) -> dict:
    """{name: tensor}; with dtype, each tensor converted as it is read. Each tensor is read from the file
    straight into its own memory: no buffer of the whole file and no copy out of it, so a checkpoint's
    peak memory is about its weights (in the target dtype), one tensor more at most."""
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
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: header is not a JSON object")
        buffer = size - 8 - n  # bytes of tensor data after the header
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                kind, shape, (begin, end) = SAFETENSORS_DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
                ok = type(shape) is list and all(type(d) is int and 0 <= d < 1 << 63 for d in [*shape, begin, end])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry") from None
            if not ok:
                raise CheckpointError(f"{path}: tensor {name!r} has a malformed shape or offsets")
            if kind is None:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']!r}")
            nbytes = math.prod(shape) * kind.itemsize
            if not begin <= end <= buffer or end - begin != nbytes:
                raise CheckpointError(f"{path}: tensor {name!r} offsets [{begin}, {end}) do not fit its "
                                      f"shape {shape} or the {buffer}-byte buffer")
            t = torch.empty(shape, dtype=kind)
            f.seek(8 + n + begin)
            if nbytes and f.readinto(t.view(-1).view(torch.uint8).numpy()) != nbytes:
                raise CheckpointError(f"{path}: tensor {name!r} ends early (the file is shorter than its header says)")
            out[name] = t if dtype is None else t.to(dtype)
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


# The Llama families: model_type -> what the family fixes that its config.json does not say, and its class
FAMILIES = {"llama": ({}, "LlamaForCausalLM"), "mistral": ({}, "MistralForCausalLM"),
            "qwen2": ({"qkv_bias": True}, "Qwen2ForCausalLM"), "qwen3": ({"qk_norm": True}, "Qwen3ForCausalLM")}
ROPE_SCALING = {"linear": ("factor",),  # rope_type -> the parameters it needs (model.scale_rope)
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def config_from_hf(path: str) -> ModelConfig:
    try:
        with open(path) as f:
            hf = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read config ({e})") from None
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise CheckpointError(f"{path}: model_type {family!r} is not supported (supported: {', '.join(FAMILIES)})")
    problem = unsupported(hf)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    kw = {ours: hf[theirs] for ours, theirs in HF_KEYS.items() if hf.get(theirs) is not None}
    kw.setdefault("n_kv_heads", kw.get("n_heads"))
    kw.setdefault("tie_embeddings", False)  # the default of HF's config classes for these families
    for key in ("bos_id", "eos_id"):  # some checkpoints list several EOS ids; the first is the main one
        if isinstance(kw.get(key), list):
            kw[key] = kw[key][0]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    kw["rope_theta"] = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if kind != "default":
        kw["rope_scaling"] = {"rope_type": kind, **{k: rope[k] for k in ROPE_SCALING[kind]}}
    kw.update(FAMILIES[family][0], family=family, head_dim=hf.get("head_dim") or 0,
              sliding_window=hf.get("sliding_window") if family == "mistral" else None)
    try:
        return ModelConfig(**kw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def unsupported(hf: dict) -> str | None:
    """What of an HF config (a supported model_type) this model cannot do, as a phrase; None if nothing."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default" and kind not in ROPE_SCALING:
        return f"rope scaling {kind!r} is not supported (supported: default, {', '.join(ROPE_SCALING)})"
    missing = [k for k in ROPE_SCALING.get(kind, ()) if k not in rope]
    if missing:
        return f"rope scaling {kind!r} lacks {missing[0]!r}"
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        return "partial rotary embeddings (partial_rotary_factor) are not supported"
    if hf.get("attention_bias") or hf.get("mlp_bias"):  # Qwen2's q/k/v biases are its own, not this flag
        return "attention or MLP biases are not supported"
    if hf.get("hidden_act", "silu") != "silu":
        return f"hidden_act {hf['hidden_act']!r} is not supported (only silu)"
    if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []):
        return "sliding-window attention layers (use_sliding_window) are not supported"
    return None


def read_weights(d: str, dtype=None) -> dict:
    """All tensors of an HF directory, whichever of the standard weight layouts it uses; with dtype, each
    converted as it is read (never a whole second copy of the checkpoint)."""
    def path(name):
        return os.path.join(d, name)
    if os.path.isfile(path("model.safetensors")):
        return read_safetensors(path("model.safetensors"), dtype)
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
                out.update(reader(path(shard), dtype))
            return out
    if os.path.isfile(path("pytorch_model.bin")):
        return read_bin(path("pytorch_model.bin"), dtype)
    raise CheckpointError(f"{d}: no model.safetensors, sharded safetensors index or pytorch_model.bin")


def read_bin(path: str, dtype=None) -> dict:
    try:  # weights_only: a checkpoint is data, never code to unpickle
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load ({first_line(e)})") from None
    return sd if dtype is None else {k: v.to(dtype) for k, v in sd.items()}


PEFT_PREFIX = "base_model.model."  # where peft puts the wrapped model's parameter names


def read_peft(d: str, expected: dict | None = None) -> dict:
    """A PEFT adapter folder's tensors (float32), keyed as lora.get_adapter ('<layer path>.lora_A.weight');
    with expected ({key: tensor}, e.g. lora.adapter_tensors(model, "global")), every tensor checked by
    name and shape (CheckpointError naming the first mismatch). Its adapter_config.json is
    check_peft_config's."""
    path = os.path.join(d, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise CheckpointError(f"{d}: no adapter_model.safetensors (not a PEFT adapter folder)")
    state = {}
    for key, t in read_safetensors(path).items():
        key = key.removeprefix(PEFT_PREFIX)
        for name in (".default", ".global", ".local"):  # peft names the adapter inside keys it keeps in memory
            key = key.replace(f".lora_A{name}.", ".lora_A.").replace(f".lora_B{name}.", ".lora_B.")
        state[key] = t.float()
    problem = expected is not None and state_mismatch(expected, state, "adapter tensor")
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    return state


def check_peft_config(d: str, r: int, lora_alpha: float, targets: list):
    """Refuse (CheckpointError, one line naming the file and both values) a PEFT adapter folder whose
    adapter_config.json says its tensors mean something else than this run's adapters would: another
    r, lora_alpha or target modules, rsLoRA (scaling lora_alpha / sqrt(r)), DoRA (a magnitude vector),
    or per-layer ranks or alphas. read_peft checks the tensors' names and shapes, but lora_alpha and
    these options leave them as they are: without this the adapter would load silently at this run's
    scaling. A folder without adapter_config.json is refused too: its scaling cannot be known."""
    path = os.path.join(d, "adapter_config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file; without it the adapter's r, lora_alpha and target modules "
                              "are unknown (not a PEFT adapter folder)")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({first_line(e)})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object")

    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)
    for key, flag, want in (("r", "--lora-r", r), ("lora_alpha", "--lora-alpha", lora_alpha)):
        got = config.get(key, "missing")
        if not (number(got) and got == want):
            raise CheckpointError(f"{path}: {key} is {got}, this run's {flag} is {want}")
    for key, what in (("use_rslora", "rsLoRA"), ("use_dora", "DoRA")):
        if config.get(key, False) is not False:  # absent in configs written before peft had it
            raise CheckpointError(f"{path}: {key} is {json.dumps(config[key])}; this program's LoRA has no "
                                  f"{what} ({key} false, scaling lora_alpha / r)")
    for key, flag, want in (("rank_pattern", "--lora-r", r), ("alpha_pattern", "--lora-alpha", lora_alpha)):
        if config.get(key):
            raise CheckpointError(f"{path}: {key} is {json.dumps(config[key])}; this run's {flag} is {want} in every layer")
    got = config.get("target_modules", "missing")
    got = sorted(got) if isinstance(got, list) and all(isinstance(t, str) for t in got) else got  # peft writes a set
    if got != sorted(targets):  # a string is a regular expression of module names: refused, not matched
        raise CheckpointError(f"{path}: target_modules is {json.dumps(got)}, this run's --targets is {','.join(targets)}")


def resolve(name: str) -> str:
    """A model folder: name itself if it is one, else a Hugging Face hub id fetched into the hub's usual
    cache with the optional huggingface_hub package (config, safetensors weights, tokenizer files)."""
    if os.path.isdir(name):
        return name
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{name}: not a folder; to fetch it from the Hugging Face hub: pip install huggingface_hub") from None
    try:
        return snapshot_download(repo_id=name, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"])
    except Exception as e:  # offline, no such repository, a gated one: what the hub says, in one line
        raise CheckpointError(f"{name}: not a folder, and the hub could not provide it ({first_line(e)[:300]}); "
                              "download it and pass its folder") from None


def from_pretrained(d: str, dtype=torch.float32, device="cpu") -> Llama:
    config = config_from_hf(os.path.join(d, "config.json"))
    sd = {k: v for k, v in read_weights(d, dtype).items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    with torch.device("meta"):  # no memory for weights that are about to be replaced
        model = Llama(config)
    expected = {k: v for k, v in model.state_dict().items() if not (config.tie_embeddings and k == "lm_head.weight")}
    problem = state_mismatch(expected, sd, "tensor", "the config implies")
    if problem:
        raise CheckpointError(f"{d}: {problem}")
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_rope()
    return model.to(device)


def save_pretrained(model: Llama, d: str):
    """Write config.json and model.safetensors as HF's <family>ForCausalLM would."""
    config = model.config
    os.makedirs(d, exist_ok=True)
    hf = {theirs: getattr(config, ours) for ours, theirs in HF_KEYS.items()}
    hf.update(architectures=[FAMILIES[config.family][1]], model_type=config.family, hidden_act="silu",
              rope_theta=config.rope_theta, head_dim=config.head_dim, attention_bias=False, mlp_bias=False,
              torch_dtype=str(model.lm_head.weight.dtype).removeprefix("torch."))
    if config.rope_scaling:  # the legacy key, which transformers 4 and 5 both read
        hf["rope_scaling"] = config.rope_scaling
    if config.family == "mistral":
        hf["sliding_window"] = config.sliding_window
    sd = {k: v for k, v in model.state_dict().items() if not (config.tie_embeddings and k == "lm_head.weight")}
    write_safetensors(sd, os.path.join(d, "model.safetensors"))
    atomic_write(os.path.join(d, "config.json"), [json.dumps(hf, indent=2).encode()])


# ----------------------------------------------------------------------------------------------
# Tokenizers behind one interface: encode(text) -> ids (no special tokens), decode(ids) -> text,
# bos_id, eos_id (what a training example ends with), stop_ids (every id that ends generation, eos_id
# first), pad_id, add_bos (whether a sequence starts with BOS, as the model was trained).

class SentencePieceTokenizer:
    def __init__(self, path: str):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.stop_ids = [self.eos_id]
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.add_bos = True
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list:
        return self.sp.encode(text, out_type=int)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


class HFTokenizer:
    """tokenizer.json (byte-level BPE: Llama 3, Qwen, SmolLM2) through the optional `tokenizers` package."""

    def __init__(self, d: str, config: ModelConfig):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise SystemExit(f"{d}/tokenizer.json needs the 'tokenizers' package: pip install tokenizers") from None
        self.tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
        extra = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            extra = {**read_json(d, name), **extra}
        pad = self.token_id(extra.get("pad_token"))
        self.bos_id, self.eos_id = config.bos_id, config.eos_id
        self.pad_id = self.eos_id if pad is None else pad
        # BOS as the model was trained: the flag where the folder has one, else what the tokenizer's own
        # post-processor adds (Llama 3's prepends <|begin_of_text|>; Qwen's and SmolLM2's add nothing)
        flag = extra.get("add_bos_token")
        self.add_bos = bool(flag) if flag is not None else self.tok.encode("a").ids[:1] == [self.bos_id]
        # what ends generation, as transformers' generate: config's and generation_config's EOS ids
        # (Llama 3 lists several), and the tokenizer's EOS token (a chat model's end of turn)
        ids = [self.eos_id, *as_list(read_json(d, "config.json").get("eos_token_id")),
               *as_list(read_json(d, "generation_config.json").get("eos_token_id")), self.token_id(extra.get("eos_token"))]
        self.stop_ids = list(dict.fromkeys(i for i in ids if i is not None))
        self.vocab_size = self.tok.get_vocab_size()

    def token_id(self, token) -> int | None:
        """A special token of tokenizer_config.json (a string, or {"content": ...}) as its id; None if absent."""
        token = token.get("content") if isinstance(token, dict) else token
        return self.tok.token_to_id(token) if isinstance(token, str) else None

    def encode(self, text: str) -> list:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def read_json(d: str, name: str) -> dict:
    """d/name as a dict, {} if there is no such file."""
    path = os.path.join(d, name)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def as_list(x) -> list:
    return x if isinstance(x, list) else [] if x is None else [x]


def load_tokenizer(d: str, config: ModelConfig):
    """The tokenizer of HF directory d: tokenizer.model (SentencePiece) or tokenizer.json."""
    try:
        if os.path.isfile(os.path.join(d, "tokenizer.model")):
            return SentencePieceTokenizer(os.path.join(d, "tokenizer.model"))
        if os.path.isfile(os.path.join(d, "tokenizer.json")):
            return HFTokenizer(d, config)
    except Exception as e:  # what sentencepiece or tokenizers raise for a damaged file
        raise CheckpointError(f"{d}: cannot load the tokenizer ({first_line(e)})") from None
    raise CheckpointError(f"{d}: no tokenizer.model or tokenizer.json")
