"""The GRPO objective, every equation in one place: rewards to group-relative advantages, then the
clipped, KL-regularised policy loss over a micro-batch, and the log-probs it is made of.

Notation: a prompt q has a group of G completions; N completions (rows) of T tokens in a batch, rows
g*G .. g*G+G-1 belonging to prompt g ([group order]). R_i is completion i's reward and A_i its
advantage, shared by all its tokens; logp_{i,t}, old_{i,t}, ref_{i,t} are the log-probs of its token
t under the current, the sampling and the frozen reference policy; m_{i,t} is 1 on real completion
tokens (up to and including the end id) and 0 on padding.

    A_i      = (R_i - mean_group(R)) / (std_group(R) + eps)                     group_advantages
    r_{i,t}  = exp(logp_{i,t} - old_{i,t})         (GSPO: one per completion)    importance_ratio
    l_{i,t}  = -min(r A_i, clip(r, 1 - eps_low, 1 + eps_high) A_i)               per_token_loss
               (CISPO: a capped weight on logp; SAPO: a soft gate)
    k3_{i,t} = exp(ref - logp) - (ref - logp) - 1                                k3
    loss     = sum_{i,t} m (l + beta k3) / the loss type's normaliser            aggregate
               (grpo, bnpo, dr_grpo, dapo; cispo as dapo, sapo as grpo)
    each micro-batch's loss x loss_scale(loss_type, ranks, micro-batches) before backward   loss_scale
    the composition, and the whole optimizer step's loss written out             policy_loss
    logp     = log softmax(z / T)[token], from the logits z at the sampling temperature T   selective_log_softmax

Why is the loss about 0? With one update per rollout (old = logp.detach()) the ratio is exactly 1,
so l_{i,t} = -A_i and the loss is a weighted mean of -A_i, which is ~0 because advantages have zero
mean within each group (for loss_type="grpo" and beta=0 it is exactly -mean_i(A_i)). The
*gradient* is not 0: d l_{i,t} / d logp_{i,t} = -A_i, the REINFORCE policy gradient. Watch the
reward, not the loss.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .config import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, SCALES  # the flags' choices, one list each


def _choose(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is unknown; choose one of {list(choices)}.")


# ---------------------------------------------------------------- rewards to advantages
# GRPO's group-relative baseline, in place of PPO's value network: a completion is good if it beat
# its siblings. Rewards [N] are seen as [N/G, G].

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
    _choose("scale", scale, SCALES)
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

# ---------------------------------------------------------------- the loss, one idea per function
# policy_loss is importance_ratio -> per_token_loss (+ beta k3) -> aggregate, with clip_statistics to
# log. Each takes a micro-batch's [N, T] tensors whose padded positions hold 0 (policy_loss sets them).

# The normaliser each loss type divides its token sum by (aggregate): cispo is averaged as dapo
# (MiniMax-M1's token mean over the step), sapo as grpo (SAPO's mean over completions of their token means).
NORMALISER = {"grpo": "grpo", "bnpo": "bnpo", "dr_grpo": "dr_grpo", "dapo": "dapo", "cispo": "dapo", "sapo": "grpo"}


def importance_ratio(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor,
                     level: str = "token") -> torch.Tensor:
    """How much likelier each token is under the current policy than under the one that sampled it.

        token     r_{i,t} = exp(logp_{i,t} - old_{i,t})                PPO (Schulman et al. 2017), GRPO
        sequence  s_i = exp( sum_t m (logp - old) / sum_t m )         GSPO (Zheng et al. 2025, arXiv 2507.18071)

    GSPO's one ratio per completion (the geometric mean of its token ratios) is applied per token as
    GSPO-token's s_{i,t} = sg[s_i] * exp(logp_{i,t} - sg[logp_{i,t}]): its value is s_i and
    d s_{i,t} / d logp_{i,t} = s_i, so under every loss_type the gradient equals that of the
    sequence objective A_i * s_i. Clipping then acts on s_i; GSPO uses a tiny range, epsilon_low =
    3e-4 and epsilon_high = 4e-4 (pass them; the defaults are the token-level ones).

    logps: [N, T] (with grad), old_logps: [N, T], mask: [N, T] (1.0 on completion tokens), all three
    0 on padding. Returns r: [N, T], 1 wherever logps = old_logps.
    """
    _choose("importance_sampling_level", level, IMPORTANCE_SAMPLING_LEVELS)
    log_ratio = logps - old_logps                                                     # [N, T]
    if level == "sequence":
        seq_log_ratio = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)        # [N], log s_i
        log_ratio = seq_log_ratio.detach()[:, None] + logps - logps.detach()          # [N, T], value log s_i
    return torch.exp(log_ratio)                                                       # [N, T]


def per_token_loss(ratio: torch.Tensor, advantages: torch.Tensor, logps: torch.Tensor | None = None, *,
                   loss_type: str = "grpo", epsilon_low: float = 0.2, epsilon_high: float | None = None,
                   sapo_temperatures: tuple[float, float] = (1.0, 1.05)) -> torch.Tensor:
    """Each token's policy-gradient loss, before the KL term and the averaging.

    grpo, bnpo, dr_grpo, dapo: PPO's clipped surrogate (Schulman et al. 2017, eq. 7; GRPO's objective,
    DeepSeekMath eq. 3),
        l_{i,t} = -min(r A_i, clip(r, 1 - epsilon_low, 1 + epsilon_high) A_i)
    epsilon_high defaults to epsilon_low; DAPO's clip-higher (Yu et al. 2025, sec. 3.1) uses 0.28
    against 0.2, giving unlikely tokens with A > 0 more room to grow. When the clipped term is the
    one the min selects (r < 1 - epsilon_low with A < 0, or r > 1 + epsilon_high with A > 0) it is a
    constant, so that token gets no gradient from the surrogate (its KL term still has one).

    cispo (MiniMax-M1, arXiv 2506.13585, sec. 3.1) clips the importance weight instead of the update:
    every token keeps its gradient, weighted by the ratio capped from above,
        l_{i,t} = -sg[min(r, 1 + epsilon_high)] * A_i * logp_{i,t}          (no lower bound, as the paper)
    Its value is not ~0 at r = 1, but its gradient there is the same policy gradient, -A_i per token.

    sapo (Qwen's SAPO, arXiv 2511.20347, sec. 3) replaces the hard clip with a soft gate,
        l_{i,t} = -(4 / tau) * sigmoid(tau * (r - 1)) * A_i,      tau = tau_pos if A_i > 0 else tau_neg
    whose gradient 4 sigma (1 - sigma) A_i d r is exactly -A_i d logp at r = 1 and fades smoothly as r
    leaves 1, faster for negative advantages (tau_neg > tau_pos: sapo_temperatures, the paper's and
    TRL's 1.0 and 1.05).

    ratio: [N, T] (importance_ratio), advantages: [N], logps: [N, T] (cispo alone reads it, 0 on
    padding). Returns l: [N, T] in ratio's dtype.
    """
    _choose("loss_type", loss_type, LOSS_TYPES)
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    adv = advantages.to(ratio.dtype)[:, None]                                         # [N, 1], one per completion
    if loss_type == "cispo":
        if logps is None:
            raise ValueError("loss_type='cispo' weighs each token's logps by its capped ratio; pass logps [N, T].")
        return -torch.clamp(ratio, max=1 + epsilon_high).detach() * adv * logps       # [N, T]
    if loss_type == "sapo":
        tau_pos, tau_neg = sapo_temperatures
        tau = torch.full_like(adv, tau_neg).masked_fill(adv > 0, tau_pos)  # [N, 1], ratio's dtype, not float32
        return -(4 / tau) * torch.sigmoid(tau * (ratio - 1)) * adv                    # [N, T]
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)                   # [N, T]
    return -torch.min(ratio * adv, clipped * adv)                                     # [N, T]


def k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """The KL penalty per token: Schulman's k3 estimator (Schulman 2020, "Approximating KL Divergence";
    DeepSeekMath eq. 4),

        k3_{i,t} = exp(ref - logp) - (ref - logp) - 1

    >= 0 everywhere (e^x >= 1 + x) and 0 where ref = logp; for tokens sampled from pi its mean is an
    unbiased estimate of KL(pi || ref). logps: [N, T] (with grad), ref_logps: [N, T], both 0 on
    padding. Returns [N, T].
    """
    diff = ref_logps - logps                                                          # [N, T], log(ref / pi)
    return torch.exp(diff) - diff - 1                                                 # [N, T]


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, *, loss_type: str = "grpo",
              max_completion_length: int | None = None,
              num_items_in_batch: int | float | torch.Tensor | None = None) -> torch.Tensor:
    """The micro-batch's loss: the active tokens' terms summed, over the loss type's normaliser
    (NORMALISER: cispo as dapo, sapo as grpo), each chosen for how it weighs a token:

        grpo     mean_i( sum_t m*l / sum_t m )          DeepSeekMath eq. 3: every completion weighs the
                                                        same, so a long answer's tokens weigh less each
        bnpo     sum_{i,t} m*l / sum_{i,t} m            every token of the micro-batch weighs the same
        dr_grpo  sum_{i,t} m*l / (N * max_completion_length)   Dr. GRPO (Liu et al. 2025): a
                                                        constant, so no length bias either way
        dapo     sum_{i,t} m*l / num_items_in_batch     DAPO eq. 8: every token of the whole optimizer
                                                        step weighs the same; num_items_in_batch counts
                                                        the step's active tokens (all ranks, all
                                                        micro-batches: policy_loss's docstring)

    A row whose mask is all 0 contributes 0 (its denominator is clamped at 1, never NaN).
    per_token: [N, T], mask: [N, T] (1.0 on completion tokens). Returns a scalar.
    """
    _choose("loss_type", loss_type, LOSS_TYPES)
    normaliser = NORMALISER[loss_type]
    if normaliser == "dr_grpo" and (max_completion_length is None or max_completion_length <= 0):
        raise ValueError(f"loss_type={loss_type!r} normalises by N * max_completion_length; pass a positive "
                         f"max_completion_length (got {max_completion_length}).")
    if normaliser == "dapo" and num_items_in_batch is None:
        raise ValueError(f"loss_type={loss_type!r} normalises by num_items_in_batch, the active completion tokens of "
                         "the whole optimizer step (all ranks and accumulation steps); pass it.")
    summed = per_token * mask                                                         # [N, T], padding out
    if normaliser == "grpo":
        return (summed.sum(-1) / mask.sum(-1).clamp(min=1)).mean()                    # [N] token means -> []
    if normaliser == "bnpo":
        return summed.sum() / mask.sum().clamp(min=1)                                 # []
    if normaliser == "dr_grpo":
        return summed.sum() / (per_token.shape[0] * max_completion_length)           # []
    # An optimizer step whose completions are all empty has a zero numerator too: 0, not NaN.
    return summed.sum() / max(float(num_items_in_batch), 1.0)                         # []


def loss_scale(loss_type: str, world_size: int, accumulation_steps: int) -> float:
    """What train.py's `update` multiplies each micro-batch's loss by before backward, so that the
    optimizer step's gradients (summed over micro-batches, averaged over ranks by DeepSpeed) are the
    gradient of the step's loss (policy_loss's docstring writes it out):

        1 / accumulation_steps   grpo, bnpo, dr_grpo (and sapo) are per-micro-batch means: the step's
                                 loss is their mean over the world_size x accumulation_steps
                                 micro-batches (the ranks' average does the rest)
        world_size               dapo (and cispo) divide every micro-batch by the whole step's token
                                 count already: the step's loss is their plain sum, and world_size
                                 undoes the ranks' average
    """
    _choose("loss_type", loss_type, LOSS_TYPES)
    return float(world_size) if NORMALISER[loss_type] == "dapo" else 1.0 / accumulation_steps


@torch.no_grad()
def clip_statistics(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, loss_type: str = "grpo",
                    epsilon_low: float = 0.2, epsilon_high: float | None = None) -> dict[str, float]:
    """How often the clip took effect: fractions of the active tokens (PPO's clip fraction, a measure of
    how far the update has moved from the sampling policy).

        clip_ratio_low   r < 1 - epsilon_low with A < 0    (the constant the min picks: no gradient)
        clip_ratio_high  r > 1 + epsilon_high with A > 0
        clip_ratio       the two together
    cispo: the tokens whose weight was capped, r > 1 + epsilon_high whatever the sign of A (TRL's
    cispo_clip_ratio counts A > 0 alone), as high; none low. sapo: 0, a soft gate clips nothing.

    ratio: [N, T], advantages: [N], mask: [N, T] (1.0 on completion tokens). Returns Python floats.
    """
    _choose("loss_type", loss_type, LOSS_TYPES)
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    adv = advantages.to(ratio.dtype)[:, None]                                         # [N, 1]
    if loss_type == "sapo":
        low = high = torch.zeros_like(mask)                                           # [N, T]
    elif loss_type == "cispo":
        low, high = torch.zeros_like(mask), (ratio > 1 + epsilon_high).to(mask.dtype)  # [N, T]
    else:
        low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(mask.dtype)                  # [N, T]
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(mask.dtype)                # [N, T]
    n_active = mask.sum().clamp(min=1)                                                # []
    low_frac = ((low * mask).sum() / n_active).item()
    high_frac = ((high * mask).sum() / n_active).item()
    return {"clip_ratio": low_frac + high_frac, "clip_ratio_low": low_frac, "clip_ratio_high": high_frac}


def _check_inputs(logps, old_logps, advantages, mask, ref_logps, beta, loss_type,
                  importance_sampling_level) -> None:
    _choose("loss_type", loss_type, LOSS_TYPES)
    _choose("importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
    if logps.dim() != 2:
        raise ValueError(f"logps must be [N, T], got shape {tuple(logps.shape)}.")
    shape = tuple(logps.shape)
    named = {"old_logps": old_logps, "mask": mask, "ref_logps": ref_logps}
    for name, tensor in named.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} but logps has shape {shape}; "
                             "both must be [N, T].")
    if tuple(advantages.shape) != shape[:1]:
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}; expected [N] = {shape[:1]} "
                         f"(one advantage per completion, logps is {shape}).")
    if beta < 0:
        raise ValueError(f"beta={beta}: the KL coefficient cannot be negative.")
    if beta != 0 and ref_logps is None:
        raise ValueError(f"beta={beta} needs ref_logps (the reference model's log-probs): load a reference "
                         "model or set beta to 0.")
    if loss_type in ("cispo", "sapo") and importance_sampling_level != "token":
        raise ValueError(f"loss_type={loss_type!r} weighs each token by its own ratio; importance_sampling_level "
                         "'sequence' (GSPO) goes with grpo, bnpo, dr_grpo or dapo.")


def _padding_zeroed(tensor: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    # Padded positions may hold anything (even inf or NaN from a padded forward). Replacing them by
    # 0 before any exp keeps 0 * inf = NaN out of both the loss and the gradient; torch.where sends
    # exactly 0 gradient to the replaced entries.
    return torch.where(active, tensor, torch.zeros_like(tensor))


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    importance_sampling_level: str = "token",
    sapo_temperatures: tuple[float, float] = (1.0, 1.05),
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss of one micro-batch, and detached statistics to log. Padded positions are set to 0
    first (they may hold inf or NaN), then

        r_{i,t}  = importance_ratio(logps, old_logps, mask, importance_sampling_level)      [N, T]
        l_{i,t}  = per_token_loss(r, advantages, logps, loss_type, ...)  +  beta * k3_{i,t}   [N, T]
        k3_{i,t} = k3(logps, ref_logps)                                                       [N, T]
        loss     = aggregate(l, mask, loss_type, ...)                                         scalar

    With one update per rollout (old_logps = logps.detach()) r = 1, nothing is clipped and the
    loss is ~0 (exactly -mean_i(A_i) for grpo with beta = 0), yet its gradient is the policy
    gradient -A_i * m / normaliser per token: see the module docstring.

    The loss of one optimizer step. train.py's `update` calls policy_loss on each of K =
    --gradient_accumulation_steps micro-batches on each of W ranks and back-propagates
    loss_scale(loss_type, W, K) * L_b for micro-batch b; DeepSpeed sums a rank's K gradients and
    averages the W ranks' sums. So the weights follow the gradient of

        L_step = (1 / W) * sum_{W ranks} sum_{K micro-batches} loss_scale * L_b

    grpo, bnpo, dr_grpo, sapo: loss_scale = 1 / K, and L_step is the mean of the W K micro-batch losses:
        grpo, sapo   the mean over the step's W K N completions of their token means
        bnpo         the mean over the W K micro-batches of their token means (not the step's token mean)
        dr_grpo      the sum over the step's active tokens / (W K N * max_completion_length)
    dapo, cispo: loss_scale = W, and L_step is the sum of the W K micro-batch losses:
                     the sum over the step's active tokens / num_items_in_batch,
        where num_items_in_batch counts the active completion tokens of the whole step, summed over
        ALL W ranks and K micro-batches (train.py's active_tokens, all-reduced once per rollout):
        one rank's count alone would make the gradient about W times too big.
    (A sum over tokens is of l_{i,t}, the KL term included.) tests/test_objective.py checks it in one
    process (test_step_gradient_over_ranks_and_micro_batches), tests/test_train_glue.py through
    DeepSpeed on 2 ranks against tests/glue_worker.py's step_loss, which writes L_step out.

    Against TRL 1.16's GRPOTrainer (`_compute_loss`), two differences in the defaults:
    - TRL multiplies k3 by the ratio, use_bias_correction_kl=True (DeepSeek-V3.2's unbiased KL
      gradient, arXiv 2512.02556). The ratio is differentiable, so with beta > 0 TRL's KL gradient
      differs from this one even at r = 1. Here k3 enters as GRPO defines it (DeepSeekMath eq. 3-4).
    - TRL's cispo caps the ratio at epsilon_high itself (ScaleRL's eps_max, TRL recommends 5.0);
      here the cap is 1 + epsilon_high, as the clip's upper bound is (TRL's 5.0 is 4.0 here).

    logps: [N, T] (with grad), old_logps: [N, T], advantages: [N], mask: [N, T] (bool, int or
    float; 1 on completion tokens), ref_logps: [N, T] or None.
    Returns (loss: scalar tensor, stats: dict of Python floats) with stats
        kl               masked mean of k3 over active tokens (0.0 without ref_logps)
        clip_ratio, clip_ratio_low, clip_ratio_high     clip_statistics
    """
    _check_inputs(logps, old_logps, advantages, mask, ref_logps, beta, loss_type, importance_sampling_level)
    active = mask != 0                                                                # [N, T] bool
    mask = mask.to(logps.dtype)                                                       # [N, T] 1.0 / 0.0
    logps = _padding_zeroed(logps, active)                                            # [N, T]
    old_logps = _padding_zeroed(old_logps.to(logps.dtype), active)                    # [N, T]
    ratio = importance_ratio(logps, old_logps, mask, importance_sampling_level)       # [N, T]
    clip = {"loss_type": loss_type, "epsilon_low": epsilon_low, "epsilon_high": epsilon_high}
    per_token = per_token_loss(ratio, advantages, logps, sapo_temperatures=sapo_temperatures, **clip)  # [N, T]
    kl = None
    if ref_logps is not None:
        kl = k3(logps, _padding_zeroed(ref_logps.to(logps.dtype), active))            # [N, T]
        if beta != 0:
            per_token = per_token + beta * kl                                         # [N, T]
    loss = aggregate(per_token, mask, loss_type=loss_type, max_completion_length=max_completion_length,
                     num_items_in_batch=num_items_in_batch)                           # []
    with torch.no_grad():
        kl_mean = ((kl * mask).sum() / mask.sum().clamp(min=1)).item() if kl is not None else 0.0
    return loss, {"kl": kl_mean, **clip_statistics(ratio, advantages, mask, **clip)}


# ---------------------------------------------------------------- log-probs at the vocabulary's size

# One chunk of the vocabulary-wide work: 2**24 elements are 64 MiB in float32, about 110 positions at
# Qwen2-VL's 151,936 words. Big enough that each kernel launch has work to do on a GPU, small enough
# that a few float32 chunks cost nothing next to the model.
CHUNK_ELEMENTS = 2**24


def _chunks(shape: torch.Size):
    """Index (row, run of positions) into a [N, T, V] tensor, each run at most CHUNK_ELEMENTS / V long.

    Runs never cross rows, so every block logits[index] is a [chunk, V] view of any strided tensor:
    no reshape, hence no copy of a non-contiguous input.
    """
    n_rows, n_positions, vocab = shape
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for i in range(n_rows):
        for start in range(0, n_positions, step):
            yield i, slice(start, start + step)


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    # logsumexp in 8 (bf16) or 11 (fp16) mantissa bits is too coarse (errors of ~0.01-0.1 nats at
    # this vocabulary size), so low-precision logits are upcast one chunk at a time.
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


class _SelectiveLogSoftmax(torch.autograd.Function):
    """logp = z_id / T - logsumexp(z / T), with a backward that recomputes softmax instead of storing it."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, ids: torch.Tensor, temperature: float, overwrite: bool) -> torch.Tensor:
        dtype = _compute_dtype(logits)
        lse = torch.empty(logits.shape[:2], dtype=dtype, device=logits.device)
        for index in _chunks(logits.shape):
            lse[index] = torch.logsumexp(logits[index].to(dtype) / temperature, dim=-1)
        chosen = logits.gather(-1, ids[..., None]).squeeze(-1).to(dtype) / temperature
        # logits is the caller's tensor (no copy) and lse is [N, T]: the float32 softmax that
        # backward needs is exp(z / T - lse), one chunk at a time, instead of a saved [N, T, V] block.
        ctx.save_for_backward(logits, ids, lse)
        ctx.temperature, ctx.overwrite = temperature, overwrite
        return chosen - lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        logits, ids, lse = ctx.saved_tensors
        T = ctx.temperature
        # overwrite: the gradient takes the logits' own memory, chunk by chunk (each chunk is read before
        # it is written), so the backward makes no second [N, T, V] tensor.
        grad = logits if ctx.overwrite else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_out = grad_out.to(lse.dtype) / T
        for index in _chunks(logits.shape):
            g = grad_out[index][:, None]
            # (g / T) * (onehot(id) - softmax(z / T)): softmax on a float32 copy of the chunk (copy=True so
            # that float32 logits are not changed before they are read), then + g / T at the chosen token.
            block = logits[index].to(lse.dtype, copy=True).div_(T).sub_(lse[index][:, None]).exp_().mul_(-g)
            block.scatter_add_(-1, ids[index][:, None], g)
            grad[index] = block
        return grad, None, None, None


def selective_log_softmax(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0,
                          overwrite_logits: bool = False) -> torch.Tensor:
    """log softmax(logits / T)[ids]: the log-prob of each chosen token at the sampling temperature, and
    its gradient.

        logp_{i,t} = z_{i,t,id} / T - logsumexp_v (z_{i,t,v} / T)            with id = ids_{i,t}
        d logp_{i,t} / d z_{i,t,v} = (1[v = id] - softmax(z_{i,t} / T)_v) / T

    logits: [N, T, V] (any float dtype, any strides), ids: [N, T] (int32 or int64). Returns [N, T]:
    logits' dtype for float32/float64, float32 for bf16/fp16. The division by T happens in float32,
    chunk by chunk, as generate's sampler divides: dividing bf16 logits by T = 0.7 first rounds them
    again (about 0.03 nats of mean error).

    Memory at Qwen2-VL's vocabulary of 151,936 words: for 8 x 256 completion tokens a float32
    [N, T, V] block is 1.2 GB, twice the bf16 logits the model returns. autograd through log_softmax
    would save such a block (its output) for backward, and a division by T or a torch.cat of logits
    another bf16 one each. Here nothing of that size is made: forward and backward walk over chunks of
    at most CHUNK_ELEMENTS (64 MiB in float32), backward is given only logits itself (no copy), ids and
    the [N, T] logsumexp, and recomputes softmax(z / T) = exp(z / T - logsumexp) chunk by chunk. With
    `overwrite_logits` it writes the gradient into the logits' own memory: the one [N, T, V] tensor of
    the forward is the one of the backward too. Only for logits nothing else reads after this call (the
    model's fresh output; a view that repeats memory, such as expand, cannot be overwritten).
    """
    if logits.dim() != 3 or ids.shape != logits.shape[:2]:
        raise ValueError(f"expected logits [N, T, V] and ids [N, T], got logits {tuple(logits.shape)} "
                         f"and ids {tuple(ids.shape)}.")
    return _SelectiveLogSoftmax.apply(logits, ids.long(), float(temperature), overwrite_logits)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The policy's entropy at each position, at the sampling temperature, without gradient (a statistic to log).

        H_{i,t} = -sum_v p_v log p_v = logsumexp_v y_v - sum_v p_v y_v,    p = softmax(y),  y = z_{i,t} / T

    logits: [N, T, V] (any float dtype). Returns [N, T] float32, between 0 (one token certain) and
    log V (uniform). Chunked like selective_log_softmax, so no float32 [N, T, V] block is made.
    """
    if logits.dim() != 3:
        raise ValueError(f"expected logits [N, T, V], got shape {tuple(logits.shape)}.")
    dtype = _compute_dtype(logits)
    entropy = torch.empty(logits.shape[:2], dtype=dtype, device=logits.device)
    for index in _chunks(logits.shape):
        z = logits[index].to(dtype, copy=True).div_(temperature)
        log_p = z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))
        entropy[index] = -(log_p.exp() * log_p).sum(-1)
    return entropy.float()
