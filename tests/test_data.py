"""grpo/data.py: every source kind, column checks, counted drops, rank sharding."""

import io
import json

import pytest
from conftest import colour_rows

from grpo import data
from grpo.vlm_adapter import FAMILIES

QWEN = FAMILIES["qwen2_vl"]


@pytest.fixture(scope="module")
def processor(tiny_model):
    from grpo.vlm_adapter import load_processor

    return load_processor(tiny_model, 56 * 56, 112 * 112)


def _load(path, processor, max_len=4096):
    messages = []
    ds = data.load_prompt_dataset(path, "train", processor, QWEN, max_len, log=messages.append)
    return ds, messages


def test_save_to_disk_folder(colour_dataset, processor):
    ds, _ = _load(colour_dataset, processor)
    expected = colour_rows(8)
    assert len(ds) == 8
    for i in (0, 5):
        example = ds[i]
        assert example["problem"] == expected[i]["problem"]
        assert example["solution"] == expected[i]["solution"]
        (image,) = example["images"]
        assert image.size == expected[i]["image"].size
        assert image.getpixel((0, 0)) == expected[i]["image"].getpixel((0, 0))
        system, user = example["prompt"]
        assert system["role"] == "system" and "<answer>" in system["content"][0]["text"]
        assert user["content"] == [{"type": "image"}, {"type": "text", "text": expected[i]["problem"]}]


def test_parquet_with_image_bytes(tmp_path, processor):
    import datasets

    rows = colour_rows(4)
    for row in rows:
        buffer = io.BytesIO()
        row["image"].save(buffer, format="PNG")
        row["image"] = buffer.getvalue()
    path = str(tmp_path / "rows.parquet")
    datasets.Dataset.from_list(rows).to_parquet(path)
    ds, _ = _load(path, processor)
    assert [ds[i]["problem"] for i in range(4)] == [r["problem"] for r in rows]
    assert ds[2]["images"][0].getpixel((3, 3)) == colour_rows(4)[2]["image"].getpixel((3, 3))


def test_jsonl_with_relative_paths_drops_and_counts_unreadable(tmp_path, processor):
    rows = colour_rows(3)
    (tmp_path / "img").mkdir()
    with open(tmp_path / "rows.jsonl", "w") as f:
        for i, row in enumerate(rows):
            row["image"].save(tmp_path / "img" / f"{i}.png")
            f.write(json.dumps({"image": f"img/{i}.png", "problem": row["problem"], "solution": row["solution"]}) + "\n")
        f.write(json.dumps({"image": "img/missing.png", "problem": "?", "solution": "<answer>A</answer>"}) + "\n")
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png")
    with open(tmp_path / "rows.jsonl", "a") as f:
        f.write(json.dumps({"image": "img/broken.png", "problem": "?", "solution": "<answer>A</answer>"}) + "\n")
    ds, messages = _load(str(tmp_path / "rows.jsonl"), processor)
    assert len(ds) == 3
    assert ds[1]["images"][0].getpixel((0, 0)) == rows[1]["image"].getpixel((0, 0))
    assert any("dropped 2 of 5 rows with unreadable images" in m and "row 3" in m for m in messages)


def test_missing_columns_named(tmp_path, processor):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"picture": "x.png", "question": "q", "solution": "s"}) + "\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['problem'\].*'picture', 'question', 'solution'"):
        _load(str(path), processor)


def test_over_long_prompts_dropped_and_counted(colour_dataset, processor):
    from grpo.vlm_adapter import count_prompt_tokens

    lengths = [count_prompt_tokens(processor, ex["prompt"], ex["images"], QWEN) for ex in _load(colour_dataset, processor)[0]]
    # The images are 56, 64 and 72 pixels wide: those above 56 resize to more image tokens.
    limit = min(lengths)
    assert max(lengths) > limit
    ds, messages = _load(colour_dataset, processor, max_len=limit)
    assert len(ds) == sum(n <= limit for n in lengths)
    dropped = sum(n > limit for n in lengths)
    assert any(f"dropped {dropped} of 8 rows whose prompt exceeds --max_prompt_length {limit}" in m for m in messages)


def test_prompt_token_count_matches_processor(colour_dataset, processor):
    from grpo.vlm_adapter import build_inputs, count_prompt_tokens

    ds, _ = _load(colour_dataset, processor)
    for i in (0, 1, 2):
        ex = ds[i]
        inputs = build_inputs(processor, [ex["prompt"]], [ex["images"]], QWEN)
        assert count_prompt_tokens(processor, ex["prompt"], ex["images"], QWEN) == inputs["input_ids"].shape[1]


def test_rank_batches_disjoint_and_even():
    num_rows, batch, world = 11, 2, 2
    per_rank = [list(data.rank_batches(num_rows, batch, r, world, seed=3, epoch=0)) for r in range(world)]
    assert [len(b) for b in per_rank] == [data.steps_per_epoch(num_rows, batch, world)] * world == [2, 2]
    seen = [i for batches in per_rank for b in batches for i in b]
    assert len(seen) == len(set(seen)) == 8  # 11 // (2 * 2) = 2 steps x 4 prompts, no prompt twice
    assert per_rank[0] == list(data.rank_batches(num_rows, batch, 0, world, seed=3, epoch=0))
    assert per_rank[0] != list(data.rank_batches(num_rows, batch, 0, world, seed=3, epoch=1))


def test_video_column_needs_a_family_that_takes_video(video_dataset, processor):
    with pytest.raises(ValueError, match="has a `video` column, and this model's family takes no video"):
        data.load_prompt_dataset(video_dataset, "train", processor, FAMILIES["gemma3"], 4096)
    ds = data.load_prompt_dataset(video_dataset, "train", processor, QWEN, 4096, log=lambda *_: None)
    kinds = [(len(ds[i]["videos"]), len(ds[i]["images"])) for i in range(len(ds))]
    assert kinds == [(1, 0), (0, 1), (0, 0)] * 2
    assert [len(frames) for frames in ds[0]["videos"]] == [4]
    assert [item["type"] for item in ds[0]["prompt"][1]["content"]] == ["video", "text"]
