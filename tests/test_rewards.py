"""grpo/rewards.py: the reward functions, their registry and import paths, and fault-tolerant
scoring. Expected values are worked out by hand, never copied from the code's output."""

import math
import sys
import time

import pytest

from grpo import answers, rewards
from grpo.rewards import (REWARD_FUNCS, RewardFaults, accuracy_reward, format_reward, get_reward_funcs,
                          score_completions)
from tests import faulty_rewards

ANGLES = "Find the angle x. Choices: A: 30° B: 40° C: 50° D: 60°"

@pytest.mark.parametrize("completion, expected", [
    ("<think>2+4=6</think><answer>6</answer>", 1.0),
    ("  <think>\nfirst line\nsecond line\n</think>\n\n<answer>\nB\n</answer>\n", 1.0),  # multi-line needs DOTALL
    ("<think>2+4=6</think>", 0.0),                                           # no answer
    ("<answer>6</answer>", 0.0),                                             # no think
    ("<answer>6</answer><think>2+4=6</think>", 0.0),                         # answer before think
    ("<think>a</think><answer>6</answer><answer>7</answer>", 0.0),           # two answer blocks
    ("<think>a</think><think>b</think><answer>6</answer>", 0.0),             # two think blocks
    ("<think>a</think><answer>6</answer><think>b</think><answer>6</answer>", 0.0),
    ("Sure! <think>a</think><answer>6</answer>", 0.0),                       # text before
    ("<think>a</think><answer>6</answer> Hope this helps.", 0.0),            # text after
    ("<think>a</think> so <answer>6</answer>", 0.0),                         # text between
    ("<think>a <answer>6</answer></think><answer>6</answer>", 0.0),          # nested
    ("<think>a</think><answer><think>b</think>6</answer>", 0.0),
    ("<think>a</think><answer>6", 0.0),                                      # unclosed
    ("", 0.0),
])
def test_format_reward(completion, expected):
    assert format_reward([completion]) == [expected]


def test_format_reward_is_per_completion_and_ignores_columns():
    good, bad = "<think>a</think><answer>1</answer>", "1"
    assert format_reward([good, bad, good], solution=["1", "2", "3"], image=[None] * 3) == [1.0, 0.0, 1.0]


def test_accuracy_reward_rows_are_aligned():
    completions = ["<think>.</think><answer>6</answer>", "<think>.</think><answer>6</answer>",
                   "<think>.</think><answer>40°</answer>"]
    solutions = ["<answer>6</answer>", "<answer>7</answer>", "<answer>B</answer>"]
    problems = ["How many?", "How many?", ANGLES]
    assert accuracy_reward(completions, solutions, problems) == [1.0, 0.0, 1.0]
    assert accuracy_reward(completions, solution=solutions, problem=problems, image=[None] * 3) == [1.0, 0.0, 1.0]
    assert accuracy_reward(completions, solutions) == [1.0, 0.0, 0.0]  # without problem, 40° is not B


def test_accuracy_reward_reads_each_gold_once(monkeypatch):
    """Completions i*G .. i*G+G-1 share a gold: two groups of G = 4 are two gold readings, not eight."""
    read = []
    real = answers.read_gold
    monkeypatch.setattr(answers, "read_gold", lambda *args: read.append(args) or real(*args))
    completions = [f"<answer>{a}</answer>" for a in ("9/2", "4.5", "5", "\\frac{9}{2}", "B", "40", "A", "(B)")]
    solutions = ["<answer>4.5</answer>"] * 4 + ["<answer>B</answer>"] * 4
    problems = ["Halve 9."] * 4 + [ANGLES] * 4
    assert accuracy_reward(completions, solutions, problems) == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    assert read == [("<answer>4.5</answer>", "Halve 9."), ("<answer>B</answer>", ANGLES)]


def test_accuracy_reward_counts_a_comparison_past_its_time(caplog, monkeypatch):
    """(x+1)^{999} against 4 sends math-verify's simplify() into an expansion it would not leave for minutes:
    the worker is stopped after VERIFY_SECONDS, the answer scores 0.0, and the timeout is counted and logged
    (the first three of a process are, then the 10th, 100th, ...: the count starts at 0 here)."""
    monkeypatch.setattr(answers, "_timeouts", 0)
    before = answers.timeouts()
    start = time.monotonic()
    scores = accuracy_reward(["<answer>(x+1)^{999}</answer>", "<answer>4</answer>"], ["<answer>4</answer>"] * 2)
    assert scores == [0.0, 1.0] and time.monotonic() - start < 2.0
    assert answers.timeouts() == before + 1
    assert "no verdict from math-verify in time on answer '(x+1)^{999}'" in caplog.text


def test_accuracy_reward_length_mismatch():
    with pytest.raises(ValueError, match="3 completions but 2 solution"):
        accuracy_reward(["6", "6", "6"], ["6", "6"])
    with pytest.raises(ValueError, match="2 completions but 1 problem"):
        accuracy_reward(["6", "6"], ["6", "6"], ["q"])


def test_registry():
    assert REWARD_FUNCS == {"accuracy": accuracy_reward, "format": format_reward}
    assert get_reward_funcs(["format", "accuracy"]) == [format_reward, accuracy_reward]
    with pytest.raises(ValueError, match="'length'.*accuracy, format"):
        get_reward_funcs(["accuracy", "length"])


# ---------------------------------------------------------------- reward functions by import path

def test_reward_funcs_by_import_path():
    funcs = get_reward_funcs(["tests.faulty_rewards:raises_on_b", "format", "grpo.rewards:accuracy_reward"])
    assert funcs == [faulty_rewards.raises_on_b, format_reward, accuracy_reward]


@pytest.mark.parametrize("entry, says", [
    ("length", ["'length'", "accuracy, format", "module:function"]),
    ("tests.no_such_module:f", ["'tests.no_such_module:f'", "cannot import module 'tests.no_such_module'",
                                "No module named 'tests.no_such_module'"]),
    ("tests.faulty_rewards:no_such", ["'tests.faulty_rewards:no_such'", "no attribute 'no_such'"]),
    ("tests.faulty_rewards:NOT_CALLABLE", ["'tests.faulty_rewards:NOT_CALLABLE'", "is a float, not a function"]),
    ("tests.faulty_rewards:", ["'tests.faulty_rewards:'", "expected module:function"]),
    ("tests:raises_on_b", ["'tests:raises_on_b'", "no attribute 'raises_on_b'"]),
])
def test_reward_func_errors_name_the_entry(entry, says):
    with pytest.raises(ValueError) as error:
        get_reward_funcs(["format", entry])
    for text in says:
        assert text in str(error.value)


def test_reward_func_from_the_current_directory(tmp_path, monkeypatch):
    """A my_rewards.py next to where the user runs is found, though that folder is not on sys.path."""
    (tmp_path / "cwd_rewards_t.py").write_text("def length_penalty(completions, **kwargs):\n"
                                                "    return [-len(c) / 10 for c in completions]\n")
    (tmp_path / "cwd_broken_t.py").write_text("def f(:\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        [fn] = get_reward_funcs(["cwd_rewards_t:length_penalty"])
        assert fn(["ab", "abcde"]) == [-0.2, -0.5]
        with pytest.raises(ValueError, match="'cwd_broken_t:f'.*cannot import module 'cwd_broken_t' .SyntaxError"):
            get_reward_funcs(["cwd_broken_t:f"])
    finally:
        sys.modules.pop("cwd_rewards_t", None)

# ---------------------------------------------------------------- fault-tolerant scoring

LETTERS = ["A", "B", "C", "B"]
ROWS = [10, 11, 12, 13]


def letter_columns(letters=LETTERS):
    return {"solution": [f"<answer>{x}</answer>" for x in letters], "problem": ["Pick one."] * len(letters)}


def test_scoring_equals_a_direct_call_with_one_call_each():
    completions = ["<think>a</think><answer>A</answer>", "<answer>B</answer>",
                   "<think>a</think><answer>B</answer>", "<think>a</think><answer>B</answer>"]
    columns = letter_columns()
    calls = []

    def counted_format(completions, **kwargs):
        calls.append(len(completions))
        return format_reward(completions, **kwargs)

    lines = []
    scores, failures = score_completions([counted_format, accuracy_reward], ["format", "accuracy"], completions,
                                         columns, ROWS, RewardFaults(lines.append))
    # format: 1 0 1 1; accuracy against A B C B: 1 1 0 1
    assert scores == [[1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]
    assert scores == [list(pair) for pair in zip(format_reward(completions), accuracy_reward(completions, **columns))]
    assert failures == [0, 0] and lines == [] and calls == [4]


def test_a_function_failing_on_some_rows_costs_only_those():
    lines = []
    scores, failures = score_completions(
        [faulty_rewards.raises_on_b, format_reward, faulty_rewards.one_at_a_time],
        ["raises_on_b", "format", "one_at_a_time"], ["x"] * 4, letter_columns(), ROWS, RewardFaults(lines.append))
    # raises_on_b: B at rows 11 and 13 fail, 1.0 elsewhere; format: 0 for "x"; one_at_a_time: B 1.0, else 0.5
    assert scores == [[1.0, 0.0, 0.5], [0.0, 0.0, 1.0], [1.0, 0.0, 0.5], [0.0, 0.0, 1.0]]
    assert failures == [2, 0, 0]
    assert len(lines) == 2
    for line, row in zip(lines, (11, 13)):
        assert line.startswith(f"reward function 'raises_on_b' failed on dataset row {row}: ")
        assert "ValueError: raises_on_b: the answer is B" in line and "gets 0.0" in line


def test_columns_must_be_aligned():
    with pytest.raises(ValueError, match="2 completions but lengths .*'solution': 1"):
        score_completions([format_reward], ["format"], ["x", "y"], {"solution": ["A"]}, [0, 1], RewardFaults(print))


def test_every_completion_failing():
    lines = []
    scores, failures = score_completions(
        [faulty_rewards.always_raises, faulty_rewards.one_short], ["always_raises", "one_short"], ["x"] * 2,
        letter_columns(["A", "C"]), [0, 1], RewardFaults(lines.append, limit=5))
    assert scores == [[0.0, 0.0], [0.0, 0.0]] and failures == [2, 2]
    assert "'always_raises' failed on dataset row 1: raised RuntimeError: always_raises: broken" in lines[1]
    assert "'one_short' failed on dataset row 0: returned 0 values for 1 completion" in lines[2]


def test_bad_values_become_zero_and_count():
    values = [0.5, None, float("nan"), float("inf"), -math.inf, True, False, "1.0", 2, 10 ** 400, [1.0]]
    good = {0: 0.5, 5: 1.0, 6: 0.0, 8: 2.0}  # bool counts as 0/1; None, NaN, inf, text, huge int, a list do not
    lines = []
    scores, failures = score_completions([faulty_rewards.value_column], ["value_column"], ["x"] * len(values),
                                         {"value": values}, list(range(100, 111)),
                                         RewardFaults(lines.append, limit=20))
    assert [row[0] for row in scores] == [good.get(i, 0.0) for i in range(len(values))]
    assert all(type(row[0]) is float for row in scores)
    assert failures == [7]
    assert [line.split(":")[0] for line in lines[:7]] == [
        f"reward function 'value_column' failed on dataset row {row}" for row in (101, 102, 103, 104, 107, 109, 110)]
    assert "returned None" in lines[0] and "returned nan" in lines[1] and "returned inf" in lines[2]
    assert "returned '1.0'" in lines[4]


def test_nan_from_a_batch_that_works():
    lines = []
    scores, failures = score_completions([faulty_rewards.nan_for_b], ["nan_for_b"], ["x"] * 4, letter_columns(), ROWS,
                                         RewardFaults(lines.append))
    assert scores == [[1.0], [0.0], [1.0], [0.0]] and failures == [2]
    assert "row 11: returned nan" in lines[0] and "row 13: returned nan" in lines[1] and len(lines) == 2


def test_the_log_is_bounded_over_calls():
    """Each call: two failures per function. limit 2: two detailed lines per function, then one line that
    says the rest are counted, then silence, however many calls follow."""
    lines = []
    faults = RewardFaults(lines.append, limit=2)
    funcs, names = [faulty_rewards.raises_on_b, faulty_rewards.nan_for_b], ["raises_on_b", "nan_for_b"]
    sizes = []
    for _ in range(4):
        _, failures = score_completions(funcs, names, ["x"] * 4, letter_columns(), ROWS, faults)
        assert failures == [2, 2]
        sizes.append(len(lines))
    assert sizes == [6, 6, 6, 6]  # the limit is reached within the first call
    assert dict(faults.counts) == {"raises_on_b": 8, "nan_for_b": 8}
    for name in names:
        mine = [line for line in lines if line.startswith(f"reward function {name!r}")]
        assert len(mine) == 3
        assert "dataset row 11" in mine[0] and "dataset row 13" in mine[1]
        assert "further ones are only counted" in mine[2] and f"reward/{name}_failures" in mine[2]


def test_the_counted_line_comes_once_the_limit_is_reached():
    lines = []
    faults = RewardFaults(lines.append, limit=3)
    sizes = []
    for _ in range(3):  # one failure per call (row 11)
        score_completions([faulty_rewards.raises_on_b], ["f"], ["x"] * 2, letter_columns(["A", "B"]), [10, 11], faults)
        sizes.append(len(lines))
    assert sizes == [1, 2, 4]
    assert "only counted" in lines[3] and all("only counted" not in line for line in lines[:3])
    score_completions([faulty_rewards.raises_on_b], ["f"], ["x"] * 2, letter_columns(["A", "B"]), [10, 11], faults)
    assert len(lines) == 4 and faults.counts["f"] == 4


def test_each_completion_scored_against_its_own_prompt():
    """Several prompts per device: completion i is judged against prompt i // G's solution ([group order])."""
    from conftest import colour_rows

    examples = [{"problem": r["problem"], "solution": r["solution"], "image": None, "prompt": None}
                for r in colour_rows(3)]  # answers A, B, C
    G = 2
    seen = []

    def record(completions, solution, problem, **_):
        seen.extend(zip(completions, solution, problem))
        return [0.0] * len(completions)

    faults = rewards.RewardFaults(log=lambda message: None)
    texts = [f"completion {i}" for i in range(6)]
    rewards.score([record], ["record"], texts, examples, G, faults)
    assert [s for _, s, _ in seen] == [ex["solution"] for ex in examples for _ in range(G)]
    assert [p for _, _, p in seen] == [ex["problem"] for ex in examples for _ in range(G)]
    # And with the real accuracy reward: right answers placed in each prompt's own rows score 1.
    answers = ["<answer>A</answer>", "<answer>A</answer>", "<answer>B</answer>", "<answer>A</answer>",
               "<answer>C</answer>", "<answer>C</answer>"]
    per_func, _ = rewards.score([rewards.accuracy_reward], ["accuracy"], answers, examples, G, faults)
    assert per_func.shape == (6, 1) and per_func[:, 0].tolist() == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
