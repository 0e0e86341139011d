"""data_tools.py: inspect's report and page, convert's layouts, and their command lines.

Every count below is worked out by hand from the rows written here, never read from the code's output.
"""

import base64
import io
import json
import os
import sys
from html.parser import HTMLParser

import pytest
from conftest import run_command

import data_tools
from grpo import answers, data
from grpo.families import FAMILIES

QWEN = FAMILIES["qwen2_vl"]
UNREADABLE = "unreadable image or video"


def png_bytes(size=(56, 56), colour="red") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- inspect

# (pictures, problem, solution) -> answer type, verifiable, drop reason without a model
INSPECT_ROWS = [
    (["ok.png"], 'What colour is it? <b>bold</b> & "co"\nChoices:\n(A) red\n(B) green',
     "<think>red</think><answer>A</answer>"),                                   # 0 option letter, kept
    (["ok.png", "wide.png"], "How many dots?", "<answer>12</answer>"),           # 1 number, kept
    ([], "Simplify x + x.", "<answer>2x</answer>"),                              # 2 expression, kept, text-only
    (["ok.png"], "What shape is it?", "<answer>a circle</answer>"),              # 3 free text, kept
    (["ok.png"], "", "<answer>B</answer>"),                                      # 4 option letter, empty problem
    (["ok.png"], "What is 2 + 2?", "<answer></answer>"),                         # 5 no answer, unverifiable
    (["missing.png"], "What is 3 + 3?", "<answer>6</answer>"),                   # 6 number, unreadable
    (["broken.png"], "Which way?\nChoices:\n(A) up\n(B) down", "<answer>(B)</answer>"),  # 7 option letter, unreadable
    (["ok.png", "tall.png"], "Half of one?", "<answer>\\frac{1}{2}</answer>"),   # 8 expression, kept
    (["ok.png"], "Name it.", "   "),                                             # 9 no answer, empty solution
    (["ok.png"], "Count the dots: " + "dot " * 600, "<answer>7</answer>"),       # 10 number, kept; too long with a model
]
EXPECTED_TYPES = ["option letter", "number", "expression", "free text", "option letter", "no answer", "number",
                  "option letter", "expression", "no answer", "number"]
REASONS_WITHOUT_MODEL = {4: "empty problem", 5: "unverifiable solution", 6: UNREADABLE, 7: UNREADABLE,
                         9: "empty solution"}


@pytest.fixture(scope="module")
def inspect_source(tmp_path_factory):
    """INSPECT_ROWS as a .jsonl file next to img/: ok 56x56, wide 400x100, tall 30x90, broken (garbage)."""
    folder = tmp_path_factory.mktemp("inspect")
    (folder / "img").mkdir()
    for name, size in (("ok.png", (56, 56)), ("wide.png", (400, 100)), ("tall.png", (30, 90))):
        (folder / "img" / name).write_bytes(png_bytes(size))
    (folder / "img" / "broken.png").write_bytes(b"\x00 not a picture \xff" * 8)
    lines = [json.dumps({"images": [f"img/{p}" for p in pictures], "problem": problem, "solution": solution})
             for pictures, problem, solution in INSPECT_ROWS]
    (folder / "rows.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "rows.jsonl")


class Page(HTMLParser):
    """What a test needs from the page: cards, pictures, selects with their options, scripts."""

    def __init__(self, text: str):
        super().__init__()
        self.cards, self.images, self.selects, self.scripts, self.tags = [], [], {}, [], []
        self._select, self._script = None, False
        self.text = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "div" and attrs.get("class") == "card":
            self.cards.append(attrs)
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "select":
            self._select = attrs["id"]
            self.selects[self._select] = []
        elif tag == "option" and self._select:
            self.selects[self._select].append(attrs["value"])
        elif tag == "script":
            self._script = True
            self.scripts.append("")

    def handle_endtag(self, tag):
        self._select = None if tag == "select" else self._select
        self._script = False if tag == "script" else self._script

    def handle_data(self, text):
        if self._script:
            self.scripts[-1] += text
        self.text.append(text)


def test_inspect_without_a_model_counts_and_page(inspect_source, tmp_path):
    from PIL import Image

    page = str(tmp_path / "page.html")
    messages = []
    report = data_tools.main(["inspect", inspect_source, "--html", page, "--samples", "3"], log=messages.append)
    assert report["rows"] == 11
    assert report["columns"] == ["images", "problem", "solution"]
    assert report["images_per_row"] == {"0": 1, "1": 8, "2": 2}  # row 2; rows 0 3 4 5 6 7 9 10; rows 1 8
    # Decodable pictures: ok.png in rows 0 1 3 4 5 8 9 10 (8 of them), wide 400x100, tall 30x90.
    assert report["image_size"] == {"images": 10, "width": {"min": 30, "median": 56, "max": 400},
                                    "height": {"min": 56, "median": 56, "max": 100}}
    assert report["answer_types"] == {"option letter": 3, "number": 3, "expression": 2, "free text": 1, "no answer": 2}
    assert report["verifiable"] == {"rows": 9, "share": 0.8182}  # all but rows 5 and 9
    assert report["prompt_tokens"] is None and report["model"] is None
    assert "needs --model_name_or_path" in report["length_check"]
    assert report["kept"] == 6
    dropped = {reason: [d["row"] for d in found["first"]] for reason, found in report["dropped"].items()}
    assert dropped == {"empty problem": [4], "empty solution": [9], "unverifiable solution": [5], UNREADABLE: [6, 7]}
    assert report["dropped"]["unverifiable solution"]["first"][0]["detail"] == "no answer in the solution"
    assert report["dropped"][UNREADABLE]["first"][0]["detail"].startswith("FileNotFoundError")
    with open(tmp_path / "page.json") as f:  # the JSON report, next to the page
        assert json.load(f) == report
    assert "training keeps 6 of 11 rows" in messages[0]

    parsed = Page(open(page, encoding="utf-8").read())
    # --samples 3: rows 0 1 2, then the dropped rows after them (4 5 6 7 9), up to 3 more: 4 5 6
    shown = {0: ("option letter", "kept"), 1: ("number", "kept"), 2: ("expression", "kept"),
             4: ("option letter", "empty problem"), 5: ("no answer", "unverifiable solution"), 6: ("number", UNREADABLE)}
    assert {int(c["data-row"]): (c["data-type"], c["data-reason"]) for c in parsed.cards} == shown
    assert [c["data-verifiable"] for c in parsed.cards] == ["yes", "yes", "yes", "yes", "no", "yes"]
    # Thumbnails: row 0 one, row 1 two (ok, wide), row 2 none, row 4 one, row 5 one, row 6 unreadable.
    sizes = []
    for uri in parsed.images:
        head, encoded = uri.split(",", 1)
        assert head == "data:image/jpeg;base64"
        image = Image.open(io.BytesIO(base64.b64decode(encoded)))
        image.load()
        sizes.append(image.size)
    assert sorted(sizes) == [(56, 56)] * 4 + [(160, 40)]  # 400x100 shrunk to 160 on its longest side
    assert parsed.selects["filter-type"] == ["all", "option letter", "number", "expression", "no answer"]
    assert parsed.selects["filter-reason"] == ["all", "kept", "empty problem", "unverifiable solution", UNREADABLE]
    (script,) = parsed.scripts
    # The script hides a card whose data-<key> differs from a select's value, the key being the
    # select's data-filter: here the answer type and the drop reason.
    assert "card.hidden" in script and "card.dataset[s.dataset.filter]" in script
    filters = {attrs["id"]: attrs.get("data-filter") for tag, attrs in parsed.tags if tag == "select"}
    assert filters == {"filter-type": "type", "filter-reason": "reason"}
    # Self-contained and escaped: no external resource, the problem's <b> is text, not a tag.
    assert not [t for t, attrs in parsed.tags if t in ("link", "iframe") or (t == "script" and "src" in attrs)]
    assert not [t for t, _ in parsed.tags if t == "b"]
    assert any('<b>bold</b> & "co"' in text for text in parsed.text)


def test_inspect_with_a_model_uses_the_trainers_drops(inspect_source, tiny_model, tmp_path):
    args = ["inspect", inspect_source, "--model_name_or_path", tiny_model, "--max_pixels", "3136",
            "--html", str(tmp_path / "page.html")]
    # Row 10's 600 words are over 600 tokens with any tokenizer; the others are a system prompt and a line.
    report = data_tools.main(args + ["--max_prompt_length", "600"], log=lambda _: None)
    dropped = {reason: [d["row"] for d in found["first"]] for reason, found in report["dropped"].items()}
    assert dropped == {"empty problem": [4], "empty solution": [9], "unverifiable solution": [5], UNREADABLE: [6, 7],
                       "prompt over --max_prompt_length": [10]}
    assert report["kept"] == 5
    # Counted for rows with a problem and readable pictures: 0 1 2 3 5 8 9 10.
    tokens = report["prompt_tokens"]
    assert tokens["rows"] == 8 and tokens["min"] <= tokens["median"] < 600 < tokens["max"]
    assert report["max_prompt_length"] == 600
    parsed = Page(open(tmp_path / "page.html", encoding="utf-8").read())
    assert len(parsed.cards) == 11  # --samples 200: every row
    assert parsed.cards[10]["data-reason"] == "prompt over --max_prompt_length"

    # With a limit no prompt fits, training keeps nothing (its loader raises): the per-row checks stand in.
    report = data_tools.main(args + ["--max_prompt_length", "1"], log=lambda _: None)
    assert report["kept"] == 0
    assert [d["row"] for d in report["dropped"]["prompt over --max_prompt_length"]["first"]] == [0, 1, 2, 3, 8]
    assert report["dropped"]["prompt over --max_prompt_length"]["count"] == 6  # and row 10


@pytest.mark.parametrize("frames, shown", [(1, [1]), (2, [1, 2]), (4, [1, 2, 3, 4]), (5, [1, 2, 4, 5]), (10, [1, 4, 7, 10])])
def test_a_videos_frames_on_a_card_are_evenly_spaced(frames, shown):
    from PIL import Image

    video = [Image.new("RGB", (20 + n, 20), "blue") for n in range(frames)]  # frame n is 20 + n wide
    thumbs, files = data_tools.row_pictures({"video": video, "image": Image.new("RGB", (30, 30))}, None)
    assert files == [] and [label for _, label in thumbs] == ["picture 1"] + [f"video frame {k} of {frames}" for k in shown]
    widths = [Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).width for uri, _ in thumbs]
    assert widths == [30] + [20 + k - 1 for k in shown]


def test_inspect_shows_video_rows(video_dataset, tmp_path):
    from PIL import Image

    from conftest import COLOURS

    page = str(tmp_path / "page.html")
    report = data_tools.main(["inspect", video_dataset, "--html", page], log=lambda _: None)
    # video_dataset: rows 0 and 3 a video of 4 frames (the row's colour, white, colour, white),
    # rows 1 and 4 an image, rows 2 and 5 neither.
    assert report["videos"] == {"rows": 2, "frames": {"min": 4, "median": 4, "max": 4}}
    assert report["images_per_row"] == {"0": 4, "1": 2}
    parsed = Page(open(page, encoding="utf-8").read())
    images = [(attrs["alt"], attrs["src"]) for tag, attrs in parsed.tags if tag == "img"]
    assert [alt for alt, _ in images] == [f"row 0 video frame {k} of 4" for k in (1, 2, 3, 4)] + ["row 1 picture 1"] + \
        [f"row 3 video frame {k} of 4" for k in (1, 2, 3, 4)] + ["row 4 picture 1"]
    names = list(COLOURS)  # colour_rows: row i has colour names[i % 4]
    expected = [COLOURS[names[0]], (255, 255, 255)] * 2 + [COLOURS[names[1]]] + [COLOURS[names[3]], (255, 255, 255)] * 2 \
        + [COLOURS[names[0]]]
    for (_, uri), colour in zip(images, expected):
        image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")
        got = image.getpixel((image.width // 2, image.height // 2))
        assert max(abs(a - b) for a, b in zip(got, colour)) <= 6, (got, colour)
    assert "rows with a video: 2 (frames min / median / max: 4 / 4 / 4)" in data_tools.report_text(report)


def test_inspect_save_to_disk_folder_with_corrupt_image_bytes(tmp_path_factory, tmp_path):
    import datasets
    from conftest import colour_rows, save_rows

    rows = colour_rows(3)  # 56, 64 and 72 pixels wide, 56 high; multiple choice A-D, golds A, B, C
    rows[1]["image"] = {"bytes": b"not a picture" * 4, "path": None}
    folder = save_rows(tmp_path_factory, "corrupt", rows, {"image": datasets.Image()})
    report = data_tools.main(["inspect", folder, "--html", str(tmp_path / "p.html")], log=lambda _: None)
    assert report["images_per_row"] == {"1": 3}
    assert report["image_size"] == {"images": 2, "width": {"min": 56, "median": 64, "max": 72},
                                    "height": {"min": 56, "median": 56, "max": 56}}
    assert report["answer_types"]["option letter"] == 3 and report["verifiable"] == {"rows": 3, "share": 1.0}
    assert report["kept"] == 2 and list(report["dropped"]) == [UNREADABLE]
    (first,) = report["dropped"][UNREADABLE]["first"]
    assert first["row"] == 1 and first["detail"].startswith("UnidentifiedImageError")


def test_inspect_default_page_in_the_current_folder(inspect_source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data_tools.main(["inspect", inspect_source, "--samples", "0"], log=lambda _: None)
    assert (tmp_path / "rows-inspect.html").is_file() and (tmp_path / "rows-inspect.json").is_file()
    assert Page((tmp_path / "rows-inspect.html").read_text(encoding="utf-8")).cards == []

# ---------------------------------------------------------------- convert


def write_source(tmp_path, name: str, rows: list[dict], image_columns=()) -> str:
    """Rows as a parquet file, their picture columns as datasets' Image features, as on the hub."""
    import datasets

    source = datasets.Dataset.from_list(rows)
    for column in image_columns:
        source = source.cast_column(column, datasets.Image())
    path = str(tmp_path / f"{name}.parquet")
    source.to_parquet(path)
    return path


OK, CORRUPT = {"bytes": png_bytes(), "path": None}, {"bytes": b"not a picture" * 4, "path": None}
COLOURS = "What colour is it?\nChoices:\n(A) red\n(B) green\n(C) blue"


def vqa_rows(options_column: str, as_text: bool) -> list[dict]:
    def options(values):
        return str(values) if as_text else values

    rows = [("What colour is it?", ["red", "green", "blue"], "green", OK),       # 0 -> B
            ("How many sides does a square have?", [], "4", OK),               # 1 open question
            ("Which is bigger?", ["1", "2"], "(B)", OK),                        # 2 a letter already
            ("What is shown?", [], "", OK),                                     # 3 unverifiable
            ("Which colour?", ["red", "blue"], "red", CORRUPT),                 # 4 unreadable
            ("", [], "3", OK)]                                                  # 5 empty problem
    return [{"question": q, options_column: options(o), "answer": a, "image": image} for q, o, a, image in rows]


LAYOUTS = {  # name: (rows, picture columns, problems and solutions kept, pictures per kept row, dropped)
    "vqa": (vqa_rows("options", as_text=False), ["image"],
            [(COLOURS, "B"), ("How many sides does a square have?", "4"), ("Which is bigger?\nChoices:\n(A) 1\n(B) 2", "B")],
            [1, 1, 1], {"unverifiable solution": [3], UNREADABLE: [4], "empty problem": [5]}),
    "vqa-choices-as-text": (vqa_rows("choices", as_text=True), ["image"],
                            [(COLOURS, "B"), ("How many sides does a square have?", "4"),
                             ("Which is bigger?\nChoices:\n(A) 1\n(B) 2", "B")],
                            [1, 1, 1], {"unverifiable solution": [3], UNREADABLE: [4], "empty problem": [5]}),
    "mathvista": ([{"pid": "1", "question": "How many?", "choices": ["3", "4", "5"], "answer": "4",
                    "question_type": "multi_choice", "decoded_image": OK, "image": "images/1.jpg"},
                   {"pid": "2", "question": "What is the length?", "choices": None, "answer": "1.5",
                    "question_type": "free_form", "decoded_image": OK, "image": "images/2.jpg"},
                   {"pid": "3", "question": "What is it?", "choices": None, "answer": "",
                    "question_type": "free_form", "decoded_image": OK, "image": "images/3.jpg"}], ["decoded_image"],
                  [("How many?\nChoices:\n(A) 3\n(B) 4\n(C) 5", "B"), ("What is the length?", "1.5")],
                  [1, 1], {"unverifiable solution": [2]}),
    "scienceqa": ([{"question": "Which one needs light?", "choices": ["rock", "tree"], "answer": 1,
                    "hint": "Plants need light to grow.", "lecture": "", "image": None},
                   {"question": "Which is red?", "choices": ["apple", "sky"], "answer": 0, "hint": "", "lecture": "",
                    "image": OK},
                   {"question": "Pick one.", "choices": ["x", "y"], "answer": 5, "hint": "", "lecture": "", "image": OK}],
                  ["image"],
                  [("Context: Plants need light to grow.\nWhich one needs light?\nChoices:\n(A) rock\n(B) tree", "B"),
                   ("Which is red?\nChoices:\n(A) apple\n(B) sky", "A")],
                  [0, 1], {data_tools.BAD_OPTIONS: [2]}),
    "mmmu": ([{"id": "a", "question": "<image 1> <image 2> Which is larger?", "options": "['left', 'right', 'same']",
               "answer": "C", "image_1": OK, "image_2": OK},
              {"id": "b", "question": "How many sides?", "options": "[]", "answer": "4", "image_1": OK, "image_2": None},
              {"id": "c", "question": "Pick.", "options": "not a list", "answer": "A", "image_1": OK, "image_2": None}],
             ["image_1", "image_2"],
             [("<image 1> <image 2> Which is larger?\nChoices:\n(A) left\n(B) right\n(C) same", "C"),
              ("How many sides?", "4")],
             [2, 1], {data_tools.BAD_OPTIONS: [2]}),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_convert_layout(name, tmp_path, tiny_model):
    from grpo.families import load_processor

    rows, picture_columns, kept, pictures, dropped = LAYOUTS[name]
    source, out = write_source(tmp_path, name, rows, picture_columns), str(tmp_path / "out.parquet")
    messages = []
    report = data_tools.main(["convert", source, out], log=messages.append)  # --format auto
    assert report["format"] == name.split("-")[0]
    assert report["rows_read"] == len(rows) and report["kept"] == len(kept)
    assert {reason: [d["row"] for d in found["first"]] for reason, found in report["dropped"].items()} == dropped
    assert json.loads(messages[0]) == report
    with open(tmp_path / "out.report.json") as f:
        assert json.load(f) == report

    converted = data.load_rows(out)
    assert [(r["problem"], r["solution"]) for r in converted] == [(p, f"<answer>{a}</answer>") for p, a in kept]
    assert [len(r["images"]) for r in converted] == pictures
    assert all(image.size == (56, 56) for r in converted for image in r["images"])  # decoded back from PNG
    for problem, letter in kept:  # the options read back as answers reads them, the gold one of them
        options = answers.parse_options(problem)
        assert (letter in options) == ("Choices:" in problem)
        assert answers.verify(f"<answer>{letter}</answer>", f"<answer>{letter}</answer>", problem)
    prompts = data.load_prompt_dataset(out, "train", load_processor(tiny_model, 3136, 3136), QWEN, 4096,
                                       log=lambda _: None, check_solution=answers.unverifiable_reason)
    assert len(prompts) == len(kept) and prompts.dropped == {}


def test_convert_rows_already_in_the_training_schema(inspect_source, tmp_path):
    """INSPECT_ROWS go through unchanged but for the rows training could not use, their pictures
    (files beside the .jsonl) packed into the parquet file."""
    out = str(tmp_path / "clean.parquet")
    report = data_tools.main(["convert", inspect_source, out], log=lambda _: None)
    assert report["format"] == "training" and report["rows_read"] == 11 and report["kept"] == 6
    # Row 9's solution is blank: no answer in it, so it counts as unverifiable here.
    dropped = {reason: [d["row"] for d in found["first"]] for reason, found in report["dropped"].items()}
    assert dropped == {"empty problem": [4], "unverifiable solution": [5, 9], UNREADABLE: [6, 7]}
    converted = data.load_rows(out)
    kept = [0, 1, 2, 3, 8, 10]
    assert [(r["problem"], r["solution"]) for r in converted] == [INSPECT_ROWS[i][1:] for i in kept]
    sizes = {"ok.png": (56, 56), "wide.png": (400, 100), "tall.png": (30, 90)}
    assert [[image.size for image in r["images"]] for r in converted] == [[sizes[p] for p in INSPECT_ROWS[i][0]] for i in kept]
    assert data_tools.main(["inspect", out, "--html", str(tmp_path / "page.html")], log=lambda _: None)["kept"] == 6


def test_options_written_as_eval_writes_them():
    assert answers.parse_options(COLOURS) == {"A": "red", "B": "green", "C": "blue"}
    from grpo.data import with_options

    assert with_options("What colour is it?", ["red", "green", "blue"], 0) == COLOURS


def test_converted_parquet_trains_one_step(tmp_path, tiny_model):
    rows, picture_columns = LAYOUTS["vqa"][:2]
    source, out = write_source(tmp_path, "vqa", rows, picture_columns), str(tmp_path / "train.parquet")
    assert data_tools.main(["convert", source, out], log=lambda _: None)["kept"] == 3
    output_dir = str(tmp_path / "run")
    run_command([sys.executable, "train.py", "--output_dir", output_dir, "--model_name_or_path", tiny_model,
                 "--dataset_name", out, "--max_steps", "1", "--num_generations", "2", "--per_device_train_batch_size", "2",
                 "--max_completion_length", "4", "--beta", "0", "--report_to", "none", "--save_steps", "0",
                 "--max_pixels", "3136"], tmp_path)
    with open(f"{output_dir}/metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1]

# ---------------------------------------------------------------- command lines


@pytest.fixture(scope="module")
def odd_sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("odd")
    return {"unknown": write_source(folder, "unknown", [{"text": "hi", "label": 1}]),
            "mathvista": write_source(folder, "mathvista", LAYOUTS["mathvista"][0], ["decoded_image"]),
            "video": write_source(folder, "video", [{"problem": "p", "solution": "<answer>1</answer>", "video": "v.mp4"}]),
            "unjudgeable": write_source(folder, "unjudgeable", [{"question": "q", "answer": ""}])}


@pytest.mark.parametrize("argv, expected", [
    ([], "the following arguments are required: {inspect,convert,rollouts,plot}"),
    (["inspect"], "the following arguments are required: DATASET"),
    (["inspect", "no/such/file.parquet"], "DATASET 'no/such/file.parquet': no such file or folder"),
    (["inspect", "{mathvista}"], "missing column(s) ['problem', 'solution']"),
    (["inspect", "{mathvista}", "--samples", "-1"], "--samples is -1"),
    (["inspect", "{mathvista}", "--model_name_or_path", "/no/such/model"], "--model_name_or_path: '/no/such/model' is neither"),
    (["convert", "{unknown}", "{tmp}/out.parquet"], "has columns ['text', 'label'], which match no layout"),
    (["convert", "{mathvista}", "{tmp}/out.parquet", "--format", "mmmu"], "--format mmmu: SOURCE"),
    (["convert", "{mathvista}", "{tmp}/out.parquet", "--format", "csv"], "--format: invalid choice: 'csv'"),
    (["convert", "{mathvista}", "{tmp}/out.csv"], "must be a .parquet file"),
    (["convert", "{video}", "{tmp}/out.parquet"], "has a `video` column, which convert does not carry"),
    (["convert", "{unjudgeable}", "{tmp}/out.parquet"], "no row of 1 kept (unverifiable solution: 1)"),
])
def test_usage_errors_are_one_line_and_status_2(argv, expected, odd_sources, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, **odd_sources) for a in argv]
    assert data_tools.cli(argv) == 2
    err = capsys.readouterr().err  # datasets' own progress bars may come first, on lines of their own
    *before, line, end = err.split("\n")
    assert line.startswith("data_tools.py: error: ") and end == "", err
    assert "Traceback" not in err and "error" not in "".join(before)
    assert expected in line
    assert not (tmp_path / "out.parquet").exists()


def test_missing_column_error_points_to_convert(odd_sources, capsys):
    assert data_tools.cli(["inspect", odd_sources["mathvista"]]) == 2
    assert "python data_tools.py convert" in capsys.readouterr().err


def test_help_and_the_script(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        data_tools.cli(["--help"])
    assert done.value.code == 0 and "inspect" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        data_tools.cli(["convert", "--help"])
    assert "mathvista" in capsys.readouterr().out
    log = run_command([sys.executable, "data_tools.py", "inspect", str(tmp_path / "none.jsonl")], tmp_path, returncode=2)
    assert log.strip().splitlines() == [f"data_tools.py: error: DATASET {str(tmp_path / 'none.jsonl')!r}: no such file "
                                        "or folder (give a .parquet / .jsonl file, a save_to_disk folder, or a hub id owner/name)."]

# ---------------------------------------------------------------- rollouts

ACC, FMT = "accuracy", "format"
# (step, rank, prompt, row, [(accuracy, format, advantage), ...]): 3 completions a group; the
# rank 1 group at step 2 has the same prompt index as rank 0's and is a group of its own.
GROUPS = [
    (1, 0, 0, 5, [(1.0, 1.0, 1.15), (0.0, 1.0, -0.58), (0.0, 1.0, -0.58)]),
    (1, 0, 1, 2, [(0.0, 0.0, -1.15), (1.0, 0.5, 0.62), (1.0, 0.0, 0.53)]),
    (2, 0, 0, 0, [(0.0, 1.0, 0.0), (0.0, 1.0, 0.0), (0.0, 1.0, 0.0)]),   # equal rewards: no signal
    (2, 1, 0, 3, [(1.0, 1.0, 0.58), (1.0, 1.0, 0.58), (0.0, 1.0, -1.15)]),
]


def write_run(folder, dataset: str, lines: list[str] | None = None) -> str:
    """A run folder as train.py leaves it: training_args.json and completions.jsonl (GROUPS by default)."""
    folder.mkdir(exist_ok=True)
    (folder / "training_args.json").write_text(json.dumps({"dataset_name": dataset, "dataset_split": "train"}))
    if lines is None:
        lines = []
        for step, rank, prompt, row, scores in GROUPS:
            for n, (acc, fmt, adv) in enumerate(scores):
                lines.append(json.dumps({
                    "step": step, "rank": rank, "prompt": prompt, "row": row, "images": 1, "videos": 0,
                    "problem": f"What colour? <b>row {row}</b>", "solution": "<answer>A</answer>",
                    "completion": f"<think>try {n}</think><answer>{'AB'[n % 2]}</answer>", "truncated": n == 2,
                    "rewards": {ACC: acc, FMT: fmt}, "reward": acc + fmt, "advantage": adv,
                    "group_has_signal": len({a + f for a, f, _ in scores}) > 1}))
    (folder / "completions.jsonl").write_text("".join(line + "\n" for line in lines))
    return str(folder)


class RolloutPage(HTMLParser):
    """The cards of a rollouts page, each with its pictures, its label and its table's rows of cells."""

    def __init__(self, text: str):
        super().__init__()
        self.cards, self.selects, self.scripts, self.notices, self.tags = [], {}, [], [], []
        self._select, self._cell, self._into = None, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        card = self.cards[-1] if self.cards else None
        if tag == "div" and attrs.get("class") == "card":
            self.cards.append({"attrs": attrs, "images": [], "rows": [], "labels": [], "text": ""})
        elif tag == "img":
            card["images"].append(attrs["src"])
        elif tag == "tr" and attrs.get("class") == "completion":
            card["rows"].append([])
        elif tag == "td" and card and card["rows"]:
            self._cell = card["rows"][-1]
            self._cell.append("")
        elif tag == "p" and attrs.get("class") == "reason nosignal":
            card["labels"].append("")
            self._into = card["labels"]
        elif tag == "p" and attrs.get("id") == "notice":
            self.notices.append("")
            self._into = self.notices
        elif tag == "select":
            self._select = attrs["id"]
            self.selects[self._select] = []
        elif tag == "option" and self._select:
            self.selects[self._select].append(attrs["value"])
        elif tag == "script":
            self.scripts.append("")
            self._into = self.scripts

    def handle_endtag(self, tag):
        self._select = None if tag == "select" else self._select
        self._cell = None if tag == "td" else self._cell
        self._into = None if tag in ("p", "script") else self._into

    def handle_data(self, text):
        if self._cell is not None:
            self._cell[-1] += text
        if self._into is not None:
            self._into[-1] += text
        if self.cards:
            self.cards[-1]["text"] += text


def test_rollouts_page(colour_dataset, tmp_path):
    from PIL import Image

    from conftest import colour_rows

    run = write_run(tmp_path / "run", colour_dataset)
    shown = data_tools.main(["rollouts", run], log=lambda _: None)
    assert shown["html"] == f"{run}/rollouts.html"
    parsed = RolloutPage(open(f"{run}/rollouts.html", encoding="utf-8").read())
    # 4 groups: (step 1, rank 0, prompts 0 and 1), (step 2, rank 0, prompt 0), (step 2, rank 1, prompt 0)
    keys = [(c["attrs"]["data-step"], c["attrs"]["data-rank"], c["attrs"]["data-prompt"]) for c in parsed.cards]
    assert keys == [("1", "0", "0"), ("1", "0", "1"), ("2", "0", "0"), ("2", "1", "0")]
    assert [c["attrs"]["data-signal"] for c in parsed.cards] == ["yes", "yes", "no", "yes"]
    assert [c["labels"] for c in parsed.cards] == [[], [], ["no signal: all rewards equal"], []]
    assert parsed.notices == []
    pixels = [row["image"].getpixel((0, 0)) for row in colour_rows(8)]
    for card, (step, rank, prompt, row, scores) in zip(parsed.cards, GROUPS):
        assert card["attrs"]["data-row"] == str(row)
        assert len(card["rows"]) == 3  # G
        # cells: completion, accuracy, format, reward, advantage, truncated
        for n, (cells, (acc, fmt, adv)) in enumerate(zip(card["rows"], scores)):
            assert cells[0] == f"<think>try {n}</think><answer>{'AB'[n % 2]}</answer>"
            assert [float(c) for c in cells[1:5]] == [acc, fmt, acc + fmt, adv]
            assert cells[4][0] in "+-" and cells[5] == ("yes" if n == 2 else "no")
        assert f"What colour? <b>row {row}</b>" in card["text"]  # escaped: text, not a tag
        (uri,) = card["images"]
        head, encoded = uri.split(",", 1)
        assert head == "data:image/jpeg;base64"
        image = Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB")
        got = image.getpixel((image.width // 2, image.height // 2))
        assert max(abs(a - b) for a, b in zip(got, pixels[row])) <= 6, (got, pixels[row])  # JPEG: near, not exact
    assert not [t for t, _ in parsed.tags if t == "b"]
    assert not [t for t, attrs in parsed.tags if t in ("link", "iframe") or (t == "script" and "src" in attrs)]
    assert parsed.selects == {"filter-step": ["all", "1", "2"], "filter-signal": ["all", "yes", "no"]}
    (script,) = parsed.scripts
    assert "card.hidden" in script and "card.dataset[s.dataset.filter]" in script
    filters = {attrs["id"]: attrs.get("data-filter") for tag, attrs in parsed.tags if tag == "select"}
    assert filters == {"filter-step": "step", "filter-signal": "signal"}

    page = str(tmp_path / "last.html")
    assert data_tools.main(["rollouts", run, "--steps", "1", "--html", page], log=lambda _: None)["groups"] == 2
    last = RolloutPage(open(page, encoding="utf-8").read())
    assert [c["attrs"]["data-step"] for c in last.cards] == ["2", "2"]
    assert last.selects["filter-step"] == ["all", "2"]


def test_rollouts_without_the_dataset_still_shows_the_cards(tmp_path):
    run = write_run(tmp_path / "run", str(tmp_path / "gone"))
    data_tools.main(["rollouts", run], log=lambda _: None)
    parsed = RolloutPage(open(f"{run}/rollouts.html", encoding="utf-8").read())
    assert len(parsed.cards) == 4 and not [c for c in parsed.cards if c["images"]]
    (notice,) = parsed.notices
    assert notice.startswith("no thumbnails: the run's dataset") and "gone" in notice


GOOD = json.dumps({"step": 1, "rank": 0, "prompt": 0, "row": 0, "problem": "p", "solution": "<answer>A</answer>",
                   "completion": "A", "truncated": False, "rewards": {ACC: 1.0}, "reward": 1.0, "advantage": 0.0,
                   "group_has_signal": False})


@pytest.mark.parametrize("lines, argv, expected", [
    (None, [], "holds no completions.jsonl; run train.py with --log_completions_steps N"),
    ([], [], "completions.jsonl' is empty"),
    (["", "   "], [], "completions.jsonl' is empty"),
    ([GOOD, "", "{not json"], [], "completions.jsonl' line 3: not JSON"),
    (['{"step": 1}'], [], "completions.jsonl' line 1: not a completion record (no rank, prompt, completion"),
    (["[1, 2]"], [], "line 1: not a completion record"),
    ([GOOD], ["--steps", "0"], "--steps is 0"),
    ([GOOD], ["--steps", "x"], "--steps: invalid int value: 'x'"),
])
def test_rollouts_usage_errors(lines, argv, expected, colour_dataset, tmp_path, capsys):
    run = write_run(tmp_path / "run", colour_dataset, lines or [])
    if lines is None:
        (tmp_path / "run" / "completions.jsonl").unlink()
    assert data_tools.cli(["rollouts", run, *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("data_tools.py: error: "), err
    assert expected in err
    assert not (tmp_path / "run" / "rollouts.html").exists()


def test_rollouts_of_a_missing_folder(tmp_path, capsys):
    assert data_tools.cli(["rollouts", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()


def test_rollouts_of_a_real_run(tiny_model, colour_dataset, tmp_path):
    out = str(tmp_path / "run")
    run_command([sys.executable, "train.py", "--output_dir", out, "--model_name_or_path", tiny_model,
                 "--dataset_name", colour_dataset, "--max_steps", "2", "--num_generations", "2",
                 "--per_device_train_batch_size", "2", "--max_completion_length", "4", "--beta", "0",
                 "--report_to", "none", "--save_steps", "0", "--max_pixels", "3136", "--log_completions_steps", "1"], tmp_path)
    log = run_command([sys.executable, "data_tools.py", "rollouts", out], tmp_path)
    assert "[rollouts] 4 groups" in log
    parsed = RolloutPage(open(f"{out}/rollouts.html", encoding="utf-8").read())
    # one rank, --per_device_train_batch_size 2 prompts a step, logged every step: 2 groups in each of 2 steps
    assert [c["attrs"]["data-step"] for c in parsed.cards] == ["1", "1", "2", "2"]
    assert [len(c["rows"]) for c in parsed.cards] == [2, 2, 2, 2]  # --num_generations 2
    assert all(len(c["images"]) == 1 for c in parsed.cards) and parsed.notices == []

# ---------------------------------------------------------------- the pages in a real browser

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Debian's headless Chromium driven through its ChromeDriver (Selenium), the page's console
    recorded. .ci/run installs both and sets GRPO_BROWSER_TESTS=required, so CI cannot skip these."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        why = f"no {CHROMIUM} or {CHROMEDRIVER}: apt-get install chromium chromium-driver (as .ci/run does)"
        if os.environ.get("GRPO_BROWSER_TESTS") == "required":
            pytest.fail(why)
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Root in a sandbox with no network: no Chromium sandbox, no background connections to refuse.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def open_page(browser, path: str) -> list[dict]:
    """Load the page from disk (file://, no server) and return what its console said at error level."""
    import pathlib

    browser.get(pathlib.Path(path).resolve().as_uri())
    assert browser.execute_script("return document.readyState") == "complete"
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def thumbnails(browser) -> list[tuple]:
    """(loaded, natural width, natural height) of every <img>: a picture that did not decode is 0 wide."""
    return [tuple(t) for t in browser.execute_script(
        "return [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight])")]


def choose(browser, select_id: str, value: str) -> list[str]:
    """Pick `value` in a filter menu; the data-row of each card still displayed, and the counter line."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(By.ID, select_id)).select_by_value(value)
    cards = browser.find_elements(By.CSS_SELECTOR, ".card")
    return [card.get_attribute("data-row") for card in cards if card.is_displayed()], \
        browser.find_element(By.ID, "shown").text


def test_inspect_page_in_a_browser(inspect_source, browser, tmp_path):
    page = str(tmp_path / "page.html")
    report = data_tools.main(["inspect", inspect_source, "--html", page, "--samples", "20"], log=lambda _: None)
    assert open_page(browser, page) == []
    # Every row is on the page (11 of them, --samples 20); thumbnails as INSPECT_ROWS has them: ok.png
    # in rows 0 1 3 4 5 8 9 10, wide.png in row 1, tall.png in row 8; rows 6 and 7 do not decode.
    assert sorted(thumbnails(browser)) == sorted([(True, 56, 56)] * 8 + [(True, 160, 40), (True, 30, 90)])
    everything = [str(row) for row in range(11)]
    assert choose(browser, "filter-type", "all") == (everything, "11 of 11 rows shown")
    # Each menu entry leaves exactly the rows the report counts under it (and the hand count above).
    by_type = {t: [str(r) for r, e in enumerate(EXPECTED_TYPES) if e == t] for t in report["answer_types"]}
    for answer_type, rows in by_type.items():
        shown, counter = choose(browser, "filter-type", answer_type)
        assert shown == rows and len(rows) == report["answer_types"][answer_type]
        assert counter == f"{len(rows)} of 11 rows shown"
    choose(browser, "filter-type", "all")
    for reason, found in report["dropped"].items():
        shown, _ = choose(browser, "filter-reason", reason)
        assert shown == [str(r) for r, why in REASONS_WITHOUT_MODEL.items() if why == reason]
        assert len(shown) == found["count"]
    shown, _ = choose(browser, "filter-reason", "kept")
    assert shown == ["0", "1", "2", "3", "8", "10"] and len(shown) == report["kept"]
    # Both menus at once: kept numbers are rows 1 and 10 (row 6 is a number too, but dropped).
    assert choose(browser, "filter-type", "number") == (["1", "10"], "2 of 11 rows shown")
    assert open_page(browser, page) == []  # nothing went wrong while filtering either


def test_rollouts_page_in_a_browser(colour_dataset, browser, tmp_path):
    run = write_run(tmp_path / "run", colour_dataset)
    data_tools.main(["rollouts", run], log=lambda _: None)
    assert open_page(browser, f"{run}/rollouts.html") == []
    # One picture per group, rows 5 2 0 3 of colour_rows: 72, 72, 56 and 56 pixels wide, 56 high.
    assert thumbnails(browser) == [(True, 72, 56), (True, 72, 56), (True, 56, 56), (True, 56, 56)]
    rows = [str(row) for _, _, _, row, _ in GROUPS]
    assert choose(browser, "filter-signal", "all") == (rows, "4 of 4 groups shown")
    assert choose(browser, "filter-signal", "no") == (["0"], "1 of 4 groups shown")  # step 2, rank 0: equal rewards
    assert choose(browser, "filter-signal", "yes") == (["5", "2", "3"], "3 of 4 groups shown")
    assert choose(browser, "filter-step", "2") == (["3"], "1 of 4 groups shown")
    assert choose(browser, "filter-signal", "all") == (["0", "3"], "2 of 4 groups shown")
    assert open_page(browser, f"{run}/rollouts.html") == []


def test_video_frames_on_the_page_in_a_browser(video_dataset, browser, tmp_path):
    page = str(tmp_path / "page.html")
    data_tools.main(["inspect", video_dataset, "--html", page], log=lambda _: None)
    assert open_page(browser, page) == []
    # Rows 0 and 3: 4 frames of 56 x 56; rows 1 and 4: one image, 64 x 56 (colour_rows: 56 + 8 * (i % 3) wide).
    assert thumbnails(browser) == [(True, 56, 56)] * 4 + [(True, 64, 56)] + [(True, 56, 56)] * 4 + [(True, 64, 56)]
