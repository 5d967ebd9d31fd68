"""data.py: the prompt and its masking, batches, tokenizer training, the paper's federated files
(validated: every malformed case is one line naming the file), and Dirichlet partitions."""
import random
from collections import Counter

import pytest
import sentencepiece as spm
import torch
from hypothesis import given, settings, strategies as st

import builtin
import data
import hf
from conftest import CATEGORIES, FLAN, MALFORMED, needs_flan, small_fed, smollm2_dir, tree_bytes

# ----------------------------------------------------------------------------- prompts

def test_prompt_uses_input_form_only_with_nonempty_input():
    assert data.format_prompt({"instruction": "Do it.", "output": "x"}) == \
        "### Instruction:\nDo it.\n\n### Response:\n"
    assert data.format_prompt({"instruction": "Do it.", "input": "", "output": "x"}) == \
        "### Instruction:\nDo it.\n\n### Response:\n"
    assert data.format_prompt({"instruction": "Do it.", "input": "a {b}", "output": "x"}) == \
        "### Instruction:\nDo it.\n\n### Input:\na {b}\n\n### Response:\n"


def test_unmasked_labels_decode_to_response_then_eos(world, tok):
    records = [recs[0] for recs in world.clients] + [
        {"instruction": "Translate.", "input": "le chat noir", "output": "the black cat", "category": "x"},
        {"instruction": "Say it\nwith  spaces.", "input": "ünïcode ☕", "output": "café ☕\n  two lines", "category": "x"}]
    for rec in records:
        ex = data.encode_example(tok, rec)
        ids, labels = ex["input_ids"], ex["labels"]
        n_masked = labels.count(-100)
        assert len(ids) == len(labels) and ids[0] == tok.bos_id
        assert labels[:n_masked] == [-100] * n_masked and -100 not in labels[n_masked:]
        assert labels[n_masked:] == ids[n_masked:]
        assert tok.decode(ids[1:n_masked]) == data.format_prompt(rec)
        assert labels[-1] == tok.eos_id and tok.decode(labels[n_masked:-1]) == rec["output"]
        assert data.encode_prompt(tok, rec) == ids[:n_masked]


def official_labels(encode, bos, eos, rec):
    """The official code's tokenization, restated: the joint encoding of prompt + response (+ EOS), labels
    masked over the length of the prompt's own encoding."""
    prompt = data.format_prompt(rec)
    full = bos + encode(prompt + rec["output"]) + [eos]
    n = len(bos + encode(prompt))
    return full, [-100] * n + full[n:]


def test_labels_are_the_joint_encoding_as_the_official_code(world, tok, tmp_path):
    """A SentencePiece Llama-style tokenizer (byte fallback, add_dummy_prefix): the response is tokenized
    in context, so "### Response:\nno" labels "no", not the "▁no" of the response encoded alone."""
    sp = tok.sp
    assert sp.id_to_piece(sp.encode("no")[0]).startswith("▁")   # add_dummy_prefix is on
    alone = 0
    for records in world.clients:
        for rec in records[:25]:
            ex = data.encode_example(tok, rec)
            full, labels = official_labels(sp.encode, [tok.bos_id], tok.eos_id, rec)
            assert ex == {"input_ids": full, "labels": labels}
            first = next(i for i in labels if i != -100)
            alone += first != sp.encode(rec["output"])[0]
    assert alone >= 100  # the joint encoding differs from the old separate one where it matters


def test_a_piece_merged_across_the_boundary_keeps_the_prompt_and_the_response(tmp_path):
    """Where the joint encoding merges the prompt's end with the response's start (here a tokenizer that
    learnt ":\n(1)" as one piece), the official boundary would mask the whole response; we keep the
    prompt's own encoding, which generation continues from, and the response encoded alone."""
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa"]
    data.train_tokenizer([f"{rng.choice(words)} {rng.choice(words)}:\n(1)" for _ in range(2000)],
                         str(tmp_path / "t.model"), vocab_size=300)
    tok = hf.SentencePieceTokenizer(str(tmp_path / "t.model"))
    rec = {"instruction": "Say it.", "output": "(1)"}
    prompt = [tok.bos_id] + tok.encode(data.format_prompt(rec))
    joint = [tok.bos_id] + tok.encode(data.format_prompt(rec) + "(1)")
    assert joint[:len(prompt)] != prompt                      # the premise: a merged piece
    _, official = official_labels(tok.encode, [tok.bos_id], tok.eos_id, rec)
    assert not set(official) - {-100, tok.eos_id}            # the official boundary loses the answer
    ex = data.encode_example(tok, rec)
    assert ex["input_ids"] == prompt + tok.encode("(1)") + [tok.eos_id]
    assert ex["labels"] == [-100] * len(prompt) + tok.encode("(1)") + [tok.eos_id]


@needs_flan
def test_labels_with_smollm2_tokenizer_json_are_the_official_ones():
    """SmolLM2's tokenizer.json (byte-level BPE, no BOS), read by the tokenizers package directly."""
    from tokenizers import Tokenizer
    d = smollm2_dir()
    config = hf.config_from_hf(f"{d}/config.json")
    tok = hf.load_tokenizer(d, config)
    theirs = Tokenizer.from_file(f"{d}/tokenizer.json")
    assert not tok.add_bos
    records = [r for client in data.load_federated(FLAN).clients for r in client[:5]]
    for rec in records:
        full, labels = official_labels(lambda t: theirs.encode(t, add_special_tokens=False).ids, [], config.eos_id, rec)
        assert data.encode_example(tok, rec, cutoff=4096) == {"input_ids": full, "labels": labels}


def test_truncation_and_prompt_overflow(world, tok):
    rec = world.clients[5][0]  # structure_to_text: a long answer
    full = data.encode_example(tok, rec)
    n_prompt = full["labels"].count(-100)
    cut = data.encode_example(tok, rec, cutoff=n_prompt + 2)
    assert cut["input_ids"] == full["input_ids"][:n_prompt + 2] and tok.eos_id not in cut["labels"]
    assert data.encode_example(tok, rec, cutoff=n_prompt) is None
    short = data.encode_prompt(tok, rec, cutoff=5)
    assert short == [tok.bos_id] + full["input_ids"][n_prompt - 4:n_prompt]


def test_collate_pads_on_the_left():
    examples = [{"input_ids": [1, 5, 6], "labels": [-100, 6, 2]}, {"input_ids": [1, 7], "labels": [-100, 2]}]
    ids, mask, labels = data.collate(examples, pad_id=3)
    assert ids.tolist() == [[1, 5, 6], [3, 1, 7]] and ids.dtype == torch.long
    assert mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert labels.tolist() == [[-100, 6, 2], [-100, -100, 2]]
    ids, mask = data.pad_left([[9], []], pad_id=0)
    assert ids.tolist() == [[9], [0]] and mask.tolist() == [[1], [0]]


def test_same_texts_same_tokenizer_bytes(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        data.train_tokenizer(builtin.corpus(seed=seed, n_docs=300), str(tmp_path / f"{name}.model"), 512)
    a, b, c = ((tmp_path / f"{name}.model").read_bytes() for name in "abc")
    assert a == b and a != c
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.model", "b.model", "c.model"]
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "a.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.get_piece_size()) == (0, 1, 2, 3, 512)


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_data_gives_one_line_error_and_writes_nothing(case, tmp_path):
    mutate, pieces = MALFORMED[case]
    data.write_federated(small_fed(), tmp_path)
    data.load_federated(tmp_path)  # valid before the mutation
    mutate(tmp_path)
    before = tree_bytes(tmp_path)
    with pytest.raises(data.DataError) as err:
        data.load_federated(tmp_path)
    message = str(err.value)
    assert "\n" not in message
    for piece in pieces:
        assert piece in message
    assert tree_bytes(tmp_path) == before


def test_missing_folder_is_a_data_error(tmp_path):
    with pytest.raises(data.DataError, match="no such dataset folder"):
        data.load_federated(tmp_path / "nope")
    assert list(tmp_path.iterdir()) == []


def test_untrained_test_category_is_noted(tmp_path):
    fed = small_fed()
    fed.tests["zebra"] = [{"instruction": "a", "output": "b", "category": "zebra"}]
    data.write_federated(fed, tmp_path)
    loaded = data.load_federated(tmp_path)
    assert list(loaded.tests) == sorted(loaded.tests) and "zebra" in loaded.tests
    assert [n for n in loaded.notes if "zebra" in n] == ["test category 'zebra' is not trained on by any client"]
    with pytest.raises(FileExistsError):
        data.write_federated(fed, tmp_path)


@needs_flan
def test_loads_released_flan_data():
    fed = data.load_federated(FLAN)
    assert [len(c) for c in fed.clients] == [300] * 8
    assert {c: len(t) for c, t in fed.tests.items()} == {c: 200 for c in CATEGORIES}
    assert sorted(fed.client_tasks) == CATEGORIES and fed.notes == []


# ----------------------------------------------------------------- Dirichlet partition

def pool(sizes):
    return [{"id": f"{c}-{i}", "category": f"cat{c}"} for c, n in enumerate(sizes) for i in range(n)]


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4), n_clients=st.integers(1, 6),
       alpha=st.floats(0.3, 5.0), seed=st.integers(0, 2**16), data_=st.data())
def test_dirichlet_split_assigns_each_record_once_and_respects_min_size(sizes, n_clients, alpha, seed, data_):
    records = pool(sizes)
    min_size = data_.draw(st.integers(0, len(records) // (4 * n_clients)))
    clients = data.dirichlet_split(records, n_clients, alpha, min_size, seed)
    assert len(clients) == n_clients and min(len(c) for c in clients) >= min_size
    assert sorted(r["id"] for c in clients for r in c) == sorted(r["id"] for r in records)
    assert clients == data.dirichlet_split(records, n_clients, alpha, min_size, seed)


def test_dirichlet_split_seed_alpha_and_impossible_minimum():
    records = pool([100] * 8)
    assert data.dirichlet_split(records, 8, seed=0) != data.dirichlet_split(records, 8, seed=1)

    def mean_top_share(alpha):  # fraction of a client's data in its commonest category
        clients = data.dirichlet_split(records, 8, alpha, min_size=1, seed=0)
        return sum(Counter(r["category"] for r in c).most_common(1)[0][1] / len(c) for c in clients) / 8
    assert mean_top_share(0.1) > 0.6 > 0.3 > mean_top_share(100.0)
    with pytest.raises(ValueError, match="cannot give 9 clients 100 records"):
        data.dirichlet_split(records, 9, min_size=100)
    small = pool([10] * 8)  # a first draw at alpha 0.3 leaves some client short: redraws needed
    assert min(map(len, data.dirichlet_split(small, 8, alpha=0.3, min_size=8, seed=0))) >= 8
    with pytest.raises(ValueError, match="in 20 draws"):
        data.dirichlet_split(small, 8, alpha=0.05, min_size=9, max_tries=20)


def test_partition_repools_clients_and_keeps_tests(world):
    fed = data.partition(world, n_clients=5, alpha=0.5, min_size=10, seed=0)
    assert len(fed.clients) == 5 and fed.tests == world.tests
    assert sum(map(len, fed.clients)) == sum(map(len, world.clients))
    for records, task in zip(fed.clients, fed.client_tasks):
        assert Counter(r["category"] for r in records).most_common(1)[0][0] == task
    with pytest.raises(ValueError, match="client 1 has no training records"):
        data.federated_data("x", [world.clients[0], []], [])
