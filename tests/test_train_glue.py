"""train.py's glue around the loss, on two gloo ranks, through the functions main calls: the scale of one
optimizer step across ranks and accumulation micro-steps (train.learn_from, train.update, the loss's
scale), the old log-probs of num_iterations > 1, a non-finite loss in any micro-batch skipping the step,
per-rank sampling seeds (seed_this_rank), ZeRO-3's one gather per rollout; and, in one process, the
rewards' weights (train.score).

One `deepspeed --num_gpus 2 tests/glue_worker.py` launch (~30 s) does the work for every test
here: each rank trains on its share of one step, and rank 0 redoes the step in one process from
the loss's definitions (see the worker's docstring). The tests read its JSON.
"""

import json

import pytest
from conftest import run_command

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
# float32 noise: all weights together agree to ~1e-6, the worst single tensor (a small layer norm)
# to ~3e-4. A wrong factor of 2 anywhere is a relative error of 0.5 or 1.
TOTAL_TOLERANCE, WORST_TENSOR_TOLERANCE = 1e-4, 1e-2


@pytest.fixture(scope="module")
def glue(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("glue")
    out = tmp / "glue.json"
    run_command(["deepspeed", "--num_gpus", "2", "tests/glue_worker.py", "--model", tiny_model, "--out", str(out)], tmp)
    return json.loads(out.read_text())


def _assert_matches(result: dict, what: str) -> None:
    report = json.dumps(result, indent=1)
    assert result["change_norm"] > 0.1 * result["gradient_norm"] > 0, f"{what}: the weights did not move\n{report}"
    assert result["total_relative_error"] < TOTAL_TOLERANCE, f"{what}\n{report}"
    assert result["worst_relative_error"] < WORST_TENSOR_TOLERANCE, f"{what}\n{report}"


@pytest.mark.parametrize("stage", [3, 2, 0])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_one_step_over_two_ranks_and_two_micro_steps_is_the_gradient_of_the_step_loss(glue, loss_type, stage):
    """With SGD at lr 1, each weight's change is minus the gradient of the whole step's loss as its
    loss_type defines it (grpo: mean over the step's rows; bnpo: mean over its 4 micro-batches of
    token means; dr_grpo: mean over micro-batches of sum / (rows x max_completion_length); dapo:
    sum over the step's tokens / the step's active tokens; cispo and sapo: their own per-token losses,
    aggregated as dapo and as grpo), beta = 0.04 included."""
    result = glue["scale"][f"stage{stage}"][loss_type]
    assert result["updates"] == 1
    _assert_matches(result, f"ZeRO-{stage}, loss_type={loss_type}: the step's weight change is not -gradient "
                            "of the step's loss (a wrong scale over ranks or micro-steps?)")


def test_old_logps_are_the_weights_before_the_first_update(glue):
    """num_iterations = 2: the old log-probs stored on the rollout are those of the initial weights
    (the same after each update), and the second update's change is the gradient with
    r = exp(logp(after update 1) - logp(initial)), not the ratio-1 gradient."""
    result = glue["old_logps"]
    report = json.dumps(result, indent=1)
    assert result["updates"] == 2, report
    for error in result["old_logps_error_per_update"]:
        assert error is not None and error < 1e-4, f"rollout.old_logps are not the pre-step log-probs\n{report}"
    _assert_matches(result["first_update"], "update 1 (ratio 1)")
    # The check can tell the right old log-probs from ones taken after update 1: the ratio moved.
    assert result["logp_moved_by_first_update"] > 0.05, report
    assert result["gap_between_expectations"] > 0.1, report
    _assert_matches(result["second_update"], "update 2 did not use the log-probs of the weights before update 1")


def test_ranks_seeded_alike_sample_differently(glue):
    """Both ranks get --seed's value and the same prompt and image; their completions must differ,
    while re-seeding reproduces a rank's own, and a shared generator state gives shared samples."""
    result = glue["seeds"]
    report = json.dumps(result)
    assert result["same_generator_state_identical"], f"sampling is not deterministic, the check means nothing\n{report}"
    assert result["reseed_reproduces"], report
    assert not result["ranks_identical"], f"two ranks sampled the same completions from one seed\n{report}"


@pytest.mark.parametrize("path", ["shared", "plain"])
def test_zero3_gathers_the_weights_once_per_sampling_call(glue, path):
    """(d) Under ZeRO-3 one sample_groups call (prefill, then generate's decode steps) receives the model's
    weights once: the elements its all-gathers receive are the model's size (each tensor's partition
    padded to a multiple of the 2 ranks at most). With DeepSpeed's hooks left on during generate, the
    shared path gathered 3.96 times the model here and the plain path 1.75 times. Afterwards every
    weight is partitioned again, and a training step still gathers and releases them."""
    g = glue["gathers"]
    assert g["parameter_elements"] <= g[f"gathered_{path}"] <= g["parameter_elements"] + g["parameter_tensors"]
    assert g[f"released_after_{path}"] == []
    assert g["released_after_training_step"] == []


def test_zero3_lora_sampling_merges_inside_the_one_gather_and_leaves_every_weight_as_it_was(glue):
    """(d) A LoRA policy under ZeRO-3: one sampling call gathers the model (adapters included) once, the
    adapters merged into the gathered weights for it (families.adapters_merged); afterwards every weight
    is partitioned again and bitwise as before, and so are the log-probs."""
    g = glue["lora_sampling"]
    report = json.dumps(g)
    assert g["parameter_elements"] <= g["gathered"] <= g["parameter_elements"] + g["parameter_tensors"], report
    assert g["adapter_calls_while_sampling"] == 0, report
    assert g["released_after"] == [] and g["weights_unchanged"] and g["logps_unchanged"], report


def test_zero3_traces_a_micro_batch_and_gathers_each_weight_once_per_micro_batch(glue):
    """(d) [ZeRO-3 prefetch] A step: one sampling call, then an optimizer step of 2 micro-batches (each a
    prompt pass, a completion pass and their backward). DeepSpeed's own trace starts at every call of the
    model, so the next call never repeats it: it is discarded within every step, and every pass gathers on
    demand, 8.4 times the model per update here. With the micro-batch as the trace's step (distributed.trace_micro_batches,
    and gathered_weights keeping the trace across the sampling call), the trace is complete from the
    second step on, nothing invalidates it, prefetching can run, and a weight gathered for the prompt
    pass is kept for the completion pass and the backward: once per micro-batch (2 per update).
    Sampling gathers the model once either way, and every weight is partitioned again after the step."""
    report = json.dumps(glue["gathers_per_step"], indent=1)
    before, after = glue["gathers_per_step"]["deepspeed"], glue["gathers_per_step"]["traced"]
    for step in before:
        assert step["update"] > 3 * 2 and step["invalidations"] > 0, report  # 3 passes a micro-batch, 2 micro-batches
    for step in after[1:]:
        assert step["invalidations"] == 0 and step["trace_complete"], report
        assert 2.0 <= step["update"] and step["update_padding_bound"] <= 2, report  # 2 x (the model + padding)
    for step in before + after:
        assert 1.0 <= step["generate"] < 1.1 and step["released_after_step"] == [], report


@pytest.mark.parametrize("fault", ["loss", "gradient"])
@pytest.mark.parametrize("stage", [3, 2, 0])
def test_a_nonfinite_loss_in_any_micro_batch_skips_the_whole_step(glue, stage, fault):
    """(e) Rank 1's first micro-batch of two has a NaN loss, or a finite loss with an infinite gradient;
    the others are finite. Both ranks skip the optimizer step and no weight moves, though the
    micro-batches after the bad one were finite; the next, finite, step trains. The check is one fused reduction over the rank's gradients and one all-reduce
    per optimizer step: the loop's own all-reduces in a step of two micro-batches are 1 (it was one per
    micro-batch and one per step, and under ZeRO-2 one more per parameter)."""
    result = glue["nonfinite"][f"stage{stage}-{fault}"]  # rank 0's view: the skip is agreed, the weights gathered whole
    report = json.dumps(result)
    assert result["skipped"] is True, report
    assert result["largest_change"] == 0.0, report
    assert result["finite_step_skipped"] is False and result["finite_step_change"] > 0, report
    assert result["loop_all_reduces"] == 1, report


def test_reward_weights_reach_the_rewards_and_the_advantages():
    """Steps 3 and 4 as main runs them (train.score): --reward_weights 2 0.5 make R = 2 r_accuracy +
    0.5 r_format, and the group-normalised advantages come from that R. By hand, for one group of 4:
    accuracy 1, 0, 1, 0 and format 1, 1, 0, 0 give R = 2.5, 0.5, 2, 0; mean 1.25; sample std
    sqrt((1.5625 + 0.5625 + 0.5625 + 1.5625) / 3) = sqrt(17 / 12)."""
    import math

    import torch

    import train
    from grpo import config, policy, rewards

    args = config.parse_args(["--reward_funcs", "accuracy", "format", "--reward_weights", "2", "0.5",
                              "--num_generations", "4"])
    gold = "<answer>B</answer>"
    texts = ["<think>x</think><answer>B</answer>", "<think>x</think><answer>A</answer>", "B", "A"]
    rollout = policy.Rollout(prompt_inputs={}, completion_ids=torch.zeros(4, 3, dtype=torch.long),
                             completion_mask=torch.ones(4, 3, dtype=torch.long), texts=texts,
                             truncated=torch.zeros(4, dtype=torch.bool),
                             sampling=policy.Sampling(tokenizer=None, group_size=4, max_new_tokens=3, temperature=1.0,
                                                      end_ids=(0,)),
                             examples=[{"problem": "Which? Choices: A: red B: green", "solution": gold}])
    failures = train.score(rollout, rewards.get_reward_funcs(args.reward_funcs), args, rewards.RewardFaults(print))
    assert failures == [0, 0]
    assert rollout.reward_per_func.tolist() == [[1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]
    assert rollout.rewards.tolist() == pytest.approx([2.5, 0.5, 2.0, 0.0])
    std = math.sqrt(17 / 12)
    expected = [(r - 1.25) / (std + 1e-4) for r in (2.5, 0.5, 2.0, 0.0)]
    assert rollout.advantages.tolist() == pytest.approx(expected, rel=1e-5)


def test_peak_memory_per_phase_on_the_cpu():
    """memory/*_peak_gb on the CPU is each phase's own peak resident memory: reset at the phase's start.
    A 400 MB tensor made and dropped raises the peak by about 0.37 GiB; after a reset it is gone."""
    import torch

    from grpo import distributed

    cpu = torch.device("cpu")
    distributed.reset_peak_memory(cpu)
    before = distributed.peak_memory_gb(cpu)
    block = torch.ones(100_000_000)  # 400 MB, written so that its pages are resident
    del block
    during = distributed.peak_memory_gb(cpu)
    distributed.reset_peak_memory(cpu)
    after = distributed.peak_memory_gb(cpu)
    assert during - before > 0.35
    assert after < during - 0.3


def test_phase_times_on_a_gpu_are_read_after_the_device_finishes(monkeypatch):
    """On a GPU the host queues kernels and runs ahead: a phase's clock is read after
    torch.cuda.synchronize, at its start and at its end, else it times the launches. The device and the
    clock are mocked: the calls come in that order, and the phase's seconds are the two readings apart."""
    import torch

    from grpo import distributed

    events, readings = [], iter([10.0, 12.5, 20.0, 20.25])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("synchronize", device)))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: events.append("reset peak"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(distributed.time, "perf_counter", lambda: events.append("clock") or next(readings))
    gpu = torch.device("cuda", 0)
    phases = distributed.Phases(gpu)
    with phases("update"):
        events.append("work")
    assert events == [("synchronize", gpu), "clock", "reset peak", "work", ("synchronize", gpu), "clock"]
    assert phases.metrics() == {"time/update_seconds": 2.5, "memory/update_peak_gb": 3.0}
    events.clear()
    with distributed.Phases(torch.device("cpu"))("generate"):  # the CPU's work is done when the call returns
        events.append("work")
    assert events == ["clock", "work", "clock"]
