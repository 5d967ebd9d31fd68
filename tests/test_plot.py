"""plot.py: the five figures of a finished run (four without a curve), and a one-line error without matplotlib."""
import json
import subprocess
import sys

import pytest

import train
from conftest import ROOT, write_three_clients


@pytest.fixture(scope="module")
def finished(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("plot")
    write_three_clients(d / "data", n_train=20, n_test=4)
    train.main(["--data", str(d / "data"), "--model", str(tiny_dir), "--rounds", "2", "--local-steps", "1",
                "--batch-size", "4", "--micro-batch-size", "4", "--test-per-task", "2", "--max-new-tokens", "3",
                "--methods", "base,fedit,feddpa-t,feddpa-t-calibrated", "--seeds", "0,1", "--out", str(d / "out"), "-q",
                "--eval-every", "1"])
    return d / "out"


def test_plot_writes_five_figures_of_the_expected_size(finished, capsys):
    import matplotlib.image
    from extras import plot
    assert plot.main([str(finished)]) == 0
    methods = 4
    expected = {"scores": (400, int(max(6, 0.7 * methods + 2) * 100)), "clients": (300, 1380),
                "lambda": (280, 700), "loss": (400, 600), "curve": (800, 1100)}  # (height, width) in pixels at 100 dpi
    for name, (h, w) in expected.items():
        image = matplotlib.image.imread(finished / "figures" / f"{name}.png")
        assert image.shape[:2] == (h, w), name
        assert image[..., :3].std() > 0.05, f"{name}.png is blank"
    assert capsys.readouterr().out.count("figures") == 5
    seeds = json.loads((finished / "results.json").read_text())["seeds"]
    assert seeds == [0, 1]


def test_plot_without_matplotlib_or_results_is_one_line(tmp_path):
    block = "import sys; sys.modules['matplotlib'] = None; from extras import plot; sys.exit(plot.main([sys.argv[1]]))"
    r = subprocess.run([sys.executable, "-c", block, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr == "error: plot.py needs matplotlib: pip install matplotlib\n"
    r = subprocess.run([sys.executable, "-m", "extras.plot", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "results.json: not the results of a finished run" in r.stderr


def test_the_curve_figure_draws_each_methods_mean_over_seeds(finished):
    """The convergence figure's lines: per method and metric (ROUGE-1 above, the held-out loss below), the
    mean over seeds at each round."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from extras import plot
    runs = plot.runs_of(json.loads((finished / "results.json").read_text()))
    drawn = {}
    real = plt.Axes.plot

    def spy(ax, x, y, *args, **kwargs):
        spec = ax.get_subplotspec()
        drawn[(spec.rowspan.start, spec.colspan.start, kwargs.get("label"))] = (list(x), list(y))
        return real(ax, x, y, *args, **kwargs)
    plt.Axes.plot = spy
    try:
        assert plot.curve_figure(plt, runs, str(finished / "curve-check.png"))
    finally:
        plt.Axes.plot = real
    for row, col, metric in ((0, 0, "P"), (0, 1, "TTP"), (1, 0, "P_loss"), (1, 1, "TTP_loss")):
        for method in ("fedit", "feddpa-t", "feddpa-t-calibrated"):
            want = [sum(r["methods"][method]["curve"][i][metric] for r in runs) / 2 for i in range(2)]
            assert drawn[(row, col, method)] == ([1, 2], pytest.approx(want)), (metric, method)
    assert not any(k[2] == "base" for k in drawn)
    assert plot.curve_figure(plt, [{"methods": {"fedit": {"P": 1.0}}}], str(finished / "none.png")) is False
