"""demo.py: the bundled visual task and the tiny model it starts from."""

import json
import os
import re
import sys

from conftest import read_metrics, run_command
from PIL import Image

import demo
import data_tools


def _key(row):
    return (row["problem"], row["solution"], row["image"].tobytes())


def test_demo_rows_are_deterministic_and_splits_disjoint():
    train, test = demo.demo_rows("train"), demo.demo_rows("test")
    assert len(train) == demo.DEMO_SIZES["train"] and len(test) == demo.DEMO_SIZES["test"]
    assert [_key(r) for r in train[:50]] == [_key(r) for r in demo.demo_rows("train")[:50]]
    assert not {_key(r) for r in train} & {_key(r) for r in test}


def test_demo_schema_and_answers_follow_the_drawing():
    rows = demo.demo_rows("test")
    multiple_choice = [r for r in rows if "Choices:" in r["problem"]]
    assert 0.6 < len(multiple_choice) / len(rows) < 0.9  # three in four, by design
    for row in rows[:40]:
        assert set(row) == {"image", "problem", "solution"}
        answer = re.fullmatch(r"<think>.*</think><answer>(.*)</answer>", row["solution"]).group(1)
        image = row["image"]
        # Read the drawing back: the canvas colour, and the side the white pixels are on.
        pixels = [(x, image.getpixel((x, y))) for x in range(image.width) for y in range(image.height)]
        white_x = [x for x, c in pixels if c == (255, 255, 255)]
        canvas = [name for name, rgb in demo.DEMO_COLOURS.items() if image.getpixel((0, 0)) == rgb]
        assert len(canvas) == 1 and len(white_x) > 100
        if row in multiple_choice:
            options = dict(re.findall(r"([ABCD]): (\w+)", row["problem"]))
            assert options[answer] == canvas[0]
        else:
            assert answer == ("left" if sum(white_x) / len(white_x) < image.width / 2 else "right")


def test_plot_rewards_writes_rewards_png_and_the_runs_plots(tmp_path):
    """demo.main's last step: output_dir/rewards.png (where the README points) is plot_runs' rewards
    figure, with reward, accuracy and format panels; the run's other figures go to plots/."""
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step, acc in [(5, 0.25), (10, 0.5), (15, 0.9)]:
            f.write(json.dumps({"step": step, "reward/mean": acc + 0.5, "reward/accuracy": acc, "reward/format": 1.0,
                                "loss/kl": 0.0}) + "\n")
    png = demo.plot_rewards(str(tmp_path))
    assert png == str(tmp_path / "rewards.png")
    assert Image.open(png).format == "PNG"
    assert (tmp_path / "rewards.png").read_bytes() == (tmp_path / "plots" / "rewards.png").read_bytes()
    assert sorted(os.listdir(tmp_path / "plots")) == ["loss.png", "rewards.png"]  # no completion/* logged
    rewards = data_tools.draw_figures({"demo": read_metrics(str(tmp_path))})["rewards"]
    assert [ax.get_title(loc="left") for ax in rewards.axes] == ["reward/mean", "reward/accuracy", "reward/format"]


def test_demo_reward_rises(tmp_path):
    """The README's demo as it runs (300 steps): GRPO lifts accuracy well above chance, in training and
    on the held-out split. Fixed seeds; measured three times in a row before trusting it (docs/GUIDE.md)."""
    out = str(tmp_path / "demo")
    run_command([sys.executable, "demo.py", "--output_dir", out], tmp_path)
    accuracy = [m["reward/accuracy"] for m in read_metrics(out)]
    first, last = sum(accuracy[:4]) / 4, sum(accuracy[-4:]) / 4
    # Chance is 0.75 * 1/4 (colour, four options) + 0.25 * 1/2 (left or right) = 0.3125.
    assert first < 0.45, f"the format warm-up should leave accuracy near chance, got {first:.2f}"
    assert last > first + 0.25, f"accuracy went from {first:.2f} to {last:.2f}"
    assert os.path.getsize(os.path.join(out, "rewards.png")) > 0

    scores = {}
    for name, folder in (("untrained", os.path.join(out, "demo-base-model")), ("trained", out)):
        log = run_command([sys.executable, "eval.py", "--model_name_or_path", folder, "--dataset_name",
                           os.path.join(out, "demo-data"), "--split", "test"], tmp_path)
        (result,) = [line for line in log.splitlines() if line.startswith('{"model"')]
        scores[name] = json.loads(result)["accuracy"]
    assert scores["trained"] > scores["untrained"] + 0.2, scores
