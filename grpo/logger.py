"""What a run shows: a progress bar, one console line per logging step, TensorBoard scalars and
sample completions, and metrics.jsonl (every logged step, for plots and for nothing to be lost).
Only rank 0 writes; the metrics it gets are already averaged over ranks.
"""

from __future__ import annotations

import json
import os

# The console line: (metric key, short label, format).
CONSOLE_FIELDS = [
    ("reward/mean", "reward", ".3f"), ("reward/accuracy", "acc", ".3f"), ("reward/format", "format", ".3f"),
    ("completion/length_mean", "len", ".1f"), ("loss/kl", "kl", ".4f"), ("loss/clip_ratio", "clip", ".3f"),
    ("time/step_seconds", "s/step", ".2f"),
]


class RunLogger:
    def __init__(self, output_dir: str, run_name: str, report_to: str, total_steps: int, enabled: bool):
        self.enabled = enabled
        self.writer = self.progress = None
        self.metrics_path = os.path.join(output_dir, "metrics.jsonl")
        if not enabled:
            return
        from tqdm.auto import tqdm

        os.makedirs(output_dir, exist_ok=True)
        open(self.metrics_path, "w").close()
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(output_dir, "runs", run_name))
        self.progress = tqdm(total=total_steps, desc="GRPO", unit="step", dynamic_ncols=True)

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
