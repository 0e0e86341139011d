"""Shared fixtures: tiny random models saved to disk (Qwen2-VL; Qwen2.5-VL, also with the real vocabulary;
one per family), and small visual-math data made in code.

Both are used through the same paths as real ones (--model_name_or_path, --dataset_name), offline.
"""

import glob
import json
import os
import signal
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
    from demo import save_tiny_qwen2_vl

    return save_tiny_qwen2_vl(str(tmp_path_factory.mktemp("tiny-qwen2-vl")))


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(tmp_path_factory):
    """A tiny random Qwen2.5-VL (its windowed vision tower, its processor class), saved like a real one."""
    from tiny_qwen2_5_vl import save_tiny_qwen2_5_vl

    return save_tiny_qwen2_5_vl(str(tmp_path_factory.mktemp("tiny-qwen2.5-vl")))


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl_real_vocab(tmp_path_factory):
    """A tiny random Qwen2.5-VL with the real vocabulary: Qwen's tokenizer, 151,936 embedding rows,
    Qwen2.5-VL-Instruct's chat template and published generation config (tests/tiny_qwen2_5_vl.py)."""
    from tiny_qwen2_5_vl import save_tiny_qwen2_5_vl_real_vocab

    return save_tiny_qwen2_5_vl_real_vocab(str(tmp_path_factory.mktemp("tiny-qwen2.5-vl-real-vocab")))


# Every family's tiny model, by model_type: name -> builder(folder) -> folder.
def _family_builders():
    from tiny_aria import save_tiny_aria
    from tiny_gemma3 import save_tiny_gemma3
    from tiny_idefics3 import save_tiny_idefics3, save_tiny_smolvlm
    from tiny_llava_onevision import save_tiny_llava_onevision
    from tiny_qwen3_vl import save_tiny_qwen3_vl

    from demo import save_tiny_qwen2_vl

    return {"qwen2_vl": save_tiny_qwen2_vl, "qwen3_vl": save_tiny_qwen3_vl, "llava_onevision": save_tiny_llava_onevision,
            "idefics3": save_tiny_idefics3, "smolvlm": save_tiny_smolvlm, "gemma3": save_tiny_gemma3,
            "aria": save_tiny_aria}


FAMILY_NAMES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "idefics3", "smolvlm", "gemma3", "aria")


@pytest.fixture(scope="session")
def family_models(tmp_path_factory, tiny_qwen2_5_vl):
    """A tiny model folder per family, built on first use."""
    built = {"qwen2_5_vl": tiny_qwen2_5_vl}

    def get(name: str) -> str:
        if name not in built:
            built[name] = _family_builders()[name](str(tmp_path_factory.mktemp(f"tiny-{name}")))
        return built[name]

    return get


@pytest.fixture(scope="session")
def format_warmed_model(tmp_path_factory):
    """The tiny model after a short warm-up on the answer format (random letters), so that
    rollouts earn format rewards and differing accuracy rewards: a non-zero policy gradient."""
    from demo import save_tiny_qwen2_vl, warm_up_format

    folder = save_tiny_qwen2_vl(str(tmp_path_factory.mktemp("warmed-qwen2-vl")))
    return warm_up_format(folder, colour_rows(32), lambda row: list("ABCD"), steps=60)


def save_rows(tmp_path_factory, name: str, rows: list[dict], picture_columns: dict) -> str:
    """Rows saved as a save_to_disk folder (picture columns as datasets' Image features); its path."""
    import datasets

    folder = str(tmp_path_factory.mktemp(name) / "ds")
    features = datasets.Features({**picture_columns, "problem": datasets.Value("string"),
                                  "solution": datasets.Value("string")})
    datasets.Dataset.from_list(rows, features=features).save_to_disk(folder)
    return folder


@pytest.fixture(scope="session")
def colour_dataset(tmp_path_factory):
    """The same 8 rows as a save_to_disk folder; returns its path."""
    import datasets

    return save_rows(tmp_path_factory, "colours", colour_rows(8), {"image": datasets.Image()})


@pytest.fixture(scope="session")
def mixed_dataset(tmp_path_factory):
    """8 rows mixing one image, two images and none (text-only), in an `images` list column."""
    import datasets
    from PIL import Image

    rows = []
    for i, row in enumerate(colour_rows(8)):
        images = [row["image"], Image.new("RGB", (56, 56), "white")][:[1, 2, 0][i % 3]]
        rows.append({"images": images, "problem": row["problem"], "solution": row["solution"]})
    return save_rows(tmp_path_factory, "mixed", rows, {"images": datasets.Sequence(datasets.Image())})


@pytest.fixture(scope="session")
def video_dataset(tmp_path_factory):
    """6 rows: a video (4 frames), an image, or neither, in `video` and `image` columns."""
    import datasets
    from PIL import Image

    rows = []
    for i, row in enumerate(colour_rows(6)):
        frames = [row["image"], Image.new("RGB", (56, 56), "white")] * 2
        rows.append({"video": frames if i % 3 == 0 else None, "image": row["image"] if i % 3 == 1 else None,
                     "problem": row["problem"], "solution": row["solution"]})
    return save_rows(tmp_path_factory, "video", rows,
                     {"video": datasets.Sequence(datasets.Image()), "image": datasets.Image()})


@pytest.fixture(scope="session")
def image_and_text_only_dataset(tmp_path_factory):
    """Two rows, one with an image and one without (`image` empty): with one prompt per rank on two
    ranks, every step gives one rank a text-only micro-batch while the other has an image ([text-only rank])."""
    import datasets

    rows = colour_rows(2)
    rows[1]["image"] = None
    return save_rows(tmp_path_factory, "pair", rows, {"image": datasets.Image()})


@pytest.fixture(autouse=True)
def no_leaked_shared_memory():
    """Every test leaves /dev/shm as it found it. DeepSpeed's CPU all-reduce buffers (66 MB a rank,
    in RAM) outlive their run unless train.py unlinks them; leaked ones filled a 24 GB CI machine
    until the suite was killed. A leak fails the test that made it, and is removed. A buffer some live
    process still maps is not a leak: it belongs to a run beside this one (another pytest on the machine)."""
    pattern = "/dev/shm/deepspeed_allreduce_buffer_*"
    before = set(glob.glob(pattern))
    yield
    leaked = sorted(set(glob.glob(pattern)) - before - _mapped_by_live_processes())
    for path in leaked:
        os.remove(path)
    assert not leaked, f"left in /dev/shm: {leaked}"


def _mapped_by_live_processes() -> set[str]:
    """The files under /dev/shm that a running process has mapped (from /proc/PID/maps)."""
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                mapped.update(line.split(None, 5)[5].strip() for line in f if "/dev/shm/" in line)
        except (OSError, IndexError):  # the process ended while being read
            continue
    return mapped


def run_command(cmd: list[str], tmp_path, timeout: int = 1200, returncode: int | None = 0, env: dict | None = None) -> str:
    """Run train.py / eval.py as a user would (offline); fail with the log's tail unless it exits
    with `returncode` (None: any)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=REPO, **(env or {}))
    if cmd[0] == "deepspeed":  # a free rendezvous port, not the launcher's fixed 29500
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            cmd = [cmd[0], "--master_port", str(s.getsockname()[1]), *cmd[1:]]
    # A session of its own: on a timeout the launcher's ranks are killed with it, not left waiting
    # in a collective (holding memory) for the rest of the suite.
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        (tmp_path / "log.txt").write_text(stdout + stderr)
        pytest.fail(f"{' '.join(cmd[:4])} ... still running after {timeout} s (killed):\n{(stdout + stderr)[-6000:]}")
    log = stdout + stderr
    (tmp_path / "log.txt").write_text(log)
    assert returncode is None or process.returncode == returncode, log[-6000:]
    return log


def read_metrics(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# wandb's offline run, read back without a network and without wandb's own reader (none is public):
# `run-<id>.wandb` is a LevelDB-style log (a 7-byte header ":W&B", 0xBEE1, version 0; then 32 KiB blocks
# of records, each checksum u32, length u16, type u8: 1 whole, 2 first, 3 middle, 4 last piece) of
# wandb's protobuf Records (wandb/proto/wandb_internal.proto).
WANDB_OFFLINE_ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}


def wandb_offline_env(tmp_path) -> dict:
    """The environment of a test's offline wandb run: nothing leaves the test's own folder."""
    return dict(WANDB_OFFLINE_ENV, WANDB_DATA_DIR=str(tmp_path / "wandb-data"), WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
                WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"))


def _wandb_records(path: str):
    import struct

    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        raw = f.read()
    assert raw[:4] == b":W&B", f"{path} is not a wandb run file"
    block, position, pieces = 32 * 1024, 7, b""
    while position + 7 <= len(raw):
        left_in_block = block - position % block
        _, length, kind = struct.unpack("<IHB", raw[position:position + 7]) if left_in_block >= 7 else (0, 0, 0)
        if kind == 0:  # the block's zero padding
            position += left_in_block
            continue
        data, position = raw[position + 7:position + 7 + length], position + 7 + length
        pieces = data if kind in (1, 2) else pieces + data
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record


def read_wandb_run(output_dir: str) -> dict:
    """The one offline wandb run under output_dir/wandb: its name and id, its config (flag -> value),
    its history (one dict per wandb.log call: key -> value), and each logged table as its artifact
    holds it ({"columns", "data", "images": {path in the table: the PNG file}})."""
    (path,) = glob.glob(os.path.join(output_dir, "wandb", "offline-run-*", "run-*.wandb"))
    run = {"config": {}, "history": [], "tables": []}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["name"], run["id"] = record.run.display_name, record.run.run_id
            run["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            run["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            run["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                   for item in record.history.item})
        elif kind == "artifact":
            files = {entry.path: entry.local_path for entry in record.artifact.manifest.contents}
            for name, local_path in files.items():
                if name.endswith(".table.json"):
                    with open(local_path) as f:
                        table = json.load(f)
                    table["images"] = {name: files[name] for name in files if name.endswith(".png")}
                    run["tables"].append(table)
    return run
