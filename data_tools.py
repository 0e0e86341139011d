"""Look at a dataset before training on it, and bring common VQA layouts into the training schema.

    python data_tools.py inspect DATASET [--split train] [--model_name_or_path M] [--html PAGE.html] [--samples N]
    python data_tools.py convert SOURCE OUT.parquet [--split train] [--format auto|vqa|mathvista|scienceqa|mmmu|training]
    python data_tools.py rollouts RUN_DIR [--html PAGE.html] [--steps N]
    python data_tools.py plot RUN_DIR [RUN_DIR ...] [--out DIR]

`inspect` answers, before any GPU time is spent, what training will make of a dataset: its rows and
columns, pictures per row and their sizes, what kind of gold answers it holds and how many of them the
accuracy reward can judge, prompt lengths in tokens (with a model's processor, image tokens included),
and which rows training would drop and why. With a model the drops are the trainer's own
(grpo.data.load_prompt_dataset with answers.unverifiable_reason), so the report cannot disagree with
the run; without one, the same checks run on their own, all but the prompt length. It prints the
report, writes it as JSON, and writes one HTML page of sample rows (thumbnails embedded, filters by
answer type and drop reason) that opens offline, with no server.

`convert` writes a parquet file in the training schema (`images`, `problem` with its options lettered
exactly as eval.py writes them, `solution` "<answer>X</answer>") from plain VQA, MathVista-, ScienceQA-
and MMMU-style rows, keeping only the rows whose gold answer the reward can judge and whose pictures
decode: a row no completion can be rewarded on only costs generations. What it drops is reported.
Rows already in the training schema go through the same checks unchanged, their pictures packed into
the one file: the usable part of a dataset, ready to copy to a cluster.

`rollouts` shows what a run's model wrote: a page of RUN_DIR/completions.jsonl (train.py
--log_completions_steps), one card per group, the G completions of one prompt at one step, with the
prompt's pictures (read again from the run's dataset, as training_args.json names it), each
completion's reward per function, total and advantage, and the groups whose rewards were all equal
marked: those teach the policy nothing, and a run made mostly of them is not learning.

`plot` draws a run's metrics.jsonl (rewards, completion lengths, loss terms per step; several runs on
one figure) as RUN_DIR/plots/*.png. train.py runs it in the background at each save and at the end,
so the training processes never load matplotlib.

Usage errors print one line, `data_tools.py: error: ...`, and exit with status 2.
"""

from __future__ import annotations

import argparse
import base64
import collections
import html
import io
import json
import math
import os
import statistics
import string
import sys
import tempfile
from fnmatch import fnmatchcase
from typing import NamedTuple

from grpo import answers, data
from grpo.data import MMMU_IMAGE_COLUMNS, letter_of, mathvista_row, mmmu_row, option_list, with_options
from grpo.config import UsageError, UsageParser, check_model_path, exit_status, looks_like_hub_id

ANSWER_TYPES = ("option letter", "number", "expression", "free text", "no answer")
EMPTY_PROBLEM, EMPTY_SOLUTION, UNVERIFIABLE, UNREADABLE, TOO_LONG = data.DROP_REASONS
BAD_OPTIONS = "bad options or answer index"
FIRST_DROPS = 5      # rows named per drop reason in a report
THUMBNAIL = 160      # longest side of a thumbnail on the page, pixels
MAX_FRAMES = 4       # frames of a video shown on a card, evenly spaced, first and last included
MAX_SHOWN_TEXT = 2000  # characters of a problem or solution shown on a card


# ---------------------------------------------------------------- reading a dataset


def load(name: str, split: str, what: str):
    """The rows, read as training reads them (grpo.data.load_rows); a dataset that cannot be read is
    a usage error naming the argument (`what`: DATASET or SOURCE)."""
    if not os.path.exists(name) and (os.path.splitext(name)[1] in (".parquet", ".jsonl", ".json")
                                     or not looks_like_hub_id(name)):
        raise UsageError(f"{what} {name!r}: no such file or folder (give a .parquet / .jsonl file, a save_to_disk "
                         "folder, or a hub id owner/name).")
    try:
        rows = data.load_rows(name, split)
    except UsageError as e:
        raise UsageError(str(e).replace("--dataset_name", what)) from None
    except KeyError:
        raise UsageError(f"--split {split!r} is not a split of {what} {name!r}.") from None
    except Exception as e:  # offline hub id, unreadable file, unknown split, ...: one line, not a traceback
        first = (str(e).splitlines() or [""])[0]
        raise UsageError(f"{what} {name!r} (split {split!r}) cannot be read: {type(e).__name__}: {first}") from None
    if len(rows) == 0:
        raise UsageError(f"{what} {name!r} (split {split!r}) has no rows.")
    return rows


def raw_rows(rows, batch_size: int = 64):
    """Each row as a dict with its pictures still encoded ({'bytes', 'path'} or a path): decoding is
    left to data.row_images, so a corrupt picture becomes a counted drop instead of an error on access."""
    for batch in rows.with_format("arrow").iter(batch_size):
        yield from batch.to_pylist()


def base_dir_of(name: str) -> str | None:
    """Where relative picture paths start, as training reads them: the folder of a .parquet/.jsonl file."""
    return os.path.dirname(os.path.abspath(name)) if os.path.isfile(name) else None


def blank(text) -> bool:
    return not isinstance(text, str) or not text.strip()


def answer_type(solution, problem) -> str:
    """What kind of gold answer a row holds, from the answer verify reads (answers.final_answer):
    "option letter" (answers.as_letter, up to the last option the problem lists, else E), "number" (a
    single numeric literal once answers' normalisation drops units, degrees and percent: 12, -3, 4.5,
    1,000, 40°), "expression" (any other single value, answers.value_kind: 9/2, \\frac{1}{2}, 2x, \\pi),
    "free text" (the rest: words, tuples, sets), or "no answer" (empty)."""
    answer = answers.final_answer(solution)[0] if isinstance(solution, str) else ""
    if not answer.strip():
        return "no answer"
    options = answers.parse_options(problem if isinstance(problem, str) else None)
    if answers.as_letter(answer, max(options) if options else "E") is not None:
        return "option letter"
    return answers.value_kind(answer) or "free text"


def spread(values: list) -> dict | None:
    if not values:
        return None
    median = statistics.median(values)  # of an even count, a mean: 4.0 is written 4, 4.5 stays
    return {"min": min(values), "median": int(median) if float(median).is_integer() else median, "max": max(values)}


def drop_summary(drops: dict[str, list[tuple[int, object]]]) -> dict:
    """{reason: {"count", "first": [{"row", "detail"}, ...]}} in the order of data.DROP_REASONS."""
    return {reason: {"count": len(found), "first": [{"row": i, "detail": detail} for i, detail in found[:FIRST_DROPS]]}
            for reason, found in drops.items() if found}

# ---------------------------------------------------------------- inspect


def check_row(row: dict, base_dir, model) -> dict:
    """One row as training sees it: its pictures (sizes), answer type, whether verify can read its
    gold, its prompt length (with a model), and the first reason training would drop it, in the
    order load_prompt_dataset checks them."""
    from grpo.families import count_prompt_tokens

    processor, family, limit = model or (None, None, None)
    problem, solution = row.get("problem"), row.get("solution")
    info = {"pictures": len(data.picture_values(row)), "type": answer_type(solution, problem), "sizes": [], "tokens": None,
            "video": row.get("video") not in (None, []), "frames": None,
            "unverifiable": answers.unverifiable_reason(solution, problem), "reason": None, "detail": None}
    error = None
    try:
        images, videos = data.row_images(row, base_dir), data.row_videos(row, base_dir)
        info["sizes"] = [image.size for image in images]
        info["frames"] = next((len(video) for video in videos if not isinstance(video, str)), None)
        if model is not None and not blank(problem):
            conversation = data.build_conversation(problem, None, len(images), len(videos))
            info["tokens"] = count_prompt_tokens(processor, conversation, images, family, videos)
    except Exception as e:  # as in training: any decoding failure is an unreadable picture
        error = f"{type(e).__name__}: {' '.join(str(e).split())}"
    if blank(problem):
        info["reason"] = EMPTY_PROBLEM
    elif blank(solution):
        info["reason"] = EMPTY_SOLUTION
    elif info["unverifiable"] is not None:
        info["reason"], info["detail"] = UNVERIFIABLE, info["unverifiable"]
    elif error is not None:
        info["reason"], info["detail"] = UNREADABLE, error
    elif model is not None and info["tokens"] > limit:
        info["reason"], info["detail"] = TOO_LONG, f"{info['tokens']} tokens"
    return info


def trainer_drops(args, model) -> dict[int, str]:
    """row -> reason, from training's own loader (its error carries the drops when it keeps no row)."""
    processor, family, max_prompt_length = model
    try:
        prompts = data.load_prompt_dataset(args.dataset, args.split, processor, family, max_prompt_length,
                                           log=lambda line: None, check_solution=answers.unverifiable_reason)
    except UsageError as e:
        if not hasattr(e, "dropped"):  # not "no usable rows": a mistake in DATASET itself
            raise UsageError(str(e).replace("--dataset_name", "DATASET")) from None
        dropped = e.dropped
    else:
        dropped = prompts.dropped
    return {i: reason for reason, rows in dropped.items() for i in rows}


def load_model(args):
    """(processor, family, max_prompt_length), or None without --model_name_or_path."""
    from grpo import families

    name = args.model_name_or_path
    if name is None:
        return None
    check_model_path(name)
    try:
        family = families.check_model_type(name)
        processor = families.load_processor(name, args.min_pixels, args.max_pixels)
    except OSError as e:
        raise UsageError(f"--model_name_or_path: cannot read {name!r}: {(str(e).splitlines() or [''])[0]}") from None
    return processor, family, args.max_prompt_length


def default_page(dataset: str) -> str:
    """<dataset name>-inspect.html in the current folder: a path's base name, or a hub id with _ for /."""
    name = dataset.replace("/", "_")
    if os.path.exists(dataset):
        name = os.path.splitext(os.path.basename(os.path.normpath(dataset)))[0]
    return f"{name}-inspect.html"


def writable(path: str, flag: str) -> None:
    """Stop before the long pass over the rows when the output cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path!r} cannot be written: {e.strerror or e}; give a path in a writable folder.") from None


def inspect(args, log=print) -> dict:
    """The report (also written as JSON) and the HTML page; returns the report."""
    from tqdm.auto import tqdm

    if args.samples < 0:
        raise UsageError(f"--samples is {args.samples}; give 0 or more rows to show on the page.")
    if args.max_prompt_length < 1:
        raise UsageError(f"--max_prompt_length is {args.max_prompt_length}; it must be at least 1.")
    if args.min_pixels > args.max_pixels:
        raise UsageError(f"--min_pixels {args.min_pixels} is above --max_pixels {args.max_pixels}.")
    page = args.html or default_page(args.dataset)
    report_path = args.report or os.path.splitext(page)[0] + ".json"
    writable(page, "--html")
    writable(report_path, "--report")
    model = load_model(args)
    rows = load(args.dataset, args.split, "DATASET")
    try:
        data.check_columns(rows, args.dataset)
    except UsageError as e:
        raise UsageError(str(e).replace("--dataset_name", "DATASET") + " `python data_tools.py convert` writes "
                         "VQA, MathVista-, ScienceQA- and MMMU-style rows in that schema.") from None
    reasons = trainer_drops(args, model) if model is not None else None  # first: it stops on a usage error
    base_dir = base_dir_of(args.dataset)
    infos = [check_row(row, base_dir, model)
             for row in tqdm(raw_rows(rows), total=len(rows), desc="inspecting", unit="row")]
    if reasons is None:  # no model, or training would keep nothing: the per-row checks
        reasons = {i: info["reason"] for i, info in enumerate(infos) if info["reason"] is not None}
    for i, info in enumerate(infos):  # the trainer's reason; the detail where the per-row pass agrees
        info["detail"] = info["detail"] if reasons.get(i) == info["reason"] else None
        info["reason"] = reasons.get(i)
    drops = {reason: [(i, infos[i]["detail"]) for i in sorted(reasons) if reasons[i] == reason]
             for reason in data.DROP_REASONS}

    sizes = [size for info in infos for size in info["sizes"]]
    verifiable = sum(info["unverifiable"] is None for info in infos)
    tokens = [info["tokens"] for info in infos if info["tokens"] is not None]
    report = {
        "dataset": args.dataset, "split": args.split, "rows": len(rows), "columns": rows.column_names,
        "images_per_row": {str(n): count for n, count in sorted(collections.Counter(i["pictures"] for i in infos).items())},
        "image_size": {"images": len(sizes), "width": spread([w for w, _ in sizes]), "height": spread([h for _, h in sizes])},
        "videos": {"rows": sum(info["video"] for info in infos),
                   "frames": spread([info["frames"] for info in infos if info["frames"] is not None])},
        "answer_types": {kind: sum(info["type"] == kind for info in infos) for kind in ANSWER_TYPES},
        "verifiable": {"rows": verifiable, "share": round(verifiable / len(rows), 4)},
        "model": args.model_name_or_path,
        "prompt_tokens": dict(rows=len(tokens), **spread(tokens)) if tokens else None,
        "max_prompt_length": args.max_prompt_length if model is not None else None,
        "length_check": (f"prompts over --max_prompt_length {args.max_prompt_length} tokens (images included) dropped"
                         if model is not None else "not run: counting prompt tokens needs --model_name_or_path"),
        "kept": len(rows) - len(reasons),
        "dropped": drop_summary(drops),
        "html": page, "report": report_path,
    }
    shown = list(range(min(args.samples, len(rows))))
    shown += [i for i in sorted(reasons) if i >= args.samples][:args.samples]
    with open(page, "w", encoding="utf-8") as f:
        f.write(html_page(report, cards(rows, shown, infos, base_dir)))
    with open(report_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    log(report_text(report))
    return report


def report_text(report: dict) -> str:
    """The report for the console, a few lines."""
    def triple(s):
        return "-" if s is None else f"{s['min']} / {s['median']} / {s['max']}"

    size = report["image_size"]
    lines = [f"[inspect] {report['dataset']!r} (split {report['split']!r}): {report['rows']} rows, columns {report['columns']}",
             "  images per row: " + ", ".join(f"{n}: {count}" for n, count in report["images_per_row"].items()),
             f"  image width min / median / max: {triple(size['width'])}, height: {triple(size['height'])} ({size['images']} images)",
             f"  rows with a video: {report['videos']['rows']}"
             + (f" (frames min / median / max: {triple(report['videos']['frames'])})" if report["videos"]["frames"] else ""),
             "  gold answer types: " + ", ".join(f"{kind} {n}" for kind, n in report["answer_types"].items()),
             f"  gold answers verify can read: {report['verifiable']['rows']} of {report['rows']} "
             f"({100 * report['verifiable']['share']:.1f}%)"]
    if report["prompt_tokens"]:
        lines.append(f"  prompt tokens (images included) min / median / max: {triple(report['prompt_tokens'])}")
    lines.append(f"  length check: {report['length_check']}")
    lines.append(f"  training keeps {report['kept']} of {report['rows']} rows"
                 + ("" if report["max_prompt_length"] else ", before the prompt-length check"))
    for reason, found in report["dropped"].items():
        where = ", ".join(str(d["row"]) for d in found["first"]) + (", ..." if found["count"] > len(found["first"]) else "")
        lines.append(f"    dropped {found['count']}: {reason} ({'row' if found['count'] == 1 else 'rows'} {where})")
    lines.append(f"[inspect] report: {report['report']}, page: {report['html']}")
    return "\n".join(lines)

# ---------------------------------------------------------------- the page


def thumbnail_uri(image) -> str:
    """A JPEG data URI of the picture at most THUMBNAIL pixels on a side: the page carries its images."""
    image = image.copy()
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def row_pictures(row: dict, base_dir) -> tuple[list[tuple[str, str]], list[str]]:
    """What a card shows of a row's pictures: (thumbnail data URI, label) for each image and for up
    to MAX_FRAMES frames of its video, and the name of a video given as a file (not decoded here)."""
    shown = [(thumbnail_uri(image), f"picture {n + 1}") for n, image in enumerate(data.row_images(row, base_dir))]
    files = []
    for video in data.row_videos(row, base_dir):
        if isinstance(video, str):
            files.append(video)
            continue
        count = min(MAX_FRAMES, len(video))
        picks = [round(k * (len(video) - 1) / (count - 1)) for k in range(count)] if count > 1 else [0]
        shown += [(thumbnail_uri(video[k]), f"video frame {k + 1} of {len(video)}") for k in picks]
    return shown, files


def pictures_html(row, shown: list[tuple[str, str]], files: list[str], error: str | None) -> str:
    if error:
        return f'<p class="reason">picture: {esc(error)}</p>'
    return ("".join(f'<img src="{uri}" alt="row {esc(row)} {esc(label)}" title="{esc(label)}">' for uri, label in shown)
            + "".join(f'<p class="meta">video file: {esc(name)}</p>' for name in files))


def shorten(text, limit: int = MAX_SHOWN_TEXT) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[:limit] + " …"


def cards(rows, shown: list[int], infos: list[dict], base_dir) -> list[dict]:
    """What each shown row's card holds, its pictures decoded again (only these rows)."""
    out, rows = [], rows.with_format("arrow")  # pictures still encoded, as in raw_rows
    for i in shown:
        row, info = rows[i].to_pylist()[0], infos[i]
        try:
            (thumbs, files), error = row_pictures(row, base_dir), None
        except Exception as e:
            (thumbs, files), error = ([], []), f"{type(e).__name__}: {' '.join(str(e).split())}"
        solution = row.get("solution")
        out.append({"row": i, "type": info["type"], "verifiable": info["unverifiable"] is None,
                    "unverifiable": info["unverifiable"], "reason": info["reason"] or "kept", "detail": info["detail"],
                    "problem": row.get("problem"), "solution": solution, "tokens": info["tokens"],
                    "gold": answers.final_answer(solution)[0] if isinstance(solution, str) else "",
                    "thumbs": thumbs, "video_files": files, "picture_error": error})
    return out


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table#summary { border-collapse: collapse; margin-bottom: 1em; }
table#summary th, table#summary td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
#filters { margin: 1em 0; display: flex; gap: 1.5em; align-items: center; }
#cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(320px, 1fr)); gap: 12px; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: 8px; overflow: hidden; }
.card[data-reason="kept"] { border-left: 5px solid #3a3; }
.card:not([data-reason="kept"]) { border-left: 5px solid #c33; background: #fff6f6; }
.card img { max-width: 160px; max-height: 160px; margin: 2px; border: 1px solid #ddd; }
.card pre { white-space: pre-wrap; word-break: break-word; font-size: 0.85em; margin: 4px 0; }
.meta { font-size: 0.8em; color: #555; margin: 2px 0; }
.reason { color: #a00; font-weight: 600; }
[hidden] { display: none !important; }
"""

# A few lines, no library, for both pages: each <select data-filter="KEY"> hides the cards whose
# data-KEY differs from its value; the #shown line counts what is left, in its data-unit.
SCRIPT = """
const selects = document.querySelectorAll("select[data-filter]");
function applyFilters() {
  let shown = 0;
  const cards = document.querySelectorAll(".card");
  for (const card of cards) {
    card.hidden = [...selects].some(s => s.value !== "all" && card.dataset[s.dataset.filter] !== s.value);
    if (!card.hidden) shown += 1;
  }
  const counter = document.getElementById("shown");
  counter.textContent = shown + " of " + cards.length + " " + counter.dataset.unit + " shown";
}
for (const s of selects) s.addEventListener("change", applyFilters);
applyFilters();
"""


def esc(value) -> str:
    """Every text on the page goes through this: a problem holding <b> or a quote stays text."""
    return html.escape(str(value), quote=True)


def html_page(report: dict, shown: list[dict]) -> str:
    """One self-contained page: the summary table, the two filters, one card per shown row."""
    def spread_text(s):
        return "-" if s is None else f"{s['min']} / {s['median']} / {s['max']} (min / median / max)"

    summary = [("dataset", f"{report['dataset']} (split {report['split']})"), ("rows", report["rows"]),
               ("columns", ", ".join(report["columns"])),
               ("images per row", ", ".join(f"{n}: {c}" for n, c in report["images_per_row"].items())),
               ("image width", spread_text(report["image_size"]["width"])),
               ("image height", spread_text(report["image_size"]["height"])),
               ("rows with a video", report["videos"]["rows"]),
               ("frames per video", spread_text(report["videos"]["frames"])),
               ("gold answer types", ", ".join(f"{k}: {n}" for k, n in report["answer_types"].items())),
               ("gold answers verify can read", f"{report['verifiable']['rows']} ({100 * report['verifiable']['share']:.1f}%)"),
               ("prompt tokens", spread_text(report["prompt_tokens"]) if report["prompt_tokens"] else "-"),
               ("length check", report["length_check"]),
               ("kept by training", report["kept"])]
    summary += [(f"dropped: {reason}", found["count"]) for reason, found in report["dropped"].items()]
    types = [t for t in ANSWER_TYPES if any(c["type"] == t for c in shown)]
    reasons = ["kept"] + [r for r in data.DROP_REASONS if any(c["reason"] == r for c in shown)]
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{esc(report['dataset'])}: inspect</title><style>{STYLE}</style></head><body>",
             f"<h1>{esc(report['dataset'])}</h1>", '<table id="summary">']
    parts += [f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary]
    parts += ["</table>", '<div id="filters">',
              '<label>answer type <select id="filter-type" data-filter="type"><option value="all">all</option>'
              + "".join(f'<option value="{esc(t)}">{esc(t)}</option>' for t in types) + "</select></label>",
              '<label>drop reason <select id="filter-reason" data-filter="reason"><option value="all">all</option>'
              + "".join(f'<option value="{esc(r)}">{esc(r)}</option>' for r in reasons) + "</select></label>",
              '<span id="shown" data-unit="rows"></span></div>', '<div id="cards">']
    for card in shown:
        pictures = pictures_html(card["row"], card["thumbs"], card["video_files"], card["picture_error"])
        verdict = "verify can read it" if card["verifiable"] else f"verify cannot read it: {card['unverifiable']}"
        meta = f"row {card['row']} · {card['type']} · {verdict}" + (f" · {card['tokens']} prompt tokens" if card["tokens"] else "")
        dropped = "" if card["reason"] == "kept" else (
            f'<p class="reason">dropped: {esc(card["reason"])}' + (f" ({esc(card['detail'])})" if card["detail"] else "") + "</p>")
        parts.append(f'<div class="card" data-row="{card["row"]}" data-type="{esc(card["type"])}" '
                     f'data-reason="{esc(card["reason"])}" data-verifiable="{"yes" if card["verifiable"] else "no"}">'
                     f'<div class="pictures">{pictures}</div><p class="meta">{esc(meta)}</p>{dropped}'
                     f'<pre class="problem">{esc(shorten(card["problem"]))}</pre>'
                     f'<p>gold answer: <code>{esc(card["gold"])}</code></p>'
                     f'<details><summary>solution</summary><pre>{esc(shorten(card["solution"]))}</pre></details></div>')
    parts += ["</div>", f"<script>{SCRIPT}</script>", "</body></html>"]
    return "\n".join(parts)

# ---------------------------------------------------------------- convert

LAYOUTS = {  # name: (the columns it needs, the optional ones it reads)
    "vqa": (("question", "answer"), "image or images; options or choices (a list, or its text)"),
    "mathvista": (("question", "choices", "answer", "question_type"), "decoded_image or image"),
    "scienceqa": (("question", "choices", "answer"), "image, hint (the answer is the right choice's index)"),
    "mmmu": (("question", "options", "answer"), "image_1 ... image_7"),
    "training": (("problem", "solution"), "image or images: the rows training would keep, as they are"),
}


def detect_layout(rows, source: str, asked: str) -> str:
    """The layout named by --format, else the one the columns show; either checked for its columns."""
    columns = rows.column_names
    layout = asked
    if asked == "auto":
        answer = rows.features.get("answer")
        integer_answer = getattr(answer, "dtype", "").startswith(("int", "uint"))
        if "problem" in columns and "solution" in columns:
            layout = "training"
        elif any(c in columns for c in MMMU_IMAGE_COLUMNS):
            layout = "mmmu"
        elif "question_type" in columns:
            layout = "mathvista"
        elif "choices" in columns and (integer_answer or "hint" in columns or "lecture" in columns):
            layout = "scienceqa"
        elif "question" in columns and "answer" in columns:
            layout = "vqa"
        else:
            known = "; ".join(f"{name}: {', '.join(needed)} ({optional})" for name, (needed, optional) in LAYOUTS.items())
            raise UsageError(f"SOURCE {source!r} has columns {columns}, which match no layout that convert reads ({known}); "
                             "rename the columns or pass --format.")
    missing = [c for c in LAYOUTS[layout][0] if c not in columns]
    if missing:
        raise UsageError(f"--format {layout}: SOURCE {source!r} has no column(s) {missing}; it has {columns}.")
    if layout == "training" and "video" in columns:  # the parquet convert writes holds images only
        raise UsageError(f"SOURCE {source!r} has a `video` column, which convert does not carry; train on it as it is "
                         "(train.py drops the rows it cannot use and reports them), or look at it with "
                         "`python data_tools.py inspect`.")
    return layout


def answer_text(value) -> str:
    return "" if value is None else str(value).strip()


def vqa_row(row: dict, index: int) -> dict:
    options = option_list(row["options"] if row.get("options") is not None else row.get("choices"), index)
    question, answer = row["question"] or "", answer_text(row["answer"])
    if options:
        question, answer = with_options(question, options, index), letter_of(answer, options)
    return {"problem": question, "solution": f"<answer>{answer}</answer>", "images": data.picture_values(row)}


def scienceqa_row(row: dict, index: int) -> dict:
    """The hint, when there is one, is the question's context (ScienceQA's own prompt puts it first)."""
    choices, answer = option_list(row["choices"], index), row["answer"]
    if isinstance(answer, str) and answer.strip().isdigit():
        answer = int(answer)
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise ValueError(f"row {index}: answer {answer!r} is not the index of one of its {len(choices)} choices")
    hint = (row.get("hint") or "").strip()
    question = f"Context: {hint}\n{row['question'] or ''}" if hint else row["question"] or ""
    return {"problem": with_options(question, choices, index),
            "solution": f"<answer>{string.ascii_uppercase[answer]}</answer>",
            "images": [] if row.get("image") is None else [row["image"]]}


def training_row(row: dict, index: int) -> dict:
    """Already the training schema: the problem and solution as they are, the pictures packed into
    the parquet file (a .jsonl with an image folder becomes one file), the row kept only if usable."""
    return {"problem": row["problem"] or "", "solution": row["solution"] or "", "images": data.picture_values(row)}


CONVERTERS = {"training": training_row, "vqa": vqa_row, "mathvista": mathvista_row, "scienceqa": scienceqa_row, "mmmu": mmmu_row}


def png(value, base_dir) -> dict:
    """A picture as PNG bytes in datasets' Image format, so load_dataset("parquet") decodes it back."""
    buffer = io.BytesIO()
    data.to_pil(value, base_dir).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def converted_rows(rows, layout: str, base_dir, drops: dict):
    """The rows in the training schema, those worth training on only; each other row goes into
    `drops` under its first reason: options or answer index that cannot be read, an empty question,
    a gold verify cannot judge, a picture that does not decode."""
    from tqdm.auto import tqdm

    convert = CONVERTERS[layout]
    for index, row in enumerate(tqdm(raw_rows(rows), total=len(rows), desc="converting", unit="row")):
        try:
            converted = convert(row, index)
        except ValueError as e:  # UsageError included: eval's converters name a bad row that way
            drops[BAD_OPTIONS].append((index, str(e).replace("--dataset_name: ", "")))
            continue
        if blank(converted["problem"]):
            drops[EMPTY_PROBLEM].append((index, None))
            continue
        why = answers.unverifiable_reason(converted["solution"], converted["problem"])
        if why is not None:
            drops[UNVERIFIABLE].append((index, why))
            continue
        try:
            converted["images"] = [png(picture, base_dir) for picture in converted["images"]]
        except Exception as e:
            drops[UNREADABLE].append((index, f"{type(e).__name__}: {' '.join(str(e).split())}"))
            continue
        yield converted


def write_parquet(examples, path: str) -> int:
    """Stream the rows into a parquet file, a batch at a time (memory stays flat on big datasets),
    with datasets' features in its metadata; written to a temporary name and renamed when complete,
    and not at all when no row is kept. Returns the number of rows."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = datasets.Features({"images": datasets.List(datasets.Image()), "problem": datasets.Value("string"),
                                  "solution": datasets.Value("string")})
    partial, count, batch, writer = path + ".partial", 0, [], None

    def flush():
        nonlocal writer, count, batch
        writer = writer or pq.ParquetWriter(partial, features.arrow_schema)
        writer.write_table(pa.Table.from_pylist(batch, schema=features.arrow_schema))
        count, batch = count + len(batch), []

    try:
        for example in examples:
            batch.append(features.encode_example(example))
            if len(batch) == 64:
                flush()
        if batch:
            flush()
    except BaseException:  # interrupted: leave no half-written file behind
        if writer is not None:
            writer.close()
            os.remove(partial)
        raise
    if writer is not None:
        writer.close()
    if count:
        os.replace(partial, path)
    return count


def convert(args, log=print) -> dict:
    """Write OUT in the training schema and the report; returns the report."""
    if not args.out.endswith(".parquet"):
        raise UsageError(f"OUT {args.out!r} must be a .parquet file (training reads .parquet, .jsonl or a folder).")
    report_path = args.report or os.path.splitext(args.out)[0] + ".report.json"
    writable(args.out, "OUT")
    writable(report_path, "--report")
    rows = load(args.source, args.split, "SOURCE")
    layout = detect_layout(rows, args.source, args.format)
    drops = {reason: [] for reason in (BAD_OPTIONS, EMPTY_PROBLEM, UNVERIFIABLE, UNREADABLE)}
    kept = write_parquet(converted_rows(rows, layout, base_dir_of(args.source), drops), args.out)
    report = {"source": args.source, "split": args.split, "format": layout, "out": args.out if kept else None,
              "rows_read": len(rows), "kept": kept, "dropped": drop_summary(drops), "report": report_path}
    with open(report_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    log(json.dumps(report, indent=2, ensure_ascii=False))
    if not kept:
        counts = ", ".join(f"{reason}: {found['count']}" for reason, found in report["dropped"].items())
        raise UsageError(f"SOURCE {args.source!r}: no row of {len(rows)} kept ({counts}); nothing written to "
                         f"{args.out!r}. The report {report_path!r} names the first rows of each reason.")
    return report

# ---------------------------------------------------------------- rollouts

RECORD_KEYS = ("step", "rank", "prompt", "completion", "rewards", "reward", "advantage", "group_has_signal")
NO_SIGNAL = "no signal: all rewards equal"


def read_completions(run_dir: str) -> list[dict]:
    """The records of RUN_DIR/completions.jsonl (train.py's completion_records), checked line by line:
    a bad line is named, not a traceback half-way through the page."""
    if not os.path.isdir(run_dir):
        raise UsageError(f"RUN_DIR {run_dir!r}: no such folder; give a train.py --output_dir.")
    path = os.path.join(run_dir, "completions.jsonl")
    if not os.path.isfile(path):
        raise UsageError(f"RUN_DIR {run_dir!r} holds no completions.jsonl; run train.py with --log_completions_steps N "
                         "(N > 0) to log every N-th step's completions there.")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path!r} line {number}: not JSON ({e.msg}).") from None
            missing = [key for key in RECORD_KEYS if not isinstance(record, dict) or key not in record]
            if missing:
                raise UsageError(f"{path!r} line {number}: not a completion record (no {', '.join(missing)}).")
            records.append(record)
    if not records:
        raise UsageError(f"{path!r} is empty: no step's completions were logged (the run stopped before its first "
                         "--log_completions_steps step?).")
    return records


def run_dataset(run_dir: str):
    """(rows still encoded, base_dir, None), or (None, None, why not) when the run's training dataset
    cannot be read: the page is still worth having without its pictures."""
    try:
        with open(os.path.join(run_dir, "training_args.json"), encoding="utf-8") as f:
            saved = json.load(f)
        name, split = saved["dataset_name"], saved.get("dataset_split", "train")
    except (OSError, ValueError, KeyError, TypeError) as e:
        where = os.path.join(run_dir, "training_args.json")
        return None, None, f"no thumbnails: the run's dataset is unknown ({where}: {type(e).__name__})."
    try:
        rows = data.load_rows(name, split).with_format("arrow")  # pictures still encoded, as in raw_rows
    except Exception as e:  # gone, moved, offline hub id: one line
        first = (str(e).splitlines() or [""])[0]
        return None, None, f"no thumbnails: the run's dataset {name!r} (split {split!r}) cannot be read: {type(e).__name__}: {first}"
    return rows, base_dir_of(name), None


def group_records(records: list[dict], steps: int | None) -> list[list[dict]]:
    """The records in groups (same step, rank and prompt: the G completions of one prompt), by step,
    rank and prompt; with `steps`, the last that many logged steps only."""
    groups = {}
    for record in records:
        groups.setdefault((record["step"], record["rank"], record["prompt"]), []).append(record)
    kept_steps = sorted({step for step, _, _ in groups})[-steps:] if steps else None
    return [groups[key] for key in sorted(groups) if kept_steps is None or key[0] in kept_steps]


def group_card(group: list[dict], pictures: tuple[list, list], picture_error: str | None) -> str:
    first = group[0]
    names = list(dict.fromkeys(name for record in group for name in record["rewards"]))
    signal = "yes" if first["group_has_signal"] else "no"
    pictures = pictures_html(first.get("row"), *pictures, picture_error)
    meta = f"step {first['step']} · rank {first['rank']} · prompt {first['prompt']} · row {first.get('row')} · {len(group)} completions"
    head = "".join(f"<th>{esc(h)}</th>" for h in ["completion", *names, "reward", "advantage", "truncated"])
    body = []
    for record in group:
        scores = "".join(f'<td class="score">{float(record["rewards"][n]):.2f}</td>' if n in record["rewards"] else "<td>-</td>"
                         for n in names)
        body.append(f'<tr class="completion"><td><pre>{esc(shorten(record["completion"]))}</pre></td>{scores}'
                    f'<td class="reward">{float(record["reward"]):.2f}</td>'
                    f'<td class="advantage">{float(record["advantage"]):+.2f}</td>'
                    f'<td class="truncated">{"yes" if record.get("truncated") else "no"}</td></tr>')
    solution = first.get("solution")
    gold = answers.final_answer(solution)[0] if isinstance(solution, str) else ""
    return (f'<div class="card" data-step="{esc(first["step"])}" data-rank="{esc(first["rank"])}" '
            f'data-prompt="{esc(first["prompt"])}" data-row="{esc(first.get("row"))}" data-signal="{signal}">'
            f'<div class="pictures">{pictures}</div><p class="meta">{esc(meta)}</p>'
            + ("" if signal == "yes" else f'<p class="reason nosignal">{NO_SIGNAL}</p>')
            + f'<pre class="problem">{esc(shorten(first.get("problem")))}</pre>'
            f'<p>gold answer: <code>{esc(gold)}</code></p>'
            f'<details><summary>solution</summary><pre>{esc(shorten(solution))}</pre></details>'
            f'<table class="completions"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>')


ROLLOUT_STYLE = """
#cards { grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); }
.card[data-signal] { border-left: 5px solid #3a3; background: none; }
.card[data-signal="no"] { border-left-color: #999; background: #f5f5f5; }
table.completions { border-collapse: collapse; width: 100%; font-size: 0.85em; }
table.completions th, table.completions td { border: 1px solid #ddd; padding: 2px 5px; text-align: left; vertical-align: top; }
table.completions td pre { margin: 0; max-height: 12em; overflow: auto; }
"""



def rollouts(args, log=print) -> dict:
    """The page of a run's logged completions, one card per group; returns what it shows."""
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps is {args.steps}; give 1 or more (the last N logged steps).")
    page = args.html or os.path.join(args.run_dir, "rollouts.html")
    records = read_completions(args.run_dir)
    writable(page, "--html")
    groups = group_records(records, args.steps)
    rows, base_dir, notice = run_dataset(args.run_dir)
    thumbs = {}  # row -> ((thumbnails, video files), error): a row sampled at several steps is decoded once
    for group in groups:
        row = group[0].get("row")
        if rows is not None and row is not None and row not in thumbs:
            try:
                thumbs[row] = row_pictures(rows[row].to_pylist()[0], base_dir), None
            except Exception as e:
                thumbs[row] = ([], []), f"{type(e).__name__}: {' '.join(str(e).split())}"
    steps = sorted({group[0]["step"] for group in groups})
    silent = sum(not group[0]["group_has_signal"] for group in groups)
    completions = sum(len(group) for group in groups)
    summary = [("run", args.run_dir), ("steps shown", f"{len(steps)}: {', '.join(map(str, steps))}"),
               ("groups", len(groups)), ("completions", completions), ("groups with no signal", silent)]
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{esc(args.run_dir)}: rollouts</title><style>{STYLE}{ROLLOUT_STYLE}</style></head><body>",
             f"<h1>{esc(args.run_dir)}: rollouts</h1>", '<table id="summary">']
    parts += [f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary]
    parts.append("</table>")
    if notice:
        parts.append(f'<p class="reason" id="notice">{esc(notice)}</p>')
    parts += ['<div id="filters">',
              '<label>step <select id="filter-step" data-filter="step"><option value="all">all</option>'
              + "".join(f'<option value="{esc(s)}">{esc(s)}</option>' for s in steps) + "</select></label>",
              '<label>signal <select id="filter-signal" data-filter="signal"><option value="all">all</option>'
              '<option value="yes">yes</option><option value="no">no</option></select></label>',
              '<span id="shown" data-unit="groups"></span></div>', '<div id="cards">']
    parts += [group_card(group, *thumbs.get(group[0].get("row"), (([], []), None))) for group in groups]
    parts += ["</div>", f"<script>{SCRIPT}</script>", "</body></html>"]
    with open(page, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    log(f"[rollouts] {len(groups)} groups ({completions} completions, {silent} with no signal) of {len(steps)} steps: {page}"
        + (f"\n[rollouts] {notice}" if notice else ""))
    return {"html": page, "steps": steps, "groups": len(groups), "completions": completions, "no_signal": silent,
            "notice": notice}

# ---------------------------------------------------------------- plots

class Panel(NamedTuple):
    """One axes of a figure: metric `key` against the step, one line per run. A `key` with * stands
    for one panel per logged metric it matches (fnmatch) that no pattern in `skip` matches, in the
    order they were logged; `band` names two metrics shaded as a range (min to max) behind the line."""
    key: str
    band: tuple[str, str] | None = None
    skip: tuple[str, ...] = ()


# The figures of a run, plots/<figure>.png, as data: a new panel goes here, not into the code below.
# Every metric has an axes of its own (their scales differ); the x axis is the step.
PLOTS: dict[str, list[Panel]] = {
    # The weighted sum, then each reward function's mean (accuracy, format, ...), not their failure counts.
    "rewards": [Panel("reward/mean"), Panel("reward/*", skip=("reward/mean", "reward/std", "reward/*_failures",
                                                              "reward/verify_timeouts"))],
    "completion": [Panel("completion/length_mean", band=("completion/length_min", "completion/length_max")),
                   Panel("completion/truncated_fraction")],
    "loss": [Panel("loss/kl"), Panel("loss/entropy"), Panel("loss/clip_ratio")],
}


def metrics_file(path: str) -> str:
    """A run's folder stands for the metrics.jsonl in it."""
    return os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path


def read_metrics(path: str) -> list[dict]:
    """The logged steps of a metrics.jsonl (or of the run folder holding one), one dict per line."""
    path = metrics_file(path)
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UsageError(f"{path}: cannot read it ({e.strerror}); give a run's output_dir or its metrics.jsonl.") from e
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}, line {number}: not JSON ({e.msg}); a metrics.jsonl holds one JSON "
                             f"object per line, as train.py writes it.") from e
        if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
            raise UsageError(f"{path}, line {number}: a metrics line is a JSON object with a numeric \"step\".")
        rows.append(row)
    if not rows:
        raise UsageError(f"{path}: no logged step yet; a run writes its first line after --logging_steps steps.")
    return rows


def _number(value) -> float:
    """A logged value as a float; NaN (a gap in the line) for a skipped step's non-finite value or a non-number."""
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return math.nan


def _series(rows: list[dict], *keys: str) -> tuple[list[float], ...]:
    """The steps that logged every one of `keys`, and each key's values at those steps."""
    rows = [row for row in rows if all(key in row for key in keys)]
    return ([row["step"] for row in rows], *([_number(row[key]) for row in rows] for key in keys))


def _panel_keys(panel: Panel, logged: list[str]) -> list[str]:
    """The metrics `panel` stands for, of those `logged`."""
    if "*" not in panel.key:
        return [panel.key] if panel.key in logged else []
    return [key for key in logged
            if fnmatchcase(key, panel.key) and not any(fnmatchcase(key, pattern) for pattern in panel.skip)]


def draw_figures(runs: dict[str, list[dict]]) -> dict:
    """The figures of PLOTS ({name: matplotlib Figure}) for `runs` ({label: logged steps}): one line
    per run on every panel, a run keeping its colour throughout. A panel no run logged is left out,
    and a figure with no panel. Drawn on Figure objects, not pyplot, so no global state changes and
    nothing needs a display; NaN values leave gaps, and markers show steps between gaps."""
    from matplotlib.figure import Figure

    logged = list(dict.fromkeys(key for rows in runs.values() for row in rows for key in row))
    figures = {}
    for name, panels in PLOTS.items():
        shown = [(key, panel) for panel in panels for key in _panel_keys(panel, logged)]
        if not shown:
            continue
        figure = Figure(figsize=(8, 0.8 + 2.2 * len(shown)), layout="constrained")
        axes = figure.subplots(len(shown), 1, sharex=True, squeeze=False)[:, 0]
        handles = {}
        for ax, (key, panel) in zip(axes, shown):
            ax.set_title(key, loc="left", fontsize="medium")
            ax.grid(alpha=0.3)
            for i, (label, rows) in enumerate(runs.items()):
                colour = f"C{i % 10}"
                if panel.band and (band := _series(rows, *panel.band))[0]:
                    ax.fill_between(*band, color=colour, alpha=0.2, linewidth=0)
                steps, values = _series(rows, key)
                if steps:
                    (handles[label],) = ax.plot(steps, values, color=colour, marker=".", markersize=4, label=label)
        axes[-1].set_xlabel("step")
        labels = [label for label in runs if label in handles]
        figure.legend([handles[label] for label in labels], labels, loc="outside upper center",
                      ncols=min(len(labels), 4), frameon=False)
        figures[name] = figure
    return figures


def _run_labels(paths: list[str]) -> list[str]:
    """Each run's folder name; the folders' paths where two names coincide."""
    folders = [os.path.dirname(os.path.abspath(metrics_file(path))) for path in paths]
    if len(set(folders)) != len(folders):
        raise UsageError(f"{paths}: a run is given twice; give each run once.")
    names = [os.path.basename(folder) for folder in folders]
    return names if len(set(names)) == len(names) else folders


def plot_runs(metrics_files: list[str], out_dir: str, labels: list[str] | None = None) -> list[str]:
    """Draw PLOTS for the runs whose metrics.jsonl (or run folder) are given, one line per run labelled
    with its folder's name or `labels`, and write <out_dir>/<figure>.png; returns the paths written.
    Each PNG is replaced atomically, since train.py redraws them at every save while one may be open."""
    labels = list(labels) if labels is not None else _run_labels(metrics_files)
    if len(labels) != len(metrics_files) or len(set(labels)) != len(labels):
        raise UsageError(f"labels: {labels} for {len(metrics_files)} runs; give one distinct label per run, or None "
                         f"for their folder names.")
    figures = draw_figures({label: read_metrics(path) for label, path in zip(labels, metrics_files)})
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, figure in figures.items():
        path = os.path.join(out_dir, f"{name}.png")
        figure.savefig(path + ".tmp", format="png", dpi=100)
        os.replace(path + ".tmp", path)
        paths.append(path)
    return paths


def plot(args, log=print) -> dict:
    """`plot`: each run's rewards, completion lengths and loss terms per step, one line per run."""
    out = args.out or os.path.join(os.path.dirname(metrics_file(args.runs[0])), "plots")
    try:
        paths = plot_runs(args.runs, out)
    except OSError as e:
        raise UsageError(f"--out: {e}") from e
    if not paths:
        plotted = [panel.key for panels in PLOTS.values() for panel in panels]
        print(f"data_tools.py: nothing to plot: the runs log none of {plotted}.", file=sys.stderr)
    log("\n".join(paths))
    return {"written": paths}


# ---------------------------------------------------------------- the command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = UsageParser(prog="data_tools.py", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{inspect,convert,rollouts,plot}")
    look = commands.add_parser("inspect", help="Report what training will make of a dataset, and write a page of sample rows.",
                               description="Report rows, pictures, gold answer types, verifiable share, prompt lengths "
                               "and the rows training would drop (and why); write it as JSON and an offline HTML page.")
    look.add_argument("dataset", metavar="DATASET", help="Hub id, save_to_disk folder, or .parquet / .jsonl file, as train.py's --dataset_name.")
    look.add_argument("--split", default="train", help="Dataset split (default train).")
    look.add_argument("--model_name_or_path", default=None, help="A model folder or hub id: count prompt tokens with its "
                      "processor (images included, train.py's default system prompt) and run training's length check.")
    look.add_argument("--max_pixels", type=int, default=12845056, help="Qwen families: largest image area after resizing, as in train.py.")
    look.add_argument("--min_pixels", type=int, default=3136, help="Qwen families: smallest image area after resizing, as in train.py.")
    look.add_argument("--max_prompt_length", type=int, default=8192, help="Rows whose prompt is longer are reported as dropped (needs a model).")
    look.add_argument("--html", default=None, help="The page to write (default <dataset name>-inspect.html in the current folder).")
    look.add_argument("--report", default=None, help="The JSON report (default: the page's name with .json).")
    look.add_argument("--samples", type=int, default=200, help="Rows shown on the page: the first N, plus every dropped row "
                      "after them, up to N more (default 200).")
    change = commands.add_parser("convert", help="Write VQA / MathVista / ScienceQA / MMMU (or training) rows as training rows (parquet).",
                                 description="Write rows of a common VQA layout in the training schema (images, problem with "
                                 "lettered options, solution <answer>X</answer>), keeping those the reward can judge and whose pictures "
                                 "decode; rows already in that schema are checked and kept as they are.")
    change.add_argument("source", metavar="SOURCE", help="Hub id, save_to_disk folder, or .parquet / .jsonl file.")
    change.add_argument("out", metavar="OUT.parquet", help="The parquet file to write.")
    change.add_argument("--split", default="train", help="Split of SOURCE (default train).")
    change.add_argument("--format", default="auto", choices=["auto", *LAYOUTS],
                        help="Layout of SOURCE (default auto: told from its columns).")
    change.add_argument("--report", default=None, help="The JSON report (default: OUT's name with .report.json).")
    show = commands.add_parser("rollouts", help="Write a page of a run's logged completions, grouped by step and prompt.",
                               description="Write an offline HTML page of RUN_DIR/completions.jsonl: one card per group "
                               "(the G completions of one prompt at one step) with the prompt's pictures, its rewards and "
                               "advantages, and whether the group carried any signal.")
    show.add_argument("run_dir", metavar="RUN_DIR", help="A train.py --output_dir that logged completions (--log_completions_steps).")
    show.add_argument("--html", default=None, help="The page to write (default RUN_DIR/rollouts.html).")
    show.add_argument("--steps", type=int, default=None, help="Only the last N logged steps (default all).")
    draw = commands.add_parser("plot", help="Draw the plots of one or more runs.", description=(
        "Draw each run's rewards, completion lengths and loss terms per step, one line per run (labelled "
        "with its folder's name), into DIR/rewards.png, completion.png and loss.png."))
    draw.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_METRICS_JSONL",
                      help="A run's --output_dir, or its metrics.jsonl; several runs share each figure.")
    draw.add_argument("--out", metavar="DIR", help="Where the PNGs go (default: plots/ in the first run's folder).")
    return parser.parse_args(argv)


def main(argv: list[str], log=print) -> dict:
    args = parse_args(argv)
    return {"inspect": inspect, "convert": convert, "rollouts": rollouts, "plot": plot}[args.command](args, log)


def cli(argv: list[str]) -> int:
    return exit_status("data_tools.py", lambda: main(argv))


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
