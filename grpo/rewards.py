"""Rewards: one float per sampled completion, the only signal GRPO learns from.

Two rewards ship here:
    format    1.0 when a completion is exactly <think>...</think><answer>...</answer>, else 0.0.
    accuracy  1.0 when the completion's final answer equals the dataset's answer (`verify`), else 0.0.

Every reward function has one signature, fn(completions: list[str], **dataset_columns) -> list[float]:
dataset columns (solution, problem, ...) arrive as keyword lists aligned with completions, and a
function ignores the columns it does not use (**kwargs). To add a reward, write such a function in
a file of your own and name it by import path, `--reward_funcs accuracy my_rewards:length_penalty`
(imported from the current directory or sys.path, so the trainer needs no edit), or add it to
REWARD_FUNCS to use it by a bare name. The trainer scores with `score_completions`: a function that
raises or returns a non-number on some completions costs only those (0.0 there, and counted), not the run.

The policy optimises whatever the reward measures, holes included. Traps avoided here:
  - Judging the reasoning: only the last <answer> block (else the last \\boxed{}) is the answer, so a
    right number mentioned while thinking does not rescue a wrong final answer.
  - Comparing strings: 4.5, 9/2 and \\frac{9}{2} are one answer; so are 40°, 40^\\circ and 40.
  - Multiple choice: "(B)", "Option B" and the text of option B all mean B; an answer naming several
    options ("A or B") is wrong; the article in "A square" is not option A.
  - The format regex: without DOTALL every multi-line answer scores 0; a pattern that accepts
    several think/answer blocks is gamed by repeating them.
  - Hangs: sympy evaluates 9**9**9 eagerly and simplify() can run for minutes, stalling the whole
    batch. Threads cannot be killed and signals only work in the main thread, so the bounds are
    structural: long or odd texts never reach sympy, parsing uses evaluate=False, and values are
    computed in floats (a tower of powers overflows, an error, instead of growing without end).
    Expressions with variables are compared at a few sample points, not with simplify().
"""

from __future__ import annotations

import cmath
import collections
import functools
import importlib
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable

import sympy
from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application,
                                        parse_expr, standard_transformations)

MAX_RAW_CHARS = 300   # answers longer than this are compared as text only
MAX_MATH_CHARS = 200  # normalised text handed to sympy; no real answer is longer
REL_TOL = 1e-6        # numeric equality: relative, so 4.5 == 4.5000001 but 4.5 != 4.6

# ---------------------------------------------------------------- the final answer

def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, nested braces included; None when absent or unclosed."""
    start = text.rfind("\\boxed")  # the last one is also the innermost of \boxed{\boxed{..}}
    i = start + len("\\boxed")
    if start == -1 or not text.startswith("{", i):
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def extract_answer(text: str) -> str:
    """The final answer: the last <answer> block, else the last \\boxed{}, else the text itself.
    A \\boxed{} inside the answer block is unwrapped. rfind, not a regex: linear on any input."""
    end = text.rfind("</answer>")
    if end != -1:
        start = text.rfind("<answer>", 0, end)
        if start == -1:
            return ""
        text = text[start + len("<answer>"):end]
    boxed = _last_boxed(text)
    return (boxed if boxed is not None else text).strip()


_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mathit|operatorname|mbox)\s*\{([^{}]*)\}")
_ANSWER_PREFIX = re.compile(r"^(?:the\s+)?(?:final\s+|correct\s+)?answer\b(?:\s+is\b|\s*:)?\s*", re.I)


def _clean(answer: str) -> str:
    """Strip what carries no meaning: \\text{} wrappers, $ and \\( \\) delimiters, "The answer is",
    surrounding space and a trailing period."""
    for _ in range(3):  # \text{\textbf{B}}
        answer = _TEXT_COMMAND.sub(r"\1", answer)
    answer = re.sub(r"\\?\$|\\[()\[\]]", "", answer).strip()
    return _ANSWER_PREFIX.sub("", answer).strip().rstrip(".").strip()

# ---------------------------------------------------------------- multiple choice

# B, (B), B., B), B: 40°, Option B, option (B). A bare letter must end the answer or be followed by
# . : ) so that the article in "A square" is not read as option A.
_LETTER = re.compile(r"(?:(?i:option|choice)\s*)?(?:\(([A-Z])\)|([A-Z])(?:[.:)]|$))")
_SEVERAL = re.compile(r"\s*(?:,|/|&|and\b|or\b)", re.I)  # "(A) or (B)", "A) and C)"
_OPTION_MARK = re.compile(r"(?<![A-Za-z0-9])(?:\(([A-Z])\)|([A-Z])[.:)])")


def as_letter(answer: str, last_letter: str = "E") -> str | None:
    """The option letter an answer names, or None (text, a number, or several letters)."""
    answer = _clean(answer)
    m = _LETTER.match(answer)
    if not m:
        return None
    letter = m.group(1) or m.group(2)
    if letter > last_letter or _SEVERAL.match(answer, m.end()):
        return None
    return letter


def parse_options(question: str | None) -> dict[str, str]:
    """{"A": "30°", "B": "40°", ...} from options listed in the question, one per line or inline:
    "A: 30°", "(A) 12", "A. square", "A) 12". {} when fewer than two are found."""
    if not question:
        return {}
    # Options close the question; keeping the last 64 marks bounds the quadratic search below.
    marks = [(m.group(1) or m.group(2), m.start(), m.end()) for m in _OPTION_MARK.finditer(question)][-64:]
    best: list[tuple[str, int, int]] = []
    for i, mark in enumerate(marks):  # the longest run A, B, C, ...; the latest on ties ("angle A. (A) 12")
        if mark[0] != "A":
            continue
        run = [mark]
        for later in marks[i + 1:]:
            if ord(later[0]) == ord(run[-1][0]) + 1:
                run.append(later)
        if len(run) >= len(best):
            best = run
    if len(best) < 2:
        return {}
    ends = [start for _, start, _ in best[1:]] + [len(question)]
    return {letter: question[end:stop].split("\n")[0].strip().rstrip(",;").strip()
            for (letter, _, end), stop in zip(best, ends)}


def _option_for(answer: str, options: dict[str, str]) -> str | None:
    """The letter whose option text equals the answer ("40" -> B when B is "40°"); None unless exactly one."""
    hits = [letter for letter, text in options.items() if text and _same_value(answer, text)]
    return hits[0] if len(hits) == 1 else None

# ---------------------------------------------------------------- text to sympy

_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
_NUMBER_WORDS.update({w: 10 * i for i, w in enumerate("thirty forty fifty sixty seventy eighty ninety".split(), 3)})
_NUMBER_WORD = re.compile(rf"^({'|'.join(_NUMBER_WORDS)})(?![a-z])", re.I)

_SYMBOL_REWRITES = [  # (pattern, replacement), in order
    (r"\\approx|≈", "="),
    (r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°", ""),  # 40^\circ, 40^{\circ}, 40°
    (r"\\?%", ""),  # 50\%, 50%
    (r"\\(?:left|right|displaystyle)|\\[,;:! ]|\\q?quad", " "),
    (r"[−–]", "-"), (r"\\times|\\cdot|[×·]", "*"), (r"\\div|÷", "/"),
    (r"²", "^2"), (r"³", "^3"), (r"π", r"\\pi"), (r"√", r"\\sqrt"),
    (r"\\[dt]frac", r"\\frac"), (r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}"),  # \dfrac, \frac12
    (r"\\sqrt\s*(\d+|[a-zA-Z](?![a-zA-Z]))", r"\\sqrt{\1}"),  # \sqrt3
]
_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?![\d,])")  # 1,000,000
# 6 apples, 16\pi cm^2; words of two letters or more, so "2x + y" keeps its y and "16 pi" its pi
_TRAILING_WORDS = re.compile(r"(?:\s+(?!pi\b|sqrt\b)[a-zA-Z]{2,}(?:\^\{?[23]\}?)?)+\s*$")
_GLUED_UNIT = re.compile(r"(?<=\d)\s*(?:cm|mm|km|units?)(?:\^\{?[23]\}?)?$")  # 5cm
_INNERMOST = [  # LaTeX groups without braces inside, so nested ones are rewritten inside out
    (re.compile(r"\\frac\{([^{}]*)\}\{([^{}]*)\}"), r"((\1)/(\2))"),
    (re.compile(r"\\sqrt\[([^\[\]{}]*)\]\{([^{}]*)\}"), r"((\2)**(1/(\1)))"),
    (re.compile(r"\\sqrt\{([^{}]*)\}"), r"sqrt(\1)"),
    (re.compile(r"\^\{([^{}]*)\}"), r"**(\1)"),
]
_MATH_CHARS = re.compile(r"[0-9a-zA-Z+\-*/^().\s]*")
_TRANSFORMS = standard_transformations + (implicit_multiplication_application, convert_xor)


def _math_text(answer: str) -> str | None:
    """LaTeX / plain answer -> text for parse_expr ("2\\sqrt{3} cm" -> "2sqrt(3)"), or None."""
    s = _clean(answer)
    if len(s) > MAX_RAW_CHARS:
        return None
    for pattern, repl in _SYMBOL_REWRITES:
        s = re.sub(pattern, repl, s)
    s = s.split("=")[-1].strip()  # x = 4.5: the right-hand side is the answer
    s = _NUMBER_WORD.sub(lambda m: str(_NUMBER_WORDS[m.group(1).lower()]), s)
    s = _THOUSANDS.sub(lambda m: m.group().replace(",", ""), s)
    words = _TRAILING_WORDS.search(s)
    if words and re.search(r"\d", s[:words.start()]):  # units and words after a number; not "A square"
        s = s[:words.start()]
    s = _GLUED_UNIT.sub("", s)
    s = re.sub(r"\\pi(?![a-zA-Z])", " pi ", s)  # after the unit strip, which must not eat "pi"
    for _ in range(20):
        before = s
        for pattern, repl in _INNERMOST:
            s = pattern.sub(repl, s)
        if s == before:
            break
    s = s.replace("{", "(").replace("}", ")").replace("^", "**").strip()
    if not s or len(s) > MAX_MATH_CHARS or not _MATH_CHARS.fullmatch(s):
        return None  # an unknown LaTeX command, a comma list, an unclosed \frac{1}{ ...
    if any(len(name) > 1 and name not in ("sqrt", "pi") for name in re.findall(r"[a-zA-Z]+", s)):
        return None  # words are text, not products of single-letter variables
    return s


def to_sympy(answer: str) -> sympy.Expr | None:
    """The answer as an unevaluated sympy expression, or None when it is not mathematics."""
    s = _math_text(answer)
    return None if s is None else _parse(s)


@functools.lru_cache(maxsize=4096)  # gold answers and options recur across a group: parse them once
def _parse(s: str) -> sympy.Expr | None:
    # Every single letter is a plain symbol, so E, I, N, S are not sympy's constants and functions.
    names = {c: sympy.Symbol(c) for c in set(re.findall(r"(?<![a-zA-Z])[a-zA-Z](?![a-zA-Z])", s))}
    names.update(pi=sympy.pi, sqrt=sympy.sqrt)
    try:
        expr = parse_expr(s, local_dict=names, transformations=_TRANSFORMS, evaluate=False)
    except Exception:  # SyntaxError, TokenError, too many nested parentheses, ...
        return None
    return expr if isinstance(expr, sympy.Expr) else None

# ---------------------------------------------------------------- equality


def _evaluate(expr: sympy.Expr, point: dict) -> complex:
    """Value in Python complex floats: each node costs O(1), and too large a value raises
    OverflowError, where exact integers would keep growing (9**9**9 has 370 million digits)."""
    if expr.is_Symbol:
        value = point[expr]
    elif expr.is_Number or expr.is_NumberSymbol:
        value = complex(expr)
    elif expr.is_Add or expr.is_Mul or expr.is_Pow:
        args = [_evaluate(arg, point) for arg in expr.args]
        value = sum(args) if expr.is_Add else math.prod(args) if expr.is_Mul else args[0] ** args[1]
    else:
        raise ValueError(f"cannot evaluate {type(expr).__name__}")
    if not cmath.isfinite(value):
        raise OverflowError("value out of float range")
    return value


def _numerically_equal(x: sympy.Expr, y: sympy.Expr) -> bool:
    """Equal values; with variables, equal at three sample points (a bounded stand-in for simplify)."""
    if x.is_Rational and y.is_Rational:  # two plain literals: exact, so 1000001 != 1000000 despite REL_TOL
        return x == y
    symbols = sorted(x.free_symbols | y.free_symbols, key=str)
    for k in range(3 if symbols else 1):
        point = {s: complex(0.53 + 0.37 * i + 0.29 * k) for i, s in enumerate(symbols)}
        try:
            a, b = _evaluate(x, point), _evaluate(y, point)
        except (ArithmeticError, ValueError, TypeError, KeyError):
            return False
        if abs(a - b) > max(REL_TOL * max(abs(a), abs(b)), 1e-12):
            return False
    return True


def _plain(answer: str) -> str:
    """Text for a string comparison: lowercase, single spaces, no leading article ("Square." == "square")."""
    text = " ".join(_clean(answer).lower().split())
    return re.sub(r"^(?:a|an|the)\s+", "", text)


def _same_value(a: str, b: str) -> bool:
    """Same text, or the same mathematical value."""
    if _plain(a) == _plain(b):
        return True
    x, y = to_sympy(a), to_sympy(b)
    return x is not None and y is not None and _numerically_equal(x, y)


def verify(prediction: str, gold: str, question: str | None = None) -> bool:
    """Is the final answer of `prediction` the answer in `gold`? `question` supplies the options of a
    multiple-choice question, so that an option's text counts as its letter. Never raises."""
    try:
        return _verify(prediction, gold, question)
    except Exception:  # a reward must not crash a training step; an answer we cannot judge is wrong
        return False


def _verify(prediction: str, gold: str, question: str | None) -> bool:
    answer, target = extract_answer(prediction), extract_answer(gold)
    if not _clean(answer) or not _clean(target):
        return False
    options = parse_options(question)
    last = max(options) if options else "E"
    answer_letter, gold_letter = as_letter(answer, last), as_letter(target, last)
    if gold_letter is None and options:
        gold_letter = _option_for(target, options)  # gold given as an option's text
    if gold_letter is not None:
        if answer_letter is None and options:
            answer_letter = _option_for(answer, options)
        return answer_letter == gold_letter
    if answer_letter is not None:  # gold is not among the options: judge the chosen option's text
        return answer_letter in options and _same_value(options[answer_letter], target)
    return _same_value(answer, target)

# ---------------------------------------------------------------- reward functions

_NO_TAG = r"(?:(?!</?(?:think|answer)>).)*"  # any text, tags excluded: no nested or repeated blocks
_FORMAT = re.compile(rf"\s*<think>{_NO_TAG}</think>\s*<answer>{_NO_TAG}</answer>\s*", re.DOTALL)


def format_reward(completions: list[str], **kwargs) -> list[float]:
    """1.0 when the whole completion is one <think>...</think> then one <answer>...</answer>, else 0.0."""
    return [1.0 if _FORMAT.fullmatch(c) else 0.0 for c in completions]


def accuracy_reward(completions: list[str], solution: list[str], problem: list[str] | None = None,
                    **kwargs) -> list[float]:
    """1.0 when completion i's final answer equals solution i's (options read from problem i)."""
    for name, column in (("solution", solution), ("problem", problem)):
        if column is not None and len(column) != len(completions):
            raise ValueError(f"accuracy_reward: {len(completions)} completions but {len(column)} {name} values; "
                             "dataset columns must have one row per completion.")
    problems = problem if problem is not None else [None] * len(completions)
    return [1.0 if verify(c, s, q) else 0.0 for c, s, q in zip(completions, solution, problems)]


REWARD_FUNCS: dict[str, Callable[..., list[float]]] = {"accuracy": accuracy_reward, "format": format_reward}


def get_reward_funcs(names: list[str]) -> list[Callable[..., list[float]]]:
    """The reward functions for `names`, in order: registry names, or `package.module:function` paths."""
    return [_import_reward(name) if ":" in name else _registered(name) for name in names]


def _registered(name: str) -> Callable[..., list[float]]:
    if name not in REWARD_FUNCS:
        raise ValueError(f"unknown reward function {name!r}; known: {', '.join(sorted(REWARD_FUNCS))}, "
                         "or give a module:function path such as my_rewards:length_penalty.")
    return REWARD_FUNCS[name]


def _import_reward(entry: str) -> Callable[..., list[float]]:
    """`package.module:function` imported from sys.path. The current directory goes first when it is
    missing (`python train.py` puts the script's folder there, not the folder the user runs in), so a
    my_rewards.py next to where the user runs is found."""
    module_name, _, attr = entry.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward function {entry!r}: expected module:function, such as my_rewards:length_penalty.")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module's own error (a SyntaxError, ...) while importing
        raise ValueError(f"reward function {entry!r}: cannot import module {module_name!r} "
                         f"({type(e).__name__}: {e}); it must be importable from the current directory "
                         "or sys.path.") from e
    if not hasattr(module, attr):
        where = getattr(module, "__file__", None) or "a namespace package"
        raise ValueError(f"reward function {entry!r}: module {module_name!r} ({where}) has no attribute {attr!r}.")
    fn = getattr(module, attr)
    if not callable(fn):
        raise ValueError(f"reward function {entry!r}: {module_name}.{attr} is a {type(fn).__name__}, not a "
                         "function fn(completions, **dataset_columns) -> list[float].")
    return fn

# ---------------------------------------------------------------- scoring that survives a faulty reward


class RewardFaults:
    """Counts reward-function failures and reports them without flooding the log: the first `limit`
    failures of each function are reported with their dataset row and the error, then one line says
    further ones of that function are only counted."""

    def __init__(self, log: Callable[[str], None], limit: int = 3):
        self.log, self.limit = log, limit
        self.counts: collections.Counter[str] = collections.Counter()  # failures per function, all calls

    def report(self, name: str, message: str) -> None:
        """Count one failure of function `name`; log `message` while under the limit."""
        self.counts[name] += 1
        if self.counts[name] <= self.limit:
            self.log(message)
        if self.counts[name] == max(self.limit, 1):
            self.log(f"reward function {name!r}: {self.limit} failures reported; further ones are only "
                     f"counted, as the metric reward/{name}_failures.")


@dataclass(frozen=True)
class _Failure:
    """Why a single-completion call gave no value; a class of its own, so no returned value is taken for it."""
    reason: str


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _call_one(fn: Callable, completions: list[str], columns: dict[str, list], i: int):
    """Completion i scored alone: its value, or a _Failure."""
    try:
        out = list(fn([completions[i]], **{key: [values[i]] for key, values in columns.items()}))
    except Exception as e:
        return _Failure(f"raised {type(e).__name__}: {_short(str(e))}")
    return out[0] if len(out) == 1 else _Failure(f"returned {len(out)} values for 1 completion")


def _as_reward(value) -> float | str:
    """The value as a float, or why it is not a reward (a str). A number is anything float() takes
    through __float__: int, float, numpy scalars, one-element tensors, and bool as 0/1 (what a check
    like `answer == gold` gives). None, text (even "1.0": a function returning text has a bug to
    show), NaN and infinities are not: one of them in a sum makes every advantage of its group NaN."""
    if isinstance(value, _Failure):
        return value.reason
    try:
        reward = float(value) if hasattr(type(value), "__float__") else math.nan
    except Exception:  # an int too large for a float, a tensor of several values, ...
        reward = math.nan
    return reward if math.isfinite(reward) else f"returned {_short(repr(value), 80)}"


def score_completions(reward_funcs: list[Callable], names: list[str], completions: list[str],
                      columns: dict[str, list], rows: list[int], faults: RewardFaults
                      ) -> tuple[list[list[float]], list[int]]:
    """scores[i][k]: function k's reward for completion i (N x K); failures[k]: how many of the N
    completions function k failed on in this call.

    `columns` are dataset columns aligned with `completions`; `rows[i]` is completion i's dataset row,
    for the messages. Each function is called once on the whole batch, so a working one costs nothing
    extra. If that call raises or does not return N values, it is called again one completion at a
    time, so that only the completions it really fails on are affected. A completion whose call raises
    or whose value is not a finite number gets 0.0 from that function and is reported through `faults`:
    neither rewarded nor allowed to stop the run, while its group's mean and std are still over G values
    (dropping it would change them; NaN would spread to the whole group). For a function whose rewards
    are negative 0.0 is a relative bonus; the failure count is how such a case gets noticed."""
    n = len(completions)
    lengths = {"rows": len(rows), **{key: len(values) for key, values in columns.items()}}
    if any(length != n for length in lengths.values()):
        raise ValueError(f"score_completions: {n} completions but lengths {lengths}; one per completion each.")
    scores = [[0.0] * len(reward_funcs) for _ in range(n)]
    failures = []
    for k, (fn, name) in enumerate(zip(reward_funcs, names)):
        try:
            values = list(fn(completions, **columns))
        except Exception:
            values = None
        if values is None or len(values) != n:
            values = [_call_one(fn, completions, columns, i) for i in range(n)]
        failed = 0
        for i, value in enumerate(values):
            reward = _as_reward(value)
            if isinstance(reward, str):
                failed += 1
                faults.report(name, f"reward function {name!r} failed on dataset row {rows[i]}: {reward}; "
                                    "the completion gets 0.0 for this function.")
            else:
                scores[i][k] = reward
        failures.append(failed)
    return scores, failures

# ---------------------------------------------------------------- gold answers


def unverifiable_reason(solution: str, problem: str | None = None) -> str | None:
    """None when `verify` can judge this gold answer, else a short reason. At data-load time such
    rows are dropped: no completion could ever earn the accuracy reward on them, so each of their
    groups would spend G generations on a reward that is 0 for all, and no signal."""
    if not isinstance(solution, str):
        return f"the solution is {type(solution).__name__}, not text"
    if not _clean(extract_answer(solution)):
        return "no answer in the solution"
    if not verify(solution, solution, problem):
        return "the answer does not verify against itself"
    return None
