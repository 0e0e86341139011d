"""Rewards: expected values are worked out by hand from the spec, never copied from the code's output."""

import math
import sys
import time

import pytest

from grpo import rewards
from grpo.rewards import (REWARD_FUNCS, RewardFaults, accuracy_reward, format_reward, get_reward_funcs,
                          score_completions, unverifiable_reason, verify)
from tests import faulty_rewards

ANGLES = "Find the angle x. Choices: A: 30° B: 40° C: 50° D: 60°"
NUMBERS = "How many apples are there? (A) 12 (B) 15 (C) 18 (D) 21"
SHAPES = "Which shape is shown?\nA. circle\nB. square\nC. triangle\nD. hexagon"
PARENS = "What is the length of AB?\nA) 12\nB) 15\nC) 18"

MATH = [
    # numbers, fractions, decimals
    ("6", "6", True), ("6.0", "6", True), ("7", "6", False),
    ("4.5", "9/2", True), ("\\frac{9}{2}", "4.5", True), ("\\dfrac{9}{2}", "9/2", True), ("\\tfrac{9}{2}", "4.5", True),
    ("4.6", "9/2", False), ("\\frac{9}{4}", "9/2", False), ("0.5", "\\frac12", True),
    ("4.5000000001", "4.5", True), ("4.51", "4.5", False),
    # roots and pi
    ("2\\sqrt{3}", "\\sqrt{12}", True), ("sqrt(12)", "2\\sqrt{3}", True), ("\\sqrt{12}", "3\\sqrt{2}", False),
    ("\\sqrt[3]{8}", "2", True), ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}", True),
    ("16\\pi", "16*pi", True), ("16π", "16\\pi", True), ("16\\pi", "16", False), ("16 pi", "16", False),
    # expressions and assignments
    ("2^{10}", "1024", True), ("3^2 + 4^2", "25", True), ("\\left(\\frac{1}{2}\\right)^2", "0.25", True),
    ("2x + 2", "2(x+1)", True), ("2x + 3", "2(x+1)", False), ("x", "y", False),
    ("x = 4.5", "9/2", True), ("x = 4.6", "9/2", False), ("AB = 5", "5", True),
    # separators, signs, degrees, percent
    ("1,000", "1000", True), ("1,000,000", "10^6", True), ("1,001", "1000", False),
    ("1000001", "1000000", False), ("123456789", "123456789", True), ("1000000", "10^6", True),
    ("−3", "-3", True), ("−3", "3", False),
    ("40°", "40^\\circ", True), ("40^{\\circ}", "40", True), ("40", "40°", True), ("45°", "40°", False),
    ("50%", "50\\%", True), ("50\\%", "50", True), ("60%", "50", False),
    # units and words after the number, number words
    ("6 apples", "6", True), ("16\\pi cm^2", "16\\pi", True), ("16\\pi \\text{ cm}^2", "16\\pi", True),
    ("5 cm", "5", True), ("5cm", "5", True), ("40 degrees", "40", True), ("7 apples", "6", False),
    ("six", "6", True), ("Six.", "6", True), ("thirty", "30", True), ("seven", "6", False),
    ("$\\frac{9}{2}$", "4.5", True), ("\\$5", "5", True),
    # text answers
    ("square", "Square.", True), ("Square", "square", True), ("a  square", "Square", True),
    ("circle", "square", False),
]

CHOICE = [
    # letters in their usual shapes
    ("B", "B", None, True), ("(B)", "B", None, True), ("B.", "B", None, True), ("B)", "B", None, True),
    ("B: 40°", "B", ANGLES, True), ("Option B", "B", None, True), ("option (B)", "B", None, True),
    ("The answer is B", "B", None, True), ("The answer is (B).", "B", None, True),
    ("\\boxed{B}", "B", None, True), ("\\text{B}", "B", None, True), ("B", "(B)", None, True),
    ("B", "C", None, False), ("(B)", "C", ANGLES, False), ("Option A", "B", None, False),
    ("The answer is (C).", "B", None, False), ("E", "B", ANGLES, False),
    # option text counts as its letter, both ways
    ("40°", "B", ANGLES, True), ("40", "B", ANGLES, True), ("40^\\circ", "B", ANGLES, True),
    ("50°", "B", ANGLES, False), ("45", "B", ANGLES, False),
    ("B", "40°", ANGLES, True), ("C", "40°", ANGLES, False), ("40", "40°", ANGLES, True),
    ("15", "B", NUMBERS, True), ("fifteen", "B", NUMBERS, True), ("12", "B", NUMBERS, False),
    ("square", "B", SHAPES, True), ("Square.", "B", SHAPES, True), ("circle", "B", SHAPES, False),
    ("15", "B", PARENS, True), ("B", "15", PARENS, True), ("A", "15", PARENS, False),
    # several options named: wrong
    ("A or B", "A", None, False), ("ABCD", "A", None, False), ("A, B", "A", None, False),
    ("A and C", "A", None, False), ("(A) or (B)", "A", ANGLES, False), ("A, B, C, D", "B", ANGLES, False),
    # the article "A" and a lowercase "a" are not option A
    ("A square", "B", SHAPES, True), ("A square", "A", SHAPES, False), ("a", "A", None, False),
    # gold text not among the options: the chosen option's text is judged
    ("B", "40", "Choices: A: 30 B: 40", True), ("A", "40", "Choices: A: 30 B: 40", False),
]

EXTRACTION = [
    # only the final answer is judged: the last <answer> block, else the last \boxed{}
    ("<think>2+4=6</think><answer>6</answer>", "6", True),
    ("<think>\nlet me see\n</think>\n<answer>\n6\n</answer>", "6", True),
    ("<think>The answer is 6, surely.</think><answer>7</answer>", "6", False),  # right in reasoning, wrong at the end
    ("<think>7</think><answer>6</answer>", "6", True),
    ("<answer>7</answer> no wait <answer>6</answer>", "6", True),
    ("<answer>6</answer> no wait <answer>7</answer>", "6", False),
    ("<answer></answer>", "6", False), ("<answer>   </answer>", "6", False), ("", "6", False), ("6", "", False),
    ("<think>so it is 6</think>", "6", False),
    ("<answer>\\boxed{6}</answer>", "6", True), ("so the total is \\boxed{6}.", "6", True),
    ("\\boxed{5} then \\boxed{6}", "6", True), ("\\boxed{6} then \\boxed{5}", "6", False),
    ("\\boxed{\\frac{9}{2}}", "4.5", True), ("\\boxed{\\boxed{6}}", "6", True),
    # gold with tags
    ("6", "<think>2+4</think><answer>6</answer>", True), ("6", "We count. <answer> 6 </answer>", True),
    ("<answer>B</answer>", "<think>It is blue.</think><answer>B</answer>", True),
    ("<answer>C</answer>", "<think>It is blue.</think><answer>B</answer>", False),
]

ADVERSARIAL = [
    "9^9^9^9^9", "10**10**10**10", "2^{2^{2^{2^{100}}}}", "(" * 500, "\\frac{1}{", "\\sqrt{}",
    "\\boxed{\\boxed{", "1" * 100_000, "x" * 100_000, "<answer>" * 20_000, "{" * 500 + "}" * 500,
    "\\frac{" * 300, "(9^999)^999", "9" * 400, "2^" * 150 + "2", "(A) " * 20_000,
]


@pytest.mark.parametrize("prediction, gold, expected", MATH)
def test_verify_math(prediction, gold, expected):
    assert verify(prediction, gold) is expected


@pytest.mark.parametrize("prediction, gold, question, expected", CHOICE)
def test_verify_multiple_choice(prediction, gold, question, expected):
    assert verify(prediction, gold, question) is expected


@pytest.mark.parametrize("prediction, gold, expected", EXTRACTION)
def test_verify_judges_only_the_final_answer(prediction, gold, expected):
    assert verify(prediction, gold) is expected


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_verify_is_bounded_and_never_raises(text):
    for prediction, gold, question in [(text, "6", None), (f"<answer>{text}</answer>", "6", None),
                                       (f"\\boxed{{{text}}}", "6", None), ("6", text, None), (text, "B", text)]:
        start = time.perf_counter()
        assert verify(prediction, gold, question) is False
        assert time.perf_counter() - start < 2.0


def test_verify_non_string_input_is_false():
    assert verify(None, "6") is False and verify("6", None) is False


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

# ---------------------------------------------------------------- gold answers


@pytest.mark.parametrize("solution, problem, reason", [
    ("<answer>B</answer>", None, None),
    ("<answer>4.5</answer>", None, None),
    ("<think>..</think><answer>\\frac{9}{2}</answer>", None, None),
    ("<think>It is blue.</think><answer>B</answer>", "Colour? A: red B: blue", None),
    ("<answer></answer>", None, "no answer in the solution"),
    ("<answer>  </answer>", None, "no answer in the solution"),
    ("<answer> $ $ </answer>", None, "no answer in the solution"),
    ("6", None, None),  # no tags: the text itself is the answer
    ("", None, "no answer in the solution"),
])
def test_unverifiable_reason(solution, problem, reason):
    assert unverifiable_reason(solution, problem) == reason


def test_unverifiable_when_the_gold_does_not_match_itself(monkeypatch):
    monkeypatch.setattr(rewards, "verify", lambda prediction, gold, question=None: False)
    assert unverifiable_reason("<answer>B</answer>") == "the answer does not verify against itself"
