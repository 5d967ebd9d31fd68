"""Issue 38's pilot: the convergence curves of one or more runs (train.py --eval-every), as a table per
round and extras.plot's curve figure.

    python tools/pilot.py RUN [RUN ...] [--figure docs/pilot-curve.png]

Each run's curves come from its results.json, or, for a run stopped before its last phase (the pilot's
FedIT and FedDPA-T ran in one process and Local in another, beside it), from its checkpoint. A method's
curve is taken from the first run that has it: phases are seeded by their names, so a phase is the
same in any run of the same settings.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import runs  # noqa: E402


def curves_of(run: str) -> dict:
    path = os.path.join(run, "results.json")
    if os.path.isfile(path):
        with open(path) as f:
            return {m: r["curve"] for m, r in json.load(f)["methods"].items() if r.get("curve")}
    return runs.load_state(run).get("curves", {})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--figure", help="where to draw the curves (a .png; needs matplotlib)")
    args = ap.parse_args(argv)
    curves = {}
    for run in args.runs:
        for method, points in curves_of(run).items():
            curves.setdefault(method, points)
    print(f"{'method':<22}{'round':>6}{'P_loss':>9}{'TTP_loss':>9}{'P':>7}{'TTP':>7}   (held-out loss, nats/token; ROUGE-1 F1, %)")
    for method, points in curves.items():
        for p in points:
            print(f"{method:<22}{p['round']:>6}{p['P_loss']:9.3f}{p['TTP_loss']:9.3f}{p['P']:7.1f}{p['TTP']:7.1f}")
    if args.figure:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from extras import plot
        plot.curve_figure(plt, [{"methods": {m: {"curve": pts} for m, pts in curves.items()}}], args.figure)
        print(args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
