"""A tiny random Gemma 3 made here, saved like google/gemma-3-4b-it (no hub download).

Gemma 3 differs from Qwen2-VL where an adapter notices: every image is resized to one fixed square
and becomes `mm_tokens_per_image` soft tokens (no grid, no image_sizes); the forward takes
token_type_ids (1 on image soft tokens), which make each image's tokens attend to one another both
ways; positions are plain 1-D; and text layers alternate sliding-window and full attention.
"""

from __future__ import annotations

import os

# Gemma 3's own chat template (google/gemma-3-4b-it): no system role, so a system message becomes
# the first user turn's prefix; the assistant's role is "model"; an image item is <start_of_image>,
# which the processor expands to "\n\n<start_of_image>" + <image_soft_token> x N + "<end_of_image>\n\n".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# Gemma's specials in Gemma's order (pad 0, eos 1, bos 2, unk 3), the image soft token last.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                  "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
IMAGE_SIZE = 56  # every image is resized to 56x56: 4x4 patches of 14, pooled 2x2 -> 4 soft tokens
MM_TOKENS_PER_IMAGE = 4


def build_gemma3_tokenizer(vocab_size: int = 400):
    """Byte-level BPE (the demo's corpus) with Gemma 3's special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    from demo import byte_level_bpe

    bpe = byte_level_bpe(SPECIAL_TOKENS, vocab_size, extra_text=("model\n\n user\n\n",))
    # The processor finds the image tokens by these names (boi_token, eoi_token, image_token), as in
    # the real tokenizer_config.json. The real one also adds <bos> itself; this one leaves it to the template.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<bos>", eos_token="<end_of_turn>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
    )
    tokenizer.add_tokens(["<think>", "</think>", "<answer>", "</answer>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_gemma3(folder: str, seed: int = 0) -> str:
    """A tiny random Gemma 3 (model_type gemma3; e.g. google/gemma-3-4b-it) with its real processor class, saved like a real checkpoint; returns folder."""
    import torch
    from transformers import (
        Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor, Gemma3TextConfig,
        SiglipVisionConfig,
    )

    from demo import carry_published_generation_config

    tokenizer = build_gemma3_tokenizer()
    token_id = tokenizer.convert_tokens_to_ids
    text_config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
        max_position_embeddings=4096,
        # The real 5-local:1-global pattern cut to two layers, one of each; a window of 16 is shorter
        # than a prompt, so tests cross it.
        sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        pad_token_id=token_id("<pad>"), bos_token_id=token_id("<bos>"), eos_token_id=token_id("<end_of_turn>"),
    )
    vision_config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=14,
                                       vision_use_head=False)
    config = Gemma3Config(
        text_config=text_config, vision_config=vision_config, mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
        boi_token_index=token_id("<start_of_image>"), eoi_token_index=token_id("<end_of_image>"),
        image_token_index=token_id("<image_soft_token>"), tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    # transformers starts the image projection at zero (its _init_weights): every image would embed
    # as zeros and never reach the text model. Random instead, on the scale of the word embeddings.
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=config.initializer_range)
    # As the real generation_config: a turn ends at <end_of_turn>, and <eos> stops too; top_k 64, top_p 0.95.
    carry_published_generation_config(model, tokenizer, "gemma3")
    # Pan-and-scan off (as the real default): one 56x56 crop per image, whatever its size.
    image_processor = Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_pan_and_scan=False,
                                           image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                                image_seq_length=MM_TOKENS_PER_IMAGE)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
