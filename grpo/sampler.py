"""Group sampling: every prompt of this rank, G times, in one `generate` call.

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
def sample_group(model, prompt_inputs: dict, tokenizer, *, max_new_tokens: int, temperature: float,
                 top_p: float, suppress_token_ids: list[int], zero_stage: int = 0,
                 synced_ranks: bool = False) -> Rollout:
    """Sample one completion per row of `prompt_inputs` (already repeated G times per prompt).

    prompt_inputs: left-padded [N, P] input_ids / attention_mask / mm_token_type_ids, plus the
    images. Returns the completions right-padded to the longest one in this call.
    """
    was_training = model.training
    model.eval()
    eos_token_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    with gathered_weights(model, zero_stage):
        output = model.generate(
            **prompt_inputs, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
            max_new_tokens=max_new_tokens, use_cache=True, suppress_tokens=suppress_token_ids,
            eos_token_id=eos_token_id, pad_token_id=tokenizer.pad_token_id, synced_gpus=synced_ranks,
        )
    model.train(was_training)
    return to_rollout(output[:, prompt_inputs["input_ids"].shape[1]:], tokenizer)


def to_rollout(completion_ids: torch.Tensor, tokenizer) -> Rollout:
    """Cut generated rows [N, T] after their first EOS: mask, padding, texts, truncation flags."""
    eos_token_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    mask, truncated = completion_mask_through_eos(completion_ids, eos_token_id)
    completion_ids = completion_ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(completion_ids, mask, texts, truncated)
