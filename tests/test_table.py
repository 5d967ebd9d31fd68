"""extras.table: the paper-shaped tables' cells against hand-computed values and against a recomputation
from the CSV rows, the Average column against results.json's P and TTP on the carried studies, the
paper's column order, the ablation table, and bad input in one line."""
import csv
import io
import json
import re
import statistics
import subprocess
import sys

import pytest

from conftest import ROOT
from extras import table

STUDIES = sorted((ROOT / "docs" / "study").iterdir())
# The paper's Table 1 (FLAN set 1), column by column, as the paper prints it
PAPER_SET1 = {"Paraphrase": "paraphrase", "Entailment": "entailment", "Structure to Text": "structure_to_text",
              "Text Formatting": "text_formatting", "Linguistic Acceptability": "linguistic_acceptability",
              "Word Disambiguation": "word_disambiguation", "Coreference": "coreference",
              "Question Classification": "question_classification"}
# FLAN set 2 in the order its test file (flan_test_200_selected_nstrict_1.jsonl) first names the tasks
DATA_SET2 = ["common_sense", "paraphrase", "entailment", "reading_comprehension", "text_formatting", "open_domain_qa",
             "summarization", "sentiment"]


def score(rouge1: float) -> dict:
    """One client's scores on one task; rougeL and exact differ from rouge1 so that a wrong metric shows."""
    return {"rouge1": rouge1, "rougeL": rouge1 / 2, "exact": rouge1 / 4, "rouge1_each": [rouge1]}


def write_run(d, seed: int, per_client: list, *, unseen: list | None = None, **config) -> str:
    """A results.json of one seed: method "m" with the given per-client ROUGE-1 (a {task: value} per
    client), clients 0 and 1 owning b_task and a_task."""
    owners = ["b_task", "a_task"]
    rows = [{t: score(v) for t, v in c.items()} for c in per_client]
    res = {"config": {"seed": seed, "seeds": "", "k_refs": 5, "pool": "last", "out": str(d), "device": "cpu",
                      "plain": False, "test_data": "", **config},
           "client_tasks": owners, "methods": {"m": {"P": None, "TTP": None, "per_client": rows}}}
    if unseen:
        res["unseen"] = {"m": {"TTP": None, "per_client": [{t: score(v) for t, v in c.items()} for c in unseen]}}
    d.mkdir(parents=True, exist_ok=True)
    (d / "results.json").write_text(json.dumps(res))
    return str(d)


# The hand-computed example: client 0 owns b_task, client 1 a_task; two seeds
SEED0 = [{"b_task": 40, "a_task": 10}, {"b_task": 20, "a_task": 30}]  # P: b 40, a 30, avg 35; TTP: b 30, a 20, avg 25
SEED1 = [{"b_task": 50, "a_task": 20}, {"b_task": 30, "a_task": 52}]  # P: b 50, a 52, avg 51; TTP: b 40, a 36, avg 38


def cells(text: str) -> list:
    """The printed text table's rows, split into cells (columns are two or more spaces apart)."""
    return [re.split(r"\s{2,}", line.strip()) for line in text.splitlines()[1:]]


def test_cells_by_hand_over_two_seeds(tmp_path, capsys):
    runs = [write_run(tmp_path / f"s{seed}", seed, per_client) for seed, per_client in ((0, SEED0), (1, SEED1))]
    assert table.main(runs) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("ROUGE-1 F1 (%), mean ± std over seeds 0, 1; P: a task's own clients, "
                                        "TTP: every client")
    # columns in the order results.json lists the tasks; std with ddof=1 (40, 50: 7.1, where ddof=0 gives 5.0)
    assert cells(out) == [["method", "b_task", "a_task", "Average"],
                          ["m", "P", "45.0 ± 7.1", "41.0 ± 15.6", "43.0 ± 11.3"],
                          ["TTP", "35.0 ± 7.1", "28.0 ± 11.3", "31.5 ± 9.2"]]


def test_one_seed_has_no_std_and_every_run_folder_form_reads_alike(tmp_path, capsys):
    assert table.main([write_run(tmp_path / "one", 0, SEED0), "--metric", "rougeL"]) == 0  # rouge1 / 2
    assert cells(capsys.readouterr().out)[1:] == [["m", "P", "20.0", "15.0", "17.5"], ["TTP", "15.0", "10.0", "12.5"]]
    # --seeds' summary (per_seed) and a carried study (config.json, seed<N>/results.json) give the two
    # seeds' table of test_cells_by_hand_over_two_seeds
    per_seed = {}
    for seed, per_client in ((0, SEED0), (1, SEED1)):
        write_run(tmp_path / "study" / f"seed{seed}", seed, per_client, out="study")
        per_seed[str(seed)] = json.loads((tmp_path / "study" / f"seed{seed}" / "results.json").read_text())
    config = {**per_seed["0"]["config"], "seeds": "0,1"}
    (tmp_path / "study" / "config.json").write_text(json.dumps(config))
    (tmp_path / "summary").mkdir()
    (tmp_path / "summary" / "results.json").write_text(json.dumps({"config": config, "per_seed": per_seed}))
    for run in ("study", "summary"):
        assert table.main([str(tmp_path / run)]) == 0
        assert cells(capsys.readouterr().out)[1:] == [["m", "P", "45.0 ± 7.1", "41.0 ± 15.6", "43.0 ± 11.3"],
                                                      ["TTP", "35.0 ± 7.1", "28.0 ± 11.3", "31.5 ± 9.2"]]


def test_markdown_and_latex(tmp_path, capsys):
    runs = [write_run(tmp_path / f"s{seed}", seed, per_client) for seed, per_client in ((0, SEED0), (1, SEED1))]
    assert table.main([*runs, "--format", "md"]) == 0
    assert capsys.readouterr().out.splitlines()[2:] == [
        "| method |  | b_task | a_task | Average |", "|---|---|---:|---:|---:|",
        "| m | P | 45.0 ± 7.1 | 41.0 ± 15.6 | 43.0 ± 11.3 |", "|  | TTP | 35.0 ± 7.1 | 28.0 ± 11.3 | 31.5 ± 9.2 |"]
    assert table.main([*runs, "--format", "tex"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        r"\begin{tabular}{llrrr}", r"\toprule", r"method &  & b\_task & a\_task & Average \\", r"\midrule",
        r"m & P & 45.0 $\pm$ 7.1 & 41.0 $\pm$ 15.6 & 43.0 $\pm$ 11.3 \\",
        r" & TTP & 35.0 $\pm$ 7.1 & 28.0 $\pm$ 11.3 & 31.5 $\pm$ 9.2 \\", r"\bottomrule", r"\end{tabular}"]


def test_unseen_tasks_avg_and_max_over_clients(tmp_path, capsys):
    # client 0's means over the unseen tasks 20, client 1's 35: AVG's Average 27.5, MAX's 35
    unseen = [{"x_task": 10, "a_task": 30}, {"x_task": 50, "a_task": 20}]
    assert table.main([write_run(tmp_path, 0, SEED0, unseen=unseen, test_data="other")]) == 0
    out = capsys.readouterr().out.split("\n\n")[1]
    assert out.splitlines()[0].endswith(": unseen tasks (other), ROUGE-1 F1 (%), seed 0; AVG and MAX over clients")
    assert cells(out) == [["method", "x_task", "a_task", "Average"], ["m", "AVG", "30.0", "25.0", "27.5"],
                          ["MAX", "50.0", "30.0", "35.0"]]


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.name)
def test_average_is_results_json_s_p_and_ttp(study):
    """On every carried study, each seed's Average column is what train.py wrote as P and TTP (ROUGE-1 and
    exact match), and on unseen tasks AVG's is the unseen TTP."""
    seeds = table.read_run(str(study))
    assert len(seeds) == 3
    for s in seeds:
        for metric, suffix in (("rouge1", ""), ("exact", "_exact")):
            rows = table.scores_table([s], metric).rows
            for (labels, values), (_, ttp_values) in zip(rows[::2], rows[1::2]):
                stored = s.results["methods"][labels[0]]
                assert values[-1][0] == pytest.approx(stored["P" + suffix], abs=1e-9)
                assert ttp_values[-1][0] == pytest.approx(stored["TTP" + suffix], abs=1e-9)
            if "unseen" in s.results:
                for labels, values in table.unseen_table([s], metric).rows[::2]:
                    assert values[-1][0] == pytest.approx(s.results["unseen"][labels[0]]["TTP" + suffix], abs=1e-9)


def test_paper_column_order():
    flan1, flan2 = (table.read_run(str(ROOT / "docs" / "study" / name)) for name in ("flan1-smollm2", "flan2-smollm2"))
    assert table.scores_table(flan1, "rouge1").columns == [*PAPER_SET1, "Average"]
    assert table.scores_table(flan2, "rouge1").columns == [*DATA_SET2, "Average"]
    unseen = table.read_run(str(ROOT / "docs" / "study" / "flan1-to-flan2-smollm2"))
    assert table.unseen_table(unseen, "rouge1").columns == [*DATA_SET2, "Average"]


def rows_of(run: str, capsys, *flags) -> list:
    assert table.main([run, "--format", "csv", *flags]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == "run,seed,method,client,task,metric,value"
    return list(csv.DictReader(io.StringIO(text)))


@pytest.mark.parametrize("metric", ["rouge1", "exact"])
def test_the_text_table_recomputed_from_the_csv(metric, capsys):
    """Every printed cell of a carried study with unseen tasks, recomputed from the CSV rows (and each
    client's own task from results.json): P, TTP, AVG and MAX per task and their averages, mean and
    sample std over seeds."""
    run = str(ROOT / "docs" / "study" / "flan1-to-flan2-smollm2")
    rows = rows_of(run, capsys)
    keys = [(r["run"], r["seed"], r["method"], r["client"], r["task"], r["metric"]) for r in rows]
    assert len(set(keys)) == len(keys) == 3 * 7 * 8 * (8 + 8) * 3  # seeds, methods, clients, tasks, metrics
    assert {r["metric"] for r in rows} == {"rouge1", "rougeL", "exact"}
    owners = {seed: json.loads((ROOT / run / f"seed{seed}" / "results.json").read_text())["client_tasks"]
              for seed in {r["seed"] for r in rows}}
    value = {(r["seed"], r["method"], int(r["client"]), r["task"]): float(r["value"])
             for r in rows if r["metric"] == metric}
    seeds, methods = sorted(owners), list(dict.fromkeys(r["method"] for r in rows))
    clients = range(8)
    own = [list(PAPER_SET1.values()), [f"unseen:{t}" for t in DATA_SET2]]  # the clients' tasks, the unseen ones

    def cell(per_seed: list) -> tuple:
        return statistics.mean(per_seed), statistics.stdev(per_seed)

    def client_mean(seed, method, c, tasks):
        return statistics.mean(value[seed, method, c, t] for t in tasks)

    assert table.main([run, "--metric", metric]) == 0
    seen, unseen = capsys.readouterr().out.split("\n\n")
    printed = {}
    for text, kinds in ((seen, ("P", "TTP")), (unseen, ("AVG", "MAX"))):
        grid = cells(text)
        heads = [PAPER_SET1.get(h, h) for h in grid[0][1:]]
        for labels, kind in zip(grid[1:], kinds * len(methods)):
            method = labels[0] if kind in ("P", "AVG") else method
            assert labels[1 if kind in ("P", "AVG") else 0] == kind
            for head, x in zip(heads, labels[-len(heads):]):
                m, sd = x.split(" ± ")
                printed[method, kind, head] = float(m), float(sd)
    for method in methods:
        for t in own[0]:
            want = {"P": cell([statistics.mean(value[s, method, c, t] for c in clients if owners[s][c] == t)
                               for s in seeds]),
                    "TTP": cell([statistics.mean(value[s, method, c, t] for c in clients) for s in seeds])}
            for kind in want:
                assert printed[method, kind, t] == pytest.approx(want[kind], abs=0.05 + 1e-9), (method, kind, t)
        for t in DATA_SET2:
            want = {"AVG": cell([statistics.mean(value[s, method, c, f"unseen:{t}"] for c in clients) for s in seeds]),
                    "MAX": cell([max(value[s, method, c, f"unseen:{t}"] for c in clients) for s in seeds])}
            for kind in want:
                assert printed[method, kind, t] == pytest.approx(want[kind], abs=0.05 + 1e-9), (method, kind, t)
        averages = {"P": cell([statistics.mean(value[s, method, c, owners[s][c]] for c in clients) for s in seeds]),
                    "TTP": cell([statistics.mean(client_mean(s, method, c, own[0]) for c in clients) for s in seeds]),
                    "AVG": cell([statistics.mean(client_mean(s, method, c, own[1]) for c in clients) for s in seeds]),
                    "MAX": cell([max(client_mean(s, method, c, own[1]) for c in clients) for s in seeds])}
        for kind, want in averages.items():
            assert printed[method, kind, "Average"] == pytest.approx(want, abs=0.05 + 1e-9), (method, kind)


def test_by_joins_runs_that_differ_in_one_setting(tmp_path, capsys):
    plus = [[{t: v + 10 for t, v in c.items()} for c in SEED0], [{t: v + 10 for t, v in c.items()} for c in SEED1]]
    runs = [write_run(tmp_path / f"k{k}s{seed}", seed, per_client, k_refs=k, device=device)  # device: may differ
            for k, per_seed, device in ((5, plus, "cuda"), (3, [SEED0, SEED1], "cpu"))
            for seed, per_client in enumerate(per_seed)]
    assert table.main([*runs, "--by", "k-refs"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("ROUGE-1 F1 (%) by k_refs, mean ± std over each row's seeds")
    # rows in the order the runs were given; P and TTP as test_cells_by_hand_over_two_seeds's averages
    assert cells(out) == [["k_refs", "seeds", "m P", "m TTP"], ["5", "0,1", "53.0 ± 11.3", "41.5 ± 9.2"],
                          ["3", "0,1", "43.0 ± 11.3", "31.5 ± 9.2"]]
    assert table.main([*runs, "--by", "k_refs", "--format", "csv"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + 4 * 2 * 2 * 3  # runs, clients, tasks, metrics


def error_of(argv: list, capsys) -> str:
    assert table.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


def test_runs_that_differ_elsewhere_are_refused_in_one_line(tmp_path, capsys):
    a = write_run(tmp_path / "a", 0, SEED0)
    b = write_run(tmp_path / "b", 1, SEED1, k_refs=3)
    c = write_run(tmp_path / "c", 1, SEED1, k_refs=3, pool="mean")
    assert error_of([a, b], capsys) == (f"error: {b}/results.json: differs from {a}/results.json in k_refs; "
                                        "--by k_refs joins runs that differ in it\n")
    assert error_of([a, c, "--by", "k_refs"], capsys) == f"error: {c}/results.json: differs from {a}/results.json in pool\n"
    assert error_of([a, write_run(tmp_path / "a2", 0, SEED1)], capsys).endswith(
        f"seed 0 is given twice (by {a} and {tmp_path / 'a2'})\n")


def test_bad_input_is_one_line(tmp_path, capsys):
    good = write_run(tmp_path / "good", 0, SEED0)
    (tmp_path / "empty").mkdir()
    assert error_of([str(tmp_path / "empty")], capsys) == (
        f"error: {tmp_path / 'empty' / 'results.json'}: no such file (not a finished run's folder)\n")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text('{"config": ')
    assert error_of([str(tmp_path / "broken")], capsys).startswith(f"error: {tmp_path / 'broken' / 'results.json'}: not JSON")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "results.json").write_text(json.dumps({"config": {"seed": 0}, "client_tasks": []}))
    assert error_of([str(tmp_path / "partial")], capsys) == (
        f"error: {tmp_path / 'partial' / 'results.json'}: not the results of a finished run (KeyError: 'methods')\n")
    wrong = json.loads((tmp_path / "good" / "results.json").read_text())
    wrong["methods"]["m"]["per_client"][1]["a_task"]["exact"] = "7.5"
    (tmp_path / "partial" / "results.json").write_text(json.dumps(wrong))
    assert error_of([str(tmp_path / "partial")], capsys) == (f"error: {tmp_path / 'partial' / 'results.json'}: not the "
                                                             "results of a finished run (a seed, a client's scores or a "
                                                             "score of the wrong kind)\n")
    assert error_of([good, "--by", "k_ref"], capsys).startswith(
        f"error: {good}/results.json: --by k_ref: not a setting of its config that runs may differ in (one of k_refs, ")
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "config.json").write_text(json.dumps({"seed": 0, "seeds": "0,1"}))
    assert "seed0/results.json: not a finished seed's results" in error_of([str(tmp_path / "study")], capsys)
    # a carried study's seed run with other settings than its config.json's
    config = {**json.loads((tmp_path / "good" / "results.json").read_text())["config"], "seeds": "0", "k_refs": 3}
    (tmp_path / "good" / "config.json").write_text(json.dumps(config))
    (tmp_path / "good" / "seed0").mkdir()
    (tmp_path / "good" / "results.json").rename(tmp_path / "good" / "seed0" / "results.json")
    assert error_of([good], capsys) == (f"error: {good}/seed0/results.json: a seed of another study: its k_refs is 5, "
                                        "this study's 3\n")
    r = subprocess.run([sys.executable, "-m", "extras.table", str(tmp_path / "empty")], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stdout == ""
