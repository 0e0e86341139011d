"""The policy model at work: a step's rollouts sampled from it, and log pi(o | q, image) of their tokens.

Everything that runs the model is here, in three parts:

1. The definition. `sample_groups` draws G completions for every prompt of a rank's step, from
   softmax(logits / T) within the top_p nucleus and nothing else; `completion_logps` gives each
   completion token's log-probability, with gradient for the update and without for the reference and
   the old policy. Read plainly, each prompt is repeated G times (`share_prompt=False`).
2. The shared prompt: the same numbers with each prompt and its pictures encoded once per group.
   generate prefills the prompt once and copies its cache to the G samples; the log-prob forward runs
   the prompt once and lets the G completions attend to its keys and values. The tests hold it to part
   1 (log-probs, gradients, samples).
3. generate's surroundings: the config it is told, the end ids, the attention kernel it decodes with,
   the fixed shapes of a compiled decode step (--compile_decode), the ZeRO-3 gather around it.

The run's sampling settings are one `Sampling`, built once at set-up and passed whole.

The traps guarded here (docs/TRAPS.md): [checkpoint sampling defaults] (generate is told the run's
flags and nothing of the checkpoint's generation config), [end ids], [ZeRO-3 generation] (weights
gathered once per rollout, ranks kept in step), [cache off in train mode], [sampled placeholders],
[pictures in every forward], [padding positions], [stale rope deltas], [full-vocabulary logits],
[checkpointing drops the cache], [auto-compile], and on a GPU [unpadding syncs].
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_layers import GradientCheckpointingLayer

from . import families
from .objective import selective_log_softmax, token_entropy


@dataclass(frozen=True)
class Sampling:
    """How this run draws its rollouts, fixed at set-up and passed whole (nanoGPT's GPTConfig habit).
    `for_run` builds it from the flags; `for_model` anywhere else (eval, tests, the tour)."""

    tokenizer: object                     # decodes the completions; its pad id fills after an end
    group_size: int                       # G: completions per prompt
    max_new_tokens: int                   # the most tokens a completion has
    temperature: float                    # T: sampled from softmax(logits / T), log-probs taken at T too
    end_ids: tuple[int, ...]              # a completion ends at the first of any of them ([end ids])
    top_p: float = 1.0                    # the nucleus
    suppressed_ids: tuple[int, ...] = ()  # placeholder ids never sampled ([sampled placeholders])
    share_prompt: bool = True             # each prompt encoded once per group (part 2), else G times
    completions_per_call: int = 0         # the most completions per generate call (0: the whole step at once)
    ignore_eos: bool = False              # exactly max_new_tokens tokens, never stopping (benchmarks)
    blank_picture: dict | None = None     # given to a batch without pictures ([text-only rank])
    zero_stage: int = 0                   # 3: every weight gathered once around generate ([ZeRO-3 generation])
    synced_ranks: bool = False            # ZeRO-3 on several ranks: each keeps stepping until all are done
    compile_decode: bool = False          # decode steps through torch.compile, shapes fixed per bucket ([auto-compile])

    @classmethod
    def for_model(cls, model, tokenizer, **settings) -> Sampling:
        """The settings given, the end ids read from the model's checkpoint and tokenizer."""
        return cls(tokenizer=tokenizer, end_ids=tuple(end_token_ids(model, tokenizer)), **settings)

    @classmethod
    def for_run(cls, args, model, processor, family, device, zero_stage: int, world_size: int) -> Sampling:
        """The run's settings, from train.py's flags."""
        unwrapped = families.unwrap(model)
        return cls.for_model(
            unwrapped, processor.tokenizer, group_size=args.num_generations,
            max_new_tokens=args.max_completion_length, temperature=args.temperature, top_p=args.top_p,
            suppressed_ids=tuple(families.forbidden_token_ids(processor, unwrapped.config)),
            share_prompt=args.share_prompt, completions_per_call=args.generation_batch_size, ignore_eos=args.ignore_eos,
            blank_picture=families.blank_picture_prompt(processor, family, device), zero_stage=zero_stage,
            synced_ranks=zero_stage == 3 and world_size > 1, compile_decode=args.compile_decode)


@dataclass
class Rollout:
    """One optimizer step's rollout on this rank: its prompts and their G completions each, prompt-major
    (completion i belongs to prompt i // G: [group order]). Sampling fills the first six fields, the
    step the others as it scores the completions and compares the policies. N = prompts x G rows."""

    prompt_inputs: dict            # the prompts' inputs, NOT repeated: left-padded [prompts, P] rows and their pictures
    completion_ids: torch.Tensor   # [N, T] sampled tokens, right-padded
    completion_mask: torch.Tensor  # [N, T] 1 up to and including the first end id
    texts: list[str]               # N decoded completions (special tokens removed)
    truncated: torch.Tensor        # [N] bool: stopped at max_new_tokens without an end id
    sampling: Sampling             # how they were drawn (G, T, the blank picture, ...)
    examples: list[dict] = field(default_factory=list)  # the dataset rows (problem, solution, images, ...)
    rewards: torch.Tensor | None = None          # [N] weighted sum of the reward functions
    reward_per_func: torch.Tensor | None = None  # [N, K]
    advantages: torch.Tensor | None = None       # [N]
    old_logps: torch.Tensor | None = None        # [N, T] before the step's first update (num_iterations > 1)
    ref_logps: torch.Tensor | None = None        # [N, T] under the reference model (beta > 0)

    def micro_batches(self, prompts_per_micro_batch: int, model_config):
        """Consecutive runs of prompts, each with its G completions: (prompt inputs, completion rows)
        pairs. A run without pictures gets the masked-out blank picture ([text-only rank])."""
        num_prompts, G = self.prompt_inputs["input_ids"].shape[0], self.sampling.group_size
        for start in range(0, num_prompts, prompts_per_micro_batch):
            stop = min(start + prompts_per_micro_batch, num_prompts)
            yield (families.select_prompts(self.prompt_inputs, start, stop, model_config, self.sampling.blank_picture),
                   slice(start * G, stop * G))

# ================================================================ 1. the definition

@torch.no_grad()
def sample_groups(model, prompt_inputs: dict, sampling: Sampling) -> Rollout:
    """The rollout of a rank's prompts (`prompt_inputs`: left-padded [prompts, P] rows and their
    pictures, not repeated): G completions each, rows i*G .. i*G+G-1 for prompt i, right-padded to the
    longest.

    Drawn from softmax(logits / T) within the top_p nucleus, and from nothing else
    (generation_config), in eval mode with the KV cache ([cache off in train mode]), placeholders
    suppressed. All the completions come from one `generate` call, or from calls of at most
    `sampling.completions_per_call` completions; every rank makes as many calls, and with
    `synced_ranks` keeps stepping until all are done ([ZeRO-3 generation]). `model`: the policy, or
    the DeepSpeed engine around it.
    """
    unwrapped = families.unwrap(model)
    config = generation_config(max_new_tokens=sampling.max_new_tokens, end_ids=list(sampling.end_ids),
                               pad_token_id=sampling.tokenizer.pad_token_id,
                               suppress_token_ids=list(sampling.suppressed_ids), temperature=sampling.temperature,
                               top_p=sampling.top_p, ignore_eos=sampling.ignore_eos,
                               compile_for=unwrapped.device if sampling.compile_decode else None)
    num_prompts = prompt_inputs["input_ids"].shape[0]
    per_call = prompts_per_call(sampling.completions_per_call, sampling.group_size, num_prompts)
    pieces = []
    was_training = unwrapped.training
    unwrapped.eval()
    with gathered_weights(model, sampling.zero_stage), families.adapters_merged(model), \
            forward_hooks_aside(unwrapped, sampling.compile_decode), run_settings_only(unwrapped):
        for start in range(0, num_prompts, per_call):
            inputs = families.select_prompts(prompt_inputs, start, min(start + per_call, num_prompts),
                                             unwrapped.config, sampling.blank_picture)
            pieces.append(_generate_call(unwrapped, inputs, sampling, config, per_call))  # [n, t]
    unwrapped.train(was_training)
    longest = max(piece.shape[1] for piece in pieces)
    padded = [torch.nn.functional.pad(piece, (0, longest - piece.shape[1]), value=sampling.tokenizer.pad_token_id)
              for piece in pieces]
    return to_rollout(prompt_inputs, torch.cat(padded), sampling)  # [N, T]


def _generate_from_repeated_prompt(model, inputs: dict, group_size: int, config, synced_ranks: bool) -> torch.Tensor:
    """The plain path: every prompt repeated G times and prefilled G times. Returns [n*G, t]."""
    rows, P = inputs["input_ids"].shape[0] * group_size, inputs["input_ids"].shape[1]
    cache = None if config.disable_compile else static_cache(model, rows, P + config.max_new_tokens, config)
    with decode_attention(model):
        output = model.generate(**families.repeat_for_group(inputs, group_size, model.config), cache=cache,
                                generation_config=config, synced_gpus=synced_ranks)  # [n*G, P + t]
    return output[:, P:]


def completion_logps(model, prompt_inputs: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                     temperature: float, group_size: int, share_prompt: bool = True, with_entropy: bool = False):
    """log pi(o_t | q, image, o_<t) for every completion token, at the sampling temperature T:

        logp_{i,t} = log softmax(z_{i,t} / T)[o_{i,t}],   z_{i,t} = the model's logits after q, image, o_{i,<t}

    prompt_inputs: B prompts (left-padded [B, P] rows and their pictures, which every forward carries:
    [pictures in every forward]), NOT repeated; completion_ids, completion_mask: [B*G, T], completion
    i belonging to prompt i // G. Returns logps [B*G, T] (and the per-token entropy [B*G, T] when
    asked, without gradient). Positions count real tokens only ([padding positions]).

    share_prompt=False repeats every prompt G times: one forward over [prompt; completion] per row, the
    plain definition. share_prompt=True (part 2) runs each prompt (and its image) through the model once
    and lets its G completions attend to the same keys/values: P + G*T token positions instead of
    G*(P + T), and the gradient of all G completions flows back through the one prompt pass into the
    vision tower. Either way one [B*G, T, V] logits tensor lives through forward and backward
    ([full-vocabulary logits]).
    """
    return (_shared_completion_logps if share_prompt else _plain_completion_logps)(
        model, prompt_inputs, completion_ids, completion_mask, temperature, group_size, with_entropy)


def _plain_completion_logps(model, prompt_inputs: dict, completion_ids, completion_mask, temperature, group_size,
                            with_entropy):
    """The log-probs from one forward over [prompt; completion] per completion row, each prompt
    repeated G times: the definition."""
    prompt_inputs = families.repeat_for_group(prompt_inputs, group_size, families.unwrap(model).config)  # [B*G, P]
    mask = completion_mask.to(prompt_inputs["attention_mask"].dtype)  # [B*G, T]
    inputs = dict(prompt_inputs, input_ids=torch.cat([prompt_inputs["input_ids"], completion_ids], dim=1),  # [B*G, P+T]
                  attention_mask=torch.cat([prompt_inputs["attention_mask"], mask], dim=1))  # [B*G, P+T]
    # Completion tokens are text: their token types are 0 (transformers 5.x needs them per row).
    for key in families.token_type_keys(prompt_inputs):
        inputs[key] = torch.cat([prompt_inputs[key], torch.zeros_like(completion_ids)], dim=1)  # [B*G, P+T]
    # Positions over the real tokens, as generate numbered them (the model's own default would count
    # left padding in some families, and reuse a stale rope_deltas in Qwen's for a text-only batch).
    inputs["position_ids"] = families.prompt_positions(model, inputs)  # [B*G, P+T] or mRoPE's [3, B*G, P+T]
    # The logit at position p predicts token p + 1: logits for the T positions before each completion token.
    P, T = prompt_inputs["input_ids"].shape[1], completion_ids.shape[1]
    logits = model(**inputs, logits_to_keep=torch.arange(P - 1, P + T - 1, device=completion_ids.device),
                   use_cache=False).logits  # [B*G, T, V]
    entropy = token_entropy(logits, temperature) if with_entropy else None  # [B*G, T]
    logps = selective_log_softmax(logits, completion_ids, temperature, overwrite_logits=True)  # [B*G, T]
    return (logps, entropy) if with_entropy else logps


@torch.no_grad()
def rollout_logps(model, rollout: Rollout, prompts_per_micro_batch: int) -> torch.Tensor:
    """[N, T] log-probs of the rollout's completions under `model` (the reference, or the policy
    before its update), at the rollout's temperature, micro-batch by micro-batch as the update walks them."""
    sampling = rollout.sampling
    return torch.cat([
        completion_logps(model, inputs, rollout.completion_ids[rows], rollout.completion_mask[rows],  # [b*G, T]
                         sampling.temperature, sampling.group_size, sampling.share_prompt)
        for inputs, rows in rollout.micro_batches(prompts_per_micro_batch, families.unwrap(model).config)])  # [N, T]

# ================================================================ 2. the shared prompt
# The same samples and log-probs as part 1, with each prompt and its pictures encoded once per group
# instead of G times. What makes it exact: the prompt's keys/values are the same for its G rows, the
# positions continue from each row's real tokens, and Qwen's decode positions come from deltas set
# for the repeated rows ([stale rope deltas]).

def _generate_from_shared_prompt(model, inputs: dict, group_size: int, config, synced_ranks: bool) -> torch.Tensor:
    """Prefill each prompt once, copy its cache to its G rows, and let `generate` continue. Returns [n*G, t].

    The prefill stops one token short of the prompt: `generate` must have at least one uncached
    token to start from (given a fully cached prompt it would prefill the whole prompt again on top
    of the cache). The prefill's positions count each left-padded row's real tokens, as generate
    numbers the tokens after it. Qwen-VL's decode positions come from `model.rope_deltas`: it is set
    to the prompts' deltas repeated G times right before `generate` ([stale rope deltas]).
    """
    from transformers import DynamicCache

    G, text_config = group_size, model.config.get_text_config()
    prefill = DynamicCache(config=text_config)
    text_keys = ["input_ids", "attention_mask", *families.token_type_keys(inputs)]
    prefix = {key: (value[:, :-1] if key in text_keys else value) for key, value in inputs.items()}  # [n, P-1]
    positions = families.prompt_positions(model, prefix)  # [n, P-1] or mRoPE's [3, n, P-1]
    model(**prefix, position_ids=positions, cache=prefill, use_cache=True, logits_to_keep=1)
    if any(layer.is_sliding for layer in prefill.layers):  # windowed layers keep only their window: as they are
        prefill.batch_repeat_interleave(G)
        cache = prefill
    else:  # decode into preallocated keys/values: a growing cache copies all of itself at every step
        cache = static_cache(model, prefix["input_ids"].shape[0] * G, inputs["input_ids"].shape[1] + config.max_new_tokens,
                             config)
        for layer, prompt_layer in zip(cache.layers, prefill.layers):  # keys/values [n, H, P-1, D] -> [n*G, H, P-1, D]
            layer.update(prompt_layer.keys.repeat_interleave(G, dim=0), prompt_layer.values.repeat_interleave(G, dim=0))
    if positions.dim() == 3:  # mRoPE: decode position = the token's index among real tokens + its row's delta
        deltas = positions[:, :, -1].amax(0) + 1 - prefix["attention_mask"].sum(-1)  # [n]
        model.model.rope_deltas = deltas.repeat_interleave(G)[:, None]  # [n*G, 1]
    # Token types describe the cached prompt only: the one uncached prompt token and all that follow are
    # text, and a family that builds its mask from them (Gemma 3) must not see prompt-length ones again.
    repeated = {key: inputs[key].repeat_interleave(G, dim=0) for key in ("input_ids", "attention_mask")}  # [n*G, P]
    with decode_attention(model):
        output = model.generate(**repeated, cache=cache, generation_config=config, synced_gpus=synced_ranks)
    return output[:, inputs["input_ids"].shape[1]:]  # [n*G, t]


def _shared_completion_logps(model, prompt_inputs: dict, completion_ids, completion_mask, temperature, group_size,
                             with_entropy):
    """Each prompt forwarded once, its keys/values read by its G completions (see completion_logps).
    The completion pass's [B*G, T-1, V] logits are the one full-vocabulary tensor (its backward writes
    the gradient into it), beside the prompt pass's [B, 1, V]."""
    G, T = group_size, completion_ids.shape[1]
    B = prompt_inputs["input_ids"].shape[0]
    config = families.unwrap(model).config.get_text_config()
    prompt_cache = Cache(layers=[PromptKV() for _ in range(config.num_hidden_layers)])
    shared_cache = Cache(layers=[SharedPromptKV(layer, G) for layer in prompt_cache.layers])
    positions = families.prompt_positions(model, prompt_inputs)  # [B, P] or mRoPE's [3, B, P]
    # 1. The prompt, once per prompt: fills the cache; its last logit predicts every completion's first
    # token, read by its G completions through a view (expand), not a copy.
    first_logits = model(**prompt_inputs, position_ids=positions, cache=prompt_cache, use_cache=True,
                         logits_to_keep=1).logits  # [B, 1, V]
    first_logits = first_logits.expand(B, G, first_logits.shape[-1])  # [B, G, V]
    first_logps = selective_log_softmax(first_logits, completion_ids[:, 0].view(B, G), temperature).view(B * G, 1)
    # 2. The completions on top of the shared prompt. The attention mask is each prompt's padding
    # (per row), then the completion's. Token t's logit predicts token t + 1: logits are made for
    # positions 0 .. T-2 only. The last token is still fed, so that this pass never has zero length
    # (under ZeRO-3 every rank must run the same forwards, whatever its completions' lengths).
    rest_logits = model(
        input_ids=completion_ids,  # [B*G, T]
        attention_mask=torch.cat([prompt_inputs["attention_mask"].repeat_interleave(G, dim=0),
                                  completion_mask.to(prompt_inputs["attention_mask"].dtype)], dim=1),  # [B*G, P+T]
        position_ids=continuation_positions(positions, G, T), cache=shared_cache, use_cache=True,
        logits_to_keep=torch.arange(T - 1, device=completion_ids.device),
    ).logits  # [B*G, T-1, V]
    entropy = torch.cat([token_entropy(first_logits, temperature).view(B * G, 1),
                         token_entropy(rest_logits, temperature)],
                        dim=1) if with_entropy else None  # [B*G, T], before the backward overwrites rest_logits
    rest_logps = selective_log_softmax(rest_logits, completion_ids[:, 1:], temperature,
                                       overwrite_logits=True)  # [B*G, T-1]
    logps = torch.cat([first_logps, rest_logps], dim=1)  # [B*G, T]
    return (logps, entropy) if with_entropy else logps


def continuation_positions(prompt_position_ids: torch.Tensor, group_size: int, length: int) -> torch.Tensor:
    """Positions of the `length` tokens after each prompt, for its G rows: [3, B*G, length] (mRoPE)
    or [B*G, length]. Completions are text, so every axis counts on from the prompt's largest position
    + 1; left padding puts every prompt's last real token in the last column."""
    last = prompt_position_ids[..., -1]  # [3, B] or [B]
    if last.dim() == 2:
        last = last.amax(0)  # [B]
    steps = torch.arange(1, length + 1, device=last.device)  # [length]
    positions = (last[:, None] + steps[None, :]).repeat_interleave(group_size, dim=0)  # [B*G, length]
    return positions[None].expand(3, -1, -1) if prompt_position_ids.dim() == 3 else positions


class PromptKV(CacheLayerMixin):
    """The prompt pass's cache for one decoder layer: it keeps the prompt's keys/values [B, H, P, D].

    It overwrites rather than appends: gradient checkpointing runs the layer's forward again during
    the backward, and that replay must not store a second copy. The prompt pass sees no past.
    """

    is_sliding = False

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys, self.values, self.is_initialized = key_states, value_states, True
        return key_states, value_states

    def get_seq_length(self) -> int:
        return 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_max_length(self) -> int:
        return -1


class SharedPromptKV(PromptKV):
    """The completion pass's cache for one decoder layer: each of the B*G completions attends to its
    prompt's keys/values (prompt i's repeated for rows i*G .. i*G+G-1) followed by its own. It reads
    and never stores, so a replay under gradient checkpointing sees exactly what the first run saw,
    and the gradient reaches the prompt pass through the repeated tensors."""

    def __init__(self, prompt: PromptKV, group_size: int):
        super().__init__()
        self.prompt, self.group_size = prompt, group_size

    def update(self, key_states, value_states, *args, **kwargs):
        G = self.group_size
        return (torch.cat([self.prompt.keys.repeat_interleave(G, dim=0), key_states], dim=-2),  # [B*G, H, P+T, D]
                torch.cat([self.prompt.values.repeat_interleave(G, dim=0), value_states], dim=-2))

    def get_seq_length(self) -> int:
        return self.prompt.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


def allow_checkpointing_with_shared_prompt(model) -> None:
    """Gradient checkpointing drops any cache passed to a checkpointed decoder layer, which would
    silently run the completions without their prompt ([checkpointing drops the cache]). PromptKV and
    SharedPromptKV are safe to replay (the prompt pass overwrites, the completion pass only reads), so
    the decoder layers may keep it."""
    for module in families.unwrap(model).modules():
        if isinstance(module, GradientCheckpointingLayer):
            module._can_checkpoint_with_cache = True

# ================================================================ 3. generate's surroundings

def end_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion ([end ids]): the checkpoint's generation_config.eos_token_id (one
    id or a list: Qwen's <|im_end|> and <|endoftext|>, Gemma 3's <end_of_turn> and <eos>) and the
    tokenizer's eos, in that order, each once."""
    listed = families.unwrap(model).generation_config.eos_token_id
    listed = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    ids = [*listed, tokenizer.convert_tokens_to_ids(tokenizer.eos_token)]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def generation_config(*, max_new_tokens: int, end_ids: list[int], pad_token_id: int, suppress_token_ids: list[int],
                      temperature: float, top_p: float = 1.0, ignore_eos: bool = False, compile_for=None):
    """The whole of what `generate` is told, from the run's flags alone: sampling from
    softmax(logits / temperature) restricted to the top_p nucleus (temperature 0: greedy, the argmax),
    with placeholders suppressed, stopping at any end id. Every other field that changes what is drawn
    (top_k, repetition_penalty, typical_p, min_p, no_repeat_ngram_size, bad_words_ids, ...) is left
    unset, and `run_settings_only` keeps the checkpoint's values from filling them; top_k is set to 0
    because transformers' own default for it is 50. The decode step is compiled only when asked
    (`compile_for`: the model's device, --compile_decode), never by transformers' own choice ([auto-compile])."""
    from transformers import GenerationConfig

    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 \
        else dict(do_sample=False)
    compiling = dict(disable_compile=True) if compile_for is None else \
        dict(disable_compile=False, compile_config=decode_compile_config(compile_for))
    return GenerationConfig(
        **sampling, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens if ignore_eos else None,
        use_cache=True, suppress_tokens=suppress_token_ids or None, eos_token_id=end_ids, pad_token_id=pad_token_id,
        **compiling)


def decode_compile_config(device):
    """How the decode step is compiled ([auto-compile]): one graph (a graph break is an error), static
    shapes (static_cache keeps them), CUDA graphs on a GPU (a decode step is bound by launches) and
    inductor's C++ kernels on the CPU, which transformers' own criteria skip."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead" if device.type == "cuda" else "default")
    config._compile_all_devices = True
    return config


def static_cache(model, rows: int, length: int, config):
    """The keys/values `generate` decodes into, `rows` rows of up to `length` tokens: new each call when
    eager; compiled ([auto-compile]), `length` rounded up to a power of two (one compile per bucket) and
    one cache per shape kept on the model, reset, so that CUDA graphs replay on the same memory."""
    from transformers import StaticCache

    if config.disable_compile:
        return StaticCache(config=model.config.get_text_config(), max_cache_len=length)
    shape = (rows, 1 << (length - 1).bit_length())
    kept_shape, cache = getattr(model, "_decode_cache", (None, None))
    if kept_shape == shape:
        cache.reset()
    else:
        cache = StaticCache(config=model.config.get_text_config(), max_cache_len=shape[1])
        model._decode_cache = (shape, cache)
    return cache


def _generate_call(model, inputs: dict, sampling: Sampling, config, prompts: int) -> torch.Tensor:
    """One generate call on n prompts: [n*G, t]. Compiled, it is padded to `prompts` prompts (copies of
    the last, their rows dropped after): every call of a run has the same rows. A compile that fails
    leaves the run eager from there on, this call made again from the same random state, said once."""
    generate = _generate_from_shared_prompt if sampling.share_prompt else _generate_from_repeated_prompt
    G, n = sampling.group_size, inputs["input_ids"].shape[0]
    if not config.disable_compile and not getattr(model, "_decode_compile_failed", False):
        cuda = [model.device] if model.device.type == "cuda" else []
        random_state = torch.get_rng_state(), [torch.cuda.get_rng_state(device) for device in cuda]
        try:
            padded = families.pad_prompts(inputs, prompts, model.config)
            return generate(model, padded, G, config, sampling.synced_ranks)[:n * G]
        except (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit) as error:
            cause = getattr(error, "inner_exception", None) or error  # the backend's own error, if it raised one
            print(f"[compile_decode] compiling the decode step failed ({type(cause).__name__}: "
                  f"{(str(cause).strip() or '-').splitlines()[0]}); this run decodes eagerly from here on", flush=True)
            model._decode_compile_failed, model._decode_cache = True, (None, None)
            torch.set_rng_state(random_state[0])
            for device, state in zip(cuda, random_state[1]):
                torch.cuda.set_rng_state(state, device)
    eager = copy.copy(config)
    eager.disable_compile, eager.compile_config = True, None
    return generate(model, inputs, G, eager, sampling.synced_ranks)


@contextlib.contextmanager
def forward_hooks_aside(model, compiling: bool):
    """While a compiled decode runs, the hooks DeepSpeed put on the model's forward are set aside and put
    back after as they were ([auto-compile]): the engine's timer (it changes the graph every step, then
    syncs and reads the clock) and ZeRO-3's start of forward cannot be compiled. `model`: unwrapped."""
    if not compiling:
        yield
        return
    names = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
             "_forward_hooks_always_called")
    kept = {name: getattr(model, name).copy() for name in names}
    for name in names:
        getattr(model, name).clear()
    try:
        yield
    finally:
        for name in names:
            getattr(model, name).update(kept[name])


@contextlib.contextmanager
def run_settings_only(model):
    """Within the block the model's generation_config holds its token ids and nothing else.

    transformers (`_prepare_generation_config`) fills every field of the config `generate` is given
    that is unset from the model's generation_config, i.e. from the checkpoint's
    generation_config.json: a published checkpoint's top_k 1 or repetition_penalty 1.05 would shape
    the rollouts ([checkpoint sampling defaults]). Setting the checkpoint's config aside for the call
    leaves only the run's flags and transformers' neutral defaults."""
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
    """Decode on sdpa when the model runs flash-attention-2 ([unpadding syncs]); the training forwards
    keep flash-attention-2."""
    if model.config._attn_implementation != "flash_attention_2":
        yield
        return
    model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        model.set_attn_implementation("flash_attention_2")


@contextlib.contextmanager
def gathered_weights(model, zero_stage: int):
    """Under ZeRO-3, every weight gathered on every rank once for the block, and DeepSpeed's per-module
    hooks off while it lasts ([ZeRO-3 generation]): they fetch a module's weights before its forward
    and release them after it, GatheredParameters or not, so generate would gather them again. They
    are registered again at the block's end, as TRL does (`unwrap_model_for_generation`), with the
    same module ids, keeping DeepSpeed's trace of them ([ZeRO-3 prefetch]: registering them again on the
    root discards it). `model` is the DeepSpeed engine (or a plain model, which needs nothing)."""
    if zero_stage != 3:
        yield
        return
    import deepspeed

    offload = getattr(getattr(model, "optimizer", None), "parameter_offload", None)
    unwrapped = families.unwrap(model)
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
            coordinator, offload.param_coordinator = offload.param_coordinator, None  # unseen: its trace is kept
            offload._register_deepspeed_module(offload.module, count=[0])
            offload.param_coordinator = coordinator


def prompts_per_call(completions_per_call: int, group_size: int, num_prompts: int) -> int:
    """Prompts per generate call: whole groups of at most completions_per_call completions (0: all)."""
    return max(1, completions_per_call // group_size) if completions_per_call > 0 else num_prompts


def completion_mask_through_eos(completion_ids: torch.Tensor, end_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [N, T] that is 1 up to and including each row's first end id (any of end_ids), and which
    rows [N] had none."""
    is_eos = torch.isin(completion_ids, torch.tensor(list(end_ids), device=completion_ids.device))  # [N, T]
    has_eos = is_eos.any(dim=1)  # [N]
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), completion_ids.shape[1] - 1)  # [N]
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)  # [T]
    return (positions[None, :] <= first_eos[:, None]).long(), ~has_eos


def to_rollout(prompt_inputs: dict, completion_ids: torch.Tensor, sampling: Sampling) -> Rollout:
    """Generated rows [N, T] cut after their first end id: mask, padding, texts, truncation flags."""
    mask, truncated = completion_mask_through_eos(completion_ids, sampling.end_ids)  # [N, T], [N]
    completion_ids = completion_ids.masked_fill(mask == 0, sampling.tokenizer.pad_token_id)  # [N, T]
    texts = sampling.tokenizer.batch_decode(completion_ids.cpu(), skip_special_tokens=True)
    return Rollout(prompt_inputs, completion_ids, mask, texts, truncated.cpu(), sampling)
