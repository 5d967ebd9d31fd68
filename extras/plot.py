"""Figures of a finished run: python plot.py OUT  ->  OUT/figures/*.png

    scores.png    P and TTP per method, grouped bars (mean ± std over seeds when OUT holds several)
    clients.png   for each method, ROUGE-1 per client (rows) and test task (columns), the client's own
                  task outlined, one colour scale for all
    lambda.png    for each dynamic-weight row, the distribution of lambda on the client's own task and
                  on the other tasks
    loss.png      the mean training loss per round of each phase
    curve.png     the paper's convergence figure: P and TTP against the round, one line per method,
                  mean ± std over seeds, and below them the held-out loss on the clients' own task
                  and on all tasks (a run with --eval-every; not drawn without one)
    rms.png       per LoRA layer, the RMS of the global and the local adapter's output on the clients'
                  own task and on the others, and their ratio (OUT/diagnostics.json, extras.diagnose)

Reads OUT/results.json as train.py writes it (one run, or --seeds: then every seed's scores are pooled
or averaged as each figure says). matplotlib is an optional extra: pip install matplotlib.
A porter can skip this file.
"""
import argparse
import json
import os
import sys

from runs import mean_std


def runs_of(res: dict) -> list:
    """The results.json of each run: one, or one per seed."""
    return list(res["per_seed"].values()) if "per_seed" in res else [res]


def scores_figure(plt, runs: list, path: str):
    methods = list(runs[0]["methods"])
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(methods) + 2), 4))
    for j, metric in enumerate(("P", "TTP")):
        values = [[r["methods"][m][metric] for r in runs] for m in methods]
        mean, std = zip(*(mean_std(v) for v in values))
        ax.bar([i + (j - 0.5) * 0.38 for i in range(len(methods))], mean, 0.38, yerr=std if len(runs) > 1 else None,
               capsize=3, label=metric)
    ax.set_xticks(range(len(methods)), methods, rotation=40, ha="right")
    ax.set_ylabel("ROUGE-1 F1 (%)")
    ax.set_title(f"P and TTP per method{f' (mean ± std over {len(runs)} seeds)' if len(runs) > 1 else ''}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def clients_figure(plt, runs: list, path: str):
    methods = list(runs[0]["methods"])
    tasks = list(runs[0]["methods"][methods[0]]["per_client"][0])
    own = runs[0]["client_tasks"]
    cols = min(4, len(methods))
    rows = (len(methods) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 1, 3 * rows), squeeze=False)
    for ax, method in zip(axes.flat, methods):
        grid = [[sum(r["methods"][method]["per_client"][c][t]["rouge1"] for r in runs) / len(runs) for t in tasks]
                for c in range(len(own))]
        image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
        for c, task in enumerate(own):
            if task in tasks:
                ax.add_patch(plt.Rectangle((tasks.index(task) - 0.5, c - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
        ax.set_title(method, fontsize=9)
        ax.set_xticks(range(len(tasks)), [t[:6] for t in tasks], rotation=90, fontsize=6)
        ax.set_yticks(range(len(own)), [str(c) for c in range(len(own))], fontsize=6)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.6, label="ROUGE-1 F1 (%); own task outlined")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def lambda_figure(plt, runs: list, path: str):
    dynamic = [m for m, r in runs[0]["methods"].items() if r.get("lambda")]
    cols = max(1, min(4, len(dynamic)))
    rows = max(1, (len(dynamic) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.5 * cols, 2.8 * rows), squeeze=False)
    for ax, method in zip(axes.flat, dynamic):
        own, other = [], []
        for r in runs:
            for c, scores in enumerate(r["methods"][method]["per_client"]):
                for task, s in scores.items():
                    (own if task == r["client_tasks"][c] else other).extend(s.get("lambdas", []))
        bins = [i / 40 for i in range(41)]
        ax.hist(other, bins=bins, density=True, alpha=0.6, label="other tasks")
        ax.hist(own, bins=bins, density=True, alpha=0.6, label="own task")
        area = sum(r["methods"][method]["lambda"]["auroc"] for r in runs) / len(runs)
        ax.set_title(f"{method}: AUROC {area:.2f}", fontsize=9)
        ax.set_xlabel("λ (the local adapter's weight)", fontsize=8)
    if dynamic:
        axes.flat[0].legend(fontsize=7)
    for ax in list(axes.flat)[len(dynamic):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def loss_figure(plt, runs: list, path: str):
    fig, ax = plt.subplots(figsize=(6, 4))
    for phase in runs[0]["training"]:
        curves = [[h["loss"] for h in r["training"][phase]["history"]] for r in runs]
        n = min(map(len, curves))
        ax.plot(range(1, n + 1), [sum(c[i] for c in curves) / len(curves) for i in range(n)], marker="o", ms=3, label=phase)
    ax.set_xlabel("round")
    ax.set_ylabel("mean training loss of the clients")
    ax.set_title("training loss per round" + (f" (mean over {len(runs)} seeds)" if len(runs) > 1 else ""))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curve_figure(plt, runs: list, path: str) -> bool:
    """P and TTP against the round for every method with a curve (train.py --eval-every): the mean over
    seeds, a band of ± one (sample) std where there are several; below them, where the curves hold it,
    the teacher-forced loss on the reference answers (P_loss, TTP_loss). False where no method has a curve."""
    methods = [m for m, r in runs[0]["methods"].items() if r.get("curve")]
    if not methods:
        return False
    losses = all("P_loss" in pt for r in runs for m in methods for pt in r["methods"][m].get("curve", []))
    rows = (("P", "TTP"), ("P_loss", "TTP_loss")) if losses else (("P", "TTP"),)
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 4 * len(rows)), sharex=True, squeeze=False)
    for ax, metric in zip(axes.flat, (m for row in rows for m in row)):
        for i, method in enumerate(methods):
            points = {}  # round -> the seeds' values
            for r in runs:
                for pt in r["methods"][method].get("curve", []):
                    points.setdefault(pt["round"], []).append(pt[metric])
            rounds = sorted(points)
            mean, std = zip(*(mean_std(points[x]) for x in rounds))
            line, = ax.plot(rounds, mean, marker="o", ms=3, label=method, color=plt.cm.tab20(i % 20))  # 10+ methods
            if len(runs) > 1:
                ax.fill_between(rounds, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=line.get_color(), alpha=0.15)
        ax.set_xlabel("communication round")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(f"{metric[:-5]}, held-out loss (nats/token)" if metric.endswith("_loss")
                      else f"{metric}, ROUGE-1 F1 (%)")
        ax.set_title(metric + (f" (mean ± std over {len(runs)} seeds)" if len(runs) > 1 else ""))
    axes[0, 1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def rms_figure(plt, diagnostics: dict, path: str):
    """extras.diagnose's figures per layer, the mean over seeds: each adapter's RMS on own-task and
    other-task prompts (log scale), and the local adapter's RMS over the global's."""
    seeds = list(diagnostics["per_seed"].values())
    n = len(diagnostics["layers"])

    def mean(key):
        return [sum(s[key][i] for s in seeds) / len(seeds) for i in range(n)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for key, style in (("global_own", "C0-"), ("global_other", "C0--"), ("local_own", "C1-"), ("local_other", "C1--")):
        axes[0].plot(range(n), mean(key), style, label=key.replace("_", ", "))
    axes[0].set_yscale("log")
    axes[0].set_ylabel("RMS of the adapter's output")
    axes[0].legend(fontsize=7)
    for where, style in (("own", "C2-"), ("other", "C2--")):
        axes[1].plot(range(n), [a / b for a, b in zip(mean(f"local_{where}"), mean(f"global_{where}"))], style,
                     label=f"{where} task")
    axes[1].axhline(1.0, color="grey", lw=0.5)
    axes[1].set_ylabel("local RMS / global RMS")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("LoRA layer (" + ", ".join(dict.fromkeys(p.rsplit(".", 1)[-1] for p in diagnostics["layers"])) + ")")
    fig.suptitle(f"{diagnostics['phase']}: adapter outputs per layer, mean over {len(seeds)} seed(s) and their clients")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="a finished run's folder (train.py --out)")
    args = ap.parse_args(argv)
    path = os.path.join(args.out, "results.json")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("error: plot.py needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    try:
        with open(path) as f:
            runs = runs_of(json.load(f))
        runs[0]["methods"], runs[0]["training"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        print(f"error: {path}: not the results of a finished run ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    d = os.path.join(args.out, "figures")
    os.makedirs(d, exist_ok=True)
    for name, draw in (("scores", scores_figure), ("clients", clients_figure), ("lambda", lambda_figure),
                       ("loss", loss_figure), ("curve", curve_figure)):
        if draw(plt, runs, os.path.join(d, f"{name}.png")) is not False:
            print(os.path.join(d, f"{name}.png"))
    diag = os.path.join(args.out, "diagnostics.json")
    if os.path.isfile(diag):
        try:
            with open(diag) as f:
                diagnostics = json.load(f)
            rms_figure(plt, diagnostics, os.path.join(d, "rms.png"))
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as e:
            print(f"error: {diag}: not extras.diagnose's output ({type(e).__name__}: {e})", file=sys.stderr)
            return 2
        print(os.path.join(d, "rms.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
