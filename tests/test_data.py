"""grpo/data.py: every source kind, column checks, counted drops, rank sharding."""

import io
import json
import os
import random
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


def test_each_picture_is_decoded_once_and_a_rerun_decodes_none(colour_dataset, mixed_dataset, processor, monkeypatch,
                                                               tmp_path):
    """Checking the rows decodes each picture once (8 rows of one image: 8 decodes); a rerun that finds the
    check's result kept (train.py's share: distributed.gather_from_files in output_dir) decodes none at
    start, says so, and holds the same prompts (the mixed set: rows of 1, 2 and 0 images). datasets itself
    decodes the first picture of an `images` list twice when it reads a row (its decode_nested_example probes
    the first element), so the exact count uses the `image` column."""
    from PIL import ImageFile

    from grpo.distributed import gather_from_files

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
    share = lambda check, key: gather_from_files(check, str(tmp_path / key), 0, 1, timeout_s=60)  # noqa: E731
    checked = data.load_prompt_dataset(mixed_dataset, "train", processor, QWEN, 4096, log=messages.append, share=share)
    assert messages == [f"[data] 8 prompts from {mixed_dataset!r} (split 'train'), 2 of them text-only"]
    decoded.clear()
    rerun = data.load_prompt_dataset(mixed_dataset, "train", processor, QWEN, 4096, log=messages.append, share=share)
    assert decoded == []
    (key,) = os.listdir(tmp_path)
    assert messages[1] == messages[0] + f"; checked by an earlier run ({data.CHECK_FOLDER}/{key})"
    assert rerun.keep == checked.keep and rerun.dropped == checked.dropped
    assert [len(rerun[i]["images"]) for i in range(8)] == [1, 2, 0, 1, 2, 0, 1, 2]

# ---------------------------------------------------------------- the check shared by ranks, and kept

def _jpeg(side: int, colour, **save) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buffer, format="JPEG", **save)
    return buffer.getvalue()


def _blocks_with_bad_rows(tmp_path, blocks: float) -> tuple[str, dict, int]:
    """A .jsonl of int(blocks x data.BLOCK) rows whose pictures are files in img/, and in every block of
    BLOCK rows one row of each kind: empty problem (offset 1), empty solution (2), no answer (3), a truncated
    JPEG (4), a missing picture (5), a large picture (6: 16 image tokens, the others have 4) and a text-only
    row (7). Returns (its path, the drops by reason, the text-only rows)."""
    (tmp_path / "img").mkdir()
    small, large = _jpeg(56, (200, 30, 30)), _jpeg(112, (30, 30, 200))
    (tmp_path / "img" / "small.jpg").write_bytes(small)
    (tmp_path / "img" / "large.jpg").write_bytes(large)
    (tmp_path / "img" / "truncated.jpg").write_bytes(large[:len(large) // 2])
    kinds = {1: ("empty problem", {"problem": " "}), 2: ("empty solution", {"solution": ""}),
             3: ("unverifiable solution", {"solution": "<answer> </answer>"}),
             4: ("unreadable image or video", {"image": "img/truncated.jpg"}),
             5: ("unreadable image or video", {"image": "img/missing.jpg"}),
             6: (data.TOO_LONG, {"image": "img/large.jpg"}), 7: (None, {"image": None})}
    rows, drops, text_only = [], {}, 0
    for i in range(int(blocks * data.BLOCK)):
        reason, change = kinds.get(i % data.BLOCK, (None, {}))
        rows.append({"image": "img/small.jpg", "problem": f"Which colour is row {i}?",
                     "solution": "<answer>A</answer>", **change})
        if reason is not None:
            drops.setdefault(reason, []).append(i)
        text_only += i % data.BLOCK == 7
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path), {reason: drops[reason] for reason in data.DROP_REASONS if reason in drops}, text_only


def _prompt_limit(processor):
    """A --max_prompt_length between the prompts with a small picture and those with the large one, from the
    processor's own inputs (not from the check's count)."""
    from PIL import Image

    from grpo.families import build_inputs

    def length(side, problem):
        conversation = data.build_conversation(problem, None, 1)
        return build_inputs(processor, [conversation], [[Image.new("RGB", (side, side))]], QWEN)["input_ids"].shape[1]

    longest_small, shortest_large = length(56, "Which colour is row 1000?"), length(112, "Which colour is row 1?")
    assert longest_small + 6 < shortest_large
    return longest_small + 3


def _load_as_rank(path, processor, limit, folder, rank, world_size, num_proc, results):
    """One rank of world_size, as train.py loads (a forked process): its kept rows, drops and log lines."""
    from grpo.distributed import gather_from_files

    messages = []

    def share(check, key):
        return gather_from_files(check, os.path.join(folder, data.CHECK_FOLDER, key), rank, world_size, timeout_s=120)

    ds = data.load_prompt_dataset(path, "train", processor, QWEN, limit, log=messages.append,
                                  check_solution=_has_answer, num_proc=num_proc, share=share)
    results.put((rank, ds.keep, ds.dropped, messages))


def _load_on_ranks(path, processor, limit, folder, world_size, num_proc):
    import multiprocessing

    context = multiprocessing.get_context("fork")
    results = context.Queue()
    ranks = [context.Process(target=_load_as_rank,
                             args=(path, processor, limit, folder, r, world_size, num_proc, results))
             for r in range(world_size)]
    for process in ranks:
        process.start()
    found = sorted(results.get(timeout=300) for _ in ranks)
    for process in ranks:
        process.join(timeout=60)
        assert process.exitcode == 0
    return found


def test_the_ranks_shares_together_give_what_one_rank_alone_does(tmp_path, processor):
    """Four and a half blocks of rows, bad rows of every kind in each, checked by 3 ranks (rank 0 takes
    blocks 0 and 3, rank 1 blocks 1 and 4, rank 2 block 2), each with 2 worker processes, exchanged through
    files as train.py does: every rank keeps the same rows and logs the same lines as one rank alone, and
    both are the rows and drops the data was made with. A second start on the ranks reuses the result."""
    path, drops, text_only = _blocks_with_bad_rows(tmp_path, 4.5)
    limit = _prompt_limit(processor)
    dropped_rows = {i for found in drops.values() for i in found}
    keep = [i for i in range(int(4.5 * data.BLOCK)) if i not in dropped_rows]
    messages = []
    alone = data.load_prompt_dataset(path, "train", processor, QWEN, limit, log=messages.append,
                                     check_solution=_has_answer, num_proc=1)
    assert alone.keep == keep and alone.dropped == drops
    assert messages[-1] == f"[data] {len(keep)} prompts from {path!r} (split 'train'), {text_only} of them text-only"
    assert [m.split(":")[0] for m in messages[:-1]] == [f"[data] dropped {len(found)} of 288 rows"
                                                        for found in drops.values()]
    ranks = _load_on_ranks(path, processor, limit, str(tmp_path / "run"), world_size=3, num_proc=2)
    assert ranks == [(r, keep, drops, messages) for r in range(3)]
    (key,) = os.listdir(tmp_path / "run" / data.CHECK_FOLDER)
    again = _load_on_ranks(path, processor, limit, str(tmp_path / "run"), world_size=3, num_proc=2)
    reused = messages[:-1] + [messages[-1] + f"; checked by an earlier run ({data.CHECK_FOLDER}/{key})"]
    assert again == [(r, keep, drops, reused) for r in range(3)]


def test_a_stale_result_is_checked_again(tmp_path, processor):
    """The kept result is used again only while everything it depends on is as it was: a new
    --max_prompt_length, a picture file changed in place, or a changed data file each check the rows again
    (and the new drops show it); the result for the old settings stays usable."""
    path, drops, _ = _blocks_with_bad_rows(tmp_path, 0.5)
    limit, folder = _prompt_limit(processor), str(tmp_path / "run")

    def load(max_prompt_length):
        (rank, keep, dropped, messages), = _load_on_ranks(path, processor, max_prompt_length, folder, 1, 1)
        return dropped, "checked by an earlier run" in messages[-1]

    assert load(limit) == (drops, False)
    assert load(limit) == (drops, True)
    assert load(4096) == ({reason: rows for reason, rows in drops.items() if reason != data.TOO_LONG}, False)
    assert load(limit) == (drops, True)
    (tmp_path / "img" / "large.jpg").write_bytes(b"\xff\xd8 no longer a picture")  # row 6's picture, in place
    unreadable = {**drops, "unreadable image or video": [4, 5, 6]}
    del unreadable[data.TOO_LONG]
    assert load(limit) == (unreadable, False)
    with open(path, "a") as f:
        f.write(json.dumps({"image": "img/missing.jpg", "problem": "one more",
                            "solution": "<answer>B</answer>"}) + "\n")
    unreadable["unreadable image or video"].append(32)
    assert load(limit) == (unreadable, False)
    assert len(os.listdir(os.path.join(folder, data.CHECK_FOLDER))) == 4  # one result per key


def test_a_jpeg_is_checked_at_one_eighth_scale_as_in_full(tmp_path, processor):
    """JPEGs in an Image feature: a truncated one, one cut before its last scan, a corrupt one (bytes
    overwritten mid-scan) and a progressive one cut short are dropped exactly when a full decode fails, with
    its message; a picture turned by its EXIF orientation (datasets' Image feature turns it on reading) counts
    the tokens that training's inputs hold."""
    import datasets
    from PIL import Image

    from grpo.families import build_inputs

    picture = Image.frombytes("RGB", (120, 72), random.Random(0).randbytes(120 * 72 * 3))  # noise: long scans
    photo, progressive, turned = (io.BytesIO() for _ in range(3))
    picture.save(photo, format="JPEG", quality=90)
    picture.save(progressive, format="JPEG", quality=90, progressive=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    picture.save(turned, format="JPEG", exif=exif)
    photo, progressive, turned = photo.getvalue(), progressive.getvalue(), turned.getvalue()
    corrupt = photo[:len(photo) // 2] + b"\xff" * 64 + photo[len(photo) // 2 + 64:]  # markers mid-scan
    pictures = [_jpeg(56, (10, 20, 30)), photo[:len(photo) // 2], photo[:-400], corrupt,
                progressive[:len(progressive) * 2 // 3], turned]

    def full_decode_error(value):
        try:
            Image.open(io.BytesIO(value)).load()
        except Exception as e:  # noqa: BLE001
            return f"{type(e).__name__}: {e}"

    expected = [(i, error) for i, value in enumerate(pictures) if (error := full_decode_error(value)) is not None]
    assert [i for i, _ in expected] == [1, 2, 3, 4]  # all four fail in full
    rows = [{"image": {"bytes": value, "path": None}, "problem": f"q{i}", "solution": "<answer>A</answer>"}
            for i, value in enumerate(pictures)]
    folder = str(tmp_path / "ds")
    datasets.Dataset.from_list(rows, features=datasets.Features({"image": datasets.Image(), "problem": datasets.Value(
        "string"), "solution": datasets.Value("string")})).save_to_disk(folder)
    ds, messages = _load(folder, processor)
    assert ds.dropped == {"unreadable image or video": [i for i, _ in expected]}
    assert messages[0].startswith(f"[data] dropped {len(expected)} of 6 rows: unreadable image or video (")
    for i, error in expected[:3]:
        assert f"row {i}: {' '.join(error.split())}" in messages[0]
    example = ds[ds.keep.index(5)]
    assert example["images"][0].size == (72, 120)  # turned by datasets on reading
    length = build_inputs(processor, [example["prompt"]], [example["images"]], QWEN)["input_ids"].shape[1]
    assert _load(folder, processor, max_len=length)[0].dropped == ds.dropped
    assert _load(folder, processor, max_len=length - 1)[0].dropped[data.TOO_LONG][-1] == 5
