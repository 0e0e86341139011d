"""bench.py's pure helpers: FLOP and bandwidth arithmetic by hand, the published architectures'
parameter counts (built on the meta device, no memory) against the sizes Qwen publishes, the cut
architectures' counts against a count from their widths by hand, the flags' checks, and the
profiler's op classes."""

from types import SimpleNamespace

import pytest

import bench


def test_image_tokens_448_and_56():
    # 448 / 14 = 32 patches a side, 1024 in all; merged 2 x 2: 256 tokens. 56 / 14 = 4: 16 patches, 4 tokens.
    assert bench.image_tokens(448) == (1024, 256)
    assert bench.image_tokens(56) == (16, 4)


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


# ---- the cut architectures (--layers, --vision_layers) -----------------------------------------


def qwen2_decoder_layer(hidden, heads, kv_heads, intermediate):
    """One Qwen2 decoder layer from its widths: q/k/v projections with biases (k and v only for the
    kv_heads of grouped-query attention), o without, a gated MLP (gate, up, down), two RMSNorms."""
    head_dim = hidden // heads
    q = hidden * hidden + hidden
    k = v = hidden * kv_heads * head_dim + kv_heads * head_dim
    o = hidden * hidden
    return q + k + v + o + 3 * hidden * intermediate + 2 * hidden


def test_cut_qwen2_vl_2b_by_hand():
    counts = bench.param_counts(bench.model_config("qwen2-vl-2b", layers=2, vision_layers=2))
    layer = qwen2_decoder_layer(1536, 12, 2, 8960)
    assert layer == 2_359_296 + 1536 + 2 * (393_216 + 256) + 2_359_296 + 41_287_680 + 3072  # 46,797,824
    assert counts["text"] == 2 * layer + 1536  # + the final norm
    assert counts["embedding"] == counts["lm_head"] == 151_936 * 1536  # tied: one tensor
    # Qwen2-VL's vision block, width 1280, MLP 4 x 1280 = 5120 with GELU: two LayerNorms (weight and
    # bias), qkv and proj with biases, fc1 and fc2 with biases.
    block = 2 * 2 * 1280 + (1280 * 3840 + 3840) + (1280 * 1280 + 1280) + (1280 * 5120 + 5120) + (5120 * 1280 + 1280)
    patch_embedding = 1280 * 3 * 2 * 14 * 14  # Conv3d over 2 frames of 14 x 14 x 3, no bias
    merger = 2 * 1280 + (5120 * 5120 + 5120) + (5120 * 1536 + 1536)  # LayerNorm, then 4 patches' 5120 -> 5120 -> 1536
    assert counts["vision_blocks"] == 2 * block
    assert counts["merger"] == merger
    assert counts["text_mlp_out"] == 2 * 8960 * 1536  # down_proj, no bias
    assert counts["vision_mlp_out"] == 2 * (5120 * 1280 + 1280)  # fc2 with its bias
    assert counts["vision"] == 2 * block + patch_embedding + merger
    assert counts["total"] == 2 * layer + 1536 + counts["vision"] + 151_936 * 1536


def test_cut_qwen2_5_vl_7b_by_hand():
    config = bench.model_config("qwen2.5-vl-7b", layers=1, vision_layers=1)
    counts = bench.param_counts(config)
    assert counts["text"] == qwen2_decoder_layer(3584, 28, 4, 18944) + 3584
    assert counts["embedding"] == counts["lm_head"] == 152_064 * 3584  # untied: two tensors
    # Qwen2.5-VL's vision block: two RMSNorms (weight only), qkv and proj with biases, a gated MLP
    # 1280 -> 3420 -> 1280 with biases; the merger's norm is an RMSNorm too.
    block = 2 * 1280 + (1280 * 3840 + 3840) + (1280 * 1280 + 1280) + 2 * (1280 * 3420 + 3420) + (3420 * 1280 + 1280)
    merger = 1280 + (5120 * 5120 + 5120) + (5120 * 3584 + 3584)
    assert counts["vision"] == block + 1280 * 3 * 2 * 14 * 14 + merger
    assert counts["text_mlp_out"] == 18944 * 3584
    assert counts["vision_mlp_out"] == 3420 * 1280 + 1280
    assert counts["total"] == counts["text"] + counts["vision"] + 2 * 152_064 * 3584
    assert config.vision_config.fullatt_block_indexes == [0]


@pytest.mark.parametrize("vision_layers, full", [(1, [0]), (2, [1]), (8, [7]), (10, [7, 9]), (32, [7, 15, 23, 31])])
def test_cut_vision_tower_keeps_full_attention_blocks_valid(vision_layers, full):
    config = bench.model_config("qwen2.5-vl-7b", layers=3, vision_layers=vision_layers)
    assert config.vision_config.fullatt_block_indexes == full
    assert config.vision_config.depth == vision_layers
    assert config.text_config.num_hidden_layers == 3
    assert len(config.text_config.layer_types) == 3
    assert config.text_config.hidden_size == 3584 and config.text_config.vocab_size == 152_064  # widths as published


@pytest.mark.parametrize("argv, message", [
    (["--model", "qwen2-vl-2b", "--vision_layers", "33"], "--vision_layers 33: qwen2-vl-2b has 32; give 1 to 32"),
    (["--model", "qwen2-vl-2b", "--vision_layers", "0"], "--vision_layers 0: qwen2-vl-2b has 32; give 1 to 32"),
    (["--model", "qwen2.5-vl-7b", "--layers", "29"], "--layers 29: qwen2.5-vl-7b has 28; give 1 to 28"),
    (["--model", "tiny", "--layers", "2"], "cut the published architectures"),
    (["--ranks", "2", "--compare", "trl"], "use it with --ranks 1"),
    (["--ranks", "0"], "--ranks 0"),
    (["--gradient_checkpointing", "yes"], "true or false"),
])
def test_flags_checked(argv, message, capsys):
    assert bench.cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench.py: error: ") and err.count("\n") == 1 and message in err, err


def test_threads_default_to_the_cores_divided_among_ranks(monkeypatch):
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 2)
    assert bench.parse_args(["--ranks", "2"]).threads == 1
    assert bench.parse_args([]).threads == 2
    assert bench.parse_args(["--ranks", "2", "--threads", "2"]).threads == 2
    assert bench.parse_args(["--gradient_checkpointing", "true"]).gradient_checkpointing is True


def test_compare_lora_trains_adapters_in_the_second_kind_alone():
    args = bench.parse_args(["--compare", "lora", "--ranks", "2"])
    setup = dict(folder="m", data="d", attn="sdpa")
    full, lora = (bench.train_flags(args, setup, True, "out", 3, lora=lora) for lora in (False, True))
    assert "--use_peft" not in full and lora == full + ["--use_peft", "true"]
    assert full[-2:] == ["--deepspeed", "zero3.json"]


def test_lora_unmerged_while_sampling_sets_the_merge_aside(tmp_path, monkeypatch):
    """--compare lora's third kind runs train.py through train_worker with unmerged_sampling: there
    grpo.families.adapters_merged, which sample_groups enters around generate, does nothing."""
    import contextlib
    import json

    import train
    from grpo import families

    merging, seen = families.adapters_merged, {}
    monkeypatch.setattr(families, "adapters_merged", merging)  # put back after the test
    monkeypatch.setattr(train, "cli", lambda argv: seen.update(argv=argv, merge=families.adapters_merged) or 0)
    spec = tmp_path / "worker.json"
    spec.write_text(json.dumps(dict(argv=["--use_peft", "true"], freeze_embeddings=False, unmerged_sampling=True,
                                    profile_step=None, profile_out=str(tmp_path / "profile"))))
    with pytest.raises(SystemExit) as exit_status:
        bench.train_worker(str(spec))
    assert exit_status.value.code == 0 and seen["argv"] == ["--use_peft", "true"]
    assert seen["merge"] is not merging and isinstance(seen["merge"](object()), contextlib.nullcontext)


def test_compile_decode_is_train_py_s_default_unless_given():
    setup = dict(folder="m", data="d", attn="sdpa")
    default = bench.train_flags(bench.parse_args([]), setup, True, "out", 3)
    assert "--compile_decode" not in default  # train.py decides: true on a GPU, false on the CPU
    given = bench.train_flags(bench.parse_args(["--compile_decode", "true"]), setup, True, "out", 3)
    assert given == default + ["--compile_decode", "true"]
    compare = bench.parse_args(["--compare", "compile_decode"])
    assert [bench.train_flags(compare, setup, True, "out", 3, compile_decode=compiled)[-2:]
            for compiled in (True, False)] == [["--compile_decode", "true"], ["--compile_decode", "false"]]


# ---- FLOPs per phase, by hand on a made-up model -------------------------------------------------

# Text: 2 layers, 2 heads of 4 (attention width 8). Vision: 3 blocks of width 6, 14-px patches merged 2 x 2.
TEXT = SimpleNamespace(num_hidden_layers=2, num_attention_heads=2, head_dim=4, hidden_size=8)
FULL_VISION = SimpleNamespace(depth=3, embed_dim=6, hidden_size=99, patch_size=14, spatial_merge_size=2)
CONFIG = SimpleNamespace(text_config=TEXT, vision_config=FULL_VISION)
# Parameters: patch embedding 12 = 50 - 30 - 8; the layers' and blocks' MLP output projections 40 and 10.
COUNTS = dict(text=100, lm_head=10, vision=50, vision_blocks=30, merger=8, text_mlp_out=40, vision_mlp_out=10)
# B = 2 prompts, G = 3, P = 10 prompt tokens, T = 4 completion tokens, 56-px images: 4 x 4 = 16 patches, 4 tokens.
STEP = bench.StepShape(prompts=2, group_size=3, prompt_tokens=10, completion_tokens=4, image_size=56)


def test_attention_flops_by_hand():
    # Text, causal: each prompt's 10 tokens see 1 + 2 + ... + 10 = 55 keys, 2 prompts: 110 pairs; each of
    # the 6 completions' tokens sees 10 + t keys, t = 1..4: 40 + 10 = 50, 300 pairs. 4 x 8 x 2 layers x 410.
    # Vision, all full: 16 x 16 pairs per block, 3 blocks, 2 images: 4 x 6 x 2 x 768.
    assert bench.attention_flops(CONFIG, STEP) == dict(text_attention=26_240, vision_attention=36_864)
    # Prompts repeated G times: 6 copies of 55 pairs, 6 images.
    repeated = bench.StepShape(2, 3, 10, 4, 56, share_prompt=False)
    assert bench.attention_flops(CONFIG, repeated) == dict(text_attention=4 * 8 * 2 * (330 + 300),
                                                           vision_attention=4 * 6 * 6 * 768)


def test_vision_window_pairs_by_hand():
    # 112 px: 8 x 8 patches, 4 x 4 merged tokens; 56-px windows are 2 x 2 merged tokens (16 patches):
    # 4 windows of 16 patches, 4 x 256 pairs.
    assert bench.vision_window_pairs(112, window_size=56) == 1024
    # 168 px: 12 x 12 patches, 6 x 6 merged; 112-px windows of 4 x 4 merged, the last row and column
    # cut to 2: windows of 64, 32, 32 and 16 patches.
    assert bench.vision_window_pairs(168, window_size=112) == 64 ** 2 + 2 * 32 ** 2 + 16 ** 2
    # Qwen2.5-VL at 448 px: 16 x 16 merged tokens, 16 windows of 64 patches; at 1344 px, 144 of them.
    assert bench.vision_window_pairs(448, window_size=112) == 16 * 64 ** 2
    assert bench.vision_window_pairs(1344, window_size=112) == 144 * 64 ** 2


def test_windowed_vision_attention_by_hand():
    # 3 blocks, block 2 full: 112-px image = 64 patches; full 64^2 = 4096 pairs, windowed (56 px) 1024 each.
    windowed = SimpleNamespace(depth=3, hidden_size=6, patch_size=14, spatial_merge_size=2, window_size=56,
                               fullatt_block_indexes=[2])
    step = bench.StepShape(prompts=2, group_size=3, prompt_tokens=10, completion_tokens=4, image_size=112)
    flops = bench.attention_flops(SimpleNamespace(text_config=TEXT, vision_config=windowed), step)
    assert flops["vision_attention"] == 4 * 6 * 2 * (4096 + 2 * 1024)


def test_forward_flops_by_hand():
    parts = bench.forward_flops(COUNTS, CONFIG, STEP)
    # Text: 2 prompts x 10 + 6 completions x 4 = 44 tokens; lm_head: 24 completion tokens.
    assert parts["text"] == 2 * 100 * 44
    assert parts["lm_head"] == 2 * 10 * 24
    # Vision blocks on 16 patches of 2 images; patch embedding (12) per patch, merger (8) per 4 patches.
    assert parts["vision_blocks"] == 2 * 30 * 16 * 2
    assert parts["vision_rest"] == 2 * (12 * 16 + 8 * 4) * 2
    assert (parts["text_attention"], parts["vision_attention"]) == (26_240, 36_864)
    forward = 8_800 + 480 + 1_920 + 896 + 26_240 + 36_864  # 75,200
    assert bench.generate_flops(COUNTS, CONFIG, STEP) == forward
    assert bench.logps_flops(COUNTS, CONFIG, STEP, models=2) == 2 * forward  # reference and old
    assert bench.logps_flops(COUNTS, CONFIG, STEP, models=0) == 0  # beta 0, one iteration


def test_update_flops_by_hand():
    forward = 75_200
    # Forward 2 + backward 4 per parameter per token: 3 forwards.
    assert bench.update_flops(COUNTS, CONFIG, STEP, checkpointing=False) == 3 * forward
    # Checkpointing recomputes the text layers (but their MLP output, 40 of 100, on 44 tokens), the
    # vision blocks (but theirs, 10 of 30, on 16 patches of 2 images) and their attention; not the
    # lm_head, the patch embedding or the merger.
    recompute = 2 * 60 * 44 + 2 * 20 * 16 * 2 + 26_240 + 36_864
    assert bench.update_flops(COUNTS, CONFIG, STEP, checkpointing=True) == 3 * forward + recompute
    # A frozen lm_head: forward 2 + input gradient 2, no weight gradient: 2 x 10 x 24 less.
    assert bench.update_flops(COUNTS, CONFIG, STEP, checkpointing=True, train_lm_head=False) == (
        3 * forward + recompute - 480)


def test_update_flops_is_8_per_parameter_per_token_in_checkpointed_layers_but_their_last_matmul():
    # 1,000 text parameters, 300 of them the MLP's output projection; 5 prompt and 2 x 3 completion tokens.
    text_only = dict(text=1_000, lm_head=0, vision=0, vision_blocks=0, merger=0, text_mlp_out=300, vision_mlp_out=0)
    no_attention = SimpleNamespace(text_config=SimpleNamespace(num_hidden_layers=1, num_attention_heads=0, head_dim=1),
                                   vision_config=FULL_VISION)
    step = bench.StepShape(prompts=1, group_size=2, prompt_tokens=5, completion_tokens=3, image_size=0)
    tokens = 5 + 2 * 3
    assert bench.update_flops(text_only, no_attention, step, checkpointing=True) == (8 * 700 + 6 * 300) * tokens
    assert bench.update_flops(text_only, no_attention, step, checkpointing=False) == 6 * 1_000 * tokens


def test_matmul_peak_measures_every_layout():
    rates = bench.matmul_peak("float32", threads=1, target_seconds=0.0, repeats=1)
    assert set(rates) == {*bench.MATMUL_LAYOUTS, "peak"}
    assert rates["peak"] == max(rates[layout] for layout in bench.MATMUL_LAYOUTS) > 0


def test_matmul_layouts_are_a_linear_layers_three_products():
    import torch

    x, w = torch.randn(3, 3), torch.randn(3, 3)
    products = {layout: a @ b for layout, (a, b) in ((k, f(x, w)) for k, f in bench.MATMUL_LAYOUTS.items())}
    assert torch.allclose(products["forward x @ W^T"], torch.nn.functional.linear(x, w))
    assert torch.allclose(products["input grad dy @ W"], x @ w)
    assert torch.allclose(products["weight grad dy^T @ x"], x.t() @ w)


# ---- where the time goes: the profiler's op classes -------------------------------------------------


@pytest.mark.parametrize("name, op_class", [
    ("aten::mm", "matmul"), ("aten::addmm", "matmul"), ("aten::bmm", "matmul"), ("aten::linear", "matmul"),
    ("aten::baddbmm", "matmul"), ("aten::convolution_backward", "matmul"), ("aten::mkldnn_convolution", "matmul"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("aten::_softmax", "softmax"), ("aten::_log_softmax_backward_data", "softmax"), ("aten::logsumexp", "softmax"),
    ("aten::copy_", "copies"), ("aten::cat", "copies"), ("aten::index_select", "copies"),
    ("aten::repeat_interleave", "copies"), ("aten::fill_", "copies"), ("aten::embedding_dense_backward", "copies"),
    ("aten::mul_", "elementwise"), ("aten::silu_backward", "elementwise"), ("aten::_foreach_add_", "elementwise"),
    ("aten::sum", "elementwise"), ("aten::where", "elementwise"),
    ("c10d::_allgather_base_", "communication"), ("c10d::allreduce_", "communication"),
    ("aten::empty", "other"), ("MmBackward0", "other"), ("autograd::engine::evaluate_function: MmBackward0", "other"),
])
def test_op_class(name, op_class):
    assert bench.op_class(name) == op_class


def test_profile_summary_adds_self_time_per_class_and_time_outside_ops():
    events = [SimpleNamespace(key=key, self_cpu_time_total=us) for key, us in
              [("aten::mm", 500_000), ("aten::addmm", 100_000), ("aten::cat", 50_000), ("aten::mul", 30_000),
               ("aten::empty", 20_000)]]
    summary = bench.profile_summary(events, wall_seconds=1.0, device_time=False)
    assert summary["classes"]["matmul"] == pytest.approx(0.6)
    assert summary["classes"]["copies"] == pytest.approx(0.05)
    assert summary["classes"]["elementwise"] == pytest.approx(0.03)
    assert summary["classes"]["other"] == pytest.approx(0.02)
    assert summary["classes"]["outside ops"] == pytest.approx(1.0 - 0.7)
    assert [o["op"] for o in summary["top_ops"]][:2] == ["aten::mm", "aten::addmm"]


def test_the_phase_functions_bench_wraps_exist():
    import importlib

    for module, name in bench.PHASE_FUNCTIONS.values():
        assert callable(getattr(importlib.import_module(module), name, None)), f"{module}.{name}"


def test_photo_rows_are_photo_sized_and_each_rows_bytes_its_own(tmp_path):
    """--data_rows' pictures: 4:3, 640x480 to 1280x960, 115 KB on average (within 15%); 10 rows from 4
    pictures hold 10 different byte strings that decode to their picture's pixels, or with --repeat_pictures
    the 4 pictures' own bytes in turn."""
    import io

    import datasets
    from PIL import Image

    pictures = bench.photo_jpegs(24)
    sizes = [Image.open(io.BytesIO(p)).size for p in pictures]
    assert all(640 <= w <= 1280 and h == w * 3 // 4 for w, h in sizes)
    assert 0.85 * 115_000 < sum(map(len, pictures)) / len(pictures) < 1.15 * 115_000
    folder = str(tmp_path / "rows")
    bench.write_photo_rows(folder, 10, pictures[:4], str(tmp_path))
    rows = datasets.load_from_disk(folder)
    stored = [row["image"]["bytes"] for row in rows.cast_column("image", datasets.Image(decode=False))]
    assert len(set(stored)) == 10 and len(set(rows["problem"])) == 10
    assert rows[5]["image"].tobytes() == Image.open(io.BytesIO(pictures[1])).tobytes()
    bench.write_photo_rows(folder + "-repeated", 10, pictures[:4], str(tmp_path), repeat=True)  # as --repeat_pictures
    repeated = datasets.load_from_disk(folder + "-repeated").cast_column("image", datasets.Image(decode=False))
    assert [row["image"]["bytes"] for row in repeated] == [pictures[i % 4] for i in range(10)]
