"""DeepSpeed and the ranks: the process group, what ranks agree on, the engines and their config, the
optimizer step, and the checkpoints DeepSpeed writes.

- `init_distributed`: one process group for the deepspeed launcher, torchrun and plain `python`
  ([leaked shared memory] on the CPU); `end_distributed` before exit ([exit abort]).
- `mean_over_ranks`, `all_ranks`, `rank0_decides`: what the ranks must agree on ([ranks that disagree]).
  `gather_from_files`: each rank's work given to all, waited for without a collective ([waits in a collective]).
- `fill_deepspeed_config`, `load_engine`: the policy (with torch's AdamW, no JIT build, and the LR
  schedule) or the frozen reference, partitioned while it loads under ZeRO-3 ([ZeRO-3 class patching]).
- `backward` and `step`: one micro-batch's backward and DeepSpeed's step, which updates the weights
  after the last micro-batch of an optimizer step, unless a loss or a gradient was not finite on some
  rank (one check per optimizer step): then nothing changes anywhere ([non-finite steps]). `Phases`
  times them (after the device finishes, on a GPU), with peak memory.
- `save_checkpoint`, `load_checkpoint`: a checkpoint's weights, optimizer, schedule and random generators,
  written atomically and agreed on by every rank ([saves that fail on one rank]); `StopRequest`: SIGTERM.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import random
import shutil
import signal
import socket
import threading
import time

import torch

from . import families
from .config import UsageError


def init_distributed(timeout_s: float = 1800):
    """One process group for the deepspeed launcher, torchrun, and plain `python train.py` (a world of one)
    alike: (rank, world size, device). A collective waiting longer than timeout_s (--ddp_timeout) fails."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:  # no launcher: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(verbose=False, timeout=datetime.timedelta(seconds=timeout_s))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        unlink_cpu_allreduce_buffer()
    if accelerator.device_name() == "cuda":
        accelerator.set_device(local_rank)
    device = torch.device(accelerator.device_name(local_rank) if accelerator.device_name() == "cuda" else "cpu")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def unlink_cpu_allreduce_buffer() -> None:
    """DeepSpeed's CPU accelerator, under its launcher, gives each rank a 66 MB POSIX shared-memory
    all-reduce buffer, /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>, and never
    unlinks it ([leaked shared memory]). Once every rank has mapped every other rank's buffer
    (init_distributed has returned on all of them: the barrier), each rank unlinks its own name; the
    mappings stay valid, and the memory goes back when the processes end, however they end."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{torch.distributed.get_rank()}")
    torch.distributed.barrier()
    try:
        os.remove(os.path.join("/dev/shm", name))
    except FileNotFoundError:  # no launcher (no LOCAL_SIZE), or not Linux: DeepSpeed made no buffer
        pass


def end_distributed() -> None:
    """Destroy the process group before the interpreter exits ([exit abort])."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def mean_over_ranks(values: dict[str, float], device) -> dict[str, float]:
    """Each value averaged over the ranks (a collective; without a process group, the values)."""
    if not torch.distributed.is_initialized():
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], device=device, dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return dict(zip(keys, (tensor / torch.distributed.get_world_size()).tolist()))


def reduce_over_ranks(value, device, op) -> float:
    """`value` (a number, or a one-element tensor on the device, read after the reduce: one host sync)
    reduced over the ranks by `op` (a collective; without a process group, the value)."""
    tensor = torch.as_tensor(value, device=device).to(torch.float64, copy=True).reshape(1)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=op)
    return tensor.item()


def all_ranks(ok, device) -> bool:
    """True when `ok` (a bool, or a bool tensor on the device) holds on every rank (a collective)."""
    return reduce_over_ranks(ok, device, torch.distributed.ReduceOp.MIN) == 1.0


def rank0_decides(decide):
    """decide() run on rank 0 alone, its result (or its usage error) given to every rank: decisions that read
    files (the checkpoint to resume, an earlier run in --output_dir) made once, so ranks cannot disagree."""
    outcome = [None, None]
    if torch.distributed.get_rank() == 0:
        try:
            outcome[0] = decide()
        except UsageError as e:
            outcome[1] = str(e)
    torch.distributed.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        error = UsageError(outcome[1])
        error.shared = True  # every rank raises it: rank 0 alone prints it
        raise error
    return outcome[0]


def gather_from_files(work, folder: str, rank: int, world_size: int, timeout_s: float) -> tuple[list, bool]:
    """Every rank's work(rank, world_size), a JSON value, given to every rank through files in `folder` (in
    --output_dir), not in a collective: a slow rank trips no watchdog ([waits in a collective]). A part there
    already (an earlier run's: `folder` names all it depends on) is kept. The wait fails when a missing part's
    rank leaves its .alive file (touched every 2 s) still for timeout_s. Returns (the parts, whether all found)."""
    os.makedirs(folder, exist_ok=True)
    parts = [os.path.join(folder, f"part-{r}-of-{world_size}.json") for r in range(world_size)]
    alive = [os.path.join(folder, f".alive-{r}") for r in range(world_size)]
    found = all(os.path.isfile(part) for part in parts)
    if not os.path.isfile(parts[rank]):
        stop = threading.Event()

        def beat():  # this rank's sign of life while it works
            while not stop.wait(2.0):
                os.utime(alive[rank])

        open(alive[rank], "w").close()
        threading.Thread(target=beat, daemon=True).start()
        try:
            result = work(rank, world_size)
        finally:
            stop.set()
        with open(f"{parts[rank]}.{os.getpid()}.tmp", "w") as f:
            json.dump(result, f)
        os.replace(f.name, parts[rank])  # whole or not at all: a waiting rank never reads half of it
    seen = {r: (None, time.monotonic()) for r in range(world_size)}  # rank -> (its .alive's stamp, first seen at)
    while missing := [r for r in range(world_size) if not os.path.isfile(parts[r])]:
        for r in missing:
            stamp = os.stat(alive[r]).st_mtime_ns if os.path.isfile(alive[r]) else None
            seen[r] = seen[r] if stamp == seen[r][0] else (stamp, time.monotonic())
            if time.monotonic() - seen[r][1] > timeout_s:
                raise RuntimeError(f"rank {r} wrote no {parts[r]} and showed no sign of life in {timeout_s:.0f} s "
                                   "(--ddp_timeout)")
        time.sleep(0.5)
    return [json.load(open(part)) for part in parts], found


def seed_this_rank(seed: int, rank: int) -> None:
    """Sampling draws from torch's generator: seeded with seed + rank, so that ranks given the same
    prompt sample different completions ([one seed for all ranks])."""
    torch.manual_seed(seed + rank)


def load_engine(args, ds_config: dict, dtype, total_steps: int, train: bool):
    """A DeepSpeed engine around the model: the policy (`train`: with its optimizer, the LR schedule,
    gradient checkpointing, the vision tower frozen if asked, LoRA adapters with --use_peft) or the
    frozen reference. Under ZeRO-3 the weights are partitioned while they load (HfDeepSpeedConfig is
    alive during from_pretrained); LoRA's adapters, made after, are partitioned by deepspeed.initialize,
    which gives every rank rank 0's initial values."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    ds_config = dict(ds_config)
    if not train:  # the reference: no optimizer; ZeRO-3 keeps it sharded, lower stages replicate it
        ds_config.pop("optimizer", None)
        ds_config.pop("scheduler", None)
        if ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
            ds_config["zero_optimization"] = {"stage": 0}
    skeleton = families.define_model_classes(args.model_name_or_path)  # before ZeRO-3's class patching: see there
    lora_targets = families.lora_targets(skeleton, args.lora_target_modules, args.lora_vision) \
        if train and args.use_peft else None  # a name that matches no layer stops here, before the weights load
    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 (a weakref inside transformers reads it)
    model = families.load_model(args.model_name_or_path, dtype, args.attn_implementation)
    if train and args.freeze_vision_tower:
        families.vision_tower(model).requires_grad_(False)
    if not train:
        model.requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        engine.eval()
        return engine
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if lora_targets is not None:
        model = families.add_lora(model, lora_targets, args.lora_r, args.lora_alpha, args.lora_dropout, args.seed)
    scheduler = None if "scheduler" in ds_config else (lambda opt: lr_schedule(opt, args, total_steps))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds_config, lr_scheduler=scheduler)
    trace_micro_batches(engine)
    return engine


def trace_micro_batches(engine) -> None:
    """Under ZeRO-3, DeepSpeed records the order in which modules fetch their weights over one of its
    "steps" and, once a step repeats the recorded one, prefetches the weights ahead of the module that
    needs them and keeps those used again soon (stage3_max_reuse_distance). Its step begins at every
    call of the model, and a micro-batch makes two (the shared prompt's prompt and completion passes),
    so no step repeats the last: it never prefetches, and every pass gathers every weight ([ZeRO-3
    prefetch]). Here its step is a micro-batch: the reset at each call is removed, and `backward`
    resets once the micro-batch's backward is done. Other engines: nothing."""
    offload = getattr(engine.optimizer, "parameter_offload", None)
    if offload is not None:
        offload.fwd_pre_hook.remove()


def load_reference(args, policy, ds_config: dict, dtype, total_steps: int):
    """pi_ref, the starting model, for the KL term: a frozen copy of it (an engine of its own), or in a
    LoRA run the policy itself with its adapters switched off, since LoRA never changes the weights
    under them: no second copy is held."""
    if families.has_adapters(policy.module):
        return families.WithoutAdapters(policy)
    return load_engine(args, ds_config, dtype, total_steps, train=False)


def parameter_counts(engine) -> tuple[int, int]:
    """(trained, all) parameters of the engine's model, counted whole under ZeRO-3 too (ds_numel)."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in engine.module.parameters()]
    return sum(n for n, trained in sizes if trained), sum(n for n, _ in sizes)


DEFAULT_DEEPSPEED_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "zero3.json")


def read_deepspeed_config(path: str | None) -> dict:
    """The DeepSpeed JSON as a dict; an unreadable file stops the run before anything loads."""
    path = path or DEFAULT_DEEPSPEED_CONFIG
    try:
        with open(path) as f:
            ds_config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"--deepspeed: cannot read DeepSpeed config {path!r}: {e}") from e
    if not isinstance(ds_config, dict):
        raise UsageError(f"--deepspeed: {path!r} must hold a JSON object, not {type(ds_config).__name__}.")
    ds_config["_path"] = path
    return ds_config


def fill_deepspeed_config(ds_config: dict, args, world_size: int, total_steps: int,
                          on_gpu: bool) -> dict:
    """A copy of the config with its "auto" values filled from the arguments. DeepSpeed's micro-batch is
    the completions one rank forwards per micro-step (prompts x G); an "auto" we cannot fill is an
    error naming the key; a world of one runs ZeRO stage 0 whatever the file says."""
    ds_config = json.loads(json.dumps(ds_config))
    path = ds_config.pop("_path", "the DeepSpeed config")
    micro_batch = args.per_device_train_batch_size * args.num_generations
    auto_values = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "train_batch_size": micro_batch * args.gradient_accumulation_steps * world_size,
        "gradient_clipping": args.max_grad_norm,
        "bf16.enabled": bool(args.bf16),
        "fp16.enabled": False,
        "optimizer.params.lr": args.learning_rate,
        "optimizer.params.betas": [args.adam_beta1, args.adam_beta2],
        "optimizer.params.eps": args.adam_epsilon,
        "optimizer.params.weight_decay": args.weight_decay,
        "scheduler.params.warmup_min_lr": 0.0,
        "scheduler.params.warmup_max_lr": args.learning_rate,
        "scheduler.params.warmup_num_steps": math.ceil(args.warmup_ratio * total_steps),
        "scheduler.params.total_num_steps": total_steps,
    }
    _fill_auto(ds_config, auto_values, path)
    if world_size == 1 and ds_config.get("zero_optimization", {}).get("stage", 0) != 0:
        ds_config["zero_optimization"] = {"stage": 0}  # nothing to shard: ZeRO would only add its hooks
    if str(ds_config.get("optimizer", {}).get("type", "")).lower() in ("adam", "adamw"):
        # torch's AdamW (torch_adam), fused on a GPU: DeepSpeed's own FusedAdam is built by a JIT compile on
        # first use, which needs nvcc and ninja on every node ([optimizer JIT build]).
        params = ds_config["optimizer"].setdefault("params", {})
        if params.setdefault("torch_adam", True) and on_gpu:
            params.setdefault("fused", True)
    return ds_config


def _fill_auto(node: dict, auto_values: dict, path: str, prefix: str = "") -> None:
    for key, value in list(node.items()):
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            _fill_auto(value, auto_values, path, dotted + ".")
        elif value == "auto" and dotted in auto_values:
            node[key] = auto_values[dotted]
        elif value == "auto" and dotted.startswith("zero_optimization."):
            # HF's Trainer sizes ZeRO's buckets from the hidden size; DeepSpeed's own defaults are
            # sound for the models here, so an "auto" bucket size falls back to them.
            del node[key]
        elif value == "auto":
            raise UsageError(f"--deepspeed: {path!r} sets {dotted} to \"auto\", which train.py cannot fill; "
                             f"give it a value. Fillable keys: {sorted(auto_values)}.")


def lr_schedule(optimizer, args, total_steps: int):
    """Linear warmup from 0, then constant, linear or cosine decay to 0."""
    warmup = math.ceil(args.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return {"constant": 1.0, "linear": 1.0 - progress,
                "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}[args.lr_scheduler_type]

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def backward(engine, loss: torch.Tensor) -> torch.Tensor:
    """engine.backward(loss) on every rank, whatever the loss (every rank runs the same backward, so
    ZeRO's hooks and DeepSpeed's counters stay in step). Returns whether the loss is finite, as a flag on
    the device: `step` reads it with the gradients, once per optimizer step, with no host sync here. A
    non-finite loss leaves non-finite gradients, which `step` sets to 0 before they reach the optimizer."""
    engine.backward(loss, scale_wrt_gas=False)
    offload = getattr(engine.optimizer, "parameter_offload", None)
    if offload is not None:  # ZeRO-3: the micro-batch is one step of DeepSpeed's trace (trace_micro_batches)
        offload.get_param_coordinator().reset_step()
    return torch.isfinite(loss)


def step(engine, losses_finite) -> bool:
    """DeepSpeed's step after a micro-batch's backward: after the optimizer step's last micro-batch
    the weights change, by AdamW with the LR schedule, unless a loss of this step was not finite
    (`losses_finite`: the `backward` flags of its micro-batches and-ed together) or some rank's gradient
    is not finite (an overflow in backward, in bf16 most likely): then every rank's gradient is set to
    0 and the step runs at learning rate 0, so that no weight moves and no NaN enters Adam's moments, and
    the schedule sets the rate again after. Checked once per optimizer step: one fused norm over the
    rank's gradients, one all-reduce, one host sync. Returns whether this optimizer step was skipped."""
    skip = False
    if engine.is_gradient_accumulation_boundary():
        gradients = _local_gradients(engine)
        # The norm is not finite when an element is not, or when the squares overflow (which Adam's
        # second moment, g^2, would too).
        finite = torch.stack(torch._foreach_norm(gradients)).isfinite().all() if gradients else True
        if not all_ranks(finite & losses_finite, engine.device):
            torch._foreach_zero_(gradients)
            for group in engine.optimizer.param_groups:
                group["lr"] = 0.0
            skip = True
    engine.step()
    return skip


def _local_gradients(engine) -> list[torch.Tensor]:
    """This rank's share of the accumulated gradient: the tensors DeepSpeed's step reads, in place (no
    copy, no communication, no sync per tensor). Under ZeRO-1/2/3 its optimizer's partitions
    (averaged_gradients), else every trained parameter's .grad (the whole gradient, on every rank)."""
    partitions = getattr(engine.optimizer, "averaged_gradients", None)
    if partitions:
        return [grad for group in partitions.values() if group is not None for grad in group]
    if engine.zero_optimization_stage() > 0:  # ZeRO-Offload's CPU copies, bf16 ZeRO-1's buffers: not read here
        raise UsageError(f"--deepspeed: the non-finite check cannot find the gradients DeepSpeed's "
                         f"{type(engine.optimizer).__name__} holds; use zero2.json or zero3.json.")
    return [param.grad for param in engine.module.parameters() if param.requires_grad and param.grad is not None]


def reset_peak_memory(device) -> None:
    """Start a new peak: the GPU's allocated memory, or on the CPU the process's resident memory
    (Linux: writing 5 to /proc/self/clear_refs resets VmHWM, the peak resident size)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux: the peak stays the run's peak so far
        pass


def peak_memory_gb(device) -> float:
    """The peak since the last reset_peak_memory: the device's allocated memory (CUDA), else the
    process's resident memory (VmHWM; where it cannot be read, the run's peak so far)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20  # kB
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Phases:
    """Each phase's seconds and peak memory (the device's, or the process's resident memory on the
    CPU), for one step: `with phases("generate"): ...`; `phases.metrics()` names them time/<phase>_seconds
    and memory/<phase>_peak_gb. On a GPU the clock is read after the device has finished the work queued
    so far (torch.cuda.synchronize), at each phase's start and end: the host runs ahead of the GPU, and
    without it a phase would be timed by when its kernels were launched, not when they ran."""

    def __init__(self, device):
        self.device, self.seconds, self.peak_gb = device, {}, {}

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = self._clock()
        reset_peak_memory(self.device)
        yield
        self.seconds[name] = self._clock() - start
        self.peak_gb[name] = peak_memory_gb(self.device)

    def metrics(self) -> dict[str, float]:
        return {**{f"time/{name}_seconds": s for name, s in self.seconds.items()},
                **{f"memory/{name}_peak_gb": gb for name, gb in self.peak_gb.items()}}


# ---------------------------------------------------------------- checkpoints and pre-emption

TRAINER_STATE = "trainer_state.json"
SAVE_WAITS = ".save-waits"  # in --output_dir: the files by which ranks wait for rank 0's writes (gather_from_files)
DEEPSPEED_TAG = "deepspeed"


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


def save_checkpoint(engine, processor, args, folder: str, trainer_state: dict, zero_stage: int, rank: int,
                    device) -> bool:
    """A checkpoint in `folder`: the model as families.save_model writes it, DeepSpeed's checkpoint (a shard per
    rank under ZeRO-3), each rank's random generators, and `trainer_state` as trainer_state.json, written
    last. Everything goes into folder.tmp, renamed to `folder` once every rank's part is on disk. A
    failed write (a full disk, on any rank) fails the save on every rank: reported, folder.tmp removed,
    and whatever stood before left as it was ([saves that fail on one rank]). Returns whether it was
    saved; every rank calls it."""
    temporary, waits, is_main = folder + ".tmp", os.path.join(os.path.dirname(folder), SAVE_WAITS), rank == 0
    if is_main:
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.rmtree(waits, ignore_errors=True)  # the last save's: every rank is through it
    torch.distributed.barrier()
    error = None

    def write_model(*_):  # rank 0 writes alone, after ZeRO-3's gather: the others wait for it by files
        nonlocal error
        try:
            families.save_model(engine, processor, args, temporary, zero_stage, is_main)
        except Exception as e:  # noqa: BLE001 (a full disk surfaces as OSError or as the writer's own error)
            error = e
            shutil.rmtree(temporary, ignore_errors=True)  # room for its part below (the save fails everywhere)

    gather_from_files(write_model, waits, rank, torch.distributed.get_world_size(), args.ddp_timeout)
    if all_ranks(error is None, device):
        try:
            write_errors = []
            with writes_kept_going(engine.checkpoint_engine, write_errors):
                # a LoRA model's frozen weights are the base model's, on disk already: not copied into every checkpoint
                engine.save_checkpoint(temporary, tag=DEEPSPEED_TAG, save_latest=False,
                                       exclude_frozen_parameters=families.has_adapters(engine.module))
            if write_errors:
                raise write_errors[0]
            torch.save(rng_state(), os.path.join(temporary, f"rng_state_{rank}.pth"))
        except Exception as e:  # noqa: BLE001
            error = e
    if all_ranks(error is None, device) and is_main:
        try:
            with open(os.path.join(temporary, TRAINER_STATE), "w") as f:
                json.dump(trainer_state, f, indent=1)
            if os.path.exists(folder):  # a checkpoint of this step from an overwritten run
                shutil.rmtree(folder)
            os.replace(temporary, folder)
        except Exception as e:  # noqa: BLE001
            error = e
    saved = all_ranks(error is None, device)
    if not saved:
        if error is not None:
            print(f"[train] rank {rank}: saving {os.path.basename(folder)} failed: {type(error).__name__}: {error}",
                  flush=True)
        if is_main:
            shutil.rmtree(temporary, ignore_errors=True)
    torch.distributed.barrier()
    return saved


def load_checkpoint(engine, folder: str, rank: int) -> dict:
    """Restore weights, optimizer and LR schedule (DeepSpeed's checkpoint) and this rank's random
    generators; returns the checkpoint's trainer_state.json."""
    # A LoRA checkpoint holds the adapters alone (save_checkpoint): the frozen weights stay as loaded.
    load_path, _ = engine.load_checkpoint(folder, tag=DEEPSPEED_TAG,
                                          load_module_strict=not families.has_adapters(engine.module))
    if load_path is None:
        raise UsageError(f"--resume_from_checkpoint: DeepSpeed found no checkpoint under {folder!r}/{DEEPSPEED_TAG}.")
    rng_file = os.path.join(folder, f"rng_state_{rank}.pth")
    if not os.path.isfile(rng_file):
        raise UsageError(f"--resume_from_checkpoint: {folder!r} has no {os.path.basename(rng_file)}; it was written "
                         "by fewer ranks than this run has. Resume with the same number of ranks.")
    set_rng_state(torch.load(rng_file, weights_only=False))
    with open(os.path.join(folder, TRAINER_STATE)) as f:
        return json.load(f)


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
        return not all_ranks(not self.received, device)
