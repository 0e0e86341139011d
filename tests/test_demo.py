"""grpo/demo.py: the bundled visual task and the tiny model it starts from."""

import json
import re

from PIL import Image

from grpo import demo


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


def test_plot_rewards_draws_a_png(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "w") as f:
        for step, acc in [(5, 0.25), (10, 0.5), (15, 0.9)]:
            f.write(json.dumps({"step": step, "reward/mean": acc + 0.5, "reward/accuracy": acc, "reward/format": 1.0}) + "\n")
    demo.plot_rewards(str(metrics), str(tmp_path / "rewards.png"))
    image = Image.open(tmp_path / "rewards.png")
    assert image.size == (640, 400)
    red = demo_colour_pixels(image, (200, 50, 50))  # the accuracy line
    assert red > 50


def demo_colour_pixels(image, colour):
    data = image.convert("RGB").tobytes()
    return sum(1 for i in range(0, len(data), 3) if tuple(data[i:i + 3]) == colour)
