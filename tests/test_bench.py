"""bench.py's pure helpers: FLOP and bandwidth arithmetic by hand, and the published architectures'
parameter counts (built on the meta device, no memory) against the sizes Qwen publishes."""

import pytest

import bench


def test_image_tokens_448_and_56():
    # 448 / 14 = 32 patches a side, 1024 in all; merged 2 x 2: 256 tokens. 56 / 14 = 4: 16 patches, 4 tokens.
    assert bench.image_tokens(448) == (1024, 256)
    assert bench.image_tokens(56) == (16, 4)


def test_update_flops_by_hand():
    counts = dict(text=100, lm_head=10, vision=5)
    # B = 2, G = 3, P = 20, T = 4, 16 patches per image; 24 completion tokens.
    # Shared: text tokens 2*20 + 24 = 64, vision over 2 images: 6 * (100*64 + 10*24 + 5*16*2) = 40,800.
    assert bench.update_flops(counts, 20, 4, 16, prompts=2, group_size=3, share_prompt=True) == 40_800
    # Repeated: text tokens 6*20 + 24 = 144, vision over 6 images: 6 * (14,400 + 240 + 480) = 90,720.
    assert bench.update_flops(counts, 20, 4, 16, prompts=2, group_size=3, share_prompt=False) == 90_720


def test_decode_bandwidth_by_hand():
    counts = dict(text=1000, lm_head=200, embedding=200, vision=50)
    assert bench.decode_weight_bytes(counts, 2) == 2400  # decoder + output projection, bf16
    # 2,400 bytes x 64 steps in 0.5 s = 307,200 B/s.
    assert bench.decode_bandwidth_gbs(2400, 64, 0.5) == pytest.approx(307_200 / 1e9)


def test_device_peaks():
    assert bench.device_peaks("NVIDIA H100 80GB HBM3", None, None) == (3350.0, 989.0)
    assert bench.device_peaks("NVIDIA H200", None, None) == (4800.0, 989.0)
    assert bench.device_peaks(None, None, None) == (None, None)
    assert bench.device_peaks(None, 100.0, 5.0) == (100.0, 5.0)


@pytest.mark.parametrize("name, published, hidden, vocab", [
    ("qwen2-vl-2b", 2.21e9, 1536, 151_936),     # Qwen/Qwen2-VL-2B-Instruct: 2.21B, tied embeddings
    ("qwen2.5-vl-7b", 8.29e9, 3584, 152_064),   # Qwen/Qwen2.5-VL-7B-Instruct: 8.29B, untied
])
def test_published_parameter_counts(name, published, hidden, vocab):
    config = bench.model_config(name)
    counts = bench.param_counts(config)
    assert counts["total"] == pytest.approx(published, rel=0.005)
    assert counts["embedding"] == counts["lm_head"] == hidden * vocab
    tied = name == "qwen2-vl-2b"
    assert counts["total"] == counts["text"] + counts["vision"] + counts["embedding"] * (1 if tied else 2)
    assert config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]  # sums to head_dim / 2 = 64


def test_full_vocab_tokenizer_decodes_every_id_and_keeps_qwen_ids():
    tokenizer = bench.build_full_vocab_tokenizer(151_936)
    for token, i in bench.QWEN_SPECIAL_IDS.items():
        assert tokenizer.convert_tokens_to_ids(token) == i
    assert tokenizer.decode([0, 151_000, 151_935]) == "t0 t151000 t151935"
    # Every word is one token (words outside the vocabulary map to t0); the chat markers are single tokens.
    text = tokenizer.apply_chat_template([{"role": "user", "content": "red green blue"}], tokenize=False)
    assert tokenizer(text)["input_ids"] == [151644, 0, 0, 0, 0, 151645]
