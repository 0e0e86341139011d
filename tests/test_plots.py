"""data_tools.py's plots: which panels each figure gets, the series on them (read back from the
Figure objects, not the pixels), the PNGs, and the `python data_tools.py plot` command.
Small metrics.jsonl files written here by hand."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

import data_tools
from grpo.config import UsageError

NAN, INF = math.nan, math.inf

# A run that logged everything train.py logs for these figures (and a few it does not plot). Step 2
# was skipped for a non-finite loss: its loss terms are NaN and infinity, gaps in their lines.
FULL = [
    {"step": 1, "reward/mean": 0.5, "reward/std": 0.4, "reward/accuracy": 0.25, "reward/accuracy_failures": 0.0,
     "reward/format": 0.5, "reward/format_failures": 1.0, "completion/length_mean": 12.0, "completion/length_min": 4.0,
     "completion/length_max": 16.0, "completion/truncated_fraction": 0.125, "loss/loss": 0.0, "loss/kl": 0.0,
     "loss/entropy": 2.5, "loss/clip_ratio": 0.0, "time/step_seconds": 1.5},
    {"step": 2, "reward/mean": 0.75, "reward/std": 0.3, "reward/accuracy": 0.5, "reward/accuracy_failures": 0.0,
     "reward/format": 0.5, "reward/format_failures": 0.0, "completion/length_mean": 10.0, "completion/length_min": 6.0,
     "completion/length_max": 14.0, "completion/truncated_fraction": 0.0, "loss/loss": NAN, "loss/kl": NAN,
     "loss/entropy": INF, "loss/clip_ratio": NAN, "time/step_seconds": 1.25},
    {"step": 3, "reward/mean": 1.25, "reward/std": 0.2, "reward/accuracy": 0.75, "reward/accuracy_failures": 0.0,
     "reward/format": 1.0, "reward/format_failures": 0.0, "completion/length_mean": 8.0, "completion/length_min": 8.0,
     "completion/length_max": 9.0, "completion/truncated_fraction": 0.0, "loss/loss": 0.0, "loss/kl": 0.01,
     "loss/entropy": 2.0, "loss/clip_ratio": 0.05, "time/step_seconds": 1.0},
]
# A run that logged only some of them, at other steps.
PARTIAL = [
    {"step": 2, "reward/mean": 0.2, "reward/accuracy": 0.2, "loss/kl": 0.5},
    {"step": 4, "reward/mean": 0.4, "reward/accuracy": 0.3, "loss/kl": 0.25},
]


def _write_run(folder, rows) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "metrics.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)  # NaN and Infinity as train.py writes them
    return path


def _panels(figure) -> dict[str, dict[str, tuple[list, list]]]:
    """{panel title: {line label: (x, y)}}: what the figure draws, read back from its axes."""
    return {ax.get_title(loc="left"): {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                                       for line in ax.get_lines()} for ax in figure.axes}


def _assert_series(drawn, expected):
    """Equal labels, steps and values, NaN matching NaN."""
    assert list(drawn) == list(expected)
    for label, (x, y) in expected.items():
        assert drawn[label][0] == x, label
        np.testing.assert_array_equal(drawn[label][1], y, err_msg=label)


def test_two_runs_share_each_figure_and_each_metric_has_a_panel():
    figures = data_tools.draw_figures({"full": FULL, "partial": PARTIAL})
    assert list(figures) == ["rewards", "completion", "loss"]

    rewards = _panels(figures["rewards"])
    # The reward functions' means, not reward/std nor the failure counters.
    assert list(rewards) == ["reward/mean", "reward/accuracy", "reward/format"]
    _assert_series(rewards["reward/mean"], {"full": ([1, 2, 3], [0.5, 0.75, 1.25]), "partial": ([2, 4], [0.2, 0.4])})
    _assert_series(rewards["reward/accuracy"], {"full": ([1, 2, 3], [0.25, 0.5, 0.75]), "partial": ([2, 4], [0.2, 0.3])})
    _assert_series(rewards["reward/format"], {"full": ([1, 2, 3], [0.5, 0.5, 1.0])})  # partial did not log it

    completion = _panels(figures["completion"])
    assert list(completion) == ["completion/length_mean", "completion/truncated_fraction"]
    _assert_series(completion["completion/length_mean"], {"full": ([1, 2, 3], [12.0, 10.0, 8.0])})
    _assert_series(completion["completion/truncated_fraction"], {"full": ([1, 2, 3], [0.125, 0.0, 0.0])})

    loss = _panels(figures["loss"])
    assert list(loss) == ["loss/kl", "loss/entropy", "loss/clip_ratio"]
    _assert_series(loss["loss/kl"], {"full": ([1, 2, 3], [0.0, NAN, 0.01]), "partial": ([2, 4], [0.5, 0.25])})
    _assert_series(loss["loss/entropy"], {"full": ([1, 2, 3], [2.5, NAN, 2.0])})  # infinity is a gap too
    _assert_series(loss["loss/clip_ratio"], {"full": ([1, 2, 3], [0.0, NAN, 0.05])})

    legends = {name: [text.get_text() for text in figure.legends[0].get_texts()] for name, figure in figures.items()}
    assert legends == {"rewards": ["full", "partial"], "completion": ["full"], "loss": ["full", "partial"]}
    colours = {(line.get_label(), line.get_color()) for figure in figures.values() for ax in figure.axes
               for line in ax.get_lines()}
    assert len(colours) == 2  # one colour per run, on every panel


def test_completion_length_band_spans_min_to_max():
    (band,) = data_tools.draw_figures({"full": FULL})["completion"].axes[0].collections
    y = band.get_paths()[0].vertices[:, 1]
    assert (y.min(), y.max()) == (4.0, 16.0)  # the smallest length_min and the largest length_max written


def test_plot_runs_writes_a_png_per_figure(tmp_path):
    full = _write_run(tmp_path / "run-a", FULL)
    partial = _write_run(tmp_path / "run-b", PARTIAL)
    out = tmp_path / "plots"
    paths = data_tools.plot_runs([full, str(tmp_path / "run-b")], str(out))  # a metrics file, or its folder
    assert paths == [str(out / "rewards.png"), str(out / "completion.png"), str(out / "loss.png")]
    assert sorted(os.listdir(out)) == ["completion.png", "loss.png", "rewards.png"]  # no .tmp left
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 0 and image.height > 0

    # A run with no completion/* metrics: that figure has no data and is not written.
    alone = tmp_path / "alone"
    assert data_tools.plot_runs([partial], str(alone), labels=["mine"]) == [str(alone / "rewards.png"),
                                                                            str(alone / "loss.png")]


def test_labels_are_folder_names_unless_given(tmp_path, monkeypatch):
    drawn = []
    draw = data_tools.draw_figures
    monkeypatch.setattr(data_tools, "draw_figures", lambda runs: drawn.append(list(runs)) or draw(runs))
    a, b = _write_run(tmp_path / "run-a", PARTIAL), _write_run(tmp_path / "run-b", PARTIAL)
    data_tools.plot_runs([a, b], str(tmp_path / "p1"))
    data_tools.plot_runs([a, b], str(tmp_path / "p2"), labels=["baseline", "beta 0.04"])
    same_name = _write_run(tmp_path / "other" / "run-a", PARTIAL)
    data_tools.plot_runs([a, same_name], str(tmp_path / "p3"))  # two folders called run-a: their paths
    assert drawn == [["run-a", "run-b"], ["baseline", "beta 0.04"],
                     [str(tmp_path / "run-a"), str(tmp_path / "other" / "run-a")]]
    with pytest.raises(UsageError, match="labels: .* give one distinct label per run"):
        data_tools.plot_runs([a, b], str(tmp_path / "p4"), labels=["only one"])


def test_odd_but_valid_runs_plot_without_error(tmp_path):
    """What train.py may hand plot_runs at its first save: a single step, a step whose every loss term
    is NaN, a run logging only timings."""
    single = _write_run(tmp_path / "single", [{"step": 1, "reward/mean": 0.5, "loss/kl": NAN, "loss/entropy": NAN}])
    paths = data_tools.plot_runs([single], str(tmp_path / "p"))
    assert [os.path.basename(p) for p in paths] == ["rewards.png", "loss.png"]
    loss = _panels(data_tools.draw_figures({"single": data_tools.read_metrics(single)})["loss"])
    _assert_series(loss["loss/kl"], {"single": ([1], [NAN])})
    timings = _write_run(tmp_path / "timings", [{"step": 1, "time/step_seconds": 2.0}])
    assert data_tools.plot_runs([timings], str(tmp_path / "q")) == []


def test_missing_empty_or_malformed_metrics_are_named(tmp_path):
    with pytest.raises(UsageError, match=r"nowhere: cannot read it .*give a run's output_dir"):
        data_tools.plot_runs([str(tmp_path / "nowhere")], str(tmp_path / "p"))
    empty = _write_run(tmp_path / "empty", [])
    with pytest.raises(UsageError, match=f"{empty}: no logged step yet"):
        data_tools.plot_runs([empty], str(tmp_path / "p"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"step": 1, "reward/mean": 0.5}\n{"step": 2, "rew\n')
    with pytest.raises(UsageError, match=f"{broken}, line 2: not JSON"):
        data_tools.plot_runs([str(broken)], str(tmp_path / "p"))
    assert not os.path.exists(tmp_path / "p")


def _command(*args, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, os.path.join(REPO, "data_tools.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True)


def test_plot_command(tmp_path):
    _write_run(tmp_path / "run-a", FULL)
    partial = _write_run(tmp_path / "run-b", PARTIAL)
    result = _command("plot", str(tmp_path / "run-a"), partial)
    plots = tmp_path / "run-a" / "plots"  # default: plots/ in the first run's folder
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(plots / f"{name}.png") for name in ("rewards", "completion", "loss")]
    assert all(os.path.getsize(path) > 0 for path in result.stdout.splitlines())

    result = _command("plot", partial, "--out", str(tmp_path / "elsewhere"))
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "elsewhere")) == ["loss.png", "rewards.png"]

    help_text = _command("plot", "--help")
    assert help_text.returncode == 0 and "RUN_DIR_OR_METRICS_JSONL" in help_text.stdout and "--out" in help_text.stdout


def test_plot_command_usage_mistakes_are_one_line(tmp_path):
    missing = str(tmp_path / "no-such-run")
    result = _command("plot", missing)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [f"data_tools.py: error: {missing}: cannot read it (No such file "
                                          f"or directory); give a run's output_dir or its metrics.jsonl."]
    for argv in ([], ["plot"], ["draw", missing]):  # argparse's own mistakes: one line too
        result = _command(*argv)
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith("data_tools.py: error: ")


