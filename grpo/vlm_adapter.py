"""Everything specific to a model family, in one place: Qwen2-VL and Qwen2.5-VL.

- load the processor (with the pixel limits) and the model;
- turn conversations and images into model inputs, and repeat each prompt G times (pixel_values
  split per image by image_grid_thw, trap 2);
- the tokens the sampler must never emit (image placeholders, trap 5);
- completion-token log-probs from a forward that carries the images (trap 1), with the 3-D mRoPE
  positions computed from the real tokens (trap 10), and only completion logits kept (trap 11).

A new family is a new set of these few functions, not a branch in the training loop.
"""

from __future__ import annotations

import importlib.util

import torch

from .loss import selective_log_softmax

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


def completion_logps(model, prompt_inputs: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                     temperature: float, with_entropy: bool = False):
    """log pi(o_t | q, image, o_<t) for every completion token, at the sampling temperature.

    prompt_inputs: as from repeat_for_group, [N, P] rows; completion_ids, completion_mask: [N, T].
    Returns logps [N, T] (and the per-token entropy [N, T] when asked, without gradient).
    """
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
    # No float copy of the whole [N, T, V] block up front: selective_log_softmax upcasts one row at a
    # time (with gradients, bf16 rows' float32 log-softmax is still kept for backward).
    logits = logits[:, :-1, :] / temperature
    logps = selective_log_softmax(logits, completion_ids)
    if not with_entropy:
        return logps
    with torch.no_grad():
        entropy = torch.stack([_entropy(row.float()) for row in logits])
    return logps, entropy


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(z) - sum_v softmax(z)_v z_v, per position: [T, V] -> [T]."""
    return torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)
