"""A tiny random Qwen3-VL (interleaved mRoPE, a vision tower with deepstack features, 14-px patches
here so the images stay few tokens) with its real processor class, saved like a real checkpoint."""

from __future__ import annotations


def save_tiny_qwen3_vl(folder: str, seed: int = 0) -> str:
    import torch
    from transformers import (
        Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor,
    )

    from demo import CHAT_TEMPLATE, _mrope_section, build_tokenizer, carry_published_generation_config

    tokenizer = build_tokenizer()  # Qwen3-VL keeps Qwen2-VL's special tokens and chat format
    token_id = tokenizer.convert_tokens_to_ids
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": _mrope_section(32), "mrope_interleaved": True},
                         bos_token_id=token_id("<|endoftext|>"), eos_token_id=token_id("<|im_end|>"),
                         pad_token_id=token_id("<|endoftext|>")),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, num_position_embeddings=64, deepstack_visual_indexes=[0]),
        image_token_id=token_id("<|image_pad|>"), video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"), vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    carry_published_generation_config(model, tokenizer, "qwen3_vl")
    model.save_pretrained(folder)
    Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14),
                     tokenizer=tokenizer, video_processor=Qwen3VLVideoProcessor(patch_size=14),
                     chat_template=CHAT_TEMPLATE).save_pretrained(folder)
    return folder
