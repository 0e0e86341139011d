"""train.py with faults put in on purpose, for tests/test_resume.py. Runs like train.py (plain
`python tests/fault_worker.py ARGS` or under `deepspeed`); the faults come from the environment
variable GRPO_TEST_FAULTS, a JSON object (it reaches every rank the launcher starts):

    kill_after_save: S    rank 0 SIGKILLs itself once checkpoint-S is complete
    kill_during_save: S   rank 0 SIGKILLs itself half-way through writing checkpoint-S
    fail_save: S          every rank's write of checkpoint-S fails as on a full disk (OSError ENOSPC)
    fail_deepspeed_write: [S, R]  on rank R alone, DeepSpeed's first write of checkpoint-S fails so
    nan_loss_steps: [..]  the loss of these optimizer steps (1-based) is NaN
    nan_loss_rank: R      ... on rank R only (default: every rank)
    nan_grad_steps: [..]  the loss of these steps stays finite and its gradient is not (on nan_loss_rank)
    record_prompts: PATH  each step's dataset indices are appended to PATH.<rank> as a JSON line
    report_exit: PATH     when train.cli has returned, PATH.<rank> gets its status and whether the
                          process group is still alive (it must not be: [exit abort])
    slow_row_check: [R, S]      rank R sleeps S seconds before it checks its share of the rows
    slow_model_write: [R, S]    rank R sleeps S seconds in each write of the 16-bit model (a save's, the final one),
                                after ZeRO-3's gather, before the processor and arguments are written
    slow_before_engine: [R, S]  rank R sleeps S seconds before DeepSpeed's engine starts (its collectives wait)
"""

import errno
import json
import os
import signal
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402
from grpo import data, distributed, families, objective, output_dir  # noqa: E402

FAULTS = json.loads(os.environ.get("GRPO_TEST_FAULTS", "{}"))
saving_step = None  # the checkpoint being written
update_step = 0     # optimizer steps taken by this process (a resumed run counts from its checkpoint)


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


real_save_checkpoint = output_dir.save


def save_checkpoint(engine, processor, args, progress, *rest, **kwargs):
    global saving_step
    saving_step = progress.step
    saved = real_save_checkpoint(engine, processor, args, progress, *rest, **kwargs)
    saving_step = None
    if saved and progress.step == FAULTS.get("kill_after_save") and _rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return saved


real_rng_state = distributed.rng_state


def rng_state():
    # Called after DeepSpeed's part of the checkpoint is on disk and before trainer_state.json.
    if saving_step is not None and saving_step == FAULTS.get("kill_during_save") and _rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    if saving_step is not None and saving_step == FAULTS.get("fail_save"):
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_rng_state()


real_update = train.update


def update(engine, rollout, args, *rest):
    global update_step
    update_step = engine.global_steps + 1  # DeepSpeed's count, restored by a resume
    return real_update(engine, rollout, args, *rest)


real_policy_loss = objective.policy_loss


def policy_loss(*args, **kwargs):
    value, stats = real_policy_loss(*args, **kwargs)
    if update_step in FAULTS.get("nan_loss_steps", []) and FAULTS.get("nan_loss_rank", _rank()) == _rank():
        value = value * float("nan")
    if update_step in FAULTS.get("nan_grad_steps", []) and FAULTS.get("nan_loss_rank", _rank()) == _rank():
        value = value + torch.sqrt(value - value.detach())  # adds sqrt(0) = 0; its derivative is inf
    return value, stats


real_step_prompts = data.step_prompts


def step_prompts(*args, **kwargs):
    for indices in real_step_prompts(*args, **kwargs):
        with open(f"{FAULTS['record_prompts']}.{_rank()}", "a") as f:
            f.write(json.dumps(indices) + "\n")
        yield indices


def slowed(function, fault: str):
    """function, made to sleep S seconds first on rank R, for FAULTS[fault] = [R, S]."""
    def call(*args, **kwargs):
        if FAULTS.get(fault, [None])[0] == _rank():
            time.sleep(FAULTS[fault][1])
        return function(*args, **kwargs)
    return call


data.RowCheck.share = slowed(data.RowCheck.share, "slow_row_check")
families._save_processor_and_arguments = slowed(families._save_processor_and_arguments, "slow_model_write")
distributed.load_engine = slowed(distributed.load_engine, "slow_before_engine")

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine  # noqa: E402

real_write = TorchCheckpointEngine.save


def deepspeed_write(self, state_dict, path):
    if [saving_step, _rank()] == FAULTS.get("fail_deepspeed_write"):
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_write(self, state_dict, path)


TorchCheckpointEngine.save = deepspeed_write
output_dir.save, distributed.rng_state = save_checkpoint, rng_state
train.update, objective.policy_loss = update, policy_loss
if "record_prompts" in FAULTS:
    data.step_prompts = step_prompts

if __name__ == "__main__":
    status = train.cli(sys.argv[1:])
    if "report_exit" in FAULTS:
        with open(f"{FAULTS['report_exit']}.{_rank()}", "w") as f:
            json.dump({"status": status, "process_group_alive": torch.distributed.is_initialized()}, f)
    sys.exit(status)
