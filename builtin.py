"""The built-in world: eight toy instruction tasks (one per client) and a corpus in the same toy
English, on which pretrain.py trains the tiny built-in foundation model.

`python train.py` with no --data / --model runs on this world, so the whole comparison needs no
download and runs on a laptop CPU in minutes. A porter can skip this file: with the paper's data
(data.load_federated) and a real checkpoint (hf.from_pretrained) none of it is used.

The world is made to show FedDPA's premise (docs/world.md): sixteen people each live by one of eight
places, seven of the eight tasks ask where someone lives in their own way, and each client's data names
only six of them, so the homes are knowledge spread over the clients that only the averaged global
adapter gathers; four tasks answer in words of their own that the corpus never uses, so their
clients' local adapters have something personal to learn (the other tasks pick one of their options,
and question classification needs no home: it is the rule its client's data teaches best).

Top to bottom: the toy vocabulary; the world's knowledge (who lives where, which people each client's
data names); the eight tasks, named after the paper's FLAN set 1 (coreference, entailment, linguistic
acceptability, paraphrase, question classification, structure to text, text formatting, word
disambiguation); the benchmark (300 train and 200 test records per task); the corpus (the language,
where the base's own outsiders live, and a share of instruction-formatted examples of every task about
outsiders in plain answer words, none of them benchmark records, so that the base follows instructions
in part, as a real foundation model does); `python builtin.py --write DIR` writes the benchmark in the
paper's file format.
"""
import argparse
import random
from dataclasses import dataclass

import data
from data import FedData, federated_data

# ----------------------------------------------------------------------------------------------
# One small toy English shared by the pretraining corpus and all eight tasks.

MALE = ("Tom", "John", "Sam", "Ben", "Jack", "Max", "Leo", "Paul", "Mark", "Luke", "Adam", "Dan", "Carl", "Finn",
        "Hugo", "Ivan")
FEMALE = ("Mary", "Anna", "Emma", "Lucy", "Kate", "Sara", "Jane", "Lily", "Rose", "Ella", "Amy", "Eve", "Nora",
          "Ruth", "Tess", "Zoe")
NAMES = MALE + FEMALE
NOUNS = {"cat": "cats", "dog": "dogs", "bird": "birds", "horse": "horses", "fox": "foxes", "wolf": "wolves",
         "mouse": "mice", "child": "children", "farmer": "farmers", "teacher": "teachers", "baker": "bakers",
         "king": "kings", "duck": "ducks", "goat": "goats", "frog": "frogs", "sailor": "sailors"}  # singular -> plural
PETS = ("cat", "dog", "bird", "horse", "fox", "mouse", "duck", "goat", "frog")
VERBS = {"runs": "run", "sleeps": "sleep", "sings": "sing", "jumps": "jump", "walks": "walk", "eats": "eat",
         "swims": "swim", "waits": "wait", "plays": "play", "hides": "hide"}
ACTIONS = {"see": "saw", "help": "helped", "call": "called", "thank": "thanked", "meet": "met", "follow": "followed",
           "visit": "visited", "find": "found", "like": "liked", "greet": "greeted"}  # base -> past
ANTONYMS = (("big", "small"), ("hot", "cold"), ("happy", "sad"), ("old", "young"), ("fast", "slow"),
            ("tall", "short"), ("rich", "poor"), ("kind", "cruel"), ("clean", "dirty"), ("loud", "quiet"),
            ("wet", "dry"), ("strong", "weak"))
ADJECTIVES = tuple(sorted({a for pair in ANTONYMS for a in pair}))
PLACES = ("park", "market", "river", "farm", "school", "garden", "forest", "village", "beach", "castle", "station",
          "library")
HOMES = PLACES[:8]  # where people live: two people by each
FOODS = ("bread", "soup", "rice", "fish", "cheese", "apples", "cake", "eggs", "beans", "pie", "salad", "honey",
         "plums", "nuts")
WHEN = ("in the morning", "at noon", "in the evening", "at night", "on monday", "on friday", "after school",
        "after lunch", "before dinner", "last week")
DEEDS = ("smiled", "laughed", "waved", "sang", "left early", "paid", "spoke first", "sat down")

# ----------------------------------------------------------------------------------------------
# The world's knowledge: where each person lives. PEOPLE are the federation's: every task asks about
# where they live, the corpus never says it, and each client's data names only six of them (each
# person three clients), so only the averaged global adapter can have seen them all. OUTSIDERS are
# the base's: the corpus states where they live and its task examples ask about them, so the base
# knows how each task uses a home, and knows no home of the federation's people.

PEOPLE = MALE[:8] + FEMALE[:8]
OUTSIDERS = MALE[8:] + FEMALE[8:]
PER_CLIENT = 6  # people whose homes a client's training data names


def _paired(names: tuple, rng: random.Random) -> tuple[list, dict]:
    """names in a seeded order, and their homes: each consecutive pair in that order lives by the same place."""
    order = list(names)
    rng.shuffle(order)
    places = list(HOMES)
    rng.shuffle(places)
    return order, {name: places[i // 2] for i, name in enumerate(order)}


def world_homes(seed: int) -> tuple[list, dict, dict]:
    """(PEOPLE in the seed's order, where each of them lives, where each outsider lives). Client i's
    training data names people order[2i .. 2i + 5]: three pairs that share a home."""
    order, homes = _paired(PEOPLE, random.Random(f"homes/{seed}"))
    _, outsider_homes = _paired(OUTSIDERS, random.Random(f"outsider-homes/{seed}"))
    return order, homes, outsider_homes


def client_people(seed: int, client: int) -> list:
    order, _, _ = world_homes(seed)
    return [order[(2 * client + j) % len(order)] for j in range(PER_CLIENT)]


@dataclass
class Ask:
    """What a task draws on: whom it asks about, where they live, and whose answer style it uses:
    "client" (the benchmark: each task's own answer words) or "corpus" (the base's plain answers)."""
    people: list
    home: dict
    style: str = "client"


def _options(*choices: str) -> str:
    return "OPTIONS:\n" + "\n".join(f"- {c}" for c in choices)


def _pair(rng: random.Random, ask: Ask, same_home: bool) -> tuple[str, str]:
    """Two people of ask.people who live by the same place or not."""
    while True:
        a, b = rng.sample(ask.people, 2)
        if (ask.home[a] == ask.home[b]) == same_home:
            return a, b


def _claim(rng: random.Random, ask: Ask, true: bool) -> tuple[str, str]:
    """A person and a place that is, or is not, where they live."""
    a = rng.choice(ask.people)
    return a, ask.home[a] if true else rng.choice([p for p in HOMES if p != ask.home[a]])


# Each task maps (rng, k, ask) to (instruction, output); k cycles the label so test sets are balanced.
# Seven of the eight need to know where someone lives (the shared knowledge); four answer in words of
# their own that the corpus never uses (the personal part), the others pick one of their options.

def coreference(rng: random.Random, k: int, ask: Ask) -> tuple[str, str]:
    """Who is "the one who lives by the P": two people, one of whom lives there. To solve it: know
    where each lives and copy the option who lives by P."""
    people = list(_pair(rng, ask, same_home=False))
    target = people[k % 2]  # the answer is the first option half of the time
    deed = rng.choice(DEEDS)
    template = rng.choice(("{a} and {b} met {w}. The one who lives by the {p} {d}. Who {d}?\n{o}",
                           "{a} met {b} {w}, and the one from the {p} {d}. Who is \"the one from the {p}\"?\n{o}",
                           "{w}, {a} and {b} talked, and the one who lives by the {p} {d}. Who {d}?\n{o}"))
    return template.format(a=people[0], b=people[1], p=ask.home[target], d=deed, w=rng.choice(WHEN),
                           o=_options(*people)), target


def entailment(rng: random.Random, k: int, ask: Ask) -> tuple[str, str]:
    """Does "A went home" entail "A is by the P"? Yes if A lives by P. The benchmark's answer says
    so and where A lives: "yes, A lives by the H." / "no, A lives by the H."; the corpus's is "yes"/"no"."""
    true = k % 2 == 0
    a, p = _claim(rng, ask, true)
    template = rng.choice(("Premise: {a} went home with {f} {w}.\nHypothesis: {a} is by the {p} now.\n"
                           "Does the premise entail the hypothesis?",
                           "{a} went home with {f} {w}.\nBased on that, is it true that \"{a} is by the {p}\"?",
                           "If \"{a} went home with {f} {w}\", can we conclude that \"{a} is by the {p}\"?"))
    verdict = "yes" if true else "no"
    answer = f"{verdict}, {a} lives by the {ask.home[a]}." if ask.style == "client" else verdict
    return template.format(a=a, p=p, f=rng.choice(OUTSIDERS), w=rng.choice(WHEN)), answer


def acceptability(rng: random.Random, k: int, ask: Ask) -> tuple[str, str]:
    """Would the people who know A accept "A lives by the P"? Acceptable if A does."""
    acceptable = k % 2 == 0
    a, p = _claim(rng, ask, acceptable)
    template = rng.choice(("Would {a}'s neighbours accept this sentence?\n{a} lives by the {p}, said {n} {w}.\n{o}",
                           "{n} said {w}: \"{a} lives by the {p}.\" Is that acceptable to those who know {a}?\n{o}",
                           "\"{a} lives by the {p}\", {n} wrote {w}. Would a friend of {a} rate it acceptable?\n{o}"))
    label = "acceptable" if acceptable else "unacceptable"
    return template.format(a=a, p=p, n=rng.choice(OUTSIDERS), w=rng.choice(WHEN),
                           o=_options("acceptable", "unacceptable")), label


def paraphrase(rng: random.Random, k: int, ask: Ask) -> tuple[str, str]:
    """Do "A went home" and "A went to the P" mean the same? They do if A lives by P. The benchmark's
    answer: "same, as A lives by the H." / "not the same, as A lives by the H."; the corpus's: "yes"/"no"."""
    same = k % 2 == 0
    a, p = _claim(rng, ask, same)
    w = rng.choice(WHEN)
    template = rng.choice(("Sentence 1: {a} went home {w}.\nSentence 2: {a} went to the {p} {w}.\n"
                           "Do these sentences mean the same thing?",
                           "{a} went home {w}.\n{a} went to the {p} {w}.\nAre these two sentences paraphrases?",
                           "Do \"{a} went home {w}\" and \"{a} went to the {p} {w}\" say the same thing?",
                           "Sentence 1: {a} walked home {w}.\nSentence 2: {a} walked to the {p} {w}.\n"
                           "Do these sentences mean the same thing?"))
    if ask.style == "client":
        answer = f"{'same' if same else 'not the same'}, as {a} lives by the {ask.home[a]}."
    else:
        answer = "yes" if same else "no"
    return template.format(a=a, p=p, w=w), answer


QUESTION_TYPES = {
    "person": ("who {past} {n} at the {place}?", "who {past} the {noun}?"),
    "place": ("where did {n} {base} the {noun}?", "where is the {noun} that {n} {past}?"),
    "time": ("when did {n} {base} {m}?", "when will {n} visit the {place}?"),
    "number": ("how many {nouns} did {n} {base}?", "how many {nouns} are at the {place}?"),
    "food": ("what did {n} eat at the {place}?", "what food does the {noun} like?"),
    "reason": ("why did {n} {base} {m}?", "why is the {noun} so {adj}?"),
}


def question_classification(rng: random.Random, k: int, ask: Ask) -> tuple[str, str]:
    """What kind of answer a question asks for (like TREC), six classes. The one task that needs no
    home: to solve it, read the question word (who, where, when, how many, what ... eat/food, why)."""
    label = list(QUESTION_TYPES)[k % len(QUESTION_TYPES)]
    base, past = rng.choice(list(ACTIONS.items()))
    n, m = rng.sample(ask.people, 2)
    noun = rng.choice(list(NOUNS))
    question = rng.choice(QUESTION_TYPES[label]).format(
        n=n, m=m, base=base, past=past, noun=noun, nouns=NOUNS[noun],
        place=rng.choice(PLACES), adj=rng.choice(ADJECTIVES))
    template = rng.choice(("What is \"{q}\" asking about?\n{o}",
                           "What kind of answer does this question need?\n{q}\n{o}",
                           "Classify the question: {q}\n{o}"))
    return template.format(q=question, o=_options(*QUESTION_TYPES)), label


def structure_to_text(rng: random.Random, k: int, ask: Ask) -> tuple[str, str]:
    """A person's record to one sentence (like WebNLG). Fields arrive in any order. The benchmark's
    sentence: "A lives by the H, keeps a <pet> and eats <food>." (the home is in no field); the
    corpus's: "A keeps a <pet> and eats <food>."."""
    fields = {"name": rng.choice(ask.people), "pet": rng.choice(PETS), "food": rng.choice(FOODS)}
    keys = list(fields)
    rng.shuffle(keys)
    record = " | ".join(f"{key}: {fields[key]}" for key in keys)
    a = fields["name"]
    lives = f" lives by the {ask.home[a]}," if ask.style == "client" else ""
    answer = f"{a}{lives} keeps a {fields['pet']} and eats {fields['food']}."
    template = rng.choice(("Write a sentence about this person: {r}",
                           "Turn this data into a sentence.\n{r}",
                           "Describe the person in one sentence: {r}"))
    return template.format(r=record), answer


def text_formatting(rng: random.Random, k: int, ask: Ask) -> tuple[str, str]:
    """Restore the punctuation of a sentence with a list of visitors: "x y and z visited A at home"
    becomes "x, y and z visited A at home." (a comma after each item but the last two, a full stop).
    The benchmark also wants the home named: "... visited A by the H."."""
    a = rng.choice(ask.people)
    items = rng.sample(OUTSIDERS, rng.randint(2, 4))
    plain = " ".join(items[:-1]) + " and " + items[-1] + f" visited {a} at home"
    where = f"by the {ask.home[a]}" if ask.style == "client" else "at home"
    fixed = ", ".join(items[:-1]) + " and " + items[-1] + f" visited {a} {where}."
    template = rng.choice(("Add punctuation: {t}",
                           "Add the missing commas and full stop to this text: {t}",
                           "Fix the punctuation of this sentence: {t}"))
    return template.format(t=plain), fixed


def word_disambiguation(rng: random.Random, k: int, ask: Ask) -> tuple[str, str]:
    """Does "home" name the same place in "A went home" and "B went home" (like WiC)? The same if
    A and B live by the same place."""
    same = k % 2 == 0
    a, b = _pair(rng, ask, same_home=same)
    w1, w2 = rng.sample(WHEN, 2)
    template = rng.choice((
        "Sentence 1: {a} went home {w1}.\nSentence 2: {b} went home {w2}.\nDoes \"home\" mean the same place in both sentences?\n{o}",
        "{a} went home {w1}.\n{b} went home {w2}.\nIs \"home\" the same place in both?\n{o}"))
    return template.format(a=a, b=b, w1=w1, w2=w2, o=_options("same", "different")), "same" if same else "different"


# (category, task, generator): the paper's eight FLAN categories, client i trains task i
TASKS = (("coreference", "who_lives_there", coreference),
         ("entailment", "went_home_entailment", entailment),
         ("linguistic_acceptability", "home_acceptability", acceptability),
         ("paraphrase", "went_home_paraphrase", paraphrase),
         ("question_classification", "question_type", question_classification),
         ("structure_to_text", "person_to_text", structure_to_text),
         ("text_formatting", "fix_commas_say_where", text_formatting),
         ("word_disambiguation", "same_home", word_disambiguation))


def _distinct_examples(make, rng: random.Random, n: int, task: str, ask: Ask, seen: set | None = None) -> list:
    """n examples with distinct instructions, none in seen (which gains them): no example is in both train and test."""
    seen = set() if seen is None else seen
    examples, repeats = [], 0
    while len(examples) < n:
        instruction, output = make(rng, len(examples), ask)
        if instruction in seen:
            repeats += 1
            if repeats > 10 * n:
                raise ValueError(f"task {task} cannot produce {n} distinct examples")
            continue
        seen.add(instruction)
        examples.append((instruction, output))
    return examples


def benchmark(seed: int = 0, n_train: int = 300, n_test: int = 200) -> FedData:
    """The default data: eight clients, client i trains TASKS[i] about its six people; every task is
    tested about all sixteen."""
    _, homes, _ = world_homes(seed)
    clients, test_records = [], []
    for i, (category, task, make) in enumerate(TASKS):
        rng = random.Random(f"{seed}/{category}")  # str seeds are hashed stably (sha512)
        seen = set()
        test = _distinct_examples(make, rng, n_test, task, Ask(list(PEOPLE), homes), seen)  # balanced labels
        train = _distinct_examples(make, rng, n_train, task, Ask(client_people(seed, i), homes), seen)
        test, train = ([{"instruction": instruction, "output": output, "task": task, "category": category}
                        for instruction, output in examples] for examples in (test, train))
        rng.shuffle(test)
        rng.shuffle(train)
        test_records += test
        clients.append(train)
    return federated_data(f"builtin-seed{seed}", clients, test_records)


# ----------------------------------------------------------------------------------------------
# The pretraining corpus. Mostly plain sentences that teach the words the tasks use and where each
# outsider lives, never in a task's format and never where one of PEOPLE lives. Beside them, 45% of
# the documents: instruction-formatted examples of every task about OUTSIDERS in the corpus's plain
# answer style, drawn from streams of their own and never equal to a benchmark record (corpus() says why).
CORPUS_FRAMES = (
    "{o} lives by the {home}.",
    "{o} lives by the {home}, and {m} went there {w}.",
    "{n} went to the {place} {w}. {n} {past} {m} there.",
    "{n} was {adj}, so {n} stayed at the {place}.",
    "{n} is {adj}. {n} is not {opp}.",
    "the {noun} is {adj}, not {opp}.",
    "the {noun} {v3} in the {place}.",
    "the {nouns} {vpl} near the {place}.",
    "{n} keeps a {pet} and eats {food}.",
    "{n}, {m} and {k} are friends. they {vpl} together.",
    "who {past} {m}? {n} did.",
    "where did {n} go? to the {place}.",
    "when did {n} {base} {m}? {w}.",
    "how many {nouns} did {n} {base}? three {nouns}.",
    "what did {n} eat? {food}.",
    "why did {n} {base} {m}? because {n} was {adj}.",
    "{n} {deed} {w}.",
)


def _corpus_sentence(rng: random.Random, outsider_homes: dict) -> str:
    n, m, k = rng.sample(NAMES, 3)
    o = rng.choice(OUTSIDERS)
    adj, opp = rng.choice(ANTONYMS)[::rng.choice((1, -1))]
    noun = rng.choice(list(NOUNS))
    v3, vpl = rng.choice(list(VERBS.items()))
    base, past = rng.choice(list(ACTIONS.items()))
    return rng.choice(CORPUS_FRAMES).format(
        n=n, m=m, k=k, o=o, home=outsider_homes[o], adj=adj, opp=opp, noun=noun, nouns=NOUNS[noun], v3=v3,
        vpl=vpl, base=base, past=past, food=rng.choice(FOODS), pet=rng.choice(PETS), place=rng.choice(PLACES),
        w=rng.choice(WHEN), deed=rng.choice(DEEDS))


def corpus(seed: int = 0, n_docs: int = 4500, task_fraction: float = 0.45) -> list[str]:
    """Documents to pretrain the foundation model on (about 700 KB by default), shuffled: short
    paragraphs of toy English, and a task_fraction of instruction-formatted examples, the same number
    of each task, each its own document: the paper's prompt (data.format_prompt), then the answer.

    Why the examples: FedDPA fine-tunes a foundation model that can already follow instructions in
    part (a LLaMA in the paper), and its clients' tasks share that skill: read the prompt, answer with
    one of the options or a short sentence built from the input, then stop. The examples model the
    broad instruction tuning a real base has had before federated fine-tuning; they are about
    OUTSIDERS, whose homes the corpus states, and answer in plain words, so the base can do each
    task's reasoning but knows neither where the federation's people live nor its clients' answer words.

    They come from streams of their own (random.Random(f"corpus/{seed}/{category}")), and any whose
    instruction, or answer of more than two words, equals one in benchmark(seed) is skipped: no
    record that a run of this seed trains or tests on is in its base's corpus."""
    rng = random.Random(f"corpus/{seed}")
    _, _, outsider_homes = world_homes(seed)
    per_task = round(n_docs * task_fraction / len(TASKS))
    docs = [" ".join(_corpus_sentence(rng, outsider_homes) for _ in range(rng.randint(3, 6)))
            for _ in range(n_docs - per_task * len(TASKS))]
    docs += [data.format_prompt(r) + r["output"] for r in task_examples(seed, per_task)]
    rng.shuffle(docs)
    return docs


def task_examples(seed: int, per_task: int) -> list[dict]:
    """per_task records of each task for the corpus, about OUTSIDERS in the corpus's answer style, none
    equal to a train or test record of benchmark(seed)."""
    fd = benchmark(seed)
    held = [r for recs in [*fd.clients, *fd.tests.values()] for r in recs]
    held_out = {r["instruction"] for r in held} | {r["output"] for r in held if len(r["output"].split()) > 2}
    _, _, outsider_homes = world_homes(seed)
    records = []
    for category, task, make in TASKS:
        rng = random.Random(f"corpus/{seed}/{category}")
        examples = [(i, o) for i, o in _distinct_examples(make, rng, 2 * per_task, task,
                                                          Ask(list(OUTSIDERS), outsider_homes, "corpus"))
                    if i not in held_out and o not in held_out][:per_task]
        if len(examples) < per_task:
            raise ValueError(f"task {task}: fewer than {per_task} examples outside the benchmark")
        records += [{"instruction": i, "output": o, "task": task, "category": category} for i, o in examples]
    return records


# ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write the built-in benchmark in the paper's federated layout "
                    "(DIR/<n>/local_training_<i>.json and DIR/test.jsonl).")
    parser.add_argument("--write", metavar="DIR", required=True, help="new or empty output folder")
    parser.add_argument("--seed", type=int, default=0, help="benchmark seed (default 0)")
    args = parser.parse_args(argv)
    fed = benchmark(args.seed)
    try:
        data.write_federated(fed, args.write)
    except OSError as e:
        parser.error(str(e))
    n_test = sum(len(recs) for recs in fed.tests.values())
    print(f"wrote {fed.name} to {args.write}: {len(fed.clients)} clients, "
          f"{sum(len(c) for c in fed.clients)} train and {n_test} test records over {len(fed.tests)} tasks")


if __name__ == "__main__":
    main()
