"""grpo/advantage.py against statistics computed independently with Python's statistics module."""

import statistics

import pytest
import torch

from grpo.advantage import combine_rewards, equal_reward_group_fraction, group_advantages, groups_with_signal

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
