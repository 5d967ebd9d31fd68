"""The built-in world: eight toy instruction tasks (one per client) and a corpus in the same toy
English, on which pretrain.py trains the tiny built-in foundation model.

`python train.py` with no --data / --model runs on this world, so the whole comparison needs no
download and runs on a laptop CPU in minutes. A porter can skip this file: with the paper's data
(data.load_federated) and a real checkpoint (hf.from_pretrained) none of it is used.

Top to bottom: the toy vocabulary; the eight tasks, named and shaped after the paper's FLAN set 1
(coreference, entailment, linguistic acceptability, paraphrase, question classification, structure
to text, text formatting, word disambiguation); the benchmark (300 train and 200 test records per
task); the corpus (the language, and a share of instruction-formatted examples of every task that
are none of the benchmark's records, so that the base follows instructions in part, as a real
foundation model does); `python builtin.py --write DIR` writes the benchmark in the paper's file format.
"""
import argparse
import random

import data
from data import FedData, federated_data

# ----------------------------------------------------------------------------------------------
# One small toy English shared by the pretraining corpus and all eight tasks.

MALE = ("Tom", "John", "Sam", "Ben", "Jack", "Max", "Leo", "Paul", "Mark", "Luke", "Adam", "Dan")
FEMALE = ("Mary", "Anna", "Emma", "Lucy", "Kate", "Sara", "Jane", "Lily", "Rose", "Ella", "Amy", "Eve")
NAMES = MALE + FEMALE
NOUNS = {"cat": "cats", "dog": "dogs", "bird": "birds", "horse": "horses", "fox": "foxes", "wolf": "wolves",
         "mouse": "mice", "child": "children", "farmer": "farmers", "teacher": "teachers", "baker": "bakers",
         "king": "kings", "duck": "ducks", "goat": "goats", "frog": "frogs", "sailor": "sailors"}  # singular -> plural
VERBS = {"runs": "run", "sleeps": "sleep", "sings": "sing", "jumps": "jump", "walks": "walk", "eats": "eat",
         "swims": "swim", "waits": "wait", "plays": "play", "hides": "hide"}
ACTIONS = {"see": "saw", "help": "helped", "call": "called", "thank": "thanked", "meet": "met", "follow": "followed",
           "visit": "visited", "find": "found", "like": "liked", "greet": "greeted"}  # base -> past
ANTONYMS = (("big", "small"), ("hot", "cold"), ("happy", "sad"), ("old", "young"), ("fast", "slow"),
            ("tall", "short"), ("rich", "poor"), ("kind", "cruel"), ("clean", "dirty"), ("loud", "quiet"),
            ("wet", "dry"), ("strong", "weak"))
SYNONYMS = (("big", "large"), ("small", "little"), ("happy", "glad"), ("fast", "quick"), ("rich", "wealthy"),
            ("quiet", "silent"), ("kind", "gentle"), ("sad", "unhappy"), ("wet", "damp"), ("cold", "chilly"),
            ("tired", "sleepy"), ("scared", "afraid"))
OPPOSITE = {a: b for pair in ANTONYMS for a, b in (pair, pair[::-1])}
SYNONYM = {a: b for pair in SYNONYMS for a, b in (pair, pair[::-1])}
ADJECTIVES = tuple(sorted(set(OPPOSITE) | set(SYNONYM)))
PLACES = ("park", "market", "river", "farm", "school", "garden", "forest", "village", "beach", "castle", "station",
          "library")
FOODS = ("bread", "soup", "rice", "fish", "cheese", "apples", "cake", "eggs", "beans", "pie", "salad", "honey",
         "plums", "nuts")
AREAS = ("north", "south", "east", "west", "centre")
COLOURS = ("red", "blue", "green", "black", "white", "golden", "yellow", "grey")
# word -> (sentences using sense 0, sentences using sense 1); a context word names the sense
HOMONYMS = {
    "bank": (("{n} sat on the bank of the river.", "{n} fished from the muddy bank.", "{n} walked along the bank near the water."),
            ("{n} put money in the bank.", "{n} got a loan from the bank.", "{n} saved coins at the bank.")),
    "bat": (("{n} saw a bat fly at night.", "a bat slept in the cave near {n}.", "{n} heard a bat squeak in the dark."),
           ("{n} hit the ball with a bat.", "{n} bought a wooden bat for the game.", "{n} swung the bat hard.")),
    "bark": (("{n} heard the dog bark.", "the loud bark of the dog woke {n}.", "{n} taught the puppy to bark."),
            ("{n} touched the rough bark of the tree.", "{n} peeled the bark off a branch.", "the bark of the oak was brown, said {n}.")),
    "light": (("the box was light enough for {n} to carry.", "{n} packed a light bag.", "{n} lifted the light basket."),
             ("{n} turned on the light.", "the light in the room was bright, so {n} read.", "{n} saw a light in the window.")),
    "ring": (("{n} wore a gold ring.", "{n} lost the ring at the beach.", "{n} gave a silver ring to a friend."),
            ("{n} heard the bell ring.", "{n} waited for the phone to ring.", "the ring of the bell made {n} jump.")),
    "match": (("{n} lit a match.", "{n} struck a match in the dark.", "{n} used a match to start the fire."),
             ("{n} won the match.", "{n} watched the football match.", "the match ended late, so {n} went home.")),
    "seal": (("{n} saw a seal swim.", "a seal rested on the rocks near {n}.", "{n} fed fish to the seal."),
            ("{n} broke the seal on the letter.", "{n} put a wax seal on the box.", "the seal on the jar was tight, said {n}.")),
    "date": (("{n} ate a sweet date.", "{n} picked a date from the palm.", "{n} shared a dried date with a friend."),
            ("{n} forgot the date of the party.", "{n} wrote the date on the page.", "{n} asked about the date of the trip.")),
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


def benchmark(seed: int = 0, n_train: int = 300, n_test: int = 200) -> FedData:
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


# ----------------------------------------------------------------------------------------------
# The pretraining corpus. Mostly plain sentences that teach the words and facts the tasks rely on
# (genders, antonyms, synonyms, agreement, question words, word senses, lists with commas,
# restaurants), never in a task's format: no "X bought a, b and c at the P." and no "X serves ...".
# Beside them, 45% of the documents: instruction-formatted examples of every task, drawn from streams
# of their own and never equal to a benchmark record (corpus() says why).
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


def corpus(seed: int = 0, n_docs: int = 4500, task_fraction: float = 0.45) -> list[str]:
    """Documents to pretrain the foundation model on (about 770 KB by default), shuffled: short
    paragraphs of toy English, and a task_fraction of instruction-formatted examples, the same number
    of each task, each its own document: the paper's prompt (data.format_prompt), then the answer.

    Why the examples: FedDPA fine-tunes a foundation model that can already follow instructions in
    part (a LLaMA in the paper), and its clients' tasks share that skill: read the prompt, answer with one of the options or a short sentence built
    from the input, then stop. A base that knows only the language starts every task from nothing,
    and a global adapter then has no shared skill to build on. The examples model the broad
    instruction tuning a real base has had before federated fine-tuning.

    They come from streams of their own (random.Random(f"corpus/{seed}/{category}")), and any whose
    instruction, or answer of more than two words, equals one in benchmark(seed) is skipped: no
    record that a run of this seed trains or tests on is in its base's corpus."""
    rng = random.Random(f"corpus/{seed}")
    per_task = round(n_docs * task_fraction / len(TASKS))
    docs = [" ".join(_corpus_sentence(rng) for _ in range(rng.randint(3, 6)))
            for _ in range(n_docs - per_task * len(TASKS))]
    docs += [data.format_prompt(r) + r["output"] for r in task_examples(seed, per_task)]
    rng.shuffle(docs)
    return docs


def task_examples(seed: int, per_task: int) -> list[dict]:
    """per_task records of each task for the corpus, none equal to a train or test record of benchmark(seed)."""
    fd = benchmark(seed)
    held = [r for recs in [*fd.clients, *fd.tests.values()] for r in recs]
    held_out = {r["instruction"] for r in held} | {r["output"] for r in held if len(r["output"].split()) > 2}
    records = []
    for category, task, make in TASKS:
        rng = random.Random(f"corpus/{seed}/{category}")
        examples = [(i, o) for i, o in _distinct_examples(make, rng, 2 * per_task, task)
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
