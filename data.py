"""Data for FedDPA: prompts and masked labels, tokenizer training, the paper's federated files,
and Dirichlet partitions.

Top to bottom:
1. the paper's prompt ("alpaca_short") and how a record becomes token ids with the prompt
   masked out of the loss, and batches of them;
2. a deterministic SentencePiece tokenizer (trained here; loading one is hf.py's);
3. the federated layout the paper released (`<dir>/<n>/local_training_<i>.json` + one test
   `.jsonl`), loaded with validation and written back;
4. non-IID re-partitioning with a Dirichlet prior over tasks.

Not here: the built-in benchmark world and its corpus (builtin.py), models of any kind.
"""
import io
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece as spm
import torch

from hf import atomic_write
from model import IGNORE_INDEX

# ----------------------------------------------------------------------------- prompts

PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def format_prompt(rec: dict) -> str:
    if rec.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=rec["instruction"], input=rec["input"])
    return PROMPT_NO_INPUT.format(instruction=rec["instruction"])


def encode_example(tok, rec: dict, cutoff: int = 512) -> dict | None:
    """[BOS] prompt response [EOS] as ids, with labels IGNORE_INDEX on BOS and the prompt.

    As the official code does: the ids are the joint encoding of prompt + response (so the response is
    tokenized in context: after "### Response:\n" a SentencePiece Llama tokenizer writes "yes", not the
    "▁yes" of the response alone), and the label boundary is the length of the prompt's own encoding,
    which is what generation continues from. Where the joint encoding merges a piece across that
    boundary, the prompt's own encoding is kept and the response is encoded alone, so that the
    response is still what is learned. A long example loses the end of its response, EOS included.
    If the prompt alone fills `cutoff` the response would be lost whole, so this returns None and the
    caller counts the record as dropped.
    """
    bos = [tok.bos_id] * tok.add_bos
    prompt = bos + tok.encode(format_prompt(rec))
    if len(prompt) >= cutoff:
        return None
    ids = bos + tok.encode(format_prompt(rec) + rec["output"])
    if ids[:len(prompt)] != prompt:
        ids = prompt + tok.encode(rec["output"])
    ids = ids + [tok.eos_id]
    return {"input_ids": ids[:cutoff], "labels": ([IGNORE_INDEX] * len(prompt) + ids[len(prompt):])[:cutoff]}


def encode_clients(clients: list, tok, cutoff: int, max_dropped: float = 0.2) -> list:
    """Each client's records encoded (encode_example). A record whose prompt alone fills --cutoff is
    dropped, and said so per client; ValueError if a client loses more than max_dropped of its records
    (or --cutoff leaves no room for any), naming the client and the settings that change it."""
    template = len(encode_prompt(tok, {"instruction": ""}, 1 << 30))  # BOS and the prompt's fixed text
    if cutoff <= template + 1:  # room for at least one token of instruction and one of response
        raise ValueError(f"--cutoff {cutoff} is too short: the prompt template alone takes {template} tokens")
    encoded = []
    for i, recs in enumerate(clients):
        ex = [e for e in (encode_example(tok, r, cutoff) for r in recs) if e is not None]
        lost = len(recs) - len(ex)
        if lost > max_dropped * len(recs):
            raise ValueError(f"client {i} would lose {lost} of its {len(recs)} records ({lost / len(recs):.0%}), "
                             f"whose prompts fill --cutoff {cutoff}: raise --cutoff, or allow it with "
                             f"--max-dropped {lost / len(recs):.2f}")
        if lost:
            print(f"client {i}: {lost} of {len(recs)} records dropped (prompt longer than --cutoff {cutoff})")
        encoded.append(ex)
    return encoded


def check_lengths(model_name: str, tok, max_seq_len: int, tests: dict, encoded: list, cutoff: int, max_new_tokens: int):
    """Up front, not hours later: every training sequence and every test prompt plus its answer fits the
    model's context; if not, one error naming the --cutoff that fits."""
    prompt = max(len(encode_prompt(tok, r, cutoff)) for recs in tests.values() for r in recs)
    longest = max([len(e["input_ids"]) for ex in encoded for e in ex] + [prompt + max_new_tokens])
    if longest > max_seq_len:
        name = "the built-in base" if model_name == "builtin" else model_name
        fits = (f"use --cutoff {max_seq_len - max_new_tokens} or less" if max_seq_len - max_new_tokens > 16
                else "lower --max-new-tokens")
        raise ValueError(f"{name}: the model reads at most {max_seq_len} tokens; with --max-new-tokens {max_new_tokens} "
                        f"(answers share them with the prompt, which --cutoff {cutoff} bounds), {fits}")


def encode_prompt(tok, rec: dict, cutoff: int = 512) -> list[int]:
    """[BOS] prompt, for generation. An over-long prompt keeps BOS and loses its beginning:
    its end holds the question and the "### Response:" cue the model answers after."""
    ids = tok.encode(format_prompt(rec))
    bos = [tok.bos_id] * tok.add_bos  # Llama's tokenizers start with BOS; some (SmolLM2's) do not
    return bos + ids[max(0, len(ids) - (cutoff - len(bos))):]


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, padded on the left so that every row's last position
    is its last real token: generation then appends to all rows at the same column. The
    model must count positions from each row's first real token (mask.cumsum(-1) - 1)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


def collate(examples: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch of encode_example outputs -> (input_ids, attention_mask, labels), each (B, T)."""
    ids, mask = pad_left([e["input_ids"] for e in examples], pad_id)
    labels, _ = pad_left([e["labels"] for e in examples], IGNORE_INDEX)
    return ids, mask, labels


# --------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: Iterable[str], model_path: str, vocab_size: int = 1024) -> None:
    """Train a byte-fallback BPE SentencePiece model; the same texts give the same bytes.

    BPE learns the toy language's few hundred words as whole pieces, in well under a second
    on the default corpus. Identity normalisation with whitespace kept makes decode(encode(s)) == s for the
    newlines of the prompt; byte fallback covers any character the texts lack. Every text is
    used in order on one thread (no sampling, no shuffling), so the model is reproducible.
    """
    # sentencepiece 0.2 has no `random_seed` trainer field; its seed is this global setter.
    spm.set_random_generator_seed(0)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1,
        max_sentence_length=1 << 16,  # the default (4192 bytes) silently skips longer texts
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    atomic_write(str(model_path), [buf.getvalue()])


# ---------------------------------------------------------------- federated file layout

class DataError(Exception):
    """A malformed dataset. The message is one line: the file, the record or line, the problem."""


@dataclass
class FedData:
    clients: list[list[dict]]      # each client's training records
    tests: dict[str, list[dict]]   # category -> test records, categories in sorted order
    client_tasks: list[str]        # each client's own task: the commonest category it trains on
    name: str
    notes: list[str] = field(default_factory=list)  # warnings worth showing the user
    client_ids: list[int] = field(default_factory=list)  # each client's id (its seeds' name): its place in the full set

    def __post_init__(self):
        self.client_ids = self.client_ids or list(range(len(self.clients)))


def federated_data(name: str, clients: list[list[dict]], test_records: list[dict]) -> FedData:
    """Group the test records by category and work out each client's task and the notes."""
    if not all(clients):
        raise ValueError(f"client {[len(recs) for recs in clients].index(0)} has no training records")
    tests = defaultdict(list)
    for rec in test_records:
        tests[rec["category"]].append(rec)
    tests = {category: tests[category] for category in sorted(tests)}
    client_tasks = [Counter(r["category"] for r in recs).most_common(1)[0][0] for recs in clients]
    trained = {r["category"] for recs in clients for r in recs}
    notes = [f"test category '{c}' is not trained on by any client" for c in tests if c not in trained]
    notes += [f"client {i}'s task '{t}' has no test records" for i, t in enumerate(client_tasks)
              if t not in tests]
    return FedData(clients, tests, client_tasks, name, notes)


_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "a number",
               float: "a number", bool: "a boolean", type(None): "null"}


def _check_record(rec, where: str) -> None:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a record must be a JSON object, not {_JSON_TYPES[type(rec)]}")
    for key in ("instruction", "output", "category"):
        if key not in rec:
            raise DataError(f"{where}: missing '{key}'")
        if not isinstance(rec[key], str):
            raise DataError(f"{where}: '{key}' must be a string, not {_JSON_TYPES[type(rec[key])]}")
        if not rec[key].strip():
            raise DataError(f"{where}: '{key}' is empty")
    for key in ("input", "task"):
        if key in rec and not isinstance(rec[key], str):
            raise DataError(f"{where}: '{key}' must be a string, not {_JSON_TYPES[type(rec[key])]}")
    for key in ("instruction", "output", "category", "input", "task"):
        try:  # JSON's \ud800 escapes can spell a lone surrogate, which no tokenizer accepts
            rec.get(key, "").encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"{where}: '{key}' holds a lone surrogate (\\u{ord(rec[key][e.start]):04x}), not text") from None


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:  # e.g. a folder named like a client file
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: line {line}: byte 0x{data[e.start]:02x} is not UTF-8") from None


def _load_client_file(path: Path) -> list[dict]:
    try:
        records = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno} column {e.colno}: invalid JSON: {e.msg}") from None
    except (ValueError, RecursionError) as e:  # a number of over 4300 digits; nesting too deep
        raise DataError(f"{path}: invalid JSON: {str(e).split(';')[0]}") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: the top level must be a list of records, not {_JSON_TYPES[type(records)]}")
    if not records:
        raise DataError(f"{path}: no records")
    for i, rec in enumerate(records):
        _check_record(rec, f"{path}: record {i}")
    return records


def _load_test_file(path: Path) -> list[dict]:
    records = []
    # split on "\n" only: str.splitlines would also break at U+2028, which JSON strings may hold
    for number, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {number} column {e.colno}: invalid JSON: {e.msg}") from None
        except (ValueError, RecursionError) as e:
            raise DataError(f"{path}: line {number}: invalid JSON: {str(e).split(';')[0]}") from None
        _check_record(rec, f"{path}: line {number}")
        records.append(rec)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def load_federated(path: str | Path) -> FedData:
    """Read and validate `<path>/<n>/local_training_<i>.json` (i = 0..n-1) and the single
    `<path>/*.jsonl` test file; anything malformed raises DataError. Reads only."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: no such dataset folder")
    count_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and re.fullmatch(r"[0-9]+", d.name)]
    if len(count_dirs) != 1:
        raise DataError(f"{root}: expected one <n_clients>/ folder of client files, found {len(count_dirs)}")
    client_dir = count_dirs[0]
    files = {}
    for f in sorted(client_dir.glob("local_training_*.json")):
        match = re.fullmatch(r"local_training_([0-9]+)\.json", f.name)
        if not match:
            raise DataError(f"{f}: a client file must be named local_training_<index>.json")
        index = int(match[1])
        if index in files:  # e.g. local_training_1.json and local_training_01.json
            raise DataError(f"{f}: client {index} was already read from {files[index].name}")
        files[index] = f
    if not files:
        raise DataError(f"{client_dir}: no local_training_<i>.json client files")
    missing = [i for i in range(len(files)) if i not in files]
    if missing:
        raise DataError(f"{client_dir}: client files must be numbered 0..{len(files) - 1}; "
                        f"local_training_{missing[0]}.json is missing")
    if int(client_dir.name) != len(files):
        raise DataError(f"{client_dir}: the folder name says {int(client_dir.name)} clients "
                        f"but it holds {len(files)} client files")
    test_files = sorted(root.glob("*.jsonl"))
    if len(test_files) != 1:
        raise DataError(f"{root}: expected one test .jsonl file, found {len(test_files)}")
    clients = [_load_client_file(files[i]) for i in range(len(files))]
    return federated_data(root.name, clients, _load_test_file(test_files[0]))


def write_federated(fed: FedData, path: str | Path) -> None:
    """Write `fed` in the layout load_federated reads, to a new or empty folder (an old
    layout with another client count would otherwise survive and confuse the loader)."""
    root = Path(path)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; write to a new folder")
    client_dir = root / str(len(fed.clients))
    client_dir.mkdir(parents=True, exist_ok=True)
    for i, records in enumerate(fed.clients):
        text = json.dumps(records, ensure_ascii=False) + "\n"
        atomic_write(str(client_dir / f"local_training_{i}.json"), [text.encode("utf-8")])
    lines = [json.dumps(rec, ensure_ascii=False) + "\n" for recs in fed.tests.values() for rec in recs]
    atomic_write(str(root / "test.jsonl"), ["".join(lines).encode("utf-8")])


# ---------------------------------------------------------------- non-IID partitions

def dirichlet_split(records: list[dict], n_clients: int, alpha: float = 0.5, min_size: int = 10,
                    seed: int = 0, max_tries: int = 1000) -> list[list[dict]]:
    """Split records over clients with label skew (Hsu et al. 2019): for each category,
    client shares are drawn from Dirichlet(alpha); small alpha concentrates a category on
    few clients. Redrawn until every client holds at least min_size records. Each record
    goes to exactly one client; a client's records keep their order in `records`."""
    if n_clients < 1 or alpha <= 0:
        raise ValueError(f"need n_clients >= 1 and alpha > 0, got {n_clients} and {alpha}")
    if n_clients * min_size > len(records):
        raise ValueError(f"cannot give {n_clients} clients {min_size} records each from {len(records)} records")
    by_category = defaultdict(list)
    for i, rec in enumerate(records):
        by_category[rec["category"]].append(i)
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        shares = [[] for _ in range(n_clients)]
        for category in sorted(by_category):
            indices = rng.permutation(by_category[category])
            proportions = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(indices)).astype(int)
            for share, part in zip(shares, np.split(indices, cuts)):
                share.extend(part.tolist())
        if min(len(share) for share in shares) >= min_size:
            return [[records[i] for i in sorted(share)] for share in shares]
    raise ValueError(f"no Dirichlet(alpha={alpha}) split of {len(records)} records gave all {n_clients} "
                     f"clients {min_size} records in {max_tries} draws; lower min_size or raise alpha")


def select_tasks(fed: FedData, tasks: list, *, records: bool = False) -> FedData:
    """Only tasks' test sets, and only the clients whose own task is one of them, each keeping its id (so
    its seeds, and its data order, are those it has in the full set). records: keep instead every training
    record of those tasks, on whichever client, for a re-split (partition); ValueError for a task the
    data has not."""
    known = list(dict.fromkeys([*fed.tests, *fed.client_tasks]))
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; the tasks are {', '.join(known)}")
    tests = {t: recs for t, recs in fed.tests.items() if t in tasks}
    if records:
        clients = [kept for recs in fed.clients if (kept := [r for r in recs if r["category"] in tasks])]
        return federated_data(f"{fed.name}, tasks {','.join(tasks)}", clients, [r for rs in tests.values() for r in rs])
    keep = [k for k, t in enumerate(fed.client_tasks) if t in tasks]
    return FedData([fed.clients[k] for k in keep], tests, [fed.client_tasks[k] for k in keep],
                   f"{fed.name}, tasks {','.join(tasks)}", fed.notes, [fed.client_ids[k] for k in keep])


def partition(fed: FedData, n_clients: int, alpha: float = 0.5, min_size: int = 10,
              seed: int = 0) -> FedData:
    """Pool all clients' training records and re-split them with dirichlet_split; the
    test sets stay per task."""
    pooled = [rec for records in fed.clients for rec in records]
    clients = dirichlet_split(pooled, n_clients, alpha, min_size, seed)
    test_records = [rec for records in fed.tests.values() for rec in records]
    return federated_data(f"{fed.name}-dirichlet{alpha}-{n_clients}clients", clients, test_records)
