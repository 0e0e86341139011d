"""The training loop's glue on two ranks, launched by tests/test_train_glue.py as

    deepspeed --num_gpus 2 tests/glue_worker.py --model TINY_MODEL_DIR --out RESULT.json

(not a test module itself: one launch serves all of that file's tests). Every rank builds the
same optimizer step's data from one seed and trains on its own share through train.py's learn_from;
rank 0 then redoes the step in one process, from the loss's definitions, on a plain model (no
DeepSpeed, the plain repeated-prompt forward), and writes what it found as JSON:

  "scale"      (a) one optimizer step over 2 ranks x 2 micro-steps, per ZeRO stage and loss_type:
               plain SGD with lr 1 makes each weight's change minus the step's gradient, which is
               compared with the gradient of the step's loss as its loss_type defines it.
  "old_logps"  (b) num_iterations = 2: the old log-probs must be those of the weights before the
               step's first update, and the second update's gradient must use them.
  "seeds"      (c) both ranks seeded with the same --seed and given the same prompt must sample
               different completions; re-seeding reproduces a rank's own completions.
  "gathers"    (d) under ZeRO-3 one sampling call gathers the weights once (a LoRA policy's too,
               merged for it and bitwise as before after it); and per step, the update's gathers
               with DeepSpeed's trace per micro-batch and without it.
  "nonfinite"  (e) a NaN loss in the first of a rank's two micro-batches skips the whole step; a
               finite step's non-finite check is one all-reduce.
Steps 5 and 6 are train.learn_from itself, the function main calls.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from grpo import config, distributed, families, policy  # noqa: E402
from grpo.data import build_conversation  # noqa: E402

W, GAS, B, G = 2, 2, 2, 3          # ranks, micro-steps per optimizer step, prompts per micro-batch, group size
T, MAX_LEN = 7, 10                  # completion columns of the rollout; --max_completion_length (dr_grpo's normaliser)
BETA, EPSILON = 0.04, 0.2
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
SAPO_TAU_POS, SAPO_TAU_NEG = 1.0, 1.05  # config's defaults, SAPO's values
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 210, 30)}


def cli_args(loss_type: str, num_iterations: int, beta: float, model: str) -> list[str]:
    return ["--model_name_or_path", model, "--loss_type", loss_type, "--num_generations", str(G),
            "--per_device_train_batch_size", str(B), "--gradient_accumulation_steps", str(GAS),
            "--max_completion_length", str(MAX_LEN), "--beta", str(beta), "--epsilon", str(EPSILON),
            "--num_iterations", str(num_iterations), "--share_prompt", "true", "--temperature", "1.0"]


# ---------------------------------------------------------------------------------------------
# The whole optimizer step's data, the same on every rank
# ---------------------------------------------------------------------------------------------

def prompt(i: int):
    """Prompt i: a solid-colour image of one of three widths (different image-token counts) and a
    question of varying length, so that prompts are left-padded differently."""
    from PIL import Image

    name = list(COLOURS)[i % len(COLOURS)]
    image = Image.new("RGB", (56 + 14 * (i % 3), 56), COLOURS[name])
    return build_conversation("What colour is the image?" + " Look again." * (i % 4)), image


def step_data(processor, seed: int) -> list[dict]:
    """W x GAS micro-batches in rank-major order (micro-batch k belongs to rank k // GAS), each with
    B prompts and their G completions: random ordinary tokens, right-padded to T columns with
    lengths 1..T, and random advantages."""
    tokenizer = processor.tokenizer
    special = set(tokenizer.all_special_ids) | set(tokenizer.convert_tokens_to_ids(list(families.FAMILIES["qwen2_vl"].placeholders)))
    ordinary = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    generator = torch.Generator().manual_seed(seed)
    micro_batches = []
    for k in range(W * GAS):
        conversations, images = zip(*[prompt(k * B + j) for j in range(B)])
        ids = ordinary[torch.randint(len(ordinary), (B * G, T), generator=generator)]
        lengths = torch.randint(1, T + 1, (B * G,), generator=generator)
        lengths[k % (B * G)] = T  # at least one full-length row per micro-batch
        mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
        micro_batches.append(dict(
            conversations=list(conversations), images=list(images),
            inputs=families.build_inputs(processor, list(conversations), [[image] for image in images], families.FAMILIES["qwen2_vl"]),
            ids=ids.masked_fill(mask == 0, tokenizer.pad_token_id), mask=mask,
            advantages=torch.randn(B * G, generator=generator)))
    return micro_batches


def rank_rollout(processor, micro_batches: list[dict], rank: int, model) -> policy.Rollout:
    """This rank's share of the step as the loop holds it: its B x GAS prompts encoded together, sampled
    (as it were) with the run's settings."""
    mine = micro_batches[rank * GAS:(rank + 1) * GAS]
    conversations = [c for mb in mine for c in mb["conversations"]]
    images = [im for mb in mine for im in mb["images"]]
    sampling = policy.Sampling.for_model(model, processor.tokenizer, group_size=G, max_new_tokens=MAX_LEN,
                                         temperature=1.0, share_prompt=True)
    return policy.Rollout(
        prompt_inputs=families.build_inputs(processor, conversations, [[image] for image in images], families.FAMILIES["qwen2_vl"]),
        completion_ids=torch.cat([mb["ids"] for mb in mine]), completion_mask=torch.cat([mb["mask"] for mb in mine]),
        texts=[""] * (B * GAS * G), truncated=torch.zeros(B * GAS * G, dtype=torch.bool), sampling=sampling,
        examples=[{} for _ in conversations], rewards=torch.zeros(B * GAS * G),
        reward_per_func=torch.zeros(B * GAS * G, 1), advantages=torch.cat([mb["advantages"] for mb in mine]))


def learn(rollout: policy.Rollout, engine, ref, args, world_size: int, device):
    """Steps 5 and 6 of train.py's loop, by the function main calls (train.learn_from): the old
    (num_iterations > 1) and reference (beta > 0) log-probs, then num_iterations updates; yields after each."""
    for loss_stats, skipped, _ in train.learn_from(rollout, engine, ref, args, world_size, distributed.Phases(device)):
        yield loss_stats, skipped


def reference_model(model_dir: str, seed: int):
    """A frozen reference policy near the initial one: its weights plus seeded noise, so k3 and its
    gradient are not zero at the first step."""
    model = families.load_model(model_dir, torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=generator))
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# The independent single-process computation (rank 0)
# ---------------------------------------------------------------------------------------------

def plain_logps(model, mb: dict) -> torch.Tensor:
    return policy.completion_logps(model, mb["inputs"], mb["ids"], mb["mask"], 1.0, G, share_prompt=False)


def step_loss(model, micro_batches, loss_type: str, beta: float, old=None, ref=None) -> torch.Tensor:
    """The loss of the whole optimizer step (all ranks, all micro-batches), from its definition:
    per token l = -min(r A, clip(r, 1 - eps, 1 + eps) A) + beta k3, r = exp(logp - old) (old =
    logp.detach() when not given: r = 1), k3 = exp(ref - logp) - (ref - logp) - 1 (cispo:
    -sg[min(r, 1 + eps)] A logp; sapo: -(4 / tau) sigmoid(tau (r - 1)) A, tau 1.0 or 1.05 by the sign of A); then
      grpo     mean over every row of the step of the row's token mean (sapo too)
      bnpo     mean over the W x GAS micro-batches of each micro-batch's token mean
      dr_grpo  mean over micro-batches of sum / (rows of the micro-batch x max_completion_length)
      dapo     sum over every token of the step / the step's active-token count (cispo too)."""
    row_means, batch_means, dr_terms, token_sum = [], [], [], 0.0
    step_tokens = sum(mb["mask"].sum() for mb in micro_batches).double()
    for k, mb in enumerate(micro_batches):
        logp = plain_logps(model, mb).double()
        m = mb["mask"].double()
        o = logp.detach() if old is None else old[k].double()
        r = torch.exp(logp - o)
        a = mb["advantages"].double()[:, None]
        if loss_type == "cispo":
            l = -torch.clamp(r, max=1 + EPSILON).detach() * a * logp
        elif loss_type == "sapo":
            tau = torch.where(a > 0, torch.tensor(SAPO_TAU_POS).double(), torch.tensor(SAPO_TAU_NEG).double())
            l = -(4 / tau) * torch.sigmoid(tau * (r - 1)) * a
        else:
            l = -torch.minimum(r * a, torch.clamp(r, 1 - EPSILON, 1 + EPSILON) * a)
        if beta:
            d = ref[k].double() - logp
            l = l + beta * (torch.exp(d) - d - 1)
        l = torch.where(m > 0, l, torch.zeros_like(l))
        row_means.append(l.sum(1) / m.sum(1))
        batch_means.append(l.sum() / m.sum())
        dr_terms.append(l.sum() / (l.shape[0] * MAX_LEN))
        token_sum = token_sum + l.sum()
    return {"grpo": lambda: torch.cat(row_means).mean(), "bnpo": lambda: torch.stack(batch_means).mean(),
            "dr_grpo": lambda: torch.stack(dr_terms).mean(), "dapo": lambda: token_sum / step_tokens,
            "cispo": lambda: token_sum / step_tokens, "sapo": lambda: torch.cat(row_means).mean()}[loss_type]()


def gradient(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters()}


def compare(change: dict, expected: dict) -> dict:
    """How far each weight's change is from the expected one: relative errors of norms, worst tensor
    (among those with a gradient above 1e-3 of the largest) and all weights together."""
    names = sorted(expected)
    norms = {n: expected[n].double().norm().item() for n in names}
    largest = max(norms.values())
    worst, worst_name = 0.0, None
    for n in names:
        error = (change[n].double() - expected[n].double()).norm().item() / max(norms[n], 1e-3 * largest)
        if error > worst:
            worst, worst_name = error, n
    total = torch.cat([(change[n].double() - expected[n].double()).flatten() for n in names]).norm().item()
    return {"worst_relative_error": worst, "worst_tensor": worst_name,
            "total_relative_error": total / torch.cat([expected[n].double().flatten() for n in names]).norm().item(),
            "gradient_norm": float(sum(v ** 2 for v in norms.values()) ** 0.5),
            "change_norm": torch.cat([change[n].double().flatten() for n in names]).norm().item()}


# ---------------------------------------------------------------------------------------------
# DeepSpeed
# ---------------------------------------------------------------------------------------------

def sgd_engine(model_dir: str, stage: int, lr: float, zero: dict | None = None):
    """The tiny model in float32 in a DeepSpeed engine with plain SGD (no momentum, no weight decay,
    no clipping, no schedule): one optimizer step changes each weight by exactly -lr x gradient.
    `zero`: more zero_optimization settings."""
    import deepspeed

    model = families.load_model(model_dir, torch.float32)
    config = {"train_micro_batch_size_per_gpu": B * G, "gradient_accumulation_steps": GAS,
              "gradient_clipping": 0.0, "zero_optimization": {"stage": stage, **(zero or {})}, "bf16": {"enabled": False},
              "fp16": {"enabled": False}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    engine.train()
    return engine


def full_weights(engine, stage: int) -> dict[str, torch.Tensor]:
    """Every weight, whole, on every rank (under ZeRO-3 a collective)."""
    import deepspeed

    params = dict(engine.module.named_parameters())
    gathered = (deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None) if stage == 3
                else contextlib.nullcontext())
    with gathered:
        return {n: p.detach().clone().float() for n, p in params.items()}


def gather_rows(tensor: torch.Tensor) -> list[torch.Tensor]:
    pieces = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(pieces, tensor.contiguous())
    return pieces


# ---------------------------------------------------------------------------------------------
# (a) the scale of one optimizer step over ranks and micro-steps
# ---------------------------------------------------------------------------------------------

def check_scale(model_dir, processor, rank, world_size, device, stage: int, loss_type: str) -> dict:
    micro_batches = step_data(processor, seed=1000 + stage)
    args = config.parse_args(cli_args(loss_type, 1, BETA, model_dir))
    engine = sgd_engine(model_dir, stage, lr=1.0)
    ref = reference_model(model_dir, seed=7)
    before = full_weights(engine, stage)
    rollout = rank_rollout(processor, micro_batches, rank, engine)
    updates = list(learn(rollout, engine, ref, args, world_size, device))
    after = full_weights(engine, stage)
    result = {"updates": len(updates)}
    if rank == 0:
        model = families.load_model(model_dir, torch.float32)
        with torch.no_grad():
            ref_logps = [plain_logps(ref, mb) for mb in micro_batches]
        expected = gradient(model, step_loss(model, micro_batches, loss_type, BETA, ref=ref_logps))
        result.update(compare({n: before[n] - after[n] for n in before}, expected))
    return result


# ---------------------------------------------------------------------------------------------
# (b) num_iterations = 2: old log-probs from the weights before the step's first update
# ---------------------------------------------------------------------------------------------

def check_old_logps(model_dir, processor, rank, world_size, device, lr: float) -> dict:
    stage = 3
    micro_batches = step_data(processor, seed=2000)
    args = config.parse_args(cli_args("grpo", 2, 0.0, model_dir))
    engine = sgd_engine(model_dir, stage, lr=lr)
    rollout = rank_rollout(processor, micro_batches, rank, engine)
    weights = [full_weights(engine, stage)]
    old_seen = []  # rollout.old_logps as each update left it
    for _ in learn(rollout, engine, None, args, world_size, device):
        old_seen.append(rollout.old_logps.detach().clone() if rollout.old_logps is not None else None)
        weights.append(full_weights(engine, stage))
    result = {"updates": len(old_seen)}
    old_pieces = [gather_rows(o) if o is not None else None for o in old_seen]
    if rank != 0:
        return result
    model = families.load_model(model_dir, torch.float32)
    with torch.no_grad():  # the independent old log-probs: the initial weights, per micro-batch
        logp0 = [plain_logps(model, mb) for mb in micro_batches]
    step_mask = torch.cat([mb["mask"] for mb in micro_batches]) > 0
    expected_old = torch.cat(logp0)[step_mask]
    result["old_logps_error_per_update"] = [
        (torch.cat(p)[step_mask] - expected_old).abs().max().item() if p is not None else None for p in old_pieces]
    # Update 1: ratio 1 at the initial weights.
    first = gradient(model, step_loss(model, micro_batches, "grpo", 0.0))
    result["first_update"] = compare({n: (weights[0][n] - weights[1][n]) / lr for n in first}, first)
    # Update 2 starts from the weights DeepSpeed reached after update 1; its old log-probs are logp0.
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(weights[1][n])
        logp1 = [plain_logps(model, mb) for mb in micro_batches]
    result["logp_moved_by_first_update"] = (torch.cat(logp1)[step_mask] - expected_old).abs().mean().item()
    second = gradient(model, step_loss(model, micro_batches, "grpo", 0.0, old=logp0))
    change = {n: (weights[1][n] - weights[2][n]) / lr for n in second}
    result["second_update"] = compare(change, second)
    # What update 2 would be had old been taken from the weights after update 1 (ratio 1): the gap
    # between the two expectations shows the check can tell them apart.
    ratio_one = gradient(model, step_loss(model, micro_batches, "grpo", 0.0))
    result["second_update_if_old_were_current"] = compare(change, ratio_one)
    result["gap_between_expectations"] = compare(ratio_one, second)["total_relative_error"]
    return result


# ---------------------------------------------------------------------------------------------
# (e) a non-finite loss in one micro-batch of one rank skips the whole optimizer step
# ---------------------------------------------------------------------------------------------

def check_nonfinite_first_micro_batch(model_dir, processor, rank, world_size, device, stage: int,
                                     fault: str = "loss") -> dict:
    """Rank 1's first micro-batch (of 2) has NaN advantages, so its loss is NaN (`fault` "loss"), or a
    finite loss whose gradient is infinite ("gradient": sqrt(l - sg[l]) added, 0 with derivative inf);
    its second micro-batch and all of rank 0's are finite. The step must be skipped on both ranks with
    no weight moved, not trained on the finite micro-batches that followed. Then a finite step on the
    same engine: it moves the weights (the skip left no NaN behind), and the loop's own all-reduces in
    its two micro-steps (train.update's, outside DeepSpeed's backward and step) are counted."""
    micro_batches = step_data(processor, seed=3000)
    if fault == "loss":  # rank 1's first
        micro_batches[GAS]["advantages"] = torch.full_like(micro_batches[GAS]["advantages"], float("nan"))
    args = config.parse_args(cli_args("grpo", 1, 0.0, model_dir))
    engine = sgd_engine(model_dir, stage, lr=1.0)
    before = full_weights(engine, stage)
    rollout = rank_rollout(processor, micro_batches, rank, engine)
    policy_loss, calls = train.objective.policy_loss, []

    def infinite_gradient_once(*args, **kwargs):
        loss, stats = policy_loss(*args, **kwargs)
        calls.append(1)
        return (loss + torch.sqrt(loss - loss.detach()) if rank == 1 and len(calls) == 1 else loss), stats

    train.objective.policy_loss = infinite_gradient_once if fault == "gradient" else policy_loss
    try:
        (loss_stats, skipped), = learn(rollout, engine, None, args, world_size, device)
    finally:
        train.objective.policy_loss = policy_loss
    after = full_weights(engine, stage)
    result = {"skipped": skipped, "losses": [s["loss"] for s in loss_stats],
              "largest_change": max((before[n] - after[n]).abs().max().item() for n in before)}
    finite = rank_rollout(processor, step_data(processor, seed=3001), rank, engine)
    for group in engine.optimizer.param_groups:  # the rate the skip set to 0 (train.py's LR schedule sets it again)
        group["lr"] = 1.0
    with counting_all_reduces(engine) as count:
        _, result["finite_step_skipped"] = train.update(engine, finite, args, world_size, step_tokens=100.0)
    result["loop_all_reduces"] = count["calls"]
    again = full_weights(engine, stage)
    result["finite_step_change"] = max((after[n] - again[n]).abs().max().item() for n in after)
    return result


@contextlib.contextmanager
def counting_all_reduces(engine):
    """Counts the all-reduces made in the block outside DeepSpeed's own backward and step (the
    reduction of gradients is theirs; what the loop adds around them is counted)."""
    count, original = {"calls": 0, "paused": False}, torch.distributed.all_reduce

    def all_reduce(*args, **kwargs):
        count["calls"] += not count["paused"]
        return original(*args, **kwargs)

    def paused(method):
        def call(*args, **kwargs):
            count["paused"] = True
            try:
                return method(*args, **kwargs)
            finally:
                count["paused"] = False
        return call

    torch.distributed.all_reduce = all_reduce
    engine.backward, engine.step = paused(engine.backward), paused(engine.step)
    try:
        yield count
    finally:
        torch.distributed.all_reduce = original
        del engine.backward, engine.step


# ---------------------------------------------------------------------------------------------
# (c) one seed for the run, different samples on different ranks
# ---------------------------------------------------------------------------------------------

def check_seeds(model_dir, processor, rank, seed: int) -> dict:
    model = families.load_model(model_dir, torch.float32)
    conversation, image = prompt(0)  # the same prompt and image on every rank
    inputs = families.build_inputs(processor, [conversation], [[image]], families.FAMILIES["qwen2_vl"])
    new_tokens = 16

    def sample() -> torch.Tensor:
        ids = policy.sample_groups(model, inputs,
            policy.Sampling.for_model(model, processor.tokenizer, group_size=4, max_new_tokens=new_tokens,
                                      temperature=1.0, top_p=1.0,
                                      suppressed_ids=families.forbidden_token_ids(processor, model.config))).completion_ids
        return torch.nn.functional.pad(ids, (0, new_tokens - ids.shape[1]), value=processor.tokenizer.pad_token_id)

    distributed.seed_this_rank(seed, rank)
    first = sample()
    distributed.seed_this_rank(seed, rank)
    again = sample()
    torch.manual_seed(seed)  # the same generator state on both ranks: the same samples (the check's control)
    control = sample()
    firsts, controls = gather_rows(first), gather_rows(control)
    return {"ranks_identical": all(torch.equal(firsts[0], f) for f in firsts[1:]),
            "reseed_reproduces": bool(torch.equal(first, again)),
            "same_generator_state_identical": all(torch.equal(controls[0], c) for c in controls[1:]),
            "first_completion_per_rank": [f[0].tolist() for f in firsts]}


# ---------------------------------------------------------------------------------------------
# (d) ZeRO-3: the weights gathered once per sample_groups call
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def counting_gathers():
    """Counts the elements every all-gather of the block receives (DeepSpeed's ZeRO-3 gathers go
    through torch.distributed's all_gather_into_tensor or all_gather)."""
    from deepspeed.comm import comm

    count = {"elements": 0}
    into, listed = comm.cdb.all_gather_function, torch.distributed.all_gather  # DeepSpeed keeps the former

    def all_gather_into_tensor(output_tensor, *args, **kwargs):
        count["elements"] += output_tensor.numel()
        return into(output_tensor, *args, **kwargs)

    def all_gather(tensor_list, *args, **kwargs):
        count["elements"] += sum(t.numel() for t in tensor_list)
        return listed(tensor_list, *args, **kwargs)

    comm.cdb.all_gather_function, torch.distributed.all_gather = all_gather_into_tensor, all_gather
    try:
        yield count
    finally:
        comm.cdb.all_gather_function, torch.distributed.all_gather = into, listed


def check_gathers(model_dir, processor, rank) -> dict:
    """Elements gathered by one sample_groups call on a ZeRO-3 engine, on each path, next to the
    model's size; and the weights partitioned again afterwards, with training still working."""
    engine = sgd_engine(model_dir, 3, lr=0.0)
    conversations, images = zip(*[prompt(rank * 2 + j) for j in range(2)])  # different prompts on each rank
    inputs = families.build_inputs(processor, list(conversations), [[image] for image in images],
                                      families.FAMILIES["qwen2_vl"])
    result = {"parameter_elements": sum(p.ds_numel for p in engine.module.parameters()),
              "parameter_tensors": len(list(engine.module.parameters()))}
    for share_prompt in (True, False):
        with counting_gathers() as count:
            policy.sample_groups(engine, inputs,
                policy.Sampling.for_model(engine, processor.tokenizer, group_size=3, max_new_tokens=6,
                                          temperature=1.0, top_p=1.0, share_prompt=share_prompt, zero_stage=3,
                                          synced_ranks=True,
                                          suppressed_ids=families.forbidden_token_ids(processor, engine.module.config)))
        name = "shared" if share_prompt else "plain"
        result[f"gathered_{name}"] = count["elements"]
        result[f"released_after_{name}"] = released(engine)
    # The hooks are back: a training forward and backward gather and release the weights as before.
    logps = policy.completion_logps(engine, inputs, torch.full((6, 3), 20), torch.ones(6, 3, dtype=torch.long),
                                         temperature=1.0, group_size=3)
    engine.backward(logps.sum())
    engine.step()
    result["released_after_training_step"] = released(engine)
    return result


def check_gathers_per_step(model_dir, processor, rank, world_size, traced: bool, steps: int = 3) -> list[dict]:
    """ZeRO-3 weights gathered per step (a sampling call, then an optimizer step of GAS micro-batches
    through train.update), as multiples of the model's size, with DeepSpeed's trace per micro-batch
    (`traced`: distributed.trace_micro_batches, as load_engine sets it) or as DeepSpeed sets it. No
    weight is kept whole for being small (stage3_param_persistence_threshold 0: Qwen2-VL-2B's matrices
    are all above zero3.json's threshold, this tiny model's all below), and zero3.json's reuse distance
    (1e9 elements, more than this model) keeps a weight used again in the micro-batch."""
    engine = sgd_engine(model_dir, 3, lr=0.0, zero={"stage3_param_persistence_threshold": 0,
                                                    "stage3_max_reuse_distance": 1e9, "stage3_max_live_parameters": 1e9})
    if traced:
        distributed.trace_micro_batches(engine)
    coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
    invalidate, invalidations = coordinator._invalidate_trace, []
    coordinator._invalidate_trace = lambda: invalidations.append(1) or invalidate()
    size, tensors = sum(p.ds_numel for p in engine.module.parameters()), len(list(engine.module.parameters()))
    args = config.parse_args(cli_args("grpo", 1, 0.0, model_dir))
    found = []
    for step in range(steps):
        rollout = rank_rollout(processor, step_data(processor, seed=5000 + step), rank, engine)
        invalidations.clear()
        with counting_gathers() as sampling:
            policy.sample_groups(engine, rollout.prompt_inputs, policy.Sampling.for_model(
                engine, processor.tokenizer, group_size=G, max_new_tokens=4, temperature=1.0, zero_stage=3,
                synced_ranks=True))
        with counting_gathers() as update:
            train.update(engine, rollout, args, world_size, step_tokens=100.0)
        found.append({"generate": sampling["elements"] / size, "update": update["elements"] / size,
                      "update_padding_bound": (update["elements"] - GAS * size) / tensors,
                      "invalidations": len(invalidations), "trace_complete": coordinator.is_complete_trace(),
                      "released_after_step": released(engine)})
    return found


def check_lora_sampling(model_dir, processor, rank) -> dict:
    """A LoRA policy under ZeRO-3 (PEFT's adapters on the decoder's projections, B drawn at random so that
    they matter; no weight kept whole for its size): one sample_groups call, whose adapters are merged
    inside the one gather (families.adapters_merged). The elements it gathers, how often an adapter ran
    during it, and whether every weight and this rank's log-probs of fixed completions are bitwise those
    before it."""
    import deepspeed

    model = families.load_model(model_dir, torch.float32)
    model = families.add_lora(model, families.lora_targets(model, list(config.LORA_TARGETS), False), 4, 8, 0.0, 0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)) * 0.5)
    ds_config = {"train_micro_batch_size_per_gpu": B * G, "gradient_accumulation_steps": GAS,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                 "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    trained = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(trained, lr=0.0), config=ds_config)
    rollout = rank_rollout(processor, step_data(processor, seed=6000), rank, engine)

    def logps() -> torch.Tensor:
        with torch.no_grad():
            return policy.rollout_logps(engine, rollout, B)

    before, weights = logps(), full_weights(engine, 3)
    adapter_calls = []
    for name, module in engine.module.named_modules():
        if name.endswith(".lora_A.default"):
            module.register_forward_hook(lambda *_: adapter_calls.append(1))
    with counting_gathers() as count:
        policy.sample_groups(engine, rollout.prompt_inputs, policy.Sampling.for_model(
            engine, processor.tokenizer, group_size=G, max_new_tokens=4, temperature=1.0, zero_stage=3,
            synced_ranks=True))
    after = full_weights(engine, 3)
    return {"gathered": count["elements"], "adapter_calls_while_sampling": len(adapter_calls), "parameter_elements": sum(p.ds_numel for p in engine.module.parameters()),
            "parameter_tensors": len(list(engine.module.parameters())), "released_after": released(engine),
            "logps_unchanged": bool(torch.equal(logps(), before)),
            "weights_unchanged": all(torch.equal(after[name], weights[name]) for name in weights)}


def released(engine) -> list[str]:
    """The weights that are gathered now (not partitioned), leaving out those ZeRO-3 keeps whole on purpose."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return [name for name, p in engine.module.named_parameters()
            if p.ds_status != ZeroParamStatus.NOT_AVAILABLE and not p.ds_persist]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", default="3,2,0")
    parser.add_argument("--local_rank", type=int, default=-1)  # passed by the deepspeed launcher
    cli = parser.parse_args()
    torch.set_num_threads(1)
    rank, world_size, device = distributed.init_distributed()
    assert world_size == W, f"launch with --num_gpus {W}"
    processor = families.load_processor(cli.model, 56 * 56, 56 * 112)
    results = {"gathers": check_gathers(cli.model, processor, rank),
               "lora_sampling": check_lora_sampling(cli.model, processor, rank),
               "gathers_per_step": {name: check_gathers_per_step(cli.model, processor, rank, world_size, traced)
                                    for name, traced in (("deepspeed", False), ("traced", True))},
               "seeds": check_seeds(cli.model, processor, rank, seed=1234)}
    results["scale"] = {f"stage{s}": {lt: check_scale(cli.model, processor, rank, world_size, device, int(s), lt)
                                      for lt in LOSS_TYPES} for s in cli.stages.split(",") if s}
    # lr 0.3 moves the completions' log-probs by ~0.2 nats on average: ratios well away from 1,
    # some clipped at 1 +- 0.2, none with a vanishing gradient.
    results["old_logps"] = check_old_logps(cli.model, processor, rank, world_size, device, lr=0.3)
    results["nonfinite"] = {f"stage{s}-{fault}": check_nonfinite_first_micro_batch(cli.model, processor, rank,
                                                                                  world_size, device, int(s), fault)
                            for s in cli.stages.split(",") if s for fault in ("loss", "gradient")}
    if rank == 0:
        with open(cli.out, "w") as f:
            json.dump(results, f, indent=1)
    torch.distributed.barrier()
    distributed.end_distributed()


if __name__ == "__main__":
    main()
