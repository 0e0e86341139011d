"""Prompts for GRPO: load the rows, check them once, build the conversations.

A row has a `problem` and a `solution` (ending in <answer>X</answer>), and its pictures: an
`image` (like lmms-lab/multimodal-open-r1-8k-verified), or an `images` list for several, or none
(a text-only row: `image` empty, or no picture column at all). Sources: a hub id, a `save_to_disk` folder, a .parquet or
.jsonl file (its image column may hold images, bytes, or paths relative to the file).

Everything that could break a run mid-way is checked here, at load time, and each dropped row is
counted under the first reason that holds, in this order: an empty problem, an empty solution, a
gold answer the reward cannot judge (when a `check_solution` is given), an unreadable image or
video, a prompt longer than --max_prompt_length (a prompt holding image tokens is never truncated:
cutting them breaks the forward: [truncated prompts]). The text checks come first, before any picture
is decoded, and each picture is decoded once. Then the order in which a rank meets the prompts, step by
step, a function of the step count alone (a resumed run continues it exactly).
"""

from __future__ import annotations

import ast
import io
import itertools
import os
import random
import string
from typing import Callable

from PIL import Image
from tqdm.auto import tqdm

from . import answers
from .config import UsageError

REQUIRED_COLUMNS = ("problem", "solution")
IMAGE_COLUMNS = ("images", "image")  # a list of images, or one; a row may leave both empty
TOO_LONG = "prompt over --max_prompt_length"
DROP_REASONS = ("empty problem", "empty solution", "unverifiable solution", "unreadable image or video", TOO_LONG)

DEFAULT_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question about an image, and the "
    "Assistant solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think><answer> answer here </answer>"
)


def load_rows(dataset_name: str, split: str = "train"):
    """A `datasets.Dataset` from a hub id, a save_to_disk folder, or a parquet / jsonl file."""
    import datasets

    if os.path.isdir(dataset_name):
        loaded = datasets.load_from_disk(dataset_name)
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    if os.path.isfile(dataset_name):
        kind = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}.get(os.path.splitext(dataset_name)[1])
        if kind is None:
            raise UsageError(f"--dataset_name: {dataset_name!r} is a file, but only .parquet, .jsonl and .json "
                             "files are read; or pass a save_to_disk folder or a hub id.")
        return datasets.load_dataset(kind, data_files=dataset_name, split="train")
    return datasets.load_dataset(dataset_name, split=split)


def check_columns(rows, dataset_name: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in rows.column_names]
    if missing:
        raise UsageError(f"--dataset_name {dataset_name!r}: missing column(s) {missing}; the dataset has "
                         f"{rows.column_names}, and GRPO needs {list(REQUIRED_COLUMNS)}.")


def to_pil(value, base_dir: str | None = None) -> Image.Image:
    """An RGB image from what an image column holds: a PIL image, bytes, {'bytes', 'path'}, or a path."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        value = Image.open(io.BytesIO(value))
    elif isinstance(value, str):
        path = value if os.path.isabs(value) or base_dir is None else os.path.join(base_dir, value)
        value = Image.open(path)
    if not isinstance(value, Image.Image):
        raise TypeError(f"an image column cannot hold {type(value).__name__}")
    value.load()
    return value.convert("RGB")


def picture_values(row: dict) -> list:
    """The row's pictures as stored, not decoded, in order: its `images` list, else its `image`,
    else none (text-only)."""
    for column in IMAGE_COLUMNS:
        value = row.get(column)
        if value is not None and value != []:
            return list(value) if column == "images" else [value]
    return []


def row_images(row: dict, base_dir: str | None = None) -> list[Image.Image]:
    """The row's pictures, decoded (picture_values)."""
    return [to_pil(value, base_dir) for value in picture_values(row)]


def row_videos(row: dict, base_dir: str | None = None) -> list:
    """The row's `video`, if any, as a list of one video: its frames (images) or a file path, which
    the processor decodes."""
    value = row.get("video")
    if value is None or value == []:
        return []
    if isinstance(value, str):
        path = value if os.path.isabs(value) or base_dir is None else os.path.join(base_dir, value)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"video file {path!r} not found")
        return [path]
    return [[to_pil(frame, base_dir) for frame in value]]


def build_conversation(problem: str, system_prompt: str | None = None, num_images: int = 1,
                       num_videos: int = 0) -> list[dict]:
    """System turn asking for <think>/<answer>, user turn with the videos and images (if any), then the problem."""
    return [
        # As a list of parts: some families' templates drop a system turn given as a plain string.
        {"role": "system", "content": [{"type": "text", "text": system_prompt or DEFAULT_SYSTEM_PROMPT}]},
        {"role": "user", "content": [{"type": "video"}] * num_videos + [{"type": "image"}] * num_images
                                    + [{"type": "text", "text": problem}]},
    ]


class PromptDataset:
    """The usable rows of a dataset; images are decoded again on access, so memory stays flat.
    `dropped` maps each reason (of DROP_REASONS) that dropped a row to all the row indices it dropped."""

    def __init__(self, rows, keep: list[int], base_dir: str | None, system_prompt: str | None,
                 dropped: dict[str, list[int]] | None = None):
        self.rows, self.keep, self.base_dir, self.system_prompt = rows, keep, base_dir, system_prompt
        self.dropped = dropped or {}

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[self.keep[i]]
        example = {k: v for k, v in row.items() if k not in (*IMAGE_COLUMNS, "video")}
        example["images"], example["videos"] = row_images(row, self.base_dir), row_videos(row, self.base_dir)
        example["prompt"] = build_conversation(row["problem"], self.system_prompt, len(example["images"]),
                                               len(example["videos"]))
        example["row_index"] = self.keep[i]  # its row in the source dataset, for messages
        return example


def _blank(text) -> bool:
    return not isinstance(text, str) or not text.strip()


def _drop_line(reason: str, drops: list[tuple[int, object]], total: int, max_prompt_length: int) -> str:
    """One log line for one reason: its count, and its first three rows with their detail."""
    if reason == TOO_LONG:
        reason += f" {max_prompt_length}, longest {max(n for _, n in drops)} tokens"
        drops = [(i, f"{n} tokens") for i, n in drops]
    first = drops[:3]
    if any(detail is not None for _, detail in first):
        where = "; ".join(f"row {i}: " + " ".join(str(detail).split()) for i, detail in first)
        where += "; ..." if len(drops) > 3 else ""
    else:
        where = ("row " if len(drops) == 1 else "rows ") + ", ".join(str(i) for i, _ in first)
        where += ", ..." if len(drops) > 3 else ""
    return f"[data] dropped {len(drops)} of {total} rows: {reason} ({where})"


def load_prompt_dataset(dataset_name: str, split: str, processor, family, max_prompt_length: int,
                        system_prompt: str | None = None, log=print, progress: bool = False,
                        check_solution: Callable[[str, str | None], str | None] | None = None,
                        decide=lambda check: check()) -> PromptDataset:
    """Load, check every row once (each picture decoded once), and report what was dropped and why
    (one log line per reason).

    `processor` is the model's (families.load_processor sets its pixel limits), used to count the prompt's text
    tokens plus the image tokens the image will expand to. `check_solution(solution, problem)`, if
    given, returns None when the gold answer can be judged, else a short reason the row is dropped.
    `decide(check)` runs the check, which returns (kept rows, dropped rows by reason): here, or on one
    rank alone, its result given to the others (distributed.rank0_decides), which check nothing.
    """
    rows = load_rows(dataset_name, split)
    check_columns(rows, dataset_name)
    if "video" in rows.column_names and not family.takes_video:
        raise UsageError(f"--dataset_name {dataset_name!r} has a `video` column, and this model's family takes no "
                         "video (the Qwen families do); drop the column or use a Qwen-VL model.")
    base_dir = os.path.dirname(os.path.abspath(dataset_name)) if os.path.isfile(dataset_name) else None
    keep, dropped = decide(lambda: _check_rows(rows, dataset_name, split, processor, family, max_prompt_length,
                                               system_prompt, base_dir, log, progress, check_solution))
    return PromptDataset(rows, keep, base_dir, system_prompt, dropped)


def _check_rows(rows, dataset_name, split, processor, family, max_prompt_length, system_prompt, base_dir, log,
                progress, check_solution) -> tuple[list[int], dict[str, list[int]]]:
    """Every row checked once: (the usable rows, the dropped rows by reason), each reason logged."""
    from .families import count_prompt_tokens  # here, so that reading rows (data_tools.py) needs no torch
    text_only = []  # kept rows without pictures, noted while their pictures are looked at

    def drop_reason(index: int, problem, solution) -> tuple[str, object] | None:
        """(reason, detail or None) for a row to drop, or None to keep it: text first, pictures last."""
        if _blank(problem):
            return "empty problem", None
        if _blank(solution):
            return "empty solution", None
        if check_solution is not None and (why := check_solution(solution, problem)) is not None:
            return "unverifiable solution", why
        try:
            row = rows[index]  # decodes the row's pictures, where its columns are Image features
            images, videos = row_images(row, base_dir), row_videos(row, base_dir)
            conversation = build_conversation(problem, system_prompt, len(images), len(videos))
            length = count_prompt_tokens(processor, conversation, images, family, videos)
        except Exception as e:  # any decoding failure: the row is dropped and reported
            return "unreadable image or video", f"{type(e).__name__}: {e}"
        if length > max_prompt_length:
            return TOO_LONG, length
        if not images and not videos:
            text_only.append(index)
        return None

    keep, drops = [], {reason: [] for reason in DROP_REASONS}  # reason -> [(row, detail)]
    texts = rows.select_columns(list(REQUIRED_COLUMNS))  # no picture decoded for the text checks
    for index, text in enumerate(tqdm(texts, desc="checking rows", unit="row", disable=not progress)):
        dropped = drop_reason(index, text["problem"], text["solution"])
        if dropped is None:
            keep.append(index)
        else:
            drops[dropped[0]].append((index, dropped[1]))
    drops = {reason: found for reason, found in drops.items() if found}
    for reason, found in drops.items():
        log(_drop_line(reason, found, len(rows), max_prompt_length))
    if not keep:
        counts = ", ".join(f"{reason}: {len(found)}" for reason, found in drops.items())
        error = UsageError(f"--dataset_name {dataset_name!r}: no usable rows out of {len(rows)}"
                           + (f" ({counts})." if counts else "."))
        error.dropped = {reason: [i for i, _ in found] for reason, found in drops.items()}  # for data_tools.py
        raise error
    log(f"[data] {len(keep)} prompts from {dataset_name!r} (split {split!r})"
        + (f", {len(text_only)} of them text-only" if text_only else ""))
    return keep, {reason: [i for i, _ in found] for reason, found in drops.items()}


def rank_batches(num_rows: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int):
    """Index batches for one rank and epoch: one shuffled order shared by all ranks, dealt out
    round-robin so ranks never see the same prompt; the tail that would leave ranks uneven is dropped
    (every rank must take the same number of steps)."""
    order = list(range(num_rows))
    random.Random(seed + epoch).shuffle(order)
    per_step = batch_size * world_size
    for start in range(0, num_rows - per_step + 1, per_step):
        step = order[start:start + per_step]
        yield step[rank::world_size]


def steps_per_epoch(num_rows: int, batch_size: int, world_size: int) -> int:
    return num_rows // (batch_size * world_size)


def optimizer_steps(num_prompts: int, args, world_size: int) -> tuple[int, int]:
    """(the run's optimizer steps, the prompts per epoch left out so that every rank takes as many):
    --max_steps, else --num_train_epochs passes, each rollout giving --num_iterations steps."""
    per_device, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    batches = steps_per_epoch(num_prompts, per_device, world_size)
    if batches < accumulation:
        raise UsageError(f"--dataset_name: {num_prompts} prompts are fewer than one optimizer step needs "
                         f"({per_device} per device x {world_size} ranks x {accumulation} accumulation steps).")
    rollouts = max(1, int(args.num_train_epochs * (batches // accumulation)))
    total = args.max_steps if args.max_steps > 0 else rollouts * args.num_iterations
    return total, num_prompts - batches * per_device * world_size


def step_prompts(num_rows: int, per_device: int, accumulation_steps: int, rank: int, world_size: int, seed: int,
                 start_rollout: int = 0):
    """Endless dataset indices for this rank, one optimizer step's worth (per_device x accumulation
    steps prompts) at a time; a new shuffled order each epoch (rank_batches deals them out).
    start_rollout skips the steps a resumed run has already taken: the order is a function of the
    step count alone, so nothing is skipped or repeated."""
    batches_per_epoch = steps_per_epoch(num_rows, per_device, world_size)
    skip = start_rollout * accumulation_steps
    epoch = skip // batches_per_epoch
    batches = itertools.islice(rank_batches(num_rows, per_device, rank, world_size, seed, epoch),
                               skip % batches_per_epoch, None)
    step = []
    while True:
        batch = next(batches, None)
        if batch is None:  # epoch over: a new order
            epoch += 1
            batches = rank_batches(num_rows, per_device, rank, world_size, seed, epoch)
            continue
        step.extend(batch)
        if len(step) == per_device * accumulation_steps:
            yield step
            step = []


# ---------------------------------------------------------------- other layouts, as training rows
# Benchmarks and VQA sets keep their options in a column of their own; eval.py and data_tools.py
# write them into the problem with letters, as the training data does, and the gold becomes the letter.

MMMU_IMAGE_COLUMNS = [f"image_{i}" for i in range(1, 8)]


def with_options(question: str, options: list, row: int) -> str:
    """The question followed by its options, lettered one per line as answers.parse_options reads them."""
    if len(options) > 26:
        raise UsageError(f"--dataset_name: row {row} has {len(options)} options; at most 26 can be lettered A to Z.")
    lines = [f"({letter}) {' '.join(str(option).split())}" for letter, option in zip(string.ascii_uppercase, options)]
    return question.rstrip() + "\nChoices:\n" + "\n".join(lines)


def option_list(value, row: int) -> list:
    """A row's options: a list, or its text ("['1', '2']", as MMMU stores them); [] when absent."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value) if value.strip() else []
        except (ValueError, SyntaxError):
            value = None
    if not isinstance(value, (list, tuple)):
        raise UsageError(f"--dataset_name: row {row}: options {str(value)[:80]!r} are not a list (nor its text, "
                         "like \"['1', '2']\").")
    return list(value)


def letter_of(answer: str, options: list) -> str:
    """The letter of the option whose text is the answer (spacing aside, as with_options writes it), or
    of an answer given as a letter already ("B", "(B)"); else the answer itself, which verify still
    matches to an option's text."""
    texts = [" ".join(str(option).split()) for option in options]
    if " ".join(answer.split()) in texts:
        return string.ascii_uppercase[texts.index(" ".join(answer.split()))]
    return answers.as_letter(answer, string.ascii_uppercase[min(len(options), 26) - 1]) or answer


def mathvista_row(row: dict, index: int) -> dict:
    """A MathVista-style row (question, choices, answer, question_type, decoded_image) as a training row."""
    question, answer = row["question"] or "", str(row["answer"] or "")
    if row["question_type"] == "multi_choice" and row["choices"]:
        question, answer = with_options(question, row["choices"], index), letter_of(answer, row["choices"])
    picture = row.get("decoded_image") if row.get("decoded_image") is not None else row.get("image")
    return {"problem": question, "solution": f"<answer>{answer}</answer>", "images": [] if picture is None else [picture]}


def mmmu_row(row: dict, index: int) -> dict:
    """An MMMU-style row (question, options as a list or its text, answer letter, image_1 ... image_7) as a training row."""
    options = option_list(row["options"], index)
    question = row["question"] or ""
    if options:
        question = with_options(question, options, index)
    images = [row[c] for c in MMMU_IMAGE_COLUMNS if row.get(c) is not None]
    return {"problem": question, "solution": f"<answer>{str(row['answer'] or '').strip()}</answer>", "images": images}
