"""Everything a run keeps in --output_dir, and reads back to resume.

    output_dir/
      metrics.jsonl              every logged step, one JSON object per line
      runs/<run_name>/           TensorBoard scalars and sample completions
      checkpoint-<step>/         Hugging Face layout (from_pretrained loads it), plus the training state:
        model.safetensors, config.json, the processor's files, training_args.json
        deepspeed/               DeepSpeed's checkpoint: weights, optimizer, LR schedule (a shard per rank under ZeRO-3)
        rng_state_<rank>.pth     each rank's Python, NumPy and torch generators
        trainer_state.json       the step and the position in the data order; written last
      checkpoint-<step>.tmp/     a save in progress: renamed to checkpoint-<step> only once complete
      model.safetensors, ...     the final model

Only rank 0 writes the logs; the metrics it gets are already averaged over ranks. A checkpoint is
complete when its trainer_state.json exists, and a kill during a save leaves only a .tmp folder, so
`--resume_from_checkpoint latest` never picks a half-written one. The folders live on a file system
all ranks share (DeepSpeed's checkpoints assume the same).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal

import torch

from .config import UsageError

TRAINER_STATE = "trainer_state.json"
DEEPSPEED_TAG = "deepspeed"
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")

# The console line: (metric key, short label, format).
CONSOLE_FIELDS = [
    ("reward/mean", "reward", ".3f"), ("reward/accuracy", "acc", ".3f"), ("reward/format", "format", ".3f"),
    ("completion/length_mean", "len", ".1f"), ("loss/kl", "kl", ".4f"), ("loss/clip_ratio", "clip", ".3f"),
    ("time/step_seconds", "s/step", ".2f"),
]


class RunLogger:
    """A progress bar, one console line per logged step, TensorBoard and metrics.jsonl. A resumed
    run (start_step > 0) continues all of them: lines and events after start_step, from the steps the
    interrupted run did not checkpoint, are dropped, since those steps run again."""

    def __init__(self, output_dir: str, run_name: str, report_to: str, total_steps: int, enabled: bool,
                 start_step: int = 0):
        self.enabled = enabled
        self.writer = self.progress = None
        self.metrics_path = os.path.join(output_dir, "metrics.jsonl")
        if not enabled:
            return
        from tqdm.auto import tqdm

        os.makedirs(output_dir, exist_ok=True)
        _keep_metrics_up_to(self.metrics_path, start_step)
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the earlier run's events from this step on.
            self.writer = SummaryWriter(os.path.join(output_dir, "runs", run_name),
                                        purge_step=start_step + 1 if start_step else None)
        self.progress = tqdm(total=total_steps, initial=start_step, desc="GRPO", unit="step", dynamic_ncols=True)

    def info(self, message: str) -> None:
        if self.enabled:
            (self.progress.write if self.progress else print)(message)

    def advance(self) -> None:
        if self.progress:
            self.progress.update(1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        parts = [f"step {step}"] + [f"{label} {metrics[key]:{fmt}}" for key, label, fmt in CONSOLE_FIELDS if key in metrics]
        self.info(" | ".join(parts))
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def log_samples(self, step: int, problems: list[str], completions: list[str], rewards: list[float],
                    solutions: list[str]) -> None:
        """A Markdown table of completions with their rewards, under TensorBoard's Text tab."""
        if not (self.enabled and self.writer):
            return
        clean = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731 (one-line table cell)
        rows = ["| problem | completion | solution | reward |", "|---|---|---|---|"]
        rows += [f"| {clean(p)} | {clean(c)} | {clean(s)} | {r:.2f} |"
                 for p, c, s, r in zip(problems, completions, solutions, rewards)]
        self.writer.add_text("completions", "\n".join(rows), step)

    def close(self) -> None:
        if self.progress:
            self.progress.close()
        if self.writer:
            self.writer.close()


def _keep_metrics_up_to(path: str, step: int) -> None:
    """metrics.jsonl without the lines after `step` (all of them for a fresh run), rewritten atomically."""
    kept = []
    if step > 0 and os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------- finding checkpoints

def complete_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        match = _CHECKPOINT_NAME.fullmatch(name)
        folder = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(folder, TRAINER_STATE)):
            found.append((int(match.group(1)), folder))
    return sorted(found)


def checkpoint_to_resume(resume_from: str | None, output_dir: str) -> str | None:
    """The folder --resume_from_checkpoint names: a checkpoint folder, or `latest`, the newest
    complete one in output_dir (None when there is none yet: the run starts at step 0, so one
    command serves the first launch and every relaunch after a pre-emption)."""
    if not resume_from:
        return None
    if resume_from == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1][1] if found else None
    if not os.path.isdir(resume_from):
        raise UsageError(f"--resume_from_checkpoint: {resume_from!r} is not a folder; give a checkpoint-<step> "
                         f"folder, or `latest` for the newest one in --output_dir.")
    if not os.path.isfile(os.path.join(resume_from, TRAINER_STATE)):
        raise UsageError(f"--resume_from_checkpoint: {resume_from!r} is incomplete (no {TRAINER_STATE}: a save that "
                         f"was interrupted, or weights saved without their training state); pick an earlier "
                         f"checkpoint, or `latest`.")
    return resume_from


def read_trainer_state(folder: str) -> dict:
    with open(os.path.join(folder, TRAINER_STATE)) as f:
        return json.load(f)


def earlier_run_files(output_dir: str) -> list[str]:
    """What an earlier run left in output_dir: checkpoints, logs, a final model."""
    names = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    return [name for name in names
            if _CHECKPOINT_NAME.fullmatch(name.removesuffix(".tmp")) or name in ("metrics.jsonl", "training_args.json")]


def guard_output_dir(output_dir: str, overwrite: bool) -> None:
    """A new run never writes over an earlier one unless asked to."""
    found = earlier_run_files(output_dir)
    if found and not overwrite:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise UsageError(f"--output_dir: {output_dir!r} holds an earlier run ({shown}); continue it with "
                         f"--resume_from_checkpoint latest, or start over with --overwrite_output_dir true "
                         f"(which deletes its checkpoints and logs), or choose another folder.")


def clear_earlier_run(output_dir: str, run_name: str) -> None:
    """--overwrite_output_dir: remove the earlier run's checkpoints and logs (rank 0, before training)."""
    for name in earlier_run_files(output_dir):
        path = os.path.join(output_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    shutil.rmtree(os.path.join(output_dir, "runs", run_name), ignore_errors=True)


def remove_unfinished_saves(output_dir: str) -> list[str]:
    """Delete the .tmp folders of saves that a kill interrupted; returns their names."""
    names = [name for name in earlier_run_files(output_dir) if name.endswith(".tmp")]
    for name in names:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    return names


def rotate_checkpoints(output_dir: str, limit: int | None) -> None:
    """Keep the newest `limit` complete checkpoints. Called only after a save completed, so the
    newest complete checkpoint is never the one deleted; incomplete folders are not counted."""
    if not limit:
        return
    for _, folder in complete_checkpoints(output_dir)[:-limit]:
        shutil.rmtree(folder)


# ---------------------------------------------------------------- saving and loading

def save_model(engine, processor, args, folder: str, zero_stage: int, is_main: bool) -> None:
    """Hugging Face format (safetensors + processor) that from_pretrained loads, and the run's
    arguments (training_args.json: eval.py prompts the model as it was trained). Under ZeRO-3 the
    shards are gathered into one 16-bit state dict on rank 0 (a collective: every rank calls this)."""
    import dataclasses

    state_dict = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else engine.module.state_dict()
    if is_main:
        engine.module.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        processor.save_pretrained(folder)
        with open(os.path.join(folder, "training_args.json"), "w") as f:
            json.dump(dataclasses.asdict(args), f, indent=1)


def _all_ranks(ok: bool, device) -> bool:
    """True when `ok` holds on every rank (a collective)."""
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def save_checkpoint(engine, processor, args, step: int, trainer_state: dict, zero_stage: int, rank: int,
                    device, log) -> bool:
    """checkpoint-<step>: written into checkpoint-<step>.tmp, renamed when every rank's part is on
    disk and trainer_state.json is written. A failed save (a full disk) is reported and removed;
    the previous checkpoints stay as they were. Returns whether it was saved. Every rank calls it."""
    final = os.path.join(args.output_dir, f"checkpoint-{step}")
    temporary = final + ".tmp"
    is_main = rank == 0
    if is_main:
        shutil.rmtree(temporary, ignore_errors=True)
    torch.distributed.barrier()
    error = None
    try:
        save_model(engine, processor, args, temporary, zero_stage, is_main)
    except Exception as e:  # noqa: BLE001 (a full disk surfaces as OSError or as the writer's own error)
        error = e
    if _all_ranks(error is None, device):
        try:
            engine.save_checkpoint(temporary, tag=DEEPSPEED_TAG, save_latest=False)
            torch.save(rng_state(), os.path.join(temporary, f"rng_state_{rank}.pth"))
        except Exception as e:  # noqa: BLE001
            error = e
    if _all_ranks(error is None, device) and is_main:
        try:
            with open(os.path.join(temporary, TRAINER_STATE), "w") as f:
                json.dump(trainer_state, f, indent=1)
            if os.path.exists(final):  # a checkpoint of this step from an overwritten run
                shutil.rmtree(final)
            os.replace(temporary, final)
        except Exception as e:  # noqa: BLE001
            error = e
    saved = _all_ranks(error is None, device)
    if not saved:
        if error is not None:
            print(f"[train] rank {rank}: saving checkpoint-{step} failed: {type(error).__name__}: {error}", flush=True)
        if is_main:
            shutil.rmtree(temporary, ignore_errors=True)
            kept = complete_checkpoints(args.output_dir)
            log(f"[train] WARNING: checkpoint-{step} was not saved (see the error above); "
                + (f"{os.path.basename(kept[-1][1])} is intact" if kept else "there is no earlier checkpoint")
                + "; training goes on.")
    torch.distributed.barrier()
    return saved


def load_checkpoint(engine, folder: str, rank: int) -> dict:
    """Restore weights, optimizer and LR schedule (DeepSpeed's checkpoint), this rank's random
    generators, and return the trainer state (step, data position, ...)."""
    load_path, _ = engine.load_checkpoint(folder, tag=DEEPSPEED_TAG)
    if load_path is None:
        raise UsageError(f"--resume_from_checkpoint: DeepSpeed found no checkpoint under {folder!r}/{DEEPSPEED_TAG}.")
    rng_file = os.path.join(folder, f"rng_state_{rank}.pth")
    if not os.path.isfile(rng_file):
        raise UsageError(f"--resume_from_checkpoint: {folder!r} has no {os.path.basename(rng_file)}; it was written "
                         "by fewer ranks than this run has. Resume with the same number of ranks.")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return read_trainer_state(folder)


def rng_state() -> dict:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------- pre-emption

class StopRequest:
    """SIGTERM, which SLURM and Kubernetes send before they kill a job, asks the run to stop. The
    handler only notes it; the loop saves a checkpoint at the next step boundary and exits 0."""

    def __init__(self):
        self.received = False
        signal.signal(signal.SIGTERM, self._note)

    def _note(self, signum, frame) -> None:
        self.received = True

    def agreed(self, device) -> bool:
        """Whether any rank received SIGTERM (a collective: the ranks stop at the same step)."""
        return not _all_ranks(not self.received, device)
