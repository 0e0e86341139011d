"""Shared fixtures: a tiny random Qwen2-VL saved to disk, and small visual-math data made in code.

Both are used through the same paths as real ones (--model_name_or_path, --dataset_name), offline.
"""

import json
import os
import subprocess
import sys

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 210, 30)}


def colour_rows(n: int):
    """n rows: a solid-colour image, a multiple-choice question about its colour, and the answer."""
    from PIL import Image

    names = list(COLOURS)
    rows = []
    for i in range(n):
        name = names[i % len(names)]
        options = " ".join(f"{letter}: {c}" for letter, c in zip("ABCD", names))
        rows.append({
            "image": Image.new("RGB", (56 + 8 * (i % 3), 56), COLOURS[name]),
            "problem": f"What colour is the image? Choices: {options}",
            "solution": f"<think>It is {name}.</think><answer>{'ABCD'[names.index(name)]}</answer>",
        })
    return rows


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from grpo.demo import save_tiny_qwen2_vl

    return save_tiny_qwen2_vl(str(tmp_path_factory.mktemp("tiny-qwen2-vl")))


@pytest.fixture(scope="session")
def format_warmed_model(tmp_path_factory):
    """The tiny model after a short warm-up on the answer format (random letters), so that
    rollouts earn format rewards and differing accuracy rewards: a non-zero policy gradient."""
    from grpo.demo import save_tiny_qwen2_vl, warm_up_format

    folder = save_tiny_qwen2_vl(str(tmp_path_factory.mktemp("warmed-qwen2-vl")))
    return warm_up_format(folder, colour_rows(32), lambda row: list("ABCD"), steps=60)


@pytest.fixture(scope="session")
def colour_dataset(tmp_path_factory):
    """The same 8 rows as a save_to_disk folder; returns its path."""
    import datasets

    folder = str(tmp_path_factory.mktemp("colours") / "ds")
    rows = colour_rows(8)
    features = datasets.Features({"image": datasets.Image(), "problem": datasets.Value("string"),
                                  "solution": datasets.Value("string")})
    datasets.Dataset.from_list(rows, features=features).save_to_disk(folder)
    return folder


def run_command(cmd: list[str], tmp_path) -> str:
    """Run train.py / eval.py as a user would (offline); fail with the log's tail if it fails."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=REPO)
    if cmd[0] == "deepspeed":  # a free rendezvous port, not the launcher's fixed 29500
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            cmd = [cmd[0], "--master_port", str(s.getsockname()[1]), *cmd[1:]]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    log = result.stdout + result.stderr
    (tmp_path / "log.txt").write_text(log)
    assert result.returncode == 0, log[-6000:]
    return log


def read_metrics(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
