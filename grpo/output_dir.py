"""What a run keeps in --output_dir: where a run starts, its checkpoints' bookkeeping, and its logs.

    output_dir/
      metrics.jsonl              every logged step, one JSON object per line (RunLogger)
      completions.jsonl          every --log_completions_steps: each completion of every rank, its rewards and advantage
      runs/<run_name>/           TensorBoard scalars, and sample completions under its Text tab
      wandb/                     --report_to wandb: wandb's copy of the run (offline, what `wandb sync` uploads)
      plots/<figure>.png         rewards, completion lengths, loss terms per step (`data_tools.py plot`, at each save)
      checkpoint-<step>/         Hugging Face layout (from_pretrained loads it), plus the training state
                                 (distributed.save_checkpoint): DeepSpeed's shards, each rank's random
                                 generators, and trainer_state.json, the loop's Progress, written last
      checkpoint-<step>.tmp/     a save in progress: renamed to checkpoint-<step> only once complete
      data-check/<key>/          the row check's result, a part per rank (data.load_prompt_dataset), reused
      .save-waits/               how ranks wait for rank 0's writes at a save (distributed.gather_from_files)
      model.safetensors, ...     the final model

A checkpoint is complete when its trainer_state.json exists, so `--resume_from_checkpoint latest`
never picks a half-written one. Every rank must see the one folder, and rank 0 alone decides where the
run starts ([ranks that disagree]). Every number is averaged over the ranks before rank 0 writes it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys

import torch

from . import answers, data, distributed, families, objective
from .config import UsageError

_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")

# ---------------------------------------------------------------- where a run starts

@dataclasses.dataclass
class Progress:
    """Where the loop stands: what a checkpoint's trainer_state.json keeps besides the weights."""

    num_prompts: int = 0         # the run's usable prompts (a resume with another count is told so)
    step: int = 0                # optimizer steps taken
    rollouts: int = 0            # rollouts taken: the position in each rank's prompt order (data.step_prompts)
    nonfinite_in_a_row: int = 0  # the latest optimizer steps skipped for a non-finite loss or gradient
    unlogged: list = dataclasses.field(default_factory=list)  # the metrics of steps not logged yet
    wandb_run_id: str | None = None  # the wandb run a resume continues (--report_to wandb)

    def took_step(self, skipped: bool) -> None:
        """One more optimizer step; a skipped one (non-finite) lengthens the run of skipped steps, any other ends it."""
        self.step += 1
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if skipped else 0

    def diverged(self, max_nonfinite_steps: int) -> bool:
        """The run cannot go on: --max_nonfinite_steps steps in a row skipped."""
        return self.nonfinite_in_a_row >= max_nonfinite_steps


def complete_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        match = _CHECKPOINT_NAME.fullmatch(name)
        folder = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(folder, distributed.TRAINER_STATE)):
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
    if not os.path.isfile(os.path.join(resume_from, distributed.TRAINER_STATE)):
        raise UsageError(f"--resume_from_checkpoint: {resume_from!r} is incomplete (no {distributed.TRAINER_STATE}: a save that "
                         f"was interrupted, or weights saved without their training state); pick an earlier "
                         f"checkpoint, or `latest`.")
    return resume_from


def read_trainer_state(folder: str) -> dict:
    with open(os.path.join(folder, distributed.TRAINER_STATE)) as f:
        return json.load(f)


def earlier_run_files(output_dir: str) -> list[str]:
    """What an earlier run left in output_dir: checkpoints, logs, a final model."""
    names = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    return [name for name in names
            if _CHECKPOINT_NAME.fullmatch(name.removesuffix(".tmp"))
            or name in ("metrics.jsonl", "completions.jsonl", "plots", "training_args.json")]


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


def check_seen_by_every_rank(output_dir: str, rank: int, world_size: int) -> None:
    """Stop unless every rank sees the same --output_dir: rank 0 writes a file there and every rank looks for
    it (a collective). Checkpoints (DeepSpeed writes one shard per rank into the same folder), the logs and
    the choice of the checkpoint to resume assume one folder on a file system all nodes share; on folders
    local to each node the run would resume different checkpoints, or none, on different ranks."""
    if world_size == 1:
        return
    name = [f".seen-by-every-rank-{os.urandom(8).hex()}" if rank == 0 else None]
    torch.distributed.broadcast_object_list(name, src=0)
    marker = os.path.join(output_dir, name[0])
    if rank == 0:
        with open(marker, "w") as f:
            f.write("written by rank 0 to check that every rank sees this folder\n")
    torch.distributed.barrier()
    seen = [None] * world_size
    torch.distributed.all_gather_object(seen, os.path.isfile(marker))
    torch.distributed.barrier()
    if rank == 0:
        os.remove(marker)
    blind = [r for r, saw in enumerate(seen) if not saw]
    if blind:
        error = UsageError(f"--output_dir: {output_dir!r} is not one folder for every rank: rank(s) {blind} cannot "
                           "see the file rank 0 wrote there (a folder local to each node). Checkpoints, logs and "
                           "resuming need a file system every node shares (NFS, Lustre, ...): give a path on one.")
        error.shared = True
        raise error


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


def start(args, rank: int, world_size: int, log) -> str | None:
    """Where this run starts: the checkpoint folder it resumes, or None for step 0, after checking
    that every rank sees --output_dir, never over an earlier run unless asked (then cleared), and
    without the .tmp folders of interrupted saves. Decided on rank 0 and given to every rank."""
    check_seen_by_every_rank(args.output_dir, rank, world_size)
    folder = distributed.rank0_decides(lambda: _starting_checkpoint(args, world_size))
    if rank == 0:
        if folder is None and args.overwrite_output_dir:
            clear_earlier_run(args.output_dir, args.run_name)
        if unfinished := remove_unfinished_saves(args.output_dir):
            log(f"[train] removed {len(unfinished)} interrupted save(s): {', '.join(unfinished)}")
    torch.distributed.barrier()
    return folder


def _starting_checkpoint(args, world_size: int) -> str | None:
    folder = checkpoint_to_resume(args.resume_from_checkpoint, args.output_dir)
    if folder is None:
        guard_output_dir(args.output_dir, overwrite=args.overwrite_output_dir)
    else:
        check_resumable(read_trainer_state(folder), args, world_size, folder)
    return folder


def check_resumable(state: dict, args, world_size: int, folder: str) -> None:
    """A checkpoint resumes with the world size that wrote it (DeepSpeed's shards are per rank);
    other changes to the data order are allowed, and said (rank 0 alone calls it)."""
    if state["world_size"] != world_size:
        raise UsageError(f"--resume_from_checkpoint: {folder!r} was written by {state['world_size']} rank(s) and "
                         f"this run has {world_size}; resume with --num_gpus {state['world_size']}.")
    changed = {k: (v, state["data_order"][k]) for k, v in data.data_order(args).items()
               if state["data_order"].get(k) != v}
    if changed:
        print(f"[train] WARNING: resuming with different {', '.join(f'--{k} {now} (was {was})' for k, (now, was) in changed.items())}; "
              "the prompts from here on differ from those of an uninterrupted run.", flush=True)


# ---------------------------------------------------------------- checkpoints

def save(model, processor, args, progress: Progress, zero_stage: int, rank: int, device, log) -> bool:
    """checkpoint-<step> (distributed.save_checkpoint), then the oldest beyond --save_total_limit removed,
    never before the new one is complete. A failed save is reported and training goes on. Every rank calls it."""
    trainer_state = dict(dataclasses.asdict(progress), world_size=torch.distributed.get_world_size(),
                         data_order=data.data_order(args))
    folder = os.path.join(args.output_dir, f"checkpoint-{progress.step}")
    saved = distributed.save_checkpoint(model, processor, args, folder, trainer_state, zero_stage, rank, device)
    if rank == 0 and saved:
        rotate_checkpoints(args.output_dir, args.save_total_limit)
    elif rank == 0:
        kept = complete_checkpoints(args.output_dir)
        log(f"[train] WARNING: checkpoint-{progress.step} was not saved (see the error above); "
            + (f"{os.path.basename(kept[-1][1])} is intact" if kept else "there is no earlier checkpoint")
            + "; training goes on.")
    return saved


def save_final(model, processor, args, zero_stage: int, rank: int, dtype, log) -> None:
    """The final model in output_dir (families.save_model) and, with --merge_adapter, its merged copy, which rank 0
    writes alone while the others wait for it by files (distributed.gather_from_files: [waits in a collective])."""
    waits = os.path.join(args.output_dir, distributed.SAVE_WAITS)
    if rank == 0:  # the last save's
        shutil.rmtree(waits, ignore_errors=True)
    torch.distributed.barrier()

    def write(*_):
        families.save_model(model, processor, args, args.output_dir, zero_stage, rank == 0)
        if args.merge_adapter and rank == 0:
            log(f"[train] merged weights in {families.save_merged(args.output_dir, processor, args, dtype)}")

    distributed.gather_from_files(write, waits, rank, torch.distributed.get_world_size(), args.ddp_timeout)
    torch.distributed.barrier()  # every rank is through the waits folder: it can go
    if rank == 0:
        shutil.rmtree(waits, ignore_errors=True)


def resume(model, folder: str, rank: int, num_prompts: int, log) -> Progress:
    """The run's weights, optimizer, LR schedule and random generators as `folder` holds them, and the
    loop's Progress: where it was, what it had not logged yet."""
    state = distributed.load_checkpoint(model, folder, rank)
    progress = Progress(**{key: state[key] for key in Progress.__dataclass_fields__ if key in state})
    if progress.num_prompts != num_prompts:
        log(f"[train] WARNING: the checkpoint's run had {progress.num_prompts} usable prompts and this one has "
            f"{num_prompts}; the prompts from here on differ from those of an uninterrupted run.")
        progress.num_prompts = num_prompts
    return progress

# ---------------------------------------------------------------- logs

def start_wandb(args, resume_folder: str | None):
    """--report_to wandb: rank 0's wandb run (None on the other ranks, which never talk to wandb), started
    before anything loads, so that a run that cannot log there (not logged in) stops in seconds. A resume
    continues the run its checkpoint names (resume="allow"), as TensorBoard's charts continue in runs/<run_name>.
    Its config is every flag; its files go to output_dir/wandb (or $WANDB_DIR), its project $WANDB_PROJECT."""
    if "wandb" not in args.report_to:
        return None
    run = None

    def start():
        nonlocal run
        import wandb

        run_id = read_trainer_state(resume_folder).get("wandb_run_id") if resume_folder else None
        try:
            run = wandb.init(project=os.environ.get("WANDB_PROJECT", "grpo-vlm"), name=args.run_name, id=run_id,
                             resume="allow" if run_id else None, config=dataclasses.asdict(args),
                             dir=os.environ.get("WANDB_DIR", args.output_dir))
        except wandb.errors.Error as e:
            raise UsageError(f"--report_to: wandb could not start the run: {' '.join(str(e).split())} (or set "
                             "WANDB_MODE=offline to keep it in output_dir/wandb and `wandb sync` it later).") from None

    distributed.rank0_decides(start)  # its usage error, if any, stops every rank
    return run


# The console line: (metric key, short label, format).
CONSOLE_FIELDS = [
    ("reward/mean", "reward", ".3f"), ("reward/accuracy", "acc", ".3f"), ("reward/format", "format", ".3f"),
    ("completion/length_mean", "len", ".1f"), ("loss/kl", "kl", ".4f"), ("loss/clip_ratio", "clip", ".3f"),
    ("time/step_seconds", "s/step", ".2f"),
]


class RunLogger:
    """The run's logs, continued by a resumed run (progress.step > 0): lines and events after that step,
    from the steps the interrupted run did not checkpoint, are dropped, since those steps run again.
    The metrics of steps not logged yet are kept in `progress.unlogged`, so that a checkpoint holds them.
    Every rank calls `record` and `record_completions` (collectives); rank 0 (`writes`) writes."""

    def __init__(self, args, total_steps: int, rank: int, device, progress: Progress, wandb_run=None):
        self.args, self.total_steps, self.rank, self.device = args, total_steps, rank, device
        self.writes, self.progress, start_step = rank == 0, progress, progress.step
        self.writer = self.bar = self.plotting = None  # bar: tqdm's progress bar
        self.wandb, self.logged_step = wandb_run, None  # start_wandb's run (rank 0); the last step logged
        self.metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
        self.completions_path = os.path.join(args.output_dir, "completions.jsonl")
        if not self.writes:
            return
        from tqdm.auto import tqdm

        os.makedirs(args.output_dir, exist_ok=True)
        _keep_lines_up_to(self.metrics_path, start_step)
        if os.path.exists(self.completions_path):
            _keep_lines_up_to(self.completions_path, start_step)
        if "tensorboard" in args.report_to:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the earlier run's events from this step on.
            self.writer = SummaryWriter(os.path.join(args.output_dir, "runs", args.run_name),
                                        purge_step=start_step + 1 if start_step else None)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="GRPO", unit="step", dynamic_ncols=True)

    def info(self, message: str) -> None:
        if self.writes:
            (self.bar.write if self.bar else print)(message)

    def record(self, step: int, metrics: dict[str, float]) -> None:
        """This rank's numbers for optimizer step `step`; at every --logging_steps-th step (and the last)
        their mean over the steps since the last log and over the ranks is logged (min and max for the
        length's extremes)."""
        if self.bar:
            self.bar.update(1)
        unlogged = self.progress.unlogged  # this rank's metrics of the steps since the last log
        unlogged.append(metrics)
        if step % self.args.logging_steps and step != self.total_steps:
            return
        window, self.progress.unlogged = unlogged, []
        mean = distributed.mean_over_ranks({key: sum(m[key] for m in window) / len(window) for key in window[0]},
                                           self.device)
        for key, op, pick in (("completion/length_min", torch.distributed.ReduceOp.MIN, min),
                              ("completion/length_max", torch.distributed.ReduceOp.MAX, max)):
            mean[key] = distributed.reduce_over_ranks(pick(m[key] for m in window), self.device, op)
        if self.writes:
            self._write(step, mean)

    def _write(self, step: int, metrics: dict[str, float]) -> None:
        parts = [f"step {step}"] + [f"{label} {metrics[key]:{fmt}}" for key, label, fmt in CONSOLE_FIELDS if key in metrics]
        self.info(" | ".join(parts))
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.wandb:
            self.wandb.log(metrics, step=step)
        self.logged_step = step

    def record_completions(self, step: int, rollout) -> None:
        """At every --log_completions_steps-th step: every rank's completions (completion_records), one
        JSON line each in completions.jsonl, a Markdown table of them under TensorBoard's Text tab, and
        a wandb Table with each prompt's first image."""
        if self.args.log_completions_steps <= 0 or step % self.args.log_completions_steps:
            return
        records = completion_records(rollout, self.args, step, self.rank)
        pictures = [table_picture(example) for example in rollout.examples] if "wandb" in self.args.report_to else []
        gathered = [None] * torch.distributed.get_world_size() if self.writes else None
        torch.distributed.gather_object((records, pictures), gathered, dst=0)
        if not self.writes:
            return
        if self.wandb:
            self.wandb.log({"completions": self._wandb_table(gathered)}, step=step)
        records = [record for rank_records, _ in gathered for record in rank_records]
        with open(self.completions_path, "a") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)
        if self.writer and records:
            clean = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731 (one-line table cell)
            rows = ["| row | problem | completion | solution | reward | advantage |", "|---|---|---|---|---|---|"]
            rows += [f"| {r['row']} | {clean(r['problem'])} | {clean(r['completion'])} | {clean(r['solution'])} | "
                     f"{r['reward']:.2f} | {r['advantage']:+.2f} |" for r in records]
            self.writer.add_text("completions", "\n".join(rows), step)

    def _wandb_table(self, gathered: list[tuple[list[dict], list]]):
        """The step's completions of every rank as a wandb Table: a row per completion, with its
        prompt's picture (one wandb.Image per prompt, shared by its G rows: stored once)."""
        import wandb

        names = self.args.reward_funcs
        table = wandb.Table(columns=["step", "rank", "row", "image", "problem", "completion", "solution", *names,
                                     "reward", "advantage"])
        for records, pictures in gathered:
            images = [wandb.Image(picture) if picture is not None else None for picture in pictures]
            for r in records:
                table.add_data(r["step"], r["rank"], r["row"], images[r["prompt"]], r["problem"], r["completion"],
                               r["solution"], *(r["rewards"][name] for name in names), r["reward"], r["advantage"])
        return table

    def redraw_plots(self, wait: bool = False) -> None:
        """output_dir/plots/*.png redrawn from metrics.jsonl by `python data_tools.py plot` in a process
        of its own (rank 0, once something is logged): the training processes never load matplotlib, and
        do not wait for it unless `wait` (the run's end). One at a time; a plot that cannot be drawn is
        reported, and never stops the run."""
        if not self.writes or not os.path.getsize(self.metrics_path):
            return
        self._plotted(self.plotting)
        tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data_tools.py")
        self.plotting = subprocess.Popen([sys.executable, tool, "plot", self.args.output_dir],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if wait:
            self._plotted(self.plotting)

    def _plotted(self, process) -> None:
        if process is None:
            return
        error = process.communicate()[1]
        if process.returncode:
            self.info(f"[train] WARNING: the plots were not drawn: {(error.strip().splitlines() or ['?'])[-1]}")
        self.plotting = None

    def close(self, exit_code: int = 0, preempted: bool = False) -> None:
        """The end of the run's logs, however it ends: a finished run, a SIGTERM (`preempted`: wandb
        shows the run as preempted, to be resumed), or a run that stopped (exit_code 1: failed). The
        plots as last drawn go to wandb here, once: wandb draws the same scalars live."""
        self._plotted(self.plotting)
        if self.bar:
            self.bar.close()
        if self.writer:
            self.writer.close()
        if self.wandb:
            self._log_plots_to_wandb()
            if preempted:
                self.wandb.mark_preempting()
            self.wandb.finish(exit_code=exit_code)
            self.wandb = None

    def _log_plots_to_wandb(self) -> None:
        import wandb

        folder = os.path.join(self.args.output_dir, "plots")
        names = sorted(name for name in os.listdir(folder) if name.endswith(".png")) if os.path.isdir(folder) else []
        if names and self.logged_step is not None:
            self.wandb.log({f"plots/{name.removesuffix('.png')}": wandb.Image(os.path.join(folder, name)) for name in names},
                           step=self.logged_step)


def _keep_lines_up_to(path: str, step: int) -> None:
    """A JSONL log without the lines after `step` (all of them for a fresh run), rewritten atomically."""
    kept = []
    if step > 0 and os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def run_summary(args, world_size: int, total_steps: int, zero_stage: int, left_out: int, resumed_from: str | None,
                start_step: int, end_tokens: list[str], end_ids: list[int], parameters: tuple[int, int]) -> list[str]:
    """The lines a run starts with: what a step is, what trains, what ends a completion, and what the
    logged loss means. parameters: (trained, all) parameter counts."""
    B, accumulation, G = args.per_device_train_batch_size, args.gradient_accumulation_steps, args.num_generations
    per_call = B * accumulation if args.generation_batch_size <= 0 else max(1, args.generation_batch_size // G)
    lines = [f"[train] resumed from {resumed_from} at step {start_step} of {total_steps}"] if resumed_from else []
    lines.append(
        f"[train] {world_size} rank(s) x {B * accumulation} prompts x G={G} = {world_size * B * accumulation * G} "
        f"completions per optimizer step, sampled in {math.ceil(B * accumulation / per_call)} generate call(s) per rank; "
        f"{accumulation} micro-batch(es) of {B} prompts each, {args.num_iterations} update(s) per rollout, "
        f"{total_steps} optimizer steps; prompts {'shared by their group' if args.share_prompt else 'repeated G times'}; "
        f"ZeRO stage {zero_stage}"
        + (" (one process: nothing to partition, so the config's ZeRO stage is not used)" if world_size == 1 else "")
        + f"; {left_out} prompts per epoch left out to keep ranks even")
    trained, total = parameters
    if args.use_peft:
        what = (f"LoRA adapters (r {args.lora_r}, alpha {args.lora_alpha}) on the language model"
                + (" and the vision tower" if args.lora_vision else "") + ", the rest frozen")
    else:
        what = "every weight" + (" but the vision tower's" if args.freeze_vision_tower else "")
    reference = ("none (--beta 0)" if args.beta == 0 else "the policy with its adapters off (no second model loaded)"
                 if args.use_peft else "a frozen copy of the starting model")
    lines.append(f"[train] training {what}: {trained:,} of {total:,} parameters ({trained / total:.2%}); "
                 f"reference model: {reference}")
    lines.append(f"[train] a completion ends at the first of {end_tokens} (ids {end_ids}: the checkpoint's "
                 f"generation_config and the tokenizer's eos); sampling uses --temperature {args.temperature} and "
                 f"--top_p {args.top_p} only, never the checkpoint's sampling defaults")
    if args.num_iterations == 1:
        lines.append("[train] num_iterations=1: the ratio is exactly 1, so the logged loss sits near 0 while its "
                     "gradient is the full policy gradient (see grpo/objective.py)")
    return lines


def step_metrics(rollout, loss_stats: list[dict], args, model, phases: Phases, step_seconds: float,
                 learning_rate: float, skipped: bool, reward_failures: list[int]) -> dict:
    """This rank's numbers for one optimizer step (RunLogger.record averages them over ranks)."""
    rewards, advantages = rollout.rewards, rollout.advantages.cpu()
    lengths = rollout.completion_mask.sum(1).float().cpu()
    metrics = {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
        "advantage/std": advantages.std().item() if len(advantages) > 1 else 0.0,
        "advantage/equal_reward_group_fraction": objective.equal_reward_group_fraction(rewards, args.num_generations),
        "completion/length_mean": lengths.mean().item(),
        "completion/length_min": lengths.min().item(),
        "completion/length_max": lengths.max().item(),
        "completion/truncated_fraction": rollout.truncated.float().mean().item(),
        "optim/grad_norm": float(model.get_global_grad_norm() or 0.0),
        "optim/learning_rate": learning_rate,
        "optim/skipped_nonfinite": float(skipped),
        "reward/verify_timeouts": float(answers.timeouts()),  # math-verify past its time bound, so far (wrong answers)
        "time/step_seconds": step_seconds,
        "time/tokens_per_second": lengths.sum().item() / max(step_seconds, 1e-9),
        **phases.metrics(),  # generate, score, logps (reference / old), update
    }
    for name, column, failures in zip(args.reward_funcs, rollout.reward_per_func.T, reward_failures):
        metrics[f"reward/{name}"] = column.mean().item()
        metrics[f"reward/{name}_failures"] = float(failures)
    for key in ("loss", "kl", "clip_ratio", "entropy"):  # a skipped step's NaN loss is logged as it was
        metrics[f"loss/{key}"] = sum(s[key] for s in loss_stats) / len(loss_stats)
    return metrics


# The longer side of a picture in the wandb table, in pixels: enough to see the figure, and a fraction of
# the real data's images (up to --max_pixels 2359296, 1536 x 1536), logged every --log_completions_steps.
TABLE_PICTURE_SIDE = 448


def table_picture(example: dict):
    """The prompt's first image, shrunk to TABLE_PICTURE_SIDE at most (None for a prompt without one)."""
    if not example["images"]:
        return None
    picture = example["images"][0].copy()
    picture.thumbnail((TABLE_PICTURE_SIDE, TABLE_PICTURE_SIDE))
    return picture


def completion_records(rollout, args, step: int, rank: int) -> list[dict]:
    """This rank's completions of the step, one readable record each: what the model wrote for
    which dataset row, what every reward function said, its advantage, and whether its group carried
    any signal (a group of equal rewards teaches nothing)."""
    G = args.num_generations
    signal = objective.groups_with_signal(rollout.rewards, G).tolist()
    records = []
    for i, text in enumerate(rollout.texts):
        example = rollout.examples[i // G]
        records.append({
            "step": step, "rank": rank, "prompt": i // G, "row": example.get("row_index"),
            "images": len(example["images"]), "videos": len(example["videos"]),
            "problem": example["problem"], "solution": example["solution"], "completion": text,
            "truncated": bool(rollout.truncated[i]),
            "rewards": {name: float(value) for name, value in zip(args.reward_funcs, rollout.reward_per_func[i].tolist())},
            "reward": float(rollout.rewards[i]), "advantage": float(rollout.advantages[i]),
            "group_has_signal": signal[i // G],
        })
    return records
