"""GRPO for vision-language models: `deepspeed train.py --args` (or `python train.py` for one process).

The loop, once per optimizer step:
  1. sample: G completions for every prompt of this rank's step, in one generate call (grpo/sampler.py)
  2. score them with the reward functions                                             (grpo/rewards.py)
  3. group-normalised advantages                                                      (grpo/advantage.py)
  4. old log-probs (only when num_iterations > 1), reference log-probs (only when beta > 0)
  5. clipped, KL-regularised loss over the step's micro-batches; backward and step,
     num_iterations times                                                              (grpo/loss.py)
  6. log
  7. at the end of a rollout: save a checkpoint every --save_steps, and on SIGTERM (then stop)
A checkpoint holds everything a resumed run needs to continue as if never stopped: weights,
optimizer, LR schedule, random generators and the position in the data order (grpo/output_dir.py).
A step whose loss or gradient is not finite is skipped; --max_nonfinite_steps in a row stop the run.
Each prompt (and image) is encoded once per group, in generate and in every log-prob forward
(--share_prompt, grpo/vlm_adapter.py). The step's data travels as one StepRollout.
Model-family details are in grpo/vlm_adapter.py, arguments in grpo/config.py.
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import sys
import time
from dataclasses import dataclass

import torch

from grpo import advantage, answers, config, data, loss, output_dir, rewards, sampler, vlm_adapter


def parse_args(argv: list[str]) -> config.GRPOArguments:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(config.GRPOArguments, description=__doc__.split("\n")[0])
    bf16 = parser._option_string_actions["--bf16"]  # unset (None) means "on a GPU": `--bf16` alone still means true
    bf16.nargs, bf16.const = "?", True
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    args.run_name = args.run_name or os.path.basename(os.path.normpath(args.output_dir))
    return args


def init_distributed():
    """One process group for `deepspeed` launches and for plain `python train.py` alike."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:  # no launcher: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(verbose=False)
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
    unlinks it: /dev/shm is RAM, so every CPU run would leave world_size of them behind until reboot
    (a day of test runs filled a 24 GB machine). Once every rank has mapped every other rank's buffer
    (init_distributed has returned on all of them: the barrier), each rank unlinks its own name; the
    mappings stay valid, and the memory goes back when the processes end, however they end."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{torch.distributed.get_rank()}")
    torch.distributed.barrier()
    try:
        os.remove(os.path.join("/dev/shm", name))
    except FileNotFoundError:  # no launcher (no LOCAL_SIZE), or not Linux: DeepSpeed made no buffer
        pass


def mean_over_ranks(values: dict[str, float], device) -> dict[str, float]:
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], device=device, dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return dict(zip(keys, (tensor / torch.distributed.get_world_size()).tolist()))


def reduce_over_ranks(value: float, device, op) -> float:
    tensor = torch.tensor([float(value)], device=device, dtype=torch.float64)
    torch.distributed.all_reduce(tensor, op=op)
    return tensor.item()


def rank0_decides(decide):
    """decide() run on rank 0 alone, its result (or its usage error) given to every rank.

    For the decisions that read files (the checkpoint to resume, whether --output_dir holds an earlier
    run, which rows are usable): made once, so ranks on different machines cannot disagree and wait
    for each other forever, and the work (decoding every picture of the dataset) is not repeated."""
    outcome = [None, None]
    if torch.distributed.get_rank() == 0:
        try:
            outcome[0] = decide()
        except config.UsageError as e:
            outcome[1] = str(e)
    torch.distributed.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        error = config.UsageError(outcome[1])
        error.shared = True  # every rank raises it: rank 0 alone prints it
        raise error
    return outcome[0]


def starting_checkpoint(args, world_size: int) -> str | None:
    """The checkpoint folder this run resumes (None: a fresh run, which never writes over an earlier
    one unless asked)."""
    folder = output_dir.checkpoint_to_resume(args.resume_from_checkpoint, args.output_dir)
    if folder is None:
        output_dir.guard_output_dir(args.output_dir, overwrite=args.overwrite_output_dir)
    else:
        check_resumable(output_dir.read_trainer_state(folder), args, world_size, folder)
    return folder


def load_dataset_once(args, processor, family, log, is_main: bool) -> data.PromptDataset:
    """The usable prompts: rank 0 checks every row (each picture decoded once) and reports the drops;
    the other ranks take its list of usable rows and check nothing."""
    checked = {}

    def check_rows():
        checked["dataset"] = data.load_prompt_dataset(
            args.dataset_name, args.dataset_split, processor, family, args.max_prompt_length, args.system_prompt,
            log=log, progress=is_main,
            check_solution=answers.unverifiable_reason if "accuracy" in args.reward_funcs else None)
        return checked["dataset"].keep, checked["dataset"].dropped

    usable = rank0_decides(check_rows)
    return checked.get("dataset") or data.load_prompt_dataset(
        args.dataset_name, args.dataset_split, processor, family, args.max_prompt_length, args.system_prompt,
        usable=usable)


def seed_this_rank(seed: int, rank: int) -> None:
    """Sampling draws from torch's generator: seeded with seed + rank, so that ranks given the same
    prompt sample different completions (one seed for all ranks gave identical groups, trap 7)."""
    torch.manual_seed(seed + rank)


def load_engine(args, ds_config: dict, dtype, total_steps: int, train: bool):
    """A DeepSpeed engine around the model. Under ZeRO-3 the weights are partitioned while they
    load (HfDeepSpeedConfig must be alive during from_pretrained)."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    ds_config = dict(ds_config)
    if not train:  # the reference: no optimizer; ZeRO-3 keeps it sharded, lower stages replicate it
        ds_config.pop("optimizer", None)
        ds_config.pop("scheduler", None)
        if ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
            ds_config["zero_optimization"] = {"stage": 0}
    vlm_adapter.define_model_classes(args.model_name_or_path)  # before ZeRO-3's class patching: see there
    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 (a weakref inside transformers reads it)
    model = vlm_adapter.load_model(args.model_name_or_path, dtype, args.attn_implementation)
    if train and args.freeze_vision_tower:
        vlm_adapter.vision_tower(model).requires_grad_(False)
    if not train:
        model.requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        engine.eval()
        return engine
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    scheduler = None if "scheduler" in ds_config else (lambda opt: lr_schedule(opt, args, total_steps))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds_config, lr_scheduler=scheduler)
    return engine


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


def score(reward_funcs, names: list[str], weights, texts: list[str], examples: list[dict], group_size: int,
          faults: rewards.RewardFaults):
    """Rewards for N = len(texts) completions; completion i belongs to prompt i // G, so it is
    scored against that prompt's solution (trap 2). A function that fails on a completion gives it
    0 and is reported (grpo/rewards.py). Returns (per-function [N, K], total [N], failures per function [K])."""
    columns = {key: [ex[key] for ex in examples for _ in range(group_size)]
               for key in examples[0] if key not in ("images", "videos", "prompt", "row_index")}
    rows = [ex.get("row_index", i) for i, ex in enumerate(examples) for _ in range(group_size)]
    scores, failures = rewards.score_completions(reward_funcs, names, texts, columns, rows, faults)
    per_func = torch.tensor(scores, dtype=torch.float32).reshape(len(texts), len(reward_funcs))
    return per_func, advantage.combine_rewards(per_func, weights), failures


class RunStopped(RuntimeError):
    """The run cannot go on (repeated non-finite steps, a failed final save): one line, exit 1."""


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    config.validate(args)  # bad arguments stop here, before anything loads
    config.settle_precision_and_attention(args, on_gpu=torch.cuda.is_available(), flash_attn=config.flash_attn_version())
    raw_ds_config = config.read_deepspeed_config(args.deepspeed)
    reward_funcs = rewards.get_reward_funcs(args.reward_funcs)
    config.check_paths(args)
    rank, world_size, device = init_distributed()
    is_main = rank == 0
    log = print if is_main else (lambda *_: None)
    # What every rank must agree on is decided by rank 0 and broadcast (rank0_decides): ranks on
    # machines that see different files can never disagree on the checkpoint to resume or the rows to
    # train on. First, that the ranks see one --output_dir at all.
    output_dir.check_seen_by_every_rank(args.output_dir, rank, world_size)
    resume_folder = rank0_decides(lambda: starting_checkpoint(args, world_size))
    if resume_folder is None and args.overwrite_output_dir and is_main:
        output_dir.clear_earlier_run(args.output_dir, args.run_name)
    if is_main and (unfinished := output_dir.remove_unfinished_saves(args.output_dir)):
        log(f"[train] removed {len(unfinished)} interrupted save(s): {', '.join(unfinished)}")
    family = vlm_adapter.check_model_type(args.model_name_or_path)
    processor = vlm_adapter.load_processor(args.model_name_or_path, args.min_pixels, args.max_pixels)
    dataset = load_dataset_once(args, processor, family, log, is_main)
    G, B, gas, mu = args.num_generations, args.per_device_train_batch_size, args.gradient_accumulation_steps, args.num_iterations
    micro_steps_per_epoch = data.steps_per_epoch(len(dataset), B, world_size)
    if micro_steps_per_epoch < gas:
        raise config.UsageError(f"--dataset_name: {len(dataset)} prompts are fewer than one optimizer step needs "
                         f"({B} per device x {world_size} ranks x {gas} accumulation steps).")
    rollouts_per_epoch = micro_steps_per_epoch // gas
    total_steps = args.max_steps if args.max_steps > 0 else max(1, int(args.num_train_epochs * rollouts_per_epoch)) * mu
    ds_config = config.fill_deepspeed_config(raw_ds_config, args, world_size, total_steps, on_gpu=device.type == "cuda")
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    engine = load_engine(args, ds_config, dtype, total_steps, train=True)
    ref_engine = load_engine(args, ds_config, dtype, total_steps, train=False) if args.beta > 0 else None
    # Where the run starts: step 0 with fresh seeds, or a checkpoint's weights, optimizer, LR
    # schedule, random generators and position in the data order.
    run = {"step": 0, "rollouts": 0, "log_window": [], "nonfinite_in_a_row": 0}
    if resume_folder is not None:
        run.update(output_dir.load_checkpoint(engine, resume_folder, rank))
        if run["num_prompts"] != len(dataset):
            log(f"[train] WARNING: the checkpoint's run had {run['num_prompts']} usable prompts and this one has "
                f"{len(dataset)}; the prompts from here on differ from those of an uninterrupted run.")
    else:
        seed_this_rank(args.seed, rank)

    logger = output_dir.RunLogger(args.output_dir, args.run_name, args.report_to, total_steps, enabled=is_main,
                                  start_step=run["step"])
    if resume_folder is not None:
        logger.info(f"[train] resumed from {resume_folder} at step {run['step']} of {total_steps}")
    left_out = len(dataset) - micro_steps_per_epoch * B * world_size
    generate_calls = math.ceil(B * gas / sampler.prompts_per_call(args.generation_batch_size, G, B * gas))
    zero_note = (f"ZeRO stage {zero_stage}" + (" (one process: nothing to partition, so the config's ZeRO stage is not used)"
                                                if world_size == 1 else ""))
    logger.info(f"[train] {world_size} rank(s) x {B * gas} prompts x G={G} = {world_size * B * gas * G} completions per "
                f"optimizer step, sampled in {generate_calls} generate call(s) per rank; "
                f"{gas} micro-batch(es) of {B} prompts each, {mu} update(s) per rollout, {total_steps} optimizer steps; "
                f"prompts {'shared by their group' if args.share_prompt else 'repeated G times'}; {zero_note}; "
                f"{left_out} prompts per epoch left out to keep ranks even")
    if mu == 1:
        logger.info("[train] num_iterations=1: the ratio is exactly 1, so the logged loss sits near 0 "
                    "while its gradient is the full policy gradient (see grpo/loss.py)")

    suppress = vlm_adapter.forbidden_token_ids(processor, engine.module.config)
    end_ids = sampler.end_token_ids(engine.module, processor.tokenizer)
    logger.info(f"[train] a completion ends at the first of {processor.tokenizer.convert_ids_to_tokens(end_ids)} "
                f"(ids {end_ids}: the checkpoint's generation_config and the tokenizer's eos); sampling uses "
                f"--temperature {args.temperature} and --top_p {args.top_p} only, never the checkpoint's sampling defaults")
    blank_prompt = vlm_adapter.blank_picture_prompt(processor, family, device)
    weights = args.reward_weights or [1.0] * len(reward_funcs)
    reward_faults = rewards.RewardFaults(lambda message: print(f"[rank {rank}] {message}", flush=True))
    prompts = step_prompts(len(dataset), B, gas, rank, world_size, args.seed, start_rollout=run["rollouts"])
    stop_request = output_dir.StopRequest()
    step, window, last_saved = run["step"], run["log_window"], run["step"]
    if args.gradient_checkpointing and args.share_prompt:
        vlm_adapter.allow_checkpointing_with_shared_prompt(engine)
    engine.train()
    while step < total_steps:
        # ---- 1-3. sample G completions for every prompt of the step, score them, advantages ----
        t_start = time.time()
        examples = [dataset[i] for i in next(prompts)]
        prompt_inputs = vlm_adapter.build_inputs(processor, [ex["prompt"] for ex in examples],
                                                 [ex["images"] for ex in examples], family,
                                                 [ex["videos"] for ex in examples])
        prompt_inputs = {key: value.to(device) for key, value in prompt_inputs.items()}
        reset_peak_memory(device)
        completions = sampler.sample_groups(
            engine, prompt_inputs, processor.tokenizer, group_size=G, max_new_tokens=args.max_completion_length,
            temperature=args.temperature, top_p=args.top_p, suppress_token_ids=suppress, share_prompt=args.share_prompt,
            generation_batch_size=args.generation_batch_size, ignore_eos=args.ignore_eos, blank_prompt=blank_prompt,
            zero_stage=zero_stage,
            synced_ranks=zero_stage == 3 and world_size > 1)
        timing = {"generate": time.time() - t_start}
        memory = {"generate": peak_memory_gb(device)}
        t0 = time.time()
        per_func, total, reward_failures = score(reward_funcs, args.reward_funcs, weights, completions.texts, examples,
                                                 G, reward_faults)
        rollout = StepRollout(examples, prompt_inputs, completions.completion_ids.to(device),
                              completions.completion_mask.to(device), completions, total, per_func,
                              advantage.group_advantages(total, G, scale=args.scale_rewards).to(device),
                              blank_prompt=blank_prompt)
        timing["score"] = time.time() - t0

        # ---- 4-5. old and reference log-probs once, then num_iterations updates on this rollout ----
        for loss_stats, learning_rate, phases, skipped in learn_from(rollout, engine, ref_engine, args, world_size,
                                                                     device):
            timing.update(phases["seconds"])
            memory.update(phases["peak_gb"])
            step += 1
            logger.advance()
            run["nonfinite_in_a_row"] = run["nonfinite_in_a_row"] + 1 if skipped else 0
            if skipped:
                logger.info(f"[train] step {step}: non-finite loss or gradient; the optimizer step was skipped "
                            f"({run['nonfinite_in_a_row']} in a row, the run stops at --max_nonfinite_steps "
                            f"{args.max_nonfinite_steps})")

            # ---- 6. log ----
            window.append(step_metrics(rollout, loss_stats, args, engine, timing, memory,
                                       time.time() - t_start, learning_rate, skipped, reward_failures))
            if step % args.logging_steps == 0 or step == total_steps:
                # Each logged value is the mean over the steps since the last log and over ranks.
                metrics = mean_over_ranks({k: sum(w[k] for w in window) / len(window) for k in window[0]}, device)
                metrics["completion/length_min"] = reduce_over_ranks(
                    min(w["completion/length_min"] for w in window), device, torch.distributed.ReduceOp.MIN)
                metrics["completion/length_max"] = reduce_over_ranks(
                    max(w["completion/length_max"] for w in window), device, torch.distributed.ReduceOp.MAX)
                logger.log(step, metrics)
                window.clear()
            if args.log_completions_steps > 0 and step % args.log_completions_steps == 0:
                records = completion_records(rollout, args, step, rank)
                gathered = [None] * world_size if is_main else None
                torch.distributed.gather_object(records, gathered, dst=0)  # every rank's completions, to rank 0
                if is_main:
                    logger.log_completions([record for rank_records in gathered for record in rank_records])
            if step >= total_steps or run["nonfinite_in_a_row"] >= args.max_nonfinite_steps:
                break
        run["rollouts"] += 1

        # ---- 7. at the rollout's end: save when a multiple of save_steps was reached, or to stop ----
        stopping = stop_request.agreed(device)
        diverged = run["nonfinite_in_a_row"] >= args.max_nonfinite_steps
        save_due = args.save_steps > 0 and step // args.save_steps > last_saved // args.save_steps
        if (save_due or stopping or diverged) and step > last_saved:
            run.update(step=step, log_window=window, world_size=world_size, num_prompts=len(dataset),
                       data_order=data_order(args))
            if output_dir.save_checkpoint(engine, processor, args, step, run, zero_stage, rank, device, logger.info):
                last_saved = step
                if is_main:
                    output_dir.rotate_checkpoints(args.output_dir, args.save_total_limit)
            redraw_plots(logger, args)
        if stopping:
            logger.info(f"[train] SIGTERM: stopped after step {step}; checkpoint-{last_saved} resumes it "
                        f"(--resume_from_checkpoint latest)")
            logger.close()
            return
        if diverged:
            logger.close()
            raise RunStopped(f"{run['nonfinite_in_a_row']} steps in a row had a non-finite loss or gradient (--max_nonfinite_steps "
                             f"{args.max_nonfinite_steps}); none changed the weights, and checkpoint-{last_saved} holds "
                             f"them. Lower --learning_rate, check the reward functions, or try --bf16 false.")

    try:
        output_dir.save_model(engine, processor, args, args.output_dir, zero_stage, is_main)
    except Exception as e:  # noqa: BLE001
        raise RunStopped(f"saving the final model to {args.output_dir!r} failed ({type(e).__name__}: {e}); the "
                         f"newest checkpoint is checkpoint-{last_saved}.") from e
    torch.distributed.barrier()
    redraw_plots(logger, args)
    logger.info(f"[train] done: {step} steps; final model in {args.output_dir}")
    logger.close()


def redraw_plots(logger, args) -> None:
    """output_dir/plots/*.png from metrics.jsonl (rank 0, once something is logged). A plot that
    cannot be drawn is reported and never stops the run."""
    if not logger.enabled or not os.path.getsize(logger.metrics_path):
        return
    try:
        output_dir.plot_runs([logger.metrics_path], os.path.join(args.output_dir, "plots"))
    except Exception as e:  # noqa: BLE001
        logger.info(f"[train] WARNING: the plots were not drawn: {type(e).__name__}: {e}")


def completion_records(rollout: StepRollout, args, step: int, rank: int) -> list[dict]:
    """This rank's completions of the step, one readable record each: what the model wrote for
    which dataset row, what every reward function said, its advantage, and whether its group carried
    any signal (a group of equal rewards teaches nothing)."""
    G = args.num_generations
    signal = advantage.groups_with_signal(rollout.rewards, G).tolist()
    records = []
    for i, text in enumerate(rollout.completions.texts):
        example = rollout.examples[i // G]
        records.append({
            "step": step, "rank": rank, "prompt": i // G, "row": example.get("row_index"),
            "images": len(example["images"]), "videos": len(example["videos"]),
            "problem": example["problem"], "solution": example["solution"], "completion": text,
            "truncated": bool(rollout.completions.truncated[i]),
            "rewards": {name: float(value) for name, value in zip(args.reward_funcs, rollout.reward_per_func[i].tolist())},
            "reward": float(rollout.rewards[i]), "advantage": float(rollout.advantages[i]),
            "group_has_signal": signal[i // G],
        })
    return records


def data_order(args) -> dict:
    """The arguments that decide which prompts each step sees: a resume with others changes the order."""
    return {name: getattr(args, name) for name in ("dataset_name", "dataset_split", "seed", "per_device_train_batch_size",
                                                   "gradient_accumulation_steps", "max_prompt_length")}


def check_resumable(state: dict, args, world_size: int, folder: str) -> None:
    """A checkpoint resumes with the world size that wrote it (DeepSpeed's shards are per rank);
    other changes to the data order are allowed, and said."""
    if state["world_size"] != world_size:
        raise config.UsageError(f"--resume_from_checkpoint: {folder!r} was written by {state['world_size']} rank(s) and "
                                f"this run has {world_size}; resume with --num_gpus {state['world_size']}.")
    changed = {k: (v, state["data_order"][k]) for k, v in data_order(args).items() if state["data_order"].get(k) != v}
    if changed:
        print(f"[train] WARNING: resuming with different {', '.join(f'--{k} {now} (was {was})' for k, (now, was) in changed.items())}; "
              "the prompts from here on differ from those of an uninterrupted run.", flush=True)


def step_prompts(num_rows: int, per_device: int, accumulation_steps: int, rank: int, world_size: int, seed: int,
                 start_rollout: int = 0):
    """Endless dataset indices for this rank, one optimizer step's worth (per_device x accumulation
    steps prompts) at a time; a new shuffled order each epoch (grpo/data.py deals them out).
    start_rollout skips the steps a resumed run has already taken: the order is a function of the
    step count alone, so nothing is skipped or repeated."""
    batches_per_epoch = data.steps_per_epoch(num_rows, per_device, world_size)
    skip = start_rollout * accumulation_steps
    epoch = skip // batches_per_epoch
    batches = itertools.islice(data.rank_batches(num_rows, per_device, rank, world_size, seed, epoch),
                               skip % batches_per_epoch, None)
    step = []
    while True:
        batch = next(batches, None)
        if batch is None:  # epoch over: a new order
            epoch += 1
            batches = data.rank_batches(num_rows, per_device, rank, world_size, seed, epoch)
            continue
        step.extend(batch)
        if len(step) == per_device * accumulation_steps:
            yield step
            step = []


@dataclass
class StepRollout:
    """What one optimizer step learns from, on this rank: P prompts and their G completions each,
    prompt-major (completion i belongs to prompt i // G, trap 2). All tensors are on the device."""

    examples: list[dict]           # the P dataset rows (problem, solution, images, ...)
    prompt_inputs: dict            # their model inputs, NOT repeated: left-padded [P, L] rows and the pictures
    completion_ids: torch.Tensor   # [P*G, T] sampled tokens, right-padded
    completion_mask: torch.Tensor  # [P*G, T] 1 up to and including EOS
    completions: sampler.Rollout   # the same completions as texts, with truncation flags (on the CPU)
    rewards: torch.Tensor          # [P*G] weighted sum of the reward functions
    reward_per_func: torch.Tensor  # [P*G, K]
    advantages: torch.Tensor       # [P*G]
    old_logps: torch.Tensor | None = None  # [P*G, T] before the step's first update (num_iterations > 1)
    ref_logps: torch.Tensor | None = None  # [P*G, T] under the reference model (beta > 0)
    blank_prompt: dict | None = None       # a blank-image prompt, for micro-batches without pictures (trap 12)

    def micro_batches(self, prompts_per_micro_batch: int, group_size: int, model_config):
        """Consecutive slices of prompts, each with its G completions: (prompt_inputs, rows) pairs."""
        num_prompts = self.prompt_inputs["input_ids"].shape[0]
        for start in range(0, num_prompts, prompts_per_micro_batch):
            stop = min(start + prompts_per_micro_batch, num_prompts)
            yield (vlm_adapter.select_prompts(self.prompt_inputs, start, stop, model_config, self.blank_prompt),
                   slice(start * group_size, stop * group_size))


@torch.no_grad()
def rollout_logps(model, rollout: StepRollout, args) -> torch.Tensor:
    """[P*G, T] completion log-probs under `model` (reference, or the policy before the update),
    micro-batch by micro-batch as the update will walk them."""
    return torch.cat([
        vlm_adapter.completion_logps(model, inputs, rollout.completion_ids[rows], rollout.completion_mask[rows],
                                     args.temperature, args.num_generations, args.share_prompt)
        for inputs, rows in rollout.micro_batches(args.per_device_train_batch_size, args.num_generations,
                                                  vlm_adapter.unwrap(model).config)])


def learn_from(rollout: StepRollout, engine, ref_engine, args, world_size: int, device):
    """Steps 4-5 for one rollout. The old log-probs (num_iterations > 1) and the reference log-probs
    (beta > 0) are computed once, from the weights as they are before the first update, then the
    policy is updated num_iterations times on the same rollout. Yields after each update:
    (per-micro-batch loss stats, the learning rate it used, seconds and peak memory per phase,
    whether the update was skipped for a non-finite loss or gradient)."""
    t0 = time.time()
    reset_peak_memory(device)
    rollout.old_logps = rollout_logps(engine, rollout, args) if args.num_iterations > 1 else None
    rollout.ref_logps = rollout_logps(ref_engine, rollout, args) if ref_engine is not None else None
    phases = {"seconds": {"logps": time.time() - t0}, "peak_gb": {"logps": peak_memory_gb(device)}}
    # DAPO normalises by the active tokens of the whole step, all ranks and micro-batches.
    active_tokens = reduce_over_ranks(rollout.completion_mask.sum().item(), device, torch.distributed.ReduceOp.SUM)
    for _ in range(args.num_iterations):
        t0 = time.time()
        reset_peak_memory(device)
        learning_rate = engine.get_lr()[0]
        loss_stats, skipped = policy_update(engine, rollout, args, world_size, active_tokens, device)
        phases["seconds"]["update"], phases["peak_gb"]["update"] = time.time() - t0, peak_memory_gb(device)
        yield loss_stats, learning_rate, phases, skipped


def loss_scale(loss_type: str, world_size: int, accumulation_steps: int) -> float:
    """What each micro-batch's loss is multiplied by before backward, so that the summed gradients
    of one optimizer step are the gradient of the step's loss as its loss_type defines it.

    DeepSpeed sums the micro-batches' gradients and averages them over ranks (divides by world size).
    grpo, bnpo and dr_grpo are per-micro-batch means, and the step's loss is their mean over the
    world_size x accumulation_steps micro-batches: 1 / accumulation_steps (the ranks' average does the
    rest). dapo divides every micro-batch by the whole step's active-token count already, so the
    step's loss is their plain sum: world_size undoes the ranks' average.
    """
    return float(world_size) if loss_type == "dapo" else 1.0 / accumulation_steps


def policy_update(engine, rollout: StepRollout, args, world_size: int, active_tokens: float, device):
    """One optimizer step: backward through every micro-batch of the rollout, then DeepSpeed steps
    (it accumulates until the last micro-batch). Returns each micro-batch's loss statistics and
    whether the step was skipped.

    A non-finite loss on any rank replaces that micro-batch's loss by zero times its log-probs on
    every rank: the backward still runs everywhere (ZeRO's hooks and DeepSpeed's counters stay in
    step), its gradient is exactly 0 (no NaN reaches a weight), and the step then runs with a
    learning rate of 0, so the weights do not change (the step's other micro-batches still enter
    Adam's moment estimates). A finite loss can still give a non-finite gradient (an overflow in
    backward, in bf16 most likely): before the optimizer step the accumulated gradient is checked on
    every rank, and if any is not finite, it is set to 0 and the step runs with a learning rate of 0
    the same way."""
    G, stats_per_micro_batch, skipped = args.num_generations, [], False
    scale = loss_scale(args.loss_type, world_size, args.gradient_accumulation_steps)
    for inputs, rows in rollout.micro_batches(args.per_device_train_batch_size, G, engine.module.config):
        ids, mask = rollout.completion_ids[rows], rollout.completion_mask[rows]
        logps, entropy = vlm_adapter.completion_logps(engine, inputs, ids, mask, args.temperature, G,
                                                      args.share_prompt, with_entropy=True)
        # num_iterations = 1: the rollout came from these very weights, so old = logps (ratio 1).
        old = rollout.old_logps[rows] if rollout.old_logps is not None else logps.detach()
        micro_loss, stats = loss.policy_loss(
            logps, old, rollout.advantages[rows], mask,
            ref_logps=rollout.ref_logps[rows] if rollout.ref_logps is not None else None, beta=args.beta,
            epsilon_low=args.epsilon, epsilon_high=args.epsilon_high, loss_type=args.loss_type,
            max_completion_length=args.max_completion_length, num_items_in_batch=active_tokens,
            importance_sampling_level=args.importance_sampling_level)
        finite_everywhere = reduce_over_ranks(float(torch.isfinite(micro_loss).item()), device,
                                              torch.distributed.ReduceOp.MIN) == 1.0
        engine.backward(micro_loss * scale if finite_everywhere else (logps * 0.0).sum(), scale_wrt_gas=False)
        skipped = skipped or not finite_everywhere
        if engine.is_gradient_accumulation_boundary():
            if reduce_over_ranks(float(gradients_finite(engine)), device, torch.distributed.ReduceOp.MIN) < 1.0:
                zero_gradients(engine)  # a finite loss whose backward overflowed: same skip
                skipped = True
            if skipped:
                for group in engine.optimizer.param_groups:  # the LR schedule sets it again after the step
                    group["lr"] = 0.0
        engine.step()
        stats.update(loss=micro_loss.item(), entropy=((entropy * mask).sum() / mask.sum().clamp(min=1)).item())
        stats_per_micro_batch.append(stats)
    return stats_per_micro_batch, skipped


def _gradients(engine):
    """(parameter, this rank's gradient of it) for every trained parameter: under ZeRO-3 the rank's
    partition (DeepSpeed's safe_get_local_grad), else the whole gradient (safe_get_full_grad). Under
    ZeRO-1/2 the whole gradient is gathered parameter by parameter, an all-reduce of the model's size
    per step; ZeRO-0 and ZeRO-3 (zero3.json) read what the rank holds."""
    from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

    for param in engine.module.parameters():
        if param.requires_grad:
            grad = safe_get_local_grad(param) if hasattr(param, "ds_id") else safe_get_full_grad(param)
            if grad is not None:
                yield param, grad


def gradients_finite(engine) -> bool:
    """Whether this rank's share of the accumulated gradient is all finite (one device sync)."""
    flags = [torch.isfinite(grad).all() for _, grad in _gradients(engine)]
    return bool(torch.stack(flags).all().item()) if flags else True


def zero_gradients(engine) -> None:
    """Set this rank's share of the accumulated gradient to 0, through DeepSpeed's setters."""
    from deepspeed.utils import safe_set_full_grad, safe_set_local_grad

    for param, grad in _gradients(engine):
        if hasattr(param, "ds_id"):
            safe_set_local_grad(param, torch.zeros_like(grad))
        else:
            safe_set_full_grad(param, torch.zeros_like(grad))


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


def step_metrics(rollout: StepRollout, loss_stats, args, engine, timing: dict, memory: dict, step_seconds: float,
                 learning_rate: float, skipped: bool, reward_failures: list[int]) -> dict:
    """This rank's numbers for one step; the caller averages them over ranks."""
    rewards_all, adv = rollout.rewards, rollout.advantages.cpu()
    lengths = rollout.completions.completion_mask.sum(1).float()
    metrics = {
        "reward/mean": rewards_all.mean().item(),
        "reward/std": rewards_all.std().item() if len(rewards_all) > 1 else 0.0,
        "advantage/std": adv.std().item() if len(adv) > 1 else 0.0,
        "advantage/equal_reward_group_fraction": advantage.equal_reward_group_fraction(rewards_all, args.num_generations),
        "completion/length_mean": lengths.mean().item(),
        "completion/length_min": lengths.min().item(),
        "completion/length_max": lengths.max().item(),
        "completion/truncated_fraction": rollout.completions.truncated.float().mean().item(),
        "optim/grad_norm": float(engine.get_global_grad_norm() or 0.0),
        "optim/learning_rate": learning_rate,
        "time/step_seconds": step_seconds,
        "time/tokens_per_second": lengths.sum().item() / max(step_seconds, 1e-9),
    }
    for phase, seconds in timing.items():  # generate, score, logps (reference / old), update
        metrics[f"time/{phase}_seconds"] = seconds
    for phase, gigabytes in memory.items():
        metrics[f"memory/{phase}_peak_gb"] = gigabytes
    for name, column, failures in zip(args.reward_funcs, rollout.reward_per_func.T, reward_failures):
        metrics[f"reward/{name}"] = column.mean().item()
        metrics[f"reward/{name}_failures"] = float(failures)
    metrics["optim/skipped_nonfinite"] = float(skipped)
    for key in ("loss", "kl", "clip_ratio", "entropy"):  # a skipped step's NaN loss is logged as it was
        metrics[f"loss/{key}"] = sum(s[key] for s in loss_stats) / len(loss_stats)
    return metrics


def cli(argv: list[str]) -> int:
    """The command line: a usage error is one line on stderr and exit status 2, not a traceback."""
    try:
        main(argv)
        status = 0
    except config.UsageError as e:
        if not getattr(e, "shared", False) or torch.distributed.get_rank() == 0:
            print(f"train.py: error: {e}", file=sys.stderr)
        status = 2
    except RunStopped as e:
        print(f"train.py: stopped: {e}", file=sys.stderr)
        status = 1
    end_distributed()
    return status


def end_distributed() -> None:
    """Destroy the process group before the interpreter exits: left to the exit, gloo's worker
    threads can still hold work while Python tears down, and the process aborts ("terminate called
    without an active exception", pytorch/pytorch#190489) after a run that finished."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
