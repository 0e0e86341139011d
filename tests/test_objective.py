"""grpo/objective.py: the advantages against statistics computed independently with Python's statistics
module, the loss against numbers worked by hand and a plain-Python reimplementation over floats, and
the log-probs' arithmetic against float64 log_softmax."""

import math
import statistics

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from grpo.objective import (LOSS_TYPES, aggregate, clip_statistics, combine_rewards,
                            equal_reward_group_fraction, group_advantages, groups_with_signal, importance_ratio, k3,
                            loss_scale, per_token_loss, policy_loss, selective_log_softmax, token_entropy)

CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo")  # the PPO-clipped surrogate, averaged four ways (cispo, sapo: below)

# ---------------------------------------------------------------- advantages

EPS = 1e-4


def reference(rewards, G, scale, eps=EPS):
    """Plain-Python advantages: group mean, and the unbiased (n - 1) std of the group or batch."""
    out = []
    batch_std = statistics.stdev(rewards)
    for start in range(0, len(rewards), G):
        group = rewards[start:start + G]
        mean = statistics.fmean(group)
        if len(set(group)) == 1:
            out += [0.0] * G
            continue
        denom = {"group": statistics.stdev(group) + eps, "batch": batch_std + eps, "none": 1.0}[scale]
        out += [(r - mean) / denom for r in group]
    return out


def test_hand_example_group_scale():
    # Group 1: [1,0,0,0], mean 0.25, unbiased std sqrt((0.5625 + 3*0.0625)/3) = 0.5.
    # Group 2: [1,1,0,0], mean 0.5, unbiased std sqrt(4*0.25/3) = 1/sqrt(3).
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0])
    adv = group_advantages(rewards, 4)
    s2 = (1 / 3) ** 0.5
    expected = [0.75 / (0.5 + EPS)] + [-0.25 / (0.5 + EPS)] * 3 + [0.5 / (s2 + EPS)] * 2 + [-0.5 / (s2 + EPS)] * 2
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)
    assert statistics.stdev([1, 0, 0, 0]) == pytest.approx(0.5)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_scales_match_reference(scale):
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(24, generator=g, dtype=torch.float64) * 3
    adv = group_advantages(rewards, 6, scale=scale)
    assert adv.shape == (24,)
    assert adv.tolist() == pytest.approx(reference(rewards.tolist(), 6, scale), rel=1e-9, abs=1e-12)
    # The group mean is the baseline in every variant.
    assert adv.view(4, 6).sum(1).abs().max().item() < 1e-9


def test_batch_scale_uses_whole_batch_std():
    # Both groups have the same centred rewards, but the batch std mixes in the offset between them.
    rewards = [0.0, 1.0, 10.0, 11.0]
    adv = group_advantages(torch.tensor(rewards, dtype=torch.float64), 2, scale="batch")
    s = statistics.stdev(rewards)
    assert adv.tolist() == pytest.approx([-0.5 / (s + EPS), 0.5 / (s + EPS)] * 2)


def test_none_scale_is_centred_rewards():
    adv = group_advantages(torch.tensor([3.0, 1.0, 2.0, 2.0, 5.0, 2.0]), 3, scale="none")
    assert adv.tolist() == pytest.approx([1.0, -1.0, 0.0, -1.0, 2.0, -1.0])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_reward_group_is_exactly_zero(scale):
    # In float32 the mean of eight 0.1s is not exactly 0.1 (R - mean ~ 7e-9, which divided by a
    # group std of ~0 + eps would be a spurious advantage): zero must not rely on cancellation.
    rewards = torch.tensor([0.1] * 8 + [0.7] * 8 + [1.0] + [0.0] * 7)
    adv = group_advantages(rewards, 8, scale=scale)
    assert adv[:16].tolist() == [0.0] * 16
    assert torch.all(adv[16:] != 0)


def test_all_groups_equal_gives_zeros_not_nan():
    adv = group_advantages(torch.ones(8), 4, scale="batch")  # batch std is 0 here too
    assert adv.tolist() == [0.0] * 8


def test_integer_rewards_are_accepted():
    adv = group_advantages(torch.tensor([1, 0, 1, 1]), 2)
    assert adv.dtype == torch.float32
    assert adv[2:].tolist() == [0.0, 0.0]
    assert adv[0].item() == pytest.approx(0.5 / (statistics.stdev([1, 0]) + EPS))


def test_errors():
    with pytest.raises(ValueError, match=r"N=7.*group_size=4"):
        group_advantages(torch.zeros(7), 4)
    with pytest.raises(ValueError, match=r"group_size must be >= 2"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match=r"group_size must be >= 2"):
        group_advantages(torch.zeros(4), 0)
    with pytest.raises(ValueError, match=r"'group', 'batch', 'none'"):
        group_advantages(torch.zeros(4), 2, scale="global")
    with pytest.raises(ValueError, match=r"1-D"):
        group_advantages(torch.zeros(2, 4), 2)
    with pytest.raises(ValueError, match=r"N=6.*group_size=4"):
        equal_reward_group_fraction(torch.zeros(6), 4)


def test_equal_reward_group_fraction():
    # Groups: [1,1] equal, [0,0] equal, [1,0] not, [0.5,0.5] equal -> 3 of 4.
    rewards = torch.tensor([1.0, 1, 0, 0, 1, 0, 0.5, 0.5])
    frac = equal_reward_group_fraction(rewards, 2)
    assert isinstance(frac, float) and frac == 0.75
    assert equal_reward_group_fraction(torch.tensor([1.0, 0, 1, 0]), 4) == 0.0
    assert groups_with_signal(rewards, 2).tolist() == [False, False, True, False]


def test_combine_rewards():
    per_func = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    assert combine_rewards(per_func, None).tolist() == [1.0, 2.0, 1.0]
    # 2*r0 + 0.5*r1
    assert combine_rewards(per_func, [2.0, 0.5]).tolist() == [2.0, 2.5, 0.5]
    assert combine_rewards(per_func, torch.tensor([2.0, 0.5])).tolist() == [2.0, 2.5, 0.5]
    with pytest.raises(ValueError, match=r"3 reward weights for K=2"):
        combine_rewards(per_func, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        combine_rewards(torch.zeros(3), None)


# ---------------------------------------------------------------- the loss

LN2 = math.log(2)


# --- the loss's parts, one at a time (each worked by hand) ----------------------------------------

def test_importance_ratio_token_level():
    # log r = logp - old = [ln 2, 0, -ln 2]: r = [2, 1, 1/2]; d r / d logp = r.
    logps = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    old = logps.detach() - torch.tensor([[LN2, 0.0, -LN2]], dtype=torch.float64)
    ratio = importance_ratio(logps, old, torch.ones(1, 3, dtype=torch.float64))
    torch.testing.assert_close(ratio, torch.tensor([[2.0, 1.0, 0.5]], dtype=torch.float64), rtol=1e-14, atol=0)
    (grad,) = torch.autograd.grad(ratio.sum(), logps)
    torch.testing.assert_close(grad, torch.tensor([[2.0, 1.0, 0.5]], dtype=torch.float64), rtol=1e-14, atol=0)


def test_importance_ratio_sequence_level():
    # Row 0: log r = [ln 2, 0, -ln 2], all active: s = exp(0) = 1 at every token.
    # Row 1: log r = [ln 4, 0, (padding: 0)], two active: s = exp(ln 4 / 2) = 2 at every token.
    # GSPO-token: each token's ratio has value s_i and d s_{i,t} / d logp_{i,t} = s_i (no path through the mean).
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]], dtype=torch.float64, requires_grad=True)
    old = logps.detach() - torch.tensor([[LN2, 0.0, -LN2], [2 * LN2, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    ratio = importance_ratio(logps, old, mask, "sequence")
    torch.testing.assert_close(ratio * mask, torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]], dtype=torch.float64),
                               rtol=1e-14, atol=1e-15)
    (grad,) = torch.autograd.grad((ratio * mask).sum(), logps)
    torch.testing.assert_close(grad, torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]], dtype=torch.float64),
                               rtol=1e-14, atol=1e-15)
    with pytest.raises(ValueError, match=r"importance_sampling_level='group' is unknown"):
        importance_ratio(logps, old, mask, "group")


# Ratios 0.5, 0.9, 1, 1.25, 1.5 in each row; A = +2 in row 0 and -1 in row 1; epsilon_low 0.2.
RATIOS = [0.5, 0.9, 1.0, 1.25, 1.5]
# -min(r A, clip(r, 0.8, 1.28) A), epsilon_high 0.28:
#   A = +2: r 0.5 -> -min(1.0, 1.6) = -1.0; 0.9 -> -1.8; 1 -> -2; 1.25 -> -2.5; 1.5 -> -min(3.0, 2.56) = -2.56
#   A = -1: r 0.5 -> -min(-0.5, -0.8) = 0.8; 0.9 -> 0.9; 1 -> 1; 1.25 -> 1.25; 1.5 -> -min(-1.5, -1.28) = 1.5
# and d l / d r = -A where r A is the min's choice, 0 where the clipped constant is.
CLIP_LOSS = [[-1.0, -1.8, -2.0, -2.5, -2.56], [0.8, 0.9, 1.0, 1.25, 1.5]]
CLIP_GRAD = [[-2.0, -2.0, -2.0, -2.0, 0.0], [0.0, 1.0, 1.0, 1.0, 1.0]]


def ratio_rows():
    ratio = torch.tensor([RATIOS, RATIOS], dtype=torch.float64, requires_grad=True)
    return ratio, torch.tensor([2.0, -1.0], dtype=torch.float64)


@pytest.mark.parametrize("loss_type", CLIPPED)
def test_per_token_loss_clip_by_hand(loss_type):
    ratio, adv = ratio_rows()
    loss = per_token_loss(ratio, adv, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28)
    torch.testing.assert_close(loss, torch.tensor(CLIP_LOSS, dtype=torch.float64), rtol=1e-14, atol=1e-15)
    (grad,) = torch.autograd.grad(loss.sum(), ratio)
    torch.testing.assert_close(grad, torch.tensor(CLIP_GRAD, dtype=torch.float64), rtol=0, atol=0)
    # epsilon_high left out is epsilon_low: r = 1.25 with A = +2 is clipped at 1.2 then: -2.4, no gradient.
    symmetric = per_token_loss(ratio, adv, loss_type=loss_type, epsilon_low=0.2)
    assert symmetric[0, 3].item() == pytest.approx(-2.4, rel=1e-14)
    assert symmetric[1].tolist() == pytest.approx(CLIP_LOSS[1], rel=1e-14)


def test_per_token_loss_cispo_by_hand():
    # l = -sg[min(r, 1.28)] A logp: the weights [0.5, 0.9, 1, 1.25, 1.28] whatever A's sign; no gradient
    # reaches the ratio, and d l / d logp = -weight * A at every token (none is cut).
    ratio, adv = ratio_rows()
    logps = torch.log(torch.tensor([[0.5, 0.4, 0.3, 0.2, 0.1]] * 2, dtype=torch.float64)).requires_grad_(True)
    loss = per_token_loss(ratio, adv, logps, loss_type="cispo", epsilon_low=0.2, epsilon_high=0.28)
    weights = [0.5, 0.9, 1.0, 1.25, 1.28]
    expected = [[-w * a * math.log(p) for w, p in zip(weights, [0.5, 0.4, 0.3, 0.2, 0.1])] for a in (2.0, -1.0)]
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64), rtol=1e-14, atol=1e-15)
    grad_ratio, grad_logps = torch.autograd.grad(loss.sum(), (ratio, logps), allow_unused=True)
    assert grad_ratio is None or torch.equal(grad_ratio, torch.zeros_like(ratio))
    torch.testing.assert_close(grad_logps, torch.tensor([[-2 * w for w in weights], weights], dtype=torch.float64),
                               rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match=r"cispo.*pass logps"):
        per_token_loss(ratio, adv, loss_type="cispo")


def test_per_token_loss_sapo_by_hand():
    # l = -(4 / tau) sigmoid(tau (r - 1)) A with tau_pos = 1 for A > 0 and tau_neg = 2 for A < 0 (far from
    # 1, so that a tau taken by the wrong sign shows); d l / d r = -4 sigma (1 - sigma) A, -A at r = 1.
    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    ratio, adv = ratio_rows()
    loss = per_token_loss(ratio, adv, loss_type="sapo", sapo_temperatures=(1.0, 2.0))
    expected = [[-4 * sigmoid(r - 1) * 2 for r in RATIOS], [4 / 2 * sigmoid(2 * (r - 1)) for r in RATIOS]]
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64), rtol=1e-14, atol=1e-15)
    assert loss[:, 2].tolist() == pytest.approx([-4.0, 1.0], rel=1e-14)  # r = 1: -(4 / tau) (1/2) A
    (grad,) = torch.autograd.grad(loss.sum(), ratio)
    gates = [[sigmoid(r - 1) for r in RATIOS], [sigmoid(2 * (r - 1)) for r in RATIOS]]
    slopes = [[-4 * s * (1 - s) * a for s in row] for row, a in zip(gates, (2.0, -1.0))]
    torch.testing.assert_close(grad, torch.tensor(slopes, dtype=torch.float64), rtol=1e-14, atol=1e-15)
    assert grad[:, 2].tolist() == pytest.approx([-2.0, 1.0], rel=1e-14)


def test_per_token_loss_unknown_type():
    ratio, adv = ratio_rows()
    with pytest.raises(ValueError, match=r"loss_type='ppo' is unknown; choose one of \['grpo'"):
        per_token_loss(ratio, adv, loss_type="ppo")


def test_k3_by_hand():
    # ref - logp = [ln 2, 0, -ln 2]:  k3 = e^d - d - 1 = [1 - ln 2, 0, ln 2 - 1/2], all >= 0;
    # d k3 / d logp = 1 - e^d = [-1, 0, 1/2] (toward the reference).
    logps = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    ref = logps.detach() + torch.tensor([[LN2, 0.0, -LN2]], dtype=torch.float64)
    kl = k3(logps, ref)
    torch.testing.assert_close(kl, torch.tensor([[1 - LN2, 0.0, LN2 - 0.5]], dtype=torch.float64), rtol=1e-14,
                               atol=1e-15)
    (grad,) = torch.autograd.grad(kl.sum(), logps)
    torch.testing.assert_close(grad, torch.tensor([[-1.0, 0.0, 0.5]], dtype=torch.float64), rtol=1e-14, atol=1e-15)


# Token terms of 3 completions: [1, 2, 3 | pad], [4 | pad], [] (padding holds 99, which must not count).
AGG_TERMS = [[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0], [99.0] * 4]
AGG_MASK = [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
AGG_EXPECTED = {
    "grpo": (6 / 3 + 4 / 1 + 0) / 3,   # each completion's token mean, then their mean: 2
    "bnpo": 10 / 4,                    # the micro-batch's token mean
    "dr_grpo": 10 / (3 * 5),           # N x max_completion_length 5
    "dapo": 10 / 20,                   # num_items_in_batch 20 (the step's tokens)
    "cispo": 10 / 20,                  # as dapo
    "sapo": (6 / 3 + 4 / 1 + 0) / 3,   # as grpo
}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_aggregate_each_normaliser_by_hand(loss_type):
    terms, mask = torch.tensor(AGG_TERMS, dtype=torch.float64), torch.tensor(AGG_MASK, dtype=torch.float64)
    loss = aggregate(terms, mask, loss_type=loss_type, max_completion_length=5, num_items_in_batch=20)
    assert loss.item() == pytest.approx(AGG_EXPECTED[loss_type], rel=1e-14)
    # All completions empty: 0, not NaN (every denominator is clamped at 1).
    empty = aggregate(terms, torch.zeros_like(mask), loss_type=loss_type, max_completion_length=5, num_items_in_batch=0)
    assert empty.item() == 0.0


def test_aggregate_names_the_missing_normaliser():
    terms, mask = torch.tensor(AGG_TERMS), torch.tensor(AGG_MASK, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"'dr_grpo' normalises by N \* max_completion_length"):
        aggregate(terms, mask, loss_type="dr_grpo")
    for loss_type in ("dapo", "cispo"):
        with pytest.raises(ValueError, match=rf"'{loss_type}' normalises by num_items_in_batch"):
            aggregate(terms, mask, loss_type=loss_type)


@pytest.mark.parametrize("loss_type, expected", [("grpo", 1 / 3), ("bnpo", 1 / 3), ("dr_grpo", 1 / 3), ("sapo", 1 / 3),
                                                 ("dapo", 4.0), ("cispo", 4.0)])
def test_loss_scale_each_loss_type(loss_type, expected):
    # 4 ranks x 3 micro-batches: the micro-batch means are averaged (1 / 3 here, DeepSpeed's rank average the
    # 1 / 4); dapo and cispo are already divided by the step's tokens, so world_size undoes the rank average.
    assert loss_scale(loss_type, world_size=4, accumulation_steps=3) == pytest.approx(expected, rel=1e-15)
    assert isinstance(loss_scale(loss_type, 4, 3), float)
    with pytest.raises(ValueError, match=r"loss_type='ppo' is unknown"):
        loss_scale("ppo", 4, 3)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_step_gradient_over_ranks_and_micro_batches(loss_type):
    """policy_loss x loss_scale, summed over K micro-batches and averaged over W ranks as DeepSpeed does, at
    r = 1: every token's gradient is -A_i times its weight in the step's loss (policy_loss's docstring), here
    from the counts alone: grpo, sapo 1 / (W K N len_i); bnpo 1 / (W K x its micro-batch's tokens);
    dr_grpo 1 / (W K N max_len); dapo, cispo 1 / (the step's tokens, all ranks and micro-batches)."""
    W, K, N, T, max_len = 2, 3, 4, 5, 6
    g = torch.Generator().manual_seed(30)
    leaves = [[(-3 * torch.rand(N, T, generator=g, dtype=torch.float64)).requires_grad_(True) for _ in range(K)]
              for _ in range(W)]
    advs = [[torch.randn(N, generator=g, dtype=torch.float64) for _ in range(K)] for _ in range(W)]
    masks = [[(torch.arange(T)[None] < torch.randint(0, T + 1, (N, 1), generator=g)).double() for _ in range(K)]
             for _ in range(W)]
    step_tokens = sum(m.sum() for rank in masks for m in rank).item()  # train.py's active_tokens
    scale = loss_scale(loss_type, W, K)
    total = 0.0
    for rank in range(W):
        for b in range(K):
            lp = leaves[rank][b]
            loss, _ = policy_loss(lp, lp.detach(), advs[rank][b], masks[rank][b], loss_type=loss_type,
                                  max_completion_length=max_len, num_items_in_batch=step_tokens)
            total = total + scale * loss / W  # each rank sums its micro-batches; the ranks are averaged
    total.backward()
    for rank in range(W):
        for b in range(K):
            m, adv = masks[rank][b], advs[rank][b][:, None]
            per_completion = 1 / (W * K * N * m.sum(1, keepdim=True).clamp(min=1))
            per_step_token = 1 / step_tokens
            weight = {"grpo": per_completion, "sapo": per_completion, "bnpo": 1 / (W * K * m.sum()),
                      "dr_grpo": 1 / (W * K * N * max_len), "dapo": per_step_token, "cispo": per_step_token}[loss_type]
            torch.testing.assert_close(leaves[rank][b].grad, -adv * m * weight, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_clip_statistics_by_hand(loss_type):
    # 8 active tokens: row 0, A = +1, r = [0.5, 1.0, 1.5, 1.3]; row 1, A = -1, r = [0.7, 0.5, 1.5, 1.45]; padding
    # r = 9 and 0.1. epsilon_low 0.2 (low bound 0.8) and epsilon_high 0.4 (high bound 1.4) differ, so that bounds
    # swapped or a side counted for the wrong sign of A change the counts:
    #   clipped surrogate: low = row 1's 0.7 and 0.5 (A < 0): 2/8; high = row 0's 1.5 (A > 0): 1/8
    #   cispo: the weight is capped where r > 1.4, either sign: 1.5, 1.5 and 1.45 -> high 3/8, low 0
    #   sapo: nothing is clipped
    ratio = torch.tensor([[0.5, 1.0, 1.5, 1.3, 9.0], [0.7, 0.5, 1.5, 1.45, 0.1]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    stats = clip_statistics(ratio, adv, mask, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.4)
    low, high = {"cispo": (0.0, 3 / 8), "sapo": (0.0, 0.0)}.get(loss_type, (2 / 8, 1 / 8))
    assert stats == pytest.approx({"clip_ratio": low + high, "clip_ratio_low": low, "clip_ratio_high": high}, abs=1e-15)
    assert all(isinstance(v, float) for v in stats.values())
    # epsilon_high 0.6 (bound 1.6): every r is inside the band on the high side.
    wide = clip_statistics(ratio, adv, mask, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.6)
    assert wide["clip_ratio_high"] == 0.0 and wide["clip_ratio_low"] == low


def reference_loss(logps, old, adv, mask, ref=None, beta=0.0, eps_low=0.2, eps_high=None,
                   loss_type="grpo", max_len=None, num_items=None, level="token"):
    """The loss written out token by token from the formulas in the project notes (lists of floats)."""
    eps_high = eps_low if eps_high is None else eps_high
    row_sums, row_lens = [], []
    for i in range(len(logps)):
        active = [t for t in range(len(mask[i])) if mask[i][t]]
        if level == "sequence":
            seq_ratio = math.exp(sum(logps[i][t] - old[i][t] for t in active) / max(len(active), 1))
        total = 0.0
        for t in active:
            r = seq_ratio if level == "sequence" else math.exp(logps[i][t] - old[i][t])
            clipped = min(max(r, 1 - eps_low), 1 + eps_high)
            term = -min(r * adv[i], clipped * adv[i])
            if ref is not None:
                d = ref[i][t] - logps[i][t]
                term += beta * (math.exp(d) - d - 1)
            total += term
        row_sums.append(total)
        row_lens.append(len(active))
    n = len(logps)
    if loss_type == "grpo":
        return sum(s / max(k, 1) for s, k in zip(row_sums, row_lens)) / n
    if loss_type == "bnpo":
        return sum(row_sums) / max(sum(row_lens), 1)
    if loss_type == "dr_grpo":
        return sum(row_sums) / (n * max_len)
    return sum(row_sums) / num_items


def normalisers(mask, loss_type, max_len, num_items):
    """[N, 1] (or scalar) denominators each token's term is divided by, per loss type."""
    n = mask.shape[0]
    if loss_type == "grpo":
        return n * mask.sum(1, keepdim=True).clamp(min=1)
    if loss_type == "bnpo":
        return mask.sum()
    if loss_type == "dr_grpo":
        return torch.tensor(float(n * max_len), dtype=mask.dtype)
    return torch.tensor(float(num_items), dtype=mask.dtype)


def type_kwargs(loss_type, max_len=8, num_items=13):
    return {"loss_type": loss_type, "max_completion_length": max_len, "num_items_in_batch": num_items}


# --- the hand example: N = 2, T = 3, the last token of row 1 is padding ---------------------------
# log r = logp - old:  row 0 [ln 1.5, 0, ln 0.5], row 1 [ln 1.1, ln 0.7, pad];  A = [2, -1], eps 0.2.
# row 0 (A = 2):  r = 1.5: min(3.0, 1.2 * 2 = 2.4) = 2.4 -> l = -2.4  (clipped, high side)
#                 r = 1.0: l = -2.0
#                 r = 0.5: min(1.0, 0.8 * 2 = 1.6) = 1.0 -> l = -1.0  (A > 0: the low clip never binds)
#                 sum -5.4 over 3 tokens
# row 1 (A = -1): r = 1.1: min(-1.1, -1.1) -> l = 1.1
#                 r = 0.7: min(-0.7, 0.8 * -1 = -0.8) = -0.8 -> l = 0.8  (clipped, low side)
#                 sum 1.9 over 2 tokens
HAND_EXPECTED = {
    "grpo": (-5.4 / 3 + 1.9 / 2) / 2,   # -0.425
    "bnpo": (-5.4 + 1.9) / 5,           # -0.7
    "dr_grpo": (-5.4 + 1.9) / (2 * 4),  # max_completion_length 4: -0.4375
    "dapo": (-5.4 + 1.9) / 7,           # num_items_in_batch 7: -0.5
}


def hand_inputs():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 123.0]], dtype=torch.float64)
    log_r = torch.tensor([[math.log(1.5), 0.0, math.log(0.5)], [math.log(1.1), math.log(0.7), 0.0]],
                         dtype=torch.float64)
    old = logps - log_r
    old[1, 2] = -77.0  # garbage under padding
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # ref - logp: row 0 [ln 2, 0, -ln 2], row 1 [0, ln 2, pad]
    ref = logps + torch.tensor([[LN2, 0.0, -LN2], [0.0, LN2, 55.0]], dtype=torch.float64)
    return logps, old, adv, mask, ref


@pytest.mark.parametrize("loss_type", CLIPPED)
def test_hand_example_each_loss_type(loss_type):
    logps, old, adv, mask, _ = hand_inputs()
    loss, stats = policy_loss(logps, old, adv, mask, **type_kwargs(loss_type, max_len=4, num_items=7))
    assert loss.item() == pytest.approx(HAND_EXPECTED[loss_type], rel=1e-12)
    # One high-side clip (row 0, r = 1.5) and one low-side clip (row 1, r = 0.7) among 5 tokens.
    assert stats["clip_ratio_high"] == pytest.approx(0.2)
    assert stats["clip_ratio_low"] == pytest.approx(0.2)
    assert stats["clip_ratio"] == pytest.approx(0.4)
    assert stats["kl"] == 0.0
    assert all(isinstance(v, float) for v in stats.values())


def test_kl_stat_and_beta_term_by_hand():
    logps, old, adv, mask, ref = hand_inputs()
    # k3(d) = e^d - d - 1:  k3(ln 2) = 1 - ln 2,  k3(0) = 0,  k3(-ln 2) = ln 2 - 1/2.
    k3 = [[1 - LN2, 0.0, LN2 - 0.5], [0.0, 1 - LN2]]
    beta = 0.1
    loss, stats = policy_loss(logps, old, adv, mask, ref_logps=ref, beta=beta)
    assert stats["kl"] == pytest.approx((1.5 - LN2) / 5, rel=1e-12)
    expected = ((-5.4 + beta * sum(k3[0])) / 3 + (1.9 + beta * sum(k3[1])) / 2) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # A reference with beta = 0 is still measured but does not enter the loss.
    loss0, stats0 = policy_loss(logps, old, adv, mask, ref_logps=ref, beta=0.0)
    assert loss0.item() == pytest.approx(HAND_EXPECTED["grpo"], rel=1e-12)
    assert stats0["kl"] == pytest.approx(stats["kl"])


def random_batch(n=4, t=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(n, t, generator=g, dtype=dtype) * 3
    old = logps + 0.3 * torch.randn(n, t, generator=g, dtype=dtype)
    ref = logps + 0.5 * torch.randn(n, t, generator=g, dtype=dtype)
    adv = torch.randn(n, generator=g, dtype=dtype)
    lengths = torch.tensor([t, t - 2, 1, t - 3][:n])
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    return logps, old, ref, adv, mask


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", CLIPPED)
def test_matches_python_reference(loss_type, level):
    logps, old, ref, adv, mask = random_batch()
    kw = type_kwargs(loss_type)
    loss, _ = policy_loss(logps, old, adv, mask, ref_logps=ref, beta=0.04, epsilon_high=0.28,
                          importance_sampling_level=level, **kw)
    expected = reference_loss(logps.tolist(), old.tolist(), adv.tolist(), mask.tolist(), ref.tolist(), 0.04,
                              0.2, 0.28, loss_type, kw["max_completion_length"], kw["num_items_in_batch"], level)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", CLIPPED)
def test_on_policy_gradient_is_policy_gradient_plus_kl(loss_type, level):
    # old = logp.detach(): r = 1, so d l / d logp = -A_i + beta * (1 - exp(ref - logp)), over the normaliser.
    logps, _, ref, adv, mask = random_batch(seed=1)
    logps.requires_grad_(True)
    beta = 0.1
    kw = type_kwargs(loss_type)
    loss, stats = policy_loss(logps, logps.detach(), adv, mask, ref_logps=ref, beta=beta,
                              importance_sampling_level=level, **kw)
    loss.backward()
    m = mask.double()
    norm = normalisers(m, loss_type, kw["max_completion_length"], kw["num_items_in_batch"])
    expected = m * (-adv[:, None] + beta * (1 - torch.exp(ref - logps.detach()))) / norm
    torch.testing.assert_close(logps.grad, expected, rtol=1e-12, atol=1e-15)
    assert stats["clip_ratio"] == 0.0


def test_on_policy_loss_value_is_minus_mean_advantage():
    logps, _, _, adv, mask = random_batch(seed=2)
    loss, _ = policy_loss(logps, logps.detach(), adv, mask)
    assert loss.item() == pytest.approx(-adv.mean().item(), rel=1e-12)


def test_clipped_tokens_get_zero_gradient():
    # Rows have A = +1, -1, 0; every row has r = [1.5, 0.5]; eps = 0.2; bnpo over 6 tokens.
    #   A > 0, r = 1.5: clipped at 1.2, the min picks the constant -> grad 0
    #   A > 0, r = 0.5: min(0.5, 0.8) picks r * A           -> d(-r A)/d logp = -r A / 6 = -1/12
    #   A < 0, r = 1.5: min(-1.5, -1.2) picks r * A          -> -r A / 6 = 0.25
    #   A < 0, r = 0.5: min(-0.5, -0.8) picks the constant   -> grad 0
    #   A = 0: both terms are 0, nothing to clip             -> grad 0, not counted
    old = torch.zeros(3, 2, dtype=torch.float64)
    logps = torch.tensor([[math.log(1.5), math.log(0.5)]] * 3, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
    loss, stats = policy_loss(logps, old, adv, torch.ones(3, 2), loss_type="bnpo")
    loss.backward()
    expected = torch.tensor([[0.0, -1 / 12], [0.25, 0.0], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logps.grad, expected)
    assert stats["clip_ratio_high"] == pytest.approx(1 / 6) and stats["clip_ratio_low"] == pytest.approx(1 / 6)
    assert stats["clip_ratio"] == pytest.approx(1 / 3)


def test_clip_higher_uses_epsilon_high_on_the_upper_side():
    # r = 1.25 with A > 0: clipped by 1 + 0.2, not by 1 + 0.28.  r = 0.75 with A < 0: clipped by 1 - 0.2 either way.
    old = torch.zeros(2, 1, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(2, 1)

    def run(**kw):
        logps = torch.tensor([[math.log(1.25)], [math.log(0.75)]], dtype=torch.float64, requires_grad=True)
        loss, stats = policy_loss(logps, old, adv, mask, loss_type="bnpo", **kw)
        loss.backward()
        return loss.item(), logps.grad.flatten().tolist(), stats

    loss, grad, stats = run(epsilon_low=0.2)
    assert loss == pytest.approx((-1.2 + 0.8) / 2)
    assert grad == [0.0, 0.0]
    assert stats["clip_ratio_high"] == 0.5 and stats["clip_ratio_low"] == 0.5
    loss, grad, stats = run(epsilon_low=0.2, epsilon_high=0.28)
    assert loss == pytest.approx((-1.25 + 0.8) / 2)
    assert grad == pytest.approx([-1.25 / 2, 0.0])
    assert stats["clip_ratio_high"] == 0.0 and stats["clip_ratio_low"] == 0.5 and stats["clip_ratio"] == 0.5


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", CLIPPED)
def test_padding_never_changes_loss_or_gradients(loss_type, level):
    _padding_never_changes_loss_or_gradients(loss_type, level)


@pytest.mark.parametrize("loss_type", ["cispo", "sapo"])
def test_padding_never_changes_cispo_or_sapo(loss_type):
    _padding_never_changes_loss_or_gradients(loss_type, "token")


def _padding_never_changes_loss_or_gradients(loss_type, level):
    logps, old, ref, adv, mask = random_batch(seed=3)
    kw = dict(beta=0.05, epsilon_high=0.28, importance_sampling_level=level, **type_kwargs(loss_type))

    def run(lp, o, r, m):
        lp = lp.clone().requires_grad_(True)
        loss, stats = policy_loss(lp, o, adv, m, ref_logps=r, **kw)
        loss.backward()
        return loss, stats, lp.grad

    loss, stats, grad = run(logps, old, ref, mask)
    n, pad = logps.shape[0], 3
    garbage = torch.tensor([[1e4, float("-inf"), float("nan")]] * n, dtype=logps.dtype)
    cat = lambda x, g: torch.cat([x, g], dim=1)  # noqa: E731
    loss_p, stats_p, grad_p = run(cat(logps, garbage), cat(old, -garbage), cat(ref, garbage.flip(1)),
                                  cat(mask, torch.zeros(n, pad, dtype=mask.dtype)))
    torch.testing.assert_close(loss_p, loss, rtol=1e-13, atol=0)
    torch.testing.assert_close(grad_p[:, :-pad], grad, rtol=1e-13, atol=0)
    assert torch.equal(grad_p[:, -pad:], torch.zeros(n, pad, dtype=logps.dtype))
    assert stats_p == pytest.approx(stats)


def test_empty_row_gives_no_nan():
    logps, old, _, adv, mask = random_batch(seed=4)
    mask[2] = 0
    logps.requires_grad_(True)
    for loss_type in CLIPPED:
        loss, stats = policy_loss(logps, old, adv, mask, **type_kwargs(loss_type))
        assert math.isfinite(loss.item())
        expected = reference_loss(logps.tolist(), old.tolist(), adv.tolist(), mask.tolist(), loss_type=loss_type,
                                  max_len=8, num_items=13)
        assert loss.item() == pytest.approx(expected, rel=1e-10)
        (grad,) = torch.autograd.grad(loss, logps)
        assert torch.equal(grad[2], torch.zeros_like(grad[2]))
    loss, _ = policy_loss(logps, old, adv, torch.zeros_like(mask))
    assert loss.item() == 0.0


def test_mask_dtypes_agree():
    logps, old, ref, adv, mask = random_batch(seed=5)
    results = [policy_loss(logps, old, adv, m, ref_logps=ref, beta=0.1)[0].item()
               for m in (mask.bool(), mask.int(), mask.long(), mask.float(), mask.double())]
    assert results == pytest.approx([results[0]] * len(results), rel=1e-12)


# --- GSPO: one ratio per sequence ----------------------------------------------------------------

def test_gspo_sequence_ratio_is_exp_mean_log_ratio_and_drives_clipping():
    # Row 0: log r = [0.5, -0.5] -> token ratios 1.65 / 0.61, but s = exp(0) = 1: nothing clipped.
    # Row 1: log r = [0.05, 0.05, pad] -> s = exp(0.05) = 1.0513 > 1 + 4e-4 with A > 0: both tokens clipped.
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.4, -0.6, 9.0]], dtype=torch.float64, requires_grad=True)
    old = logps.detach() - torch.tensor([[0.5, -0.5, 0.0], [0.05, 0.05, -3.0]], dtype=torch.float64)
    adv = torch.tensor([1.0, 2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    loss, stats = policy_loss(logps, old, adv, mask, loss_type="bnpo", epsilon_low=3e-4, epsilon_high=4e-4,
                              importance_sampling_level="sequence")
    loss.backward()
    # bnpo over 4 tokens: row 0 l = -1 * 1 per token; row 1 l = -(1 + 4e-4) * 2 per token.
    assert loss.item() == pytest.approx((2 * -1.0 + 2 * -(1 + 4e-4) * 2) / 4, rel=1e-12)
    # Row 0 unclipped: d l / d logp_t = -A * s / 4 = -0.25. Row 1 clipped: 0.
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.25, -0.25, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64))
    assert stats["clip_ratio_high"] == 0.5 and stats["clip_ratio_low"] == 0.0
    # The same batch at token level clips row 0's first token (1.65 > 1.0004) and all of row 1.
    _, token_stats = policy_loss(logps, old, adv, mask, loss_type="bnpo", epsilon_low=3e-4, epsilon_high=4e-4)
    assert token_stats["clip_ratio_high"] == 0.75


@pytest.mark.parametrize("loss_type", CLIPPED)
def test_gspo_gradient_equals_sequence_objective(loss_type):
    # Off-policy, unclipped: the gradient must be that of the plain sequence objective
    # J = -sum_i A_i * s_i(theta) * len_i / normaliser  with s_i = exp(mean_t (logp - old)),
    # i.e. d/d logp_{i,t} = -A_i * s_i * m_{i,t} / normaliser.
    logps, old, _, adv, mask = random_batch(seed=6)
    old = logps - 0.01 * torch.randn(logps.shape, generator=torch.Generator().manual_seed(7), dtype=logps.dtype)
    logps.requires_grad_(True)
    kw = type_kwargs(loss_type)
    loss, stats = policy_loss(logps, old, adv, mask, importance_sampling_level="sequence", **kw)
    loss.backward()
    assert stats["clip_ratio"] == 0.0
    m = mask.double()
    s = torch.exp(((logps.detach() - old) * m).sum(1) / m.sum(1))
    norm = normalisers(m, loss_type, kw["max_completion_length"], kw["num_items_in_batch"])
    torch.testing.assert_close(logps.grad, -adv[:, None] * s[:, None] * m / norm, rtol=1e-12, atol=1e-15)

    # And against autograd through s_i itself, with no stop-gradient trick.
    lp = logps.detach().clone().requires_grad_(True)
    s_live = torch.exp(((lp - old) * m).sum(1) / m.sum(1))
    per_token = -adv[:, None] * s_live[:, None] * m
    objective = {"grpo": (per_token.sum(1) / m.sum(1)).mean(), "bnpo": per_token.sum() / m.sum(),
                 "dr_grpo": per_token.sum() / (4 * 8), "dapo": per_token.sum() / 13}[loss_type]
    objective.backward()
    torch.testing.assert_close(logps.grad, lp.grad, rtol=1e-12, atol=1e-15)


# --- selective_log_softmax and token_entropy ------------------------------------------------------

VOCAB = 1000


def naive_logps(logits, ids):
    """The textbook formula: one log_softmax over the whole vocabulary, then pick the chosen token."""
    return torch.log_softmax(logits, -1).gather(-1, ids.long()[..., None]).squeeze(-1)


def random_logits(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 4).to(dtype)


def random_ids(shape, vocab, dtype, seed):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture(params=[1, 3, None], ids=["chunk=1", "chunk=3", "chunk=default"])
def positions_per_chunk(request, monkeypatch):
    """Chunks of 1 or 3 positions (T = 5 splits as 3 + 2) or the default size (one chunk per row)."""
    if request.param is not None:
        monkeypatch.setattr("grpo.objective.CHUNK_ELEMENTS", request.param * VOCAB)
    return request.param


@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selective_log_softmax_matches_naive_float64(dtype, ids_dtype, positions_per_chunk):
    logits = random_logits((3, 5, VOCAB), dtype, seed=0).requires_grad_(True)
    ids = random_ids((3, 5), VOCAB, ids_dtype, seed=1)
    # A random upstream gradient, so that each position's gradient has its own scale (sum() gives all 1).
    weights = torch.randn(3, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = selective_log_softmax(logits, ids)
    (grad,) = torch.autograd.grad((out * weights.to(dtype)).sum(), logits)

    exact_logits = logits.detach().double().requires_grad_(True)
    exact = naive_logps(exact_logits, ids)
    (exact_grad,) = torch.autograd.grad((exact * weights).sum(), exact_logits)
    assert out.dtype == dtype and out.shape == (3, 5)
    assert grad.dtype == dtype and grad.shape == logits.shape
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    # rtol as well for the values: float32 numbers near -17 are 2**-19 = 1.9e-6 apart.
    torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double(), exact_grad, rtol=0, atol=tol)
    # And the gradient in closed form: w * (onehot(id) - softmax(z)).
    onehot = torch.nn.functional.one_hot(ids.long(), VOCAB).double()
    closed_form = weights[..., None] * (onehot - torch.softmax(exact_logits.detach(), -1))
    torch.testing.assert_close(grad.double(), closed_form, rtol=0, atol=tol)


@pytest.mark.parametrize("overwrite", [False, True], ids=["copy", "overwrite"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selective_log_softmax_at_a_temperature(dtype, overwrite, positions_per_chunk):
    """log softmax(z / T)[id] and its gradient (onehot(id) - softmax(z / T)) / T, at T = 0.7; with
    overwrite_logits the gradient is written into the logits' own memory and is the same."""
    T = 0.7
    leaf = random_logits((3, 5, VOCAB), dtype, seed=20).requires_grad_(True)
    logits = leaf * 1  # a fresh tensor nothing else reads, as the model's logits are
    ids = random_ids((3, 5), VOCAB, torch.int64, seed=21)
    weights = torch.randn(3, 5, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    out = selective_log_softmax(logits, ids, temperature=T, overwrite_logits=overwrite)
    (grad,) = torch.autograd.grad((out * weights.to(dtype)).sum(), leaf)

    z = leaf.detach().double()
    exact = torch.log_softmax(z / T, -1).gather(-1, ids[..., None]).squeeze(-1)
    onehot = torch.nn.functional.one_hot(ids, VOCAB).double()
    closed_form = weights[..., None] * (onehot - torch.softmax(z / T, -1)) / T
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol)
    # rtol as well: at T = 0.7 the chosen token's gradient reaches about 4, where float32 steps are 5e-7.
    torch.testing.assert_close(grad.double(), closed_form, rtol=tol, atol=tol)
    if overwrite:  # the gradient took the logits' memory: it holds the gradient now
        torch.testing.assert_close(logits.detach().double(), closed_form, rtol=tol, atol=tol)


def test_the_temperature_divides_in_float32():
    """Dividing bf16 logits by T = 0.7 in bf16 rounds them a second time; selective_log_softmax divides
    each float32 chunk, as generate's sampler does, and matches float64 to float32 precision."""
    T = 0.7
    logits = random_logits((4, 64, VOCAB), torch.bfloat16, seed=23)
    ids = random_ids((4, 64), VOCAB, torch.int64, seed=24)
    exact = torch.log_softmax(logits.double() / T, -1).gather(-1, ids[..., None]).squeeze(-1)
    ours = selective_log_softmax(logits, ids, temperature=T).double()
    divided_in_bf16 = selective_log_softmax(logits / T, ids).double()
    assert (ours - exact).abs().max() < 1e-5
    assert (divided_in_bf16 - exact).abs().mean() > 100 * (ours - exact).abs().mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_entropy_at_a_temperature(dtype, positions_per_chunk):
    T = 0.7
    logits = random_logits((3, 5, VOCAB), dtype, seed=25)
    p = torch.softmax(logits.double() / T, -1)
    torch.testing.assert_close(token_entropy(logits, temperature=T).double(), -torch.special.xlogy(p, p).sum(-1),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_selective_log_softmax_low_precision_gradient(dtype, positions_per_chunk):
    logits = random_logits((3, 5, VOCAB), dtype, seed=3).requires_grad_(True)
    ids = random_ids((3, 5), VOCAB, torch.int64, seed=4)
    weights = torch.randn(3, 5, generator=torch.Generator().manual_seed(5))
    out = selective_log_softmax(logits, ids)
    (grad,) = torch.autograd.grad((out * weights).sum(), logits)

    # The naive float32 computation on the same low-precision numbers, upcast.
    upcast = logits.detach().float().requires_grad_(True)
    naive = naive_logps(upcast, ids)
    (naive_grad,) = torch.autograd.grad((naive * weights).sum(), upcast)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, naive, rtol=0, atol=1e-5)
    # The gradient comes back in the logits' dtype: the float32 one, rounded once (one unit in the
    # last place relative; atol covers fp16's subnormals below 6e-5).
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), naive_grad, rtol=torch.finfo(dtype).eps, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_selective_log_softmax_low_precision_values(dtype):
    logits = random_logits((2, 4, 4096), dtype, seed=6)
    ids = random_ids((2, 4), 4096, torch.int64, seed=7)
    out = selective_log_softmax(logits, ids)
    assert out.dtype == torch.float32
    # The exact log-probs of the (rounded) low-precision logits, computed in float64.
    torch.testing.assert_close(out.double(), naive_logps(logits.double(), ids), rtol=0, atol=1e-5)
    # log_softmax in the low precision itself is off by up to ~0.1 nats: why we upcast.
    torch.testing.assert_close(out, naive_logps(logits, ids).float(), rtol=0, atol=0.1)


@pytest.mark.parametrize("layout", ["transposed", "strided_vocabulary"])
def test_selective_log_softmax_non_contiguous(layout, positions_per_chunk):
    if layout == "transposed":
        base = random_logits((5, 3, VOCAB), torch.float32, seed=8)
        view = lambda x: x.transpose(0, 1)  # noqa: E731
    else:
        base = random_logits((3, 5, 2 * VOCAB), torch.float32, seed=8)
        view = lambda x: x[..., ::2]  # noqa: E731
    base.requires_grad_(True)
    logits = view(base)
    assert logits.shape == (3, 5, VOCAB) and not logits.is_contiguous()
    ids = random_ids((3, 5), VOCAB, torch.int64, seed=9)
    weights = torch.randn(3, 5, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    out = selective_log_softmax(logits, ids)
    (grad,) = torch.autograd.grad((out * weights.float()).sum(), base)

    exact_base = base.detach().double().requires_grad_(True)
    exact = naive_logps(view(exact_base), ids)
    (exact_grad,) = torch.autograd.grad((exact * weights).sum(), exact_base)
    torch.testing.assert_close(out.double(), exact, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), exact_grad, rtol=0, atol=1e-6)


def test_selective_log_softmax_saves_no_float32_copy_of_the_logits():
    # Autograd through a float32 log_softmax of bf16 logits keeps its float32 [N, T, V] output for
    # backward (the old row-by-row code kept one [T, V] block per row: N * T * V in all).
    n, t, v = 4, 16, 5000
    logits = random_logits((n, t, v), torch.bfloat16, seed=11).requires_grad_(True)
    ids = random_ids((n, t), v, torch.int64, seed=12)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = selective_log_softmax(logits, ids)
    # Count each storage once: several nodes may save the same tensor, or views of one.
    storages = {s.untyped_storage().data_ptr(): s for s in saved}.values()
    float32_bytes = sum(s.untyped_storage().nbytes() for s in storages if s.dtype == torch.float32)
    assert float32_bytes < n * t * v * 4 / 2
    # What it keeps of the logits is the input itself, not a copy.
    assert any(s.dtype == torch.bfloat16 and s.data_ptr() == logits.data_ptr() for s in saved)
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


class LargestFloat32Tensor(TorchDispatchMode):
    """Records the largest float32 storage that any operation returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
                self.largest = max(self.largest, tensor.untyped_storage().nbytes())
        return out


def test_float32_temporaries_are_one_chunk(monkeypatch):
    n, t, v = 4, 16, 5000
    monkeypatch.setattr("grpo.objective.CHUNK_ELEMENTS", 4 * v)  # 4 positions per chunk: 16 chunks
    logits = random_logits((n, t, v), torch.bfloat16, seed=13).requires_grad_(True)
    ids = random_ids((n, t), v, torch.int64, seed=14)
    with LargestFloat32Tensor() as forward_backward:
        selective_log_softmax(logits, ids).sum().backward()
    with LargestFloat32Tensor() as entropy:
        token_entropy(logits)
    # A row of the old code's float32 log_softmax alone is t * v * 4 bytes, four times this.
    assert forward_backward.largest <= 4 * v * 4
    assert entropy.largest <= 4 * v * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_entropy_matches_minus_p_log_p(dtype, positions_per_chunk):
    logits = random_logits((3, 5, VOCAB), dtype, seed=15).requires_grad_(True)
    p = torch.softmax(logits.detach().double(), -1)
    expected = -torch.special.xlogy(p, p).sum(-1)
    entropy = token_entropy(logits)
    assert entropy.dtype == torch.float32 and entropy.shape == (3, 5)
    assert not entropy.requires_grad
    torch.testing.assert_close(entropy.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_entropy_is_zero_when_certain_and_log_v_when_uniform(dtype):
    # One logit 100 above the rest: H = -(1 - eps) log(1 - eps) - (V - 1) (eps / (V - 1)) log(eps / (V - 1)),
    # eps = (V - 1) e^-100, about 1e-36: 0 in any float.
    certain = torch.zeros(2, 3, VOCAB, dtype=dtype)
    certain[..., 7] = 100.0
    torch.testing.assert_close(token_entropy(certain), torch.zeros(2, 3), rtol=0, atol=1e-6)
    # Equal logits (of any value): p = 1/V, H = log V.
    uniform = torch.full((2, 3, VOCAB), 2.5, dtype=dtype)
    torch.testing.assert_close(token_entropy(uniform), torch.full((2, 3), math.log(VOCAB)), rtol=1e-6, atol=0)


# --- errors --------------------------------------------------------------------------------------

def test_errors_name_the_problem():
    logps, old, ref, adv, mask = random_batch()
    with pytest.raises(ValueError, match=r"'grpo', 'bnpo', 'dr_grpo', 'dapo'"):
        policy_loss(logps, old, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match=r"'token', 'sequence'"):
        policy_loss(logps, old, adv, mask, importance_sampling_level="group")
    with pytest.raises(ValueError, match=r"max_completion_length"):
        policy_loss(logps, old, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match=r"num_items_in_batch"):
        policy_loss(logps, old, adv, mask, loss_type="dapo")
    with pytest.raises(ValueError, match=r"old_logps has shape \(4, 5\) but logps has shape \(4, 6\)"):
        policy_loss(logps, old[:, :5], adv, mask)
    with pytest.raises(ValueError, match=r"mask has shape \(3, 6\)"):
        policy_loss(logps, old, adv, mask[:3])
    with pytest.raises(ValueError, match=r"ref_logps has shape \(4, 2\)"):
        policy_loss(logps, old, adv, mask, ref_logps=ref[:, :2], beta=0.1)
    with pytest.raises(ValueError, match=r"advantages has shape \(4, 1\)"):
        policy_loss(logps, old, adv[:, None], mask)
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        policy_loss(logps[0], old[0], adv, mask[0])
    with pytest.raises(ValueError, match=r"load a reference model or set beta to 0"):
        policy_loss(logps, old, adv, mask, beta=0.04)
    with pytest.raises(ValueError, match=r"negative"):
        policy_loss(logps, old, adv, mask, ref_logps=ref, beta=-1.0)
    with pytest.raises(ValueError, match=r"logits \[N, T, V\]"):
        selective_log_softmax(torch.zeros(2, 3, 10), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits \[N, T, V\], got shape \(2, 10\)"):
        token_entropy(torch.zeros(2, 10))


def test_loss_types_tuple():
    assert LOSS_TYPES == CLIPPED + ("cispo", "sapo")


# ---------------------------------------------------------------- CISPO and SAPO, worked by hand
# Two completions of two tokens; ratios r = [[1.5, 0.5], [2.0, 1.0]], advantages +1 and -1, and the
# current log-probs log [[0.3, 0.2], [0.4, 0.1]] (old = logp - log r).

def _two_by_two():
    r = torch.tensor([[1.5, 0.5], [2.0, 1.0]], dtype=torch.float64)
    logps = torch.log(torch.tensor([[0.3, 0.2], [0.4, 0.1]], dtype=torch.float64)).requires_grad_(True)
    return logps, (logps - torch.log(r)).detach(), torch.tensor([1.0, -1.0], dtype=torch.float64), torch.ones(2, 2)


def test_cispo_by_hand():
    """l = -sg[min(r, 1 + eps_high)] A logp, over the step's 4 tokens; eps_high 0.2 caps the weights at 1.2:
    weights [[1.2, 0.5], [1.2, 1.0]]; the two capped tokens are counted in clip_ratio."""
    logps, old, adv, mask = _two_by_two()
    loss, stats = policy_loss(logps, old, adv, mask, loss_type="cispo", epsilon_high=0.2, num_items_in_batch=4)
    terms = [-1.2 * 1 * math.log(0.3), -0.5 * 1 * math.log(0.2), -1.2 * -1 * math.log(0.4), -1.0 * -1 * math.log(0.1)]
    assert loss.item() == pytest.approx(sum(terms) / 4, abs=1e-12)  # -0.2881615...
    (grad,) = torch.autograd.grad(loss, logps)
    expected = torch.tensor([[-1.2 / 4, -0.5 / 4], [1.2 / 4, 1.0 / 4]], dtype=torch.float64)  # the weights, not r
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)
    assert stats["clip_ratio"] == pytest.approx(0.5)


def test_sapo_by_hand():
    """l = -(4 / tau) sigmoid(tau (r - 1)) A, tau 1.0 for A > 0 and 1.05 for A < 0, averaged per completion
    and then over completions; its gradient in logp is -4 sigma (1 - sigma) A r / (2 x 2)."""
    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    logps, old, adv, mask = _two_by_two()
    loss, stats = policy_loss(logps, old, adv, mask, loss_type="sapo", sapo_temperatures=(1.0, 1.05))
    row0 = [-4 * sigmoid(0.5), -4 * sigmoid(-0.5)]
    row1 = [4 / 1.05 * sigmoid(1.05), 4 / 1.05 * sigmoid(0.0)]
    assert loss.item() == pytest.approx((sum(row0) / 2 + sum(row1) / 2) / 2, abs=1e-12)  # 0.18169...
    (grad,) = torch.autograd.grad(loss, logps)
    gate = [[sigmoid(0.5), sigmoid(-0.5)], [sigmoid(1.05), sigmoid(0.0)]]
    r, a = [[1.5, 0.5], [2.0, 1.0]], [1.0, -1.0]
    expected = [[-4 * gate[i][t] * (1 - gate[i][t]) * a[i] * r[i][t] / 4 for t in range(2)] for i in range(2)]
    torch.testing.assert_close(grad, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert stats["clip_ratio"] == 0.0


@pytest.mark.parametrize("loss_type, same_as", [("cispo", "dapo"), ("sapo", "grpo")])
def test_at_ratio_one_cispo_and_sapo_give_the_policy_gradient(loss_type, same_as):
    """With one update per rollout (old = logp.detach(), r = 1) both give exactly the gradient of the loss
    they aggregate like: cispo's weight is 1 and sapo's gate has slope 1 there."""
    logps = torch.log(torch.tensor([[0.3, 0.2, 0.5], [0.4, 0.1, 0.9]], dtype=torch.float64)).requires_grad_(True)
    adv, mask = torch.tensor([0.7, -1.3], dtype=torch.float64), torch.tensor([[1, 1, 0], [1, 1, 1]])
    grads = {}
    for kind in (loss_type, same_as):
        loss, _ = policy_loss(logps, logps.detach(), adv, mask, loss_type=kind, num_items_in_batch=5)
        (grads[kind],) = torch.autograd.grad(loss, logps)
    torch.testing.assert_close(grads[loss_type], grads[same_as], rtol=0, atol=1e-12)


def test_cispo_and_sapo_take_no_sequence_ratio():
    logps, old, adv, mask = _two_by_two()
    for loss_type in ("cispo", "sapo"):
        with pytest.raises(ValueError, match="'sequence' \\(GSPO\\) goes with grpo"):
            policy_loss(logps, old, adv, mask, loss_type=loss_type, num_items_in_batch=4,
                        importance_sampling_level="sequence")
