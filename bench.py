"""bench.py: time full GRPO steps of the real code path, and compare them with TRL's GRPOTrainer.

Each measured run is the real trainer in its own process: `python train.py ...` on one process, or
`deepspeed --num_gpus R train.py ... --deepspeed zero3.json` (ZeRO-3) with `--ranks R`, on a model
folder and a parquet file that this script writes first, with random weights, so nothing is
downloaded. Per run kind it prints seconds per step, rollouts per second, completion tokens per
second, and per phase (generate, score, reference / old log-probs, update) seconds, peak memory
(train.py's memory/<phase>_peak_gb) and achieved FLOP/s against the machine's peak: the model FLOPs
of each phase (generate_flops, logps_flops, update_flops: the formulas are in their docstrings)
over its seconds, and that over a known GPU's dense bf16 peak or, on the CPU, the matmul peak this
script measures first (matmul_peak, both dtypes, with the runs' threads). For decoding also the
achieved weight-read bandwidth against the device's (decode_bandwidth_gbs). The first
`--warmup_steps` steps of every run are dropped; what is reported are medians over the timed steps
of a run and then over `--repeats` runs, with the run kinds alternated so slow drift hits all alike.
With `--ranks R` each rank samples its own `--prompts` prompts; times and phase memory are the mean
over ranks (as train.py logs them), FLOPs and FLOP/s per rank. On a shared CPU other work skews
everything: the load average is printed at the start and the end.

Models (`--model`): `tiny` (a Qwen2-VL with text hidden size 256 and 4 layers, for the CPU), `demo`
(the CPU demo's: 64 wide, 2 layers),
`qwen2-vl-2b` and `qwen2.5-vl-7b` (the published Qwen/Qwen2-VL-2B-Instruct and
Qwen/Qwen2.5-VL-7B-Instruct architectures, written out below, with a word-level tokenizer that
covers the whole vocabulary so every sampled id decodes). `--layers N --vision_layers M` cut a
published model's depths and keep everything else: the real widths, vocabulary and vision tower on
a machine that cannot hold 28 layers. Completions are always exactly `--completion_length` tokens
long (no early stop), so runs compare.

`--compare trl` also runs TRL's GRPOTrainer on the same model folder, data and settings, and prints
the throughput ratio from the same bench run. TRL is a benchmark-only dependency: `pip install trl`.
`--compare share_prompt` runs ours with `--share_prompt true` and `false`; `--compare lora` runs ours
training every weight and training LoRA adapters (`--use_peft true`, train.py's default r, alpha and
targets; the reference then is the policy with its adapters off), for their step time and peak
memory, and LoRA once more with its adapters left unmerged while sampling (train_worker sets
grpo.families.adapters_merged aside), for the generate phase with and without the merge.
`--compare compile_decode` runs ours with the decode step compiled and eager
(`--compile_decode true` and `false`); the compile happens in the first (warm-up) step, whose
generate seconds are printed apart. `--compare prefetch` runs ours with each step's prompts
prepared on a background thread while the step before trains (`--dataloader_num_workers 1`, a GPU's
default) and prepared in the step (`0`, the CPU's default): the `prompts` column is the host seconds
step 1 keeps the accelerator waiting. `--profile` adds one run
of ours whose first step after the warm-up runs under torch.profiler, phase by phase, and prints
where each phase's time goes (matmuls, attention, softmax, copies, elementwise ops, communication,
other ops, outside any op): `train_worker` runs train.py's own loop with its phase functions wrapped
by name, train.py unchanged.

Examples:
    # the CPU acceptance measurement (2 prompts x G = 8, 64 tokens, 448 x 448 images = 256 image tokens)
    python bench.py --model tiny --image_size 448 --prompts 2 --G 8 --completion_length 64 --beta 0.04 \\
        --compare trl --repeats 3 --steps 3
    # the same with small images (4 image tokens)
    python bench.py --model tiny --image_size 56 --compare trl --repeats 3 --steps 3
    # the real widths on this CPU: Qwen2-VL-2B cut to 2 + 2 layers, ZeRO-3 on 2 ranks, profiled
    python bench.py --model qwen2-vl-2b --layers 2 --vision_layers 2 --dtype bfloat16 --gradient_checkpointing true \\
        --prompts 1 --G 8 --completion_length 256 --image_size 448 --ranks 2 --steps 1 --repeats 1 --profile
    # one GPU
    python bench.py --model qwen2-vl-2b --dtype bfloat16 --image_size 448 --G 8 --completion_length 256 \\
        --beta 0.04 --compare share_prompt
    # the data check at scale, against the commit before (`git worktree add ../before COMMIT`)
    python bench.py --data_rows 1000 8000 40000 --data_ranks 1 2 --repeats 3 --against ../before

`--data_rows` times no steps: it writes save_to_disk folders of photo-sized JPEG rows (640x480 to 1280x960,
about 115 KB, every row's bytes its own) and times train.py from launch to its `[data] N prompts` line,
cold (a new output_dir) and reused (the same output_dir again, as a resumed run starts).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import itertools
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.abspath(__file__))
# Known devices: (memory bandwidth GB/s, dense bf16 TFLOP/s). Others print n/a unless given by flag.
DEVICE_PEAKS = {"H100": (3350.0, 989.0), "H200": (4800.0, 989.0)}
PROMPT_WORDS = ["red", "green", "blue", "yellow", "square", "circle", "triangle", "left", "right", "colour"]

# ---------------------------------------------------------------------------------------------
# Model configurations: the published numbers, written out so nothing is downloaded.
# ---------------------------------------------------------------------------------------------

# Qwen's special token ids (the real tokenizer's), shared by Qwen2-VL and Qwen2.5-VL.
QWEN_SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                    "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655,
                    "<|video_pad|>": 151656}
TAG_IDS = {"<think>": 151657, "</think>": 151658, "<answer>": 151659, "</answer>": 151660}

MODELS = {
    "qwen2-vl-2b": dict(  # Qwen/Qwen2-VL-2B-Instruct, 2.21B parameters
        family="qwen2_vl", published_params=2.21e9, tie_word_embeddings=True,
        text=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, max_window_layers=28, sliding_window=32768, use_sliding_window=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision=dict(depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16,
                    hidden_act="quick_gelu", patch_size=14, spatial_merge_size=2, temporal_patch_size=2)),
    "qwen2.5-vl-7b": dict(  # Qwen/Qwen2.5-VL-7B-Instruct, 8.29B parameters
        family="qwen2_5_vl", published_params=8.29e9, tie_word_embeddings=False,
        text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                  rms_norm_eps=1e-6, max_window_layers=28, sliding_window=32768, use_sliding_window=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, out_hidden_size=3584, num_heads=16,
                    hidden_act="silu", patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                    window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)),
}


def model_config(name: str, layers: int | None = None, vision_layers: int | None = None):
    """The transformers config of a published architecture (`MODELS[name]`), optionally cut to
    `layers` decoder layers and `vision_layers` vision blocks: every width, head count, vocabulary
    and the vision tower's patching stay the published ones, only the depths change. Qwen2.5-VL's
    vision tower attends in windows except in its `fullatt_block_indexes` (7, 15, 23, 31: the last
    of every 8); a cut tower keeps those below its depth and makes its last block full attention,
    as the published tower's last block is (1 block: [0]; 2: [1]; 8: [7]; 10: [7, 9])."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    spec = MODELS[name]
    text, vision = dict(spec["text"]), dict(spec["vision"])
    check_depths(name, layers, vision_layers)
    if layers is not None:
        text.update(num_hidden_layers=layers, max_window_layers=min(text["max_window_layers"], layers))
    if vision_layers is not None:
        vision["depth"] = vision_layers
        if "fullatt_block_indexes" in vision:
            vision["fullatt_block_indexes"] = sorted({i for i in vision["fullatt_block_indexes"] if i < vision_layers}
                                                     | {vision_layers - 1})
    ids = dict(bos_token_id=QWEN_SPECIAL_IDS["<|endoftext|>"], eos_token_id=QWEN_SPECIAL_IDS["<|im_end|>"],
               pad_token_id=QWEN_SPECIAL_IDS["<|endoftext|>"])
    config_class = {"qwen2_vl": Qwen2VLConfig, "qwen2_5_vl": Qwen2_5_VLConfig}[spec["family"]]
    return config_class(
        text_config={**text, **ids}, vision_config=vision,
        image_token_id=QWEN_SPECIAL_IDS["<|image_pad|>"], video_token_id=QWEN_SPECIAL_IDS["<|video_pad|>"],
        vision_start_token_id=QWEN_SPECIAL_IDS["<|vision_start|>"],
        vision_end_token_id=QWEN_SPECIAL_IDS["<|vision_end|>"], tie_word_embeddings=spec["tie_word_embeddings"])


def check_depths(name: str, layers: int | None, vision_layers: int | None) -> None:
    """--layers and --vision_layers cut a published architecture to 1 .. its published depth."""
    if name not in MODELS:
        if layers is not None or vision_layers is not None:
            raise ValueError(f"--layers and --vision_layers cut the published architectures ({', '.join(MODELS)}), "
                             f"not --model {name}")
        return
    for flag, value, depth in (("--layers", layers, MODELS[name]["text"]["num_hidden_layers"]),
                               ("--vision_layers", vision_layers, MODELS[name]["vision"]["depth"])):
        if value is not None and not 1 <= value <= depth:
            raise ValueError(f"{flag} {value}: {name} has {depth}; give 1 to {depth} (or leave it out for all {depth})")


def build_full_vocab_tokenizer(vocab_size: int):
    """A word-level tokenizer over the whole vocabulary ("t0" .. "tN", Qwen's special tokens at their
    real ids, the <think>/<answer> tags), so every id a random model samples decodes. Every other
    word of a prompt is one unknown token, so a prompt of n words is n tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from demo import CHAT_TEMPLATE

    named = {**QWEN_SPECIAL_IDS, **TAG_IDS}
    by_id = {i: token for token, i in named.items()}
    vocab = {by_id.get(i, f"t{i}"): i for i in range(vocab_size)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=list(QWEN_SPECIAL_IDS)[1:])
    tokenizer.add_tokens(list(TAG_IDS))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_model_folder(name: str, folder: str, dtype: str, layers: int | None = None,
                      vision_layers: int | None = None) -> str:
    """Write a random model of architecture `name` (cut to `layers` and `vision_layers`, see
    model_config) with its tokenizer and processor to `folder`, loadable by `from_pretrained`
    exactly like a real checkpoint."""
    if name in ("tiny", "demo"):
        from demo import save_tiny_qwen2_vl

        return save_tiny_qwen2_vl(folder, **(dict(hidden_size=256, num_layers=4) if name == "tiny" else {}))
    import torch
    from transformers import (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)

    from demo import CHAT_TEMPLATE, carry_published_generation_config

    config = model_config(name, layers, vision_layers)
    model_class, processor_class = {"qwen2_vl": (Qwen2VLForConditionalGeneration, Qwen2VLProcessor),
                                    "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor)}[config.model_type]
    tokenizer = build_full_vocab_tokenizer(config.text_config.vocab_size)
    # Initialise on the GPU in the run's dtype when there is one: minutes faster for billions of weights.
    torch.set_default_dtype(getattr(torch, dtype))
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = model_class(config)
    torch.set_default_dtype(torch.float32)
    carry_published_generation_config(model, tokenizer, config.model_type)  # as the hub checkpoint ships it
    processor = processor_class(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder


def param_counts(config) -> dict[str, int]:
    """Parameters by part, counted on the `meta` device (no memory): `text` (the decoder layers and
    final norm), `embedding` and `lm_head` (V x hidden each, the same tensor when tied), `vision`
    (the whole vision tower: patch embedding, blocks, merger), and `total` (each tensor once). For
    the FLOP count, some parts alone: `vision_blocks` (the transformer blocks, which gradient
    checkpointing recomputes), `merger` (it runs once per 2 x 2 patches), and `text_mlp_out` and
    `vision_mlp_out`, the MLP's output projection of every decoder layer and of every vision block
    (down_proj, or fc2 in Qwen2-VL's tower): the last matmul of a layer, which the recompute skips."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    counts = dict(text=0, embedding=0, lm_head=0, vision=0)
    parts = dict(vision_blocks=0, merger=0, text_mlp_out=0, vision_mlp_out=0)
    for name, p in model.named_parameters():  # tied weights are listed once
        part = ("vision" if ".visual." in name else "embedding" if "embed_tokens" in name
                else "lm_head" if name.startswith("lm_head") else "text")
        counts[part] += p.numel()
        mlp_out = ".mlp.down_proj." in name or ".mlp.fc2." in name
        for key, found in (("vision_blocks", ".visual.blocks." in name), ("merger", ".visual.merger." in name),
                           ("text_mlp_out", part == "text" and mlp_out),
                           ("vision_mlp_out", ".visual.blocks." in name and mlp_out)):
            parts[key] += p.numel() if found else 0
    counts["total"] = sum(counts.values())
    counts["lm_head"] = model.get_output_embeddings().weight.numel()  # used for FLOPs even when tied
    return {**counts, **parts}

# ---------------------------------------------------------------------------------------------
# The arithmetic: FLOPs per phase, decode bandwidth, and this machine's matmul peak.
# ---------------------------------------------------------------------------------------------


@dataclass
class StepShape:
    """One rank's GRPO step as the formulas see it: B prompts, each with one square image and P
    prompt tokens (its image tokens included), each sampled G times, T tokens per completion."""

    prompts: int                # B
    group_size: int             # G
    prompt_tokens: int          # P
    completion_tokens: int      # T
    image_size: int             # pixels a side (patches: image_tokens)
    share_prompt: bool = True   # each prompt and its image forwarded once (train.py's --share_prompt), not G times

    @property
    def prompt_copies(self) -> int:
        """C: how many times the prompts (and images) are forwarded: B shared, B x G repeated."""
        return self.prompts if self.share_prompt else self.prompts * self.group_size

    @property
    def completions(self) -> int:
        return self.prompts * self.group_size

    @property
    def text_tokens(self) -> int:
        """Token positions through the decoder layers: the prompt copies and every completion token."""
        return self.prompt_copies * self.prompt_tokens + self.completions * self.completion_tokens


def image_tokens(image_size: int, patch: int = 14, merge: int = 2) -> tuple[int, int]:
    """(patches, image tokens) of a square image: 14-px patches, merged 2 x 2 into one token."""
    patches = (image_size // patch) ** 2
    return patches, patches // merge ** 2


def vision_window_pairs(image_size: int, window_size: int, patch: int = 14, merge: int = 2) -> int:
    """Query-key pairs of one windowed vision layer over one square image (Qwen2.5-VL): the grid of
    merged tokens is cut into windows of window_size px (112 px: 4 x 4 merged tokens = 64 patches),
    the last row and column of windows cut short; each window attends within itself: sum of size^2."""
    side = image_size // patch // merge                # merged tokens a side
    per_window = window_size // patch // merge         # merged tokens a side of a full window
    sides = [per_window] * (side // per_window) + ([side % per_window] if side % per_window else [])
    return sum((a * b * merge * merge) ** 2 for a in sides for b in sides)


def attention_flops(config, step: StepShape) -> dict[str, float]:
    """FLOPs of attention itself in one forward over the step (the scores Q K^T and their weighted
    sum A V: 2 matmuls x 2 FLOPs per query-key pair per unit of width), width = heads x head_dim:

      text_attention   = 4 x width x layers x [C x P(P+1)/2 + B x G x (T x P + T(T+1)/2)]
                         (causal: prompt token i sees i tokens, completion token t sees P + t)
      vision_attention = 4 x width x C x [full layers x I^2 + windowed layers x vision_window_pairs]
                         (I = patches per image; Qwen2-VL's blocks all attend over the whole image,
                         Qwen2.5-VL's in windows except its fullatt_block_indexes)

    These are the pairs the model needs; a kernel may compute more (generate's static cache
    attends over its whole preallocated length, masked)."""
    text, vision = config.text_config, config.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    P, T, C = step.prompt_tokens, step.completion_tokens, step.prompt_copies
    text_pairs = C * P * (P + 1) // 2 + step.completions * (T * P + T * (T + 1) // 2)
    patches, _ = image_tokens(step.image_size, vision.patch_size, vision.spatial_merge_size)
    full = getattr(vision, "fullatt_block_indexes", None)
    full_layers = vision.depth if full is None else len(full)
    window_pairs = (0 if full is None else
                    vision_window_pairs(step.image_size, vision.window_size, vision.patch_size, vision.spatial_merge_size))
    vision_width = getattr(vision, "embed_dim", None) or vision.hidden_size  # Qwen2-VL's hidden_size is the merger's output
    return dict(text_attention=4.0 * text.num_attention_heads * head_dim * text.num_hidden_layers * text_pairs,
                vision_attention=4.0 * vision_width * C * (full_layers * patches ** 2
                                                           + (vision.depth - full_layers) * window_pairs))


def forward_flops(counts: dict[str, int], config, step: StepShape) -> dict[str, float]:
    """FLOPs of one forward over the step's tokens, by part. A matmul of an [n, k] input with a
    [k, m] weight is 2nkm FLOPs: 2 per parameter per token it is applied to. C = prompt copies
    (B shared, B x G repeated), I = patches per image:

      text          = 2 x text params x (C x P + B x G x T)
      lm_head       = 2 x lm_head params x B x G x T          (one logit per completion token)
      vision_blocks = 2 x vision block params x I x C
      vision_rest   = 2 x patch embedding params x I x C + 2 x merger params x I / 4 x C
                      (the merger runs once per 2 x 2 patches: per image token)
      + attention_flops

    Generation computes the same: the prompt's prefill (vision tower and prompt tokens) and one
    decode step per completion token through every layer and the lm_head. So does each log-prob
    forward (reference, old): the prompts once and B x G x T completion tokens. Left out: the
    embedding lookup (no FLOPs), norms, activations and rotary embeddings (elementwise), the one
    logit per prompt copy a forward also computes (C of them), and in generate the prompt's last
    token, fed once per completion: B x (G - 1) more tokens, under 0.1% at the real shapes."""
    patches, merged = image_tokens(step.image_size, config.vision_config.patch_size,
                                   config.vision_config.spatial_merge_size)
    C, completion_tokens = step.prompt_copies, step.completions * step.completion_tokens
    patch_embedding = counts["vision"] - counts["vision_blocks"] - counts["merger"]
    return dict(text=2.0 * counts["text"] * step.text_tokens,
                lm_head=2.0 * counts["lm_head"] * completion_tokens,
                vision_blocks=2.0 * counts["vision_blocks"] * patches * C,
                vision_rest=2.0 * (patch_embedding * patches + counts["merger"] * merged) * C,
                **attention_flops(config, step))


def generate_flops(counts: dict[str, int], config, step: StepShape) -> float:
    """Generation: the prefill (vision tower and prompt) and a decode step per completion token,
    2 x params x tokens with the lm_head per sampled token: one forward (forward_flops)."""
    return sum(forward_flops(counts, config, step).values())


def logps_flops(counts: dict[str, int], config, step: StepShape, models: int) -> float:
    """The log-prob phase: `models` forwards without gradient (the reference model when beta > 0,
    the policy's old log-probs when num_iterations > 1), each the prompts once and B x G x T
    completion tokens (forward_flops)."""
    return models * sum(forward_flops(counts, config, step).values())


def update_flops(counts: dict[str, int], config, step: StepShape, checkpointing: bool,
                 train_lm_head: bool = True) -> float:
    """The update: forward 2 and backward 4 per parameter per token (backward: the gradient of the
    layer's input and of its weight, 2 each), attention's backward likewise twice its forward; so
    3 x forward_flops. With gradient checkpointing (train.py: transformers'
    activation_checkpointing_enable, non-reentrant torch.utils.checkpoint around every decoder
    layer and every vision block) the backward first runs each checkpointed layer's forward again,
    up to the last tensor its backward needs: torch stops the recompute there (its default "early
    stop"), which is the input of the layer's last matmul, the MLP's output projection, so that
    matmul is not run again. Nothing is recomputed for the lm_head, the patch embedding and the
    merger, which are not checkpointed:

      recompute = 2 x (text params - text_mlp_out) x text tokens
                + 2 x (vision block params - vision_mlp_out) x patches x C + text and vision attention
      update    = 3 x forward + recompute (checkpointing) or 3 x forward
                = 8 per parameter per token in a checkpointed layer (6 for its MLP output), 6 elsewhere

    (Checked by counting the matmul FLOPs a tiny Qwen2-VL runs in its backward with and without
    checkpointing: the difference is its layers' and blocks' forward less their down_proj / fc2.)
    A frozen lm_head (train_lm_head=False: bench's --freeze_embeddings) still passes the gradient to
    its input, 2 per parameter per token, but computes none for its weight: 4 instead of 6. Counted
    in full although it is a little less: the backward of the patch embedding, whose input (the
    pixels) needs no gradient."""
    parts = forward_flops(counts, config, step)
    patches, _ = image_tokens(step.image_size, config.vision_config.patch_size, config.vision_config.spatial_merge_size)
    recompute = (2.0 * (counts["text"] - counts["text_mlp_out"]) * step.text_tokens
                 + 2.0 * (counts["vision_blocks"] - counts["vision_mlp_out"]) * patches * step.prompt_copies
                 + parts["text_attention"] + parts["vision_attention"]) if checkpointing else 0.0
    frozen_lm_head = 0.0 if train_lm_head else 2.0 * counts["lm_head"] * step.completions * step.completion_tokens
    return 3.0 * sum(parts.values()) + recompute - frozen_lm_head


def decode_weight_bytes(counts: dict[str, int], bytes_per_param: int) -> int:
    """Bytes of weights one decode step reads: every decoder layer and the output projection
    (the embedding lookup reads only B x G rows; the vision tower does not run while decoding)."""
    return (counts["text"] + counts["lm_head"]) * bytes_per_param


def decode_bandwidth_gbs(weight_bytes: int, decode_steps: int, generate_seconds: float) -> float:
    """Achieved weight-read bandwidth of generation in GB/s: weight_bytes x decode_steps / seconds.
    decode_steps is completion_length per generate call; generate's seconds include the prefill (the
    vision tower and the prompt), so this is a lower bound on the decode loop's own bandwidth."""
    return weight_bytes * decode_steps / generate_seconds / 1e9


# The three products a linear layer y = x W^T runs, as (a, b) of a @ b with x, W, dy all [n, n]:
MATMUL_LAYOUTS = {"forward x @ W^T": lambda x, w: (x, w.T), "input grad dy @ W": lambda x, w: (x, w),
                  "weight grad dy^T @ x": lambda x, w: (x.T, w)}


def matmul_peak(dtype: str, threads: int, target_seconds: float = 0.5, repeats: int = 3,
                max_size: int = 8192) -> dict[str, float]:
    """This machine's matmul throughput in FLOP/s, in `dtype` with `threads` torch threads (those
    of a run), for each of a linear layer's three products (MATMUL_LAYOUTS: a CPU library may be
    much slower in one of them, and the backward runs all three), and `peak`, the fastest. Each is
    a square product grown from 256 a side (then repeated back to back) until one timing takes
    target_seconds, then the median of `repeats` timings; 2n^3 FLOPs per product."""
    import torch

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    rates = {}
    try:
        for layout, operands in MATMUL_LAYOUTS.items():
            n, count = 256, 1
            while True:
                x, w = (torch.randn(n, n, device=device).to(getattr(torch, dtype)) for _ in range(2))
                a, b = operands(x, w)
                a @ b  # warm-up: the library's first call may set up
                sync()

                def timing() -> float:
                    start = time.perf_counter()
                    for _ in range(count):
                        a @ b
                    sync()
                    return time.perf_counter() - start

                seconds = timing()
                if seconds >= target_seconds:
                    break
                grow = (target_seconds / max(seconds, 1e-6)) ** (1 / 3)  # time grows as n^3: aim at the target
                if n < max_size:
                    n = min(max_size, max(n + 256, int(n * grow / 256 + 1) * 256))
                else:
                    count *= 2
            rates[layout] = 2.0 * n ** 3 * count / statistics.median(timing() for _ in range(repeats))
    finally:
        torch.set_num_threads(threads_before)
    rates["peak"] = max(rates.values())
    return rates

# ---------------------------------------------------------------------------------------------
# Data, and the two trainers, each in its own process.
# ---------------------------------------------------------------------------------------------


def write_dataset(path: str, rows: int, image_size: int, prompt_words: int, seed: int = 0) -> None:
    """Parquet in the training schema: random-coloured square PNGs, problems of `prompt_words` words."""
    import datasets
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    records = []
    for _ in range(rows):
        image = Image.new("RGB", (image_size, image_size), tuple(rng.randrange(256) for _ in range(3)))
        ImageDraw.Draw(image).rectangle((0, 0, image_size // 2, image_size // 2),
                                        fill=tuple(rng.randrange(256) for _ in range(3)))
        png = io.BytesIO()
        image.save(png, format="PNG")
        problem = " ".join(rng.choice(PROMPT_WORDS) for _ in range(prompt_words))
        records.append({"image": {"bytes": png.getvalue(), "path": None}, "problem": problem,
                        "solution": "<think>It is red.</think><answer>A</answer>"})
    features = datasets.Features({"image": datasets.Image(), "problem": datasets.Value("string"),
                                  "solution": datasets.Value("string")})
    datasets.Dataset.from_list(records, features=features).to_parquet(path)


def run_process(command: list[str], log_path: str, threads: int) -> float:
    """Run `command` with `threads` torch threads; returns its peak resident memory in GB."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        # The child's rusage: its peak RSS, or under a launcher the largest of its waited-for
        # descendants' (Linux reports the maximum over them, not their sum).
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-4000:]
        raise RuntimeError(f"{' '.join(command[:3])} ... failed (exit {process.returncode}); "
                           f"the end of {log_path}:\n{tail}")
    return usage.ru_maxrss * 1024 / 1e9  # KiB on Linux


PHASES = ("generate", "logps", "update")
# train.py logs memory/<phase>_peak_gb in GiB (its peak_memory_gb divides by 2**30); bench.py reports GB.
GB_PER_GIB = 2 ** 30 / 1e9


def free_port() -> int:
    """A free rendezvous port for the deepspeed launcher (its fixed 29500 may be taken)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_flags(args, setup: dict, share_prompt: bool, out: str, steps: int, lora: bool = False,
                compile_decode: bool | None = None, extra: tuple = ()) -> list[str]:
    """train.py's arguments for one run of ours (`lora`: training LoRA adapters, --use_peft true;
    `compile_decode`: its --compile_decode, else --compile_decode's, else train.py's default; `extra`: more
    flags)."""
    pixels = args.image_size ** 2  # min = max = the image's area: no resizing
    flags = ["--model_name_or_path", setup["folder"], "--dataset_name", setup["data"], "--output_dir", out,
             "--max_steps", str(steps), "--per_device_train_batch_size", str(args.prompts),
             "--num_generations", str(args.G), "--max_completion_length", str(args.completion_length),
             "--beta", str(args.beta), "--min_pixels", str(pixels), "--max_pixels", str(pixels),
             "--learning_rate", "1e-6", "--logging_steps", "1", "--report_to", "none", "--save_steps", "0",
             "--log_completions_steps", "0", "--attn_implementation", setup["attn"],
             "--bf16", str(args.dtype == "bfloat16").lower(), "--share_prompt", str(share_prompt).lower(),
             "--generation_batch_size", str(args.generation_batch_size),
             "--gradient_checkpointing", str(args.gradient_checkpointing).lower(),
             "--ignore_eos", "true"]  # exactly completion_length tokens: runs compare
    compile_decode = args.compile_decode if compile_decode is None else compile_decode
    flags += [] if compile_decode is None else ["--compile_decode", str(compile_decode).lower()]
    return (flags + (["--deepspeed", "zero3.json"] if args.ranks > 1 else []) + (["--use_peft", "true"] if lora else [])
            + list(extra))


def launch(args, script: list[str]) -> list[str]:
    """One process (`python script`), or `deepspeed --num_gpus R script` for R ranks (on the CPU,
    DeepSpeed's CPU accelerator starts R processes)."""
    if args.ranks == 1:
        return [sys.executable, *script]
    return ["deepspeed", "--master_port", str(free_port()), "--num_gpus", str(args.ranks), *script]


def run_ours(args, setup: dict, share_prompt: bool, workdir: str, profile: bool = False, lora: bool = False,
             unmerged: bool = False, compile_decode: bool | None = None, extra: tuple = ()) -> list[dict]:
    """One run of train.py: `python train.py ...`, or under `deepspeed --num_gpus R ... --deepspeed
    zero3.json` for R ranks; or, with --freeze_embeddings, for the profile run or for LoRA sampled with its
    adapters unmerged (`unmerged`), bench.py's
    train_worker, which runs train.py's own loop with its changes made from outside. Returns the
    timed steps' metrics from its metrics.jsonl (each the mean over ranks, as train.py logs them),
    per-phase peak memory in GB and the process's peak resident memory (the largest rank's). The
    profile run is one step after the warm-up, profiled: its per-phase op times are in its
    `profile` entry, its timings (slowed by the profiler) are not reported. Each step also carries the
    run's first generate seconds (`first_generate`: a compiled decode step compiles then)."""
    out = tempfile.mkdtemp(prefix="ours-", dir=workdir)
    steps = args.warmup_steps + (1 if profile else args.steps)
    flags = train_flags(args, setup, share_prompt, out, steps, lora, compile_decode, extra)
    if profile or args.freeze_embeddings or unmerged:
        spec = dict(argv=flags, freeze_embeddings=args.freeze_embeddings, unmerged_sampling=unmerged,
                    profile_step=steps if profile else None, profile_out=os.path.join(out, "profile"))
        with open(os.path.join(out, "worker.json"), "w") as f:
            json.dump(spec, f)
        script = ["bench.py", "--train_worker", os.path.join(out, "worker.json")]
        command = launch(args, script) if args.ranks == 1 else launch(args, ["--no_local_rank", *script])
    else:
        command = launch(args, ["train.py", *flags])
    peak_rss = run_process(command, os.path.join(out, "bench.log"), args.threads)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f if line.strip()]
    steps = []
    for m in logged[args.warmup_steps:]:
        memory = {f"{phase}_gb": m[f"memory/{phase}_peak_gb"] * GB_PER_GIB if f"memory/{phase}_peak_gb" in m else None
                  for phase in PHASES}
        peaks = [v for v in memory.values() if v is not None]
        steps.append(dict(step=m["time/step_seconds"], prompts=m.get("time/prompts_seconds"), generate=m.get("time/generate_seconds"),
                          score=m.get("time/score_seconds"), logps=m.get("time/logps_seconds"),
                          update=m.get("time/update_seconds"), length=m.get("completion/length_mean"),
                          peak_gb=max(peaks) if setup["on_gpu"] and peaks else peak_rss, rss_gb=peak_rss,
                          first_generate=logged[0].get("time/generate_seconds"), **memory))
    if profile:
        steps = [dict(steps[-1], profile=[read_json(os.path.join(out, name)) for name in sorted(os.listdir(out))
                                          if name.startswith("profile.rank")])]
    if not args.keep_dir:
        shutil.rmtree(out, ignore_errors=True)
    return steps


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def run_trl(args, setup: dict, workdir: str) -> list[dict]:
    """One TRL GRPOTrainer run (this file's `trl_worker` in its own process)."""
    out = tempfile.mkdtemp(prefix="trl-", dir=workdir)
    spec = dict(vars(args), folder=setup["folder"], data=setup["data"], attn=setup["attn"], output_dir=out)
    with open(os.path.join(out, "spec.json"), "w") as f:
        json.dump(spec, f)
    peak_rss = run_process([sys.executable, __file__, "--trl_worker", os.path.join(out, "spec.json")],
                           os.path.join(out, "bench.log"), args.threads)
    with open(os.path.join(out, "steps.json")) as f:
        steps = json.load(f)[args.warmup_steps:]
    for s in steps:
        s["peak_gb"] = s["peak_gb"] if s.get("peak_gb") is not None else peak_rss
    if not args.keep_dir:
        shutil.rmtree(out, ignore_errors=True)
    return steps


def _texts(completions) -> list[str]:
    """TRL passes conversational completions as [{"role": "assistant", "content": text}] lists."""
    return [c[-1]["content"] if isinstance(c, list) else c for c in completions]


def trl_accuracy(completions, solution, problem=None, **kwargs):
    from grpo.rewards import accuracy_reward
    return accuracy_reward(_texts(completions), solution, problem)


def trl_format(completions, **kwargs):
    from grpo.rewards import format_reward
    return format_reward(_texts(completions))


def trl_worker(spec_path: str) -> None:
    """TRL's GRPOTrainer with our settings; writes each optimizer step's wall time to steps.json."""
    import datasets
    import torch
    from transformers import AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo.data import DEFAULT_SYSTEM_PROMPT

    with open(spec_path) as f:
        spec = argparse.Namespace(**json.load(f))
    torch.set_num_threads(spec.threads)
    processor = AutoProcessor.from_pretrained(spec.folder, padding_side="left")
    pixels = spec.image_size ** 2
    processor.image_processor.size = {"shortest_edge": pixels, "longest_edge": pixels}
    # The same conversation as ours: the system prompt, then the user turn (TRL puts the image first).
    rows = datasets.load_dataset("parquet", data_files=spec.data, split="train").map(
        lambda row: {"prompt": [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                                {"role": "user", "content": row["problem"]}]})
    on_gpu = torch.cuda.is_available()
    config = GRPOConfig(
        output_dir=spec.output_dir, per_device_train_batch_size=spec.prompts * spec.G, gradient_accumulation_steps=1,
        num_generations=spec.G, max_completion_length=spec.completion_length, beta=spec.beta, temperature=1.0,
        top_p=1.0, loss_type="grpo", learning_rate=1e-6, max_steps=spec.warmup_steps + spec.steps, logging_steps=1,
        report_to="none", save_strategy="no", use_cpu=not on_gpu, bf16=spec.dtype == "bfloat16",
        gradient_checkpointing=False, seed=42, log_completions=False, dataloader_num_workers=0,
        # No early stop, as ours: EOS is suppressed until the last token.
        generation_kwargs={"min_new_tokens": spec.completion_length},
        model_init_kwargs={"dtype": spec.dtype, "attn_implementation": spec.attn})
    steps = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if on_gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            if on_gpu:
                torch.cuda.synchronize()
            steps.append(dict(step=time.perf_counter() - self.start,
                              peak_gb=torch.cuda.max_memory_allocated() / 1e9 if on_gpu else None))

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs and steps:
                steps[-1]["length"] = logs["completions/mean_length"]

    trainer = GRPOTrainer(model=spec.folder, reward_funcs=[trl_accuracy, trl_format], args=config, train_dataset=rows,
                          processing_class=processor, callbacks=[StepTimer()])
    trainer.train()
    with open(os.path.join(spec.output_dir, "steps.json"), "w") as f:
        json.dump(steps, f)

# ---------------------------------------------------------------------------------------------
# Inside a run of ours: train.py's own loop, profiled per phase, or with frozen embeddings.
# ---------------------------------------------------------------------------------------------

# The function train.py calls for each phase, found by name (train.py is not edited for the bench).
PHASE_FUNCTIONS = {"generate": ("grpo.policy", "sample_groups"), "logps": ("grpo.policy", "rollout_logps"),
                   "update": ("train", "update")}

# Where time outside the matmuls goes: op classes, by the op's name without "aten::" and a trailing
# "_" (in-place), the first class that matches wins. Anything else is "other".
OP_CLASSES = {
    "communication": lambda op: any(word in op for word in ("c10d", "nccl", "gloo", "all_gather", "allgather",
                                                            "reduce_scatter", "all_reduce", "allreduce",
                                                            "broadcast", "record_param_comms", "barrier")),
    "attention": lambda op: any(word in op for word in ("scaled_dot_product", "flash_attention",
                                                        "efficient_attention")),
    "matmul": lambda op: op in ("mm", "addmm", "bmm", "matmul", "linear", "baddbmm", "addbmm", "mv", "addmv", "dot",
                                "einsum", "_scaled_mm") or "conv" in op,  # the patch embedding is a Conv3d
    "softmax": lambda op: any(word in op for word in ("softmax", "logsumexp")),
    "copies": lambda op: op in ("copy", "_to_copy", "to", "clone", "contiguous", "cat", "stack", "index",
                                "index_select", "index_put", "_index_put_impl", "index_add", "index_copy", "gather",
                                "scatter", "scatter_add", "repeat", "repeat_interleave", "embedding",
                                "embedding_dense_backward", "narrow_copy", "slice_scatter", "select_scatter",
                                "slice_backward", "select_backward", "masked_select", "masked_scatter",
                                "constant_pad_nd", "flip", "roll", "fill", "zero", "_copy_from",
                                "_copy_from_and_resize", "_unsafe_index", "take_along_dim", "nonzero"),
    "elementwise": lambda op: op.startswith("_foreach") or op.removesuffix("_backward") in (
        "add", "sub", "rsub", "mul", "div", "neg", "pow", "rsqrt", "sqrt", "exp", "log", "sigmoid", "silu", "gelu",
        "tanh", "relu", "threshold", "where", "clamp", "clamp_min", "clamp_max", "masked_fill", "maximum", "minimum",
        "abs", "sign", "reciprocal", "cos", "sin", "sum", "mean", "amax", "amin", "max", "min", "var", "norm",
        "linalg_vector_norm", "cumsum", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or",
        "logical_not", "bitwise_and", "bitwise_or", "bitwise_not", "isfinite", "isnan", "isinf", "all", "any",
        "square", "lerp", "addcmul", "addcdiv", "erf", "tril", "triu", "rms_norm", "_fused_rms_norm",
        "layer_norm", "native_layer_norm", "_fused_adam", "_fused_adamw", "exponential", "uniform", "normal",
        "multinomial", "argmax", "sort", "topk", "softplus"),
}


def op_class(name: str) -> str:
    """The class of a profiled op: communication, attention (the fused sdpa kernels, their softmax and
    matmuls inside), matmul, softmax (softmax, log-softmax, logsumexp and their backward), copies
    (copy, cat, index, repeat, gather, scatter, fill), elementwise (pointwise ops, reductions, norms,
    optimizer updates) or other (allocation, autograd's bookkeeping, everything else)."""
    op = name.removeprefix("aten::").removesuffix("_") if name.startswith("aten::") else name
    return next((cls for cls, matches in OP_CLASSES.items() if matches(op)), "other")


def profile_summary(averages, wall_seconds: float, device_time: bool) -> dict:
    """Self time per op class (seconds) from a profile's key_averages, the op time left unclassed
    as `other`, and the window's wall time not spent in any op (Python, the framework's own code,
    waiting) as `outside ops`; with the top ops by self time."""
    attribute = "self_device_time_total" if device_time else "self_cpu_time_total"
    classes = dict.fromkeys([*OP_CLASSES, "other"], 0.0)
    ops = []
    for event in averages:
        seconds = getattr(event, attribute) / 1e6
        classes[op_class(event.key)] += seconds
        shapes = [shape for shape in getattr(event, "input_shapes", None) or [] if shape]  # when grouped by shape
        ops.append((seconds, event.key, shapes, getattr(event, "count", None)))
    classes["outside ops"] = max(0.0, wall_seconds - sum(classes.values()))
    top = [dict(op=name, seconds=seconds, op_class=op_class(name), shapes=shapes, calls=calls)
           for seconds, name, shapes, calls in sorted(ops, key=lambda op: -op[0])[:12]]
    return dict(wall_seconds=wall_seconds, classes=classes, top_ops=top)


def train_worker(spec_path: str) -> None:
    """`python bench.py --train_worker spec.json` (or under the deepspeed launcher): train.py's own
    `cli` in this process with spec["argv"], changed from outside by name, so train.py stays as it is:

    - profile_step k: the phases of the k-th step (PHASE_FUNCTIONS) each run in a torch.profiler
      window; each rank writes its per-phase op classes to profile_out.rank<r>.json.
    - freeze_embeddings: the input embedding and the lm_head get no gradient and no optimizer state
      (the policy's; grpo.families.load_model is wrapped).
    - unmerged_sampling: LoRA adapters stay unmerged while sampling (grpo.families.adapters_merged
      does nothing), for the generate phase without the merge.
    A name train.py or the package no longer has stops the run with a message naming it."""
    import importlib

    import torch

    import train

    spec = read_json(spec_path)

    def find(module_name: str, name: str):
        module = importlib.import_module(module_name)
        if not callable(getattr(module, name, None)):
            sys.exit(f"bench.py --train_worker: {module_name}.{name} is gone; bench.py wraps it to profile a phase "
                     f"or freeze the embeddings. Update PHASE_FUNCTIONS (or train_worker) in bench.py to the new name.")
        return module, getattr(module, name)

    if spec["freeze_embeddings"]:
        adapter, load_model = find("grpo.families", "load_model")

        def load_frozen(*args, **kwargs):
            model = load_model(*args, **kwargs)
            model.get_input_embeddings().requires_grad_(False)
            model.get_output_embeddings().requires_grad_(False)
            return model

        adapter.load_model = load_frozen
    if spec.get("unmerged_sampling"):
        adapter, _ = find("grpo.families", "adapters_merged")
        adapter.adapters_merged = lambda model: contextlib.nullcontext()
    if spec["profile_step"] is not None:
        on_gpu = torch.cuda.is_available()
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
        state = dict(step=0, phases={})

        def profiled(phase: str, function):
            def wrapper(*args, **kwargs):
                state["step"] += phase == "generate"  # each step starts with its one sample_groups call
                if state["step"] != spec["profile_step"]:
                    return function(*args, **kwargs)
                with torch.profiler.profile(activities=activities, record_shapes=True) as profiler:
                    start = time.perf_counter()
                    result = function(*args, **kwargs)
                    if on_gpu:
                        torch.cuda.synchronize()
                    wall = time.perf_counter() - start
                summary = profile_summary(profiler.key_averages(group_by_input_shape=True), wall, device_time=on_gpu)
                if phase in state["phases"]:  # logps: the reference and the old log-probs, summed
                    earlier = state["phases"][phase]
                    summary["wall_seconds"] += earlier["wall_seconds"]
                    summary["classes"] = {k: v + earlier["classes"][k] for k, v in summary["classes"].items()}
                    summary["top_ops"] = earlier["top_ops"] + summary["top_ops"]
                state["phases"][phase] = summary
                return result
            return wrapper

        for phase, (module_name, name) in PHASE_FUNCTIONS.items():
            module, function = find(module_name, name)
            setattr(module, name, profiled(phase, function))
    status = train.cli(spec["argv"])
    if spec["profile_step"] is not None and status == 0:
        with open(f"{spec['profile_out']}.rank{os.environ.get('RANK', '0')}.json", "w") as f:
            json.dump(dict(rank=int(os.environ.get("RANK", "0")), device_time=on_gpu, phases=state["phases"]), f)
    sys.exit(status)

# ---------------------------------------------------------------------------------------------
# The data check at scale (--data_rows): seconds from launch to train.py's `[data] N prompts` line.
# ---------------------------------------------------------------------------------------------


def photo_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """`count` photo-sized JPEGs, 640x480 to 1280x960 (4:3), about 115 KB each: a smooth random colour
    field with fine grain, so that they compress (and decode) like photographs."""
    from PIL import Image, ImageChops

    rng, pictures = random.Random(seed), []
    for _ in range(count):
        width = rng.randrange(640, 1281) // 4 * 4
        height = width * 3 // 4
        field = Image.frombytes("RGB", (width // 48 + 2, height // 48 + 2), rng.randbytes((width // 48 + 2) * (height // 48 + 2) * 3))
        grain = Image.frombytes("L", (width, height), rng.randbytes(width * height)).point(lambda v: v // 20).convert("RGB")
        picture = ImageChops.add(field.resize((width, height), Image.BICUBIC), grain, offset=-5)
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=85)
        pictures.append(buffer.getvalue())
    return pictures


def write_photo_rows(folder: str, rows: int, pictures: list[bytes], workdir: str, repeat: bool = False) -> None:
    """A save_to_disk folder of `rows` distinct rows in the training schema, each holding a photo-sized JPEG
    of `pictures` in turn: whose bytes no other row holds (a JPEG comment with the row's number after its
    start marker), so no row's picture is decoded for another's; or with `repeat`, the same bytes in every
    row that holds that picture, as a dataset with several questions per picture stores them. Problems and
    answers are short, as most are."""
    import datasets

    def generate():
        for i in range(rows):
            picture, comment = pictures[i % len(pictures)], f"row {i}".encode()
            if not repeat:
                picture = picture[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + picture[2:]
            yield {"image": {"bytes": picture, "path": None},
                   "problem": f"Row {i}: what does the picture show? Choices: (A) a field (B) a wall (C) the sea (D) snow",
                   "solution": f"<think>It is row {i}.</think><answer>{'ABCD'[i % 4]}</answer>"}

    features = datasets.Features({"image": datasets.Image(), "problem": datasets.Value("string"),
                                  "solution": datasets.Value("string")})
    cache = tempfile.mkdtemp(prefix="generate-", dir=workdir)
    datasets.Dataset.from_generator(generate, features=features, cache_dir=cache).save_to_disk(folder)
    shutil.rmtree(cache, ignore_errors=True)


def time_to_data_line(repo: str, ranks: int, model: str, data: str, out: str, extra: list[str],
                      timeout: float = 900) -> tuple[float, float, int]:
    """(Seconds from launching `repo`'s train.py (one process, or deepspeed's launcher with `ranks`) to its
    `[data] N prompts` line, the CPU seconds all its processes used until then (on a machine other work
    keeps busy, the wall time depends on the share of the CPU it got, the CPU time does not), and N, the
    rows kept). The run is killed there. A start that hangs (a stuck rendezvous) is tried again."""
    import re
    import signal

    import psutil  # a dependency of deepspeed

    flags = ["--model_name_or_path", model, "--dataset_name", data, "--output_dir", out, "--max_steps", "1",
             "--report_to", "none", "--save_steps", "0", "--num_generations", "2", "--max_completion_length", "4", *extra]
    command = ([sys.executable, "train.py"] if ranks == 1 else ["deepspeed", "--master_port", str(free_port()),
               "--num_gpus", str(ranks), "train.py", "--deepspeed", "zero3.json"]) + flags
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for attempt in range(2):
        start = time.time()
        process = subprocess.Popen(command, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env=env, start_new_session=True)
        timer = threading.Timer(timeout, os.killpg, (process.pid, signal.SIGKILL))
        timer.start()
        tail = []
        for line in process.stdout:
            tail = (tail + [line])[-30:]
            if found := re.search(r"\[data\] (\d+) prompts from", line):
                seconds, cpu, kept = time.time() - start, 0.0, int(found.group(1))
                launcher = psutil.Process(process.pid)
                for member in [launcher, *launcher.children(recursive=True)]:  # user, system, and waited children's
                    with contextlib.suppress(psutil.NoSuchProcess):
                        cpu += sum(member.cpu_times()[:4])
                break
        else:
            seconds = None
        timer.cancel()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        if seconds is not None:
            return seconds, cpu, kept
    raise RuntimeError(f"{' '.join(command[:6])} ... printed no data line:\n{''.join(tail)}")


def row_check_profile(pictures: list[bytes], model: str, repeats: int = 3) -> dict[str, float]:
    """Milliseconds per row of each part of the row check on these pictures (the best of `repeats` passes):
    decoding a picture in full, at 1/8 scale (grpo.data.RowCheck's), its header alone, PIL's verify(); the
    prompt's template and tokens (families.count_prompt_tokens); the gold judged against itself
    (answers.unverifiable_reason). And which decodes catch a picture cut in half (`catches_truncated`)."""
    from PIL import Image

    from grpo import answers, data, families

    def full(picture):
        Image.open(io.BytesIO(picture)).load()

    def eighth(picture):
        image = Image.open(io.BytesIO(picture))
        image.draft(image.mode, (image.width // 8, image.height // 8))
        image.load()

    processor, golds = families.load_processor(model, 3136, 12845056), itertools.count(7)  # new golds: no cache hits
    conversation = data.build_conversation("Row 1: what does the picture show? (A) a field (B) a wall", None, 1)
    parts = {"full decode": full, "1/8-scale decode": eighth, "header only": lambda p: Image.open(io.BytesIO(p)).size,
             "PIL verify()": lambda p: Image.open(io.BytesIO(p)).verify(),
             "prompt template and tokens": lambda p: families.count_prompt_tokens(processor, conversation, [(640, 480)],
                                                                                  families.FAMILIES["qwen2_vl"]),
             "gold judged against itself": lambda p: answers.unverifiable_reason(f"<answer>{next(golds)}</answer>", "?")}
    profile = {}
    for name, part in parts.items():
        passes = []
        for _ in range(repeats):
            start = time.perf_counter()
            for picture in pictures:
                part(picture)
            passes.append((time.perf_counter() - start) / len(pictures) * 1000)
        profile[name] = min(passes)
    caught = []
    for name in ("full decode", "1/8-scale decode", "header only", "PIL verify()"):
        try:
            parts[name](pictures[0][:len(pictures[0]) // 2])
        except Exception:  # noqa: BLE001
            caught.append(name)
    profile["catches_truncated"] = caught
    return profile


def data_check_main(args) -> None:
    """Launch to the data line, cold (a new output_dir) and reused (the same output_dir again, as a
    resumed run starts), for each of --data_rows and --data_ranks, this repository's train.py and, with
    --against DIR, DIR's side by side; medians of --repeats, the kinds alternated."""
    info = machine()
    print(f"{info['date']} | {info['cpu']} | {info['cores']} cores | python {info['python']}, torch {info['torch']}, "
          f"transformers {info['transformers']} | load average (1 min) {os.getloadavg()[0]:.2f}")
    workdir = args.keep_dir or tempfile.mkdtemp(prefix="bench-data-")
    os.makedirs(workdir, exist_ok=True)
    model = os.path.join(workdir, "model-tiny")
    if not os.path.exists(os.path.join(model, "config.json")):
        save_model_folder("tiny", model, "float32")
    pictures = photo_jpegs(64)
    print(f"{len(pictures)} photo-sized JPEGs, {statistics.mean(len(p) for p in pictures) / 1000:.0f} KB on average, "
          + ("the rows repeat their bytes" if args.repeat_pictures else "each row's bytes its own"))
    profile = row_check_profile(pictures, model)
    print("one row's check, ms (the best of 3 passes over the pictures, one process): "
          + "; ".join(f"{name} {ms:.2f}" for name, ms in profile.items() if name != "catches_truncated")
          + f"; a picture cut in half is caught by: {', '.join(profile['catches_truncated'])}")
    repos = {"ours": REPO, **({"against": os.path.abspath(args.against)} if args.against else {})}
    results = []
    for rows in args.data_rows:
        data = os.path.join(workdir, f"photos-{rows}" + ("-repeated" if args.repeat_pictures else ""))
        if not os.path.exists(data):
            write_photo_rows(data, rows, pictures, workdir, args.repeat_pictures)
        for ranks in args.data_ranks:
            times = {name: {"cold": [], "reused": []} for name in repos}
            for repeat in range(args.repeats):
                for name, repo in repos.items():
                    out = tempfile.mkdtemp(prefix="run-", dir=workdir)
                    times[name]["cold"].append(time_to_data_line(repo, ranks, model, data, out, []))
                    times[name]["reused"].append(time_to_data_line(repo, ranks, model, data, out,
                                                                   ["--resume_from_checkpoint", "latest"]))
                    shutil.rmtree(out, ignore_errors=True)
                    print(f"  {rows} rows, {ranks} rank(s), {name}: cold {times[name]['cold'][-1][0]:.1f} s "
                          f"({times[name]['cold'][-1][1]:.1f} s of CPU), reused {times[name]['reused'][-1][0]:.1f} s "
                          f"({times[name]['reused'][-1][1]:.1f} s of CPU) (load average {os.getloadavg()[0]:.1f})",
                          flush=True)
            kept = {run[2] for kinds in times.values() for values in kinds.values() for run in values}
            if len(kept) > 1:  # every checkout, cold or reused, must keep the same rows
                raise RuntimeError(f"{rows} rows, {ranks} rank(s): the runs kept different counts: {sorted(kept)}")
            medians = {f"{name} {kind}{unit}": statistics.median(v[i] for v in values)
                       for name, kinds in times.items() for kind, values in kinds.items()
                       for i, unit in enumerate(("", " cpu"))}
            results.append(dict(rows=rows, ranks=ranks, kept=kept.pop(), **medians))
        if not args.keep_dir:
            shutil.rmtree(data, ignore_errors=True)
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}\n\nseconds from launch to the data line, and "
          f"(cpu) the CPU seconds of all the run's processes until then, medians of {args.repeats}:")
    columns = [k for k in results[0] if k not in ("rows", "ranks", "kept")]
    print_rows([["rows", "ranks", "kept", *columns]]
               + [[str(r["rows"]), str(r["ranks"]), str(r["kept"]), *(f"{r[c]:.1f}" for c in columns)] for r in results])
    if args.against:
        for r in results:
            print(f"{r['rows']} rows, {r['ranks']} rank(s): ours / against, cold {r['ours cold'] / r['against cold']:.2f}x, "
                  f"reused {r['ours reused'] / r['against reused']:.2f}x; CPU seconds: cold "
                  f"{r['ours cold cpu'] / r['against cold cpu']:.2f}x, reused {r['ours reused cpu'] / r['against reused cpu']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(command=sys.argv, machine=info, row_check_ms=profile, results=results), f, indent=1)
    if not args.keep_dir:
        shutil.rmtree(workdir, ignore_errors=True)

# ---------------------------------------------------------------------------------------------
# Summary and report.
# ---------------------------------------------------------------------------------------------


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def step_shape(args, setup: dict, share_prompt: bool) -> StepShape:
    return StepShape(args.prompts, args.G, setup["prompt_tokens"], args.completion_length, args.image_size, share_prompt)


def phase_flops(args, setup: dict, share_prompt: bool) -> dict[str, float]:
    """One rank's FLOPs per phase (generate_flops, logps_flops, update_flops) for this bench's settings."""
    step = step_shape(args, setup, share_prompt)
    counts, config = setup["counts"], setup["config"]
    return dict(generate=generate_flops(counts, config, step),
                logps=logps_flops(counts, config, step, models=1 if args.beta > 0 else 0),  # the reference
                update=update_flops(counts, config, step, args.gradient_checkpointing, not args.freeze_embeddings))


def summarise(runs: list[list[dict]], args, setup: dict, share_prompt: bool, phases: bool) -> dict:
    """Medians over each run's timed steps, then over runs; rates and utilisation from them. With
    `phases` (our runs), each phase's FLOPs (one rank's), achieved FLOP/s and share of the peak."""
    keys = ("step", "prompts", "generate", "score", "logps", "update", "length", "peak_gb", "rss_gb", "first_generate",
            *(f"{phase}_gb" for phase in PHASES))
    per_run = [{k: _median([s.get(k) for s in run]) for k in keys} for run in runs]
    s = {k: _median([r[k] for r in per_run]) for k in keys}
    all_steps = [x["step"] for run in runs for x in run]
    rollouts = args.prompts * args.G  # per rank
    s.update(runs=len(runs), step_min=min(all_steps), step_max=max(all_steps),
             rollouts_per_s=args.ranks * rollouts / s["step"],
             tokens_per_s=args.ranks * rollouts * (s["length"] or args.completion_length) / s["step"])
    bandwidth = setup["peaks"][0]
    if s["generate"]:
        calls = 1 if args.generation_batch_size <= 0 else -(-rollouts // args.generation_batch_size)
        s["decode_gbs"] = decode_bandwidth_gbs(setup["decode_bytes"], args.completion_length * calls, s["generate"])
        s["decode_fraction"] = s["decode_gbs"] / bandwidth if bandwidth else None
    if phases:
        for phase, flops in phase_flops(args, setup, share_prompt).items():
            seconds = s[phase]
            achieved = flops / seconds if flops and seconds else None
            s[f"{phase}_flops"], s[f"{phase}_flop_s"] = flops, achieved
            s[f"{phase}_of_peak"] = achieved / setup["flop_peak"] if achieved and setup["flop_peak"] else None
    return s


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def print_rows(lines: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    for row in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))


def print_table(results: dict[str, dict]) -> None:
    lines = [["run", "s/step (min-max)", "rollouts/s", "tokens/s", "prompts", "generate", "score", "logps", "update",
              "peak GB", "decode GB/s (of device)"]]
    for kind, s in results.items():
        lines.append([kind, f"{s['step']:.3f} ({s['step_min']:.3f}-{s['step_max']:.3f})", f"{s['rollouts_per_s']:.2f}",
                      f"{s['tokens_per_s']:.0f}", *(_fmt(s[k], ".3f") for k in ("prompts", "generate", "score", "logps", "update")),
                      _fmt(s["peak_gb"], ".2f"),
                      f"{_fmt(s.get('decode_gbs'), '.1f')} ({_fmt(s.get('decode_fraction'), '.1%')})"])
    print_rows(lines)


def print_phase_table(results: dict[str, dict], peak_label: str) -> None:
    """Per phase of our runs: seconds, model FLOPs, achieved FLOP/s and its share of the peak, peak memory."""
    lines = [["run", "phase", "seconds", "GFLOP", "GFLOP/s", f"of {peak_label}", "phase peak GB", "process peak RSS GB"]]
    for kind, s in results.items():
        if f"{PHASES[0]}_flops" not in s:
            continue
        for phase in PHASES:
            lines.append([kind, phase, _fmt(s[phase], ".3f"), _fmt(s[f"{phase}_flops"] / 1e9, ".1f"),
                          _fmt(s[f"{phase}_flop_s"] and s[f"{phase}_flop_s"] / 1e9, ".2f"),
                          _fmt(s[f"{phase}_of_peak"], ".1%"), _fmt(s[f"{phase}_gb"], ".2f"), _fmt(s["rss_gb"], ".2f")])
    print_rows(lines)


def print_profile(profile: dict) -> None:
    """One rank's profiled step: each phase's wall time split into op classes (op_class)."""
    classes = [*OP_CLASSES, "other", "outside ops"]
    lines = [["phase", "wall s", *classes]]
    for phase, p in profile["phases"].items():
        lines.append([phase, f"{p['wall_seconds']:.3f}",
                      *(f"{p['classes'][c] / p['wall_seconds']:.1%}" if p["wall_seconds"] else "n/a" for c in classes)])
    print_rows(lines)
    for phase, p in profile["phases"].items():
        top = sorted(p["top_ops"], key=lambda o: -o["seconds"])[:5]
        print(f"  {phase}, the top ops by self time: "
              + "; ".join(f"{o['op']} {' x '.join(map(str, o['shapes']))} {o['seconds']:.3f} s in {o['calls']} call(s)"
                          for o in top))


def machine() -> dict:
    import torch
    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return dict(cpu=cpu, cores=os.cpu_count(), gpu=gpu, torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version(), date=datetime.datetime.now().isoformat(timespec="seconds"))


def device_peaks(gpu: str | None, bandwidth: float | None, tflops: float | None) -> tuple:
    known = next((peaks for name, peaks in DEVICE_PEAKS.items() if gpu and name in gpu), (None, None))
    return bandwidth or known[0], tflops or known[1]


def _true_false(value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"true or false, not {value!r}")
    return value.lower() == "true"


def parse_args(argv):
    from grpo.config import ATTN_IMPLEMENTATIONS, UsageParser

    p = UsageParser(prog="bench.py", description=__doc__.split("\n")[0],
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny", choices=["tiny", "demo", *MODELS], help="Architecture, random weights.")
    p.add_argument("--layers", type=int, default=None, help="Cut a published model to this many decoder layers "
                   "(widths, vocabulary and vision tower unchanged; default: all).")
    p.add_argument("--vision_layers", type=int, default=None, help="Cut its vision tower to this many blocks (default: all).")
    p.add_argument("--image_size", type=int, default=448, help="Square image side in pixels (448: 256 image tokens; "
                   "1344: 2,304).")
    p.add_argument("--prompt_words", type=int, default=20, help="Words in each problem text.")
    p.add_argument("--prompts", type=int, default=2, help="Prompts per step per rank (--per_device_train_batch_size).")
    p.add_argument("--G", type=int, default=8, help="Completions per prompt (--num_generations).")
    p.add_argument("--completion_length", type=int, default=64, help="Tokens per completion, exactly (no early stop).")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (0: no reference model).")
    p.add_argument("--share_prompt", default="true", choices=["true", "false"], help="Our trainer's --share_prompt.")
    p.add_argument("--generation_batch_size", type=int, default=0, help="Our completions per generate call (0: all).")
    p.add_argument("--compile_decode", type=_true_false, default=None,
                   help="Our trainer's --compile_decode (default: train.py's, true on a GPU and false on the CPU).")
    p.add_argument("--gradient_checkpointing", type=_true_false, default=False,
                   help="Our trainer's --gradient_checkpointing (the update's FLOPs then count the recompute).")
    p.add_argument("--freeze_embeddings", type=_true_false, default=False, help="Our policy's input embedding and "
                   "lm_head get no gradient and no optimizer state (for a model whose vocabulary's training state "
                   "does not fit; run through train_worker).")
    p.add_argument("--ranks", type=int, default=1, help="Ours on this many ranks: deepspeed --num_gpus RANKS train.py "
                   "... --deepspeed zero3.json (ZeRO-3); each rank samples its own --prompts prompts.")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="Weights and compute dtype.")
    p.add_argument("--attn_implementation", default=None, choices=ATTN_IMPLEMENTATIONS, help="sdpa, eager or "
                   "flash_attention_2 (default: train.py's, flash_attention_2 where it can run, else sdpa), for both "
                   "trainers.")
    p.add_argument("--steps", type=int, default=3, help="Timed steps per run.")
    p.add_argument("--warmup_steps", type=int, default=1, help="Steps run first and not timed.")
    p.add_argument("--repeats", type=int, default=3, help="Runs per kind, alternated between kinds.")
    p.add_argument("--compare", default="none",
                   choices=["none", "trl", "share_prompt", "lora", "compile_decode", "prefetch"],
                   help="trl: also TRL's GRPOTrainer; share_prompt: ours with --share_prompt true and false; "
                        "lora: ours training every weight, LoRA adapters (--use_peft true), and LoRA with its "
                        "adapters unmerged while sampling; compile_decode: ours with the decode step compiled and "
                        "eager; prefetch: ours with each step's prompts prepared ahead (--dataloader_num_workers 1, a "
                        "GPU's default) and in the step (0, the CPU's default).")
    p.add_argument("--profile", action="store_true", help="Then one more run of ours whose step after the warm-up "
                   "runs under torch.profiler: per phase, the share of time in matmuls, attention, softmax, copies, "
                   "elementwise ops, communication, other ops and outside any op.")
    p.add_argument("--threads", type=int, default=None, help="torch threads of every run, per rank "
                   "(default: the cores divided among the ranks).")
    p.add_argument("--device_bandwidth_gbs", type=float, default=None, help="Memory bandwidth (default: H100 3350, H200 4800).")
    p.add_argument("--device_tflops", type=float, default=None, help="Dense bf16 TFLOP/s (default: H100/H200 989; "
                   "on the CPU the matmul peak bench.py measures).")
    p.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    p.add_argument("--keep_dir", default=None, help="Build the model, data and runs here and keep them.")
    p.add_argument("--data_rows", type=int, nargs="+", default=None, help="Time the data check instead of steps: "
                   "launch to train.py's data line on this many photo-sized rows (e.g. 1000 8000 40000), cold and reused.")
    p.add_argument("--data_ranks", type=int, nargs="+", default=[1, 2], help="--data_rows: on this many ranks (each).")
    p.add_argument("--repeat_pictures", action="store_true", help="--data_rows: the rows cycle through 64 pictures "
                   "with the same bytes (several questions per picture); default: every row's bytes its own.")
    p.add_argument("--against", default=None, help="--data_rows: also time the train.py of this folder (another "
                   "checkout, e.g. `git worktree add ../before COMMIT`) side by side.")
    p.add_argument("--trl_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--train_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        check_depths(args.model, args.layers, args.vision_layers)
    except ValueError as e:
        p.error(str(e))
    if args.ranks < 1:
        p.error(f"--ranks {args.ranks}: give 1 or more")
    if args.ranks > 1 and args.compare == "trl":
        p.error("--compare trl runs TRL's GRPOTrainer on one process: use it with --ranks 1")
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.ranks)
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.trl_worker:
        return trl_worker(args.trl_worker)
    if args.train_worker:
        return train_worker(args.train_worker)
    if args.data_rows:
        return data_check_main(args)
    if args.compare == "trl":
        try:
            import trl
        except ImportError:
            sys.exit("--compare trl needs TRL, a benchmark-only dependency: pip install trl")
    import torch
    from PIL import Image
    from transformers import AutoConfig

    from grpo import families
    from grpo.config import attention_for, flash_attn_version
    from grpo.data import build_conversation

    info = machine()
    print(f"$ python {' '.join(['bench.py', *argv])}")
    print(f"{info['date']} | {info['gpu'] or info['cpu']} | {info['cores']} cores | {args.ranks} rank(s) x "
          f"{args.threads} torch threads | python {info['python']}, torch {info['torch']}, "
          f"transformers {info['transformers']}" + (f", trl {trl.__version__}" if args.compare == "trl" else "")
          + f" | load average (1 min) {os.getloadavg()[0]:.2f}")
    # This machine's matmul peak, with the runs' threads: the denominator on the CPU.
    peaks = {dtype: matmul_peak(dtype, args.threads) for dtype in ("float32", "bfloat16")}
    for dtype, rates in peaks.items():
        print(f"matmul peak, {dtype}, {args.threads} thread(s): {rates['peak'] / 1e9:.1f} GFLOP/s ("
              + ", ".join(f"{layout} {rate / 1e9:.1f}" for layout, rate in rates.items() if layout != "peak") + ")")
    workdir = args.keep_dir or tempfile.mkdtemp(prefix="bench-")
    os.makedirs(workdir, exist_ok=True)
    cut = "".join(f"-{tag}{n}" for tag, n in (("L", args.layers), ("V", args.vision_layers)) if n is not None)
    folder = os.path.join(workdir, f"model-{args.model}{cut}")
    data = os.path.join(workdir, f"data-{args.image_size}.parquet")
    if not os.path.exists(os.path.join(folder, "config.json")):
        t0 = time.time()
        save_model_folder(args.model, folder, args.dtype, args.layers, args.vision_layers)
        print(f"built {args.model}{cut} in {folder} ({time.time() - t0:.0f} s)")
    write_dataset(data, args.ranks * args.prompts * (args.warmup_steps + args.steps), args.image_size, args.prompt_words)

    config = AutoConfig.from_pretrained(folder)
    counts = param_counts(config)
    # The prompt as train.py builds it (its processor, the same pixel limits): counted, not assumed.
    pixels = args.image_size ** 2
    processor = families.load_processor(folder, pixels, pixels)
    prompt = families.build_inputs(processor, [build_conversation(" ".join(["red"] * args.prompt_words))],
                                      [[Image.new("RGB", (args.image_size, args.image_size))]],
                                      families.family_of(config))
    patches, image_toks = image_tokens(args.image_size)
    measured_image_tokens = int((prompt["input_ids"] == config.image_token_id).sum())
    if measured_image_tokens != image_toks:
        sys.exit(f"the processor gives {measured_image_tokens} image tokens for a {args.image_size}-px image, "
                 f"not the {image_toks} the FLOP count assumes")
    prompt_tokens = prompt["input_ids"].shape[1]
    on_gpu = torch.cuda.is_available()
    attn = attention_for(args.attn_implementation, args.dtype == "bfloat16", on_gpu, flash_attn_version())
    device = device_peaks(info["gpu"], args.device_bandwidth_gbs, args.device_tflops)
    # The denominator of each phase's FLOP/s: a known GPU's dense bf16 peak for a bf16 run, else the
    # matmul peak measured here in the run's dtype.
    flop_peak, peak_label = ((device[1] * 1e12, "device bf16 peak") if device[1] and args.dtype == "bfloat16" else
                             (peaks[args.dtype]["peak"], f"measured {args.dtype} matmul peak"))
    setup = dict(folder=folder, data=data, attn=attn, counts=counts, config=config, prompt_tokens=prompt_tokens,
                 on_gpu=on_gpu, decode_bytes=decode_weight_bytes(counts, 2 if args.dtype == "bfloat16" else 4),
                 peaks=device, flop_peak=flop_peak)
    print(f"model {args.model}{cut}: {counts['total'] / 1e6:.1f}M parameters (text {counts['text'] / 1e6:.1f}M in "
          f"{config.text_config.num_hidden_layers} layers, vision {counts['vision'] / 1e6:.1f}M in "
          f"{config.vision_config.depth} blocks, embedding {counts['embedding'] / 1e6:.1f}M"
          + ("" if config.tie_word_embeddings else f", lm_head {counts['lm_head'] / 1e6:.1f}M")
          + f"), {args.dtype}, {attn}" + (", gradient checkpointing" if args.gradient_checkpointing else "")
          + (", embeddings frozen" if args.freeze_embeddings else ""))
    print(f"step{' per rank' if args.ranks > 1 else ''}: {args.prompts} prompts x G={args.G} = {args.prompts * args.G} "
          f"rollouts of {args.completion_length} tokens; prompt {prompt_tokens} tokens ({image_toks} image tokens, "
          f"{args.image_size}x{args.image_size}); beta {args.beta}; {args.warmup_steps} warm-up + {args.steps} timed "
          f"steps x {args.repeats} runs" + (f"; {args.ranks} ranks, ZeRO-3 (zero3.json)" if args.ranks > 1 else ""))

    # Each run kind: its runner, and whether prompts are forwarded once (our --share_prompt true) or
    # G times (ours with false, and TRL), for the FLOP counts; only ours logs its phases.
    share = args.share_prompt == "true"
    kinds = {f"ours (share_prompt {str(share).lower()})": (lambda: run_ours(args, setup, share, workdir), share, True)}
    if args.compare == "compile_decode":  # the compiled run first: the ratio printed is its speed-up
        kinds = {f"ours (compile_decode {str(compiled).lower()})":
                 (lambda compiled=compiled: run_ours(args, setup, share, workdir, compile_decode=compiled), share, True)
                 for compiled in (True, False)}
    if args.compare == "share_prompt":
        kinds[f"ours (share_prompt {str(not share).lower()})"] = (lambda: run_ours(args, setup, not share, workdir),
                                                                  not share, True)
    if args.compare == "lora":  # its update's FLOPs differ (no weight gradients but the adapters'): times and memory only
        kinds[f"ours, LoRA (share_prompt {str(share).lower()})"] = (
            lambda: run_ours(args, setup, share, workdir, lora=True), share, False)
        kinds[f"ours, LoRA unmerged while sampling (share_prompt {str(share).lower()})"] = (
            lambda: run_ours(args, setup, share, workdir, lora=True, unmerged=True), share, False)
    if args.compare == "trl":
        kinds["trl"] = (lambda: run_trl(args, setup, workdir), False, False)
    if args.compare == "prefetch":  # step 1 (prompts: rows read, pictures processed) on the critical path or not
        kinds = {f"ours, prompts prepared {where}": (
            lambda workers=workers: run_ours(args, setup, share, workdir, extra=("--dataloader_num_workers", workers)),
            share, True) for where, workers in (("ahead", "1"), ("in the step", "0"))}
    flops = {kind: phase_flops(args, setup, share_prompt) for kind, (_, share_prompt, _) in kinds.items()}
    for kind, per_phase in flops.items():
        print(f"FLOPs{' per rank' if args.ranks > 1 else ''} ({kind}): "
              + ", ".join(f"{phase} {value / 1e9:.1f} G" for phase, value in per_phase.items()))
    runs = {kind: [] for kind in kinds}
    for repeat in range(args.repeats):  # alternated, so drift in the machine's speed hits every kind alike
        for kind, (run, _, _) in kinds.items():
            t0 = time.time()
            runs[kind].append(run())
            steps = ", ".join(f"{s['step']:.3f}" for s in runs[kind][-1])
            print(f"  run {repeat + 1}/{args.repeats} {kind}: timed steps {steps} s ({time.time() - t0:.0f} s in all)")
    results = {kind: summarise(runs[kind], args, setup, share_prompt, phases)
               for kind, (_, share_prompt, phases) in kinds.items()}
    for kind, s in results.items():  # runs compare only when every completion has the full length
        if s["length"] is not None and abs(s["length"] - args.completion_length) > 0.5:
            print(f"warning: {kind} sampled {s['length']:.1f} tokens per completion, not {args.completion_length}")
    profile = None
    if args.profile:
        t0 = time.time()
        profile = run_ours(args, setup, share, workdir, profile=True)[0]["profile"]
        print(f"  profiled run: {args.warmup_steps} warm-up step(s), then one step under torch.profiler "
              f"({time.time() - t0:.0f} s in all)")
    load = os.getloadavg()[0]
    print(f"load average (1 min) at the end: {load:.2f} on {os.cpu_count()} cores"
          + (" -- other work was running; these numbers are not clean" if load > 1.5 * args.threads * args.ranks else ""))
    print()
    print_table(results)
    if args.ranks > 1:
        print(f"(rollouts/s and tokens/s: all {args.ranks} ranks together; peak GB: on the CPU the largest rank's "
              "resident memory, on a GPU the mean over ranks of its largest phase peak)")
    names = list(results)
    if len(names) == 2:
        ratio = results[names[1]]["step"] / results[names[0]]["step"]
        print(f"\n{names[0]} / {names[1]} step throughput: {ratio:.2f}x (medians of {args.repeats} runs)")
    if args.compare == "compile_decode":
        generate = results[names[1]]["generate"] / results[names[0]]["generate"]
        print(f"generate phase: {generate:.2f}x faster compiled; the first step's generate (a compile, "
              "not timed above): " + ", ".join(f"{kind} {_fmt(s['first_generate'], '.1f')} s" for kind, s in results.items()))
    print("\nPer phase" + (f", per rank (each of {args.ranks} ranks; times and phase memory are the mean over ranks, "
                           "the process's RSS the largest rank's)" if args.ranks > 1 else "")
          + f"; FLOPs by the formulas in bench.py, peak {_fmt(flop_peak and flop_peak / 1e9, '.1f')} GFLOP/s:")
    print_phase_table(results, peak_label)
    if not on_gpu:
        print("(on the CPU a phase's peak memory is the process's peak resident memory during that phase: "
              "train.py resets it at each phase's start)")
    if profile:
        print(f"\nWhere the time goes, rank 0's profiled step ({'self device' if profile[0]['device_time'] else 'self CPU'}"
              " time per op class, as a share of each phase's wall time):")
        print_profile(profile[0])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(command=["bench.py", *argv], machine=info, args=vars(args), prompt_tokens=prompt_tokens,
                           params=counts, matmul_peaks=peaks, flop_peak=flop_peak, flops=flops, results=results,
                           runs=runs, profile=profile), f, indent=1)
    if not args.keep_dir:
        shutil.rmtree(workdir, ignore_errors=True)


def cli(argv: list[str]) -> int:
    from grpo.config import exit_status

    return exit_status("bench.py", lambda: main(argv))


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
