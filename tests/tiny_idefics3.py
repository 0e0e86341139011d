"""A tiny random Idefics3 and SmolVLM made here, saved like real checkpoints.

Both families are a SigLIP-style vision tower, a pixel-shuffle connector and a Llama text model;
they differ in their processor class, the token that opens a conversation, and SmolVLM's video
processor. Each image becomes <fake_token_around_image><global-img><image>*N<fake_token_around_image>,
with N = (image_size / patch_size)^2 / scale_factor^2 = (56 / 14)^2 / 2^2 = 4 here.
"""

from __future__ import annotations

import os

from demo import byte_level_bpe

# The real checkpoints' format ("User:<image>Q<end_of_utterance>\nAssistant:"), with one change:
# string content is rendered too, as the SmolVLM processor's own default template does (the hub
# templates index content[0]['type'] and would drop a plain-string system message).
CHAT_TEMPLATE = (
    "{bos}{{% for message in messages %}}{{{{ message['role'] | capitalize }}}}"
    "{{% if message['content'] is string %}}{{{{ ': ' + message['content'] }}}}"
    "{{% else %}}{{% if message['content'][0]['type'] == 'image' %}}:{{% else %}}: {{% endif %}}"
    "{{% for item in message['content'] %}}{{% if item['type'] == 'text' %}}{{{{ item['text'] }}}}"
    "{{% elif item['type'] == 'image' %}}<image>{{% endif %}}{{% endfor %}}{{% endif %}}"
    "<end_of_utterance>\n{{% endfor %}}{{% if add_generation_prompt %}}Assistant:{{% endif %}}"
)
# Image splitting (off here) would also use <row_i_col_j>; the processor looks all 36 up by name.
IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]


def _tokenizer(bos: str, pad: str, other: list[str]):
    """Byte-level BPE with the family's special tokens; eos is the end of an assistant turn."""
    from transformers import PreTrainedTokenizerFast

    specials = [bos, pad, *other, "<end_of_utterance>", *IMAGE_TOKENS]
    bpe = byte_level_bpe(specials, vocab_size=500)
    # No BOS post-processor: the chat template writes BOS itself (a real Llama-3 tokenizer would add
    # a second one when the processor tokenizes the rendered prompt).
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token="<end_of_utterance>",
                                        pad_token=pad, extra_special_tokens=specials[2:])
    tokenizer.add_tokens(["<think>", "</think>", "<answer>", "</answer>"])
    tokenizer.chat_template = CHAT_TEMPLATE.format(bos=bos)
    return tokenizer


def _save(family: str, folder: str, seed: int, bos: str, pad: str, other: list[str]) -> str:
    import torch
    import transformers as tf

    config_class, processor_class, image_processor_class, model_class = (getattr(tf, family + suffix) for suffix in (
        "Config", "Processor", "ImageProcessor", "ForConditionalGeneration"))
    tokenizer = _tokenizer(bos, pad, other)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = config_class(
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=4096, **ids),
        # 56 px / 14 px patches = 16 patches; the connector's pixel shuffle (scale 2) makes them 4 tokens.
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=56, patch_size=14),
        scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=ids["pad_token_id"],
    )
    torch.manual_seed(seed)
    model = model_class(config)
    for key, value in ids.items():
        setattr(model.generation_config, key, value)
    # No splitting: every image is resized to one 56x56 square (real checkpoints split large images
    # into max_image_size crops plus a global view, which multiplies the image tokens).
    image_processor = image_processor_class(do_image_splitting=False, size={"longest_edge": 56},
                                            max_image_size={"longest_edge": 56})
    extra = {"video_processor": tf.SmolVLMVideoProcessor()} if family == "SmolVLM" else {}
    processor = processor_class(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                chat_template=tokenizer.chat_template, **extra)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_tiny_idefics3(folder: str, seed: int = 0) -> str:
    """A tiny random Idefics3 (as HuggingFaceM4/Idefics3-8B-Llama3: Llama-3 tokens, a Llama text
    model) with its real processor class, saved like a real checkpoint; returns folder."""
    return _save("Idefics3", folder, seed, bos="<|begin_of_text|>", pad="<|reserved_special_token_0|>",
                 other=["<|end_of_text|>"])


def save_tiny_smolvlm(folder: str, seed: int = 0) -> str:
    """A tiny random SmolVLM (as HuggingFaceTB/SmolVLM-256M-Instruct: SmolLM2 tokens, whose <|im_end|>
    is the pad) with its real processor class, saved like a real checkpoint; returns folder."""
    return _save("SmolVLM", folder, seed, bos="<|im_start|>", pad="<|im_end|>", other=["<|endoftext|>"])
