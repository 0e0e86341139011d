"""Evaluate a vision-language model on a dataset split: accuracy, pass@k and format rate, per sample and in all.

    python eval.py --model_name_or_path outputs/demo --dataset_name outputs/demo/demo-data --split test
    torchrun --nproc_per_node 8 eval.py --model_name_or_path M --dataset_name AI4Math/MathVista \\
        --split testmini --mode both --num_samples 8 --temperature 1.0 --output results/mathvista.json

Modes: `reasoning` prompts with the system prompt the model was trained with (its training_args.json,
else train.py's: think, then answer in tags); `direct` asks for the final answer alone; `both` runs
each. Answers are greedy; `--num_samples k` samples k per prompt with the trainer's group sampler
(each prompt encoded once per group) and adds pass@k (any of the k right).

Datasets, told apart by their columns and turned into the training schema (problem, solution
"<answer>X</answer>", images), so that prompts, row checks and judging are train.py's:
  training   problem, solution, image or images (as train.py reads them)
  MathVista  question, choices, answer, question_type, decoded_image or image
  MMMU       question, options, answer, image_1 ... image_7
Multiple-choice options are written into the question as "(A) ..." lines and the gold becomes the letter.

Outputs: the summary JSON goes to --output FILE (default eval-<dataset>-<split>.json in the model's
folder, or in the current folder for a hub id), and one JSON line per sample and mode to FILE's name
with .samples.jsonl in place of its extension; the summary is also printed as a table and as one
JSON line per mode.

Several processes (`torchrun --nproc_per_node N eval.py ...`, `deepspeed --num_gpus N eval.py ...`):
rank r takes batches r, r+N, r+2N ... of the batches one process would form, so every sample is
answered in the same batch, with the same sampling seed, as in one process; rank 0 gathers the records
and writes the outputs. One process without a launcher needs no process group.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile

import torch

from grpo import answers, config, data, families, policy, rewards
from grpo.config import UsageError, UsageParser, bad

MODES = ("reasoning", "direct")
DIRECT_SYSTEM_PROMPT = ("Answer the question with only the final answer: a number, an expression, "
                        "or the letter of the option.")
PLURAL = {"completion": "completions", "answer": "answers"}  # record keys when k answers are sampled
FORMATS = {  # name: (columns that tell it apart, columns it needs)
    "MathVista": (("choices", "question_type"), ("question", "choices", "answer", "question_type")),
    "MMMU": (("options", *data.MMMU_IMAGE_COLUMNS), ("question", "options", "answer")),
}


def trained_system_prompt(model_name_or_path: str) -> str | None:
    """The system prompt the model was trained with, from the training_args.json train.py saves."""
    path = os.path.join(model_name_or_path, "training_args.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("system_prompt")


# ---------------------------------------------------------------- datasets in other schemas


def dataset_format(columns: list[str], dataset_name: str) -> str:
    """"training", "MathVista" or "MMMU", from the columns; a format with a column missing is an error."""
    if "problem" in columns or "solution" in columns:
        return "training"  # data.load_prompt_dataset names any missing column itself
    for name, (marks, needed) in FORMATS.items():
        if any(c in columns for c in marks):
            missing = [c for c in needed if c not in columns]
            if missing:
                bad("dataset_name", f"{dataset_name!r} looks like {name}-style rows but has no column(s) {missing}; "
                    f"found {columns}.")
            return name
    bad("dataset_name", f"{dataset_name!r} has columns {columns}, which match no known format: training rows need "
        "problem, solution; MathVista-style rows question, choices, answer, question_type; MMMU-style rows "
        "question, options, answer.")


def to_training_schema(rows, fmt: str, folder: str, base_dir: str | None = None):
    """MathVista- or MMMU-style rows as a Dataset of (problem, solution, images), one row per row (so
    row indices stay the source's), written under `folder` rather than next to the source data. Images
    keep their encoded bytes (no decoding here); paths are taken relative to the source file."""
    import datasets

    for column in rows.column_names:
        if isinstance(rows.features[column], datasets.Image):
            rows = rows.cast_column(column, datasets.Image(decode=False))
    convert = {"MathVista": data.mathvista_row, "MMMU": data.mmmu_row}[fmt]

    def row_in_schema(row, index):
        converted = convert(row, index)
        converted["images"] = [os.path.join(base_dir, p) if isinstance(p, str) and base_dir and not os.path.isabs(p)
                               else p for p in converted["images"]]
        return converted

    features = datasets.Features({"problem": datasets.Value("string"), "solution": datasets.Value("string"),
                                  "images": datasets.Sequence(datasets.Image())})
    return rows.map(row_in_schema, with_indices=True, remove_columns=rows.column_names, features=features,
                    cache_file_name=os.path.join(folder, "converted.arrow"))


def load_examples(args, processor, family, system_prompt: str | None, folder: str, log, progress: bool):
    """The usable rows (data.PromptDataset), any of the three formats; rows no answer could be judged
    against are dropped and counted, as in training."""
    try:
        rows = data.load_rows(args.dataset_name, args.split)
    except UsageError:
        raise
    except KeyError:
        bad("split", f"{args.split!r} is not a split of {args.dataset_name!r}.")
    except (FileNotFoundError, ConnectionError) as e:
        bad("dataset_name", f"cannot load {args.dataset_name!r} (split {args.split!r}): {str(e).splitlines()[0]}")
    except (ValueError, IndexError) as e:  # how datasets reports an unknown split, or an empty one
        flag, what = ("dataset_name", "") if os.path.isfile(args.dataset_name) else ("split", f"split {args.split!r} of ")
        bad(flag, f"{what}{args.dataset_name!r} cannot be read; is it empty? ({type(e).__name__}: {str(e).splitlines()[0]})")
    if len(rows) == 0:
        bad("split", f"{args.split!r} of {args.dataset_name!r} has no rows.")
    source = args.dataset_name
    fmt = dataset_format(rows.column_names, args.dataset_name)
    if fmt != "training":
        log(f"[data] {fmt}-style rows: turned into the training schema")
        base_dir = os.path.dirname(os.path.abspath(args.dataset_name)) if os.path.isfile(args.dataset_name) else None
        source = os.path.join(folder, "rows")
        to_training_schema(rows, fmt, folder, base_dir).save_to_disk(source)

    def named(text: str) -> str:  # messages name the user's dataset, not the temporary folder
        return text.replace(repr(source), repr(args.dataset_name))

    try:
        return data.load_prompt_dataset(source, args.split, processor, family, args.max_prompt_length, system_prompt,
                                        log=lambda line: log(named(line)), progress=progress,
                                        check_solution=answers.unverifiable_reason)
    except UsageError as e:
        raise UsageError(named(str(e))) from None

# ---------------------------------------------------------------- answering and judging


def answer_batch(model, processor, family, examples: list[dict], system_prompt: str | None, args, device):
    """k completions per example (rows i*k .. i*k+k-1 for example i) and their lengths in tokens."""
    conversations = [data.build_conversation(ex["problem"], system_prompt, len(ex["images"]), len(ex["videos"]))
                     for ex in examples]
    inputs = families.build_inputs(processor, conversations, [ex["images"] for ex in examples], family,
                                      [ex["videos"] for ex in examples])
    inputs = {key: value.to(device) for key, value in inputs.items()}
    # Greedy (temperature 0: the argmax) or k samples at --temperature; the run's settings alone, every end
    # id, placeholders never drawn, as in training. Ranks run independently here (no ZeRO, no lockstep).
    greedy = args.num_samples is None
    sampling = policy.Sampling.for_model(
        model, processor.tokenizer, group_size=1 if greedy else args.num_samples, max_new_tokens=args.max_new_tokens,
        temperature=0.0 if greedy else args.temperature, share_prompt=not greedy,
        suppressed_ids=tuple(families.forbidden_token_ids(processor, model.config)))
    rollout = policy.sample_groups(model, inputs, sampling)
    return rollout.texts, rollout.completion_mask.sum(1).tolist()


def judge(examples: list[dict], mode: str, texts: list[str], lengths: list[int], k: int | None) -> list[dict]:
    """One record per example: its k completions (one when greedy), their answers and verdicts."""
    records = []
    for i, ex in enumerate(examples):
        group = slice(i * (k or 1), (i + 1) * (k or 1))
        # The verdict is training's: verify reads the whole completion (its answer tag, else its box,
        # else the final answer of its free text), so eval and the accuracy reward never disagree.
        gold = answers.read_gold(ex["solution"], ex["problem"])  # once for the example's k answers
        found = [answers.final_answer(text, gold.yes_no) for text in texts[group]]  # as judge reads it
        fields = {"completion": texts[group], "answer": [a for a, _ in found], "extracted_by": [how for _, how in found],
                  "correct": [answers.judge(text, gold) for text in texts[group]],
                  "format": [f == 1.0 for f in rewards.format_reward(texts[group])], "tokens": lengths[group]}
        record = {"id": ex["row_index"], "mode": mode, "question": ex["problem"], "gold": answers.extract_answer(ex["solution"])}
        if k is None:
            record.update({key: values[0] for key, values in fields.items()})
        else:
            record.update({PLURAL.get(key, key): values for key, values in fields.items()}, pass_at_k=any(fields["correct"]))
        records.append(record)
    return records


def in_order(records: list[dict], ids: list[int], modes: list[str]) -> list[dict]:
    """The records of every rank by mode then row, after checking each (mode, row) is there exactly once."""
    expected = {(mode, i): n for n, (mode, i) in enumerate((m, i) for m in modes for i in ids)}
    counts = collections.Counter((r["mode"], r["id"]) for r in records)
    missing = [key for key in expected if key not in counts]
    duplicated = [key for key, count in counts.items() if count > 1 or key not in expected]
    if missing or duplicated:
        raise RuntimeError(f"the ranks' records do not add up: missing (mode, row) {missing[:5]}, "
                           f"duplicated or unexpected {duplicated[:5]}")
    return sorted(records, key=lambda r: expected[(r["mode"], r["id"])])


def summarise(records: list[dict], k: int | None) -> dict:
    def every(key):  # over all completions
        return [v for r in records for v in (r[key] if k else [r[key]])]

    hows = every("extracted_by")
    summary = {"samples": len(records), "accuracy": sum(every("correct")) / len(hows)}
    if k:
        summary["pass_at_k"] = sum(r["pass_at_k"] for r in records) / len(records)
    summary.update(format=sum(every("format")) / len(hows), mean_tokens=sum(every("tokens")) / len(hows),
                   not_extracted=hows.count("none"), extracted_by=dict(collections.Counter(hows)))
    return summary


def table(summary: dict) -> str:
    k = summary["num_samples"]
    head = ["mode", "samples", "accuracy", *([f"pass@{k}"] if k else []), "format", "tokens", "no answer"]
    lines = [head] + [[mode, str(s["samples"]), f"{s['accuracy']:.3f}", *([f"{s['pass_at_k']:.3f}"] if k else []),
                       f"{s['format']:.3f}", f"{s['mean_tokens']:.1f}", str(s["not_extracted"])]
                      for mode, s in summary["modes"].items()]
    widths = [max(len(line[c]) for line in lines) for c in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(line, widths)))
                     for line in lines)

# ---------------------------------------------------------------- the run


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = UsageParser(prog="eval.py", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--model_name_or_path", required=True, help="Folder or hub id of the model to evaluate.")
    add("--dataset_name", required=True, help="Hub id, save_to_disk folder, or .parquet / .jsonl file (training, MathVista or MMMU columns).")
    add("--split", default="test", help="Dataset split.")
    add("--mode", default="reasoning", help="reasoning (the training prompt), direct (the final answer only), or both.")
    add("--max_samples", type=int, default=None, help="Evaluate only the first N usable rows.")
    add("--batch_size", type=int, default=16, help="Prompts per generate call.")
    add("--max_new_tokens", type=int, default=64, help="Most tokens per answer.")
    add("--num_samples", type=int, default=None, help="k >= 2: sample k answers per prompt and report pass@k (default: one greedy answer).")
    add("--temperature", type=float, default=None, help="Sampling temperature with --num_samples (default 1.0).")
    add("--seed", type=int, default=0, help="Sampling seed; batch b samples with seed + b, so results do not depend on the number of processes.")
    add("--output", default=None, help="Summary JSON file; per-sample lines go to its name with .samples.jsonl (default: eval-<dataset>-<split>.json in the model's folder, or here for a hub id).")
    add("--system_prompt", default=None, help="Reasoning mode's system prompt (default: the one the model was trained with, from its training_args.json, else train.py's).")
    add("--max_prompt_length", type=int, default=8192, help="Rows whose prompt (image tokens included) is longer are dropped.")
    add("--min_pixels", type=int, default=3136, help="Qwen families: smallest image area after resizing.")
    add("--max_pixels", type=int, default=12845056, help="Qwen families: largest image area after resizing.")
    add("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # passed by the deepspeed launcher; LOCAL_RANK is read instead
    return parser.parse_args(argv)


def output_paths(args) -> tuple[str, str]:
    """(summary JSON, per-sample JSONL)."""
    path = args.output
    if path is None:
        name = args.dataset_name.replace("/", "_")  # a hub id
        if os.path.exists(args.dataset_name):
            name = os.path.splitext(os.path.basename(os.path.normpath(args.dataset_name)))[0]
        path = f"eval-{name}-{args.split}.json"
        path = os.path.join(args.model_name_or_path, path) if os.path.isdir(args.model_name_or_path) else path
    return path, os.path.splitext(path)[0] + ".samples.jsonl"


def check_args(args) -> None:
    """Stop before anything loads when the arguments cannot work."""
    if args.mode not in (*MODES, "both"):
        bad("mode", f"{args.mode!r} is unknown; choose reasoning, direct or both.")
    if args.num_samples is not None and args.num_samples < 2:
        bad("num_samples", f"is {args.num_samples}; give k >= 2 to sample k answers per prompt (pass@k), "
            "or leave it out for one greedy answer.")
    if args.temperature is not None and args.num_samples is None:
        bad("temperature", "only applies when sampling; add --num_samples k (k >= 2), or drop it for greedy answers.")
    if args.temperature is not None and args.temperature <= 0:
        bad("temperature", f"is {args.temperature}; sampling needs a positive temperature.")
    for flag in ("max_samples", "batch_size", "max_new_tokens", "max_prompt_length"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            bad(flag, f"is {getattr(args, flag)}; it must be at least 1.")
    if args.min_pixels > args.max_pixels:
        bad("min_pixels", f"{args.min_pixels} is above --max_pixels {args.max_pixels}.")
    model, dataset = args.model_name_or_path, args.dataset_name
    config.check_model_path(model)
    if not os.path.exists(dataset) and (os.path.splitext(dataset)[1] in (".parquet", ".jsonl", ".json")
                                        or not config.looks_like_hub_id(dataset)):
        bad("dataset_name", f"{dataset!r}: no such file or folder (give a .parquet / .jsonl file, a save_to_disk "
            "folder, or a hub id owner/name).")
    summary_path = output_paths(args)[0]
    try:
        os.makedirs(os.path.dirname(os.path.abspath(summary_path)), exist_ok=True)
        with tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(summary_path))):
            pass
    except OSError as e:
        bad("output", f"{summary_path!r} cannot be written: {e.strerror or e}; give --output FILE in a writable folder.")


def distributed_setup() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from the launcher's variables (torchrun, deepspeed); one process
    without them is rank 0 of 1. Each rank runs on its own GPU when there are GPUs."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return rank, world_size, device


def evaluate(args: argparse.Namespace, log=print) -> dict:
    """Answer, judge and summarise; returns the summary (what --output holds) on every rank."""
    check_args(args)
    rank, world_size, device = distributed_setup()
    log = log if rank == 0 else (lambda *a, **k: None)
    modes = list(MODES) if args.mode == "both" else [args.mode]
    prompts = {"reasoning": args.system_prompt or trained_system_prompt(args.model_name_or_path),
               "direct": DIRECT_SYSTEM_PROMPT}
    if args.num_samples is not None and args.temperature is None:
        args.temperature = 1.0
    try:
        family = families.check_model_type(args.model_name_or_path)
    except OSError as e:
        bad("model_name_or_path", f"cannot read {args.model_name_or_path!r}: {str(e).splitlines()[0]}")
    processor = families.load_processor(args.model_name_or_path, args.min_pixels, args.max_pixels)
    with tempfile.TemporaryDirectory(prefix="eval-rows-") as folder:
        dataset = load_examples(args, processor, family, prompts["reasoning"], folder, log, progress=rank == 0)
        count = len(dataset) if args.max_samples is None else min(args.max_samples, len(dataset))
        model = families.load_model(args.model_name_or_path, torch.bfloat16 if device.type == "cuda" else torch.float32)
        model.to(device).eval()
        if world_size > 1:
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        try:
            records = run_batches(model, processor, family, dataset, count, modes, prompts, args, rank, world_size, device)
            if world_size > 1:
                gathered = [None] * world_size
                torch.distributed.all_gather_object(gathered, records)
                records = [record for part in gathered for record in part]
        finally:
            if world_size > 1:
                torch.distributed.destroy_process_group()
    records = in_order(records, dataset.keep[:count], modes)
    summary_path, samples_path = output_paths(args)
    summary = {"model": args.model_name_or_path, "dataset": args.dataset_name, "split": args.split,
               "num_samples": args.num_samples, "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
               "dropped": {reason: len(rows) for reason, rows in dataset.dropped.items()}, "samples_file": samples_path,
               "modes": {mode: summarise([r for r in records if r["mode"] == mode], args.num_samples) for mode in modes}}
    if rank == 0:
        with open(samples_path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        with open(summary_path, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, ensure_ascii=False)
        log(table(summary))
        for mode, result in summary["modes"].items():  # one line per mode, for scripts: {"model": ..., "accuracy": ...}
            log(json.dumps({"model": args.model_name_or_path, "dataset": args.dataset_name, "split": args.split,
                            "mode": mode, **result}))
        log(f"[eval] summary in {summary_path}, one line per sample and mode in {samples_path}")
    return summary


def run_batches(model, processor, family, dataset, count: int, modes: list[str], prompts: dict, args, rank: int,
                world_size: int, device) -> list[dict]:
    """This rank's records: batches rank, rank + world_size, ... of the batches one process forms, so a
    sample's batch (its padding, its neighbours) and its sampling seed never depend on the world size."""
    from tqdm.auto import tqdm

    batches = [range(start, min(start + args.batch_size, count)) for start in range(0, count, args.batch_size)]
    records = []
    for b in tqdm(range(rank, len(batches), world_size), desc="evaluating", unit="batch", disable=rank != 0):
        examples = [dataset[i] for i in batches[b]]
        for mode in modes:
            torch.manual_seed(args.seed + b)
            texts, lengths = answer_batch(model, processor, family, examples, prompts[mode], args, device)
            records += judge(examples, mode, texts, lengths, args.num_samples)
    return records


def cli(argv: list[str]) -> int:
    return config.exit_status("eval.py", lambda: evaluate(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
