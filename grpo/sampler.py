"""Group sampling: G completions for every prompt a rank needs for one optimizer step, in one `generate` call.

What goes wrong here in other trainers, and what this does instead:
- A published checkpoint's generation_config.json leaks into sampling (trap 13): transformers fills
  every field `generate` is not given from it (Qwen2.5-VL-Instruct's top_k 1 and top_p 0.001, Qwen2.5's
  repetition_penalty 1.05), so the rollouts are not samples of pi_theta while the loss treats them as
  such. Here `generate` gets a config built from the run's flags alone (`generation_config`), and the
  model's own is set aside for the call (`run_settings_only`); only the checkpoint's end ids are kept.
- Only the tokenizer's eos ended a completion, while checkpoints list several (trap 14; Qwen: <|im_end|>
  and <|endoftext|>; Gemma 3: <end_of_turn> and <eos>). A completion ends at the first of any of them
  (`end_token_ids`), and its mask, texts and truncation flag agree.
- ZeRO-3 shards every weight; generate on a sharded model all-gathers each layer at every decode
  step (~10x slower, trap 3). The weights are gathered once per rollout, DeepSpeed's gather-and-release
  hooks are off while generate runs, and the shards are released on exit.
- Ranks finish at different lengths. With `synced_gpus` every rank keeps stepping until all are done,
  so no rank waits forever in a collective the others never join (trap 3).
- Gradient checkpointing in train mode turned the KV cache off in some transformers versions
  (trap 4): generate runs in eval mode with use_cache=True.
- Image placeholder tokens are suppressed (trap 5); each rank samples with its own seed (trap 7,
  set in train.py).
- On a GPU: transformers compiles the decode step whenever `generate` is given a static cache (CUDA
  graphs; minutes of compiling, a recompile whenever the cache length changes, graph breaks at every
  ZeRO-3 hook), so compiling is off; and flash-attention-2 unpads the batch in every layer at every
  decode step (a host sync each time), so decoding runs on PyTorch's sdpa (`decode_attention`).
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
    truncated: torch.Tensor        # [N] bool: hit max_new_tokens without an end id


def end_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion (trap 14): the checkpoint's generation_config.eos_token_id (one
    id or a list: Qwen's <|im_end|> and <|endoftext|>, Gemma 3's <end_of_turn> and <eos>) and the
    tokenizer's eos, in that order, each once."""
    listed = vlm_adapter.unwrap(model).generation_config.eos_token_id
    listed = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    ids = [*listed, tokenizer.convert_tokens_to_ids(tokenizer.eos_token)]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def generation_config(*, max_new_tokens: int, end_ids: list[int], pad_token_id: int, suppress_token_ids: list[int],
                      temperature: float | None, top_p: float = 1.0, ignore_eos: bool = False):
    """The whole of what `generate` is told, from the run's flags alone: sampling from
    softmax(logits / temperature) restricted to the top_p nucleus (temperature None: greedy), with
    placeholders suppressed, stopping at any end id. Every other field that changes what is drawn
    (top_k, repetition_penalty, typical_p, min_p, no_repeat_ngram_size, bad_words_ids, ...) is left
    unset, and `run_settings_only` keeps the checkpoint's values from filling them; top_k is set to 0
    because transformers' own default for it is 50. Auto-compilation is off (see the module docstring)."""
    from transformers import GenerationConfig

    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature is not None \
        else dict(do_sample=False)
    return GenerationConfig(
        **sampling, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens if ignore_eos else None,
        use_cache=True, suppress_tokens=suppress_token_ids or None, eos_token_id=end_ids, pad_token_id=pad_token_id,
        disable_compile=True)


@contextlib.contextmanager
def run_settings_only(model):
    """Within the block the model's generation_config holds its token ids and nothing else.

    transformers (5.x, `_prepare_generation_config`) fills every field of the config `generate` is
    given that is unset from the model's generation_config, i.e. from the checkpoint's
    generation_config.json: a published checkpoint's top_k 1 or repetition_penalty 1.05 would shape
    the rollouts (trap 13). Setting the checkpoint's config aside for the call leaves only the run's
    flags and transformers' neutral defaults."""
    from transformers import GenerationConfig

    published = model.generation_config
    model.generation_config = GenerationConfig(
        eos_token_id=published.eos_token_id, pad_token_id=published.pad_token_id, bos_token_id=published.bos_token_id)
    try:
        yield
    finally:
        model.generation_config = published


@contextlib.contextmanager
def decode_attention(model):
    """Decode on sdpa when the model runs flash-attention-2: transformers' flash-attention path unpads
    a padded batch in every layer, with a host sync (`.item()`) each time, and a left-padded batch
    decoding into a preallocated cache is always padded: layers x tokens syncs per rollout (28 x 256
    for Qwen2-VL-2B). sdpa builds its mask once per step. The training forwards keep flash-attention-2."""
    if model.config._attn_implementation != "flash_attention_2":
        yield
        return
    model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        model.set_attn_implementation("flash_attention_2")


def completion_mask_through_eos(completion_ids: torch.Tensor, end_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [N, T] that is 1 up to and including each row's first end id (any of end_ids), and which
    rows had none."""
    is_eos = torch.isin(completion_ids, torch.tensor(end_ids, device=completion_ids.device))
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), completion_ids.shape[1] - 1)
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    return (positions[None, :] <= first_eos[:, None]).long(), ~has_eos


@contextlib.contextmanager
def gathered_weights(model, zero_stage: int):
    """Under ZeRO-3, every weight gathered on every rank once for the block, and DeepSpeed's
    per-module hooks off while it lasts.

    `model` is the DeepSpeed engine (or a plain model, which needs nothing). The hooks fetch a
    module's weights before its forward and release them after it, GatheredParameters or not: left
    on, the first forward inside the block (the shared prompt's prefill) released every weight, and
    generate gathered them all again (twice the traffic), or layer by layer at every decode step. So
    they are removed for the block and registered again at its end, as TRL does for generation (its
    `unwrap_model_for_generation`), with the same module ids."""
    if zero_stage != 3:
        yield
        return
    import deepspeed

    offload = getattr(getattr(model, "optimizer", None), "parameter_offload", None)
    unwrapped = vlm_adapter.unwrap(model)
    with deepspeed.zero.GatheredParameters(list(unwrapped.parameters()), modifier_rank=None):
        if offload is None:  # no ZeRO-3 engine around it: nothing hooked
            yield
            return
        for param in unwrapped.parameters():
            param.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module, count=[0])


@torch.no_grad()
def sample_groups(model, prompt_inputs: dict, tokenizer, *, group_size: int, max_new_tokens: int,
                  temperature: float, top_p: float, suppress_token_ids: list[int], share_prompt: bool = True,
                  generation_batch_size: int = 0, ignore_eos: bool = False, blank_prompt: dict | None = None,
                  zero_stage: int = 0, synced_ranks: bool = False) -> Rollout:
    """G completions for each of the B prompts in `prompt_inputs` (left-padded [B, P] rows and their
    images, not repeated): rows i*G .. i*G+G-1 of the result belong to prompt i.

    `model`: the policy, or the DeepSpeed engine around it (under ZeRO-3 its hooks are set aside,
    see gathered_weights). Sampling is from softmax(logits / temperature) within the top_p nucleus,
    and from nothing else (generation_config). All B*G completions come from one `generate` call, or
    from calls of at most `generation_batch_size` completions each (0: no limit) when memory needs
    it; every rank makes the same number of calls, so ranks stay in step under ZeRO-3. With
    `share_prompt` each prompt is prefilled once (the vision tower runs once per prompt) and its
    cache copied to its G samples. `ignore_eos` samples exactly max_new_tokens tokens (benchmarks:
    runs of equal length compare). `blank_prompt` (vlm_adapter.with_pictures) gives a call without
    pictures a masked-out blank image. Returns the completions right-padded to the longest one.
    """
    unwrapped = vlm_adapter.unwrap(model)
    end_ids = end_token_ids(unwrapped, tokenizer)
    config = generation_config(max_new_tokens=max_new_tokens, end_ids=end_ids, pad_token_id=tokenizer.pad_token_id,
                               suppress_token_ids=suppress_token_ids, temperature=temperature, top_p=top_p,
                               ignore_eos=ignore_eos)
    num_prompts = prompt_inputs["input_ids"].shape[0]
    per_call = prompts_per_call(generation_batch_size, group_size, num_prompts)
    generate = _generate_from_shared_prompt if share_prompt else _generate_from_repeated_prompt
    pieces = []
    was_training = unwrapped.training
    unwrapped.eval()
    with gathered_weights(model, zero_stage), run_settings_only(unwrapped):
        for start in range(0, num_prompts, per_call):
            inputs = vlm_adapter.select_prompts(prompt_inputs, start, min(start + per_call, num_prompts),
                                                unwrapped.config, blank_prompt)
            pieces.append(generate(unwrapped, inputs, group_size, config, synced_ranks))
    unwrapped.train(was_training)
    longest = max(piece.shape[1] for piece in pieces)
    padded = [torch.nn.functional.pad(piece, (0, longest - piece.shape[1]), value=tokenizer.pad_token_id)
              for piece in pieces]
    return to_rollout(torch.cat(padded), tokenizer, end_ids)


@torch.no_grad()
def greedy_completions(model, prompt_inputs: dict, tokenizer, *, max_new_tokens: int,
                       suppress_token_ids: list[int]) -> Rollout:
    """One greedy completion per prompt (eval.py), under the same rules: the run's settings only,
    every end id, placeholders suppressed."""
    end_ids = end_token_ids(model, tokenizer)
    config = generation_config(max_new_tokens=max_new_tokens, end_ids=end_ids, pad_token_id=tokenizer.pad_token_id,
                               suppress_token_ids=suppress_token_ids, temperature=None)
    with run_settings_only(model), decode_attention(model):
        output = model.generate(**prompt_inputs, generation_config=config)
    return to_rollout(output[:, prompt_inputs["input_ids"].shape[1]:].cpu(), tokenizer, end_ids)


def prompts_per_call(generation_batch_size: int, group_size: int, num_prompts: int) -> int:
    """Prompts per generate call: whole groups of at most generation_batch_size completions (0: all)."""
    return max(1, generation_batch_size // group_size) if generation_batch_size > 0 else num_prompts


def _generate_from_repeated_prompt(model, inputs: dict, group_size: int, config, synced_ranks: bool) -> torch.Tensor:
    """The plain path: every prompt repeated G times and prefilled G times. Returns [B*G, T]."""
    with decode_attention(model):
        output = model.generate(**vlm_adapter.repeat_for_group(inputs, group_size, model.config),
                                generation_config=config, synced_gpus=synced_ranks)
    return output[:, inputs["input_ids"].shape[1]:]


def _generate_from_shared_prompt(model, inputs: dict, group_size: int, config, synced_ranks: bool) -> torch.Tensor:
    """Prefill each prompt once, copy its cache to its G rows, and let `generate` continue. Returns [B*G, T].

    The prefill stops one token short of the prompt: `generate` must have at least one uncached
    token to start from (given a fully cached prompt it would prefill the whole prompt again on top
    of the cache). The prefill's positions count each left-padded row's real tokens, as generate
    numbers the tokens after it. Qwen-VL's decode positions come from `model.rope_deltas`: it is set
    to the prompts' deltas repeated G times right before `generate`, since a stale value of the
    right shape (left by an earlier forward) would be used silently.
    """
    from transformers import DynamicCache, StaticCache

    G, text_config = group_size, model.config.get_text_config()
    prefill = DynamicCache(config=text_config)
    text_keys = ["input_ids", "attention_mask", *vlm_adapter.token_type_keys(inputs)]
    prefix = {key: (value[:, :-1] if key in text_keys else value) for key, value in inputs.items()}
    positions = vlm_adapter.prompt_positions(model, prefix)
    model(**prefix, position_ids=positions, cache=prefill, use_cache=True, logits_to_keep=1)
    if any(layer.is_sliding for layer in prefill.layers):  # windowed layers keep only their window: as they are
        prefill.batch_repeat_interleave(G)
        cache = prefill
    else:  # decode into preallocated keys/values: a growing cache copies all of itself at every step
        cache = StaticCache(config=text_config,
                            max_cache_len=inputs["input_ids"].shape[1] + config.max_new_tokens)
        for layer, prompt_layer in zip(cache.layers, prefill.layers):
            layer.update(prompt_layer.keys.repeat_interleave(G, dim=0), prompt_layer.values.repeat_interleave(G, dim=0))
    if positions.dim() == 3:  # mRoPE: decode position = the token's index among real tokens + its row's delta
        deltas = positions[:, :, -1].amax(0) + 1 - prefix["attention_mask"].sum(-1)
        model.model.rope_deltas = deltas.repeat_interleave(G)[:, None]
    # Token types describe the cached prompt only: the one uncached prompt token and all that follow are
    # text, and a family that builds its mask from them (Gemma 3) must not see prompt-length ones again.
    repeated = {key: inputs[key].repeat_interleave(G, dim=0) for key in ("input_ids", "attention_mask")}
    with decode_attention(model):
        output = model.generate(**repeated, cache=cache, generation_config=config, synced_gpus=synced_ranks)
    return output[:, inputs["input_ids"].shape[1]:]


def to_rollout(completion_ids: torch.Tensor, tokenizer, end_ids: list[int]) -> Rollout:
    """Cut generated rows [N, T] after their first end id: mask, padding, texts, truncation flags."""
    mask, truncated = completion_mask_through_eos(completion_ids, end_ids)
    completion_ids = completion_ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(completion_ids, mask, texts, truncated)
