"""Issue 38's inference ablations, each against the study whose adapters it re-scored: paired intervals.

    python tools/ablations.py BASE STUDY [STUDY ...]

BASE: a finished study (train.py --seeds, or a carried one in docs/study/); each STUDY: a re-scoring of
BASE's adapters (train.py --rescore BASE) with one inference setting changed (--k-refs, --similarity,
--pool). For each STUDY, each method it scored and P and TTP: the method's score minus BASE's same
method, paired over the same seeds, clients and test instances (evaluation.paired_difference: 95%
bootstrap interval over test instances, each seed's difference) with runs.verdict's reading, the
cells runs.print_differences prints. A line:

    k_refs 1 (5)   feddpa-t   P   -1.2  [ -2.0,  -0.4]  below      -1.0 -1.5 -1.1

Not here: the tables of each study's scores (train.py --resume STUDY prints them; extras.table).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import evaluation  # noqa: E402
import runs  # noqa: E402
from extras import table  # noqa: E402

# settings in which a re-scoring differs from the study it re-scores without being the ablation
NOT_THE_ABLATION = (*table.FREE, "methods", "eval_every", "curve_methods")


def changed(base: dict, study: dict, where: str) -> str:
    """The one inference setting in which study's config differs from base's, as 'name value (base value)'."""
    keys = [k for k in sorted(set(base) | set(study)) if k not in NOT_THE_ABLATION and base.get(k) != study.get(k)]
    if len(keys) != 1:
        raise runs.UserError(f"{where}: differs from the base study in {', '.join(keys) or 'nothing'}, not in one setting")
    return f"{keys[0]} {study.get(keys[0])} ({base.get(keys[0])})"


def compare(base: list, study: list, where: str) -> list:
    """(setting, method, metric, paired difference) for every method of study, on P and TTP."""
    if [s.seed for s in study] != [s.seed for s in base]:
        raise runs.UserError(f"{where}: seeds {[s.seed for s in study]}, the base study's {[s.seed for s in base]}")
    setting = changed(base[0].results["config"], study[0].results["config"], where)
    out = []
    for method in study[0].results["methods"]:
        if method not in base[0].results["methods"]:
            raise runs.UserError(f"{where}: {method} is not among the base study's methods")
        rows = [[s.results["methods"][method]["per_client"] for s in seeds] for seeds in (study, base)]
        for metric in ("P", "TTP"):
            d = evaluation.paired_difference(*rows, client_tasks=[s.results["client_tasks"] for s in base], metric=metric)
            out.append((setting, method, metric, d))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", help="the study whose adapters were re-scored")
    ap.add_argument("studies", nargs="+", metavar="STUDY", help="a re-scoring of BASE with one inference setting changed")
    args = ap.parse_args(argv)
    try:
        base = table.read_run(args.base)
        lines = [line for s in args.studies for line in compare(base, table.read_run(s), s)]
    except runs.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"re-scored minus the base study {runs.DIFFERENCE_COLUMNS}")
    for setting, method, metric, d in lines:
        print(f"{setting:<28}{method:<22}{metric:>4} " + runs.difference_cells(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
