"""train.py's glue around the loss, on two gloo ranks: the scale of one optimizer step across ranks
and accumulation micro-steps (loss_scale, policy_update), the old log-probs of num_iterations > 1
(learn_from), and per-rank sampling seeds (seed_this_rank).

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


@pytest.mark.parametrize("stage", [3, 0])
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
