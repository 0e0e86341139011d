"""GRPO for vision-language models: `deepspeed train.py --args` (or `python train.py` for one process).

The loop, once per optimizer step:
  1. sample a group: G completions for each prompt of this rank       (grpo/sampler.py)
  2. score them with the reward functions                               (grpo/rewards.py)
  3. group-normalised advantages                                        (grpo/advantage.py)
  4. old log-probs (only when num_iterations > 1), reference log-probs (only when beta > 0)
  5. clipped, KL-regularised loss; backward and step, num_iterations times (grpo/loss.py)
  6. log, and save a checkpoint now and then
Model-family details are in grpo/vlm_adapter.py, arguments in grpo/config.py.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import sys
import time

import torch

from grpo import advantage, config, data, loss, rewards, sampler, vlm_adapter
from grpo.logger import RunLogger


def parse_args(argv: list[str]) -> config.GRPOArguments:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(config.GRPOArguments, description=__doc__.split("\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    given = {a.split("=")[0].lstrip("-") for a in argv if a.startswith("--")}
    config.apply_preset(args, given)
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
    if accelerator.device_name() == "cuda":
        accelerator.set_device(local_rank)
    device = torch.device(accelerator.device_name(local_rank) if accelerator.device_name() == "cuda" else "cpu")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def mean_over_ranks(values: dict[str, float], device) -> dict[str, float]:
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], device=device, dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return dict(zip(keys, (tensor / torch.distributed.get_world_size()).tolist()))


def reduce_over_ranks(value: float, device, op) -> float:
    tensor = torch.tensor([float(value)], device=device, dtype=torch.float64)
    torch.distributed.all_reduce(tensor, op=op)
    return tensor.item()


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
    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 (a weakref inside transformers reads it)
    model = vlm_adapter.load_model(args.model_name_or_path, dtype, args.attn_implementation)
    if not train:
        model.requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        engine.eval()
        return engine
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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


def save_model(engine, processor, folder: str, zero_stage: int, is_main: bool) -> None:
    """Hugging Face format (safetensors + processor) that from_pretrained loads. Under ZeRO-3 the
    shards are gathered into one 16-bit state dict on rank 0 (a collective: every rank calls this)."""
    state_dict = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else engine.module.state_dict()
    if is_main:
        engine.module.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        processor.save_pretrained(folder)
    torch.distributed.barrier()


def rotate_checkpoints(output_dir: str, limit: int | None) -> None:
    if not limit:
        return
    found = sorted((int(name.split("-")[1]), name) for name in os.listdir(output_dir)
                   if name.startswith("checkpoint-") and name.split("-")[1].isdigit())
    for _, name in found[:-limit]:
        shutil.rmtree(os.path.join(output_dir, name))


def score(reward_funcs, weights, texts: list[str], examples: list[dict], group_size: int):
    """Rewards for N = len(texts) completions; completion i belongs to prompt i // G, so it is
    scored against that prompt's solution (trap 2). Returns (per-function [N, K], total [N])."""
    columns = {key: [ex[key] for ex in examples for _ in range(group_size)]
               for key in examples[0] if key not in ("image", "prompt")}
    per_func = torch.tensor([fn(texts, **columns) for fn in reward_funcs], dtype=torch.float32).T
    return per_func, advantage.combine_rewards(per_func, weights)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    config.validate(args)  # bad arguments stop here, before anything loads
    raw_ds_config = config.read_deepspeed_config(args.deepspeed)
    reward_funcs = rewards.get_reward_funcs(args.reward_funcs)
    rank, world_size, device = init_distributed()
    is_main = rank == 0
    if args.model_name_or_path == "demo":  # the tiny model of --preset demo, built once by rank 0
        from grpo import demo
        args.model_name_or_path = demo.resolve_demo_model("demo", args.output_dir, is_main)
        torch.distributed.barrier()
    vlm_adapter.check_model_type(args.model_name_or_path)
    processor = vlm_adapter.load_processor(args.model_name_or_path, args.min_pixels, args.max_pixels)
    dataset = data.load_prompt_dataset(args.dataset_name, args.dataset_split, processor, args.max_prompt_length,
                                       args.system_prompt, log=print if is_main else (lambda *_: None),
                                       progress=is_main)
    G, B, gas, mu = args.num_generations, args.per_device_train_batch_size, args.gradient_accumulation_steps, args.num_iterations
    micro_steps_per_epoch = data.steps_per_epoch(len(dataset), B, world_size)
    if micro_steps_per_epoch < gas:
        raise ValueError(f"--dataset_name: {len(dataset)} prompts are fewer than one optimizer step needs "
                         f"({B} per device x {world_size} ranks x {gas} accumulation steps).")
    rollouts_per_epoch = micro_steps_per_epoch // gas
    total_steps = args.max_steps if args.max_steps > 0 else max(1, int(args.num_train_epochs * rollouts_per_epoch)) * mu
    ds_config = config.fill_deepspeed_config(raw_ds_config, args, world_size, total_steps, on_gpu=device.type == "cuda")
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    engine = load_engine(args, ds_config, dtype, total_steps, train=True)
    ref_engine = load_engine(args, ds_config, dtype, total_steps, train=False) if args.beta > 0 else None
    torch.manual_seed(args.seed + rank)  # each rank samples its own completions (trap 7)

    logger = RunLogger(args.output_dir, args.run_name, args.report_to, total_steps, enabled=is_main)
    left_out = len(dataset) - micro_steps_per_epoch * B * world_size
    logger.info(f"[train] {world_size} rank(s) x {B} prompts x G={G} = {world_size * B * G} completions per micro-step; "
                f"{gas} micro-step(s) per rollout, {mu} update(s) per rollout, {total_steps} optimizer steps; "
                f"ZeRO stage {zero_stage}; {left_out} prompts per epoch left out to keep ranks even")
    if mu == 1:
        logger.info("[train] num_iterations=1: the ratio is exactly 1, so the logged loss sits near 0 "
                    "while its gradient is the full policy gradient (see grpo/loss.py)")

    suppress = vlm_adapter.forbidden_token_ids(processor)
    weights = args.reward_weights or [1.0] * len(reward_funcs)
    step, epoch, window = 0, 0, []
    batches = data.rank_batches(len(dataset), B, rank, world_size, args.seed, epoch)
    engine.train()
    while step < total_steps:
        # ---- 1-3. sample groups, score them, advantages (gas micro-batches for one optimizer step) ----
        t_start = time.time()
        micro, gen_seconds, score_seconds = [], 0.0, 0.0
        while len(micro) < gas:
            indices = next(batches, None)
            if indices is None:  # epoch over: a new order
                epoch += 1
                batches = data.rank_batches(len(dataset), B, rank, world_size, args.seed, epoch)
                continue
            examples = [dataset[i] for i in indices]
            prompt_inputs = vlm_adapter.build_inputs(processor, [ex["prompt"] for ex in examples],
                                                     [ex["image"] for ex in examples])
            prompt_inputs = {k: v.to(device) for k, v in vlm_adapter.repeat_for_group(prompt_inputs, G).items()}
            t0 = time.time()
            rollout = sampler.sample_group(engine.module, prompt_inputs, processor.tokenizer,
                                           max_new_tokens=args.max_completion_length, temperature=args.temperature,
                                           top_p=args.top_p, suppress_token_ids=suppress, zero_stage=zero_stage,
                                           synced_ranks=zero_stage == 3 and world_size > 1)
            t1 = time.time()
            per_func, total = score(reward_funcs, weights, rollout.texts, examples, G)
            adv = advantage.group_advantages(total, G, scale=args.scale_rewards)
            score_seconds += time.time() - t1
            gen_seconds += t1 - t0
            micro.append(dict(inputs=prompt_inputs, rollout=rollout, rewards=total, per_func=per_func,
                              advantages=adv.to(device), examples=examples,
                              ids=rollout.completion_ids.to(device), mask=rollout.completion_mask.to(device)))

        # ---- 4. old and reference log-probs, computed once before any update ----
        t_update = time.time()
        with torch.no_grad():
            for m in micro:
                ids, mask = m["ids"], m["mask"]
                m["old_logps"] = (vlm_adapter.completion_logps(engine, m["inputs"], ids, mask, args.temperature)
                                  if mu > 1 else None)
                m["ref_logps"] = (vlm_adapter.completion_logps(ref_engine, m["inputs"], ids, mask, args.temperature)
                                  if ref_engine is not None else None)
        # DAPO normalises by the active tokens of the whole step, all ranks and micro-batches.
        active_tokens = reduce_over_ranks(sum(m["rollout"].completion_mask.sum().item() for m in micro),
                                          device, torch.distributed.ReduceOp.SUM)

        # ---- 5. the update, num_iterations times over the same rollouts ----
        for _ in range(mu):
            loss_stats, learning_rate = [], engine.get_lr()[0]
            for m in micro:
                ids, mask = m["ids"], m["mask"]
                logps, entropy = vlm_adapter.completion_logps(engine, m["inputs"], ids, mask, args.temperature,
                                                              with_entropy=True)
                old = m["old_logps"] if m["old_logps"] is not None else logps.detach()
                step_loss, stats = loss.policy_loss(
                    logps, old, m["advantages"], mask, ref_logps=m["ref_logps"], beta=args.beta,
                    epsilon_low=args.epsilon, epsilon_high=args.epsilon_high, loss_type=args.loss_type,
                    max_completion_length=args.max_completion_length, num_items_in_batch=active_tokens,
                    importance_sampling_level=args.importance_sampling_level)
                # DeepSpeed averages gradients over ranks; dapo's sum over the global token count
                # must not be averaged again, and the other losses are per-micro-batch means.
                scale = world_size if args.loss_type == "dapo" else 1.0 / gas
                engine.backward(step_loss * scale, scale_wrt_gas=False)
                engine.step()
                stats.update(loss=step_loss.item(), entropy=((entropy * mask).sum() / mask.sum().clamp(min=1)).item())
                loss_stats.append(stats)
            step += 1
            logger.advance()

            # ---- 6. log and save ----
            window.append(step_metrics(micro, loss_stats, args, engine, gen_seconds, score_seconds,
                                       time.time() - t_update, time.time() - t_start, learning_rate))
            if step % args.logging_steps == 0 or step == total_steps:
                # Each logged value is the mean over the steps since the last log and over ranks.
                metrics = mean_over_ranks({k: sum(w[k] for w in window) / len(window) for k in window[0]}, device)
                metrics["completion/length_min"] = reduce_over_ranks(
                    min(w["completion/length_min"] for w in window), device, torch.distributed.ReduceOp.MIN)
                metrics["completion/length_max"] = reduce_over_ranks(
                    max(w["completion/length_max"] for w in window), device, torch.distributed.ReduceOp.MAX)
                logger.log(step, metrics)
                window = []
            if args.log_completions_steps > 0 and step % args.log_completions_steps == 0:
                m = micro[0]
                logger.log_samples(step, [ex["problem"] for ex in m["examples"] for _ in range(G)], m["rollout"].texts,
                                   m["rewards"].tolist(), [ex["solution"] for ex in m["examples"] for _ in range(G)])
            if args.save_steps > 0 and step % args.save_steps == 0 and step < total_steps:
                save_model(engine, processor, os.path.join(args.output_dir, f"checkpoint-{step}"), zero_stage, is_main)
                if is_main:
                    rotate_checkpoints(args.output_dir, args.save_total_limit)
            if step >= total_steps:
                break

    save_model(engine, processor, args.output_dir, zero_stage, is_main)
    logger.info(f"[train] done: {step} steps; final model in {args.output_dir}")
    if is_main and args.dataset_name == "demo":
        from grpo import demo
        demo.plot_rewards(logger.metrics_path, os.path.join(args.output_dir, "rewards.png"))
    logger.close()


def step_metrics(micro, loss_stats, args, engine, gen_seconds, score_seconds, update_seconds, step_seconds,
                 learning_rate) -> dict:
    """This rank's numbers for one step; the caller averages them over ranks."""
    G = args.num_generations
    rewards_all = torch.cat([m["rewards"] for m in micro])
    per_func = torch.cat([m["per_func"] for m in micro])
    adv = torch.cat([m["advantages"].cpu() for m in micro])
    lengths = torch.cat([m["rollout"].completion_mask.sum(1) for m in micro]).float()
    truncated = torch.cat([m["rollout"].truncated for m in micro]).float()
    metrics = {
        "reward/mean": rewards_all.mean().item(),
        "reward/std": rewards_all.std().item() if len(rewards_all) > 1 else 0.0,
        "advantage/std": adv.std().item() if len(adv) > 1 else 0.0,
        "advantage/equal_reward_group_fraction": advantage.equal_reward_group_fraction(rewards_all, G),
        "completion/length_mean": lengths.mean().item(),
        "completion/length_min": lengths.min().item(),
        "completion/length_max": lengths.max().item(),
        "completion/truncated_fraction": truncated.mean().item(),
        "optim/grad_norm": float(engine.get_global_grad_norm() or 0.0),
        "optim/learning_rate": learning_rate,
        "time/generate_seconds": gen_seconds,
        "time/score_seconds": score_seconds,
        "time/update_seconds": update_seconds,
        "time/step_seconds": step_seconds,
        "time/tokens_per_second": lengths.sum().item() / max(step_seconds, 1e-9),
    }
    for name, column in zip(args.reward_funcs, per_func.T):
        metrics[f"reward/{name}"] = column.mean().item()
    for key in ("loss", "kl", "clip_ratio", "entropy"):
        metrics[f"loss/{key}"] = sum(s[key] for s in loss_stats) / len(loss_stats)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
