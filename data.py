"""Data for FedDPA: prompts and masked labels, the tokenizer, the paper's federated files,
a built-in synthetic benchmark, and Dirichlet partitions.

Top to bottom:
1. the paper's prompt ("alpaca_short") and how a record becomes token ids with the prompt
   masked out of the loss;
2. a deterministic SentencePiece tokenizer;
3. the federated layout the paper released (`<dir>/<n>/local_training_<i>.json` + one test
   `.jsonl`), loaded with validation and written back;
4. the built-in benchmark: eight tiny instruction tasks named and shaped after the paper's
   FLAN mix (one per client), plus a plain-text corpus in the same toy English for
   pretraining the foundation model;
5. non-IID re-partitioning with a Dirichlet prior over tasks;
6. `python data.py --write DIR`: write the built-in benchmark to disk for inspection.
"""
import argparse
import io
import json
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece as spm
import torch

from model import atomic_write

# ----------------------------------------------------------------------------- prompts

PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
IGNORE_INDEX = -100  # labels with this value are skipped by F.cross_entropy's default


def format_prompt(rec: dict) -> str:
    if rec.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=rec["instruction"], input=rec["input"])
    return PROMPT_NO_INPUT.format(instruction=rec["instruction"])


def encode_example(tok, rec: dict, cutoff: int = 512) -> dict | None:
    """[BOS] prompt response [EOS] as ids, with labels -100 on BOS and the prompt.

    Prompt and response are encoded separately so the label boundary is exact (one joint
    encoding could merge a piece across it); generation sees the same split, since the
    model continues from the encoded prompt. A long example loses the end of its response,
    EOS included. If the prompt alone fills `cutoff` the response would be lost whole, so
    this returns None and the caller counts the record as dropped.
    """
    prompt = [tok.bos_id] * tok.add_bos + tok.encode(format_prompt(rec))
    if len(prompt) >= cutoff:
        return None
    response = tok.encode(rec["output"]) + [tok.eos_id]
    return {"input_ids": (prompt + response)[:cutoff],
            "labels": ([IGNORE_INDEX] * len(prompt) + response)[:cutoff]}


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


# ------------------------------------------------------------------ built-in benchmark
# One small toy English shared by the pretraining corpus and all eight tasks.

MALE = ("Tom", "John", "Sam", "Ben", "Jack", "Max", "Leo", "Paul", "Mark", "Luke", "Adam", "Dan")
FEMALE = ("Mary", "Anna", "Emma", "Lucy", "Kate", "Sara", "Jane", "Lily", "Rose", "Ella", "Amy", "Eve")
NAMES = MALE + FEMALE
NOUNS = {"cat": "cats", "dog": "dogs", "bird": "birds", "horse": "horses", "fox": "foxes",
         "wolf": "wolves", "mouse": "mice", "child": "children", "farmer": "farmers",
         "teacher": "teachers", "baker": "bakers", "king": "kings", "duck": "ducks",
         "goat": "goats", "frog": "frogs", "sailor": "sailors"}  # singular -> plural
VERBS = {"runs": "run", "sleeps": "sleep", "sings": "sing", "jumps": "jump", "walks": "walk",
         "eats": "eat", "swims": "swim", "waits": "wait", "plays": "play", "hides": "hide"}
ACTIONS = {"see": "saw", "help": "helped", "call": "called", "thank": "thanked", "meet": "met",
           "follow": "followed", "visit": "visited", "find": "found", "like": "liked",
           "greet": "greeted"}  # base -> past
ANTONYMS = (("big", "small"), ("hot", "cold"), ("happy", "sad"), ("old", "young"),
            ("fast", "slow"), ("tall", "short"), ("rich", "poor"), ("kind", "cruel"),
            ("clean", "dirty"), ("loud", "quiet"), ("wet", "dry"), ("strong", "weak"))
SYNONYMS = (("big", "large"), ("small", "little"), ("happy", "glad"), ("fast", "quick"),
            ("rich", "wealthy"), ("quiet", "silent"), ("kind", "gentle"), ("sad", "unhappy"),
            ("wet", "damp"), ("cold", "chilly"), ("tired", "sleepy"), ("scared", "afraid"))
OPPOSITE = {a: b for pair in ANTONYMS for a, b in (pair, pair[::-1])}
SYNONYM = {a: b for pair in SYNONYMS for a, b in (pair, pair[::-1])}
ADJECTIVES = tuple(sorted(set(OPPOSITE) | set(SYNONYM)))
PLACES = ("park", "market", "river", "farm", "school", "garden", "forest", "village", "beach",
          "castle", "station", "library")
FOODS = ("bread", "soup", "rice", "fish", "cheese", "apples", "cake", "eggs", "beans", "pie",
         "salad", "honey", "plums", "nuts")
AREAS = ("north", "south", "east", "west", "centre")
COLOURS = ("red", "blue", "green", "black", "white", "golden", "yellow", "grey")
# word -> (sentences using sense 0, sentences using sense 1); a context word names the sense
HOMONYMS = {
    "bank": (("{n} sat on the bank of the river.", "{n} fished from the muddy bank.",
              "{n} walked along the bank near the water."),
             ("{n} put money in the bank.", "{n} got a loan from the bank.",
              "{n} saved coins at the bank.")),
    "bat": (("{n} saw a bat fly at night.", "a bat slept in the cave near {n}.",
             "{n} heard a bat squeak in the dark."),
            ("{n} hit the ball with a bat.", "{n} bought a wooden bat for the game.",
             "{n} swung the bat hard.")),
    "bark": (("{n} heard the dog bark.", "the loud bark of the dog woke {n}.",
              "{n} taught the puppy to bark."),
             ("{n} touched the rough bark of the tree.", "{n} peeled the bark off a branch.",
              "the bark of the oak was brown, said {n}.")),
    "light": (("the box was light enough for {n} to carry.", "{n} packed a light bag.",
               "{n} lifted the light basket."),
              ("{n} turned on the light.", "the light in the room was bright, so {n} read.",
               "{n} saw a light in the window.")),
    "ring": (("{n} wore a gold ring.", "{n} lost the ring at the beach.",
              "{n} gave a silver ring to a friend."),
             ("{n} heard the bell ring.", "{n} waited for the phone to ring.",
              "the ring of the bell made {n} jump.")),
    "match": (("{n} lit a match.", "{n} struck a match in the dark.",
               "{n} used a match to start the fire."),
              ("{n} won the match.", "{n} watched the football match.",
               "the match ended late, so {n} went home.")),
    "seal": (("{n} saw a seal swim.", "a seal rested on the rocks near {n}.",
              "{n} fed fish to the seal."),
             ("{n} broke the seal on the letter.", "{n} put a wax seal on the box.",
              "the seal on the jar was tight, said {n}.")),
    "date": (("{n} ate a sweet date.", "{n} picked a date from the palm.",
              "{n} shared a dried date with a friend."),
             ("{n} forgot the date of the party.", "{n} wrote the date on the page.",
              "{n} asked about the date of the trip.")),
}


def _pronouns(name: str) -> tuple[str, str]:
    return ("he", "him") if name in MALE else ("she", "her")


def _options(*choices: str) -> str:
    return "OPTIONS:\n" + "\n".join(f"- {c}" for c in choices)


# Each task maps (rng, k) to (instruction, output); k cycles the label so test sets are balanced.

def coreference(rng: random.Random, k: int) -> tuple[str, str]:
    """Pronoun resolution (like definite_pronoun_resolution): a man, a woman and a pronoun.
    To solve it: know each name's gender (the pretraining corpus pairs names with he/she)
    and copy the option whose gender matches the pronoun."""
    people = [rng.choice(MALE), rng.choice(FEMALE)]
    rng.shuffle(people)
    target = people[k % 2]  # the answer is the first option half of the time
    sentence, case = rng.choice((
        ("{a} {past} {b} because {p} was {adj}.", 0),
        ("{a} met {b} at the {place}, and {p} smiled.", 0),
        ("{a} called {b} after {p} came home from the {place}.", 0),
        ("{a} {past} {b}, and the teacher praised {p}.", 1),
        ("{a} waited for {b} while the dog followed {p}.", 1)))
    pronoun = _pronouns(target)[case]
    sentence = sentence.format(a=people[0], b=people[1], p=pronoun, past=rng.choice(list(ACTIONS.values())),
                               adj=rng.choice(ADJECTIVES), place=rng.choice(PLACES))
    template = rng.choice(("{s}\nWho is \"{p}\" in this sentence?\n{o}",
                           "{s}\nIn the sentence above, who does \"{p}\" refer to?\n{o}",
                           "Read the sentence: {s}\nWho is \"{p}\"?\n{o}"))
    return template.format(s=sentence, p=pronoun, o=_options(*people)), target


def entailment(rng: random.Random, k: int) -> tuple[str, str]:
    """Premise and hypothesis about one subject's properties (like SNLI's three classes).
    To solve it: "yes" if the hypothesis repeats an adjective of the premise, "no" if it
    states that adjective's antonym, "maybe" if it names an unrelated property."""
    (a1, b1), (a2, b2), third = rng.sample(ANTONYMS, 3)
    said = [rng.choice((a1, b1)), rng.choice((a2, b2))]
    label = ("yes", "no", "maybe")[k % 3]
    stated = rng.choice(said)
    hypothesis_adj = {"yes": stated, "no": OPPOSITE[stated], "maybe": rng.choice(third)}[label]
    subject = rng.choice((rng.choice(NAMES), "the " + rng.choice(list(NOUNS))))
    premise = f"{subject} is {said[0]} and {said[1]}."
    hypothesis = f"{subject} is {hypothesis_adj}."
    template = rng.choice(("Premise: {p}\nHypothesis: {h}\nDoes the premise entail the hypothesis?\n{o}",
                           "{p}\nBased on that, is it true that \"{h}\"?\n{o}",
                           "If \"{p}\", can we conclude that \"{h}\"?\n{o}"))
    return template.format(p=premise, h=hypothesis, o=_options("yes", "no", "maybe")), label


def acceptability(rng: random.Random, k: int) -> tuple[str, str]:
    """Subject-verb agreement (like CoLA): "the cats run" is acceptable, "the cats runs" not.
    To solve it: see whether noun and verb agree in number (mostly a trailing -s on one of
    them; a few irregular plurals such as mice and children)."""
    singular = rng.choice(list(NOUNS))
    plural = rng.random() < 0.5
    acceptable = k % 2 == 0
    verb_3sg, verb_plural = rng.choice(list(VERBS.items()))
    verb = verb_plural if plural == acceptable else verb_3sg
    adjective = rng.choice(ADJECTIVES + ("",))
    noun = NOUNS[singular] if plural else singular
    sentence = (f"the {adjective + ' ' if adjective else ''}{noun} {verb} "
                f"{rng.choice(('in', 'near', 'at'))} the {rng.choice(PLACES)}.")
    template = rng.choice(("Is the following sentence grammatical?\n{s}\n{o}",
                           "Would a linguist rate this sentence as acceptable English?\n{s}\n{o}",
                           "{s}\nIs this sentence acceptable?\n{o}"))
    label = "acceptable" if acceptable else "unacceptable"
    return template.format(s=sentence, o=_options("acceptable", "unacceptable")), label


def paraphrase(rng: random.Random, k: int) -> tuple[str, str]:
    """Two sentences that differ in one word (like QQP). To solve it: find the word that
    changed; "yes" if an adjective became its synonym, "no" for any other change."""
    frame = rng.choice(("{n} saw the {adj} {noun} at the {place}.",
                        "at the {place}, {n} met the {adj} {noun}.",
                        "the {noun} that {n} found at the {place} was {adj}."))
    first = {"n": rng.choice(NAMES), "adj": rng.choice(list(SYNONYM)),
             "noun": rng.choice(list(NOUNS)), "place": rng.choice(PLACES)}
    second = dict(first)
    same = k % 2 == 0
    if same:
        second["adj"] = SYNONYM[first["adj"]]
    else:
        slot = rng.choice(("adj", "adj", "n", "noun", "place"))
        pool = {"adj": [a for a in ADJECTIVES if a != SYNONYM[first["adj"]]], "n": NAMES,
                "noun": list(NOUNS), "place": PLACES}[slot]
        second[slot] = rng.choice([v for v in pool if v != first[slot]])
    template = rng.choice(("Sentence 1: {a}\nSentence 2: {b}\nDo these sentences mean the same thing?\n{o}",
                           "{a}\n{b}\nAre these two sentences paraphrases of each other?\n{o}",
                           "Do \"{a}\" and \"{b}\" say the same thing?\n{o}"))
    instruction = template.format(a=frame.format(**first), b=frame.format(**second), o=_options("no", "yes"))
    return instruction, "yes" if same else "no"


QUESTION_TYPES = {
    "person": ("who {past} {n} at the {place}?", "who {past} the {noun}?"),
    "place": ("where did {n} {base} the {noun}?", "where is the {noun} that {n} {past}?"),
    "time": ("when did {n} {base} {m}?", "when will {n} visit the {place}?"),
    "number": ("how many {nouns} did {n} {base}?", "how many {nouns} are at the {place}?"),
    "food": ("what did {n} eat at the {place}?", "what food does the {noun} like?"),
    "reason": ("why did {n} {base} {m}?", "why is the {noun} so {adj}?"),
}


def question_classification(rng: random.Random, k: int) -> tuple[str, str]:
    """What kind of answer a question asks for (like TREC), six classes. To solve it: read
    the question word (who, where, when, how many, what ... eat/food, why)."""
    label = list(QUESTION_TYPES)[k % len(QUESTION_TYPES)]
    base, past = rng.choice(list(ACTIONS.items()))
    n, m = rng.sample(NAMES, 2)
    noun = rng.choice(list(NOUNS))
    question = rng.choice(QUESTION_TYPES[label]).format(
        n=n, m=m, base=base, past=past, noun=noun, nouns=NOUNS[noun],
        place=rng.choice(PLACES), adj=rng.choice(ADJECTIVES))
    template = rng.choice(("What is \"{q}\" asking about?\n{o}",
                           "What kind of answer does this question need?\n{q}\n{o}",
                           "Classify the question: {q}\n{o}"))
    return template.format(q=question, o=_options(*QUESTION_TYPES)), label


def structure_to_text(rng: random.Random, k: int) -> tuple[str, str]:
    """A restaurant record to one sentence (like WebNLG/E2E). Fields arrive in any order;
    the answer has one shape: "<name> serves [<price>] <food> in the <area> [near <near>]."
    To solve it: find each value by its key and fill the shape, skipping absent fields."""
    fields = {"name": f"the {rng.choice(COLOURS)} {rng.choice(list(NOUNS))}",
              "food": rng.choice(FOODS), "area": rng.choice(AREAS)}
    if rng.random() < 0.5:
        fields["price"] = rng.choice(("cheap", "expensive"))
    if rng.random() < 0.5:
        fields["near"] = "the " + rng.choice(PLACES)
    keys = list(fields)
    rng.shuffle(keys)
    record = " | ".join(f"{key}: {fields[key]}" for key in keys)
    price = fields["price"] + " " if "price" in fields else ""
    near = " near " + fields["near"] if "near" in fields else ""
    answer = f"{fields['name']} serves {price}{fields['food']} in the {fields['area']}{near}."
    template = rng.choice(("Write a sentence about this restaurant: {r}",
                           "Turn this data into a sentence.\n{r}",
                           "Describe the restaurant in one sentence: {r}"))
    return template.format(r=record), answer


def text_formatting(rng: random.Random, k: int) -> tuple[str, str]:
    """Restore the punctuation of a sentence with a list (like fix_punct): "a b c and d"
    becomes "a, b, c and d" and the sentence ends with a full stop. To solve it: copy the
    text, put a comma after each list item but the last two, and end with "."."""
    frame, pool = rng.choice((("{n} bought {items} at the {place}", FOODS),
                              ("{items} went to the {place}", NAMES),
                              ("{n} saw {items} near the {place}", tuple(NOUNS.values()))))
    items = rng.sample(pool, rng.randint(2, 4))
    n, place = rng.choice(NAMES), rng.choice(PLACES)
    plain = frame.format(n=n, place=place, items=" ".join(items[:-1]) + " and " + items[-1])
    fixed = frame.format(n=n, place=place, items=", ".join(items[:-1]) + " and " + items[-1])
    template = rng.choice(("Add punctuation: {t}",
                           "Add the missing commas and full stop to this text: {t}",
                           "Fix the punctuation of this sentence: {t}"))
    return template.format(t=plain), fixed + "."


def word_disambiguation(rng: random.Random, k: int) -> tuple[str, str]:
    """Does a word have the same sense in two sentences (like WiC)? Each sense of a homonym
    has its own context words (the bank of the river, money in the bank). To solve it:
    tell the sense of the word in each sentence from its context and compare."""
    word = rng.choice(list(HOMONYMS))
    senses = HOMONYMS[word]
    sense = rng.randrange(2)
    same = k % 2 == 0
    if same:
        first, second = rng.sample(senses[sense], 2)
    else:
        first, second = rng.choice(senses[sense]), rng.choice(senses[1 - sense])
    n, m = rng.sample(NAMES, 2)
    template = rng.choice((
        "Sentence 1: {a}\nSentence 2: {b}\nDoes \"{w}\" mean the same in both sentences?\n{o}",
        "{a}\n{b}\nIs \"{w}\" used in the same sense in both?\n{o}"))
    instruction = template.format(a=first.format(n=n), b=second.format(n=m), w=word,
                                  o=_options("same", "different"))
    return instruction, "same" if same else "different"


# (category, task, generator): the paper's eight FLAN categories, client i trains task i
TASKS = (("coreference", "pronoun_resolution", coreference),
         ("entailment", "property_entailment", entailment),
         ("linguistic_acceptability", "agreement", acceptability),
         ("paraphrase", "synonym_paraphrase", paraphrase),
         ("question_classification", "question_type", question_classification),
         ("structure_to_text", "restaurant_to_text", structure_to_text),
         ("text_formatting", "fix_commas", text_formatting),
         ("word_disambiguation", "word_sense", word_disambiguation))


def _distinct_examples(make, rng: random.Random, n: int, task: str) -> list[tuple[str, str]]:
    """n examples with distinct instructions, so no example is in both train and test."""
    seen, examples, repeats = set(), [], 0
    while len(examples) < n:
        instruction, output = make(rng, len(examples))
        if instruction in seen:
            repeats += 1
            if repeats > 10 * n:
                raise ValueError(f"task {task} cannot produce {n} distinct examples")
            continue
        seen.add(instruction)
        examples.append((instruction, output))
    return examples


def builtin_benchmark(seed: int = 0, n_train: int = 300, n_test: int = 200) -> FedData:
    """The default data: eight clients, client i trains TASKS[i]; all tasks are tested."""
    clients, test_records = [], []
    for category, task, make in TASKS:
        rng = random.Random(f"{seed}/{category}")  # str seeds are hashed stably (sha512)
        records = [{"instruction": instruction, "output": output, "task": task, "category": category}
                   for instruction, output in _distinct_examples(make, rng, n_test + n_train, task)]
        test, train = records[:n_test], records[n_test:]  # the first n_test have balanced labels
        rng.shuffle(test)
        rng.shuffle(train)
        test_records += test
        clients.append(train)
    return federated_data(f"builtin-seed{seed}", clients, test_records)


# Plain sentences that teach the words and facts the tasks rely on (genders, antonyms,
# synonyms, agreement, question words, word senses, lists with commas, restaurants) but
# never in a task's format: no "X bought a, b and c at the P." and no "X serves ...".
CORPUS_FRAMES = (
    "{n} went to the {place}. {he} {past} {m} there.",
    "{n} was {adj}, so {he} stayed at the {place}.",
    "{n} was {adj}, so {m} {past} {him}.",
    "{n} is {adj}. {he} is not {opp}.",
    "the {noun} is {adj}, not {opp}.",
    "the {nouns} were {adj} but now they are {opp}.",
    "{syn1} {nouns} are {syn2} {nouns}.",
    "{n} felt {syn1}, which means {he} felt {syn2}.",
    "the {noun} {v3} in the {place}.",
    "the {nouns} {vpl} near the {place}.",
    "every day the {adj} {noun} {v3} and the {nouns} {vpl}.",
    "{n} likes {food}, {food2} and {food3}.",
    "{n} and {m} are friends. they {vpl} together.",
    "who {past} {m}? {n} did.",
    "where did {n} go? {he} went to the {place}.",
    "when did {n} {base} {m}? in the morning.",
    "how many {nouns} did {n} {base}? {he} {past} three {nouns}.",
    "what did {n} eat? {he} ate {food}.",
    "why did {n} {base} {m}? because {he} was {adj}.",
    "the {colour} {noun} is a place to eat in the {area}. it is {price}.",
    "people eat {food} at the {colour} {noun}.",
    "{n} bought {food} at the {place}.",
    "{sense}",
)


def _corpus_sentence(rng: random.Random) -> str:
    n, m = rng.sample(NAMES, 2)
    adj, opp = rng.choice(ANTONYMS)[::rng.choice((1, -1))]
    syn1, syn2 = rng.choice(SYNONYMS)[::rng.choice((1, -1))]
    noun = rng.choice(list(NOUNS))
    v3, vpl = rng.choice(list(VERBS.items()))
    base, past = rng.choice(list(ACTIONS.items()))
    food, food2, food3 = rng.sample(FOODS, 3)
    senses = HOMONYMS[rng.choice(list(HOMONYMS))]
    return rng.choice(CORPUS_FRAMES).format(
        n=n, m=m, he=_pronouns(n)[0], him=_pronouns(n)[1], adj=adj, opp=opp, syn1=syn1, syn2=syn2, noun=noun,
        nouns=NOUNS[noun], v3=v3, vpl=vpl, base=base, past=past, food=food, food2=food2,
        food3=food3, place=rng.choice(PLACES), colour=rng.choice(COLOURS), area=rng.choice(AREAS),
        price=rng.choice(("cheap", "expensive")), sense=rng.choice(rng.choice(senses)).format(n=n))


def pretrain_corpus(seed: int = 0, n_docs: int = 2500) -> list[str]:
    """Short paragraphs of toy English (about 400 KB by default) to pretrain the foundation
    model on: it learns the language, not the tasks (no instructions, no task formats)."""
    rng = random.Random(f"corpus/{seed}")
    return [" ".join(_corpus_sentence(rng) for _ in range(rng.randint(3, 6))) for _ in range(n_docs)]


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


def partition(fed: FedData, n_clients: int, alpha: float = 0.5, min_size: int = 10,
              seed: int = 0) -> FedData:
    """Pool all clients' training records and re-split them with dirichlet_split; the
    test sets stay per task."""
    pooled = [rec for records in fed.clients for rec in records]
    clients = dirichlet_split(pooled, n_clients, alpha, min_size, seed)
    test_records = [rec for records in fed.tests.values() for rec in records]
    return federated_data(f"{fed.name}-dirichlet{alpha}-{n_clients}clients", clients, test_records)


# ---------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write the built-in benchmark in the paper's federated layout "
                    "(DIR/<n>/local_training_<i>.json and DIR/test.jsonl).")
    parser.add_argument("--write", metavar="DIR", required=True, help="new or empty output folder")
    parser.add_argument("--seed", type=int, default=0, help="benchmark seed (default 0)")
    args = parser.parse_args(argv)
    fed = builtin_benchmark(args.seed)
    try:
        write_federated(fed, args.write)
    except OSError as e:
        parser.error(str(e))
    n_test = sum(len(recs) for recs in fed.tests.values())
    print(f"wrote {fed.name} to {args.write}: {len(fed.clients)} clients, "
          f"{sum(len(c) for c in fed.clients)} train and {n_test} test records over {len(fed.tests)} tasks")


if __name__ == "__main__":
    main()
