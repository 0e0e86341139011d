"""Group sampling: G completions for every prompt a rank needs for one optimizer step, in one `generate` call.

What goes wrong here in other trainers, and what this does instead:
- ZeRO-3 shards every weight; generate on a sharded model all-gathers each layer at every decode
  step (~10x slower, trap 3). The weights are gathered once per rollout, generate runs, and the
  shards are released on exit.
- Ranks finish at different lengths. With `synced_gpus` every rank keeps stepping until all are done,
  so no rank waits forever in a collective the others never join (trap 3).
- Gradient checkpointing in train mode turned the KV cache off in some transformers versions
  (trap 4): generate runs in eval mode with use_cache=True.
- Image placeholder tokens are suppressed (trap 5); each rank samples with its own seed (trap 7,
  set in train.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from . import vlm_adapter


@dataclass
class Rollout:
    completion_ids: torch.Tensor   # [N, T] sampled tokens, padded after EOS
    completion_mask: torch.Tensor  # [N, T] 1 up to and including the first EOS
    texts: list[str]               # N decoded completions (special tokens removed)
    truncated: torch.Tensor        # [N] bool: hit max_new_tokens without an EOS


def completion_mask_through_eos(completion_ids: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [N, T] that is 1 up to and including each row's first EOS, and which rows had none."""
    is_eos = completion_ids == eos_token_id
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), completion_ids.shape[1] - 1)
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    return (positions[None, :] <= first_eos[:, None]).long(), ~has_eos


@contextlib.contextmanager
def gathered_weights(model, zero_stage: int):
    """Under ZeRO-3, materialise the full weights on every rank for the duration of the block."""
    if zero_stage != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield


@torch.no_grad()
def sample_groups(model, prompt_inputs: dict, tokenizer, *, group_size: int, max_new_tokens: int,
                  temperature: float, top_p: float, suppress_token_ids: list[int], share_prompt: bool = True,
                  generation_batch_size: int = 0, ignore_eos: bool = False, blank_prompt: dict | None = None,
                  zero_stage: int = 0, synced_ranks: bool = False) -> Rollout:
    """G completions for each of the B prompts in `prompt_inputs` (left-padded [B, P] rows and their
    images, not repeated): rows i*G .. i*G+G-1 of the result belong to prompt i.

    All B*G completions come from one `generate` call, or from calls of at most
    `generation_batch_size` completions each (0: no limit) when memory needs it; every rank makes
    the same number of calls, so ranks stay in step under ZeRO-3. With `share_prompt` each prompt is
    prefilled once (the vision tower runs once per prompt) and its cache copied to its G samples.
    `ignore_eos` samples exactly max_new_tokens tokens (benchmarks: runs of equal length compare).
    `blank_prompt` (vlm_adapter.with_pictures) gives a call without pictures a masked-out blank image.
    Returns the completions right-padded to the longest one.
    """
    was_training = model.training
    model.eval()
    eos_token_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    generate_kwargs = dict(
        do_sample=True, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens if ignore_eos else None, use_cache=True, suppress_tokens=suppress_token_ids,
        eos_token_id=eos_token_id, pad_token_id=tokenizer.pad_token_id, synced_gpus=synced_ranks)
    num_prompts = prompt_inputs["input_ids"].shape[0]
    per_call = prompts_per_call(generation_batch_size, group_size, num_prompts)
    generate = _generate_from_shared_prompt if share_prompt else _generate_from_repeated_prompt
    pieces = []
    with gathered_weights(model, zero_stage):
        for start in range(0, num_prompts, per_call):
            inputs = vlm_adapter.select_prompts(prompt_inputs, start, min(start + per_call, num_prompts),
                                                vlm_adapter.unwrap(model).config, blank_prompt)
            pieces.append(generate(model, inputs, group_size, generate_kwargs))
    model.train(was_training)
    longest = max(piece.shape[1] for piece in pieces)
    padded = [torch.nn.functional.pad(piece, (0, longest - piece.shape[1]), value=tokenizer.pad_token_id)
              for piece in pieces]
    return to_rollout(torch.cat(padded), tokenizer)


def prompts_per_call(generation_batch_size: int, group_size: int, num_prompts: int) -> int:
    """Prompts per generate call: whole groups of at most generation_batch_size completions (0: all)."""
    return max(1, generation_batch_size // group_size) if generation_batch_size > 0 else num_prompts


def _generate_from_repeated_prompt(model, inputs: dict, group_size: int, generate_kwargs: dict) -> torch.Tensor:
    """The plain path: every prompt repeated G times and prefilled G times. Returns [B*G, T]."""
    output = model.generate(**vlm_adapter.repeat_for_group(inputs, group_size, vlm_adapter.unwrap(model).config),
                            **generate_kwargs)
    return output[:, inputs["input_ids"].shape[1]:]


def _generate_from_shared_prompt(model, inputs: dict, group_size: int, generate_kwargs: dict) -> torch.Tensor:
    """Prefill each prompt once, copy its cache to its G rows, and let `generate` continue. Returns [B*G, T].

    The prefill stops one token short of the prompt: `generate` must have at least one uncached
    token to start from (given a fully cached prompt it would prefill the whole prompt again on top
    of the cache). The prefill's positions count each left-padded row's real tokens, as generate
    numbers the tokens after it. Qwen-VL's decode positions come from `model.rope_deltas`: it is set
    to the prompts' deltas repeated G times right before `generate`, since a stale value of the
    right shape (left by an earlier forward) would be used silently.
    """
    from transformers import DynamicCache, StaticCache

    G, unwrapped = group_size, vlm_adapter.unwrap(model)
    text_config = unwrapped.config.get_text_config()
    prefill = DynamicCache(config=text_config)
    text_keys = ["input_ids", "attention_mask", *vlm_adapter.token_type_keys(inputs)]
    prefix = {key: (value[:, :-1] if key in text_keys else value) for key, value in inputs.items()}
    positions = vlm_adapter.prompt_positions(unwrapped, prefix)
    unwrapped(**prefix, position_ids=positions, cache=prefill, use_cache=True, logits_to_keep=1)
    if any(layer.is_sliding for layer in prefill.layers):  # windowed layers keep only their window: as they are
        prefill.batch_repeat_interleave(G)
        cache = prefill
    else:  # decode into preallocated keys/values: a growing cache copies all of itself at every step
        cache = StaticCache(config=text_config,
                            max_cache_len=inputs["input_ids"].shape[1] + generate_kwargs["max_new_tokens"])
        for layer, prompt_layer in zip(cache.layers, prefill.layers):
            layer.update(prompt_layer.keys.repeat_interleave(G, dim=0), prompt_layer.values.repeat_interleave(G, dim=0))
    if positions.dim() == 3:  # mRoPE: decode position = the token's index among real tokens + its row's delta
        deltas = positions[:, :, -1].amax(0) + 1 - prefix["attention_mask"].sum(-1)
        unwrapped.model.rope_deltas = deltas.repeat_interleave(G)[:, None]
    # Token types describe the cached prompt only: the one uncached prompt token and all that follow are
    # text, and a family that builds its mask from them (Gemma 3) must not see prompt-length ones again.
    repeated = {key: inputs[key].repeat_interleave(G, dim=0) for key in ("input_ids", "attention_mask")}
    output = model.generate(**repeated, cache=cache, **generate_kwargs)
    return output[:, inputs["input_ids"].shape[1]:]


def to_rollout(completion_ids: torch.Tensor, tokenizer) -> Rollout:
    """Cut generated rows [N, T] after their first EOS: mask, padding, texts, truncation flags."""
    eos_token_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    mask, truncated = completion_mask_through_eos(completion_ids, eos_token_id)
    completion_ids = completion_ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(completion_ids, mask, texts, truncated)
