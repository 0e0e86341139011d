"""A tiny random Aria (rhymes-ai/Aria: a mixture-of-experts text model under an Idefics3 vision tower).

Like demo.py's tiny Qwen2-VL, it is made in code from transformers' own classes and saved with
`save_pretrained`, so it loads through the same path as the real checkpoint, offline.
"""

from __future__ import annotations

import os

# Aria's chat format (the real template's tokens): every role, system included, is an
# <|im_start|>role ... <|im_end|> turn; an image item is <fim_prefix><|img|><fim_suffix>, and the
# processor repeats <|img|> once per projector query (4 here).
ARIA_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}<fim_prefix><|img|><fim_suffix>{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ARIA_SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>", "<fim_prefix>", "<|img|>", "<fim_suffix>"]
IMAGE_TOKENS_PER_CROP = 4


def build_aria_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer with Aria's special tokens; eos is the end of an assistant turn."""
    from transformers import PreTrainedTokenizerFast

    from demo import byte_level_bpe

    bpe = byte_level_bpe(ARIA_SPECIAL_TOKENS, vocab_size)
    # AriaProcessor reads `tokenizer.image_token(_id)`: a named extra special token, saved with it.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<|img|>"},
    )
    tokenizer.add_tokens(["<think>", "</think>", "<answer>", "</answer>"])
    tokenizer.chat_template = ARIA_CHAT_TEMPLATE
    return tokenizer


def save_tiny_aria(folder: str, seed: int = 0) -> str:
    """A tiny random Aria (model_type aria; rhymes-ai/Aria, a mixture-of-experts text model) with its real
    processor class, saved like a real checkpoint; returns folder.

    Text: 2 layers of width 64, each a mixture of 4 routed experts (top-2) plus 1 shared expert. Vision:
    a 1-layer Idefics3 tower of width 32. AriaImageProcessor only accepts square crops of 490 or 980
    pixels, so small images are scaled up and padded to one of those; a 70-pixel patch keeps the
    tower's sequence short (7x7 patches at 490, 14x14 at 980), and the projector's learned queries turn
    either into 4 image tokens per image. Note: AriaProcessor's class default `max_image_size=980`
    overrides the image processor's 490 unless a call passes `max_image_size=490`; both work here.
    """
    import torch
    from transformers import AriaConfig, AriaForConditionalGeneration, AriaImageProcessor, AriaProcessor

    tokenizer = build_aria_tokenizer()
    token_id = tokenizer.convert_tokens_to_ids
    config = AriaConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1,
            bos_token_id=token_id("<|im_start|>"), eos_token_id=token_id("<|im_end|>"),
            pad_token_id=token_id("<pad>"),
        ),
        vision_config=dict(model_type="idefics3_vision", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=980, patch_size=70),
        # vision patches per crop -> image tokens per crop (the real model: 1225 -> 128, 4900 -> 256);
        # the processor's size_conversion below must give the same count per crop side.
        projector_patch_to_query_dict={7 * 7: IMAGE_TOKENS_PER_CROP, 14 * 14: IMAGE_TOKENS_PER_CROP},
        image_token_index=token_id("<|img|>"),
    )
    torch.manual_seed(seed)
    model = AriaForConditionalGeneration(config)
    model.generation_config.eos_token_id = token_id("<|im_end|>")
    model.generation_config.pad_token_id = token_id("<pad>")
    model.generation_config.bos_token_id = token_id("<|im_start|>")
    # split_image=False: one crop per image (splitting makes at least 2 crops of 490 even for tiny images).
    image_processor = AriaImageProcessor(max_image_size=490, min_image_size=140, split_image=False)
    processor = AriaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=ARIA_CHAT_TEMPLATE,
                              size_conversion={490: IMAGE_TOKENS_PER_CROP, 980: IMAGE_TOKENS_PER_CROP})
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
