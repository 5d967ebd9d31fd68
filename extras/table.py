"""Tables in the paper's shape from finished runs: python -m extras.table RUN [RUN ...]

    text, md, tex   per method a P row and a TTP row, one column per task and an Average column, each
                    cell the mean ± std over seeds (std only with two seeds or more):
                      P    the task's column: the mean over the clients whose own task it is of their
                           score on it; Average: the method's P (evaluation.p_and_ttp)
                      TTP  the task's column: the mean over every client of its score on it; Average:
                           the method's TTP (each client's mean over the tasks, averaged over clients)
                    and, where the runs had --test-data, a second table: per method an AVG and a MAX
                    row over clients, one column per unseen task, Average: each client's mean over
                    the unseen tasks, averaged (AVG, the unseen TTP) or its maximum over clients (MAX)
    csv             one row per (run, seed, method, client, task, metric, value), every metric of
                    results.json's per_client (rouge1, rougeL, exact); the unseen tasks' rows name
                    their task "unseen:<task>", since a data set's task names may recur among the
                    unseen ones (set 1 and set 2 both hold paraphrase, entailment, text_formatting)
    --by FLAG       runs that differ in one setting (a key of results.json's "config": k_refs, pool,
                    local_weight, ...) joined into one ablation table: a row per value, P and TTP
                    columns per method, mean ± std over that value's seeds

RUN is a run folder: train.py --out's results.json (one seed, or --seeds' summary with every seed's
results), or a carried study (config.json with its seeds and seed<N>/results.json, as in docs/study/).
The runs given are the seeds of one study (they must not differ but in seed, output folder, device and
--plain), or with --by, of an ablation (they must not differ but in FLAG too). Bad input is one line.

Column order: FLAN set 1 as the paper's Table 1 has it, under its headers; FLAN set 2 in the data's own
order (the order in which its test file first names the tasks: the paper's order for set 2 could not be
established from the official code or README); any other set in the order results.json lists them.

Not here: figures (extras.plot) and the paired bootstrap intervals (runs.py's seed summary).
"""
import argparse
import csv
import json
import os
import sys
from dataclasses import dataclass

import evaluation
import runs
from runs import UserError

METRICS = {"rouge1": "ROUGE-1 F1", "rougeL": "ROUGE-L F1", "exact": "exact match"}
# The paper's Table 1 (FLAN set 1): its column order and headers
FLAN1 = {"paraphrase": "Paraphrase", "entailment": "Entailment", "structure_to_text": "Structure to Text",
         "text_formatting": "Text Formatting", "linguistic_acceptability": "Linguistic Acceptability",
         "word_disambiguation": "Word Disambiguation", "coreference": "Coreference",
         "question_classification": "Question Classification"}
FLAN2 = ["common_sense", "paraphrase", "entailment", "reading_comprehension", "text_formatting", "open_domain_qa",
         "summarization", "sentiment"]
FREE = (*runs.SEED_FREE, "seed", "seeds")  # settings in which the seeds of one study may differ


@dataclass
class Seed:
    """One seed's results.json, and where it came from."""
    run: str      # the RUN given on the command line
    seed: int
    path: str     # the file that holds it, for error lines
    results: dict


@dataclass
class Table:
    """What a format prints: label columns, then number columns whose cells are per-seed values."""
    title: str
    labels: list    # headers of the label columns
    columns: list   # headers of the number columns
    rows: list      # (labels, [per-seed values of each number column; empty where there is none])


# ----------------------------------------------------------------------------------------------
# Reading runs

def load(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror})") from None
    except ValueError as e:
        raise UserError(f"{path}: not JSON ({e})") from None


def checked(res: dict, path: str) -> dict:
    """res, refused in one line unless it holds what the tables read: the config, each client's own task
    and every method's per-client scores of every metric."""
    try:
        whole = isinstance(res["config"]["seed"], int) and all(
            len(r["per_client"]) == len(res["client_tasks"])
            and all(isinstance(s[m], (int, float)) for scores in r["per_client"] for s in scores.values() for m in METRICS)
            for r in [*res["methods"].values(), *res.get("unseen", {}).values()])
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: not the results of a finished run ({type(e).__name__}: {e})") from None
    if not whole:
        raise UserError(f"{path}: not the results of a finished run (a seed, a client's scores or a score of the wrong kind)")
    return res


def read_run(run: str) -> list:
    """Every seed of a run folder: its results.json, one seed or --seeds' summary (per_seed), or a carried
    study's config.json and seed<N>/results.json."""
    path = os.path.join(run, "results.json")
    if os.path.isfile(path):
        res = load(path)
        if isinstance(res, dict) and "per_seed" in res:
            return [Seed(run, int(seed), path, checked(r, path)) for seed, r in res["per_seed"].items()]
        return [Seed(run, checked(res, path)["config"]["seed"], path, res)]
    study = os.path.join(run, "config.json")
    config = load(study) if os.path.isfile(study) else {}
    if not (isinstance(config, dict) and config.get("seeds")):
        raise UserError(f"{path}: no such file (not a finished run's folder)")
    try:
        numbers = [int(seed) for seed in config["seeds"].split(",")]
    except (ValueError, AttributeError):
        raise UserError(f"{study}: seeds {config['seeds']!r} are not comma-separated integers") from None
    seeds = []
    for seed in numbers:
        p = os.path.join(run, f"seed{seed}", "results.json")
        seeds.append(Seed(run, seed, p, checked(runs.read_seed(p, {**config, "seed": seed, "seeds": ""}), p)))
    return seeds


def group(seeds: list, by: str | None) -> dict:
    """{value of by (None without --by): its seeds in seed order}, refused in one line where two seeds
    differ in any other setting or one value holds a seed twice."""
    first = seeds[0]
    if by is not None and (by not in first.results["config"] or by in FREE):
        free = [k for k in first.results["config"] if k not in FREE]
        raise UserError(f"{first.path}: --by {by}: not a setting of its config that runs may differ in (one of "
                        f"{', '.join(free)})")
    groups = {}
    for s in seeds:
        a, b = first.results["config"], s.results["config"]
        differ = [k for k in dict.fromkeys([*a, *b]) if k not in FREE and k != by and a.get(k) != b.get(k)]
        if differ:
            hint = f"; --by {differ[0]} joins runs that differ in it" if not by and len(differ) == 1 else ""
            raise UserError(f"{s.path}: differs from {first.path} in {', '.join(differ)}{hint}")
        key = b.get(by) if by else None
        same = [t for t in groups.get(key, []) if t.seed == s.seed]
        if same:
            raise UserError(f"{s.path}: seed {s.seed} is given twice (by {same[0].run} and {s.run})")
        groups.setdefault(key, []).append(s)
    return {key: sorted(g, key=lambda s: s.seed) for key, g in groups.items()}


# ----------------------------------------------------------------------------------------------
# The tables

def task_order(tasks: list) -> list:
    """The paper's order for FLAN set 1, the data's for set 2, else as given."""
    for order in (list(FLAN1), FLAN2):
        if set(tasks) == set(order):
            return order
    return tasks


def mean(xs: list) -> float:
    return sum(xs) / len(xs)


def names(seeds: list) -> str:
    return ", ".join(dict.fromkeys(s.run for s in seeds))


def over_seeds(seeds: list) -> str:
    return f"mean ± std over seeds {', '.join(str(s.seed) for s in seeds)}" if len(seeds) > 1 else f"seed {seeds[0].seed}"


def scores_table(seeds: list, metric: str) -> Table:
    """Methods × tasks: a P row and a TTP row per method (the module's docstring says what each cell is)."""
    tasks = task_order(list(dict.fromkeys(t for s in seeds for r in s.results["methods"].values()
                                          for scores in r["per_client"] for t in scores)))
    rows = []
    for method in dict.fromkeys(m for s in seeds for m in s.results["methods"]):
        mine = [(s.results["methods"][method]["per_client"], s.results["client_tasks"]) for s in seeds
                if method in s.results["methods"]]
        p, ttp = [], []
        for t in tasks:
            own = ([c[t][metric] for c, o in zip(per_client, owners) if o == t] for per_client, owners in mine)
            p.append([mean(x) for x in own if x])  # a seed where no client's own task is t has no P on t
            ttp.append([mean([c[t][metric] for c in per_client]) for per_client, _ in mine])
        both = [evaluation.p_and_ttp(per_client, owners, metric) for per_client, owners in mine]
        rows.append(([method, "P"], p + [[x["P"] for x in both]]))
        rows.append((["", "TTP"], ttp + [[x["TTP"] for x in both]]))
    return Table(f"{names(seeds)}: {METRICS[metric]} (%), {over_seeds(seeds)}; P: a task's own clients, TTP: every client",
                 ["method", ""], [FLAN1.get(t, t) if tasks == list(FLAN1) else t for t in tasks] + ["Average"], rows)


def unseen_table(seeds: list, metric: str) -> Table:
    """Methods × unseen tasks: an AVG and a MAX row over clients per method."""
    tasks = task_order(list(dict.fromkeys(t for s in seeds for r in s.results["unseen"].values()
                                          for scores in r["per_client"] for t in scores)))
    rows = []
    for method in dict.fromkeys(m for s in seeds for m in s.results["unseen"]):
        mine = [s.results["unseen"][method]["per_client"] for s in seeds if method in s.results["unseen"]]
        each = [[mean([c[t][metric] for t in tasks]) for c in per_client] for per_client in mine]  # client's mean
        for name, agg in (("AVG", mean), ("MAX", max)):
            rows.append(([method if name == "AVG" else "", name],
                         [[agg([c[t][metric] for c in per_client]) for per_client in mine] for t in tasks]
                         + [[agg(e) for e in each]]))
    test_data = seeds[0].results["config"].get("test_data")
    return Table(f"{names(seeds)}: unseen tasks ({test_data}), {METRICS[metric]} (%), {over_seeds(seeds)}; "
                 "AVG and MAX over clients", ["method", ""], tasks + ["Average"], rows)


def ablation_table(groups: dict, by: str, metric: str) -> Table:
    """A row per value of by: P and TTP of every method, mean ± std over that value's seeds."""
    methods = list(dict.fromkeys(m for g in groups.values() for s in g for m in s.results["methods"]))
    rows = []
    for value, seeds in groups.items():
        both = {m: [evaluation.p_and_ttp(s.results["methods"][m]["per_client"], s.results["client_tasks"], metric)
                    for s in seeds if m in s.results["methods"]] for m in methods}
        rows.append(([str(value), ",".join(str(s.seed) for s in seeds)],
                     [[x[k] for x in both[m]] for m in methods for k in ("P", "TTP")]))
    return Table(f"{names([s for g in groups.values() for s in g])}: {METRICS[metric]} (%) by {by}, mean ± std over "
                 "each row's seeds", [by, "seeds"], [f"{m} {k}" for m in methods for k in ("P", "TTP")], rows)


def csv_rows(seeds: list):
    """(run, seed, method, client, task, metric, value) for every score of every seed."""
    for s in seeds:
        for key, prefix in (("methods", ""), ("unseen", "unseen:")):
            for method, r in s.results.get(key, {}).items():
                for client, scores in enumerate(r["per_client"]):
                    for task, score in scores.items():
                        for metric in METRICS:
                            yield s.run, s.seed, method, client, prefix + task, metric, score[metric]


# ----------------------------------------------------------------------------------------------
# Formats

def cell(values: list, fmt: str) -> str:
    if not values:
        return "-"
    m, sd = runs.mean_std(values)
    return f"{m:.1f}" if len(values) == 1 else f"{m:.1f} $\\pm$ {sd:.1f}" if fmt == "tex" else f"{m:.1f} ± {sd:.1f}"


def tex_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "&%$#_{}" else ch for ch in text)


def render(table: Table, fmt: str) -> str:
    n = len(table.labels)
    head = table.labels + table.columns
    body = [labels + [cell(v, fmt) for v in values] for labels, values in table.rows]
    if fmt == "md":
        return "\n".join([table.title, "", "| " + " | ".join(head) + " |",
                          "|" + "|".join(["---"] * n + ["---:"] * len(table.columns)) + "|",
                          *("| " + " | ".join(row) + " |" for row in body)])
    if fmt == "tex":
        return "\n".join([f"% {table.title}", f"\\begin{{tabular}}{{{'l' * n}{'r' * len(table.columns)}}}", "\\toprule",
                          " & ".join(map(tex_escape, head)) + " \\\\", "\\midrule",
                          *(" & ".join(tex_escape(x) for x in row[:n]) + " & " + " & ".join(row[n:]) + " \\\\"
                            for row in body),
                          "\\bottomrule", "\\end{tabular}"])
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    return "\n".join([table.title, *("  ".join(x.ljust(w) if i < n else x.rjust(w)
                                               for i, (x, w) in enumerate(zip(row, widths))).rstrip()
                                     for row in [head, *body])])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", metavar="RUN", help="a finished run's folder (train.py --out) or a carried study")
    ap.add_argument("--format", choices=("text", "md", "csv", "tex"), default="text")
    ap.add_argument("--metric", choices=list(METRICS), default="rouge1", help="the score the tables show")
    ap.add_argument("--by", metavar="FLAG", help="join runs that differ in this setting (k_refs, pool, ...) into one "
                                                 "ablation table")
    args = ap.parse_args(argv)
    by = args.by.replace("-", "_") if args.by else None  # the flag as typed (--k-refs) or as the config names it
    try:
        seeds = [s for run in args.runs for s in read_run(run)]
        groups = group(seeds, by)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.format == "csv":
        out = csv.writer(sys.stdout, lineterminator="\n")
        out.writerow(["run", "seed", "method", "client", "task", "metric", "value"])
        out.writerows(row for g in groups.values() for row in csv_rows(g))
        return 0
    if by:
        tables = [ablation_table(groups, by, args.metric)]
    else:
        tables = [scores_table(groups[None], args.metric)]
        if all("unseen" in s.results for s in groups[None]):
            tables.append(unseen_table(groups[None], args.metric))
    print("\n\n".join(render(t, args.format) for t in tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
