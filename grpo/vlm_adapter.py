"""Everything specific to a model family, in one place: Qwen2-VL and Qwen2.5-VL.

- load the processor (with the pixel limits) and the model;
- turn conversations and images into model inputs, and repeat each prompt G times (pixel_values
  split per image by image_grid_thw, trap 2);
- the tokens the sampler must never emit (image placeholders, trap 5);
- completion-token log-probs from a forward that carries the images (trap 1), with the 3-D mRoPE
  positions computed from the real tokens (trap 10), and only completion logits kept (trap 11);
- the shared prompt: each prompt (and image) forwarded once, its keys/values read by its G
  completions (PromptKV, SharedPromptKV), gradients included.

A new family is a new set of these few functions, not a branch in the training loop.
"""

from __future__ import annotations

import importlib.util

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_layers import GradientCheckpointingLayer

from .loss import selective_log_softmax, token_entropy

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
# Vision placeholders: sampling one breaks the next forward ("Image features and image tokens do
# not match"), so they are suppressed during generation.
PLACEHOLDER_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def check_model_type(model_name_or_path: str) -> None:
    """Read only the config, so an unsupported family fails before any weights load."""
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(model_name_or_path).model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"--model_name_or_path {model_name_or_path!r} is a {model_type!r} model; "
                         f"this trainer supports {list(SUPPORTED_MODEL_TYPES)}.")


def load_processor(model_name_or_path: str, min_pixels: int, max_pixels: int):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_name_or_path)
    processor.image_processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    processor.tokenizer.padding_side = "left"  # prompts are left-padded so generation appends on the right
    return processor


def default_attn_implementation() -> str:
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(model_name_or_path: str, dtype: torch.dtype, attn_implementation: str | None = None):
    """The model, in `dtype`. Under ZeRO-3 call this while an HfDeepSpeedConfig is alive, so that
    from_pretrained partitions the weights as it loads them."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(
        model_name_or_path, dtype=dtype, attn_implementation=attn_implementation or default_attn_implementation())


def forbidden_token_ids(processor) -> list[int]:
    vocab = processor.tokenizer.get_vocab()
    return [vocab[token] for token in PLACEHOLDER_TOKENS if token in vocab]


def count_prompt_tokens(processor, conversation: list[dict], image) -> int:
    """Prompt length once the image placeholder is expanded, without running the image processor."""
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    text_tokens = len(processor.tokenizer(text)["input_ids"])
    patches = processor.image_processor.get_number_of_image_patches(image.height, image.width, {})
    return text_tokens - 1 + patches // processor.image_processor.merge_size ** 2


def build_inputs(processor, conversations: list[list[dict]], images: list) -> dict:
    """Left-padded prompt inputs: input_ids, attention_mask, mm_token_type_ids [B, P];
    pixel_values [sum of patches, D]; image_grid_thw [B, 3]. One image per prompt."""
    texts = [processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    return dict(processor(text=texts, images=images, return_tensors="pt", padding=True))


def repeat_for_group(inputs: dict, group_size: int) -> dict:
    """Each prompt's row G times in a row (prompt i -> rows i*G .. i*G+G-1), images included.

    pixel_values stacks every image's patches; image i owns image_grid_thw[i].prod() of them. The
    patches are split per image and each block repeated G times, in the same order as the rows.
    """
    repeated = {}
    for key, value in inputs.items():
        if key == "pixel_values":
            per_image = value.split(inputs["image_grid_thw"].prod(-1).tolist())
            repeated[key] = torch.cat([block for block in per_image for _ in range(group_size)])
        else:
            repeated[key] = value.repeat_interleave(group_size, dim=0)
    return repeated


def select_prompts(inputs: dict, start: int, stop: int) -> dict:
    """Prompts start .. stop-1 of a batch (their images too), without the padding columns that only
    longer prompts of the batch needed (prompts are left-padded, so those are leading columns)."""
    patches = inputs["image_grid_thw"].prod(-1)
    first_patch, last_patch = int(patches[:start].sum()), int(patches[:stop].sum())
    mask = inputs["attention_mask"][start:stop]
    first_column = int((mask.sum(0) > 0).long().argmax())  # the first column any selected prompt uses
    selected = {}
    for key, value in inputs.items():
        if key == "pixel_values":
            selected[key] = value[first_patch:last_patch]
        elif key == "image_grid_thw":
            selected[key] = value[start:stop]
        else:
            selected[key] = value[start:stop, first_column:]
    return selected


def unwrap(model):
    """The transformers model inside a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


def prompt_positions(model, prompt_inputs: dict) -> torch.Tensor:
    """Qwen2-VL's 3-D mRoPE positions [3, B, P] of left-padded prompts, counting real tokens only
    (padding columns hold 0): text advances all three axes by one per token, an image's tokens
    take (t, h, w) grid positions and the text after it continues from the largest one + 1."""
    positions, _ = unwrap(model).model.get_rope_index(
        prompt_inputs["input_ids"], mm_token_type_ids=prompt_inputs["mm_token_type_ids"],
        image_grid_thw=prompt_inputs["image_grid_thw"], attention_mask=prompt_inputs["attention_mask"])
    return positions


def continuation_positions(prompt_position_ids: torch.Tensor, group_size: int, length: int) -> torch.Tensor:
    """Positions [3, B*G, length] of the tokens after each prompt: the completion is text, so all three
    mRoPE axes count on from the prompt's largest position + 1. Left padding puts every prompt's last
    real token in the last column."""
    last = prompt_position_ids[:, :, -1].amax(0)  # [B]
    steps = torch.arange(1, length + 1, device=last.device)
    positions = (last[:, None] + steps[None, :]).repeat_interleave(group_size, dim=0)
    return positions[None].expand(3, -1, -1)


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
        return (torch.cat([self.prompt.keys.repeat_interleave(G, dim=0), key_states], dim=-2),
                torch.cat([self.prompt.values.repeat_interleave(G, dim=0), value_states], dim=-2))

    def get_seq_length(self) -> int:
        return self.prompt.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


def completion_logps(model, prompt_inputs: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                     temperature: float, group_size: int, share_prompt: bool = True, with_entropy: bool = False):
    """log pi(o_t | q, image, o_<t) for every completion token, at the sampling temperature.

    prompt_inputs: B prompts (left-padded [B, P] rows and their images), NOT repeated; completion_ids,
    completion_mask: [B*G, T], completion i belonging to prompt i // G. Returns logps [B*G, T] (and
    the per-token entropy [B*G, T] when asked, without gradient).

    share_prompt=True runs each prompt (and its image) through the model once and lets its G
    completions attend to the same keys/values: P + G*T token positions instead of G*(P + T), and
    the gradient of all G completions flows back through the one prompt pass into the vision tower.
    share_prompt=False repeats every prompt G times: the plain path, kept to check the shared one.
    """
    if not share_prompt:
        return _plain_completion_logps(model, repeat_for_group(prompt_inputs, group_size), completion_ids,
                                       completion_mask, temperature, with_entropy)
    G, T = group_size, completion_ids.shape[1]
    config = unwrap(model).config.get_text_config()
    prompt_cache = Cache(layers=[PromptKV() for _ in range(config.num_hidden_layers)])
    shared_cache = Cache(layers=[SharedPromptKV(layer, G) for layer in prompt_cache.layers])
    positions = prompt_positions(model, prompt_inputs)
    # 1. The prompt, once per prompt: fills the cache; its last logit predicts every completion's first token.
    first_logits = model(**prompt_inputs, position_ids=positions, cache=prompt_cache, use_cache=True,
                         logits_to_keep=1).logits  # [B, 1, V]
    # 2. The completions on top of the shared prompt. The attention mask is each prompt's padding
    # (per row), then the completion's. Token t's logit predicts token t + 1, so the last token's is
    # not needed; it is still fed, so that this pass never has zero length (under ZeRO-3 every rank
    # must run the same forwards, whatever its completions' lengths).
    rest_logits = model(
        input_ids=completion_ids,
        attention_mask=torch.cat([prompt_inputs["attention_mask"].repeat_interleave(G, dim=0),
                                  completion_mask.to(prompt_inputs["attention_mask"].dtype)], dim=1),
        position_ids=continuation_positions(positions, G, T), cache=shared_cache, use_cache=True,
        logits_to_keep=T,
    ).logits  # [B*G, T, V]
    logits = torch.cat([first_logits.repeat_interleave(G, dim=0), rest_logits[:, :-1]], dim=1) / temperature
    logps = selective_log_softmax(logits, completion_ids)
    return (logps, token_entropy(logits)) if with_entropy else logps


def _plain_completion_logps(model, prompt_inputs: dict, completion_ids, completion_mask, temperature, with_entropy):
    """The same log-probs from one forward over [prompt; completion] per completion row (prompt_inputs
    already repeated G times): the plain path."""
    input_ids = torch.cat([prompt_inputs["input_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([prompt_inputs["attention_mask"], completion_mask.to(prompt_inputs["attention_mask"].dtype)], dim=1)
    # Completion tokens are text: their multimodal type is 0 (transformers 5.x needs this per row).
    mm_token_type_ids = torch.cat([prompt_inputs["mm_token_type_ids"], torch.zeros_like(completion_ids)], dim=1)
    num_completion = completion_ids.shape[1]
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids,
        pixel_values=prompt_inputs["pixel_values"], image_grid_thw=prompt_inputs["image_grid_thw"],
        logits_to_keep=num_completion + 1, use_cache=False,
    ).logits
    # The logit at position p predicts token p + 1: drop the last, keep the T that predict completions.
    logits = logits[:, :-1, :] / temperature
    logps = selective_log_softmax(logits, completion_ids)
    if not with_entropy:
        return logps
    return logps, token_entropy(logits)


def allow_checkpointing_with_shared_prompt(model) -> None:
    """Gradient checkpointing drops any cache passed to a checkpointed decoder layer, which would
    silently run the completions without their prompt. PromptKV and SharedPromptKV are safe to replay (the
    prompt pass overwrites, the completion pass only reads), so the decoder layers may keep it."""
    for module in unwrap(model).modules():
        if isinstance(module, GradientCheckpointingLayer):
            module._can_checkpoint_with_cache = True
