"""Never lose a run: kill and resume, interrupted and failed saves, SIGTERM, non-finite losses and
reward functions that raise, through train.py as a user runs it. Faults are put in by
tests/fault_worker.py (train.py plus a few wrapped functions)."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, read_metrics, run_command

RUN = ["--num_generations", "4", "--per_device_train_batch_size", "2", "--max_completion_length", "12",
       "--learning_rate", "1e-3", "--beta", "0.04", "--logging_steps", "1", "--max_pixels", "3136",
       "--log_completions_steps", "0"]


def _train(out, model, dataset, tmp_path, *flags, faults=None, returncode=0, launcher=(sys.executable,), timeout=1200):
    env = {"GRPO_TEST_FAULTS": json.dumps(faults or {})}
    return run_command([*launcher, "tests/fault_worker.py", "--output_dir", str(out), "--model_name_or_path", model,
                        "--dataset_name", dataset, *RUN, *flags], tmp_path, returncode=returncode, env=env,
                       timeout=timeout)


def _weights(folder):
    """The weights as from_pretrained loads them (a ZeRO-3 save names some keys differently on disk)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(folder)).state_dict()


def _max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _prompts(record, ranks):
    return [[json.loads(line) for line in open(f"{record}.{rank}")] for rank in range(ranks)]


@pytest.mark.parametrize("ranks, iterations", [(1, 1), (2, 1), (1, 2)])
def test_killed_and_resumed_run_ends_where_the_straight_run_does(ranks, iterations, format_warmed_model,
                                                                 colour_dataset, tmp_path):
    """6 steps straight, against 3 steps, SIGKILL, and a resume to 6: the same prompts in the same
    order, the same rewards at every step (the random generators were restored), the same final
    weights, and logs that continue where they stopped. 8 prompts, 2 per rank per step: the resume
    lands mid-epoch and crosses into the next one. With 2 updates per rollout the checkpoint is
    taken at the end of the rollout that reaches step 3: step 4. The next prompts are prepared on a
    thread, as a GPU run's default is."""
    launcher = ([sys.executable] if ranks == 1 else
                ["deepspeed", "--num_gpus", "2"])
    saved_at = 3 if iterations == 1 else 4
    flags = ["--max_steps", "6", "--save_steps", "3", "--report_to", "tensorboard", "--num_iterations", str(iterations),
             "--log_completions_steps", "1", "--dataloader_num_workers", "1"]  # prepared ahead, as on a GPU
    if ranks == 2:
        flags += ["--deepspeed", "zero3.json", "--gradient_accumulation_steps", "1"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    _train(straight, format_warmed_model, colour_dataset, tmp_path, *flags, launcher=launcher,
           faults={"record_prompts": str(tmp_path / "straight-prompts")})
    _train(broken, format_warmed_model, colour_dataset, tmp_path, *flags, launcher=launcher, returncode=None,
           faults={"record_prompts": str(tmp_path / "broken-prompts"), "kill_after_save": saved_at})
    assert os.path.isdir(broken / f"checkpoint-{saved_at}") and not os.path.exists(broken / "model.safetensors")
    log = _train(broken, format_warmed_model, colour_dataset, tmp_path, *flags, "--resume_from_checkpoint", "latest",
                 launcher=launcher, faults={"record_prompts": str(tmp_path / "broken-prompts")})
    assert f"resumed from {broken / f'checkpoint-{saved_at}'} at step {saved_at} of 6" in log

    # The killed run may have drawn the next rollout's prompts before it died; the resume takes
    # them again.
    seen = _prompts(tmp_path / "broken-prompts", ranks)
    expected = _prompts(tmp_path / "straight-prompts", ranks)
    rollouts, before = 6 // iterations, saved_at // iterations
    for rank in range(ranks):
        assert seen[rank][:before] + seen[rank][-(rollouts - before):] == expected[rank][:rollouts]
    epoch = 8 // (2 * ranks)  # rollouts per pass over the 8 prompts: each seen once per epoch
    if rollouts >= epoch:
        assert sorted(i for rank in range(ranks) for step in expected[rank][:epoch] for i in step) == list(range(8))

    resumed, uninterrupted = read_metrics(broken), read_metrics(straight)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(resumed, uninterrupted):
        assert a["reward/mean"] == b["reward/mean"] and a["completion/length_mean"] == b["completion/length_mean"]
        assert a["optim/learning_rate"] == pytest.approx(b["optim/learning_rate"], rel=1e-9)
    assert _max_difference(_weights(broken), _weights(straight)) < 1e-5
    # completions.jsonl too: the killed run's lines after the checkpoint were dropped and redone.
    completions = [(broken / "completions.jsonl").read_text(), (straight / "completions.jsonl").read_text()]
    assert completions[0] == completions[1] and completions[0].count("\n") == 6 * 2 * 4 * ranks
    assert _max_difference(_weights(broken), _weights(format_warmed_model)) > 1e-3  # and they did train

    # TensorBoard: both runs' event files, read as one, hold one value per step; from step 4 on
    # they are the resumed run's (the killed run's are purged).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(broken / "runs" / "broken"))
    events.Reload()
    assert len(os.listdir(broken / "runs" / "broken")) == 2
    assert [(e.step, e.value) for e in events.Scalars("reward/mean")] == [
        (m["step"], pytest.approx(m["reward/mean"])) for m in uninterrupted]


def test_interrupted_save_is_never_resumed(tiny_model, colour_dataset, tmp_path):
    """A kill half-way through writing checkpoint-4 leaves checkpoint-4.tmp (and the save's waits folder);
    `latest` is checkpoint-2, and the resume clears the leftovers."""
    out = tmp_path / "run"
    flags = ["--max_steps", "4", "--save_steps", "2", "--report_to", "none"]
    _train(out, tiny_model, colour_dataset, tmp_path, *flags, faults={"kill_during_save": 4}, returncode=None)
    # (plots/ is drawn by a process of its own, which may or may not have finished when the kill came)
    assert sorted(set(os.listdir(out)) - {"plots"}) == [".save-waits", "checkpoint-2", "checkpoint-4.tmp", "data-check",
                                                        "metrics.jsonl"]
    log = _train(out, tiny_model, colour_dataset, tmp_path, *flags, "--resume_from_checkpoint", "latest")
    assert "removed 1 interrupted save(s): checkpoint-4.tmp" in log
    assert f"resumed from {out / 'checkpoint-2'} at step 2 of 4" in log
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]
    assert os.path.isfile(out / "checkpoint-4" / "trainer_state.json")
    assert not os.path.exists(out / ".save-waits")


def test_failed_save_keeps_the_previous_checkpoint(tiny_model, colour_dataset, tmp_path):
    """The disk is full while checkpoint-2 is written: the run says so, keeps checkpoint-1 (the
    rotation limit of 1 does not remove it), and goes on to save checkpoint-3."""
    out = tmp_path / "run"
    log = _train(out, tiny_model, colour_dataset, tmp_path, "--max_steps", "3", "--save_steps", "1",
                 "--save_total_limit", "1", "--report_to", "none", faults={"fail_save": 2})
    assert "saving checkpoint-2 failed: OSError: [Errno 28] No space left on device" in log
    assert "checkpoint-2 was not saved (see the error above); checkpoint-1 is intact; training goes on." in log
    # checkpoint-1 stayed until checkpoint-3 was complete; then the limit of 1 removed it.
    assert sorted(name for name in os.listdir(out) if name.startswith("checkpoint")) == ["checkpoint-3"]


def test_a_write_failing_on_one_rank_alone_fails_the_save_on_every_rank(format_warmed_model, colour_dataset, tmp_path):
    """Two ZeRO-3 ranks; rank 1's first DeepSpeed write of checkpoint-2 fails (its disk full), rank
    0's succeeds. Neither rank is left waiting in DeepSpeed's barriers: both report checkpoint-2 as
    not saved, checkpoint-1 stays, and the run goes on to checkpoint-3 and its end, in seconds."""
    out = tmp_path / "run"
    log = _train(out, format_warmed_model, colour_dataset, tmp_path, "--deepspeed", "zero3.json", "--max_steps", "3",
                 "--save_steps", "1", "--report_to", "none", launcher=["deepspeed", "--num_gpus", "2"],
                 faults={"fail_deepspeed_write": [2, 1]}, timeout=240)
    assert "rank 1: saving checkpoint-2 failed: OSError: [Errno 28] No space left on device" in log
    assert "rank 0: saving checkpoint-2 failed" not in log
    assert "checkpoint-2 was not saved (see the error above); checkpoint-1 is intact; training goes on." in log
    assert sorted(name for name in os.listdir(out) if name.startswith("checkpoint")) == ["checkpoint-1", "checkpoint-3"]
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]


def test_a_rank_slow_at_its_own_work_trips_no_timeout(tiny_model, colour_dataset, tmp_path):
    """--ddp_timeout 5 on two gloo ranks. Rank 0 spends 12 s more on its share of the row check (the 8 rows
    are one block: rank 1's share is empty), and 12 s more on each write of the 16-bit model (checkpoint-2's
    and the final one), while rank 1 waits for it by files, never in a collective: the run ends as it would,
    exit 0. The same 12 s spent by rank 1 before DeepSpeed's engine starts (whose collectives rank 0 waits
    in) stops the run at the timeout: the 5 s do reach the process group."""
    flags = ["--deepspeed", "zero3.json", "--max_steps", "2", "--save_steps", "2", "--report_to", "none",
             "--ddp_timeout", "5"]
    launcher = ["deepspeed", "--num_gpus", "2"]
    log = _train(tmp_path / "slow", tiny_model, colour_dataset, tmp_path, *flags, launcher=launcher, timeout=600,
                 faults={"slow_row_check": [0, 12], "slow_model_write": [0, 12]})
    assert f"[data] 8 prompts from {colour_dataset!r}" in log
    assert [m["step"] for m in read_metrics(tmp_path / "slow")] == [1, 2]
    assert os.path.isdir(tmp_path / "slow" / "checkpoint-2") and os.path.isfile(tmp_path / "slow" / "model.safetensors")
    assert sorted(os.listdir(tmp_path / "slow" / "data-check")) and not any(
        name.endswith("waits") for name in os.listdir(tmp_path / "slow"))
    log = _train(tmp_path / "stuck", tiny_model, colour_dataset, tmp_path, *flags, launcher=launcher, timeout=600,
                 faults={"slow_before_engine": [1, 12]}, returncode=None)
    assert "Timed out waiting 5000ms" in log and not (tmp_path / "stuck" / "metrics.jsonl").exists()


def _start_and_wait_for_a_step(command, out, log_file):
    """Start a training command (offline, logging to log_file) and return once it logged a step."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=REPO)
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert process.poll() is None and time.time() < deadline, open(log_file.name).read()[-3000:]
        time.sleep(0.2)
    return process


def test_sigterm_saves_and_exits_0_then_resumes(tiny_model, colour_dataset, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "train.py", "--output_dir", str(out), "--model_name_or_path", tiny_model,
               "--dataset_name", colour_dataset, *RUN, "--max_steps", "200", "--save_steps", "0", "--report_to", "none"]
    with open(tmp_path / "sigterm.log", "w") as log_file:
        process = _start_and_wait_for_a_step(command, out, log_file)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=300) == 0, (tmp_path / "sigterm.log").read_text()[-3000:]
    log = (tmp_path / "sigterm.log").read_text()
    (checkpoint,) = [name for name in os.listdir(out) if name.startswith("checkpoint-")]
    stopped_at = int(checkpoint.split("-")[1])
    assert f"SIGTERM: stopped after step {stopped_at}; checkpoint-{stopped_at} resumes it" in log
    assert 1 <= stopped_at < 200 and not os.path.exists(out / "model.safetensors")
    assert [m["step"] for m in read_metrics(out)] == list(range(1, stopped_at + 1))

    run_command([*command[:-6], "--max_steps", str(stopped_at + 2), "--save_steps", "0", "--report_to", "none",
                 "--resume_from_checkpoint", "latest"], tmp_path)
    assert [m["step"] for m in read_metrics(out)] == list(range(1, stopped_at + 3))
    assert os.path.exists(out / "model.safetensors")


@pytest.mark.parametrize("fault", ["nan_loss_steps", "nan_grad_steps"])
def test_a_non_finite_loss_or_gradient_skips_its_step(fault, format_warmed_model, colour_dataset, tmp_path):
    """Step 2's loss is NaN, or finite with a gradient that is not: its update is skipped
    (checkpoint-2 holds checkpoint-1's weights exactly), it is logged, and step 3 trains again."""
    out = tmp_path / "run"
    log = _train(out, format_warmed_model, colour_dataset, tmp_path, "--max_steps", "3", "--save_steps", "1",
                 "--report_to", "none", faults={fault: [2]})
    assert "step 2: non-finite loss or gradient; the optimizer step was skipped (1 in a row" in log
    losses = [m["loss/loss"] for m in read_metrics(out)]
    assert math.isfinite(losses[1]) == (fault == "nan_grad_steps")
    assert [m["optim/skipped_nonfinite"] for m in read_metrics(out)] == [0.0, 1.0, 0.0]
    one, two, three = (_weights(out / f"checkpoint-{s}") for s in (1, 2, 3))
    assert _max_difference(one, two) == 0.0
    assert _max_difference(two, three) > 0.0


def test_repeated_non_finite_losses_stop_the_run_with_a_checkpoint(format_warmed_model, colour_dataset, tmp_path):
    out = tmp_path / "run"
    log = _train(out, format_warmed_model, colour_dataset, tmp_path, "--max_steps", "20", "--save_steps", "1",
                 "--max_nonfinite_steps", "2", "--report_to", "none", faults={"nan_loss_steps": [2, 3, 4]},
                 returncode=1)
    assert ("train.py: stopped: 2 steps in a row had a non-finite loss or gradient (--max_nonfinite_steps 2); none changed "
            "the weights, and checkpoint-3 holds them.") in log
    assert "Traceback" not in log
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]
    assert _max_difference(_weights(out / "checkpoint-1"), _weights(out / "checkpoint-3")) == 0.0


def test_a_reward_function_that_raises_costs_only_its_completions(tiny_model, colour_dataset, tmp_path):
    """tests/faulty_rewards.py:raises_on_b raises for rows whose answer is B (rows 1 and 5 of the
    colour data): those completions get 0 from it, the run goes on, and the failures are counted."""
    out = tmp_path / "run"
    name = "tests.faulty_rewards:raises_on_b"
    log = _train(out, tiny_model, colour_dataset, tmp_path, "--max_steps", "4", "--save_steps", "0",
                 "--report_to", "none", "--reward_funcs", "format", name,
                 faults={"record_prompts": str(tmp_path / "prompts")})
    (steps,) = _prompts(tmp_path / "prompts", 1)
    b_rows = [[i for i in step if i % 4 == 1] for step in steps]
    metrics = read_metrics(out)
    assert [m[f"reward/{name}_failures"] for m in metrics] == [4.0 * len(rows) for rows in b_rows]
    first = next(rows[0] for rows in b_rows if rows)
    assert f"reward function '{name}' failed on dataset row {first}: raised ValueError" in log
    for m, rows in zip(metrics, b_rows):  # raises_on_b gives 1 to the others: the mean is their share
        assert m[f"reward/{name}"] == pytest.approx(1.0 - len(rows) / 2)


def test_one_ranks_signal_or_nan_stops_or_skips_every_rank(format_warmed_model, colour_dataset, tmp_path):
    """Two ZeRO-3 ranks. A NaN loss on rank 1 alone (step 2), or a non-finite gradient in rank 1's
    backward alone (step 3: under ZeRO-3 it reaches both ranks' partitions), skips the step on both
    (the weights stay as they were; neither rank waits on the other), and SIGTERM sent to rank 1
    alone stops both at the same step with a checkpoint, the launcher exiting 0."""
    import psutil

    out = tmp_path / "run"
    launcher = ["deepspeed", "--num_gpus", "2"]
    _train(out, format_warmed_model, colour_dataset, tmp_path, "--deepspeed", "zero3.json", "--max_steps", "4",
           "--save_steps", "1", "--report_to", "none", launcher=launcher,
           faults={"nan_loss_steps": [2], "nan_grad_steps": [3], "nan_loss_rank": 1})
    assert [m["optim/skipped_nonfinite"] for m in read_metrics(out)] == [0.0, 1.0, 1.0, 0.0]  # both ranks skipped
    one, two, three, four = (_weights(out / f"checkpoint-{s}") for s in (1, 2, 3, 4))
    assert _max_difference(one, two) == 0.0 and _max_difference(two, three) == 0.0
    assert _max_difference(three, four) > 0.0

    out = tmp_path / "sigterm"
    command = [*launcher, "train.py", "--deepspeed", "zero3.json", "--output_dir", str(out), "--model_name_or_path",
               format_warmed_model, "--dataset_name", colour_dataset, *RUN, "--max_steps", "200", "--save_steps", "0",
               "--report_to", "none"]
    with open(tmp_path / "sigterm.log", "w") as log_file:
        launched = _start_and_wait_for_a_step(command, out, log_file)
        (rank_1,) = [p for p in psutil.Process(launched.pid).children(recursive=True)
                     if "--local_rank=1" in p.cmdline()]
        rank_1.send_signal(signal.SIGTERM)
        assert launched.wait(timeout=300) == 0, (tmp_path / "sigterm.log").read_text()[-3000:]
    (checkpoint,) = [name for name in os.listdir(out) if name.startswith("checkpoint-")]
    stopped_at = int(checkpoint.split("-")[1])
    assert sorted(os.listdir(out / checkpoint / "deepspeed")) == sorted(
        [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")])
    assert [m["step"] for m in read_metrics(out)] == list(range(1, stopped_at + 1))


def test_a_dataset_with_bad_rows_trains_on_the_good_ones(tiny_model, tmp_path):
    """Rows with an empty problem, an empty solution, a missing and a corrupt image, and an answer
    the verifier cannot read, among 4 valid ones: train.py reports each reason with its rows and
    trains on the 4 (2 steps of 2 prompts are one epoch)."""
    from conftest import colour_rows

    (tmp_path / "img").mkdir()
    valid = colour_rows(4)
    for i, row in enumerate(valid):
        row["image"].save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"not a picture" * 10)
    good = [{"image": f"img/{i}.png", "problem": r["problem"], "solution": r["solution"]} for i, r in enumerate(valid)]
    bad = [{"image": "img/0.png", "problem": " ", "solution": good[0]["solution"]},
           {"image": "img/0.png", "problem": good[0]["problem"], "solution": ""},
           {"image": "img/gone.png", "problem": good[0]["problem"], "solution": good[0]["solution"]},
           {"image": "img/broken.png", "problem": good[0]["problem"], "solution": good[0]["solution"]},
           {"image": "img/0.png", "problem": good[0]["problem"], "solution": "<answer> </answer>"}]
    rows = [good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3], bad[4], good[3]]  # bad: rows 1, 3, 4, 6, 7
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    log = _train(out, tiny_model, str(tmp_path / "rows.jsonl"), tmp_path, "--max_steps", "2", "--save_steps", "0",
                 "--report_to", "none", faults={"record_prompts": str(tmp_path / "prompts")})
    assert "dropped 1 of 9 rows: empty problem (row 1)" in log
    assert "dropped 1 of 9 rows: empty solution (row 3)" in log
    assert "dropped 2 of 9 rows: unreadable image or video (row 4: FileNotFoundError" in log
    assert "dropped 1 of 9 rows: unverifiable solution (row 7: no answer in the solution)" in log
    assert "[data] 4 prompts" in log
    (steps,) = _prompts(tmp_path / "prompts", 1)
    assert sorted(i for step in steps for i in step) == [0, 1, 2, 3]  # the 4 usable prompts, each once
