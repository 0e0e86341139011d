"""Rewards: one float per sampled completion, the only signal GRPO learns from.

Two rewards ship here:
    format    1.0 when a completion is exactly <think>...</think><answer>...</answer>, else 0.0.
    accuracy  1.0 when the completion's final answer equals the dataset's answer (`verify`, grpo/answers.py), else 0.0.

Every reward function has one signature, fn(completions: list[str], **dataset_columns) -> list[float]:
dataset columns (solution, problem, ...) arrive as keyword lists aligned with completions, and a
function ignores the columns it does not use (**kwargs). To add a reward, write such a function in
a file of your own and name it by import path, `--reward_funcs accuracy my_rewards:length_penalty`
(imported from the current directory or sys.path, so the trainer needs no edit), or add it to
REWARD_FUNCS to use it by a bare name. The trainer scores with `score_completions`: a function that
raises or returns a non-number on some completions costs only those (0.0 there, and counted), not the run.

The format regex is a trap of its own ([format regex]): without DOTALL every multi-line answer scores
0, and a pattern that accepts several think/answer blocks is gamed by repeating them. The accuracy
reward judges the final answer only ([judging the reasoning]).
"""

from __future__ import annotations

import collections
import importlib
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable

from . import answers

# ---------------------------------------------------------------- reward functions

_NO_TAG = r"(?:(?!</?(?:think|answer)>).)*"  # any text, tags excluded: no nested or repeated blocks
_FORMAT = re.compile(rf"\s*<think>{_NO_TAG}</think>\s*<answer>{_NO_TAG}</answer>\s*", re.DOTALL)


def format_reward(completions: list[str], **kwargs) -> list[float]:
    """1.0 when the whole completion is one <think>...</think> then one <answer>...</answer>, else 0.0."""
    return [1.0 if _FORMAT.fullmatch(c) else 0.0 for c in completions]


def accuracy_reward(completions: list[str], solution: list[str], problem: list[str] | None = None,
                    **kwargs) -> list[float]:
    """1.0 when completion i's final answer equals solution i's (options read from problem i), as
    answers.verify judges. Each gold is read once for all the completions that share it (a group's G).
    A comparison that math-verify does not finish in time is 0.0, logged and counted (answers.timeouts())."""
    for name, column in (("solution", solution), ("problem", problem)):
        if column is not None and len(column) != len(completions):
            raise ValueError(f"accuracy_reward: {len(completions)} completions but {len(column)} {name} values; "
                             "dataset columns must have one row per completion.")
    problems = problem if problem is not None else [None] * len(completions)
    keys = [(s if isinstance(s, str) else None, q if isinstance(q, str) else None) for s, q in zip(solution, problems)]
    golds = {key: answers.read_gold(*key) for key in dict.fromkeys(keys)}  # not text: no answer, as verify reads it
    return [1.0 if answers.judge(c, golds[key]) else 0.0 for c, key in zip(completions, keys)]


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


def score(reward_funcs: list[Callable], names: list[str], texts: list[str], examples: list[dict], group_size: int,
          faults: RewardFaults):
    """Rewards for N = len(texts) completions, completion i belonging to prompt i // G and scored against
    that prompt's dataset row ([group order]). Returns (per-function rewards [N, K] as a float32 tensor,
    failures per function [K])."""
    import torch

    columns = {key: [ex[key] for ex in examples for _ in range(group_size)]
               for key in examples[0] if key not in ("images", "videos", "prompt", "row_index")}
    rows = [ex.get("row_index", i) for i, ex in enumerate(examples) for _ in range(group_size)]
    scores, failures = score_completions(reward_funcs, names, texts, columns, rows, faults)
    return torch.tensor(scores, dtype=torch.float32).reshape(len(texts), len(reward_funcs)), failures
