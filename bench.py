"""bench.py: time full GRPO steps of the real code path, and compare them with TRL's GRPOTrainer.

Each measured run is `python train.py ...` in its own process (the real trainer, one process, no
launcher) on a model folder and a parquet file that this script writes first, with random weights,
so nothing is downloaded. Per run kind it prints seconds per step, rollouts per second, completion
tokens per second, and per phase (generate, score, reference / old log-probs, update) seconds and
peak memory; for decoding the achieved weight-read bandwidth against the device's, for the update
its model FLOPs utilisation (formulas in `decode_bandwidth_gbs` and `update_flops`). The first
`--warmup_steps` steps of every run are dropped; what is reported are medians over the timed steps
of a run and then over `--repeats` runs, with the run kinds alternated so slow drift hits all alike.
Peak memory is the GPU's allocated peak on CUDA, and the whole process's peak resident memory on
the CPU (the same measure for both trainers). On a shared CPU other work skews everything: the load
average is printed at the start and the end.

Models (`--model`): `tiny` (a Qwen2-VL with text hidden size 256 and 4 layers, for the CPU),
`qwen2-vl-2b` and `qwen2.5-vl-7b` (the published Qwen/Qwen2-VL-2B-Instruct and
Qwen/Qwen2.5-VL-7B-Instruct architectures, written out below, with a word-level tokenizer that
covers the whole vocabulary so every sampled id decodes). Completions are always exactly
`--completion_length` tokens long (no early stop), so runs compare.

`--compare trl` also runs TRL's GRPOTrainer on the same model folder, data and settings, and prints
the throughput ratio from the same bench run. TRL is a benchmark-only dependency: `pip install trl`.
`--compare share_prompt` runs ours with `--share_prompt true` and `false`.

Examples:
    # the CPU acceptance measurement (2 prompts x G = 8, 64 tokens, 448 x 448 images = 256 image tokens)
    python bench.py --model tiny --image_size 448 --prompts 2 --G 8 --completion_length 64 --beta 0.04 \\
        --compare trl --repeats 3 --steps 3
    # the same with small images (4 image tokens)
    python bench.py --model tiny --image_size 56 --compare trl --repeats 3 --steps 3
    # one GPU
    python bench.py --model qwen2-vl-2b --dtype bfloat16 --image_size 448 --G 8 --completion_length 256 \\
        --beta 0.04 --compare share_prompt
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import io
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

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


def model_config(name: str):
    """The transformers config of a published architecture (`MODELS[name]`)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    spec = MODELS[name]
    ids = dict(bos_token_id=QWEN_SPECIAL_IDS["<|endoftext|>"], eos_token_id=QWEN_SPECIAL_IDS["<|im_end|>"],
               pad_token_id=QWEN_SPECIAL_IDS["<|endoftext|>"])
    config_class = {"qwen2_vl": Qwen2VLConfig, "qwen2_5_vl": Qwen2_5_VLConfig}[spec["family"]]
    return config_class(
        text_config={**spec["text"], **ids}, vision_config=dict(spec["vision"]),
        image_token_id=QWEN_SPECIAL_IDS["<|image_pad|>"], video_token_id=QWEN_SPECIAL_IDS["<|video_pad|>"],
        vision_start_token_id=QWEN_SPECIAL_IDS["<|vision_start|>"],
        vision_end_token_id=QWEN_SPECIAL_IDS["<|vision_end|>"], tie_word_embeddings=spec["tie_word_embeddings"])


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


def save_model_folder(name: str, folder: str, dtype: str) -> str:
    """Write a random model of architecture `name` with its tokenizer and processor to `folder`,
    loadable by `from_pretrained` exactly like a real checkpoint."""
    if name == "tiny":
        from demo import save_tiny_qwen2_vl

        return save_tiny_qwen2_vl(folder, hidden_size=256, num_layers=4)
    import torch
    from transformers import (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)

    from demo import CHAT_TEMPLATE

    config = model_config(name)
    model_class, processor_class = {"qwen2_vl": (Qwen2VLForConditionalGeneration, Qwen2VLProcessor),
                                    "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor)}[config.model_type]
    tokenizer = build_full_vocab_tokenizer(config.text_config.vocab_size)
    # Initialise on the GPU in the run's dtype when there is one: minutes faster for billions of weights.
    torch.set_default_dtype(getattr(torch, dtype))
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = model_class(config)
    torch.set_default_dtype(torch.float32)
    model.generation_config.eos_token_id = QWEN_SPECIAL_IDS["<|im_end|>"]
    model.generation_config.pad_token_id = QWEN_SPECIAL_IDS["<|endoftext|>"]
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
    (the vision tower and its merger), and `total` (each tensor once)."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    counts = dict(text=0, embedding=0, lm_head=0, vision=0)
    for name, p in model.named_parameters():  # tied weights are listed once
        part = ("vision" if ".visual." in name else "embedding" if "embed_tokens" in name
                else "lm_head" if name.startswith("lm_head") else "text")
        counts[part] += p.numel()
    counts["total"] = sum(counts.values())
    counts["lm_head"] = model.get_output_embeddings().weight.numel()  # used for FLOPs even when tied
    return counts

# ---------------------------------------------------------------------------------------------
# The arithmetic: decode bandwidth and update FLOPs.
# ---------------------------------------------------------------------------------------------


def decode_weight_bytes(counts: dict[str, int], bytes_per_param: int) -> int:
    """Bytes of weights one decode step reads: every decoder layer and the output projection
    (the embedding lookup reads only B x G rows; the vision tower does not run while decoding)."""
    return (counts["text"] + counts["lm_head"]) * bytes_per_param


def decode_bandwidth_gbs(weight_bytes: int, decode_steps: int, generate_seconds: float) -> float:
    """Achieved weight-read bandwidth of generation in GB/s: weight_bytes x decode_steps / seconds.
    decode_steps is completion_length per generate call; generate's seconds include the prefill (the
    vision tower and the prompt), so this is a lower bound on the decode loop's own bandwidth."""
    return weight_bytes * decode_steps / generate_seconds / 1e9


def update_flops(counts: dict[str, int], prompt_tokens: int, completion_tokens: int, image_patches: int,
                 prompts: int, group_size: int, share_prompt: bool) -> float:
    """Model FLOPs of one update step, 6 per parameter per token (forward 2, backward 4), with
    B = prompts, G = group_size, P = prompt tokens (image tokens included), T = completion tokens:

        6 x text params x tokens,  tokens = B x P + B x G x T   (share_prompt: each prompt forwarded once)
                                   tokens = B x G x (P + T)     (otherwise: each prompt G times)
      + 6 x lm_head params x B x G x T                          (logits only for completion tokens)
      + 6 x vision params x image_patches x (B or B x G)        (the vision tower, per image forwarded)

    Attention's terms that grow with sequence length squared are left out, and the vision merger is
    counted per patch although it runs per 2 x 2 patches (a small overcount)."""
    copies = prompts if share_prompt else prompts * group_size
    completions = prompts * group_size * completion_tokens
    return 6.0 * (counts["text"] * (copies * prompt_tokens + completions) + counts["lm_head"] * completions
                  + counts["vision"] * image_patches * copies)


def image_tokens(image_size: int, patch: int = 14, merge: int = 2) -> tuple[int, int]:
    """(patches, image tokens) of a square image: 14-px patches, merged 2 x 2 into one token."""
    patches = (image_size // patch) ** 2
    return patches, patches // merge ** 2

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
        _, status, usage = os.wait4(process.pid, 0)  # the child's own rusage: its peak RSS
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-4000:]
        raise RuntimeError(f"{' '.join(command[:3])} ... failed (exit {process.returncode}); "
                           f"the end of {log_path}:\n{tail}")
    return usage.ru_maxrss / 1e6  # kilobytes on Linux


def run_ours(args, setup: dict, share_prompt: bool, workdir: str) -> list[dict]:
    """One `python train.py` run; the timed steps' metrics from its metrics.jsonl."""
    out = tempfile.mkdtemp(prefix="ours-", dir=workdir)
    pixels = args.image_size ** 2  # min = max = the image's area: no resizing
    command = [sys.executable, "train.py", "--model_name_or_path", setup["folder"], "--dataset_name", setup["data"],
               "--output_dir", out, "--max_steps", str(args.warmup_steps + args.steps),
               "--per_device_train_batch_size", str(args.prompts), "--num_generations", str(args.G),
               "--max_completion_length", str(args.completion_length), "--beta", str(args.beta),
               "--min_pixels", str(pixels), "--max_pixels", str(pixels), "--learning_rate", "1e-6",
               "--logging_steps", "1", "--report_to", "none", "--save_steps", "0", "--log_completions_steps", "0",
               "--attn_implementation", setup["attn"], "--bf16", str(args.dtype == "bfloat16").lower(),
               "--share_prompt", str(share_prompt).lower(), "--generation_batch_size", str(args.generation_batch_size),
               "--ignore_eos", "true"]  # exactly completion_length tokens: runs compare
    peak_rss = run_process(command, os.path.join(out, "bench.log"), args.threads)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f if line.strip()]
    steps = []
    for m in logged[args.warmup_steps:]:
        peaks = [m[k] for k in ("memory/generate_peak_gb", "memory/logps_peak_gb", "memory/update_peak_gb") if k in m]
        steps.append(dict(step=m["time/step_seconds"], generate=m.get("time/generate_seconds"),
                          score=m.get("time/score_seconds"), logps=m.get("time/logps_seconds"),
                          update=m.get("time/update_seconds"), length=m.get("completion/length_mean"),
                          peak_gb=max(peaks) if setup["on_gpu"] and peaks else peak_rss))
    if not args.keep_dir:
        shutil.rmtree(out, ignore_errors=True)
    return steps


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
# Summary and report.
# ---------------------------------------------------------------------------------------------


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(runs: list[list[dict]], args, setup: dict, share_prompt: bool) -> dict:
    """Medians over each run's timed steps, then over runs; rates and utilisation from them."""
    per_run = [{k: _median([s.get(k) for s in run]) for k in ("step", "generate", "score", "logps", "update",
                                                                 "length", "peak_gb")} for run in runs]
    s = {k: _median([r[k] for r in per_run]) for k in per_run[0]}
    all_steps = [x["step"] for run in runs for x in run]
    rollouts = args.prompts * args.G
    s.update(runs=len(runs), step_min=min(all_steps), step_max=max(all_steps), rollouts_per_s=rollouts / s["step"],
             tokens_per_s=rollouts * (s["length"] or args.completion_length) / s["step"])
    bandwidth, tflops = setup["peaks"]
    if s["generate"]:
        calls = 1 if args.generation_batch_size <= 0 else -(-rollouts // args.generation_batch_size)
        s["decode_gbs"] = decode_bandwidth_gbs(setup["decode_bytes"], args.completion_length * calls, s["generate"])
        s["decode_fraction"] = s["decode_gbs"] / bandwidth if bandwidth else None
    if s["update"]:
        patches, _ = image_tokens(args.image_size)
        flops = update_flops(setup["counts"], setup["prompt_tokens"], args.completion_length, patches, args.prompts,
                             args.G, share_prompt)
        s["update_tflops"] = flops / s["update"] / 1e12
        s["update_mfu"] = s["update_tflops"] / tflops if tflops else None
    return s


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def print_table(results: dict[str, dict]) -> None:
    header = ["run", "s/step (min-max)", "rollouts/s", "tokens/s", "generate", "score", "logps", "update",
              "peak GB", "decode GB/s (of device)", "update TFLOP/s (MFU)"]
    lines = [header]
    for kind, s in results.items():
        lines.append([kind, f"{s['step']:.3f} ({s['step_min']:.3f}-{s['step_max']:.3f})", f"{s['rollouts_per_s']:.2f}",
                      f"{s['tokens_per_s']:.0f}", *(_fmt(s[k], ".3f") for k in ("generate", "score", "logps", "update")),
                      _fmt(s["peak_gb"], ".2f"),
                      f"{_fmt(s.get('decode_gbs'), '.1f')} ({_fmt(s.get('decode_fraction'), '.1%')})",
                      f"{_fmt(s.get('update_tflops'), '.3f')} ({_fmt(s.get('update_mfu'), '.1%')})"])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    for row in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))


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


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny", choices=["tiny", *MODELS], help="Architecture, random weights.")
    p.add_argument("--image_size", type=int, default=448, help="Square image side in pixels (448: 256 image tokens).")
    p.add_argument("--prompt_words", type=int, default=20, help="Words in each problem text.")
    p.add_argument("--prompts", type=int, default=2, help="Prompts per step (--per_device_train_batch_size).")
    p.add_argument("--G", type=int, default=8, help="Completions per prompt (--num_generations).")
    p.add_argument("--completion_length", type=int, default=64, help="Tokens per completion, exactly (no early stop).")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (0: no reference model).")
    p.add_argument("--share_prompt", default="true", choices=["true", "false"], help="Our trainer's --share_prompt.")
    p.add_argument("--generation_batch_size", type=int, default=0, help="Our completions per generate call (0: all).")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="Weights and compute dtype.")
    p.add_argument("--attn_implementation", default=None, help="sdpa, eager or flash_attention_2 "
                   "(default: flash_attention_2 on a GPU when installed, else sdpa), for both trainers.")
    p.add_argument("--steps", type=int, default=3, help="Timed steps per run.")
    p.add_argument("--warmup_steps", type=int, default=1, help="Steps run first and not timed.")
    p.add_argument("--repeats", type=int, default=3, help="Runs per kind, alternated between kinds.")
    p.add_argument("--compare", default="none", choices=["none", "trl", "share_prompt"],
                   help="trl: also TRL's GRPOTrainer; share_prompt: ours with --share_prompt true and false.")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of every run.")
    p.add_argument("--device_bandwidth_gbs", type=float, default=None, help="Memory bandwidth (default: H100 3350, H200 4800).")
    p.add_argument("--device_tflops", type=float, default=None, help="Dense bf16 TFLOP/s (default: H100/H200 989).")
    p.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    p.add_argument("--keep_dir", default=None, help="Build the model, data and runs here and keep them.")
    p.add_argument("--trl_worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.trl_worker:
        return trl_worker(args.trl_worker)
    if args.compare == "trl":
        try:
            import trl
        except ImportError:
            sys.exit("--compare trl needs TRL, a benchmark-only dependency: pip install trl")
    import torch
    from PIL import Image
    from transformers import AutoConfig

    from grpo import vlm_adapter
    from grpo.data import build_conversation

    info = machine()
    print(f"$ python {' '.join(['bench.py', *argv])}")
    print(f"{info['date']} | {info['gpu'] or info['cpu']} | {info['cores']} cores | {args.threads} torch threads | "
          f"python {info['python']}, torch {info['torch']}, transformers {info['transformers']}"
          + (f", trl {trl.__version__}" if args.compare == "trl" else "")
          + f" | load average (1 min) {os.getloadavg()[0]:.2f}")
    workdir = args.keep_dir or tempfile.mkdtemp(prefix="bench-")
    os.makedirs(workdir, exist_ok=True)
    folder, data = os.path.join(workdir, f"model-{args.model}"), os.path.join(workdir, f"data-{args.image_size}.parquet")
    if not os.path.exists(os.path.join(folder, "config.json")):
        t0 = time.time()
        save_model_folder(args.model, folder, args.dtype)
        print(f"built {args.model} in {folder} ({time.time() - t0:.0f} s)")
    write_dataset(data, args.prompts * (args.warmup_steps + args.steps), args.image_size, args.prompt_words)

    config = AutoConfig.from_pretrained(folder)
    counts = param_counts(config)
    # The prompt as train.py builds it (its processor, the same pixel limits): counted, not assumed.
    pixels = args.image_size ** 2
    processor = vlm_adapter.load_processor(folder, pixels, pixels)
    prompt = vlm_adapter.build_inputs(processor, [build_conversation(" ".join(["red"] * args.prompt_words))],
                                      [[Image.new("RGB", (args.image_size, args.image_size))]],
                                      vlm_adapter.family_of(config))
    patches, image_toks = image_tokens(args.image_size)
    measured_image_tokens = int((prompt["input_ids"] == config.image_token_id).sum())
    if measured_image_tokens != image_toks:
        sys.exit(f"the processor gives {measured_image_tokens} image tokens for a {args.image_size}-px image, "
                 f"not the {image_toks} the FLOP count assumes")
    prompt_tokens = prompt["input_ids"].shape[1]
    attn = args.attn_implementation or ("flash_attention_2" if torch.cuda.is_available()
                                        and importlib.util.find_spec("flash_attn") else "sdpa")
    setup = dict(folder=folder, data=data, attn=attn, counts=counts, prompt_tokens=prompt_tokens,
                 on_gpu=torch.cuda.is_available(),
                 decode_bytes=decode_weight_bytes(counts, 2 if args.dtype == "bfloat16" else 4),
                 peaks=device_peaks(info["gpu"], args.device_bandwidth_gbs, args.device_tflops))
    print(f"model {args.model}: {counts['total'] / 1e6:.1f}M parameters (text {counts['text'] / 1e6:.1f}M, "
          f"vision {counts['vision'] / 1e6:.1f}M, embedding {counts['embedding'] / 1e6:.1f}M), {args.dtype}, {attn}")
    print(f"step: {args.prompts} prompts x G={args.G} = {args.prompts * args.G} rollouts of {args.completion_length} "
          f"tokens; prompt {prompt_tokens} tokens ({image_toks} image tokens, {args.image_size}x{args.image_size}); "
          f"beta {args.beta}; {args.warmup_steps} warm-up + {args.steps} timed steps x {args.repeats} runs")

    # Each run kind: its runner, and whether prompts are forwarded once (our --share_prompt true) or
    # G times (ours with false, and TRL), for the update's FLOPs.
    share = args.share_prompt == "true"
    kinds = {f"ours (share_prompt {str(share).lower()})": (lambda: run_ours(args, setup, share, workdir), share)}
    if args.compare == "share_prompt":
        kinds[f"ours (share_prompt {str(not share).lower()})"] = (lambda: run_ours(args, setup, not share, workdir),
                                                                  not share)
    if args.compare == "trl":
        kinds["trl"] = (lambda: run_trl(args, setup, workdir), False)
    runs = {kind: [] for kind in kinds}
    for repeat in range(args.repeats):  # alternated, so drift in the machine's speed hits every kind alike
        for kind, (run, _) in kinds.items():
            t0 = time.time()
            runs[kind].append(run())
            steps = ", ".join(f"{s['step']:.3f}" for s in runs[kind][-1])
            print(f"  run {repeat + 1}/{args.repeats} {kind}: timed steps {steps} s ({time.time() - t0:.0f} s in all)")
    results = {kind: summarise(runs[kind], args, setup, share_prompt) for kind, (_, share_prompt) in kinds.items()}
    for kind, s in results.items():  # runs compare only when every completion has the full length
        if s["length"] is not None and abs(s["length"] - args.completion_length) > 0.5:
            print(f"warning: {kind} sampled {s['length']:.1f} tokens per completion, not {args.completion_length}")
    load = os.getloadavg()[0]
    print(f"load average (1 min) at the end: {load:.2f} on {os.cpu_count()} cores"
          + (" -- other work was running; these numbers are not clean" if load > 1.5 * args.threads else ""))
    print()
    print_table(results)
    names = list(results)
    if len(names) == 2:
        ratio = results[names[1]]["step"] / results[names[0]]["step"]
        print(f"\n{names[0]} / {names[1]} step throughput: {ratio:.2f}x (medians of {args.repeats} runs)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(command=["bench.py", *argv], machine=info, args=vars(args), prompt_tokens=prompt_tokens,
                           params=counts, results=results, runs=runs), f, indent=1)
    if not args.keep_dir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
