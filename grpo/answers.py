"""Answers: what a completion's final answer is, and whether it is the gold answer (`verify`).

`verify(prediction, gold, question)` is the accuracy reward's judge and eval.py's; it never raises.
  extracted here   the final answer (`final_answer`: the last <answer> block, else the last \\boxed{}, else
                   what the free text states), an option letter, the gold (`read_gold`, once per group).
  compared here    what benchmark conventions decide: option letters and texts; text; a structure's shape
                   in the gold's notation (tuples are ordered, sets and bare lists are not, [1,3) is not
                   (1,3), items parted by commas, semicolons or "and"); numbers with units, degrees,
                   percent, currency, decimal commas and thousands (1,22 is 1.22, 11,\\!111 is 11111); a
                   precision the question states.
  math-verify      (Hugging Face's; grpo/math_verify_worker.py bounds its time) the rest: expressions,
                   identities, relations, an inequality against the gold's interval, equations as
                   equations ("0" is not the answer "a + 3z = 0"), matrix products, \\approx chains.
Traps avoided: judging the reasoning (only the final answer counts); comparing strings (4.5, 9/2 and
\\frac{9}{2} are one answer); rewarding several options ("A or B") or a hedge ("x = 6 or x = 7"); reading
the article in "A square" as option A; handing words to math-verify, whose symbols make "lube" equal
"blue"; hangs (texts over MAX_RAW_CHARS are compared as text, structures stop at MAX_ITEMS items and
MAX_NESTING levels, math-verify gets VERIFY_SECONDS a call and is stopped there).
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

from . import math_verify_worker

MAX_RAW_CHARS = 300   # answers longer than this are compared as text only
MAX_ITEMS = 64        # elements of a tuple, set or matrix compared one by one; more are compared as text
MAX_NESTING = 4       # tuples of tuples ...: deeper structures are compared as text
REL_TOL = 1e-6        # numeric equality: relative, so 4.5 == 4.5000001 but 4.5 != 4.6
VERIFY_SECONDS = 1.0  # math-verify's share of one verify call, all its questions together

# ---------------------------------------------------------------- the final answer

def _box_at(text: str, start: int) -> tuple[str, int] | None:
    """(content, end) of the \\boxed{...} starting at `start`, nested braces included; None when unclosed."""
    i = start + len("\\boxed")
    if not text.startswith("{", i):
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j], j + 1
    return None


# What may part boxes that state one answer together: \boxed{-2} \quad \text{and} \quad \boxed{1}
_BOX_GAP = re.compile(r"(?:\s|[,;$]|\\[,;:! ()]|\\q?quad|\\text\{\s*(?:and|,)?\s*\}|\band\b)*")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, nested braces included, with the boxes right before it that only
    separators part (\\boxed{1}, \\boxed{2} -> "1, 2"); None when absent or unclosed."""
    found, start = [], len(text)  # the last box is also the innermost of \boxed{\boxed{..}}
    while len(found) < MAX_ITEMS and (before := text.rfind("\\boxed", 0, start)) != -1:
        box = _box_at(text, before)
        if box is None or found and (box[1] > start or not _BOX_GAP.fullmatch(text, box[1], start)):
            break
        found, start = found + [box[0]], before
    return ", ".join(reversed(found)) if found else None


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
_WORDS = re.compile(r"(?:an?\s+|the\s+)?[A-Za-z]+(?:\s+[A-Za-z]+){0,2}")  # "a square", "dark blue"


# What a completion may end with after its answer: a chat template's next turn, a prompt's closing formula
_CLOSING = re.compile(r"(?:\s*(?:<\|[a-z_]+\|>\w*|I hope it is correct\.?))+\s*\Z")


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
    math = [m.group(1) or m.group(2) for m in re.finditer(r"\$+([^$]+)\$+|\\\((.+?)\\\)", sentence)]
    if math and _is_value(math[-1].strip()):  # "Therefore $x \\geq 5$ is the solution."
        return math[-1].strip()
    if as_letter(sentence) is not None:
        return _tidy(sentence)
    if candidates and candidates[-1][0] in ("is", "are", "was") and _WORDS.fullmatch(candidates[-1][1]):
        return candidates[-1][1]
    return ""


def final_answer(text: str) -> tuple[str, str]:
    """(the final answer, how it was found), how being one of
        "answer tag"     the last <answer>...</answer> (a \\boxed{} inside it unwrapped)
        "boxed"          the last \\boxed{}, with the boxes listed right before it
        "answer is"      what follows the last "The answer is" / "Answer:" / "the correct option is"
        "whole text"     a text that is itself a value ("6 apples", "x = 1, y = 2", "(B)"), or a short
                         text where nothing below is found either ("A square"), taken as is
        "last sentence"  what the concluding sentence states: the value after is / = / equals / so /
                         therefore ... ("so the probability is 2/3."), its last $...$, or the option it names
        "none"           nothing usable: empty, an empty or unclosed <answer>, only reasoning, or a long
                         text without a stated answer (answer "").
    Only the end counts, and text inside <think> is never read past the tags and the box. verify judges
    final_answer(t)[0] as it judges t, except prose inside a tag: "<answer>so it is 6</answer>" is taken as
    is (as training always has), while "so it is 6" alone reads as 6. Bounded: linear scans of the text."""
    if not isinstance(text, str):
        return "", "none"
    found = _tagged(text)
    if found:
        return found if _clean(found[0]) else ("", "none")
    text = _outside_think(text)
    text = text[:-200] + _CLOSING.sub("", text[-200:])  # on the last characters only: linear on any input
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


def _option_for(answer: str, options: dict[str, str], precision: int | None, deadline: float) -> str | None:
    """The letter whose option text equals the answer ("40" -> B when B is "40°"); None unless exactly one.
    By our rules first; math-verify is asked only when they find no option."""
    for asking in (None, deadline):
        hits = [letter for letter, text in options.items() if text and _equal(answer, text, precision, asking)]
        if hits:
            return hits[0] if len(hits) == 1 else None
    return None

# ---------------------------------------------------------------- verify


@dataclass(frozen=True)
class Gold:
    """A gold answer as `judge` reads it: worked out once for all the G completions of its group."""
    answer: str                   # the gold's final answer (final_answer, cleaned); "" when there is none
    options: dict[str, str] = field(default_factory=dict)  # the question's options, {"A": "30°", ...}
    letter: str | None = None     # the option the gold names, by its letter or by its text
    precision: int | None = None  # decimal places the question asks for ("round to two decimal places")


def read_gold(solution: str, question: str | None = None) -> Gold:
    """The gold answer of `solution`, with the options and stated precision of `question`. Never raises."""
    try:
        answer, options, precision = _clean(final_answer(solution)[0]), parse_options(question), _precision(question)
        letter = as_letter(answer, max(options) if options else "E") if answer else None
        if letter is None and options and answer:  # gold given as an option's text
            letter = _option_for(answer, options, precision, time.monotonic() + VERIFY_SECONDS)
        return Gold(answer, options, letter, precision)
    except Exception:
        return Gold("")


def judge(prediction: str, gold: Gold) -> bool:
    """Is the final answer of `prediction` the answer of `gold` (from read_gold)? Never raises."""
    try:
        answer = final_answer(prediction)[0]
        if not _clean(answer) or not gold.answer:
            return False
        if _clean(answer) == gold.answer:  # the gold's own text, whatever the options
            return True
        deadline = time.monotonic() + VERIFY_SECONDS
        options, precision = gold.options, gold.precision
        letter = as_letter(answer, max(options) if options else "E")
        if gold.letter is not None:
            if letter is None and options:
                letter = _option_for(answer, options, precision, deadline)
            return letter == gold.letter
        if letter is not None:  # gold is not among the options: judge the chosen option's text
            return letter in options and _equal(options[letter], gold.answer, precision, deadline)
        return _equal(answer, gold.answer, precision, deadline)
    except Exception:  # a reward must not crash a training step; an answer we cannot judge is wrong
        return False


def verify(prediction: str, gold: str, question: str | None = None) -> bool:
    """Is the final answer of `prediction` the answer in `gold`? `question` supplies the options of a
    multiple-choice question (an option's text counts as its letter) and a stated precision. Both
    answers are read with `final_answer`, so tagged ones exactly as `extract_answer` reads them."""
    return judge(prediction, read_gold(gold, question))


_PRECISION = re.compile(r"(?:to|with)\s+(\d|one|two|three|four)\s+decimal\s+places?|nearest\s+(tenth|hundredth|"
                        r"thousandth|whole\s+number|integer)", re.I)
_PLACES = {"one": 1, "two": 2, "three": 3, "four": 4, "tenth": 1, "hundredth": 2, "thousandth": 3}


def _precision(question: str | None) -> int | None:
    """Decimal places a question asks for: "round to two decimal places", "to the nearest tenth" (a whole number: 0)."""
    m = _PRECISION.search(question[-2000:]) if question else None
    word = m and (m.group(1) or m.group(2)).lower()
    return None if m is None else int(word) if word.isdigit() else _PLACES.get(word, 0)

# ================================================================ when two answers are equal (private)


def _equal(answer: str, gold: str, precision: int | None, deadline: float | None) -> bool:
    """Our rules (_compare), with math-verify asked where they cannot decide (unless deadline is None)."""
    def ask(a: str, b: str) -> bool:
        return deadline is not None and _sendable(a) and _sendable(b) and math_verify_worker.equal(
            _as_sent(b), _as_sent(a), _is_interval(b), deadline)
    return _compare(answer, gold, precision, ask)


def _sendable(answer: str) -> bool:
    """Mathematics that math-verify can judge in its time; prose and hopeless texts never reach it."""
    return not _prose(answer) and not math_verify_worker.hopeless(_latex(answer), MAX_RAW_CHARS)


def _as_sent(answer: str) -> str:
    """What math-verify reads: a number as we read it (1 000 000 -> 1000000), else the LaTeX, plain-text
    functions and pi as commands (sin(x)^2 -> \\sin(x)^2)."""
    if not _structure(answer) and (number := next(filter(None, map(_number, _values(answer))), None)):
        return str(number[0]) if number[1] else str(Decimal(number[0].numerator) / number[0].denominator)
    s = re.sub(rf"(?<![\\A-Za-z])({_FUNCTION_NAMES}|pi)(?![A-Za-z])", r"\\\1", _latex(answer)).replace("**", "^")
    return re.sub(r"\\sqrt\s*\(([^()]*)\)", r"\\sqrt{\1}", s)


def _compare(a: str, b: str, precision: int | None, ask, depth: int = 0) -> bool:
    """Answer a against gold b: text, structures, infinities and numbers by our rules; any other two
    values (expressions, relations, equations) by ask(a, b)."""
    if _plain(a) == _plain(b):
        return True
    x, y = _structure(a), _structure(b)
    if (x is None) != (y is None) and (x or y)[0] in ("list", "set"):  # 6,8 against 6 and 8: a list, not 6.8
        x, y = x or _structure(a, decimal_comma=False), y or _structure(b, decimal_comma=False)
    if x is not None and y is not None:
        return depth < MAX_NESTING and _same_structure(x, y, ask, depth + 1)
    if x is not None or y is not None:  # a structure against a number never; against a relation or a product, maybe
        other = b if x is not None else a
        return not any(map(_number, _values(other))) and _infinity(other) is None and ask(a, b)
    signs = _infinity(a), _infinity(b)
    if signs != (None, None):
        return signs[0] == signs[1]
    names = _ASSIGNED.match(_clean(a)), _ASSIGNED.match(_clean(b))
    if depth and all(names) and names[0].group(1) != names[1].group(1):  # in a list: x = 2, y = 1 != x = 1, y = 2
        return False
    values_a, values_b = _values(a), _values(b)
    if {_SPACING.sub("", v) for v in values_a} & {_SPACING.sub("", v) for v in values_b}:  # 16\pi cm^2 and 16π
        return True
    numbers_a, numbers_b = [n for n in map(_number, values_a) if n], [n for n in map(_number, values_b) if n]
    if numbers_a and numbers_b:
        return any(_same_number(u, v, precision) for u in numbers_a for v in numbers_b)
    return ask(a, b)


def _plain(answer: str) -> str:
    """Text for a string comparison: lowercase, single spaces, no leading article ("Square." == "square")."""
    text = " ".join(_clean(answer).lower().split())
    return re.sub(r"^(?:a|an|the)\s+", "", text)


# The name in x = 4.5. Alone, x = 4.5 == y = 4.5 (a naming choice); items of a list must agree on names.
_ASSIGNED = re.compile(r"([A-Za-z]{1,3}(?:_\{?\w+\}?)?)\s*=(?!=)")


def _same_number(x: tuple[Fraction, bool], y: tuple[Fraction, bool], precision: int | None) -> bool:
    """Numbers from _number: exact when both are written exactly (1000001 != 1000000), within REL_TOL when
    a decimal is involved, and equal once rounded when the question states a precision."""
    (u, exact_u), (v, exact_v) = x, y
    if u == v or precision is None:
        return u == v or not (exact_u and exact_v) and abs(u - v) <= REL_TOL * max(abs(u), abs(v))
    step = Decimal(1).scaleb(-precision)
    u, v = (Decimal(w.numerator) / Decimal(w.denominator) for w in (u, v))
    return u.quantize(step, ROUND_HALF_UP) == v.quantize(step, ROUND_HALF_UP)


# Words that are mathematics: function names, pi, "and" between items. Any other word makes prose.
_MATH_WORDS = {"sin", "cos", "tan", "sec", "csc", "cot", "asin", "acos", "atan", "sinh", "cosh", "tanh", "log", "ln",
               "exp", "sqrt", "arcsin", "arccos", "arctan", "pi", "and", "mod", "det"}


def _prose(answer: str) -> bool:
    """Words rather than mathematics: "a square", "blue", a hedge ("x = 6 or x = 7"), "xy" (a word here, not
    a product). Prose is compared as text only."""
    s = re.sub(r"\\(?:begin|end)\{[^{}]*\}", " ", _latex(answer))
    words = re.findall(r"(?<![\\A-Za-z])[A-Za-z]{2,}", s)
    return any(w.lower() not in _MATH_WORDS for w in words) or re.search(r"\bor\b", s) is not None

# ---------------------------------------------------------------- structured answers
# A structure: ("seq", open, close, items) for tuples, points and intervals (the point and the open
# interval (1,3) are one text, while [1,3) != (1,3)); ("union", parts); ("set", items) for \{..\};
# ("list", items) for a bare list, equal to a set of the same items; ("matrix", rows). Items stay text,
# compared by _compare. Separators: semicolons where there are any ((1,5; 2) is (1.5, 2)), else commas,
# always inside brackets ((1,22) is a pair). In a bare answer digits,digits is a number: thousands when the
# groups after the first have three digits and the first does not start with 0 (1,000,000), else, as its
# only comma, a decimal comma (1,22 = 1.22); other commas, or "and", make a list (-10,-8,4; 12 and 13).

_MATRIX = re.compile(r"[(\[]?\s*\\begin\{([pbB]?matrix|smallmatrix|array)\}(?:\{[lcr|\s]*\})?((?:(?!\\begin|\\end).)*)"
                     r"\\end\{\1\}\s*[)\]]?", re.S)
_UNION = re.compile(r"\\cup|∪|(?<=[)\]])\s*U\s*(?=[(\[])")
# x \in [1,3), S = \{1\}, (x, y) = (1, 2): the name goes
_NAMED = re.compile(r"^(?:[A-Za-z]\w*|\\[A-Za-z]+|\([A-Za-z\s,]+\))\s*(?:=|\\in\b|∈)\s*(?=[(\[{\\])")
_COMMA_NUMBER = re.compile(r"(?<![\d.,])(\d+)((?:,\d+)+)(\.\d+)?(?![\d,])")
_INFINITY = re.compile(r"([+-]?)\s*(?:\\infty|∞|oo|inf|infinity)", re.I)


def _uncomma(m: re.Match, decimal: bool = True) -> str:
    """1,000,000 -> 1000000 and 1,22 -> 1.22 (see the rule above); anything else unchanged."""
    first, groups, decimals = m.group(1), m.group(2).split(",")[1:], m.group(3) or ""
    if re.fullmatch(r"[1-9]\d{0,2}", first) and all(len(g) == 3 for g in groups):
        return first + "".join(groups) + decimals
    return f"{first}.{groups[0]}" if decimal and len(groups) == 1 and not decimals else m.group()


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
    semicolons = _split_top(inner, ";")
    items = semicolons if semicolons is not None and len(semicolons) > 1 else _split_top(inner, ",")
    return None if items is None or len(items) > MAX_ITEMS else tuple(item.strip() for item in items)


@functools.lru_cache(maxsize=4096)
def _structure(answer: str, decimal_comma: bool = True) -> tuple | None:
    """The answer as a structure (see above), or None for a single value or text."""
    s = _latex(answer)
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
    # 1, 2, 3 or x = 1, y = 2 or 12 and 13 or -12; -11; not prose with commas
    s = _COMMA_NUMBER.sub(functools.partial(_uncomma, decimal=decimal_comma and s.count(",") == 1), s)  # -10,-8,4
    items = _items(re.sub(r"\s+and\s+", ";" if ";" in s else ",", s))
    if items is None or len(items) < 2 or not all(items) or not all(_is_math(item) for item in items):
        return None
    return ("list", items)


def _same_structure(x: tuple, y: tuple, ask, depth: int) -> bool:
    """Same kind and shape; items equal in order (tuples, intervals, matrices) or as sets."""
    if x[0] != y[0] and {x[0], y[0]} != {"set", "list"}:  # \{1, 2\} == 2, 1
        return False
    if x[0] == "seq":
        return x[1:3] == y[1:3] and len(x[3]) == len(y[3]) and all(
            _compare(a, b, None, ask, depth) for a, b in zip(x[3], y[3]))
    if x[0] == "matrix":
        return [len(row) for row in x[1]] == [len(row) for row in y[1]] and all(
            _compare(a, b, None, ask, depth) for row_x, row_y in zip(x[1], y[1]) for a, b in zip(row_x, row_y))
    same = (lambda a, b: _same_structure(a, b, ask, depth)) if x[0] == "union" else (
        lambda a, b: _compare(a, b, None, ask, depth))
    return (all(any(same(a, b) for b in y[1]) for a in x[1])
            and all(any(same(a, b) for a in x[1]) for b in y[1]))


def _is_interval(answer: str) -> bool:
    """Is the answer an interval by its notation alone: a union, a half-open or closed bracket, an infinite
    end? (1, 2) is not: a pair or an open interval. math-verify may then match an inequality against it."""
    x = _structure(answer)
    return x is not None and (x[0] == "union" or x[0] == "seq" and len(x[3]) == 2 and (
        "[" in x[1] or "]" in x[2] or any(_infinity(item) is not None for item in x[3])))


def _infinity(answer: str) -> int | None:
    """+1 for \\infty, oo, +∞, -1 for -\\infty, -oo; None for anything else."""
    m = _INFINITY.fullmatch(_clean(answer).replace("−", "-"))
    return None if m is None else -1 if m.group(1) == "-" else 1

# ---------------------------------------------------------------- single values

_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
_NUMBER_WORDS.update({w: 10 * i for i, w in enumerate("thirty forty fifty sixty seventy eighty ninety".split(), 3)})
_NUMBER_WORD = re.compile(rf"^({'|'.join(_NUMBER_WORDS)})(?![a-z])", re.I)
_UNICODE = str.maketrans({"π": "\\pi ", "√": "\\sqrt ", "×": "\\times ", "·": "\\cdot ", "÷": "\\div ", "−": "-",
                          "–": "-", "²": "^2", "³": "^3", "°": "^\\circ "})
_FUNCTION_NAMES = "arcsin|arccos|arctan|asin|acos|atan|sinh|cosh|tanh|sin|cos|tan|sec|csc|cot|log|ln|exp|sqrt"
# 6 apples, 16\pi cm^2; words of two letters or more, so "2x + y" keeps its y and "16 pi" its pi
_TRAILING_WORDS = re.compile(rf"(?:\s+(?!(?:pi|{_FUNCTION_NAMES})\b)[a-zA-Z]{{2,}}(?:\^\{{?[23]\}}?)?)+\s*$")
_GLUED_UNIT = re.compile(r"(?<=\d)\s*(?:(?:cm|mm|km|kg|mg|ml|mL|min|units?)(?:\^\{?[23]\}?)?|m\^[23])$")  # 5cm, 3m²
_NAME = re.compile(r"\s*(?:[A-Za-z]{1,3}|\\[a-zA-Z]+)(?:_\{?\w+\}?)?\s*")  # the left-hand side of x = 4.5, AB = 5, a_3 = 2
_EQUALS = r"(?<![<>!\\])=(?!=)"
_SPACING = re.compile(r"\\(?:left|right|displaystyle|[,;:! ]|q?quad)|\s|~")  # "16 \pi" == "16\pi"
_RELATION = re.compile(rf"<=|>=|!=|\\(?:leq?|geq?|neq?|lt|gt|leqslant|geqslant)(?![a-zA-Z])|[<>≤≥≠]|{_EQUALS}")


@functools.lru_cache(maxsize=4096)
def _latex(answer: str) -> str:
    """The answer as LaTeX, for our readings and for math-verify: _clean's, with Unicode signs as LaTeX,
    double escapes undone (\\\\frac -> \\frac), LaTeX spacing inside numbers gone (11,\\!111), and currency
    signs and the units or words after a number dropped ("6 apples", "16\\pi cm^2", "5cm", "3 €")."""
    s = _clean(answer).translate(_UNICODE)
    if len(s) > MAX_RAW_CHARS:
        return s
    if "\\\\" in s and not re.search(r"(?<!\\)\\[A-Za-z]", s):  # escaped twice throughout: \\frac{1}{2}
        s = s.replace("\\\\", "\\")
    s = re.sub(r"(?<=\d),\s*\\[!,]\s*(?=\d)|(?<=\d)\{,\}(?=\d)", ",", re.sub(r"\\[dtc]frac", r"\\frac", s))
    s = re.sub(r"(\\frac\{[^{}]*\})\s*(\\[a-zA-Z]+|\d|[a-zA-Z])", r"\1{\2}",  # \frac\pi2 -> \frac{\pi}{2}
               re.sub(r"\\frac\s*(\\[a-zA-Z]+|\d|[a-zA-Z])", r"\\frac{\1}", s))
    s = _NUMBER_WORD.sub(lambda m: str(_NUMBER_WORDS[m.group(1).lower()]), s)  # six, "Six apples"
    s = re.sub(r"[€£¥]|\\euro\b", "", s).strip()
    words = _TRAILING_WORDS.search(s)
    if words and re.search(r"\d", s[:words.start()]):  # units and words after a number; not "A square"
        s = s[:words.start()]
    return _GLUED_UNIT.sub("", s).strip()


@functools.lru_cache(maxsize=4096)
def _values(answer: str) -> tuple[str, ...]:
    """The value(s) a single-value answer states, in LaTeX; () for structures, prose, hedges, relations
    and equations. "x = 4.5" states 4.5 and "3^2 + 4^2 = 25" states 25, but "a + 3z = 0" states no value:
    an equation is judged as one, by math-verify. A chain with \\approx states its last exact member and
    its approximation ("x = 1/3 \\approx 0.33")."""
    s = _latex(answer)
    if len(s) > MAX_RAW_CHARS or _prose(answer) or _structure(answer) is not None:
        return ()
    members = [m.strip() for m in re.split(rf"{_EQUALS}|\\approx|≈", s)]
    named = int(len(members) > 1 and _NAME.fullmatch(members[0]) is not None)
    values = members[named:]
    if not all(map(_is_value_text, values)) or not named and len(members) > 1 and any(map(_unknowns, values)):
        return ()
    exact = len(re.split(_EQUALS, re.split(r"\\approx|≈", s)[0])) - 1 - named  # the member before any \approx
    return tuple(dict.fromkeys([values[-1]] + ([values[exact]] if exact >= 0 else [])))


def _is_value_text(s: str) -> bool:
    """One value, as far as a cheap look tells: brackets balance, no relation or list separator, no operator dangling."""
    s = _COMMA_NUMBER.sub(_uncomma, re.sub(r"\\[,;:! ]", " ", s))
    return bool(s) and _split_top(s, "\0") is not None and not re.search(
        rf"[,;<>≤≥≠?\"]|\\(?:leq?|geq?|neq?|lt|gt|in)(?![a-zA-Z])|^[*/^]|[-+*/^_]$", s)


def _unknowns(value: str) -> bool:
    """Does a value have letters that are variables (not commands, functions or pi)?"""
    return re.search(r"[a-zA-Z]", re.sub(rf"\\[a-zA-Z]+|\b(?:pi|{_FUNCTION_NAMES})\b", "", value)) is not None


_SPACED_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:(?:[ \u00a0\u2009\u202f]|\\[, ])\d{3})+(?!\d)")  # 1 000, 1\,000
_D = r"-?(?:\d+\.?\d*|\.\d+)"
_FRACTION = re.compile(rf"\\frac\{{({_D})\}}\{{({_D})\}}|\\frac(\d)(\d)|\\frac\{{({_D})\}}(\d)|\\frac(\d)\{{({_D})\}}"
                       rf"|\(?({_D})\)?/\(?({_D})\)?|({_D})")


def _number(value: str) -> tuple[Fraction, bool] | None:
    """(value, written exactly) of a number or a fraction of two numbers, its degrees, percent and
    separators aside: "4.5" -> (9/2, False), "\\frac{9}{2}" -> (9/2, True), "1 000" -> (1000, True)."""
    s = _SPACED_THOUSANDS.sub(lambda m: re.sub(r"\D", "", m.group()), value.strip())
    s = _COMMA_NUMBER.sub(_uncomma, s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|\\?%|\\left|\\right|\\[,;:! ]|\s", "", s)
    sign = 1
    for _ in range(4):  # -(9/2), (-\frac{9}{2})
        if s.startswith("-"):
            sign, s = -sign, s[1:]
        elif s[:1] in "({" and _wrapped(s):
            s = s[1:-1]
    m = _FRACTION.fullmatch(s)
    if m is None:
        return None
    top, bottom = [Fraction(g) for g in m.groups() if g is not None] + [Fraction(1)] * (m.group(11) is not None)
    return (sign * top / bottom, "." not in s) if bottom else None


def _is_math(text: str) -> bool:
    """A value, infinity or structure, or a relation between values (a + 3z = 0, x \\geq 5); x = 4.5 and
    AB = 5 are values, "Therefore, x = 4.5" is not."""
    if _values(text) or _infinity(text) is not None or _structure(text) is not None:
        return True
    members = _RELATION.split(_latex(text))
    return 1 < len(members) <= 8 and not _prose(text) and all(_NAME.fullmatch(m) or _is_value_text(m) for m in members)


def value_kind(answer: str) -> str | None:
    """"number" for one numeric literal, units, degrees, percent and separators aside (12, -3, 4.5, 1,000,
    40°), "expression" for any other single value (9/2, \\frac{1}{2}, 2x, \\pi), None for the rest."""
    values = _values(answer)
    literal = len(values) == 1 and "/" not in values[0] and "frac" not in values[0] and _number(values[0])
    return "number" if literal else "expression" if values else None

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
