"""grpo/output_dir.py: which checkpoint resumes, rotation, the earlier-run guard, log continuation.
Plain files made in the test; no model (the runs themselves are in tests/test_resume.py)."""

import argparse
import json
import os

import pytest

from grpo import distributed, output_dir
from grpo.config import UsageError


def _checkpoint(root, step: int, complete: bool = True, suffix: str = ""):
    folder = root / f"checkpoint-{step}{suffix}"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    if complete:
        (folder / distributed.TRAINER_STATE).write_text(json.dumps({"step": step}))
    return str(folder)


def test_latest_is_the_newest_complete_checkpoint(tmp_path):
    _checkpoint(tmp_path, 2)
    newest = _checkpoint(tmp_path, 10)            # numeric order: 10 is newer than 9, though "10" < "9"
    _checkpoint(tmp_path, 9)
    _checkpoint(tmp_path, 12, complete=False)     # written without its training state
    _checkpoint(tmp_path, 14, suffix=".tmp")      # a save a kill interrupted
    (tmp_path / "checkpoint-final").mkdir()       # not ours
    assert [step for step, _ in output_dir.complete_checkpoints(str(tmp_path))] == [2, 9, 10]
    assert output_dir.checkpoint_to_resume("latest", str(tmp_path)) == newest


def test_latest_in_an_empty_folder_starts_at_step_0(tmp_path):
    assert output_dir.checkpoint_to_resume("latest", str(tmp_path / "not-yet")) is None
    assert output_dir.checkpoint_to_resume(None, str(tmp_path)) is None


def test_a_named_checkpoint_must_exist_and_be_complete(tmp_path):
    incomplete = _checkpoint(tmp_path, 4, complete=False)
    with pytest.raises(UsageError, match="--resume_from_checkpoint: .* is incomplete"):
        output_dir.checkpoint_to_resume(incomplete, str(tmp_path))
    with pytest.raises(UsageError, match="--resume_from_checkpoint: .* is not a folder"):
        output_dir.checkpoint_to_resume(str(tmp_path / "checkpoint-99"), str(tmp_path))
    complete = _checkpoint(tmp_path, 6)
    assert output_dir.checkpoint_to_resume(complete, str(tmp_path)) == complete


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (2, 4, 6):
        _checkpoint(tmp_path, step)
    _checkpoint(tmp_path, 8, complete=False)  # newer, but incomplete: neither counted nor deleted
    output_dir.rotate_checkpoints(str(tmp_path), 1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-6", "checkpoint-8"]
    output_dir.rotate_checkpoints(str(tmp_path), None)  # no limit: nothing goes
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-6", "checkpoint-8"]


def test_an_earlier_run_is_not_overwritten_unless_asked(tmp_path):
    output_dir.guard_output_dir(str(tmp_path / "new"), overwrite=False)  # nothing there: fine
    (tmp_path / "demo-data").mkdir()                                    # not a run's file
    output_dir.guard_output_dir(str(tmp_path), overwrite=False)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    _checkpoint(tmp_path, 2)
    with pytest.raises(UsageError, match=r"--output_dir: .* holds an earlier run \(checkpoint-2, metrics.jsonl\); "
                                         r"continue it with --resume_from_checkpoint latest"):
        output_dir.guard_output_dir(str(tmp_path), overwrite=False)
    output_dir.guard_output_dir(str(tmp_path), overwrite=True)
    (tmp_path / "runs" / "old").mkdir(parents=True)
    (tmp_path / "runs" / "other").mkdir(parents=True)
    output_dir.clear_earlier_run(str(tmp_path), "old")
    assert sorted(os.listdir(tmp_path)) == ["demo-data", "runs"]
    assert os.listdir(tmp_path / "runs") == ["other"]  # another run's TensorBoard folder stays


def test_unfinished_saves_are_removed(tmp_path):
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 4, complete=False, suffix=".tmp")
    assert output_dir.remove_unfinished_saves(str(tmp_path)) == ["checkpoint-4.tmp"]
    assert os.listdir(tmp_path) == ["checkpoint-2"]


def test_rng_state_round_trip():
    import random

    import numpy as np
    import torch

    state = distributed.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    distributed.set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


def test_resumed_metrics_continue_after_the_checkpoint(tmp_path):
    """The interrupted run logged steps 1-5 and checkpointed step 3: steps 4 and 5 run again, so
    their old lines go, and the new ones follow step 3's."""
    import argparse

    args = argparse.Namespace(output_dir=str(tmp_path), run_name="run", report_to=["none"], logging_steps=1,
                              log_completions_steps=0)
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "reward/mean": s / 10}) + "\n" for s in range(1, 6)))
    metrics = {"reward/mean": 0.9, "completion/length_min": 2.0, "completion/length_max": 7.0}
    logger = output_dir.RunLogger(args, total_steps=6, rank=0, device="cpu", progress=output_dir.Progress(step=3))
    assert logger.bar.n == 3  # the progress bar starts at the resumed step
    logger.record(4, metrics)
    logger.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(m["step"], m["reward/mean"]) for m in lines] == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.9)]
    output_dir.RunLogger(args, total_steps=6, rank=0, device="cpu", progress=output_dir.Progress()).close()  # a fresh run
    assert path.read_text() == ""


def test_wandb_run_starts_on_rank_0_and_a_resume_continues_it(tmp_path, monkeypatch):
    """start_wandb: the run named --run_name with every flag as its config, in output_dir; resumed
    from a checkpoint, the same wandb run (its id from the checkpoint, resume="allow"); a wandb that
    cannot start (not logged in) is a usage error saying what to do."""
    import wandb

    from grpo import config

    monkeypatch.setattr(output_dir.distributed, "rank0_decides", lambda decide: decide())
    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs) or argparse.Namespace(id=kwargs["id"] or "new"))
    args = config.parse_args(["--output_dir", str(tmp_path / "out"), "--report_to", "tensorboard", "wandb",
                              "--learning_rate", "3e-6"])
    assert output_dir.start_wandb(args, None).id == "new"
    assert calls[0]["name"] == "out" and calls[0]["dir"] == str(tmp_path / "out") and calls[0]["resume"] is None
    assert calls[0]["config"]["learning_rate"] == 3e-6 and set(calls[0]["config"]) == set(vars(args))

    checkpoint = tmp_path / "out" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 4, "wandb_run_id": "abc123"}))
    assert output_dir.start_wandb(args, str(checkpoint)).id == "abc123"
    assert (calls[1]["id"], calls[1]["resume"]) == ("abc123", "allow")

    def not_logged_in(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")

    monkeypatch.setattr(wandb, "init", not_logged_in)
    with pytest.raises(ValueError, match=r"--report_to: wandb could not start the run: api_key not configured .*WANDB_MODE=offline"):
        output_dir.start_wandb(args, None)
    args.report_to = ["tensorboard"]
    assert output_dir.start_wandb(args, None) is None  # not asked for: wandb is never imported into the run
