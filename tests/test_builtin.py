"""builtin.py: the built-in benchmark (counts, splits, balanced labels, answers that follow each task's
stated rule), its corpus (plain paragraphs and examples of every task, none a benchmark record), and
`python builtin.py --write`."""
import re
from collections import Counter

import pytest

import builtin
import data
import pretrain
from conftest import CATEGORIES, tree_bytes

def test_same_seed_same_benchmark_files(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        data.write_federated(builtin.benchmark(seed=seed, n_train=30, n_test=20), tmp_path / name)
    a, b, c = (tree_bytes(tmp_path / name) for name in "abc")
    assert a == b and set(a) == set(c) and a != c
    loaded = data.load_federated(tmp_path / "a")
    assert loaded.clients == builtin.benchmark(seed=0, n_train=30, n_test=20).clients


# ------------------------------------------------------------------- built-in benchmark

def test_builtin_benchmark_tasks_counts_and_splits(world):
    assert world.client_tasks == CATEGORIES and list(world.tests) == CATEGORIES and world.notes == []
    for category, train_set in zip(CATEGORIES, world.clients):
        test = world.tests[category]
        assert len(train_set) == 300 and len(test) == 200
        assert {r["category"] for r in train_set + test} == {category}
        train_prompts = {data.format_prompt(r) for r in train_set}
        assert len(train_prompts) == 300
        assert train_prompts.isdisjoint(data.format_prompt(r) for r in test)


def test_builtin_answers_classification_balanced_generation_long(world, tok):
    classification = generation = 0
    for category, test in world.tests.items():
        words = [len(r["output"].split()) for r in test]
        if max(words) <= 2:
            classification += 1
            assert Counter(r["output"] for r in test).most_common(1)[0][1] <= len(test) / 2, category
            positions = Counter(re.findall(r"\n- (.+)", r["instruction"]).index(r["output"]) for r in test)
            assert positions.most_common(1)[0][1] <= len(test) / 2, category  # nor a favourite option slot
        else:
            generation += 1
            assert sum(words) / len(words) >= 5 and max(words) <= 12, category
        assert max(len(data.encode_prompt(tok, r)) for r in test) <= 64, category
    assert classification >= 4 and generation >= 2


def expected_answer(category, instruction, style="client", seed=0):
    """Each task's rule as its docstring states it, recomputed from the instruction text and where
    everyone lives (builtin.world_homes): the federation's people and the corpus's outsiders."""
    _, homes, outsider_homes = builtin.world_homes(seed)
    home = {**homes, **outsider_homes}
    if category == "coreference":
        place = re.search(r"(?:lives by|from) the (\w+)", instruction)[1]
        options = re.findall(r"\n- (\w+)", instruction)
        (answer,) = [o for o in options if home[o] == place]
        return answer
    if category == "linguistic_acceptability":
        person, place = re.search(r"(\w+) lives by the (\w+)", instruction).groups()
        return "acceptable" if home[person] == place else "unacceptable"
    if category == "entailment":
        person, place = re.search(r"(\w+) is by the (\w+)", instruction).groups()
        verdict = "yes" if home[person] == place else "no"
        return f"{verdict}, {person} lives by the {home[person]}." if style == "client" else verdict
    if category == "paraphrase":
        person, place = re.search(r"(\w+) (?:went|walked) to the (\w+)", instruction).groups()
        same = home[person] == place
        if style == "client":
            return f"{'same' if same else 'not the same'}, as {person} lives by the {home[person]}."
        return "yes" if same else "no"
    if category == "question_classification":
        first = re.search(r"\b(who|where|when|how|what|why)\b", instruction)[1]
        return dict(who="person", where="place", when="time", how="number", what="food", why="reason")[first]
    if category == "structure_to_text":
        fields = dict(f.split(": ") for f in re.search(r"(\w+: \w+(?: \| \w+: \w+)+)$", instruction)[1].split(" | "))
        lives = f" lives by the {home[fields['name']]}," if style == "client" else ""
        return f"{fields['name']}{lives} keeps a {fields['pet']} and eats {fields['food']}."
    if category == "text_formatting":
        text = instruction.split(": ", 1)[1]
        visitors, rest = text.split(" visited ")
        head, last = visitors.split(" and ")
        person = re.fullmatch(r"(\w+) at home", rest)[1]
        where = f"by the {home[person]}" if style == "client" else "at home"
        return f"{', '.join(head.split())} and {last} visited {person} {where}."
    a, b = re.findall(r"(\w+) went home", instruction)
    return "same" if home[a] == home[b] else "different"


def test_each_client_names_six_people_each_person_three_clients_and_tests_ask_about_all(world):
    order, homes, _ = builtin.world_homes(seed=0)
    assert sorted(order) == sorted(builtin.PEOPLE) and Counter(homes.values()) == {h: 2 for h in builtin.HOMES}
    named = [{n for r in records for n in re.findall(r"[A-Z][a-z]+", r["instruction"]) if n in builtin.PEOPLE}
             for records in world.clients]
    for i, people in enumerate(named):  # besides them, only outsiders
        assert people == set(builtin.client_people(0, i)), i
    assert Counter(n for i in range(8) for n in builtin.client_people(0, i)) == {n: 3 for n in builtin.PEOPLE}
    for category, test in world.tests.items():
        asked = {n for r in test for n in re.findall(r"[A-Z][a-z]+", r["instruction"]) if n in builtin.PEOPLE}
        assert asked == set(builtin.PEOPLE), category


def test_builtin_answers_follow_the_stated_rules(world):
    for category, records in zip(world.client_tasks, world.clients):
        for r in records[:100] + world.tests[category][:100]:
            assert r["output"] == expected_answer(category, r["instruction"]), r


def test_pretrain_corpus_is_the_language_and_task_examples_none_from_the_benchmark(world):
    corpus = builtin.corpus(seed=0)
    assert corpus == builtin.corpus(seed=0) != builtin.corpus(seed=1)
    assert 500_000 < len("\n".join(corpus).encode()) < 1_500_000
    prompted = [d for d in corpus if d.startswith("### Instruction:\n")]
    plain = "\n".join(d for d in corpus if not d.startswith("### Instruction:\n"))
    assert "###" not in plain and "OPTIONS" not in plain  # the paragraphs are plain text
    assert 0.4 < len(prompted) / len(corpus) < 0.5
    examples = builtin.task_examples(seed=0, per_task=len(prompted) // len(CATEGORIES))
    # the prompted documents are the task examples, in the paper's prompt, the same number of every task
    assert sorted(prompted) == sorted(data.format_prompt(r) + r["output"] for r in examples)
    assert Counter(r["category"] for r in examples) == {c: len(prompted) // len(CATEGORIES) for c in CATEGORIES}
    for r in examples:  # about outsiders only, in the corpus's plain answer words
        assert r["output"] == expected_answer(r["category"], r["instruction"], style="corpus"), r
        assert not set(re.findall(r"[A-Z][a-z]+", r["instruction"])) & set(builtin.PEOPLE), r
    # the corpus never says where one of the federation's people lives: that is the clients' to learn
    _, homes, _ = builtin.world_homes(seed=0)
    for person in builtin.PEOPLE:
        assert not re.search(rf"\b{person} lives by", "\n".join(corpus)), person
    # none is a record the benchmark trains or tests on: no instruction, no answer longer than two words
    text = "\n".join(corpus)
    instructions = {r["instruction"] for r in examples}
    for records in [*world.clients, *world.tests.values()]:
        for r in records:
            assert r["instruction"] not in instructions
            assert len(r["output"].split()) <= 2 or r["output"] not in text


def test_command_writes_benchmark(tmp_path, capsys):
    builtin.main(["--write", str(tmp_path / "out"), "--seed", "3"])
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "builtin-seed3" in line
    assert data.load_federated(tmp_path / "out").clients == builtin.benchmark(seed=3).clients
    for argv in (["--write", str(tmp_path / "out")], ["--seed", "x", "--write", "y"], []):
        with pytest.raises(SystemExit) as exit_:
            builtin.main(argv)
        assert exit_.value.code == 2


def test_pretrained_base_is_cached_under_a_name_that_changes_with_its_corpus(monkeypatch):
    d = pretrain.cache_dir("/c", seed=0, steps=5)
    assert d == pretrain.cache_dir("/c", seed=0, steps=5) != pretrain.cache_dir("/c", seed=0, steps=6)
    corpus = builtin.corpus
    monkeypatch.setattr(builtin, "corpus", lambda seed=0: corpus(seed)[:-1])  # one document fewer
    assert pretrain.cache_dir("/c", seed=0, steps=5) != d
