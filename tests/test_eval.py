"""eval.py: both prompting modes, sampling with pass@k, several processes, other datasets' schemas, clear errors.

The expected numbers are computed here from the per-sample lines eval.py writes, never copied from a run.
"""

import json
import os
import socket
import sys

import datasets
import pytest
from conftest import FAMILY_NAMES, run_command
from PIL import Image

import eval as eval_tool
from grpo import answers


def evaluate(model: str, dataset: str, tmp_path, *flags: str) -> tuple[dict, list[dict]]:
    """eval.py in this process; (the summary it returns, the per-sample lines it wrote)."""
    argv = ["--model_name_or_path", model, "--dataset_name", dataset, "--output", str(tmp_path / "eval" / "summary.json"),
            "--max_new_tokens", "12", "--batch_size", "3", *flags]
    summary = eval_tool.evaluate(eval_tool.parse_args(argv))
    return summary, read_lines(summary["samples_file"])


def read_lines(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def test_both_modes_summary_is_the_mean_of_the_sample_lines(format_warmed_model, colour_dataset, tmp_path, capsys):
    summary, lines = evaluate(format_warmed_model, colour_dataset, tmp_path, "--mode", "both")
    assert summary["samples_file"] == str(tmp_path / "eval" / "summary.samples.jsonl")
    with open(tmp_path / "eval" / "summary.json") as f:
        assert json.load(f) == summary
    for mode in ("reasoning", "direct"):
        mine = [line for line in lines if line["mode"] == mode]
        assert [line["id"] for line in mine] == list(range(8))  # every row once, in order
        assert 0 < mean(line["correct"] for line in mine) < 1  # right and wrong answers, so the test means something
        result = summary["modes"][mode]
        assert result["samples"] == len(mine)
        assert result["accuracy"] == mean(line["correct"] for line in mine)
        assert result["format"] == mean(line["format"] for line in mine)
        assert result["not_extracted"] == sum(line["extracted_by"] == "none" for line in mine)
        for line in mine:
            assert line["correct"] == answers.verify(line["completion"], f"<answer>{line['gold']}</answer>", line["question"])
    printed = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["mode"] for line in printed if line.startswith('{"model"')] == ["reasoning", "direct"]
    assert any(line.split()[:2] == ["direct", "8"] for line in printed)  # the table's row


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_family_in_both_modes(family, family_models, mixed_dataset, tmp_path):
    """A checkpoint of each supported family, on rows with one image, two images and none."""
    summary, lines = evaluate(family_models(family), mixed_dataset, tmp_path, "--mode", "both", "--split", "train",
                              "--max_new_tokens", "4", "--max_pixels", "12544")
    rows = [line["id"] for line in lines if line["mode"] == "reasoning"]
    assert rows == [line["id"] for line in lines if line["mode"] == "direct"] and len(rows) == len(set(rows)) > 0
    assert summary["modes"]["direct"]["samples"] == summary["modes"]["reasoning"]["samples"] == len(rows)


def test_sampling_reports_pass_at_k(format_warmed_model, colour_dataset, tmp_path):
    summary, lines = evaluate(format_warmed_model, colour_dataset, tmp_path, "--num_samples", "3", "--temperature", "1.0")
    result = summary["modes"]["reasoning"]
    assert len(lines) == 8
    for line in lines:
        assert len(line["completions"]) == len(line["answers"]) == len(line["correct"]) == len(line["format"]) == 3
        assert line["pass_at_k"] == any(line["correct"])
    assert result["pass_at_k"] == mean(any(line["correct"]) for line in lines)
    assert result["accuracy"] == mean(c for line in lines for c in line["correct"])
    assert result["pass_at_k"] >= result["accuracy"]
    assert 0 < result["accuracy"] < 1


def test_two_processes_give_the_records_of_one(format_warmed_model, colour_dataset, tmp_path):
    """Batches of 3 over 8 rows: rank 0 answers batches 0 and 2, rank 1 batch 1; sampled, so the
    per-batch seed matters too. One thread per process in both runs, as torchrun sets."""
    def run(launcher: list[str], name: str) -> list[dict]:
        output = str(tmp_path / name / "summary.json")
        run_command([*launcher, "eval.py", "--model_name_or_path", format_warmed_model, "--dataset_name", colour_dataset,
                     "--mode", "both", "--batch_size", "3", "--max_new_tokens", "12", "--num_samples", "2",
                     "--temperature", "1.0", "--output", output], tmp_path, env={"OMP_NUM_THREADS": "1"})
        return read_lines(output.replace(".json", ".samples.jsonl"))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one = run([sys.executable], "one")
    two = run(["torchrun", "--nproc_per_node", "2", "--master_port", str(port)], "two")
    assert len(one) == 16 and two == one


def test_deepspeed_launcher_flag_is_accepted():
    args = eval_tool.parse_args(["--model_name_or_path", "m", "--dataset_name", "d", "--local_rank=1"])
    assert args.model_name_or_path == "m"


def picture(width: int) -> Image.Image:
    return Image.new("RGB", (width, 28), "blue")


MATHVISTA_ROWS = [
    {"question": "Which colour is the bar?", "choices": ["red", "blue", "green"], "answer": "blue",
     "question_type": "multi_choice", "answer_type": "text", "decoded_image": picture(56)},
    {"question": "How long is the bar, in cm?", "choices": None, "answer": "3.5", "question_type": "free_form",
     "answer_type": "float", "decoded_image": picture(60)},
]


def mmmu_rows(options_as_text: bool) -> list[dict]:
    """Two MMMU-style rows; MMMU itself stores each options list as its text."""
    rows = [{"question": "<image 1> <image 2> Which one is wider?", "options": ["the first", "the second"], "answer": "B",
             "image_1": picture(40), "image_2": picture(80), "image_3": None},
            {"question": "How many pictures? <image 1>", "options": ["1", "2", "3", "4"], "answer": "A",
             "image_1": picture(44), "image_2": None, "image_3": None}]
    return [row | {"options": str(row["options"])} for row in rows] if options_as_text else rows


MMMU_EXPECTED = (["B", "A"], [["the first", "the second"], ["1", "2", "3", "4"]], [[40, 80], [44]])


@pytest.mark.parametrize("rows, fmt, golds, options, widths", [
    (MATHVISTA_ROWS, "MathVista", ["B", "3.5"], [["red", "blue", "green"], []], [[56], [60]]),
    (mmmu_rows(options_as_text=True), "MMMU", *MMMU_EXPECTED),
    (mmmu_rows(options_as_text=False), "MMMU", *MMMU_EXPECTED),
])
def test_other_schemas_become_training_rows(rows, fmt, golds, options, widths, tmp_path):
    source = datasets.Dataset.from_list(rows)
    assert eval_tool.dataset_format(source.column_names, "d") == fmt
    converted = eval_tool.to_training_schema(source, fmt, str(tmp_path))
    assert converted.column_names == ["problem", "solution", "images"]
    for row, original, gold, listed, sizes in zip(converted, rows, golds, options, widths):
        assert row["problem"].startswith(original["question"])
        assert list(answers.parse_options(row["problem"]).values()) == listed
        assert answers.extract_answer(row["solution"]) == gold
        assert [image.width for image in row["images"]] == sizes  # every picture, in order
        assert answers.verify(f"<think>...</think><answer>{gold}</answer>", row["solution"], row["problem"])
        wrong = "C" if gold != "C" else "A"
        assert not answers.verify(f"<answer>{wrong}</answer>", row["solution"], row["problem"])
        if listed and gold.isalpha():  # the option's text is that letter's answer too
            text = listed["ABCD".index(gold)]
            assert answers.verify(f"<answer>{text}</answer>", row["solution"], row["problem"])


def test_mmmu_rows_run_end_to_end(tiny_model, tmp_path):
    folder = str(tmp_path / "mmmu")
    datasets.Dataset.from_list(mmmu_rows(options_as_text=True)).save_to_disk(folder)
    summary, lines = evaluate(tiny_model, folder, tmp_path / "out", "--mode", "direct")
    assert [line["gold"] for line in lines] == ["B", "A"]
    assert all("(A) " in line["question"] and "(B) " in line["question"] for line in lines)
    assert summary["modes"]["direct"]["samples"] == 2 and summary["dataset"] == folder


@pytest.fixture(scope="module")
def bad_datasets(tmp_path_factory):
    """Datasets eval.py must refuse, by name: a MathVista-like one without answers, an empty split
    and an empty file, one without the split asked for, and one whose rows are all unusable."""
    root = tmp_path_factory.mktemp("bad-data")
    no_answer = [{k: v for k, v in row.items() if k != "answer"} for row in MATHVISTA_ROWS]
    datasets.Dataset.from_list(no_answer).save_to_disk(str(root / "no-answer"))
    text = datasets.Features({"problem": datasets.Value("string"), "solution": datasets.Value("string")})
    empty = datasets.Dataset.from_dict({"problem": [], "solution": []}, features=text)
    train = datasets.Dataset.from_dict({"problem": ["1+1?"], "solution": ["<answer>2</answer>"]})
    datasets.DatasetDict({"train": train, "test": empty}).save_to_disk(str(root / "empty-test"))
    datasets.DatasetDict({"train": train}).save_to_disk(str(root / "train-only"))
    empty.to_parquet(str(root / "empty.parquet"))
    datasets.Dataset.from_dict({"problem": ["", " "], "solution": ["<answer>2</answer>"] * 2}).save_to_disk(
        str(root / "unusable"))
    return root


@pytest.mark.parametrize("flags, flag, words", [
    (["--mode", "chain"], "--mode", "reasoning, direct or both"),
    (["--num_samples", "1"], "--num_samples", "k >= 2"),
    (["--num_samples", "0"], "--num_samples", "k >= 2"),
    (["--temperature", "0.7"], "--temperature", "--num_samples"),
    (["--model_name_or_path", "/no/such/model"], "--model_name_or_path", "no such folder"),
    (["--model_name_or_path", "nobody/no-such-model"], "--model_name_or_path", "cannot read"),
    (["--dataset_name", "/no/such/data"], "--dataset_name", "no such file or folder"),
    (["--dataset_name", "{data}/no-answer"], "--dataset_name", "['answer']; found ['question', 'choices'"),
    (["--dataset_name", "{data}/empty-test"], "--split", "split 'test' of"),
    (["--dataset_name", "{data}/empty.parquet"], "--dataset_name", "is it empty?"),
    (["--dataset_name", "{data}/train-only"], "--split", "'test' is not a split"),
    (["--dataset_name", "{data}/unusable", "--split", "train"], "--dataset_name", "no usable rows out of 2"),
])
def test_clear_errors(flags, flag, words, tiny_model, colour_dataset, bad_datasets, tmp_path, capsys):
    argv = ["--model_name_or_path", tiny_model, "--dataset_name", colour_dataset, "--output", str(tmp_path / "s.json"),
            *[f.format(data=bad_datasets) for f in flags]]
    assert eval_tool.cli(argv) == 2
    err = capsys.readouterr().err  # may hold datasets' progress bars before the message
    line = err.strip().splitlines()[-1]
    assert err.count("eval.py: error") == 1 and "Traceback" not in err
    assert line.startswith(f"eval.py: error: {flag}") and words in line, line
    assert not os.path.exists(tmp_path / "s.json")


def test_a_clear_error_is_one_line_without_traceback(tmp_path):
    log = run_command([sys.executable, "eval.py", "--model_name_or_path", str(tmp_path), "--dataset_name", "x/y"],
                      tmp_path, returncode=2)
    assert log.strip().splitlines() == [log.strip()] and log.startswith("eval.py: error: --model_name_or_path: ")


def test_default_outputs_go_next_to_the_model(tiny_model, colour_dataset):
    args = eval_tool.parse_args(["--model_name_or_path", tiny_model, "--dataset_name", colour_dataset, "--split", "val"])
    assert eval_tool.output_paths(args) == (os.path.join(tiny_model, "eval-ds-val.json"),
                                            os.path.join(tiny_model, "eval-ds-val.samples.jsonl"))
    args = eval_tool.parse_args(["--model_name_or_path", "org/model", "--dataset_name", "AI4Math/MathVista",
                                 "--output", "results/mathvista.json"])
    assert eval_tool.output_paths(args) == ("results/mathvista.json", "results/mathvista.samples.jsonl")


def test_greedy_answers_are_the_argmax_whatever_the_checkpoint_says(tiny_model):
    """eval.py's greedy answers (answer_batch without --num_samples) are the argmax at every step, worked
    out here with a full forward per token, placeholders never chosen; the checkpoint's own generation
    config (here repetition_penalty 10 and no_repeat_ngram_size 1: a published one carries such sampling
    defaults) is not applied ([checkpoint sampling defaults]). The control: generate under the
    checkpoint's config picks other tokens, so the test can tell the two apart."""
    import argparse

    import torch

    from grpo import data, families, policy

    processor = families.load_processor(tiny_model, 56 * 56, 56 * 56)
    model = families.load_model(tiny_model, torch.float32, "eager").eval()
    model.generation_config.repetition_penalty, model.generation_config.no_repeat_ngram_size = 10.0, 1
    family, tokenizer, tokens = families.family_of(model), processor.tokenizer, 10
    example = {"problem": "What colour is the image?", "images": [Image.new("RGB", (56, 56), "red")], "videos": []}
    args = argparse.Namespace(num_samples=None, max_new_tokens=tokens, temperature=None)
    texts, lengths = eval_tool.answer_batch(model, processor, family, [example], None, args, "cpu")

    inputs = families.build_inputs(processor, [data.build_conversation(example["problem"], None, 1, 0)],
                                   [example["images"]], family)
    forbidden = families.forbidden_token_ids(processor, model.config)
    end_ids = policy.end_token_ids(model, tokenizer)
    chosen = []
    with torch.no_grad():
        for _ in range(tokens):
            so_far = torch.tensor([chosen], dtype=torch.long)
            full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], so_far], 1),
                        attention_mask=torch.ones(1, inputs["input_ids"].shape[1] + len(chosen), dtype=torch.long))
            for key in families.token_type_keys(inputs):
                full[key] = torch.cat([inputs[key], torch.zeros_like(so_far)], 1)
            logits = model(**full).logits[0, -1]
            logits[forbidden] = -float("inf")
            chosen.append(int(logits.argmax()))
            if chosen[-1] in end_ids:
                break
        checkpoint_says = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert texts == [tokenizer.decode(chosen, skip_special_tokens=True)] and lengths == [len(chosen)]
    assert checkpoint_says.tolist()[:len(chosen)] != chosen  # the checkpoint's settings would change the answer
