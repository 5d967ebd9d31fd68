"""What client-level DP-FedAvg costs each method: the studies tools/privacy.sh ran, as tables and a figure.

    python tools/privacy.py runs/privacy [--figure docs/privacy.png]

Reads the studies PREFIX-none (no DP) and PREFIX-<sigma> (--dp-clip C --dp-noise sigma), three seeds each,
and prints: each method's P and TTP (mean ± std over seeds) at each noise level; the guarantee each level
gives at 8 clients and what the same noise per coordinate (sigma C / n) would give with 1,000 clients;
paired differences (95% bootstrap interval over test instances, each seed's difference) of each method
under DP against itself without DP, and of FedDPA against FedIT at each level. Draws P and TTP against
the noise (matplotlib, an optional extra).
"""
import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import evaluation  # noqa: E402
import fed  # noqa: E402
from runs import mean_std, verdict  # noqa: E402

METHODS = ("local", "fedit", "feddpa-f", "feddpa-t", "feddpa-t-calibrated")
AGAINST_FEDIT = ("feddpa-f", "feddpa-t", "feddpa-t-calibrated")


def studies(prefix: str) -> dict:
    """{sigma (0.0 for no DP): (config, [each seed's results.json])}, by sigma."""
    out = {}
    for path in [f"{prefix}-none"] + sorted(glob.glob(f"{prefix}-[0-9]*")):
        if not os.path.isfile(os.path.join(path, "results.json")):
            continue
        with open(os.path.join(path, "results.json")) as f:
            res = json.load(f)
        seeds = list(res["per_seed"].values())
        out[seeds[0]["config"]["dp_noise"] if seeds[0]["config"].get("dp_clip") else 0.0] = (seeds[0]["config"], seeds)
    return dict(sorted(out.items()))


def interval(a_runs: list, b_runs: list, metric: str, a: str, b: str) -> str:
    d = evaluation.paired_difference([r["methods"][a]["per_client"] for r in a_runs],
                                     [r["methods"][b]["per_client"] for r in b_runs],
                                     client_tasks=[r["client_tasks"] for r in a_runs], metric=metric)
    lo, hi = d["ci95"]
    return f"{d['diff']:+6.1f} [{lo:+5.1f}, {hi:+5.1f}] {verdict(d):<9} " + " ".join(f"{x:+.1f}" for x in d["per_seed"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prefix", help="tools/privacy.sh's R (default there: runs/privacy)")
    ap.add_argument("--figure", help="where to draw P and TTP against the noise (a .png)")
    args = ap.parse_args(argv)
    levels = studies(args.prefix)
    if 0.0 not in levels or len(levels) < 2:
        print(f"error: {args.prefix}-none and at least one {args.prefix}-<sigma> study are needed", file=sys.stderr)
        return 2
    none = levels[0.0][1]
    n = len(none[0]["client_tasks"])
    print(f"mean ± std over {len(none)} seeds (ROUGE-1 F1, %); noise: sigma, and the std per coordinate sigma C / n")
    print(f"{'method':<22}" + "".join(f"{'sigma ' + format(s, 'g'):>28}" for s in levels))
    for m in METHODS:
        for metric in ("P", "TTP"):
            cells = []
            for s, (_, seeds) in levels.items():
                mu, sd = mean_std([r["methods"][m][metric] for r in seeds])
                cells.append(f"{metric} {mu:5.1f} ± {sd:3.1f}")
            print(f"{m if metric == 'P' else '':<22}" + "".join(f"{c:>28}" for c in cells))
    print("\nthe guarantee of FedIT's and FedDPA-T's global adapter, (epsilon, delta) after the run's rounds")
    for s, (cfg, seeds) in levels.items():
        if s == 0.0:
            continue
        rounds, clip, delta = cfg["rounds"], cfg["dp_clip"], cfg["dp_delta"]
        eps = seeds[0]["training"]["fedit"]["epsilon"]
        print(f"sigma {s:g} (std per coordinate {s * clip / n:.4g}): epsilon {eps:.4g} at {n} clients; the same noise "
              f"per coordinate with 1,000 clients (sigma {s * 1000 / n:g}): epsilon {fed.dp_epsilon(s * 1000 / n, rounds, delta):.3g}"
              f" (delta {delta:g}, {rounds} rounds)")
    print("\npaired differences, ROUGE-1 points: mean over seeds, 95% interval, verdict, each seed's difference")
    for s, (_, seeds) in levels.items():
        if s == 0.0:
            continue
        for m in METHODS:
            for metric in ("P", "TTP"):
                print(f"sigma {s:<5g} {m + ' - itself without DP':<40}{metric:>4} {interval(seeds, none, metric, m, m)}")
    for s, (_, seeds) in levels.items():
        for m in AGAINST_FEDIT:
            for metric in ("P", "TTP"):
                print(f"sigma {s:<5g} {m + ' - fedit':<40}{metric:>4} {interval(seeds, seeds, metric, m, 'fedit')}")
    if args.figure:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("error: the figure needs matplotlib: pip install matplotlib", file=sys.stderr)
            return 2
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        xs = list(range(len(levels)))
        for ax, metric in zip(axes, ("P", "TTP")):
            for i, m in enumerate(METHODS):
                mean, std = zip(*(mean_std([r["methods"][m][metric] for r in seeds]) for _, seeds in levels.values()))
                line, = ax.plot(xs, mean, marker="o", ms=3, label=m, color=plt.cm.tab10(i))
                ax.fill_between(xs, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                                color=line.get_color(), alpha=0.15)
            ax.set_xticks(xs, ["no DP"] + [f"σ {s:g}\nε {fed.dp_epsilon(s * 1000 / n, c['rounds'], c['dp_delta']):.2g} at 1,000"
                                           for s, (c, _) in list(levels.items())[1:]])
            ax.set_xlabel(f"noise multiplier (clip {levels[list(levels)[-1]][0]['dp_clip']:g}, {n} clients)")
            ax.set_ylabel(f"{metric}, ROUGE-1 F1 (%)")
            ax.set_title(f"{metric} (mean ± std over {len(none)} seeds)")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.figure, dpi=100)
        print(args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
