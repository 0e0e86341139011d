"""A tiny random LLaVA-OneVision made here, saved like llava-hf/llava-onevision-qwen2-0.5b-ov-hf.

The hub is out of reach, so the family is built in code as demo.py builds Qwen2-VL: transformers'
own config classes (a SigLIP vision tower, a Qwen2 text model), a byte-level BPE tokenizer with the
checkpoint's special tokens, and the real LlavaOnevisionProcessor, image and video processors.
"""

from __future__ import annotations

import os

# The checkpoint's chat template (ChatML; every image of a turn comes first, as "<image>\n", then its
# text), extended to string contents so that {"role": "system", "content": "SYSTEM"} keeps its text:
# the real template iterates a string's characters and drops it. The processor later repeats
# <image> once per image feature (anyres tiles, their newlines and the base tile).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}<image>\n{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'video') %}<video>\n{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ item['text'] }}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
# One SigLIP tile is 28x28 pixels = 2x2 patches of 14, so 4 image tokens per tile. A single image is
# cut into at most 2x2 tiles (the pinpoints) plus a 28x28 base view: <= 4 + 16 + 4 newlines tokens.
TILE, PATCH = 28, 14
PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]


def build_tokenizer(vocab_size: int = 400):
    """Byte-level BPE with Qwen2's turn markers and LLaVA's <image>/<video>; like Qwen2, no BOS."""
    from transformers import PreTrainedTokenizerFast

    from demo import byte_level_bpe

    bpe = byte_level_bpe(SPECIAL_TOKENS, vocab_size)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=SPECIAL_TOKENS[1:])
    tokenizer.add_tokens(["<think>", "</think>", "<answer>", "</answer>"])  # ordinary, decodable tokens
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_llava_onevision(folder: str, seed: int = 0) -> str:
    """A tiny random LLaVA-OneVision (model_type llava_onevision; e.g. llava-hf/llava-onevision-qwen2-0.5b-ov-hf)
    with its real processor class, saved like a real checkpoint; returns folder.

    Text: Qwen2, 2 layers of width 64. Vision: SigLIP, 1 layer of width 32 on 28x28 tiles. A 56x56
    image is 24 <image> tokens alone in its prompt, 5 (base view + newline) in a multi-image prompt.
    """
    import torch
    from transformers import (
        LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor,
    )

    tokenizer = build_tokenizer()
    token_id = tokenizer.convert_tokens_to_ids
    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=TILE, patch_size=PATCH,
                           vision_use_head=False),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=token_id("<|endoftext|>"), eos_token_id=token_id("<|im_end|>"),
                         pad_token_id=token_id("<|endoftext|>")),
        image_token_index=token_id("<image>"), video_token_index=token_id("<video>"),
        image_grid_pinpoints=PINPOINTS, vision_feature_select_strategy="full", vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9", tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.generation_config.eos_token_id = token_id("<|im_end|>")
    model.generation_config.pad_token_id = token_id("<|endoftext|>")
    size = {"height": TILE, "width": TILE}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=PINPOINTS),
        video_processor=LlavaOnevisionVideoProcessor(size=size), tokenizer=tokenizer,
        num_image_tokens=(TILE // PATCH) ** 2,  # per tile; SigLIP has no CLS, hence strategy "full"
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", chat_template=CHAT_TEMPLATE,
    )
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
