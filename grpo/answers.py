"""Answers: what a completion's final answer is, and whether it is the gold answer (`verify`).

`verify(prediction, gold, question)` is the accuracy reward's judge and eval.py's. It reads the
final answer (`final_answer`), then compares it with the gold's as multiple choice, as a structure
(tuple, interval, union, set, matrix) or as one mathematical value, and never raises.

The policy optimises whatever the reward measures, holes included. Traps avoided here:
  - Judging the reasoning: only the last <answer> block (else the last \\boxed{}) is the answer, so a
    right number mentioned while thinking does not rescue a wrong final answer. Without either, the
    answer is read from the text after any <think> block (`final_answer`): a stated "the answer is X",
    else the value of the concluding sentence, never a number from the middle of the reasoning.
  - Comparing strings: 4.5, 9/2 and \\frac{9}{2} are one answer; so are 40°, 40^\\circ and 40; so are
    (1, 9/2) and (1, 4.5), \\{1,2,3\\} and {3,2,1}, \\sec^2 y and \\tan^2 y + 1. Brackets and order
    carry meaning where they do in mathematics: [1,3) != (1,3), (1,2) != (2,1), shapes of matrices.
    A bare 1,22 is 1.22 and 1,000 is 1000, but (1,22) is a pair (rule: _uncomma).
  - Multiple choice: "(B)", "Option B" and the text of option B all mean B; an answer naming several
    options ("A or B") is wrong; the article in "A square" is not option A.
  - Hangs: sympy evaluates 9**9**9 eagerly and simplify() can run for minutes, stalling the whole
    batch. Threads cannot be killed and signals only work in the main thread, so the bounds are
    structural: long or odd texts never reach sympy, parsing uses evaluate=False, and values are
    computed in floats (a tower of powers overflows, an error, instead of growing without end).
    Expressions with variables are compared at a few sample points, not with simplify(). Structures
    stop at MAX_ITEMS items and MAX_NESTING levels, and final_answer reads only the text's last sentences.

Why not the math-verify library (0.9.0, with latex2sympy2_extended 1.11.0)? On the 130 hand-written
cases of tests/test_rewards.py (ANSWER_SHAPES, 2026-11-25) it judged 104 right at best (87 on the raw
texts) against 130 here, and was better on no shape (tied on tuples and matrices; 8/18 on decimal commas
and spaced thousands, 10/17 on free-text endings); and its only time bound is SIGALRM, which works in the
main thread alone (elsewhere it raises) and took 5 s a call on 9^{9^{9^{9}}} or 100 nested \\sin.
"""

from __future__ import annotations

import cmath
import functools
import math
import re

import sympy
from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application,
                                        parse_expr, standard_transformations)

MAX_RAW_CHARS = 300   # answers longer than this are compared as text only
MAX_MATH_CHARS = 200  # normalised text handed to sympy; no real answer is longer
MAX_ITEMS = 64        # elements of a tuple, set or matrix compared one by one; more are compared as text
MAX_NESTING = 4       # tuples of tuples ...: deeper structures are compared as text
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


def _tagged(text: str) -> tuple[str, str] | None:
    """(answer, "answer tag" | "boxed") from the last <answer> block, else the last \\boxed{}; None
    when there is neither. A \\boxed{} inside the answer block is unwrapped. rfind, not a regex:
    linear on any input."""
    end = text.rfind("</answer>")
    if end != -1:
        start = text.rfind("<answer>", 0, end)
        inner = "" if start == -1 else text[start + len("<answer>"):end]
        boxed = _last_boxed(inner)
        return (boxed if boxed is not None else inner).strip(), "answer tag"
    boxed = _last_boxed(text)
    return None if boxed is None else (boxed.strip(), "boxed")


def extract_answer(text: str) -> str:
    """The final answer: the last <answer> block, else the last \\boxed{}, else the text itself.
    Training's view of a completion; `verify` reads untagged texts further with `final_answer`."""
    found = _tagged(text)
    return found[0] if found else text.strip()


# "The answer is (B)", "Answer: 12", "the final answer is $x=3$", "the correct option would be C"
_ANSWER_PHRASE = re.compile(r"\b(?:answer|option|choice)\**(?:\s+(?:is|would\s+be|should\s+be|will\s+be)\s*:?|\s*:)"
                            r"\**\s*(?:(?:therefore|thus|hence|then|clearly|simply)\b)?[\s:]*", re.I)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")
# The value of a concluding sentence follows one of these; "=" but not <=, >=, !=.
_CUE = re.compile(r"\b(?:is|are|was|equals?(?:\s+to)?|so|therefore|thus|hence|gives|get|gets)\b"
                  r"|(?<![<>!=])=|\\approx|≈", re.I)
_CLAUSE = re.compile(r"\s(?:because|since|as|which|but|when|where)\b", re.I)  # "6 which is even": 6
_NAME = re.compile(r"\s*[A-Za-z]{1,3}\s*")  # the left-hand side of x = 4.5, AB = 5
_WORDS = re.compile(r"(?:an?\s+|the\s+)?[A-Za-z]+(?:\s+[A-Za-z]+){0,2}")  # "a square", "dark blue"


def _outside_think(text: str) -> str:
    """The text after the last </think>, up to any <think> left open: reasoning is never the answer."""
    end = text.rfind("</think>")
    if end != -1:
        text = text[end + len("</think>"):]
    start = text.find("<think>")
    return text if start == -1 else text[:start]


def _tidy(candidate: str) -> str:
    """A candidate without the markdown, $ and punctuation around it: "**$x=3$**." -> "x=3"."""
    return candidate.strip().strip("*$").strip().rstrip(".,;:!").strip().strip("*$").strip()


def _is_value(candidate: str) -> bool:
    """Is this text an answer by itself: an option letter, or a value (_is_math)?"""
    return bool(candidate) and len(candidate) <= MAX_RAW_CHARS and (
        as_letter(candidate, "Z") is not None or _is_math(candidate))


def _answer_phrase(text: str) -> str:
    """What follows the last "the answer is" / "Answer:", to the end of its sentence or a clause
    ("6, since ..." -> 6), when that is a value or a few words; else ""."""
    last = None
    for last in _ANSWER_PHRASE.finditer(text):
        pass
    if last is None:
        return ""
    rest = text[last.end():last.end() + MAX_RAW_CHARS]
    end = _SENTENCE_END.search(rest)
    rest = rest[:end.start()] if end else rest
    clause = _CLAUSE.search(rest)
    answer = _tidy(rest[:clause.start()] if clause else rest)
    # "To find the answer: we count them. ..." states no answer; "the answer is (A) or (C)" does (a wrong one)
    return answer if _is_value(answer) or _WORDS.fullmatch(answer) or _LETTER.match(answer) else ""


def _concluding_value(text: str) -> str:
    """The answer the last sentence states: the sentence itself when it is a value ("x = 1, y = 2"),
    else the value after its first cue that leaves only a value ("so the probability is 2/3"), else an
    option it opens with ("(B) is correct"), else a few words after is/are/was ("it is a square");
    "" when none."""
    sentences = [s for s in _SENTENCE_END.split(text[-4 * MAX_RAW_CHARS:]) if re.search(r"[0-9A-Za-z]", s)]
    if not sentences:
        return ""
    sentence = sentences[-1]
    if _is_value(_tidy(sentence)):
        return _tidy(sentence)
    cues = list(_CUE.finditer(sentence))
    if cues:  # a clause after the first cue is not the answer: "it is (B) because the angle is 40°"
        clause = _CLAUSE.search(sentence, cues[0].end())
        if clause:
            sentence = sentence[:clause.start()]
            cues = [cue for cue in cues if cue.end() <= clause.start()]
    if cues and re.search(r"\bor\b", sentence[cues[0].end():], re.I):  # "x = 6 or x = 7": a hedge, no answer
        return ""
    candidates = [(cue.group().lower(), _tidy(sentence[cue.end():])) for cue in cues[-8:]]  # bounded work
    for _, candidate in candidates:
        if _is_value(candidate):
            return candidate
    if as_letter(sentence) is not None:
        return _tidy(sentence)
    if candidates and candidates[-1][0] in ("is", "are", "was") and _WORDS.fullmatch(candidates[-1][1]):
        return candidates[-1][1]
    return ""


def final_answer(text: str) -> tuple[str, str]:
    """(the final answer, how it was found), how being one of
        "answer tag"     the last <answer>...</answer> (a \\boxed{} inside it unwrapped)
        "boxed"          the last \\boxed{}
        "answer is"      what follows the last "The answer is" / "Answer:" / "the correct option is"
        "whole text"     a text that is itself a value ("6 apples", "x = 1, y = 2", "(B)"), or a short
                         text where nothing below is found either ("A square"), taken as is
        "last sentence"  what the concluding sentence states: the value after is / = / equals / so /
                         therefore ... ("so the probability is 2/3."), or the option it names
        "none"           nothing usable: empty, an empty or unclosed <answer>, only reasoning, or a long
                         text without a stated answer (answer "").
    Only the end counts: a right number mid-reasoning and a different one in the last sentence is the
    latter. Past the tags and the box, text inside <think> is never read. verify(final_answer(t)[0], gold)
    judges as verify(t, gold) does, except for prose inside a tag: verify(t) takes "<answer>so it is
    6</answer>" as is (as training always has), while its answer "so it is 6" alone reads as 6.
    Bounded: linear scans of the text, values checked on short candidates only."""
    if not isinstance(text, str):
        return "", "none"
    found = _tagged(text)
    if found:
        return found if _clean(found[0]) else ("", "none")
    text = _outside_think(text)
    if "<answer>" in text:  # an answer cut off before </answer> (a length limit) is not judged
        return "", "none"
    answer, whole = _answer_phrase(text), text.strip()
    if _clean(answer):
        return answer, "answer is"
    if _is_value(whole):  # "6 apples", "x = 1, y = 2", "(1, 9/2)": the text is the answer
        return whole, "whole text"
    answer = _concluding_value(text)
    if _clean(answer):
        return answer, "last sentence"
    return (whole, "whole text") if _clean(whole) and len(whole) <= MAX_RAW_CHARS else ("", "none")


_TEXT_COMMAND = re.compile(r"\\(?:text|textnormal|textrm|textbf|textit|mathrm|mathbf|mathit|operatorname|mbox)"
                           r"\s*\{([^{}]*)\}")
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

# ---------------------------------------------------------------- verify


def verify(prediction: str, gold: str, question: str | None = None) -> bool:
    """Is the final answer of `prediction` the answer in `gold`? `question` supplies the options of a
    multiple-choice question, so that an option's text counts as its letter. Both answers are read
    with `final_answer`, so tagged ones exactly as `extract_answer` reads them. Never raises."""
    try:
        return _verify(prediction, gold, question)
    except Exception:  # a reward must not crash a training step; an answer we cannot judge is wrong
        return False


def _verify(prediction: str, gold: str, question: str | None) -> bool:
    answer, target = final_answer(prediction)[0], final_answer(gold)[0]
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

# ================================================================ answer equivalence (private)
# When two answers are the same: _same_value, then the rules it uses, by shape: structured answers
# (tuples, intervals, sets, matrices), then single values (text -> sympy -> floats at sample points).


def _is_math(text: str) -> bool:
    """A number, expression, infinity or structure; with "=", only after names or expressions: x = 4.5
    and AB = 5 are values, "Therefore, x = 4.5" is not."""
    *names, _ = _clean(text).split("=")
    if to_sympy(text) is not None and all(_NAME.fullmatch(name) or to_sympy(name) is not None for name in names):
        return True
    return _infinity(text) is not None or _structure(text) is not None


def _plain(answer: str) -> str:
    """Text for a string comparison: lowercase, single spaces, no leading article ("Square." == "square")."""
    text = " ".join(_clean(answer).lower().split())
    return re.sub(r"^(?:a|an|the)\s+", "", text)


# The name in x = 4.5. Alone, x = 4.5 == y = 4.5 (a naming choice); items of a list must agree on names.
_ASSIGNED = re.compile(r"([A-Za-z]{1,3})\s*=(?!=)")


def _same_value(a: str, b: str, depth: int = 0) -> bool:
    """Same text, or the same mathematical object: a structure element by element, infinities by sign,
    else the same value."""
    if _plain(a) == _plain(b):
        return True
    x, y = _structure(a), _structure(b)
    if x is not None or y is not None:
        return x is not None and y is not None and depth < MAX_NESTING and _same_structure(x, y, depth + 1)
    signs = _infinity(a), _infinity(b)
    if signs != (None, None):
        return signs[0] == signs[1]
    names = _ASSIGNED.match(_clean(a)), _ASSIGNED.match(_clean(b))
    if depth and all(names) and names[0].group(1) != names[1].group(1):  # in a list: x = 2, y = 1 != x = 1, y = 2
        return False
    x, y = to_sympy(a), to_sympy(b)
    return x is not None and y is not None and _numerically_equal(x, y)

# ---------------------------------------------------------------- structured answers
# A structure is a tuple of plain values: ("seq", open, close, items) for tuples, points and intervals
# (a point (1,3) and the open interval (1,3) are one text, so they compare alike either way, while
# [1,3) != (1,3)); ("union", parts) for unions of intervals; ("set", items) for \{..\}; ("list", items)
# for a bare list of values, equal to a set with the same items; ("matrix", rows). Items stay text,
# compared by _same_value, so \frac12 == 0.5 inside any of them.
#
# Commas: inside brackets a comma always separates items, so (1,22) is a pair. In a bare answer,
# digits,digits is one number: thousands when every group after the first has exactly three digits and
# the first does not start with 0 (1,000 and 1,000,000), else a decimal comma (1,22 = 1.22, 0,125); any
# other comma makes an unordered list (1, 2, 3 == 3, 2, 1). Spaces group thousands too (1 000, 1\,000).

_MATRIX = re.compile(r"[(\[]?\s*\\begin\{([pbB]?matrix|smallmatrix|array)\}(?:\{[lcr|\s]*\})?(.*?)\\end\{\1\}\s*[)\]]?",
                     re.S)
_UNION = re.compile(r"\\cup|∪|(?<=[)\]])\s*U\s*(?=[(\[])")
# x \in [1,3), S = \{1\}, (x, y) = (1, 2): the name goes
_NAMED = re.compile(r"^(?:[A-Za-z]\w*|\\[A-Za-z]+|\([A-Za-z\s,]+\))\s*(?:=|\\in\b|∈)\s*(?=[(\[{\\])")
_COMMA_NUMBER = re.compile(r"(?<![\d.,])(\d+)((?:,\d+)+)(\.\d+)?(?![\d,])")
_INFINITY = re.compile(r"([+-]?)\s*(?:\\infty|∞|oo|inf|infinity)", re.I)


def _uncomma(m: re.Match) -> str:
    """1,000,000 -> 1000000 and 1,22 -> 1.22 (see the rule above); anything else unchanged."""
    first, groups, decimals = m.group(1), m.group(2).split(",")[1:], m.group(3) or ""
    if re.fullmatch(r"[1-9]\d{0,2}", first) and all(len(g) == 3 for g in groups):
        return first + "".join(groups) + decimals
    return f"{first}.{groups[0]}" if len(groups) == 1 and not decimals else m.group()


def _split_top(s: str, sep: str) -> list[str] | None:
    """s split at `sep` outside brackets, or None when its brackets do not balance. Brackets of any kind
    count alike, so the half-open [1,3) balances."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth < 0:
                return None
        elif c == sep and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    return None if depth else parts + [s[start:]]


def _wrapped(s: str) -> bool:
    """Does the bracket that opens s close only at its last character? "(1,2)" yes, "(1)+(2)" no."""
    depth = 0
    for i, c in enumerate(s):
        depth += 1 if c in "([{" else -1 if c in ")]}" else 0
        if depth == 0:
            return i == len(s) - 1
    return False


def _items(inner: str) -> tuple[str, ...] | None:
    items = _split_top(inner, ",")
    return None if items is None or len(items) > MAX_ITEMS else tuple(item.strip() for item in items)


@functools.lru_cache(maxsize=4096)
def _structure(answer: str) -> tuple | None:
    """The answer as a structure (see above), or None for a single value or text."""
    s = _clean(answer)
    if len(s) > MAX_RAW_CHARS:
        return None
    s = re.sub(r"\\(?:left|right|[bB]igg?[lr]?)(?![a-zA-Z])", "", s)
    s = re.sub(r"(?<!\\)\\[,;:! ]|~", " ", s)  # spacing; not the row break \\ of a matrix
    s = re.sub(r"\\lbrace|\\\{", "⦃", re.sub(r"\\rbrace|\\\}", "⦄", s))  # \{ \}: one character each
    s = re.sub(r"\\emptyset|\\varnothing|∅", "⦃⦄", s)
    s = _NAMED.sub("", s.strip()).strip()
    matrix = _MATRIX.fullmatch(s)
    if matrix:
        body = re.sub(r"\\hline", "", matrix.group(2)).strip()
        rows = [row.strip() for row in re.split(r"\\\\", body)]
        rows = rows[:-1] if len(rows) > 1 and not rows[-1] else rows
        cells = tuple(tuple(cell.strip() for cell in row.split("&")) for row in rows)
        return ("matrix", cells) if sum(map(len, cells)) <= MAX_ITEMS else None
    escaped = s.startswith("⦃")  # \{5\} is a set; {5} is a group
    s = s.replace("⦃", "{").replace("⦄", "}")  # back to one bracket kind, balanced with the others
    parts = _split_top(_UNION.sub("∪", s), "∪")
    if parts and len(parts) > 1:
        intervals = tuple(_structure(part.strip()) for part in parts)
        if all(x is not None and x[0] == "seq" and len(x[3]) == 2 for x in intervals) and len(parts) <= MAX_ITEMS:
            return ("union", intervals)
        return None
    if s[:1] in "([{" and s[-1:] in ")]}" and _wrapped(s):
        items = _items(s[1:-1])
        if items is None:
            return None
        if s[0] == "{" and (len(items) > 1 or escaped):  # {1,2}, \{5\}, \{\}
            return ("set", tuple(item for item in items if item) if items != ("",) else ())
        if s[0] != "{" and len(items) > 1:
            return ("seq", s[0], s[-1], items)
        return None  # (5), {5}: grouping, a single value
    items = _items(_COMMA_NUMBER.sub(_uncomma, s))  # 1, 2, 3 or x = 1, y = 2; not prose with commas
    if items is None or len(items) < 2 or not all(items) or not all(_is_math(item) for item in items):
        return None
    return ("list", items)


def _same_structure(x: tuple, y: tuple, depth: int) -> bool:
    """Same kind and shape; items equal in order (tuples, intervals, matrices) or as sets."""
    if x[0] != y[0] and {x[0], y[0]} != {"set", "list"}:  # \{1, 2\} == 2, 1
        return False
    if x[0] == "seq":
        return x[1:3] == y[1:3] and len(x[3]) == len(y[3]) and all(
            _same_value(a, b, depth) for a, b in zip(x[3], y[3]))
    if x[0] == "matrix":
        return [len(row) for row in x[1]] == [len(row) for row in y[1]] and all(
            _same_value(a, b, depth) for row_x, row_y in zip(x[1], y[1]) for a, b in zip(row_x, row_y))
    same = (lambda a, b: _same_structure(a, b, depth)) if x[0] == "union" else (lambda a, b: _same_value(a, b, depth))
    return (all(any(same(a, b) for b in y[1]) for a in x[1])
            and all(any(same(a, b) for a in x[1]) for b in y[1]))


def _infinity(answer: str) -> int | None:
    """+1 for \\infty, oo, +∞, -1 for -\\infty, -oo; None for anything else."""
    m = _INFINITY.fullmatch(_clean(answer).replace("−", "-"))
    return None if m is None else -1 if m.group(1) == "-" else 1

# ---------------------------------------------------------------- single values: text to sympy

_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
_NUMBER_WORDS.update({w: 10 * i for i, w in enumerate("thirty forty fifty sixty seventy eighty ninety".split(), 3)})
_NUMBER_WORD = re.compile(rf"^({'|'.join(_NUMBER_WORDS)})(?![a-z])", re.I)

# Functions a value may use, LaTeX (\sin) or plain (sin); each maps to sympy, then to cmath in _evaluate.
# log and ln are natural logarithms; log_b x names its base.
_FUNCTIONS = {"sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "sec": sympy.sec, "csc": sympy.csc,
              "cot": sympy.cot, "asin": sympy.asin, "acos": sympy.acos, "atan": sympy.atan, "sinh": sympy.sinh,
              "cosh": sympy.cosh, "tanh": sympy.tanh, "log": sympy.log, "exp": sympy.exp, "sqrt": sympy.sqrt}
_SPELLED = {"arcsin": "asin", "arccos": "acos", "arctan": "atan", "ln": "log"}
_FUNCTION_NAMES = "|".join(sorted(set(_FUNCTIONS) | set(_SPELLED), key=len, reverse=True))
_FUNCTION = re.compile(rf"(?<![a-zA-Z])({_FUNCTION_NAMES})(?![a-zA-Z])")

_SYMBOL_REWRITES = [  # (pattern, replacement), in order
    (r"\\approx|≈", "="),
    (r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°", ""),  # 40^\circ, 40^{\circ}, 40°
    (r"\\?%", ""),  # 50\%, 50%
    (r"\\(?:left|right|displaystyle)|\\[,;:! ]|\\q?quad|~", " "),
    (r"\{,\}", ","),  # 1{,}5: LaTeX's decimal comma
    (r"[−–]", "-"), (r"\\times|\\cdot|[×·]", "*"), (r"\\div|÷", "/"),
    (r"²", "^2"), (r"³", "^3"), (r"π", r"\\pi"), (r"√", r"\\sqrt"),
    (r"\\[dtc]frac", r"\\frac"), (r"\\frac\s*(\d|\\[a-zA-Z]+|[a-zA-Z])", r"\\frac{\1}"),  # \dfrac, \frac12 -> \frac{1}2
    (r"\\sqrt\s*(\d+|[a-zA-Z](?![a-zA-Z]))", r"\\sqrt{\1}"),  # \sqrt3
    (rf"\\(?!sqrt)({_FUNCTION_NAMES})(?![a-zA-Z])", r" \1 "),  # \sin x\cos x -> sin x cos x; \sqrt below
]
_SPACED_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:[ \u00a0\u2009\u202f]\d{3})+(?!\d)")  # 1 000 000
# 6 apples, 16\pi cm^2; words of two letters or more, so "2x + y" keeps its y and "16 pi" its pi
_TRAILING_WORDS = re.compile(rf"(?:\s+(?!(?:pi|{_FUNCTION_NAMES})\b)[a-zA-Z]{{2,}}(?:\^\{{?[23]\}}?)?)+\s*$")
_GLUED_UNIT = re.compile(r"(?<=\d)\s*(?:cm|mm|km|units?)(?:\^\{?[23]\}?)?$")  # 5cm
_INNERMOST = [  # LaTeX groups without braces inside, so nested ones are rewritten inside out
    (re.compile(r"\\frac\{([^{}]*)\}\{([^{}]*)\}"), r"((\1)/(\2))"),
    (re.compile(r"\\frac\{([^{}]*)\}\s*(pi(?![a-zA-Z])|\d|[a-zA-Z])"), r"((\1)/(\2))"),  # \frac{3}4
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
    if re.search(r"\bor\b.*=", s, re.I):  # x = 6 or x = 7 names two values: not one answer
        return None
    s = s.split("=")[-1].strip()  # x = 4.5: the right-hand side is the answer
    s = _NUMBER_WORD.sub(lambda m: str(_NUMBER_WORDS[m.group(1).lower()]), s)
    s = _COMMA_NUMBER.sub(_uncomma, s)
    s = _SPACED_THOUSANDS.sub(lambda m: re.sub(r"\D", "", m.group()), s)
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
    s = _apply_functions(s) if len(s) <= MAX_MATH_CHARS else None
    if not s or len(s) > MAX_MATH_CHARS or not _MATH_CHARS.fullmatch(s):
        return None  # an unknown LaTeX command, a comma list, an unclosed \frac{1}{ ...
    if any(len(name) > 1 and name not in _FUNCTIONS and name != "pi" for name in re.findall(r"[a-zA-Z]+", s)):
        return None  # words are text, not products of single-letter variables
    return s


# The argument of a function written without parentheses: numbers, single letters and pi, with powers,
# up to an operator or the next function: \sin 2x -> sin(2x), \sin x \cos x -> sin(x) cos(x).
_BARE_ARGUMENT = re.compile(r"(?:\s*(?:pi(?![a-zA-Z])|\d+(?:\.\d+)?|[a-zA-Z](?![a-zA-Z]))"
                            r"(?:\s*\*\*\s*(?:\d+|[a-zA-Z](?![a-zA-Z])|\([^()]*\)))?)+")
_POWER = re.compile(r"\s*\*\*\s*(\d+|\([^()]*\))")
_BASE = re.compile(r"\s*_\s*(\d+|[a-zA-Z]|\([^()]*\))")  # log_2, log_(10) (from log_{10})


def _group_end(s: str, i: int) -> int:
    """Index just past the parenthesis group opening at s[i], or -1 when unclosed."""
    depth = 0
    for j in range(i, len(s)):
        depth += {"(": 1, ")": -1}.get(s[j], 0)
        if depth == 0:
            return j + 1
    return -1


def _apply_functions(s: str, depth: int = 0) -> str | None:
    """Function notation -> calls parse_expr reads: sin**2 x -> (sin(x))**2, sin**(-1)(1) -> (asin(1)),
    log_2 8 -> (log(8)/log(2)), ln -> log. None when a function has no argument or nesting is deep."""
    out, i = [], 0
    while (m := _FUNCTION.search(s, i)) is not None:
        if depth > 8:
            return None
        out.append(s[i:m.start()])
        name, j = _SPELLED.get(m.group(1), m.group(1)), m.end()
        base = _BASE.match(s, j) if name == "log" else None
        j = base.end() if base else j
        power = _POWER.match(s, j)
        j = power.end() if power else j
        while j < len(s) and s[j] == " ":
            j += 1
        if s.startswith("(", j):
            end = _group_end(s, j)
            argument = _apply_functions(s[j + 1:end - 1], depth + 1) if end != -1 else None
        else:
            bare = _BARE_ARGUMENT.match(s, j)
            end = bare.end() if bare else -1
            argument = bare.group() if bare else None
        if not argument or not argument.strip():
            return None
        exponent = power.group(1) if power else None
        if exponent in ("(-1)", "(- 1)") and name in ("sin", "cos", "tan"):  # \sin^{-1}: the inverse
            name, exponent = "a" + name, None
        call = f"({name}({argument})/log({base.group(1)}))" if base else f"{name}({argument})"
        out.append(f" ({call})**{exponent} " if exponent else f" {call} ")
        i = end
    return "".join(out) + s[i:]


def to_sympy(answer: str) -> sympy.Expr | None:
    """The answer as an unevaluated sympy expression, or None when it is not mathematics."""
    s = _math_text(answer)
    return None if s is None else _parse(s)


@functools.lru_cache(maxsize=4096)  # gold answers and options recur across a group: parse them once
def _parse(s: str) -> sympy.Expr | None:
    # Every single letter is a plain symbol, so E, I, N, S are not sympy's constants and functions;
    # but e is Euler's number, as in e^{2x} and \ln e.
    names = {c: sympy.Symbol(c) for c in set(re.findall(r"(?<![a-zA-Z])[a-zA-Z](?![a-zA-Z])", s))}
    names.update(pi=sympy.pi, e=sympy.E, **_FUNCTIONS)
    try:
        expr = parse_expr(s, local_dict=names, transformations=_TRANSFORMS, evaluate=False)
    except Exception:  # SyntaxError, TokenError, too many nested parentheses, ...
        return None
    return expr if isinstance(expr, sympy.Expr) else None

# ---------------------------------------------------------------- single values: equality

_CMATH = {sympy.sin: cmath.sin, sympy.cos: cmath.cos, sympy.tan: cmath.tan, sympy.asin: cmath.asin,
          sympy.acos: cmath.acos, sympy.atan: cmath.atan, sympy.sinh: cmath.sinh, sympy.cosh: cmath.cosh,
          sympy.tanh: cmath.tanh, sympy.log: cmath.log, sympy.exp: cmath.exp,
          sympy.sec: lambda z: 1 / cmath.cos(z), sympy.csc: lambda z: 1 / cmath.sin(z),
          sympy.cot: lambda z: 1 / cmath.tan(z)}


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
    elif expr.func in _CMATH and len(expr.args) == 1:
        value = _CMATH[expr.func](_evaluate(expr.args[0], point))
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


# ---------------------------------------------------------------- gold answers


def unverifiable_reason(solution: str, problem: str | None = None) -> str | None:
    """None when `verify` can judge this gold answer, else a short reason. At data-load time such
    rows are dropped: no completion could ever earn the accuracy reward on them, so each of their
    groups would spend G generations on a reward that is 0 for all, and no signal."""
    if not isinstance(solution, str):
        return f"the solution is {type(solution).__name__}, not text"
    if not _clean(final_answer(solution)[0]):  # as verify reads it
        return "no answer in the solution"
    if not verify(solution, solution, problem):
        return "the answer does not verify against itself"
    return None
