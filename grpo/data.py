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
is decoded, and each picture is decoded once; the ranks share the rows, and a resumed run reuses the
result. Then the order in which a rank meets the prompts, step by step, a function of the step count
alone (a resumed run continues it exactly), and each step's prompts prepared while the one before trains.
"""

from __future__ import annotations

import ast
import collections
import concurrent.futures
import copy
import hashlib
import io
import itertools
import multiprocessing
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
                        num_proc: int | None = None, share=None) -> PromptDataset:
    """Load, check every row once (RowCheck), and report what was dropped and why (one log line per reason).

    `processor` is the model's (families.load_processor sets its pixel limits), used to count the prompt's text
    tokens plus the image tokens the image will expand to. `check_solution(solution, problem)`, if
    given, returns None when the gold answer can be judged, else a short reason the row is dropped.
    `num_proc` worker processes check the rows (None: default_num_proc()). `share(check, key)`, if given, runs
    check(rank, world_size) on every rank, each rank checking its share of the rows, and returns (every
    share's result, whether they were kept from an earlier run): train.py's keeps them in
    output_dir/data-check/<key> (distributed.gather_from_files), `key` naming all they depend on (check_key).
    """
    rows = load_rows(dataset_name, split)
    check_columns(rows, dataset_name)
    if "video" in rows.column_names and not family.takes_video:
        raise UsageError(f"--dataset_name {dataset_name!r} has a `video` column, and this model's family takes no "
                         "video (the Qwen families do); drop the column or use a Qwen-VL model.")
    base_dir = os.path.dirname(os.path.abspath(dataset_name)) if os.path.isfile(dataset_name) else None
    checker = RowCheck(rows, base_dir, processor, family, max_prompt_length, system_prompt, check_solution)

    def check(rank: int, world_size: int) -> dict:
        return checker.share(rank, world_size, num_proc or default_num_proc(), progress)

    if share is None:
        shares, reused = [check(0, 1)], False
    else:
        key = check_key(rows, dataset_name, split, base_dir, processor, max_prompt_length, system_prompt,
                        check_solution)
        shares, reused = share(check, key)
    drops = {reason: [] for reason in DROP_REASONS}  # reason -> [(row, detail)], in row order
    for index, reason, detail in sorted(drop for part in shares for drop in part["drops"]):
        drops[reason].append((index, detail))
    drops = {reason: found for reason, found in drops.items() if found}
    for reason, found in drops.items():
        log(_drop_line(reason, found, len(rows), max_prompt_length))
    dropped = {reason: [i for i, _ in found] for reason, found in drops.items()}
    unusable = {i for found in dropped.values() for i in found}
    keep = [i for i in range(len(rows)) if i not in unusable]
    if not keep:
        counts = ", ".join(f"{reason}: {len(found)}" for reason, found in drops.items())
        error = UsageError(f"--dataset_name {dataset_name!r}: no usable rows out of {len(rows)}"
                           + (f" ({counts})." if counts else "."))
        error.dropped = dropped  # for data_tools.py
        raise error
    text_only = sum(part["text_only"] for part in shares)
    log(f"[data] {len(keep)} prompts from {dataset_name!r} (split {split!r})"
        + (f", {text_only} of them text-only" if text_only else "")
        + (f"; checked by an earlier run ({CHECK_FOLDER}/{key})" if reused else ""))
    return PromptDataset(rows, keep, base_dir, system_prompt, dropped)

# ---------------------------------------------------------------- the check of every row

CHECK_FOLDER = "data-check"  # in --output_dir: the check's result, a folder per key (check_key)
CHECK_VERSION = 1  # raised whenever what the check decides changes: results an older check kept are not reused
BLOCK = 64  # rows checked at a time: the ranks take the blocks in turn, a rank's workers share its blocks


def default_num_proc() -> int:
    """Worker processes per rank for the row check: this process's cores over the ranks on its machine
    (the launchers' LOCAL_WORLD_SIZE or LOCAL_SIZE), at most 16."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(16, cores // int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)))


class RowCheck:
    """What load_prompt_dataset asks of each row. The first reason that holds drops it, in this order: an
    empty problem, an empty solution, a gold answer check_solution cannot judge, a picture or video that
    does not decode, a prompt over max_prompt_length tokens; the text first, so a dropped row's pictures
    are never decoded.

    Pictures are read as the dataset stores them, not through `rows[i]` (which decodes them in full), and a
    JPEG decodes at 1/8 scale: libjpeg scales its DCT but still reads every byte, so a truncated or corrupt
    file fails as it does in full, in half the time (docs/PERFORMANCE.md). Where the processor counts an
    image's tokens from its size (Qwen's; the count is the same with width and height swapped, so an EXIF
    turn does not change it), the size is the header's, and a picture several rows hold is decoded once.
    Any other processor, a video, or a picture that fails this way is read again as training reads the row,
    whose outcome (and error message) is the row's."""

    def __init__(self, rows, base_dir, processor, family, max_prompt_length, system_prompt, check_solution):
        from .families import counts_from_size  # here, so that reading rows (data_tools.py) needs no torch

        self.rows, self.base_dir, self.processor, self.family = rows, base_dir, processor, family
        self.max_prompt_length, self.system_prompt = max_prompt_length, system_prompt
        self.check_solution = check_solution
        self.by_size, self.sizes = counts_from_size(processor), {}  # sizes: picture's digest or path -> its size
        self.stored = rows.with_format("arrow")  # slices of it: the rows as stored, pictures not decoded

    def share(self, rank: int, world_size: int, num_proc: int, progress: bool = False) -> dict:
        """A rank's share, every world_size-th block of rows from the rank-th, checked by num_proc worker
        processes: {"drops": [[row, reason, detail], ...], "text_only": how many kept rows have no picture}."""
        global _RUNNING
        starts = range(rank * BLOCK, len(self.rows), world_size * BLOCK)
        bar = tqdm(total=sum(min(BLOCK, len(self.rows) - s) for s in starts), desc="checking rows", unit="row",
                   disable=not progress)
        workers, pool, blocks = min(num_proc, len(starts)), None, map(self.block, starts)
        if workers > 1:  # forked: each worker has the rows and the processor without pickling them
            _RUNNING = self
            pool = concurrent.futures.ProcessPoolExecutor(workers, multiprocessing.get_context("fork"))
            blocks = pool.map(_check_block, starts)
        drops, text_only = [], 0
        try:
            for start, (block_drops, block_text_only) in zip(starts, blocks):
                drops += block_drops
                text_only += block_text_only
                bar.update(min(BLOCK, len(self.rows) - start))
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        return {"drops": drops, "text_only": text_only}

    def block(self, start: int) -> tuple[list[list], int]:
        """The BLOCK rows from `start`: their drops [row, reason, detail], and how many kept rows are text-only."""
        drops, text_only = [], 0
        for index, row in enumerate(self.stored[start:start + BLOCK].to_pylist(), start):
            fate = self.fate(index, row)
            if isinstance(fate, tuple):
                drops.append([index, *fate])
            text_only += fate == "text-only"
        return drops, text_only

    def fate(self, index: int, row: dict):
        """(reason, detail or None) for a row (as stored) to drop; "text-only" or "kept" for one to keep."""
        from .families import count_prompt_tokens

        problem, solution = row["problem"], row["solution"]
        if _blank(problem):
            return "empty problem", None
        if _blank(solution):
            return "empty solution", None
        if self.check_solution is not None and (why := self.check_solution(solution, problem)) is not None:
            return "unverifiable solution", why
        try:
            if not self.by_size or row.get("video") not in (None, []):
                raise LookupError("read in full")
            pictures, videos = [self.picture_size(value) for value in picture_values(row)], []
        except Exception:  # noqa: BLE001 (read again as training reads it, which gives the row's outcome)
            try:
                row = self.rows[index]  # decodes the row's pictures, where its columns are Image features
                pictures, videos = row_images(row, self.base_dir), row_videos(row, self.base_dir)
            except Exception as e:  # any decoding failure: the row is dropped and reported
                return "unreadable image or video", f"{type(e).__name__}: {e}"
        try:
            length = count_prompt_tokens(self.processor, build_conversation(problem, self.system_prompt, len(pictures),
                                                                            len(videos)), pictures, self.family, videos)
        except Exception as e:  # a picture the processor cannot take
            return "unreadable image or video", f"{type(e).__name__}: {e}"
        if length > self.max_prompt_length:
            return TOO_LONG, length
        return "kept" if pictures or videos else "text-only"

    def picture_size(self, value) -> tuple[int, int]:
        """(width, height) of a stored picture (bytes, {'bytes', 'path'} or a path), once it is found to decode."""
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, str) and not os.path.isabs(value) and self.base_dir is not None:
            value = os.path.join(self.base_dir, value)
        key = value if isinstance(value, str) else hashlib.blake2b(value, digest_size=16).digest()
        if key not in self.sizes:
            with Image.open(io.BytesIO(value) if isinstance(value, (bytes, bytearray)) else value) as image:
                size = image.size  # the header's: a draft's is smaller
                if image.format == "JPEG":
                    image.draft(image.mode, (image.width // 8, image.height // 8))
                image.load()
            self.sizes[key] = size
        return self.sizes[key]


_RUNNING: RowCheck | None = None  # the check whose blocks a forked worker process checks


def _check_block(start: int):
    return _RUNNING.block(start)


def check_key(rows, dataset_name: str, split: str, base_dir: str | None, processor, max_prompt_length: int,
              system_prompt: str | None, check_solution) -> str:
    """A name for the check's result that changes whenever the result could: the check's version, the
    dataset (name, split, and files with their sizes and modification times: the file or folder given,
    datasets' cache files, each picture or video a row names by path), the processor (its image settings,
    tokenizer and chat template), --max_prompt_length, the system prompt, the solution check, and the
    versions of transformers, Pillow, datasets and math-verify."""
    import json
    from importlib import metadata

    local = os.path.abspath(dataset_name) if os.path.exists(dataset_name) else None
    files = [entry["filename"] for entry in rows.cache_files] + _named_files(rows, base_dir)
    if local and os.path.isdir(local):
        files += [os.path.join(folder, name) for folder, _, names in os.walk(local) for name in names]
    elif local:
        files.append(local)
    stats = []
    for path in sorted(set(files)):
        found = os.stat(path) if os.path.exists(path) else None
        stats.append((path, found and found.st_size, found and found.st_mtime_ns))
    tokenizer = getattr(processor, "tokenizer", processor)
    ingredients = dict(
        version=CHECK_VERSION, dataset=local or dataset_name, split=split, files=stats,
        pictures=[getattr(processor, name).to_json_string() for name in ("image_processor", "video_processor")
                  if getattr(processor, name, None) is not None],
        tokenizer=[type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer), tokenizer.chat_template,
                   getattr(processor, "chat_template", None)],
        max_prompt_length=max_prompt_length, system_prompt=system_prompt or DEFAULT_SYSTEM_PROMPT,
        check_solution=check_solution and f"{check_solution.__module__}."
                                          f"{getattr(check_solution, '__qualname__', repr(check_solution))}",
        versions=[metadata.version(name) for name in ("transformers", "pillow", "datasets", "math-verify")])
    return hashlib.sha256(json.dumps(ingredients, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _named_files(rows, base_dir: str | None) -> list[str]:
    """The picture and video files the rows name by path (not stored in the dataset itself)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    names = []
    for column in [c for c in (*IMAGE_COLUMNS, "video") if c in rows.column_names]:
        values = rows.data.column(column)
        while pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
            values = pc.list_flatten(values)
        if pa.types.is_struct(values.type):  # an Image feature: a path where no bytes are stored
            values = pc.filter(pc.struct_field(values, "path"), pc.is_null(pc.struct_field(values, "bytes")))
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            names += [os.path.join(base_dir or "", name) for name in pc.unique(values).to_pylist() if name]
    return names


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


def data_order(args) -> dict:
    """The arguments that decide which prompts each step sees: a resume with others changes the order."""
    return {name: getattr(args, name) for name in ("dataset_name", "dataset_split", "seed",
                                                   "per_device_train_batch_size", "gradient_accumulation_steps",
                                                   "max_prompt_length")}


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


def prepared_prompts(dataset: PromptDataset, order, processor, family, rollouts: int, workers: int = 1):
    """Each step's (examples, model inputs on the CPU), read and built (families.build_inputs) ahead of it:
    while one step trains, `workers` background threads prepare the next, so the step finds its pictures
    decoded and processed. The steps come in the order `order` gives their dataset indices (step_prompts), and
    only `rollouts` (those left to run) are drawn from it, none past the run's end. The threads use a copy of
    the processor: its tokenizer must not run in two threads at once. workers = 0: each prepared when asked."""
    from .families import build_inputs

    processor, order = copy.deepcopy(processor) if workers > 0 else processor, itertools.islice(order, rollouts)

    def prepare(indices: list[int]) -> tuple[list[dict], dict]:
        examples = [dataset[i] for i in indices]
        return examples, build_inputs(processor, [ex["prompt"] for ex in examples], [ex["images"] for ex in examples],
                                      family, [ex["videos"] for ex in examples])

    if workers == 0:
        yield from map(prepare, order)
        return
    with concurrent.futures.ThreadPoolExecutor(workers, "prepare-prompts") as pool:
        ahead = collections.deque(pool.submit(prepare, indices) for indices in itertools.islice(order, workers))
        while ahead:
            ready = ahead.popleft()
            ahead.extend(pool.submit(prepare, indices) for indices in itertools.islice(order, 1))  # starts now
            yield ready.result()


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
