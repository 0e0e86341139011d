"""GRPO for vision-language models: `deepspeed train.py --args` (or torchrun, or `python train.py` for one process).

Once per optimizer step, on every rank:
  1. prompts: this rank's share of the step                                          grpo/data.py
  2. sample G completions for each prompt, in one generate call                      grpo/policy.py
  3. score them with the reward functions                                            grpo/rewards.py
  4. group-normalised advantages                                                     grpo/objective.py
  5. old log-probs (num_iterations > 1) and reference log-probs (beta > 0)           grpo/policy.py
  6. num_iterations times: each micro-batch's log-probs -> loss -> backward, then    grpo/objective.py
     the optimizer step (skipped if a loss or gradient was not finite anywhere)      grpo/distributed.py
  7. log                                                                             grpo/output_dir.py
  8. save a checkpoint every --save_steps, and on SIGTERM (then stop)                grpo/output_dir.py
The model families are data (grpo/families.py), the flags are grpo/config.py.
"""

from __future__ import annotations

import sys
import time

import torch

from grpo import answers, config, data, distributed, families, objective, output_dir, policy, rewards


class RunStopped(RuntimeError):
    """The run cannot go on (repeated non-finite steps, a failed final save): one line, exit 1."""


def main(argv: list[str]) -> None:
    # ---- set-up (plumbing): flags, ranks, where the run starts, data, models ----
    args = config.parse_args(argv)
    config.validate(args)  # bad flags stop here, in a second, before anything loads
    config.settle_device_defaults(args, on_gpu=torch.cuda.is_available(), flash_attn=config.flash_attn_version())
    raw_ds_config = distributed.read_deepspeed_config(args.deepspeed)
    reward_funcs = rewards.get_reward_funcs(args.reward_funcs)
    config.check_paths(args)
    rank, world_size, device = distributed.init_distributed(args.ddp_timeout)
    log = print if rank == 0 else (lambda *_: None)
    resume_folder = output_dir.start(args, rank, world_size, log)
    wandb_run = output_dir.start_wandb(args, resume_folder)  # rank 0, before loading: a failed login stops in seconds
    family = families.check_model_type(args.model_name_or_path)
    processor = families.load_processor(args.model_name_or_path, args.min_pixels, args.max_pixels)
    dataset = data.load_prompt_dataset(
        args.dataset_name, args.dataset_split, processor, family, args.max_prompt_length, args.system_prompt, log=log,
        progress=rank == 0, check_solution=answers.unverifiable_reason if "accuracy" in args.reward_funcs else None,
        num_proc=args.dataset_num_proc,  # each rank checks its share of the rows, the result kept for a resume
        share=lambda check, key: distributed.gather_from_files(check, f"{args.output_dir}/{data.CHECK_FOLDER}/{key}",
                                                               rank, world_size, args.ddp_timeout))
    total_steps, left_out = data.optimizer_steps(len(dataset), args, world_size)
    ds_config = distributed.fill_deepspeed_config(raw_ds_config, args, world_size, total_steps,
                                                  on_gpu=device.type == "cuda")
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = distributed.load_engine(args, ds_config, dtype, total_steps, train=True)
    # pi_ref: a frozen copy of the starting model, or with --use_peft the policy with its LoRA adapters off
    reference = distributed.load_reference(args, model, ds_config, dtype, total_steps) if args.beta > 0 else None
    if resume_folder is not None:  # its weights, optimizer, LR schedule, random generators and data position
        progress = output_dir.resume(model, resume_folder, rank, len(dataset), log)
    else:
        progress = output_dir.Progress(num_prompts=len(dataset))
        distributed.seed_this_rank(args.seed, rank)  # one --seed, a different stream of samples on every rank
    if wandb_run is not None:  # rank 0 writes it into every checkpoint, for a resume to continue this run
        progress.wandb_run_id = wandb_run.id
    logger = output_dir.RunLogger(args, total_steps, rank, device, progress, wandb_run=wandb_run)
    sampling = policy.Sampling.for_run(args, model, processor, family, device, zero_stage, world_size)
    for line in output_dir.run_summary(args, world_size, total_steps, zero_stage, left_out, resume_folder,
                                       progress.step, processor.tokenizer.convert_ids_to_tokens(list(sampling.end_ids)),
                                       list(sampling.end_ids), distributed.parameter_counts(model)):
        logger.info(line)
    reward_faults = rewards.RewardFaults(lambda message: print(f"[rank {rank}] {message}", flush=True))
    prompt_order = data.step_prompts(len(dataset), args.per_device_train_batch_size, args.gradient_accumulation_steps,
                                     rank, world_size, args.seed, start_rollout=progress.rollouts)
    prompts = data.prepared_prompts(dataset, prompt_order, processor, family, workers=args.dataloader_num_workers,
                                    rollouts=-(-(total_steps - progress.step) // args.num_iterations))  # those left
    stop_request = distributed.StopRequest()
    last_saved = progress.step
    if args.gradient_checkpointing and args.share_prompt:
        policy.allow_checkpointing_with_shared_prompt(model)
    model.train()

    # ---- the GRPO loop: one rollout per pass, num_iterations optimizer steps on it ----
    while progress.step < total_steps:
        started, phases = time.time(), distributed.Phases(device)
        # 1. prompts: this rank's share of the step, read and processed while the step before trained
        with phases("prompts"):
            examples, prompt_inputs = next(prompts)
            prompt_inputs = {key: value.to(device) for key, value in prompt_inputs.items()}
        # 2. sample G completions for each prompt
        with phases("generate"):
            rollout = policy.sample_groups(model, prompt_inputs, sampling)
        rollout.examples = examples
        # 3. score them; 4. group-normalised advantages
        with phases("score"):
            reward_failures = score(rollout, reward_funcs, args, reward_faults)
        # 5. old and reference log-probs; 6. num_iterations optimizer steps on the rollout; 7. log each
        for loss_stats, skipped, learning_rate in learn_from(rollout, model, reference, args, world_size, phases):
            progress.took_step(skipped)
            if skipped:
                logger.info(f"[train] step {progress.step}: non-finite loss or gradient; the optimizer step was "
                            f"skipped ({progress.nonfinite_in_a_row} in a row, the run stops at --max_nonfinite_steps "
                            f"{args.max_nonfinite_steps})")
            metrics = output_dir.step_metrics(rollout, loss_stats, args, model, phases, time.time() - started,
                                              learning_rate, skipped, reward_failures)
            logger.record(progress.step, metrics)
            logger.record_completions(progress.step, rollout)
            if progress.step >= total_steps or progress.diverged(args.max_nonfinite_steps):
                break
        progress.rollouts += 1

        # 8. (plumbing) at the rollout's end: save when a multiple of --save_steps was reached, or to stop
        stopping = stop_request.agreed(device)
        diverged = progress.diverged(args.max_nonfinite_steps)
        save_due = args.save_steps > 0 and progress.step // args.save_steps > last_saved // args.save_steps
        if (save_due or stopping or diverged) and progress.step > last_saved:
            if output_dir.save(model, processor, args, progress, zero_stage, rank, device, logger.info):
                last_saved = progress.step
            logger.redraw_plots()
        if stopping:
            logger.info(f"[train] SIGTERM: stopped after step {progress.step}; checkpoint-{last_saved} resumes it "
                        f"(--resume_from_checkpoint latest)")
            logger.close(preempted=True)
            return
        if diverged:
            logger.close(exit_code=1)
            raise RunStopped(f"{progress.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient "
                             f"(--max_nonfinite_steps {args.max_nonfinite_steps}); none changed the weights, and "
                             f"checkpoint-{last_saved} holds them. Lower --learning_rate, check the reward functions, "
                             f"or try --bf16 false.")

    # ---- (plumbing) the final model ----
    try:  # rank 0 writes (and with --merge_adapter merges) alone; the others wait for it by files
        output_dir.save_final(model, processor, args, zero_stage, rank, dtype, logger.info)
    except Exception as e:  # noqa: BLE001
        logger.close(exit_code=1)
        raise RunStopped(f"saving the final model to {args.output_dir!r} failed ({type(e).__name__}: {e}); the "
                         f"newest checkpoint is checkpoint-{last_saved}.") from e
    logger.redraw_plots(wait=True)
    logger.info(f"[train] done: {progress.step} steps; final model in {args.output_dir}")
    logger.close()


def score(rollout: policy.Rollout, reward_funcs: list, args, faults: rewards.RewardFaults) -> list[int]:
    """Steps 3 and 4 on the rollout: each completion's rewards (K functions), their weighted sum
    R_i = sum_k w_k r_k(i) (--reward_weights), and the group-normalised advantages
    A_i = (R_i - mean_group(R)) / (std_group(R) + eps) (grpo/objective.py). Returns how many
    completions each reward function failed on (they score 0 from it)."""
    G = rollout.sampling.group_size
    rollout.reward_per_func, failures = rewards.score(reward_funcs, args.reward_funcs, rollout.texts, rollout.examples,
                                                      G, faults)  # [N, K]
    rollout.rewards = objective.combine_rewards(rollout.reward_per_func, args.reward_weights)  # [N]
    rollout.advantages = objective.group_advantages(rollout.rewards, G, scale=args.scale_rewards).to(
        rollout.completion_ids.device)  # [N]
    return failures


def learn_from(rollout: policy.Rollout, model, reference, args, world_size: int, phases: distributed.Phases):
    """Steps 5 and 6 on the rollout: the old log-probs (num_iterations > 1) and the reference's (beta > 0),
    both from the weights as they are before the rollout's first update, then num_iterations optimizer
    steps on it. Yields each step's (loss statistics per micro-batch, skipped, learning rate)."""
    prompts_per_micro_batch = args.per_device_train_batch_size
    with phases("logps"):
        if args.num_iterations > 1:  # kept for every update of this rollout: the ratio's denominator
            rollout.old_logps = policy.rollout_logps(model, rollout, prompts_per_micro_batch)  # [N, T]
        if reference is not None:
            rollout.ref_logps = policy.rollout_logps(reference, rollout, prompts_per_micro_batch)  # [N, T]
    # dapo and cispo divide by the active tokens of the whole optimizer step, every rank's and every
    # micro-batch's: the step's loss is written out in grpo/objective.py (policy_loss)
    step_tokens = distributed.reduce_over_ranks(rollout.completion_mask.sum().item(), rollout.completion_ids.device,
                                                torch.distributed.ReduceOp.SUM)
    for _ in range(args.num_iterations):
        with phases("update"):
            learning_rate = model.get_lr()[0]
            loss_stats, skipped = update(model, rollout, args, world_size, step_tokens)
        yield loss_stats, skipped, learning_rate


def update(model, rollout: policy.Rollout, args, world_size: int, step_tokens: float):
    """One optimizer step on the rollout: each micro-batch's log-probs -> loss -> backward, and DeepSpeed's
    step, which updates the weights after the last micro-batch (unless a loss or a gradient was not
    finite on some rank: distributed.step). Returns each micro-batch's loss statistics and whether
    the optimizer step was skipped."""
    sampling = rollout.sampling
    scale = objective.loss_scale(args.loss_type, world_size, args.gradient_accumulation_steps)
    stats, losses_finite = [], True
    for inputs, rows in rollout.micro_batches(args.per_device_train_batch_size, families.unwrap(model).config):
        ids, mask = rollout.completion_ids[rows], rollout.completion_mask[rows]  # [b*G, T]
        logps, entropy = policy.completion_logps(model, inputs, ids, mask, sampling.temperature, sampling.group_size,
                                                 sampling.share_prompt, with_entropy=True)  # [b*G, T] each
        # num_iterations = 1: the rollout came from these very weights, so old = logps (ratio 1)
        old = rollout.old_logps[rows] if rollout.old_logps is not None else logps.detach()  # [b*G, T]
        loss, loss_stats = objective.policy_loss(
            logps, old, rollout.advantages[rows], mask,
            ref_logps=rollout.ref_logps[rows] if rollout.ref_logps is not None else None, beta=args.beta,
            epsilon_low=args.epsilon, epsilon_high=args.epsilon_high, loss_type=args.loss_type,
            max_completion_length=args.max_completion_length, num_items_in_batch=step_tokens,
            importance_sampling_level=args.importance_sampling_level,
            sapo_temperatures=(args.sapo_temperature_pos, args.sapo_temperature_neg))
        # a non-finite loss in any micro-batch, on any rank, skips the whole optimizer step
        losses_finite = distributed.backward(model, loss * scale) & losses_finite  # a flag on the device
        skipped = distributed.step(model, losses_finite)
        stats.append(dict(loss_stats, loss=loss.item(),
                          entropy=((entropy * mask).sum() / mask.sum().clamp(min=1)).item()))
    return stats, skipped


def cli(argv: list[str]) -> int:
    """The command line: a usage error is one line on stderr and exit status 2, not a traceback."""
    try:
        main(argv)
        status = 0
    except config.UsageError as e:
        if not getattr(e, "shared", False) or torch.distributed.get_rank() == 0:  # a shared one: said once
            print(f"train.py: error: {e}", file=sys.stderr)
        status = 2
    except RunStopped as e:
        print(f"train.py: stopped: {e}", file=sys.stderr)
        status = 1
    distributed.end_distributed()
    return status


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
