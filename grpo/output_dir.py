"""Everything a run keeps in --output_dir, and reads back to resume.

    output_dir/
      metrics.jsonl              every logged step, one JSON object per line
      completions.jsonl          every --log_completions_steps: each sampled completion, its rewards and advantage
      runs/<run_name>/           TensorBoard scalars and sample completions
      checkpoint-<step>/         Hugging Face layout (from_pretrained loads it), plus the training state:
        model.safetensors, config.json, the processor's files, training_args.json
        deepspeed/               DeepSpeed's checkpoint: weights, optimizer, LR schedule (a shard per rank under ZeRO-3)
        rng_state_<rank>.pth     each rank's Python, NumPy and torch generators
        trainer_state.json       the step and the position in the data order; written last
      checkpoint-<step>.tmp/     a save in progress: renamed to checkpoint-<step> only once complete
      model.safetensors, ...     the final model
      plots/<figure>.png         rewards, completion lengths, loss terms per step (plot_runs)

Only rank 0 writes the logs; the metrics it gets are already averaged over ranks. A checkpoint is
complete when its trainer_state.json exists, and a kill during a save leaves only a .tmp folder, so
`--resume_from_checkpoint latest` never picks a half-written one. The folders live on a file system
all ranks share (DeepSpeed's checkpoints assume the same).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
from fnmatch import fnmatchcase
from typing import NamedTuple

import torch

from .config import UsageError, UsageParser

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
        self.completions_path = os.path.join(output_dir, "completions.jsonl")
        if not enabled:
            return
        from tqdm.auto import tqdm

        os.makedirs(output_dir, exist_ok=True)
        _keep_lines_up_to(self.metrics_path, start_step)
        if os.path.exists(self.completions_path):
            _keep_lines_up_to(self.completions_path, start_step)
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

    def log_completions(self, records: list[dict]) -> None:
        """Every sampled completion of a step, one JSON line each in completions.jsonl (its dataset row,
        what each reward function said, its advantage, whether its group carried a signal), and a
        Markdown table of them under TensorBoard's Text tab."""
        if not self.enabled or not records:
            return
        with open(self.completions_path, "a") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)
        if self.writer:
            clean = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731 (one-line table cell)
            rows = ["| row | problem | completion | solution | reward | advantage |", "|---|---|---|---|---|---|"]
            rows += [f"| {r['row']} | {clean(r['problem'])} | {clean(r['completion'])} | {clean(r['solution'])} | "
                     f"{r['reward']:.2f} | {r['advantage']:+.2f} |" for r in records]
            self.writer.add_text("completions", "\n".join(rows), records[0]["step"])

    def close(self) -> None:
        if self.progress:
            self.progress.close()
        if self.writer:
            self.writer.close()


def _keep_lines_up_to(path: str, step: int) -> None:
    """A JSONL log without the lines after `step` (all of them for a fresh run), rewritten atomically."""
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
    """Stop unless every rank sees the same --output_dir: rank 0 writes a file there and every rank
    looks for it (a collective). Checkpoints (DeepSpeed writes one shard per rank into the same
    folder), the logs and the choice of the checkpoint to resume assume one folder on a file system
    all nodes share; on folders local to each node the run would resume different checkpoints, or
    none, on different ranks."""
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


# ---------------------------------------------------------------- saving and loading

def save_model(engine, processor, args, folder: str, zero_stage: int, is_main: bool) -> None:
    """Hugging Face format (safetensors + processor) that from_pretrained loads, and the run's
    arguments (training_args.json: eval.py prompts the model as it was trained). Under ZeRO-3 the
    shards are gathered into one 16-bit state dict on rank 0 (a collective: every rank calls this)."""
    import dataclasses

    state_dict = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else engine.module.state_dict()
    if is_main:
        model = engine.module
        # save_pretrained writes the key layout the weights were read from, by reverting the renames
        # from_pretrained recorded in _weight_conversions. Loaded under ZeRO-3 (HfDeepSpeedConfig) it
        # records extra ones, and their reversal wrote Qwen2-VL's layers as model.model.layers.*
        # (transformers 5.24), which other readers (vLLM) do not know. Without a record it reverts the
        # family's default renames: exactly what a save after a plain load writes.
        recorded = getattr(model, "_weight_conversions", None)
        if zero_stage == 3:
            model._weight_conversions = None
        try:
            model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        finally:
            model._weight_conversions = recorded
        processor.save_pretrained(folder)
        with open(os.path.join(folder, "training_args.json"), "w") as f:
            json.dump(dataclasses.asdict(args), f, indent=1)


def _all_ranks(ok: bool, device) -> bool:
    """True when `ok` holds on every rank (a collective)."""
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


@contextlib.contextmanager
def writes_kept_going(checkpoint_engine, errors: list):
    """DeepSpeed's checkpoint writes (its checkpoint engine's save and makedirs) with their errors
    kept in `errors` instead of raised. engine.save_checkpoint waits in barriers between writes: a
    rank whose write raised (its disk full) would leave the others waiting there until the process
    group times out. This way every rank goes through DeepSpeed's save, and then all agree."""
    def kept(write):
        def call(*args, **kwargs):
            try:
                return write(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        return call

    checkpoint_engine.save, checkpoint_engine.makedirs = kept(checkpoint_engine.save), kept(checkpoint_engine.makedirs)
    try:
        yield
    finally:  # the instance attributes go; the class's methods show through again
        del checkpoint_engine.save, checkpoint_engine.makedirs


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
            write_errors = []
            with writes_kept_going(engine.checkpoint_engine, write_errors):
                engine.save_checkpoint(temporary, tag=DEEPSPEED_TAG, save_latest=False)
            if write_errors:
                raise write_errors[0]
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


# ---------------------------------------------------------------- plots

class Panel(NamedTuple):
    """One axes of a figure: metric `key` against the step, one line per run. A `key` with * stands
    for one panel per logged metric it matches (fnmatch) that no pattern in `skip` matches, in the
    order they were logged; `band` names two metrics shaded as a range (min to max) behind the line."""
    key: str
    band: tuple[str, str] | None = None
    skip: tuple[str, ...] = ()


# The figures of a run, plots/<figure>.png, as data: a new panel goes here, not into the code below.
# Every metric has an axes of its own (their scales differ); the x axis is the step.
PLOTS: dict[str, list[Panel]] = {
    # The weighted sum, then each reward function's mean (accuracy, format, ...), not their failure counts.
    "rewards": [Panel("reward/mean"), Panel("reward/*", skip=("reward/mean", "reward/std", "reward/*_failures"))],
    "completion": [Panel("completion/length_mean", band=("completion/length_min", "completion/length_max")),
                   Panel("completion/truncated_fraction")],
    "loss": [Panel("loss/kl"), Panel("loss/entropy"), Panel("loss/clip_ratio")],
}


def metrics_file(path: str) -> str:
    """A run's folder stands for the metrics.jsonl in it."""
    return os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path


def read_metrics(path: str) -> list[dict]:
    """The logged steps of a metrics.jsonl (or of the run folder holding one), one dict per line."""
    path = metrics_file(path)
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UsageError(f"{path}: cannot read it ({e.strerror}); give a run's output_dir or its metrics.jsonl.") from e
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}, line {number}: not JSON ({e.msg}); a metrics.jsonl holds one JSON "
                             f"object per line, as train.py writes it.") from e
        if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
            raise UsageError(f"{path}, line {number}: a metrics line is a JSON object with a numeric \"step\".")
        rows.append(row)
    if not rows:
        raise UsageError(f"{path}: no logged step yet; a run writes its first line after --logging_steps steps.")
    return rows


def _number(value) -> float:
    """A logged value as a float; NaN (a gap in the line) for a skipped step's non-finite value or a non-number."""
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return math.nan


def _series(rows: list[dict], *keys: str) -> tuple[list[float], ...]:
    """The steps that logged every one of `keys`, and each key's values at those steps."""
    rows = [row for row in rows if all(key in row for key in keys)]
    return ([row["step"] for row in rows], *([_number(row[key]) for row in rows] for key in keys))


def _panel_keys(panel: Panel, logged: list[str]) -> list[str]:
    """The metrics `panel` stands for, of those `logged`."""
    if "*" not in panel.key:
        return [panel.key] if panel.key in logged else []
    return [key for key in logged
            if fnmatchcase(key, panel.key) and not any(fnmatchcase(key, pattern) for pattern in panel.skip)]


def draw_figures(runs: dict[str, list[dict]]) -> dict:
    """The figures of PLOTS ({name: matplotlib Figure}) for `runs` ({label: logged steps}): one line
    per run on every panel, a run keeping its colour throughout. A panel no run logged is left out,
    and a figure with no panel. Drawn on Figure objects, not pyplot, so no global state changes and
    nothing needs a display; NaN values leave gaps, and markers show steps between gaps."""
    from matplotlib.figure import Figure

    logged = list(dict.fromkeys(key for rows in runs.values() for row in rows for key in row))
    figures = {}
    for name, panels in PLOTS.items():
        shown = [(key, panel) for panel in panels for key in _panel_keys(panel, logged)]
        if not shown:
            continue
        figure = Figure(figsize=(8, 0.8 + 2.2 * len(shown)), layout="constrained")
        axes = figure.subplots(len(shown), 1, sharex=True, squeeze=False)[:, 0]
        handles = {}
        for ax, (key, panel) in zip(axes, shown):
            ax.set_title(key, loc="left", fontsize="medium")
            ax.grid(alpha=0.3)
            for i, (label, rows) in enumerate(runs.items()):
                colour = f"C{i % 10}"
                if panel.band and (band := _series(rows, *panel.band))[0]:
                    ax.fill_between(*band, color=colour, alpha=0.2, linewidth=0)
                steps, values = _series(rows, key)
                if steps:
                    (handles[label],) = ax.plot(steps, values, color=colour, marker=".", markersize=4, label=label)
        axes[-1].set_xlabel("step")
        labels = [label for label in runs if label in handles]
        figure.legend([handles[label] for label in labels], labels, loc="outside upper center",
                      ncols=min(len(labels), 4), frameon=False)
        figures[name] = figure
    return figures


def _run_labels(paths: list[str]) -> list[str]:
    """Each run's folder name; the folders' paths where two names coincide."""
    folders = [os.path.dirname(os.path.abspath(metrics_file(path))) for path in paths]
    if len(set(folders)) != len(folders):
        raise UsageError(f"{paths}: a run is given twice; give each run once.")
    names = [os.path.basename(folder) for folder in folders]
    return names if len(set(names)) == len(names) else folders


def plot_runs(metrics_files: list[str], out_dir: str, labels: list[str] | None = None) -> list[str]:
    """Draw PLOTS for the runs whose metrics.jsonl (or run folder) are given, one line per run labelled
    with its folder's name or `labels`, and write <out_dir>/<figure>.png; returns the paths written.
    Each PNG is replaced atomically, since train.py redraws them at every save while one may be open."""
    labels = list(labels) if labels is not None else _run_labels(metrics_files)
    if len(labels) != len(metrics_files) or len(set(labels)) != len(labels):
        raise UsageError(f"labels: {labels} for {len(metrics_files)} runs; give one distinct label per run, or None "
                         f"for their folder names.")
    figures = draw_figures({label: read_metrics(path) for label, path in zip(labels, metrics_files)})
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, figure in figures.items():
        path = os.path.join(out_dir, f"{name}.png")
        figure.savefig(path + ".tmp", format="png", dpi=100)
        os.replace(path + ".tmp", path)
        paths.append(path)
    return paths


def cli(argv: list[str]) -> int:
    """python -m grpo.output_dir plot RUN_DIR_OR_METRICS_JSONL [...] [--out DIR]. A usage mistake is one
    line on stderr and exit status 2, not a traceback."""
    parser = UsageParser(prog="python -m grpo.output_dir", description="Tools for a run's output_dir.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plot = commands.add_parser("plot", help="Draw the plots of one or more runs.", description=(
        "Draw each run's rewards, completion lengths and loss terms per step, one line per run (labelled "
        "with its folder's name), into DIR/rewards.png, completion.png and loss.png."))
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_METRICS_JSONL",
                      help="A run's --output_dir, or its metrics.jsonl; several runs share each figure.")
    plot.add_argument("--out", metavar="DIR", help="Where the PNGs go (default: plots/ in the first run's folder).")
    try:
        args = parser.parse_args(argv)
        out = args.out or os.path.join(os.path.dirname(metrics_file(args.runs[0])), "plots")
        paths = plot_runs(args.runs, out)
    except (UsageError, OSError) as e:
        print(f"output_dir: error: {e}", file=sys.stderr)
        return 2
    if not paths:
        plotted = [panel.key for panels in PLOTS.values() for panel in panels]
        print(f"output_dir: nothing to plot: the runs log none of {plotted}.", file=sys.stderr)
    print("\n".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
