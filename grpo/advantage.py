"""Rewards to advantages: GRPO's group-relative baseline, in place of PPO's value network.

For a prompt q the policy samples a group of G completions and each gets a scalar reward R_i.
The other members of the group are the baseline: a completion is good if it beat its siblings.
Rows are grouped contiguously, rows g*G .. g*G+G-1 belong to prompt g, so every function here
reshapes rewards [N] to [N/G, G].
"""

from __future__ import annotations

import torch

SCALES = ("group", "batch", "none")


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """rewards [N] -> [N/G, G], with the checks that make a wrong batch layout fail loudly."""
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        shape = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must be a 1-D tensor [N], got {shape}.")
    if group_size < 2:
        # One sample has no sibling to compare against: its advantage would always be 0 and its
        # sample std is undefined (NaN). GRPO needs a group.
        raise ValueError(f"group_size must be >= 2 (GRPO compares completions within a group), got {group_size}.")
    n = rewards.shape[0]
    if n % group_size != 0:
        raise ValueError(f"the number of rewards N={n} is not a multiple of group_size={group_size}; "
                         "each prompt must contribute exactly group_size completions.")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    return rewards.view(-1, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages, one per completion.

        group (DeepSeekMath GRPO, Shao et al. 2024, sec. 4.1.2, "outcome supervision"):
            A_i = (R_i - mean_group(R)) / (std_group(R) + eps)
        batch (Lite PPO: Liu et al. 2025, "Tricks or Traps? A Deep Dive into RL for LLM Reasoning"):
            A_i = (R_i - mean_group(R)) / (std_batch(R) + eps)
        none (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training", sec. 3.1):
            A_i = R_i - mean_group(R)
        Dividing by the group std up-weights groups that are nearly all right or all wrong
        (a question-level difficulty bias); Dr. GRPO drops it.

    std is the unbiased sample std (divides by G - 1, torch.std's default, as TRL). eps = 1e-4 (TRL).
    A group whose rewards are all equal carries no learning signal: its advantages are exactly 0
    (set explicitly, not left to floating-point cancellation in R_i - mean).

    rewards: [N] with N = num_prompts * G, rows of a prompt contiguous. Returns [N], rewards' dtype
    (float32 for integer rewards).
    """
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} is unknown; choose one of {list(SCALES)}.")
    r = _grouped(rewards, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = centred / (r.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        adv = centred / (r.std() + eps)
    else:
        adv = centred
    equal = (r == r[:, :1]).all(dim=1, keepdim=True)
    adv = torch.where(equal, torch.zeros_like(adv), adv)
    return adv.reshape(-1)


def groups_with_signal(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which groups carry a learning signal: those whose G rewards are not all equal. A group of
    equal rewards (all right or all wrong) gets A = 0 and contributes no policy gradient.

    rewards: [N]. Returns a bool tensor [N / G].
    """
    r = _grouped(rewards, group_size)
    return (r != r[:, :1]).any(dim=1)


def equal_reward_group_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose G rewards are all equal: near 1, the batch teaches nothing.

    rewards: [N]. Returns a Python float in [0, 1].
    """
    return 1.0 - groups_with_signal(rewards, group_size).float().mean().item()


def combine_rewards(per_func_rewards: torch.Tensor, weights: torch.Tensor | list[float] | None = None) -> torch.Tensor:
    """Total reward from K reward functions: R_i = sum_k w_k * r_k(i), w_k = 1 by default.

    per_func_rewards: [N, K] (column k is reward function k); weights: [K] or None. Returns [N].
    """
    if per_func_rewards.dim() != 2:
        raise ValueError(f"per_func_rewards must be [N, K], got shape {tuple(per_func_rewards.shape)}.")
    if not per_func_rewards.is_floating_point():
        per_func_rewards = per_func_rewards.float()
    k = per_func_rewards.shape[1]
    if weights is None:
        return per_func_rewards.sum(dim=1)
    w = torch.as_tensor(weights, dtype=per_func_rewards.dtype, device=per_func_rewards.device)
    if w.dim() != 1 or w.shape[0] != k:
        raise ValueError(f"got {w.numel()} reward weights for K={k} reward functions; give one weight per function.")
    return per_func_rewards @ w
