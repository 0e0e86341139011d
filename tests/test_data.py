"""grpo/data.py: every source kind, column checks, counted drops, rank sharding."""

import io
import json
import re

import pytest
from conftest import colour_rows

from grpo import data
from grpo.families import FAMILIES

QWEN = FAMILIES["qwen2_vl"]


@pytest.fixture(scope="module")
def processor(tiny_model):
    from grpo.families import load_processor

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
    assert ds.dropped == {"unreadable image or video": [3, 4]}
    (line,) = [m for m in messages if "dropped" in m]
    assert line.startswith("[data] dropped 2 of 5 rows: unreadable image or video (row 3: FileNotFoundError: ")
    assert "; row 4: UnidentifiedImageError: " in line


def _has_answer(solution, problem):
    """A check_solution for the tests: the text between <answer> and </answer> must not be empty."""
    found = re.search(r"<answer>(.*?)</answer>", solution, re.S)
    return None if found and found.group(1).strip() else "no answer"


def _write_rows(tmp_path, rows):
    """rows as a .jsonl next to an img/ folder holding ok.png (a real image) and broken.png (garbage)."""
    (tmp_path / "img").mkdir()
    colour_rows(1)[0]["image"].save(tmp_path / "img" / "ok.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"\x00garbage, not an image\xff" * 8)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_bad_rows_dropped_counted_by_first_reason(tmp_path, processor):
    answer = "<think>red</think><answer>A</answer>"
    rows = [
        {"image": "img/ok.png", "problem": "valid 0", "solution": answer},
        {"image": "img/ok.png", "problem": "", "solution": answer},                         # 1 empty problem
        {"image": "img/ok.png", "problem": "valid 2", "solution": answer},
        {"image": "img/ok.png", "problem": "q3", "solution": "  \n "},                       # 3 empty solution
        {"image": "img/missing.png", "problem": "q4", "solution": answer},                  # 4 unreadable
        {"image": "img/broken.png", "problem": "q5", "solution": answer},                   # 5 unreadable
        {"image": "img/ok.png", "problem": "q6", "solution": "<think>?</think><answer></answer>"},  # 6 unverifiable
        {"image": "img/ok.png", "problem": "valid 7", "solution": answer},
        {"image": "img/missing.png", "problem": None, "solution": ""},                      # 8 empty problem first
    ]
    path = _write_rows(tmp_path, rows)
    checked, messages = [], []

    def check(solution, problem):
        checked.append(problem)
        return _has_answer(solution, problem)

    ds = data.load_prompt_dataset(path, "train", processor, QWEN, 4096, log=messages.append, check_solution=check)
    assert len(ds) == 3
    assert [ds[i]["problem"] for i in range(len(ds))] == ["valid 0", "valid 2", "valid 7"]
    assert ds.dropped == {"empty problem": [1, 8], "empty solution": [3], "unverifiable solution": [6],
                          "unreadable image or video": [4, 5]}
    # The answer is judged only for rows with a problem and a solution, and before any image is read.
    assert checked == ["valid 0", "valid 2", "q4", "q5", "q6", "valid 7"]
    assert messages[:3] == ["[data] dropped 2 of 9 rows: empty problem (rows 1, 8)",
                            "[data] dropped 1 of 9 rows: empty solution (row 3)",
                            "[data] dropped 1 of 9 rows: unverifiable solution (row 6: no answer)"]
    assert messages[3].startswith("[data] dropped 2 of 9 rows: unreadable image or video (row 4: FileNotFoundError: ")
    assert "missing.png" in messages[3] and "; row 5: UnidentifiedImageError: " in messages[3]
    assert messages[4] == f"[data] 3 prompts from {path!r} (split 'train')"
    assert len(messages) == 5 and all("\n" not in m for m in messages)


def test_no_usable_rows_is_a_usage_error(tmp_path, processor):
    from grpo.config import UsageError

    rows = [{"image": "img/ok.png", "problem": p, "solution": "<answer>A</answer>"} for p in ("", " ", None, "\t")]
    rows.append({"image": "img/broken.png", "problem": "q", "solution": "<answer>A</answer>"})
    path = _write_rows(tmp_path, rows)
    messages = []
    with pytest.raises(UsageError) as raised:
        data.load_prompt_dataset(path, "train", processor, QWEN, 4096, log=messages.append)
    assert str(raised.value) == (f"--dataset_name {path!r}: no usable rows out of 5 "
                                 "(empty problem: 4, unreadable image or video: 1).")
    assert messages[0] == "[data] dropped 4 of 5 rows: empty problem (rows 0, 1, 2, ...)"  # at most 3 rows named
    assert messages[1].startswith("[data] dropped 1 of 5 rows: unreadable image or video (row 4: UnidentifiedImageError")


def test_corrupt_bytes_in_an_image_feature_counted(tmp_path_factory, processor):
    """A save_to_disk folder decodes its Image column on access: a corrupt one is dropped, not raised."""
    import datasets
    from conftest import save_rows

    rows = colour_rows(3)
    rows[1]["image"] = {"bytes": b"not an image" * 4, "path": None}
    ds, messages = _load(save_rows(tmp_path_factory, "corrupt", rows, {"image": datasets.Image()}), processor)
    assert len(ds) == 2 and ds.dropped == {"unreadable image or video": [1]}
    assert messages[0].startswith("[data] dropped 1 of 3 rows: unreadable image or video (row 1: UnidentifiedImageError")


def test_missing_columns_named(tmp_path, processor):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"picture": "x.png", "question": "q", "solution": "s"}) + "\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['problem'\].*'picture', 'question', 'solution'"):
        _load(str(path), processor)


def test_over_long_prompts_dropped_and_counted(colour_dataset, processor):
    from grpo.families import count_prompt_tokens

    lengths = [count_prompt_tokens(processor, ex["prompt"], ex["images"], QWEN) for ex in _load(colour_dataset, processor)[0]]
    # The images are 56, 64 and 72 pixels wide: those above 56 resize to more image tokens.
    limit = min(lengths)
    assert max(lengths) > limit
    ds, messages = _load(colour_dataset, processor, max_len=limit)
    assert len(ds) == sum(n <= limit for n in lengths)
    over = [i for i, n in enumerate(lengths) if n > limit]
    assert ds.dropped == {"prompt over --max_prompt_length": over}
    first = "; ".join(f"row {i}: {lengths[i]} tokens" for i in over[:3])
    assert (f"[data] dropped {len(over)} of 8 rows: prompt over --max_prompt_length {limit}, "
            f"longest {max(lengths)} tokens ({first}" in messages[0])


def test_prompt_token_count_matches_processor(colour_dataset, processor):
    from grpo.families import build_inputs, count_prompt_tokens

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


def test_each_picture_is_decoded_once_and_a_second_rank_decodes_none(colour_dataset, mixed_dataset, processor,
                                                                    monkeypatch):
    """Checking the rows decodes each picture once (8 rows of one image: 8 decodes); a rank given rank 0's
    decision (`decide`) decodes none at start, and holds the same prompts (the mixed set: rows of 1, 2 and
    0 images). datasets itself decodes the first picture of an `images` list twice when it reads a row
    (its decode_nested_example probes the first element), so the exact count uses the `image` column."""
    from PIL import ImageFile

    decoded = []
    load = ImageFile.ImageFile.load

    def counting_load(image):
        if image.tile:  # pixels not decoded yet (PIL clears the tiles once it has)
            decoded.append(image.size)
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    data.load_prompt_dataset(colour_dataset, "train", processor, QWEN, 4096, log=lambda _: None)
    assert len(decoded) == 8
    messages = []
    checked = data.load_prompt_dataset(mixed_dataset, "train", processor, QWEN, 4096, log=messages.append)
    assert any("8 prompts" in m and "2 of them text-only" in m for m in messages), messages
    decoded.clear()
    # Another rank: rank 0's decision given (distributed.rank0_decides broadcasts it), no check run.
    trusted = data.load_prompt_dataset(mixed_dataset, "train", processor, QWEN, 4096, log=messages.append,
                                       decide=lambda check: (checked.keep, checked.dropped))
    assert decoded == []
    assert trusted.keep == checked.keep and trusted.dropped == checked.dropped
    assert [len(trusted[i]["images"]) for i in range(8)] == [1, 2, 0, 1, 2, 0, 1, 2]
