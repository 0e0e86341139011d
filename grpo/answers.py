"""Answers: what a completion's final answer is, and whether it is the gold's (`verify`, which never raises).

By hand: the final answer (`final_answer`: the last <answer> block, else the last \\boxed{}, else what the free
text states; never the reasoning, [judging the reasoning]), options (a letter or an option's text), the gold once
per group (`read_gold`), and what benchmarks decide: Unicode mathematics as LaTeX (3√2, x², ½), a yes or no with
its reason, a name before a value (Q(-1, 4), x = 5), numbers by value (4.5 = 9/2, 40° = 40, 6 apples = 6) to a
stated precision, thousands and decimal commas as the gold's notation says, brackets (\\{1, 2\\} is not (1, 2)),
an equation gold matched only by an equation. Words never reach math-verify (Hugging Face's), whose symbols make
"lube" equal "blue"; it judges the rest in a forked worker, VERIFY_SECONDS per call; an overrun is wrong (`timeouts()`).
"""

import atexit
import contextlib
import functools
import gc
import itertools
import logging
import math
import os
import re
import signal
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from multiprocessing.connection import Connection, Pipe

import math_verify

MAX_RAW_CHARS = 300   # answers longer than this are compared as text only
REL_TOL = 1e-6        # numbers with a decimal point: relative, so 4.5 == 4.5000001 but 4.5 != 4.6
VERIFY_SECONDS = 1.0  # math-verify's share of one verify call, all its questions together

# ---------------------------------------------------------------- the final answer

# What may part boxes that state one answer together: \boxed{-2} \quad \text{and} \quad \boxed{1}
_BOX_GAP = re.compile(r"(?:\s|[,;$]|\\[,;:! ()]|\\q?quad|\\text\{\s*(?:and|,)?\s*\}|\band\b)*")


def _last_boxed(text: str) -> str | None:
    """The last \\boxed{...} (of \\boxed{\\boxed{6}}, 6) with the boxes before it that only separators part
    (\\boxed{1}, \\boxed{2} -> "1, 2"); None when absent or unclosed. Linear: rfind and a brace count."""
    found, start = [], len(text)
    while len(found) < 64 and (before := text.rfind("\\boxed", 0, start)) != -1:
        i = before + len("\\boxed")
        depths = itertools.accumulate((c == "{") - (c == "}") for c in (text[i:] if text.startswith("{", i) else ""))
        end = next((i + j + 1 for j, depth in enumerate(depths) if depth == 0), None)
        if end is None or found and (end > start or not _BOX_GAP.fullmatch(text, end, start)):
            break
        found, start = found + [text[i + 1:end - 1]], before
    return ", ".join(reversed(found)) if found else None


def _tagged(text: str) -> tuple[str, str] | None:
    """(answer, "answer tag" | "boxed"): the last <answer> block (its \\boxed{} unwrapped), else the last \\boxed{}."""
    if (end := text.rfind("</answer>")) != -1:
        inner = "" if (start := text.rfind("<answer>", 0, end)) == -1 else text[start + len("<answer>"):end]
        return (boxed if (boxed := _last_boxed(inner)) is not None else inner).strip(), "answer tag"
    return None if (boxed := _last_boxed(text)) is None else (boxed.strip(), "boxed")


def extract_answer(text: str) -> str:
    """Training's view of a completion: the last <answer> block, else the last \\boxed{}, else the text."""
    return found[0] if (found := _tagged(text)) else text.strip()


# "The answer is (B)", "Answer: 12", "the final answer is $x=3$", "the correct option would be C"
_ANSWER_PHRASE = re.compile(r"\b(?:answer|option|choice)\**(?:\s+(?:is|would\s+be|should\s+be|will\s+be)\s*:?|\s*:)"
                            r"\**\s*(?:(?:therefore|thus|hence|then|clearly|simply)\b)?[\s:]*", re.I)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")
_CUE = re.compile(r"\b(?:is|are|was|equals?(?:\s+to)?|so|therefore|thus|hence|gives|get|gets)\b"  # not <=, >=, !=
                  r"|(?<=\bit)['’]s\b|(?<=\bthat)['’]s\b|(?<![<>!=])=|\\approx|≈", re.I)  # it's 6
_CLAUSE = re.compile(r"\s(?:because|since|as|which|but|when|where)\b", re.I)  # "6 which is even": 6
_WORDS = re.compile(r"(?:an?\s+|the\s+)?[A-Za-z]+(?:\s+[A-Za-z]+){0,2}")  # "a square", "dark blue"
_CLOSING = re.compile(r"(?:\s*(?:<\|[a-z_]+\|>\w*|I hope it is correct\.?))+\s*\Z")  # a template's next turn


def _tidy(candidate: str) -> str:
    """Without the markdown, $ and punctuation around it: "**$x=3$**." -> "x=3"."""
    return candidate.strip().strip("*$").strip().rstrip(".,;:!").strip().strip("*$").strip()


def _is_value(text: str) -> bool:
    """An answer by itself: an option letter, or short mathematics, no prose, brackets balanced, nothing dangling."""
    return bool(text) and as_letter(text, "Z") is not None or 0 < len(s := _latex(text)) <= MAX_RAW_CHARS and not \
        _prose(text) and _items(s) is not None and not re.search(r"[?\"]|^[*/^=,;<>]|[-+*/^_=<>,;:\\]$", s)


def _concluding_value(text: str) -> str:
    """What the last sentence states: itself if a value; else the value after a cue ("so it is 2/3"), its last $...$,
    the option it opens with ("(B) is correct") or a few words after is/are/was/so ("so yes"), read up to a clause
    after its first cue, then whole ("the number is not 10 which is 1,000.99€"); "" for none or a hedge ("or")."""
    sentences = [s for s in _SENTENCE_END.split(text[-4 * MAX_RAW_CHARS:]) if re.search(r"[0-9A-Za-z]", s)]
    if _is_value(_tidy(sentence := sentences[-1] if sentences else "")):
        return _tidy(sentence)
    cues = list(_CUE.finditer(sentence))
    clause = _CLAUSE.search(sentence, cues[0].end()) if cues else None
    for part in ([sentence[:clause.start()]] if clause else []) + [sentence]:
        stated = [cue for cue in cues if cue.end() <= len(part)]
        if stated and re.search(r"\bor\b", part[stated[0].end():], re.I):
            return ""
        candidates = [(cue.group().lower(), _tidy(part[cue.end():])) for cue in stated[-8:]]  # bounded work
        math = [m.group(1) or m.group(2) for m in re.finditer(r"\$+([^$]+)\$+|\\\((.+?)\\\)", part)]
        for candidate in [c for _, c in candidates] + [m.strip() for m in math[-1:]]:  # "Then $x \\geq 5$ holds"
            if _is_value(candidate):
                return candidate
        if as_letter(part) is not None:
            return _tidy(part)
        cue, words = candidates[-1] if candidates else ("", "")
        if cue in ("is", "are", "was", "so", "therefore", "thus", "hence") and _WORDS.fullmatch(words):
            return words
    return ""


def final_answer(text: str, yes_no: bool = False) -> tuple[str, str]:
    """(the final answer, how it was found): "answer tag" (the last <answer> block), "boxed" (the last \\boxed{}
    and boxes listed before it), "yes or no" (with `yes_no`: the text, or its last sentence, opening with one),
    "answer is" (after the last "The answer is" / "Answer:"), "whole text" (a value, or a short text stating nothing
    else), "last sentence" (_concluding_value), or "none" with "" (nothing, only in <think>, or an unclosed
    <answer>). verify judges final_answer(t)[0] as t; "<answer>so it is 6</answer>" is taken as is."""
    if not isinstance(text, str):
        return "", "none"
    if found := _tagged(text):
        return found if _clean(found[0]) else ("", "none")
    text = (text[text.rfind("</think>") + len("</think>"):] if "</think>" in text else text).split("<think>")[0]
    text = text[:-200] + _CLOSING.sub("", text[-200:])  # on the last characters only: linear on any input
    if "<answer>" in text:  # an answer cut off before </answer> (a length limit) is not judged
        return "", "none"
    for said in [text, re.split(r"[.!?]\s+|\n", text[-4 * MAX_RAW_CHARS:].strip())[-1]] if yes_no else []:
        if _OPENS.match(said):  # the whole text first, so that "No. Yes, it is" is read whole
            return said.strip(), "yes or no"
    if phrases := list(_ANSWER_PHRASE.finditer(text)):  # to the end of its sentence or a clause ("6, since ...")
        rest = text[phrases[-1].end():phrases[-1].end() + MAX_RAW_CHARS]
        rest = rest[:end.start()] if (end := _SENTENCE_END.search(rest)) else rest
        answer = _tidy(rest[:clause.start()] if (clause := _CLAUSE.search(rest)) else rest)
        if _clean(answer) and (_is_value(answer) or _WORDS.fullmatch(answer) or _LETTER.match(answer)):
            return answer, "answer is"  # an option, a value or a few words; not "we count them"
    if _is_value(whole := text.strip()):
        return whole, "whole text"
    if _clean(answer := _concluding_value(text)):
        return answer, "last sentence"
    return (whole, "whole text") if _clean(whole) and len(whole) <= MAX_RAW_CHARS else ("", "none")


def _clean(answer: str) -> str:
    """Without what carries no meaning: \\text{} wrappers, $ and \\( \\) delimiters, "The answer is", a period."""
    for _ in range(3):  # \text{\textbf{B}}
        answer = re.sub(r"\\(?:text|textnormal|textrm|textbf|textit|mathrm|mathbf|mathit|operatorname|mbox)\s*"
                        r"\{([^{}]*)\}", r"\1", answer)
    answer = re.sub(r"^(?:the\s+)?(?:final\s+|correct\s+)?answer\b(?:\s+is\b|\s*:)?", "",
                    re.sub(r"\\?\$|\\[()\[\]]", "", answer).strip(), flags=re.I)
    return answer.strip().rstrip(".").strip()

# ---------------------------------------------------------------- multiple choice

# B, (B), B., B), B: 40°, Option B, option (B); a bare letter ends the answer or is followed by . : ) (not "A square")
_LETTER = re.compile(r"(?:(?i:option|choice)\s*)?(?:\(([A-Z])\)|([A-Z])(?:[.)]|:(?![A-Z])|$))")  # A:B is a ratio
_SEVERAL = re.compile(r"\s*(?:,|/|&|and\b|or\b)", re.I)  # "(A) or (B)", "A) and C)"
_OPTION_MARK = re.compile(r"(?<![A-Za-z0-9])(?:\(([A-Z])\)|([A-Z])[.:)])")


def as_letter(answer: str, last_letter: str = "E") -> str | None:
    """The option letter an answer names, or None (text, a number, or several letters)."""
    m = _LETTER.match(answer := _clean(answer))
    letter = m and (m.group(1) or m.group(2))
    return None if not m or letter > last_letter or _SEVERAL.match(answer, m.end()) else letter


def parse_options(question: str | None) -> dict[str, str]:
    """{"A": "30°", "B": "40°", ...} from options listed in the question, one per line or inline: "A: 30°",
    "(A) 12", "A. square", "A) 12"; the longest run A, B, C, ..., the latest on ties. {} for fewer than two."""
    question = question or ""
    marks = [(m.group(1) or m.group(2), m.start(), m.end()) for m in _OPTION_MARK.finditer(question)][-64:]
    best: list[tuple[str, int, int]] = []
    for i, mark in enumerate(marks):  # the last 64 marks: this search is quadratic
        run = [mark]
        for later in marks[i + 1:] if mark[0] == "A" else []:
            run += [later] if ord(later[0]) == ord(run[-1][0]) + 1 else []
        best = run if mark[0] == "A" and len(run) >= len(best) else best
    ends = [start for _, start, _ in best[1:]] + [len(question)]
    return {} if len(best) < 2 else {letter: question[end:stop].split("\n")[0].strip().rstrip(",;").strip()
                                     for (letter, _, end), stop in zip(best, ends)}


def _option_for(answer: str, options: dict[str, str], precision: int | None, deadline: float) -> str | None:
    """The one option equal to the answer ("40": B when B is "40°"); math-verify asked only if our rules find none."""
    for asking in (None, deadline):
        if hits := [letter for letter, text in options.items() if text and _equal(answer, text, precision, asking)]:
            return hits[0] if len(hits) == 1 else None
    return None

# ---------------------------------------------------------------- verify

_PRECISION = re.compile(r"(?:to|with)\s+(\d|one|two|three|four)\s+decimal\s+places?|nearest\s+(tenth|hundredth|"
                        r"thousandth|whole\s+number|integer)", re.I)  # "to the nearest whole number": 0 places
_PLACES = {"one": 1, "two": 2, "three": 3, "four": 4, "tenth": 1, "hundredth": 2, "thousandth": 3}


@dataclass(frozen=True)
class Gold:
    """A gold answer as `judge` reads it: worked out once for all the G completions of its group."""
    answer: str                   # the gold's final answer (final_answer, cleaned); "" when there is none
    options: dict[str, str] = field(default_factory=dict)  # the question's options, {"A": "30°", ...}
    letter: str | None = None     # the option the gold names, by its letter or by its text
    precision: int | None = None  # decimal places the question asks for ("round to two decimal places")
    yes_no: bool = False          # a yes or no, true or false (its text, or its option's): final_answer(t, yes_no)


def read_gold(solution: str, question: str | None = None) -> Gold:
    """The gold answer of `solution`, with the options and stated precision of `question`. Never raises."""
    try:
        answer, options = _clean(final_answer(solution)[0]), parse_options(question)
        word = (m[1] or m[2]).lower() if (m := _PRECISION.search((question or "")[-2000:])) else None
        precision = None if word is None else int(word) if word.isdigit() else _PLACES.get(word, 0)
        letter = as_letter(answer, max(options) if options else "E") if answer else None
        if letter is None and options and answer:  # gold given as an option's text
            letter = _option_for(answer, options, precision, time.monotonic() + VERIFY_SECONDS)
        yes_no = any(_clean(t).lower() in _OPPOSITE for t in (answer, options.get(letter or "", "")))
        return Gold(answer, options, letter, precision, yes_no)
    except Exception:
        return Gold("")


def judge(prediction: str, gold: Gold) -> bool:
    """Is the final answer of `prediction` the answer of `gold` (from read_gold)? Never raises."""
    try:
        answer = _clean(final_answer(prediction, gold.yes_no)[0])
        if not answer or not gold.answer or answer == gold.answer:  # the gold's own text, whatever the options
            return bool(answer) and answer == gold.answer
        deadline, options = time.monotonic() + VERIFY_SECONDS, gold.options
        letter = as_letter(answer, max(options) if options else "E")
        if gold.letter is not None:  # an option named by its letter or by its text
            return (letter or _option_for(answer, options, gold.precision, deadline)) == gold.letter
        if letter is not None:  # gold is not among the options: judge the chosen option's text
            return letter in options and _equal(options[letter], gold.answer, gold.precision, deadline)
        return _equal(answer, gold.answer, gold.precision, deadline)
    except Exception:  # a reward must not crash a training step; an answer we cannot judge is wrong
        return False


def verify(prediction: str, gold: str, question: str | None = None) -> bool:
    """Is the final answer of `prediction` the answer in `gold`, with the options and precision `question` states?"""
    return judge(prediction, read_gold(gold, question))


def unverifiable_reason(solution: str, problem: str | None = None) -> str | None:
    """None when `verify` can judge this gold, else why not: data loading drops rows no completion could be right on."""
    if not isinstance(solution, str):
        return f"the solution is {type(solution).__name__}, not text"
    if not _clean(final_answer(solution)[0]):  # as verify reads it
        return "no answer in the solution"
    return None if verify(solution, solution, problem) else "the answer does not verify against itself"


def value_kind(answer: str) -> str | None:
    """"number" for one numeric literal (12, -3, 4.5, 1,000, 40°), "expression" for another (9/2, 2x), else None."""
    s = _NAMED.sub("", _latex(answer), count=1)
    return None if not _is_value(answer) or _shape(s) or re.search(rf"{_RELATION}|\\cup\b", s) else \
        "number" if _number(s) and not re.search(r"/|frac", s) else "expression"

# ---------------------------------------------------------------- when two answers are equal

# Unicode mathematics as LaTeX (3√2, 8π, 2·3, x ≤ 5, 30º, θ); superscripts (x², 10⁻³), subscripts (x₁), vulgar fractions
# (½) and full-width forms (（１，２）) from Unicode's decompositions: all of them. Roots then take braced radicands.
_SYMBOLS = {"√": "\\sqrt ", "∛": "\\sqrt[3] ", "∜": "\\sqrt[4] ", "·": " \\cdot ", "⋅": " \\cdot ", "×": " \\times ",
            "÷": " \\div ", "−": "-", "–": "-", "≤": " \\leq ", "⩽": " \\leq ", "≥": " \\geq ", "⩾": " \\geq ",
            "≠": " \\neq ", "≈": " \\approx ", "±": " \\pm ", "∞": "\\infty ", "∪": " \\cup ", "∩": " \\cap ",
            "∈": " \\in ", "∅": "\\emptyset ", "∠": "\\angle ", "°": "^\\circ ", "º": "^\\circ ", "⁄": "/", "′": "'"}
_SYMBOLS |= {c: f"\\{unicodedata.name(c)[19:].lower().replace('lamda', 'lambda')} " for c in "αβγδεζηθικλμνξπρστυφχψω"}
_DECOMPOSED = [(c, unicodedata.decomposition(c).partition(" ")[0]) for block in ((0xA0, 0x2E5), (0x1D2C, 0x1DC0),
               (0x2070, 0x218A), (0xFF01, 0xFF5F)) for c in map(chr, range(*block)) if c not in _SYMBOLS]
_SUPER, _SUB, _WIDE = ({ord(c): unicodedata.normalize("NFKC", c).replace("−", "-") for c, kind in _DECOMPOSED
                        if kind == tag} for tag in ("<super>", "<sub>", "<wide>"))
_VULGAR = {c: Fraction(unicodedata.numeric(c)).limit_denominator(10) for c, kind in _DECOMPOSED if kind == "<fraction>"}
_SUPERS, _SUBS = (f"[{re.escape(''.join(map(chr, table)))}]+" for table in (_SUPER, _SUB))
_TRANSLATION = _WIDE | {ord(c): latex for c, latex in _SYMBOLS.items()}
_ROOT = re.compile(r"(\\sqrt(?:\[[^\[\]]*\])?)\s*(?:\(((?:[^()]|\([^()]*\))*)\)"  # (radicand), one bracket deep inside
                   r"|(\d+(?:\.\d+)?|[A-Za-z]|\\(?!frac)[A-Za-z]+)\s*(\^\{[^{}]*\})?)")  # or a number, letter, command
_NUMBER_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve "
                                            "thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split())}
_NUMBER_WORDS |= {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)}
_FUNCTIONS = "arcsin|arccos|arctan|asin|acos|atan|sinh|cosh|tanh|sin|cos|tan|sec|csc|cot|log|ln|exp|sqrt"
# 6 apples, 16\pi cm^2; words of two letters or more, so "2x + y" keeps its y and "16 pi" its pi
_TRAILING_WORDS = re.compile(rf"(?:\s+(?!(?:pi|{_FUNCTIONS})\b)[a-zA-Z]{{2,}}(?:\^\{{?[23]\}}?)?)+\s*$")
# A unit after a number, \pi or a bracket (5cm, 3 m², 8\pi m^{2}, \sqrt{2} mm), a currency before or after (€5, 2.5€)
_UNIT = re.compile(r"(?:(?<=[\d})])|(?<=\\pi))\s*(?:(?:[kcmd]?m|in|ft)\^\{?[23]\}?|(?:cm|mm|km|kg|mg|ml|mL|min|units?)"
                   r"(?:\^\{?[23]\}?)?|[€£¥₹])$|^[€£¥₹]\s*(?=\d)")
_EQUALS = r"(?<![<>!\\])=(?!=)"
# A name and "=" (x =, AB =, \angle ABC =, f(x) =, x_1 =, A:B =, (x, y) =); a point's name before its coordinates
_NAMED = re.compile(rf"^\s*((?:m\s*)?\\angle\s*\w{{1,3}}|(?:[A-Za-z]{{1,3}}|\\[a-zA-Z]+)(?:_\{{?\w+\}}?|')*"
                    rf"(?:\([^()=]{{1,12}}\))?|[A-Z]{{1,2}}\s*:\s*[A-Z]{{1,2}}|\([A-Za-z\s,]+\))\s*{_EQUALS}\s*")
_POINT = re.compile(r"^\s*(?i:point\s+)?([A-Z](?:_\{?\w+\}?|')*)\s*(?=\()")  # Q(-1, 4), P_1(2, 3), A'(0, 1)
_RELATION = rf"{_EQUALS}|[<>]|\\(?:[lg]eq?|neq?|in)\b"
_SPACING = re.compile(r"\\(?:displaystyle|left|right|[,;:! ]|q?quad)|\s|~")  # "16 \pi" == "16\pi"
_NUMBER = re.compile(r"(-?)(?:(\d+\.?\d*|\.\d+)|\\frac\{(\d+)\}\{(\d+)\}|(\d+)/(\d+))(?:\^\{?\\circ\}?|\\?%|\\degree)?")


@functools.lru_cache(maxsize=4096)
def _latex(answer: str) -> str:
    """The answer as LaTeX that math-verify reads as we mean it: _clean's, Unicode as LaTeX, functions as commands
    (sin(x)^2, pi, sqrt(2)) and roots' radicands braced, \\frac\\pi2 as \\frac{\\pi}{2}, number words as numbers, units
    or words after a value gone ("6 apples", "8π m²"), thousands unseparated (1,000), lists parted by commas."""
    if not (s := _clean(answer)).isascii():  # Unicode mathematics as its LaTeX, in time linear in the text
        s = re.sub(rf"(?<![\d.])(\d*)([{''.join(_VULGAR)}])", lambda m: "\\frac{%d}{%d}" % (  # ½, 2½ = 5/2
            (f := int(m[1] or 0) + _VULGAR[m[2]]).numerator, f.denominator), s.translate(_TRANSLATION))
        s = re.sub(_SUBS, lambda m: "_{" + m[0].translate(_SUB) + "}", re.sub(
            _SUPERS, lambda m: "^{" + m[0].translate(_SUPER) + "}", s))
    if len(s) > MAX_RAW_CHARS:
        return s
    if "\\\\" in s and not re.search(r"(?<!\\)\\[A-Za-z]", s):  # escaped twice throughout: \\frac{1}{2}
        s = s.replace("\\\\", "\\")
    s = re.sub(r"(?<=\d),\s*\\[!,]\s*(?=\d)|(?<=\d)\{,\}(?=\d)", ",", re.sub(r"\\[dtc]frac", r"\\frac", s))
    s = re.sub(r"(\\frac\{[^{}]*\})\s*(\\[a-zA-Z]+|\d|[a-zA-Z])", r"\1{\2}",  # \frac\pi2 -> \frac{\pi}{2}
               re.sub(r"\\frac\s*(\\[a-zA-Z]+|\d|[a-zA-Z])", r"\\frac{\1}", s))
    s = re.sub(rf"^({'|'.join(_NUMBER_WORDS)})(?![a-z])", lambda m: str(_NUMBER_WORDS[m[1].lower()]), s, flags=re.I)
    if (words := _TRAILING_WORDS.search(s)) and re.search(r"\d|\\pi", s[:words.start()]):  # not "A square"
        s = s[:words.start()]
    s = re.sub(r"(?<![\d.])\d{1,3}(?:(?:[ \u00a0\u2009\u202f]|\\[, ])\d{3})+(?!\d)", lambda m: re.sub(r"\D", "", m[0]),
               _UNIT.sub("", s).strip())
    if not re.search(r"[(\[]|\\\{", s):  # 1,000,000 and 12,345 (not 0,125); in brackets a comma parts items
        s = re.sub(r"(?<![\d.,])[1-9]\d{0,2}(?:,\d{3})+(?![\d,])", lambda m: m[0].replace(",", ""), s)
    s = re.sub(r"([+-]?)\s*\b(?:oo|inf|infinity)\b", r"\1\\infty", re.sub(r"(?<!\\)\\[,;:! ]|~", " ", s), flags=re.I)
    s = re.sub(rf"(?<![\\A-Za-z])({_FUNCTIONS}|pi)(?![A-Za-z])", r"\\\1", s.replace("**", "^"))
    s = re.sub(r"(?<=[)\]])\s*U\s*(?=[(\[])", r" \\cup ", s)
    for _ in range(3):  # the outer root first, then one inside it: √(1 + √2)
        s = _ROOT.sub(lambda m: f"{m[1]}{{{m[2] if m[2] is not None else m[3] + (m[4] or '')}}}", s)
    s = re.sub(r"\s+and\s+", "; " if ";" in s else ", ", s)
    return (re.sub(r"(?<=\d),(?=\d)", ".", s).replace(";", ",") if ";" in s else s).strip()


def _prose(answer: str) -> bool:
    """Words, not mathematics: "a square", "blue", "xy" (a word here, not a product), a hedge ("x = 6 or x = 7")."""
    s = re.sub(r"\\(?:begin|end)\{[^{}]*\}(?:\{[lcr|\s]*\})?", " ", _latex(answer))
    s = ", ".join(named[1]) if (named := _labelled(s)) else s  # names are no words: "AB = 5", "Q(-1, 4)"
    words = [w.lower() for w in re.findall(r"(?<![\\A-Za-z])[A-Za-z]{2,}", s)]
    return any(w not in _FUNCTIONS.split("|") + ["pi", "mod", "det"] for w in words)  # "or" too: a hedge


def _items(s: str) -> list[str] | None:
    """s parted at its commas outside brackets; None when they do not balance (any kind closes any: [1,3) does)."""
    depths = list(itertools.accumulate((c in "([{") - (c in ")]}") for c in s))
    if depths and (min(depths) < 0 or depths[-1]):
        return None
    cuts = [i for i, (c, depth) in enumerate(zip(s, depths)) if c == "," and depth == 0]
    return [s[start + 1:end] for start, end in zip([-1] + cuts, cuts + [len(s)])]


def _shape(s: str) -> str | None:
    """"set" for \\{..\\}, {1, 2}, \\emptyset, a bare list (x = 1, y = 2); "seq" for (1, 2), [1, 3); else None."""
    s = _SPACING.sub("", s)
    t = s[1:] if s.startswith("\\{") else s
    if t[:1] in "([{" and t[-1:] in ")]}" and (items := _items(t[1:-1])) is not None:  # one bracket around all
        return "set" if t != s or t[0] == "{" and len(items) > 1 else "seq" if len(items) > 1 and t[0] != "{" else None
    return "set" if len(_items(s) or "") > 1 or s in ("\\emptyset", "\\varnothing") else None


def _number(s: str) -> tuple[Fraction, bool] | None:
    """(value, written exactly) of a number or fraction, a name, degrees, percent aside ("x = 4.5", "40^\\circ")."""
    if (m := _NUMBER.fullmatch(_SPACING.sub("", _NAMED.sub("", s, count=1)))) is None or int(m[4] or m[6] or 1) == 0:
        return None
    value = Fraction(m[2]) if m[2] else Fraction(int(m[3] or m[5]), int(m[4] or m[6]))
    return -value if m[1] else value, "." not in m[0]


def _labelled(s: str) -> tuple[list[str], list[str]] | None:
    """(names, values) when each item names its value ("x = 4.5", "Q(-1, 4)", "AB = 4, CD = 5"), else None."""
    names, values = [], []
    for item in _items(s) or []:
        named = _NAMED.match(item) or _POINT.match(item)
        value = item[named.end():].strip() if named else ""
        if not value or re.search(_RELATION, value) or named.re is _POINT and _shape(value) != "seq":
            return None
        names, values = names + [named[1]], values + [value]
    return (names, values) if names else None


def _unlabelled(x: str, y: str) -> tuple[str, str] | None:
    """Answer x and gold y without the names before their values; None when each names one by another name (P(-1, 4)
    is not Q(-1, 4), y = 5 not x = 5). A name the other side lacks is no part of the value; several values keep their
    order ("AB = 4, CD = 5" is "4, 5"). Against an equation, a relation or another list of names, both stay."""
    nx, ny = _labelled(x), _labelled(y)
    if nx and ny and len(nx[0]) == len(ny[0]) == 1:
        return (nx[1][0], ny[1][0]) if len({re.sub(r"[\s{}]", "", named[0][0]) for named in (nx, ny)}) == 1 else None
    if bool(nx) == bool(ny) or re.search(_RELATION, other := y if nx else x):
        return x, y
    names, values = nx or ny
    if (in_order := len(set(names)) > 1) and len(_items(other) or []) != len(values):  # as tuples, against as many
        return x, y
    value, other = (f"({', '.join(values)})", f"({other})") if in_order else (", ".join(values), other)
    return (value, other) if nx else (other, value)


# A yes or no opening an answer (after "So," at most), alone or before its reason (not "No solution", "yes/no"); then
# the opposite that a word after makes no answer ("there is no gap", "a false premise") unless it starts afresh
_OPENS = re.compile(r"[\s*_\"'`(\[]*(?:(?:so|therefore|thus|hence|then|finally|in\s+conclusion)\W+)?(yes|no|true|false)"
                    r"(?=\s*(?:[,.;:!)\]—–*]|-\s|$)|\s+(?:because|since|it|they|the|this|that|there|both|we)\b)", re.I)
_AFRESH = r"(?:wait|it|i|we|this|that|they|the|because|since|as|so|but|and|or)\b"
_OPPOSITE = {word: re.compile(rf"\b{opposite}\b(?![-/'])(?!\s+(?!{_AFRESH})[a-z])", re.I)
             for word, opposite in (("yes", "no"), ("no", "yes"), ("true", "false"), ("false", "true"))}


def _equal(answer: str, gold: str, precision: int | None, deadline: float | None) -> bool:
    """A yes or no gold: the answer opens with it, no opposite after ("Yes, because ..."; not "No. Yes, it is"). Text
    ("Square." is "a square"); names as _unlabelled reads them; prose only as text; a bare number's one comma is a
    decimal comma unless the other side is a list (6,8 against 6 and 8); then exact and approximate members by _same."""
    if (word := _clean(gold).lower()) in _OPPOSITE:
        opening = _OPENS.match(answer)
        return bool(opening) and opening[1].lower() == word and not _OPPOSITE[word].search(answer, opening.end())
    plain = [re.sub(r"^(?:a|an|the)\s+", "", " ".join(_clean(t).lower().split())) for t in (answer, gold)]
    x, y = _latex(answer), _latex(gold)
    if plain[0] == plain[1] or max(len(x), len(y)) > MAX_RAW_CHARS or (pair := _unlabelled(x, y)) is None:
        return plain[0] == plain[1]
    x, y = pair
    if x == y or _prose(x) or _prose(y):
        return x == y
    x, y = [re.sub(r"(?<![\d.])(\d+),(\d+)(?![\d.])", r"\1.\2", s) if s.count(",") == 1 and _shape(other) != "set"
            and not re.search(r"[(\[]|\\\{", s) else s for s, other in ((x, y), (y, x))]
    members = [dict.fromkeys(m.strip() for m in (s.split("\\approx")[0], s.split("\\approx")[-1])) for s in (x, y)]
    return any(_same(u, v, precision, deadline) for u in members[0] for v in members[1])


def _same(x: str, y: str, precision: int | None, deadline: float | None) -> bool:
    """Answer x against gold y (LaTeX). Numbers by value: exact when both are written exactly (1000001 is not
    1000000), within REL_TOL with a decimal, rounded to a stated precision. A set is not a tuple, nor a number; an
    equation gold is matched only by an equation. The rest by math-verify (unless deadline is None)."""
    (nx, ny), (sx, sy) = (_number(x), _number(y)), (_shape(x), _shape(y))
    if nx and ny:
        (u, exact_u), (v, exact_v) = nx, ny
        if precision is not None:  # equal once rounded (half up) to the places the question asks for
            return len({(Decimal(w.numerator) / w.denominator).quantize(Decimal(10) ** -precision, ROUND_HALF_UP)
                        for w in (u, v)}) == 1
        return u == v or not (exact_u and exact_v) and abs(u - v) <= REL_TOL * max(abs(u), abs(v))
    if {sx, sy} == {"set", "seq"} or (nx or ny) and (sx or sy):  # \{1, 2\} != (1, 2), \{5\} != 5, (1,22) != 1.22
        return False
    if (lhs := re.split(_EQUALS, y)[0]) != y and re.search(r"[\w}]\s*[-+]", lhs) and not re.search(_EQUALS, x):
        return False  # the gold is an equation (its left side a sum): "0" is not "a + b = 0", "1" is "f(x) = 1"
    interval = re.search(r"[\[\]]|\\infty|\\cup", y) is not None  # (1, 2) is a point or an interval: not by itself
    return deadline is not None and not _hopeless(x) and not _hopeless(y) and _math_verify(y, x, interval, deadline)

# ---------------------------------------------------------------- math-verify, in a forked worker with a time bound
# math-verify can run for minutes (9^{9^{9}} is computed exactly; simplify() has no bound) and its own bound,
# SIGALRM, works on a main thread only. So a process asks a worker it forks (os.fork, as a daemonic multiprocessing
# worker may; the child runs math-verify only, safe beside torch or CUDA), one question at a time. One that overruns
# is killed; the next question forks a new one. A worker ends at exit, on shutdown(), or at EOF on its pipe.

_lock = threading.Lock()  # one question at a time
_worker: tuple[int, Connection] | None = None  # (pid, pipe) of this process's worker
_warm = False             # math-verify has compared once in this process
_timeouts = 0
# A tower of numeric powers (9^{9^9}), a huge factorial or exponent: never worth a worker's time
_HOPELESS = re.compile(r"\d\s*(?:\^|\*\*)\s*[{(\s]*\d+\s*(?:\^|\*\*)|\d{4,}\s*!|(?:\^|\*\*)\s*[{(\s]*-?\d{4,}")


def _hopeless(latex: str, max_chars: int = MAX_RAW_CHARS, max_depth: int = 12) -> bool:
    """Empty, too long, too deeply nested, or a tower of numeric powers: not worth asking."""
    depth = max(itertools.accumulate((c in "([{") - (c in ")]}") for c in latex[:max_chars + 1]), default=0)
    return not latex or len(latex) > max_chars or depth > max_depth or _HOPELESS.search(latex) is not None


def _math_verify(gold: str, answer: str, set_relation: bool, deadline: float) -> bool:
    """The worker's verdict (_answer); False when none comes by `deadline` (monotonic): a timeout, counted, logged."""
    global _worker, _warm, _timeouts
    reply = None
    if _lock.acquire(timeout=max(deadline - time.monotonic(), 0.01)):  # else the time went to another thread's
        try:
            if not _warm:  # math-verify's lazy imports, once per process (0.4 - 0.7 s), so that workers start warm
                logging.getLogger("math_verify").setLevel(logging.ERROR)  # "Timeout is disabled": ours bounds it
                _warm = _answer("\\frac{1}{2}+x^{2}", "(x+1)^2 - 2x - \\frac{1}{2}", False) or True
                deadline = max(deadline, time.monotonic() + 0.5)  # the question still gets half a second
            if time.monotonic() < deadline:  # else the call's time went to its earlier questions: not asked
                pid, conn = _worker = _worker or _fork()
                conn.send((gold, answer, set_relation))
                reply = bool(conn.recv()) if conn.poll(max(deadline - time.monotonic(), 0.0)) else None
                if reply is None:  # overran: killed, and a new worker for the next question
                    shutdown()
        except (OSError, EOFError):  # the worker died
            shutdown()
        finally:
            _lock.release()
    if reply is None:
        _timeouts += 1
        if _timeouts <= 3 or math.log10(_timeouts).is_integer():
            logging.getLogger(__name__).warning(
                f"verify: no verdict from math-verify in time on answer {answer[:80]!r} against gold {gold[:80]!r}; "
                f"judged wrong ({_timeouts} so far in this process: answers.timeouts()).")
    return bool(reply)


def timeouts() -> int:
    """How many questions of this process got no verdict from math-verify in time (each a wrong answer)."""
    return _timeouts


def shutdown() -> None:
    """Stop this process's worker (done at exit too); the next question starts a new one."""
    global _worker
    if _worker is not None:
        (pid, conn), _worker = _worker, None
        conn.close()
        with contextlib.suppress(OSError):  # gone already
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


@functools.lru_cache(maxsize=1024)  # a group's gold is parsed once in the worker, whatever its G answers
def _parse(latex: str) -> list:
    config = [math_verify.LatexExtractionConfig(boxed_match_priority=0), math_verify.ExprExtractionConfig()]
    return math_verify.parse(f"${latex}$", config, parsing_timeout=None) or math_verify.parse(
        latex, config, parsing_timeout=None)


def _answer(gold: str, answer: str, set_relation: bool) -> bool:
    """math-verify's verify(parse(gold), parse(answer)), or the two equal evaluated (\\sqrt{x}\\sqrt{x}); else False."""
    try:
        x, y = _parse(gold), _parse(answer)
        return math_verify.verify(x, y, allow_set_relation_comp=set_relation, timeout_seconds=None) or bool(
            x and y and x[0].doit() == y[0].doit())
    except Exception:
        return False


def _fork() -> tuple[int, Connection]:
    """A worker: a forked child answering (gold, answer, set_relation) with _answer over a pipe, until EOF."""
    conn, there = Pipe()
    if (pid := os.fork()) == 0:  # the child; os._exit at the end, so that no atexit handler of the parent runs
        try:
            conn.close()
            signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's; its exit closes our pipe
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not train.py's checkpoint-and-exit handler
            gc.freeze()  # the parent's objects stay shared: the collector never touches (and copies) them
            while True:
                there.send(_answer(*there.recv()))
        finally:
            os._exit(0)
    there.close()
    return pid, conn


def _forget_worker() -> None:
    """In a forked child: not its worker; close its copy of the pipe, so the worker reads EOF when the parent goes."""
    global _lock, _worker
    if _worker is not None:
        _worker[1].close()
    _lock, _worker = threading.Lock(), None


os.register_at_fork(after_in_child=_forget_worker)
atexit.register(shutdown)
