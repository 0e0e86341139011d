"""grpo/answers.py: what the final answer is and whether it is the gold's, and math-verify's time bound (a
worker is killed when a verify call's VERIFY_SECONDS are spent; the bound must hold on the main thread, in a
thread and in worker processes, forked (a multiprocessing.Pool's are daemonic, and may not start children
through multiprocessing) or spawned, and no worker may outlive its process). Expected verdicts are worked out
by hand, never copied from the code's output."""

import collections
import multiprocessing
import os
import subprocess
import sys
import threading
import time

import pytest

from grpo import answers
from grpo.answers import extract_answer, final_answer, unverifiable_reason, verify

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


# Answers of common math shapes, (shape, prediction, gold, expected), each expectation worked out by hand.
# test_math_verify_comparison runs the same table through the math-verify library.
ANSWER_SHAPES = [
    # tuples and points: order matters, values compared element-wise
    ("tuple", "(1, 9/2)", "(1,4.5)", True),
    ("tuple", "(1,2)", "(2,1)", False),
    ("tuple", "(1, 2, 3)", "(1,2,3)", True),
    ("tuple", "(1, 2)", "(1, 2, 3)", False),
    ("tuple", "\\left(\\frac{1}{2}, -3\\right)", "(0.5, -3)", True),
    ("tuple", "(2\\sqrt{3}, 1)", "(\\sqrt{12}, 1)", True),
    ("tuple", "(3, 4)", "(3, 5)", False),
    ("tuple", "(x, y) = (1, 2)", "(1,2)", True),
    ("tuple", "(1,22)", "(1, 22)", True),       # inside brackets a comma separates items
    ("tuple", "(1,22)", "1.22", False),
    ("tuple", "(1,000)", "1000", False),
    # intervals and unions: brackets matter; a union is a set of intervals
    ("interval", "[1, 3)", "[1,3)", True),
    ("interval", "(-\\infty, 2] \\cup (3, \\infty)", "(-oo,2] U (3,oo)", True),
    ("interval", "[1,3)", "(1,3)", False),
    ("interval", "[1,3]", "[1,3)", False),
    ("interval", "(1, 3)", "(1,3)", True),      # point or open interval: the same text either way
    ("interval", "\\left[ \\frac12, 2 \\right]", "[0.5, 2]", True),
    ("interval", "(2, \\infty)", "(2,oo)", True),
    ("interval", "(0, \\infty)", "(0, +\\infty)", True),
    ("interval", "(-\\infty, 2]", "(-\\infty, 2)", False),
    ("interval", "(3, \\infty) \\cup (-\\infty, 2]", "(-\\infty, 2] \\cup (3, \\infty)", True),
    ("interval", "[1,3) \\cup [4,5]", "[4,5] U [1,3)", True),
    ("interval", "(-\\infty, 2] \\cup [3, \\infty)", "(-oo,2] U (3,oo)", False),
    ("interval", "(-\\infty, 2]", "(-\\infty, 2] \\cup (3, \\infty)", False),
    ("interval", "(-\\infty, \\infty)", "(-oo, oo)", True),
    ("interval", "(2, \\infty)", "(-\\infty, 2)", False),
    ("interval", "x \\in [1, 3)", "[1,3)", True),
    # sets: order and repeats do not matter; a bare list of values is a set
    ("set", "\\{1, 2, 3\\}", "{3,2,1}", True),
    ("set", "\\{1,2\\}", "\\{1,2,3\\}", False),
    ("set", "\\{\\frac12, 2\\}", "\\{2, 0.5\\}", True),
    ("set", "\\{1, 2, 4\\}", "\\{1, 2, 3\\}", False),
    ("set", "\\{-1, 1\\}", "\\{1, -1\\}", True),
    ("set", "\\{1,1,2\\}", "\\{1,2\\}", True),
    ("set", "\\emptyset", "\\{\\}", True),
    ("set", "\\{5\\}", "5", False),
    ("set", "\\{1, 2\\}", "(1, 2)", False),
    ("set", "1, 2, 3", "3, 2, 1", True),
    ("set", "\\{1, 2\\}", "2, 1", True),
    ("set", "1, 2", "1, 3", False),
    ("set", "x = 1, y = 2", "y = 2, x = 1", True),
    ("set", "x = 1, y = 2", "x = 2, y = 1", False),
    # vectors and matrices: shape matters, values compared element-wise
    ("matrix", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{bmatrix}1\\\\2\\end{bmatrix}", True),
    ("matrix", "\\begin{pmatrix} \\frac12 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 0.5 \\\\ 2 \\end{pmatrix}", True),
    ("matrix", "\\begin{pmatrix} 1 & 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", False),
    ("matrix", "\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", False),
    ("matrix", "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}", True),
    ("matrix", "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix} 1 & 3 \\\\ 2 & 4 \\end{pmatrix}",
     False),
    ("matrix", "\\begin{pmatrix} 1 \\\\ 2 \\\\ 3 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", False),
    ("matrix", "\\begin{pmatrix} \\sqrt{12} \\\\ -1 \\end{pmatrix}", "\\begin{pmatrix} 2\\sqrt3 \\\\ -1 \\end{pmatrix}",
     True),
    ("matrix", "\\left(\\begin{array}{c} 1 \\\\ 2 \\end{array}\\right)", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    # decimal commas and thousands separators, in a bare number
    ("comma", "1,22", "1.22", True),
    ("comma", "1,5", "1.5", True),
    ("comma", "1,5", "15", False),
    ("comma", "1,22", "122", False),
    ("comma", "0,125", "0.125", True),
    ("comma", "-2,5", "-2.5", True),
    ("comma", "12,5", "125", False),
    ("comma", "1{,}5", "1.5", True),
    ("comma", "1,5 cm", "1.5", True),
    ("comma", "1 000", "1000", True),
    ("comma", "1 000", "0", False),
    ("comma", "1\\,000", "1000", True),
    ("comma", "1,000", "1000", True),
    ("comma", "12,345", "12345", True),
    ("comma", "1,000,000", "1000000", True),
    ("comma", "1 000 000", "10^6", True),
    ("comma", "1\\,000\\,000", "10^6", True),
    ("comma", "1,000.5", "1000.5", True),
    # LaTeX variants
    ("latex", "\\cfrac{1}{2}", "0.5", True),
    ("latex", "\\tfrac{1}{2}", "1/2", True),
    ("latex", "\\dfrac{1}{2}", "\\frac{1}{2}", True),
    ("latex", "\\frac3{3}", "1", True),
    ("latex", "\\frac12", "0.5", True),
    ("latex", "\\frac{3}4", "0.75", True),
    ("latex", "\\frac x2", "\\frac{x}{2}", True),
    ("latex", "\\frac1x", "1/x", True),
    ("latex", "\\frac{1}{3}", "\\frac12", False),
    ("latex", "\\frac\\pi2", "\\frac{\\pi}{2}", True),
    ("latex", "\\dfrac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt2}", True),
    ("latex", "\\textnormal{5}", "5", True),
    ("latex", "\\text{5}", "5", True),
    ("latex", "\\mathrm{7}", "7", True),
    ("latex", "5\\textnormal{ cm}", "5", True),
    ("latex", "\\left(\\frac{3}{4}\\right)", "0.75", True),
    ("latex", "30^\\circ", "30", True),
    ("latex", "30^{\\circ}", "31", False),
    ("latex", "25\\%", "25", True),
    ("latex", "\\textnormal{blue}", "Blue", True),
    ("latex", "\\mathrm{blue}", "red", False),
    # identities, checked numerically at sample points
    ("identity", "\\sec^2 y", "\\tan^2 y + 1", True),
    ("identity", "\\sin^2 x + \\cos^2 x", "1", True),
    ("identity", "2\\sin x\\cos x", "\\sin 2x", True),
    ("identity", "\\sin 2x", "\\cos 2x", False),
    ("identity", "\\sin 2x", "2\\sin x", False),
    ("identity", "\\sin^2 x", "\\cos^2 x", False),
    ("identity", "\\sin(x+1)", "\\sin x + 1", False),
    ("identity", "\\tan x", "\\frac{\\sin x}{\\cos x}", True),
    ("identity", "\\cos(2x)", "\\cos^2 x - \\sin^2 x", True),
    ("identity", "\\csc x", "\\frac{1}{\\sin x}", True),
    ("identity", "\\cos x", "\\sin x", False),
    ("identity", "e^{2\\ln x}", "x^2", True),
    ("identity", "\\ln e", "1", True),
    ("identity", "\\log_2 8", "3", True),
    ("identity", "\\log_{2}(8)", "4", False),
    ("identity", "e^{\\ln 3}", "3", True),
    ("identity", "\\exp(x)\\exp(y)", "\\exp(x+y)", True),
    ("identity", "\\arctan(1)", "\\frac{\\pi}{4}", True),
    ("identity", "\\tan^{-1}(1)", "\\pi/4", True),
    ("identity", "\\sin^{-1}(1)", "\\frac{\\pi}{2}", True),
    ("identity", "\\arcsin x", "\\arccos x", False),
    ("identity", "\\sqrt{x}\\sqrt{x}", "x", True),
    ("identity", "sin(x)^2 + cos(x)^2", "1", True),
    ("identity", "\\sin\\left(\\frac{\\pi}{6}\\right)", "\\frac{1}{2}", True),
    # a final answer stated in free text, no tags or box
    ("free text", "Adding the cases, so the probability is 2/3.", "<answer>2/3</answer>", True),
    ("free text", "We add the two counts, so the answer is 6.", "6", True),
    ("free text", "Counting, the total is 6. Wait, I missed one; the total is 7.", "6", False),
    ("free text", "At first I got 2/3, but rechecking, the probability is 1/3.", "2/3", False),
    ("free text", "Therefore, $x = \\frac{9}{2}$.", "4.5", True),
    ("free text", "Answer: 12", "12", True),
    ("free text", "The final answer is $x=3$", "3", True),
    ("free text", "Comparing the options, the answer is A or B.", "A", False),
    ("free text", "Comparing the options, the answer is (A) and (C).", "A", False),
    ("free text", "Looking at the figure, it is (B).", "B", True),
    ("free text", "The shape in the picture is a square.", "square", True),
    ("free text", "So the area equals 16\\pi cm^2.", "16\\pi", True),
    ("free text", "<think>The answer is 6.</think> So it is 7.", "6", False),
    ("free text", "The answer is 6. Let me double-check: 2 + 4 = 6.", "6", True),
    ("free text", "Hope this helps!", "6", False),
    ("free text", "So x = 6 or x = 7.", "7", False),  # two values named: no answer
    ("free text", "<answer>x = 6 or x = 7</answer>", "7", False),
]


@pytest.mark.parametrize("shape, prediction, gold, expected", ANSWER_SHAPES)
def test_verify_shapes(shape, prediction, gold, expected):
    assert verify(prediction, gold) is expected
    if shape != "free text":  # equality is symmetric; a free-text gold would be read differently
        assert verify(gold, prediction) is expected


def _math_verify_verdict(math_verify, prediction: str, gold: str):
    """math-verify's verdict as it is meant to be called, verify(parse(gold), parse(prediction)); LaTeX
    wrapped in $..$, which it needs to find it (its parse of a raw text judged fewer cases right)."""
    def parse(text):
        return math_verify.parse(f"${text}$") or math_verify.parse(text)
    try:
        return math_verify.verify(parse(gold), parse(prediction))
    except Exception as e:  # it may raise; a raise is a wrong verdict
        return f"raised {type(e).__name__}"


def test_math_verify_comparison():
    """Why verify is not math-verify alone, on the shared table: verify (our extraction and rules, math-verify
    for the rest) must be right on every case; math-verify 0.9.0 (latex2sympy2_extended 1.11.0) alone, called
    as above, judged 104 of the 130 right on 2026-11-25 and again on 2026-12-06 (tuple 11/11, interval 12/16,
    set 12/14, matrix 9/9, comma 8/18, latex 20/21, identity 22/24, free text 10/17); 87 given the raw texts."""
    import math_verify

    ours = {shape: 0 for shape, *_ in ANSWER_SHAPES}
    for shape, prediction, gold, expected in ANSWER_SHAPES:
        ours[shape] += verify(prediction, gold) is expected
    assert ours == dict(collections.Counter(shape for shape, *_ in ANSWER_SHAPES))  # all right, per shape
    theirs = collections.Counter(shape for shape, prediction, gold, expected in ANSWER_SHAPES
                                 if _math_verify_verdict(math_verify, prediction, gold) is expected)
    print("math-verify right:", dict(theirs), sum(theirs.values()), "of", len(ANSWER_SHAPES))
    assert sum(theirs.values()) < len(ANSWER_SHAPES)


FINAL_ANSWERS = [  # text -> (answer, how it was found)
    ("<think>2+4=6</think><answer>6</answer>", ("6", "answer tag")),
    ("<answer>\\boxed{7}</answer>", ("7", "answer tag")),
    ("<answer>6</answer> so \\boxed{7}", ("6", "answer tag")),
    ("so the total is \\boxed{6}.", ("6", "boxed")),
    ("The answer is (B).", ("(B)", "answer is")),
    ("Answer: 12", ("12", "answer is")),
    ("**Answer:** 12", ("12", "answer is")),
    ("the final answer is $x=3$", ("x=3", "answer is")),
    ("The answer is 6, since 2 + 4 = 6.", ("6", "answer is")),
    ("The answer is 6. Let me double-check: 2 + 4 = 6.", ("6", "answer is")),
    ("The answer is A or B.", ("A or B", "answer is")),  # found, and judged wrong by verify
    ("The answer is (A) and (C).", ("(A) and (C)", "answer is")),
    ("The correct option is C", ("C", "answer is")),
    ("Adding the cases, so the probability is 2/3.", ("2/3", "last sentence")),
    ("Counting, the total is 6. Wait, I missed one; the total is 7.", ("7", "last sentence")),
    ("Therefore, $x = \\frac{9}{2}$.", ("\\frac{9}{2}", "last sentence")),
    ("The result is 6 which is even.", ("6", "last sentence")),
    ("It is (B) because the angle is 40°.", ("(B)", "last sentence")),
    ("The number is not 10, which is 1,000.99€.", ("1,000.99€", "last sentence")),  # before "which": nothing
    ("No, it's not 10, it's 12.", ("12", "last sentence")),
    ("The shape is a square.", ("a square", "last sentence")),
    ("There are 6 apples.", ("6 apples", "last sentence")),
    ("We count again.\n7", ("7", "last sentence")),
    ("We find that $x \\lt 3$.", ("x \\lt 3", "last sentence")),  # no cue: the sentence's last $...$
    ("To find the answer: we count the apples. There are 6.", ("6", "last sentence")),
    ("<think>The answer is 6.</think> So it is 7.", ("7", "last sentence")),
    ("6 apples", ("6 apples", "whole text")),
    ("x = 1, y = 2", ("x = 1, y = 2", "whole text")),
    ("(1, 9/2)", ("(1, 9/2)", "whole text")),
    ("A square", ("A square", "whole text")),
    ("Hope this helps!", ("Hope this helps!", "whole text")),
    ("", ("", "none")),
    ("<answer></answer>", ("", "none")),
    ("<answer> $ $ </answer>", ("", "none")),
    ("<think>so it is 6</think>", ("", "none")),
    ("<think>a</think><answer>6", ("", "none")),  # cut off before </answer>
    ("We count. " * 100, ("", "none")),  # long, and no answer stated
]


@pytest.mark.parametrize("text, found", FINAL_ANSWERS)
def test_final_answer(text, found):
    assert final_answer(text) == found


@pytest.mark.parametrize("text", [text for text, _ in FINAL_ANSWERS]
                         + [prediction for shape, prediction, _, _ in ANSWER_SHAPES if shape == "free text"])
def test_verify_judges_final_answer_text_as_the_completion(text):
    """eval.py reports final_answer's text and judges it with verify: the same verdict as the completion's."""
    answer, _ = final_answer(text)
    for gold in ("6", "7", "2/3", "B", "(B)", "square", "4.5", "12", "3", "A or B", "(1,4.5)"):
        assert verify(answer, gold) is verify(text, gold), gold


def test_extract_answer_is_unchanged_for_training():
    """Training reads tags, then the box, then the whole text; only verify reads untagged text further."""
    assert extract_answer("<think>a</think><answer> 6 </answer>") == "6"
    assert extract_answer("so the total is \\boxed{6}.") == "6"
    assert extract_answer(" so the probability is 2/3. ") == "so the probability is 2/3."
    assert verify("<answer>so the probability is 2/3.</answer>", "2/3") is False  # a tagged answer is taken as is
    assert verify("so the probability is 2/3.", "2/3") is True


@pytest.mark.parametrize("prediction, gold, question, expected", [
    ("Comparing the angles, it is 40°.", "B", ANGLES, True),
    ("Comparing the angles, it is 50°.", "B", ANGLES, False),
    ("Comparing the angles, the answer is (A) or (B).", "B", ANGLES, False),
    ("Counting them, there are 15.", "B", NUMBERS, True),
    ("The shape shown is a square.", "B", SHAPES, True),
    ("Option (B) is correct.", "B", ANGLES, True),
])
def test_free_text_multiple_choice(prediction, gold, question, expected):
    assert verify(prediction, gold, question) is expected


HOSTILE = [
    "9**9**9**9", "9^{9^{9^{9}}}", "e^{e^{e^{e^{e^{10}}}}}", "\\exp(\\exp(\\exp(100)))", "\\sin(10^{400})",
    "x" * 10_000, "1,000," * 2_000, "is " * 5_000 + "7", "The answer is " * 1_000, "(" * 1_000 + "1" + ")" * 1_000,
    "\\{" * 300 + "\\}" * 300, "(1," * 1_000, "\\sin(" * 60 + "x" + ")" * 60, "\\sin^" * 80, "\\log_{" * 50,
    "\\begin{pmatrix}" * 100, "(1,2) \\cup " * 60 + "(1,2)", "\\{" + "1," * 140 + "1\\}", "{" * 200 + "1,2" + "}" * 200,
    "\\frac{1}{0}", "\\log_0 0", "0^{-1}",
]


@pytest.mark.parametrize("text", HOSTILE, ids=[f"hostile{i}" for i in range(len(HOSTILE))])
def test_verify_hostile_inputs(text):
    """Structural bounds (lengths, items, nesting, float evaluation) keep these fast; each returns a verdict."""
    assert verify(text, "6") is False and verify("6", text) is False
    assert verify(text, "(1,2)") is False and verify(text, "\\sin x") is False and verify(text, "B", text) is False
    assert verify(text, text) in (True, False)  # True for the short ones; a long text may state no answer
    answer, how = final_answer(text)
    assert isinstance(answer, str) and how in ("answer is", "last sentence", "whole text", "none")


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
        assert verify(prediction, gold, question) is False  # bounded by structure, and math-verify by a clock


def test_verify_non_string_input_is_false():
    assert verify(None, "6") is False and verify("6", None) is False

# ---------------------------------------------------------------- notations, with the gold's deciding

ANGLE_Q = "Find x. Round your answer to two decimal places."
# (category, prediction, gold, question, expected): each verdict worked out by hand. Not all symmetric: the
# gold's notation decides (an inequality matches a closed or half-infinite interval gold, not a pair (1, 2)).
NOTATIONS = [
    ("list", "(0;-2;6)", "(0, -2, 6)", None, True),
    ("list", "(0;-2;6)", "(0, 6, -2)", None, False),
    ("list", "(1,5; 2)", "(1.5, 2)", None, True),  # semicolons part the items, so 1,5 is a decimal comma
    ("list", "-12;-11;-10", "\\{-12, -11, -10\\}", None, True),
    ("list", "12 \\text{ and } 13", "13, 12", None, True),
    ("list", "12 and 14", "13, 12", None, False),
    ("list", "-10,-8,4", "4, -8, -10", None, True),  # several commas: a list, not -10 and 8.4
    ("list", "6,8", "6 \\text{ and } 8", None, True),  # against a list, 6,8 is a list
    ("list", "6,8", "6.8", None, True),  # against a number, a decimal comma
    ("list", "6,8", "(6, 8)", None, False),  # a bare list is not a tuple
    ("list", "\\{1, 2\\}", "(1, 2)", None, False),
    ("list", "(1, 2)", "\\{1, 2\\}", None, False),
    ("list", "\\left\\{1, 2\\right\\}", "(1, 2)", None, False),  # \\left and \\right change no bracket
    ("list", "\\left(1, 2\\right)", "\\{1, 2\\}", None, False),
    ("list", "\\boxed{1}, \\boxed{2}", "\\{1, 2\\}", None, True),  # boxes listed together are one answer
    ("list", "\\boxed{-2} \\quad \\text{and} \\quad \\boxed{1}", "1, -2", None, True),
    ("list", "\\boxed{1} then \\boxed{2}", "\\{1, 2\\}", None, False),  # not listed: the last box, 2
    ("relation", "x \\geq 5", "x >= 5", None, True),
    ("relation", "5 \\geq x", "x \\leq 5", None, True),
    ("relation", "-x > -1", "x < 1", None, True),
    ("relation", "x \\neq 3", "x != 3", None, True),
    ("relation", "x \\geq 5", "x \\leq 5", None, False),
    ("relation", "x > 5", "x < 5", None, False),
    ("interval", "x \\geq 2", "[2, \\infty)", None, True),
    ("interval", "[2, \\infty)", "x \\geq 2", None, True),
    ("interval", "-2 \\le x \\le 7", "[-2, 7]", None, True),
    ("interval", "(1, 2)", "1 < x < 2", None, True),
    ("interval", "x > 2", "[2, \\infty)", None, False),
    ("interval", "1 < x < 2", "(1, 2)", None, False),  # (1, 2) may be a point: the gold's notation decides
    ("units", "\\$16386.17", "16386.17", None, True),
    ("units", "1,000.99€", "1000.99", None, True),
    ("units", "1,000.99m²", "1000.99", None, True),
    ("units", "5km", "5", None, True),
    ("units", "15 cm^2", "15", None, True),
    ("units", "12€", "13", None, False),
    ("escaped", "\\\\frac{1}{2}", "0.5", None, True),  # \\frac: a JSON-escaped text
    ("escaped", "\\\\sqrt{4}", "2", None, True),
    ("escaped", "\\\\frac{1}{3}", "0.5", None, False),
    ("equation", "y=-\\frac{1}{2}x+\\frac{3}{4}", "2x+4y-3=0", None, True),  # the same line
    ("equation", "x^2/16 + y^2/12 = 1/4", "x^2/4 + y^2/3 = 1", None, True),  # the same ellipse
    ("equation", "y = 2x - 1", "y = 2x + 1", None, False),
    ("equation", "0", "a + 3z = 0", None, False),  # a right-hand side is not the equation
    ("equation", "1", "2x + z = 1", None, False),
    ("equation", "11a+c", "7 = 11a+c", None, False),
    ("equation", "0", "a^2 + b = 0", None, False),
    ("equation", "1", "k = 1", None, True),  # an assignment names its value
    ("equation", "k = 1", "1", None, True),
    ("equation", "0", "a + b = 0", None, False),  # a + b is a sum of names, still an equation, not a name
    ("equation", "5", "x - y = 5", None, False),
    ("equation", "1", "f(x) = 1", None, True),  # f(x) names the value, as k does
    ("matrix", "\\begin{pmatrix}1 & 2 \\\\ 3 & 4\\end{pmatrix}\\begin{pmatrix}1 & 0 \\\\ 0 & 1\\end{pmatrix}",
     "\\begin{pmatrix}1 & 2 \\\\ 3 & 4\\end{pmatrix}", None, True),  # times the identity
    ("matrix", "\\begin{pmatrix}1 & 2 \\\\ 3 & 4\\end{pmatrix}\\begin{pmatrix}0 & 1 \\\\ 1 & 0\\end{pmatrix}",
     "\\begin{pmatrix}1 & 2 \\\\ 3 & 4\\end{pmatrix}", None, False),  # swaps the columns: [[2, 1], [4, 3]]
    ("matrix", "\\begin{pmatrix}1 & 2 \\\\ 3 & 4\\end{pmatrix} + \\begin{pmatrix}5 & 6 \\\\ 7 & 8\\end{pmatrix}",
     "\\begin{pmatrix}6 & 8 \\\\ 10 & 12\\end{pmatrix}", None, True),
    ("chain", "x = \\frac{1}{3} \\approx 0.33", "\\frac13", None, True),
    ("chain", "\\frac{22}{7} \\approx 3.14", "3.14", None, True),
    ("chain", "x = 5+5+1 = 11", "11", None, True),
    ("chain", "x = 5+5+1 = 12", "11", None, False),
    ("chain", "x = 2 \\approx 3", "4", None, False),
    ("thousands", "11,\\!111", "11111", None, True),
    ("thousands", "11{,}111", "11111", None, True),
    ("thousands", "11,\\!111", "11112", None, False),
    ("precision", "3.14159", "3.14", ANGLE_Q, True),  # 3.14159 to two places is 3.14
    ("precision", "3.15", "3.14", ANGLE_Q, False),
    ("precision", "3.14159", "3.14", None, False),  # no precision stated: 3.14159 is not 3.14
    ("precision", "12.4", "12", "Give the answer to the nearest whole number.", True),
    ("precision", "0.33", "\\frac{1}{3}", "Answer to the nearest hundredth.", True),
    ("identity", "|x|", "x", None, False),  # equal for x > 0 only: the sample points have both signs
    ("identity", "\\sqrt{x^2}", "x", None, False),
    ("identity", "(x+1)^2", "x^2 + 2x + 1", None, True),
    ("words", "lube", "blue", None, False),  # as symbols, l*u*b*e == b*l*u*e: words are compared as text
    ("words", "der", "red", None, False),
    ("words", "xy", "yx", None, False),
]


@pytest.mark.parametrize("category, prediction, gold, question, expected", NOTATIONS)
def test_verify_notations(category, prediction, gold, question, expected):
    assert verify(prediction, gold, question) is expected


def test_a_gold_is_read_once_and_judges_as_verify(monkeypatch):
    """judge(prediction, read_gold(...)) is verify; read_gold does the gold's part once for a group."""
    gold = answers.read_gold("<answer>40°</answer>", ANGLES)
    assert (gold.answer, gold.letter, gold.precision) == ("40°", "B", None)  # the gold is option B's text
    assert [answers.judge(p, gold) for p in ("B", "(C)", "40", "50°")] == [True, False, True, False]
    assert answers.read_gold("<answer>3.14</answer>", ANGLE_Q).precision == 2
    assert answers.read_gold(None).answer == "" and answers.judge("6", answers.read_gold(None)) is False


def test_value_kind():
    assert [answers.value_kind(a) for a in ("12", "-3", "4.5", "1,000", "40°", "6 apples")] == ["number"] * 6
    assert [answers.value_kind(a) for a in ("9/2", "\\frac{1}{2}", "2x", "\\pi")] == ["expression"] * 4
    assert [answers.value_kind(a) for a in ("a circle", "(1, 2)", "x > 2", "")] == [None] * 4

# ---------------------------------------------------------------- what vision-language models write

# (form, completion, gold, question, expected), each verdict decided by hand: forms Qwen2-VL and its kind write, each
# right answer beside a wrong one of the same shape. docs/GUIDE.md gives verify's accuracy on them.
YES_NO = "Are the two triangles similar?\nA. Yes\nB. No"
VLM_FORMS = [
    # Unicode mathematics
    ("unicode", "<answer>3√2</answer>", "3\\sqrt{2}", None, True),
    ("unicode", "<answer>3√2</answer>", "2\\sqrt{3}", None, False),
    ("unicode", "<answer>√5/5</answer>", "\\frac{\\sqrt{5}}{5}", None, True),
    ("unicode", "<answer>√5/2</answer>", "\\frac{\\sqrt{5}}{5}", None, False),
    ("unicode", "<answer>2√(3)</answer>", "2\\sqrt{3}", None, True),
    ("unicode", "<answer>2√(3) + 1</answer>", "2\\sqrt{3}", None, False),
    ("unicode", "<answer>√(x+1)</answer>", "\\sqrt{x+1}", None, True),
    ("unicode", "<answer>√x+1</answer>", "\\sqrt{x+1}", None, False),  # the root of x, plus 1
    ("unicode", "<answer>∛27</answer>", "3", None, True),
    ("unicode", "<answer>∛9</answer>", "3", None, False),
    ("unicode", "<answer>x² + 2x + 1</answer>", "(x+1)^2", None, True),
    ("unicode", "<answer>x² + 2x - 1</answer>", "(x+1)^2", None, False),
    ("unicode", "<answer>10⁻³</answer>", "0.001", None, True),
    ("unicode", "<answer>10³</answer>", "0.001", None, False),
    ("unicode", "<answer>2·3</answer>", "6", None, True),
    ("unicode", "<answer>2·4</answer>", "6", None, False),
    ("unicode", "<answer>4 × 5</answer>", "20", None, True),
    ("unicode", "<answer>4 × 6</answer>", "20", None, False),
    ("unicode", "<answer>12 ÷ 4</answer>", "3", None, True),
    ("unicode", "<answer>12 ÷ 3</answer>", "3", None, False),
    ("unicode", "<answer>(−2, 5)</answer>", "(-2, 5)", None, True),
    ("unicode", "<answer>(−2, −5)</answer>", "(-2, 5)", None, False),
    ("unicode", "<answer>x ≤ 3</answer>", "x \\leq 3", None, True),
    ("unicode", "<answer>x ≥ 3</answer>", "x \\leq 3", None, False),
    ("unicode", "<answer>x ≠ 2</answer>", "x \\neq 2", None, True),
    ("unicode", "<answer>x ≠ 3</answer>", "x \\neq 2", None, False),
    ("unicode", "<answer>½</answer>", "\\frac{1}{2}", None, True),
    ("unicode", "<answer>⅓</answer>", "\\frac{1}{2}", None, False),
    ("unicode", "<answer>2¾</answer>", "\\frac{11}{4}", None, True),
    ("unicode", "<answer>2¼</answer>", "\\frac{11}{4}", None, False),
    ("unicode", "<answer>π/3</answer>", "\\frac{\\pi}{3}", None, True),
    ("unicode", "<answer>π/6</answer>", "\\frac{\\pi}{3}", None, False),
    ("unicode", "<answer>30º</answer>", "30^\\circ", None, True),  # an ordinal sign for the degree sign
    ("unicode", "<answer>35º</answer>", "30^\\circ", None, False),
    ("unicode", "<answer>(√3, 1)</answer>", "(\\sqrt{3}, 1)", None, True),
    ("unicode", "<answer>(1, √3)</answer>", "(\\sqrt{3}, 1)", None, False),
    ("unicode", "So the length of AB is 2√3.", "2\\sqrt{3}", None, True),
    ("unicode", "So the length of AB is 3√2.", "2\\sqrt{3}", None, False),
    # a name before the value
    ("label", "<answer>Q(-1, 4)</answer>", "(-1, 4)", None, True),
    ("label", "<answer>Q(1, -4)</answer>", "(-1, 4)", None, False),
    ("label", "<answer>(2, 3)</answer>", "P(2, 3)", None, True),
    ("label", "<answer>Q(2, 3)</answer>", "P(2, 3)", None, False),  # the gold names P
    ("label", "<answer>Point B(0, −2)</answer>", "(0,-2)", None, True),
    ("label", "<answer>Point B(−2, 0)</answer>", "(0,-2)", None, False),
    ("label", "<answer>A'(3, −1)</answer>", "(3,-1)", None, True),
    ("label", "<answer>A'(−1, 3)</answer>", "(3,-1)", None, False),
    ("label", "<answer>∠ABC = 40°</answer>", "40", None, True),
    ("label", "<answer>∠ABC = 50°</answer>", "40", None, False),
    ("label", "<answer>BC = 2√5</answer>", "2\\sqrt{5}", None, True),
    ("label", "<answer>BC = 5√2</answer>", "2\\sqrt{5}", None, False),
    ("label", "<answer>x₁ = 2</answer>", "x_1 = 2", None, True),
    ("label", "<answer>x₂ = 2</answer>", "x_1 = 2", None, False),
    ("label", "<answer>4, 5</answer>", "AB = 4, CD = 5", None, True),
    ("label", "<answer>5, 4</answer>", "AB = 4, CD = 5", None, False),  # in the gold's order
    ("label", "<answer>y = 3, x = 5</answer>", "x = 5, y = 3", None, True),
    ("label", "<answer>x = 3, y = 5</answer>", "x = 5, y = 3", None, False),
    ("label", "<answer>y = 2x + 1</answer>", "2x - y + 1 = 0", None, True),
    ("label", "<answer>y = 2x - 1</answer>", "2x - y + 1 = 0", None, False),
    ("label", "<answer>f(x) = x² − 1</answer>", "x^2 - 1", None, True),
    ("label", "<answer>f(x) = x² + 1</answer>", "x^2 - 1", None, False),
    ("label", "The coordinates of point Q are Q(−1, 4).", "(-1, 4)", None, True),
    ("label", "The coordinates of point Q are Q(4, −1).", "(-1, 4)", None, False),
    # a yes or no with its reason
    ("yes/no", "<answer>Yes, because both pairs of opposite sides are parallel.</answer>", "Yes", None, True),
    ("yes/no", "<answer>No, because the opposite sides are not parallel.</answer>", "Yes", None, False),
    ("yes/no", "Yes, because both pairs of opposite sides are parallel.", "Yes", None, True),
    ("yes/no", "Yes and no.", "Yes", None, False),
    ("yes/no", "<answer>No. The two angles are not equal.</answer>", "No", None, True),
    ("yes/no", "<answer>No. Yes, it is.</answer>", "No", None, False),
    ("yes/no", "<answer>True, since 3² + 4² = 5².</answer>", "True", None, True),
    ("yes/no", "<answer>True. Actually, false.</answer>", "True", None, False),
    ("yes/no", "**Yes**, the triangles are congruent by SAS.", "yes", None, True),
    ("yes/no", "**No**, the triangles are not congruent.", "yes", None, False),
    ("yes/no", "The two lines never meet, so yes.", "Yes", None, True),
    ("yes/no", "The two lines meet at C, so no.", "Yes", None, False),
    ("yes/no", "<answer>Yes, there is no gap between the bars.</answer>", "Yes", None, True),
    ("yes/no", "<answer>Yes, no wait, no.</answer>", "Yes", None, False),
    ("yes/no", "Yes, they are similar by AA.", "A", YES_NO, True),
    ("yes/no", "No, they are not similar.", "A", YES_NO, False),
    ("yes/no", "<answer>no.</answer>", "No", None, True),
    ("yes/no", "<answer>No solution</answer>", "No", None, False),
    # units and words after a value that is an expression
    ("units", "<answer>8π m²</answer>", "8\\pi", None, True),
    ("units", "<answer>8π m²</answer>", "4\\pi", None, False),
    ("units", "<answer>16√3 cm²</answer>", "16\\sqrt{3}", None, True),
    ("units", "<answer>16√2 cm²</answer>", "16\\sqrt{3}", None, False),
    ("units", "<answer>π cm</answer>", "\\pi", None, True),
    ("units", "<answer>2π cm</answer>", "\\pi", None, False),
    ("units", "<answer>\\frac{25\\pi}{2} square units</answer>", "\\frac{25\\pi}{2}", None, True),
    ("units", "<answer>\\frac{25\\pi}{4} square units</answer>", "\\frac{25\\pi}{2}", None, False),
    ("units", "<answer>36π cm³</answer>", "36\\pi", None, True),
    ("units", "<answer>12π cm³</answer>", "36\\pi", None, False),
    ("units", "The rope is 4.5 m long, so the answer is 4.5 m.", "4.5", None, True),
    ("units", "So the answer is 5.4 m.", "4.5", None, False),
    # currency and decimal commas
    ("currency", "<answer>1,250 €</answer>", "1250", None, True),
    ("currency", "<answer>1,250 €</answer>", "125", None, False),
    ("currency", "The total cost is 12,50 €.", "12.5", None, True),
    ("currency", "The total cost is 12,05 €.", "12.5", None, False),
    ("currency", "The price is £3,200.", "3200", None, True),
    ("currency", "The price is £3,020.", "3200", None, False),
    ("currency", "The length of the side is 2,5 cm.", "2.5", None, True),
    ("currency", "The length of the side is 25 cm.", "2.5", None, False),
    ("currency", "<answer>$1,000.50</answer>", "1000.5", None, True),
    ("currency", "<answer>$1,000.05</answer>", "1000.5", None, False),
]


@pytest.mark.parametrize("form, prediction, gold, question, expected", VLM_FORMS)
def test_verify_what_vision_language_models_write(form, prediction, gold, question, expected):
    assert verify(prediction, gold, question) is expected


def test_root_signs_with_any_radicand():
    """√ before a number, a letter, a command, a bracketed group (nested too), with ∛ and ∜: the radicand as
    written by hand; a root in braces already is left alone."""
    for text, latex in [("3√2", "3\\sqrt{2}"), ("√12.5", "\\sqrt{12.5}"), ("√ x", "\\sqrt{x}"), ("√π", "\\sqrt{\\pi}"),
                        ("√x²+1", "\\sqrt{x^{2}}+1"), ("√(x+1)/2", "\\sqrt{x+1}/2"), ("√((x+1)/2)", "\\sqrt{(x+1)/2}"),
                        ("√(1+√2)", "\\sqrt{1+\\sqrt{2}}"), ("∛8", "\\sqrt[3]{8}"), ("∜(x)", "\\sqrt[4]{x}"),
                        ("sqrt(2)", "\\sqrt{2}"), ("\\sqrt{3}", "\\sqrt{3}")]:
        assert answers._latex(text) == latex, text
    half = "\\sqrt{\\frac{x+1}{2}}"
    assert verify("√((x+1)/2)", half) is True and verify("√(x+1)/2", half) is False


def test_all_superscripts_subscripts_and_vulgar_fractions():
    """Every superscript digit and sign, every subscript digit, every vulgar fraction Unicode has (its value from
    unicodedata.numeric, an independent table), and a whole number before one (2½ = 5/2)."""
    import unicodedata
    from fractions import Fraction

    for digit, sup in enumerate("⁰¹²³⁴⁵⁶⁷⁸⁹"):
        assert verify(f"2{sup}", str(2 ** digit)) is True and verify(f"2{sup}", str(2 ** digit + 1)) is False
        assert verify(f"3⁻{sup}", f"3^{{-{digit}}}") is True and verify(f"x⁽{sup}⁾", f"x^{{({digit})}}") is True
    for digit, sub in enumerate("₀₁₂₃₄₅₆₇₈₉"):
        assert verify(f"x{sub} = 7", f"x_{digit} = 7") is True and verify(f"x{sub} = 7", f"x_{digit + 1} = 7") is False
    vulgar = "¼½¾⅐⅑⅒⅓⅔⅕⅖⅗⅘⅙⅚⅛⅜⅝⅞"
    for c in vulgar:
        value = Fraction(unicodedata.numeric(c)).limit_denominator(10)
        assert verify(c, f"{value.numerator}/{value.denominator}") is True
        assert verify(f"2{c}", f"{2 * value.denominator + value.numerator}/{value.denominator}") is True
        assert verify(c, f"{value.numerator + 1}/{value.denominator}") is False
    assert verify("x²+y²", "y^2+x^2") is True and verify("x²+y³", "y^2+x^3") is False


def test_signs_of_operations_relations_and_full_width_forms():
    """Each sign read as the LaTeX written here by hand, before math-verify sees it (it reads some by itself)."""
    for text, latex in [("2·3", "2 \\cdot 3"), ("4×5", "4 \\times 5"), ("12÷4", "12 \\div 4"), ("−7", "-7"),
                        ("x≤3", "x \\leq 3"), ("x≥3", "x \\geq 3"), ("x≠2", "x \\neq 2"), ("x≈3", "x \\approx 3"),
                        ("1±2", "1 \\pm 2"), ("8π", "8\\pi"), ("2θ", "2\\theta"), ("(-∞, 2]", "(-\\infty, 2]"),
                        ("30º", "30^\\circ"), ("（１，２）", "(1,2)")]:
        assert "".join(answers._latex(text).split()) == "".join(latex.split()), text  # spacing aside
    for prediction, gold in [("2·3", "6"), ("2⋅3", "6"), ("4×5", "20"), ("12÷4", "3"), ("−7", "-7"),
                             ("x≤3", "x \\leq 3"), ("x⩾3", "x \\geq 3"), ("x≠2", "x \\neq 2"),
                             ("1±√2", "1 \\pm \\sqrt{2}"), ("2πr", "2\\pi r"), ("θ = 30º", "30"),
                             ("(-∞, 2]", "(-\\infty, 2]"), ("（１，２）", "(1, 2)"), ("x ≈ 3.14", "3.14")]:
        assert verify(prediction, gold) is True, prediction
    for prediction, gold in [("2·3", "5"), ("12÷4", "4"), ("−7", "7"), ("x≤3", "x \\geq 3"), ("x≠2", "x \\neq 3")]:
        assert verify(prediction, gold) is False, prediction


def test_a_name_before_a_value_is_no_part_of_it():
    """A point's name before its coordinates, a name and "=" before a value, where the gold names none; and a
    list of named values against a list of values, in order. Neither reading may make a right answer wrong."""
    for prediction, gold in [("Q(-1, 4)", "(-1, 4)"), ("Point B(0, 2)", "(0, 2)"), ("P_1(2, 3)", "(2, 3)"),
                             ("AB = 5", "5"), ("∠ABC = 40°", "40"), ("m∠A = 30°", "30"), ("f(x) = x^2", "x^2"),
                             ("A(1, 2), B(3, 4)", "(1, 2), (3, 4)"), ("4, 5", "AB = 4, CD = 5"),
                             ("3, 2", "x = 2, x = 3")]:
        assert verify(prediction, gold) is True and verify(gold, prediction) is True, prediction
    for prediction, gold in [("Q(1, -4)", "(-1, 4)"), ("AB = 6", "5"), ("5, 4", "AB = 4, CD = 5"),
                             ("f(2, 3)", "(2, 3)")]:
        assert verify(prediction, gold) is False, prediction
    # what stays as it was: lists of named values, equations, a chain
    assert verify("y = 3, x = 5", "x = 5, y = 3") is True and verify("x = 3, y = 5", "x = 5, y = 3") is False
    assert verify("y = -x/2 + 3/4", "2x + 4y - 3 = 0") is True and verify("5", "x + y = 5") is False
    assert verify("x = 5 + 5 + 1 = 11", "11") is True


def test_two_names_must_agree():
    """Where both sides name their value, the names are compared too (spacing and braces aside)."""
    for prediction, gold, expected in [("P(-1, 4)", "Q(-1, 4)", False), ("Q(-1, 4)", "Q(-1, 4)", True),
                                       ("y = 5", "x = 5", False), ("x=5", "x = 5", True), ("x₁ = 2", "x_{1} = 2", True),
                                       ("x₂ = 2", "x_1 = 2", False), ("CD = 4", "AB = 4", False),
                                       ("A:B = 1", "1", True)]:
        assert verify(prediction, gold) is expected, prediction


def test_a_ratio_is_not_an_option():
    assert answers.as_letter("A:B = 2:3") is None and answers.as_letter("B: 40°") == "B"


def test_a_yes_or_no_with_its_reason():
    """A yes or no gold (true or false too) is matched by an answer that opens with the same word and then only
    explains, tagged or free; not by one that says the opposite too, nor by a word that only begins like one."""
    for prediction in ["Yes", "yes.", "Yes, because both pairs of opposite sides are parallel.", "**Yes**, they are.",
                       "<answer>Yes because AB ∥ CD</answer>", "Yes, there is no gap.", "So, yes, they are parallel.",
                       "The two lines never meet, so yes.", "They never meet. Yes.", "The answer is yes."]:
        assert verify(prediction, "Yes") is True and verify(prediction, "No") is False, prediction
    for prediction in ["No. Yes, it is.", "Yes and no", "Yes or no", "Yes/no", "Yes, no wait, no.", "No solution",
                       "Nothing", "Not sure, yes", "yesterday"]:
        assert verify(prediction, "Yes") is False and verify(prediction, "No") is False, prediction
    assert verify("True, since 3² + 4² = 5².", "True") is True and verify("True. Actually, false.", "True") is False
    assert verify("Yes, they are similar.", "A", "Similar?\nA. Yes\nB. No") is True
    assert verify("No, it is 5.", "5") is True  # a number gold: the yes or no is not the answer
    gold = answers.read_gold("Yes")  # as eval.py reports it: the answer judged
    text = "Yes, because AB ∥ CD."
    assert gold.yes_no and answers.final_answer(text, gold.yes_no) == (text, "yes or no")


def test_units_and_words_after_an_expression():
    for prediction, gold in [("8π m²", "8\\pi"), ("16√3 cm²", "16\\sqrt{3}"), ("π cm", "\\pi"), ("36π cm³", "36\\pi"),
                             ("\\frac{25\\pi}{2} square units", "\\frac{25\\pi}{2}"), ("2\\sqrt{2} m^2", "2\\sqrt{2}"),
                             ("5√2 units", "5\\sqrt{2}"), ("(x+1) cm", "x+1")]:
        assert verify(prediction, gold) is True and verify(prediction, f"2 \\cdot ({gold})") is False, prediction
    assert verify("4\\pi r", "4\\pi") is False and verify("2\\sqrt{2} x", "2\\sqrt{2}") is False  # a variable: no unit


def test_a_currency_before_or_after_a_number():
    for prediction, gold, expected in [("1,250 €", "1250", True), ("€1,250", "1250", True), ("£3,200", "3200", True),
                                       ("12,50 €", "12.5", True), ("12,05 €", "12.5", False), ("1,250 €", "125", False),
                                       ("¥500", "500", True), ("₹ 75", "75", True)]:
        assert verify(prediction, gold) is expected, prediction


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
    monkeypatch.setattr(answers, "verify", lambda prediction, gold, question=None: False)
    assert unverifiable_reason("<answer>B</answer>") == "the answer does not verify against itself"

# ---------------------------------------------------------------- math-verify's worker and its time bound

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def soon() -> float:
    return time.monotonic() + answers.VERIFY_SECONDS


def warm_up() -> None:
    """The process's one warm-up of math-verify (0.4 to 0.7 s, whatever the input), done apart."""
    assert verify("<answer>x + 1</answer>", "<answer>1 + x</answer>") is True


def test_math_verify_on_two_values():
    assert answers._math_verify("x^2-1", "(x-1)(x+1)", False, soon()) is True
    assert answers._math_verify("x", "|x|", False, soon()) is False  # equal for x >= 0 only
    # A set gold against a relation: math-verify compares them only when asked to (the gold's notation says interval)
    assert answers._math_verify("[2, \\infty)", "x \\geq 2", True, soon()) is True
    assert answers._math_verify("[2, \\infty)", "x \\geq 2", False, soon()) is False


def test_a_question_after_the_deadline_is_not_asked_and_counts():
    warm_up()
    before = answers.timeouts()
    assert answers._math_verify("x+1", "1+x", False, time.monotonic() - 1) is False
    assert answers.timeouts() == before + 1


@pytest.mark.parametrize("latex, expected", [
    ("x^2+1", False), ("(" * 12 + "1" + ")" * 12, False), ("x^{999}", False),
    ("9^{9^{9}}", True), ("2**3**4", True), ("1000000!", True), ("x^{2000}", True),  # towers, huge numbers
    ("(" * 13 + "1" + ")" * 13, True), ("x" * 301, True), ("", True),  # deeper than 12, longer than 300, empty
])
def test_hopeless(latex, expected):
    assert answers._hopeless(latex) is expected


OVERRUNS = "(x+1)^{999}"  # simplify() expands it: a minute and more, unless stopped
SLOW = [
    "9^{9^{9}}", "2^{2^{2^{2^{100}}}}", "10^{10^{10}}", "1000000!", "9^{999999}", "(x+1)^{2000}", OVERRUNS,
    "\\sin(" * 11 + "x" + ")" * 11, "\\sin(" * 60 + "x" + ")" * 60, "x^{" * 40 + "2" + "}" * 40,
    "x+" * 5_000 + "1", "(" * 5_000 + "1" + ")" * 5_000, "\\frac{1}{2}" * 1_000,
]


def timed_verdicts(texts: list[str]) -> tuple[list[bool], float, int]:
    """(verdicts of each text against 4, the slowest call in seconds, timeouts during the calls), after the
    process's one warm-up."""
    warm_up()
    before, verdicts, worst = answers.timeouts(), [], 0.0
    for text in texts:
        start = time.monotonic()
        verdicts.append(verify(f"<answer>{text}</answer>", "<answer>4</answer>"))
        worst = max(worst, time.monotonic() - start)
    return verdicts, worst, answers.timeouts() - before


def worker_pids() -> list[int]:
    warm_up()  # starts a worker if none is there
    return [answers._worker[0]] if answers._worker else []


def test_the_bound_on_the_main_thread():
    verdicts, worst, timeouts = timed_verdicts(SLOW)
    assert verdicts == [False] * len(SLOW) and worst < 2.0
    assert timeouts >= 1  # (x+1)^{999} runs into the bound; the towers, factorials and long texts never start
    verdicts, worst, timeouts = timed_verdicts([OVERRUNS])
    assert verdicts == [False] and timeouts == 1 and worst < 2.0  # counted, each time
    start = time.monotonic()  # the questions of one call share its second: those after it are not asked
    assert verify("\\{(x+1)^{999}, (x+2)^{999}, (x+3)^{999}\\}", "\\{4, 5, 6\\}") is False
    assert time.monotonic() - start < 2.0
    assert verify("<answer>2x + 2</answer>", "<answer>2(x+1)</answer>") is True  # a new worker answers next


def test_the_bound_in_a_thread():
    out = {}
    thread = threading.Thread(target=lambda: out.update(r=timed_verdicts(["9^{9^{9}}", OVERRUNS, "x" * 10_000])))
    thread.start()
    thread.join(10)
    verdicts, worst, timeouts = out["r"]
    assert verdicts == [False, False, False] and timeouts == 1
    assert answers.VERIFY_SECONDS <= worst < 2.0  # the overrun ran its full second, and was stopped there


def test_the_bound_when_threads_ask_at_once():
    """A process asks one question at a time: a thread waits for another's, but only within its own call's time."""
    warm_up()
    before, results = answers.timeouts(), []

    def ask():
        start = time.monotonic()
        results.append((verify(f"<answer>{OVERRUNS}</answer>", "<answer>4</answer>"), time.monotonic() - start))

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert [verdict for verdict, _ in results] == [False] * 3 and all(seconds < 2.0 for _, seconds in results)
    assert answers.timeouts() == before + 3  # one overran; the others' time ran out waiting, or just after


def timed_in_a_process(texts: list[str]) -> tuple[list[bool], float, int, list[int]]:
    return (*timed_verdicts(texts), worker_pids())


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_the_bound_in_a_worker_process_which_leaves_no_worker(method):
    with multiprocessing.get_context(method).Pool(1) as pool:  # daemonic workers
        verdicts, worst, timeouts, pids = pool.apply(timed_in_a_process, (["9^{9^{9}}", OVERRUNS],))
    assert verdicts == [False, False] and worst < 2.0 and timeouts == 1 and len(pids) == 1
    assert gone(pids[0])  # the pool's process ended, so its worker read EOF and left


def gone(pid: int, wait: float = 5.0) -> bool:
    """Has the process ended (or ended and waits, a zombie, to be reaped by whoever adopted it)?"""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("exit_call", ["sys.exit(0)", "os._exit(0)", "os.kill(os.getpid(), signal.SIGKILL)"])
def test_workers_end_with_their_process(exit_call):
    """At exit (atexit), and without it (os._exit, SIGKILL: the worker's pipe reaches EOF): no worker is left."""
    code = ("import os, signal, sys; from grpo import answers; "
            "answers.verify('<answer>x+1</answer>', '<answer>1+x</answer>'); "
            f"print(answers._worker[0], flush=True); {exit_call}")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    pids = [int(pid) for pid in done.stdout.split()]
    assert len(pids) == 1 and gone(pids[0])


def test_a_forked_child_has_no_worker_and_its_parent_keeps_its_own():
    """A child forked after a question (a DataLoader or Pool worker) neither uses nor stops its parent's worker."""
    pids = worker_pids()
    read, write = os.pipe()
    if (child := os.fork()) == 0:
        os.write(write, b"none" if answers._worker is None else b"some")
        answers.shutdown()
        os._exit(0)
    os.waitpid(child, 0)
    assert os.read(read, 4) == b"none" and not gone(pids[0], wait=0) and answers._worker[0] == pids[0]
    os.close(read), os.close(write)


def test_shutdown_stops_this_process_workers():
    pids = worker_pids()
    assert pids and all(not gone(pid, wait=0) for pid in pids)
    answers.shutdown()
    assert answers._worker is None and all(gone(pid) for pid in pids)
    assert verify("<answer>x^2 - 1</answer>", "<answer>(x-1)(x+1)</answer>") is True  # and the next call starts one
