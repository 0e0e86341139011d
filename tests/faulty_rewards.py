"""Reward functions that fail on purpose, for the tests of fault-tolerant scoring and for end-to-end
runs such as `train.py --reward_funcs format tests.faulty_rewards:raises_on_b`; and one that never fails
(`characters`), for runs of an untrained model.

Each has the reward signature fn(completions, **dataset_columns) -> list[float], is deterministic and
cheap, and misbehaves only on rows whose gold answer is B, so a run over the colour data (answers
A-D) sees both working and failing rows in most groups of prompts.
"""

from grpo.answers import extract_answer

NOT_CALLABLE = 0.5  # for the "not callable" error of get_reward_funcs


def _is_b(solution: str) -> bool:
    return extract_answer(solution) == "B"


def raises_on_b(completions, solution, **kwargs):
    """ValueError when any row's answer is B (so a batch containing one fails as a whole), else 1.0 each."""
    for s in solution:
        if _is_b(s):
            raise ValueError("raises_on_b: the answer is B")
    return [1.0 for _ in completions]


def nan_for_b(completions, solution, **kwargs):
    """NaN for rows whose answer is B, 1.0 for the others."""
    return [float("nan") if _is_b(s) else 1.0 for s in solution]


def always_raises(completions, **kwargs):
    """Fails on every completion."""
    raise RuntimeError("always_raises: broken on purpose")


def one_at_a_time(completions, solution, **kwargs):
    """Raises on a batch of more than one completion; alone, 1.0 when the answer is B, else 0.5.
    Scoring must fall back to one call per completion and then lose nothing."""
    if len(completions) != 1:
        raise ValueError(f"one_at_a_time: got {len(completions)} completions")
    return [1.0 if _is_b(solution[0]) else 0.5]


def one_short(completions, **kwargs):
    """One value fewer than completions: on a batch, and on each single completion (0 values)."""
    return [1.0] * (len(completions) - 1)


def value_column(completions, value, **kwargs):
    """The dataset column `value` as the rewards, unchanged: lets a test hand in None, NaN, text, ..."""
    return list(value)


def characters(completions, **kwargs):
    """The completion's length in characters / 100: it differs between the completions of an untrained
    model, which never writes the format, so a run of one still has a policy gradient."""
    return [len(c) / 100 for c in completions]
