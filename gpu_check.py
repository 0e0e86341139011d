"""gpu_check.py: the GPU checks of the real path, on one H100 or H200, in one script (under 8 minutes).

Random weights at Qwen2-VL-2B's published architecture (bench.py's model, nothing downloaded), bf16:

  1. log-probs: the shared prompt against the plain definition (policy.completion_logps), with
     flash-attention-2 where flash-attn is installed (else sdpa, and the table says so): the largest and
     the mean |difference| over the completion tokens, and each path's seconds;
  2. decode: compiled (--compile_decode true) against eager at the same seed (policy.sample_groups): how
     many completions are the same, tokens per second of each, the compile's seconds and graph count;
  3. LoRA: sampling with the adapters merged into the weights (families.adapters_merged) against
     unmerged: generate's seconds, and the log-probs after the rollouts equal, bit for bit, to those
     before and every weight after equal to itself before (the merge undone exactly, [unmerge drift]);
  4. train.py: a short run per ZeRO stage, read from its metrics.jsonl: each phase's seconds, rollouts per
     second and peak memory of the last step. On one GPU that is stage 0 alone (python train.py): a world of
     one process runs stage 0 whatever the DeepSpeed file says (grpo/distributed.py, fill_deepspeed_config:
     nothing to shard, ZeRO would only add its hooks), every launcher gives one GPU a world of one
     (deepspeed --num_gpus 1, torchrun --nproc_per_node 1), and zero2.json and zero3.json (train.py's
     default) are the same file outside the block that this replaces: their runs would repeat the stage-0
     one. ZeRO-2 and ZeRO-3 run with --ranks 2 or more, one GPU each; the table says why a stage is not run.
     Each run is stopped at --budget_s, so that the table is written in time.

It writes OUT/gpu_check.md (the table docs/PERFORMANCE.md's GPU section takes) and OUT/gpu_check.json.

    python gpu_check.py --out OUT          # on the GPU machine (docs/PERFORMANCE.md: the wheels it needs)
    python gpu_check.py --out OUT --quick  # the same checks on this CPU with the demo's tiny model, in a minute
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import types

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

import bench  # noqa: E402  (the benchmark's model folders, data set and train.py flags)
from grpo import config, families, policy  # noqa: E402
from grpo.data import build_conversation  # noqa: E402

STAGES = {0: None, 2: "zero2.json", 3: "zero3.json"}  # train.py's --deepspeed per ZeRO stage (None: no flag)
# Why a stage is not run, by whether the run has one rank.
NOT_RUN = {
    True: "not run on 1 rank: a world of one runs stage 0 whatever the file says "
          "(distributed.fill_deepspeed_config), under every launcher, and zero2.json and zero3.json are the same "
          "file outside the block that replaces: the stage-0 row is this file's run; run --ranks 2 on 2 GPUs",
    False: "not run on several ranks: they run the file's stage, and no stage-0 file ships"}


def clock(device) -> float:
    """Seconds, once the device has finished the work queued on it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def graphs_compiled() -> int:
    """Graphs torch.compile has made in this process so far (dynamo's own count)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def prompt_inputs(processor, folder: str, image_size: int, prompts: int) -> dict:
    """`prompts` prompts of one picture of image_size x image_size each: left-padded [prompts, P] rows."""
    from PIL import Image

    colours = ("red", "blue", "green", "yellow")
    images = [[Image.new("RGB", (image_size, image_size), colours[i % 4])] for i in range(prompts)]
    conversations = [build_conversation(f"What colour is picture {i}? Think, then answer.") for i in range(prompts)]
    return families.build_inputs(processor, conversations, images, families.check_model_type(folder))


def sampling_for(model, processor, args, **settings) -> policy.Sampling:
    """The run's sampling settings: G completions of exactly --tokens tokens, at temperature 1."""
    return policy.Sampling.for_model(
        model, processor.tokenizer, group_size=args.G, max_new_tokens=args.tokens, temperature=1.0,
        suppressed_ids=tuple(families.forbidden_token_ids(processor, families.unwrap(model).config)),
        ignore_eos=True, **settings)


def random_completions(processor, inputs, args, device) -> tuple[torch.Tensor, torch.Tensor]:
    """G completions per prompt of random tokens and random lengths (1 to --tokens): ids, mask [N, T]."""
    N, T = inputs["input_ids"].shape[0] * args.G, args.tokens
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, processor.tokenizer.vocab_size, (N, T), generator=generator).to(device)  # [N, T]
    lengths = torch.randint(1, T + 1, (N,), generator=generator).to(device)  # [N]
    return ids, (torch.arange(T, device=device)[None] < lengths[:, None]).long()  # [N, T]


def check_logps(args, model, processor, inputs, device) -> dict:
    """1. The shared prompt against the plain definition: random completions of random lengths."""
    G = args.G
    ids, mask = random_completions(processor, inputs, args, device)
    result, found = {}, {}
    with torch.no_grad():
        for share in (True, False):
            policy.completion_logps(model, inputs, ids, mask, 1.0, G, share_prompt=share)  # warm-up
            start = clock(device)
            found[share] = policy.completion_logps(model, inputs, ids, mask, 1.0, G, share_prompt=share).float()
            result[f"{'shared' if share else 'plain'}_seconds"] = clock(device) - start
    difference = (found[True] - found[False]).abs()[mask.bool()]
    result.update(max_abs_difference=difference.max().item(), mean_abs_difference=difference.mean().item(),
                  tokens=int(mask.sum()))
    return result


def check_decode(args, model, processor, inputs, device) -> dict:
    """2. The decode step compiled against eager: two calls each at seed 0, the second one timed (the
    compiled path's first call compiles)."""
    result, samples = {}, {}
    torch._dynamo.reset()
    compiled_before = graphs_compiled()
    for compiled in (False, True):
        sampling = sampling_for(model, processor, args, compile_decode=compiled)
        name = "compiled" if compiled else "eager"
        seconds = []
        for _ in range(2):
            torch.manual_seed(0)
            start = clock(device)
            samples[compiled] = policy.sample_groups(model, inputs, sampling).completion_ids  # [N, T]
            seconds.append(clock(device) - start)
        result[f"{name}_first_call_seconds"], result[f"{name}_seconds"] = seconds
        result[f"{name}_tokens_per_second"] = samples[compiled].numel() / seconds[1]
    result["compile_seconds"] = result["compiled_first_call_seconds"] - result["eager_first_call_seconds"]
    result["graphs_compiled"] = graphs_compiled() - compiled_before
    result["fell_back_to_eager"] = bool(getattr(model, "_decode_compile_failed", False))
    same = (samples[True] == samples[False]).all(dim=1)  # [N]
    result.update(identical_completions=int(same.sum()), completions=int(same.numel()))
    return result


def check_lora(args, model, processor, inputs, device) -> dict:
    """3. Sampling (eager) with the LoRA adapters merged into the weights against unmerged, and the
    log-probs of random completions and the weights before and after both. Adapters on every linear layer of the decoder
    (train.py's --use_peft defaults), B drawn at random so that they change the outputs."""
    targets = families.lora_targets(model, list(config.LORA_TARGETS), vision=False)
    model = families.add_lora(model, targets, r=16, alpha=32, dropout=0.0, seed=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    sampling = sampling_for(model, processor, args)
    ids, mask = random_completions(processor, inputs, args, device)
    with torch.no_grad():
        before = policy.completion_logps(model, inputs, ids, mask, 1.0, args.G)  # [N, T]
    weights_before = {name: param.detach().clone() for name, param in model.named_parameters()}
    result = {}
    merge = families.adapters_merged
    for merged in (True, False):
        if not merged:  # the adapters' own matmuls at every decode step (policy calls families.adapters_merged)
            families.adapters_merged = lambda model: __import__("contextlib").nullcontext()
        try:
            policy.sample_groups(model, inputs, sampling)  # warm-up
            start = clock(device)
            policy.sample_groups(model, inputs, sampling)
            result[f"{'merged' if merged else 'unmerged'}_generate_seconds"] = clock(device) - start
        finally:
            families.adapters_merged = merge
    with torch.no_grad():
        after = policy.completion_logps(model, inputs, ids, mask, 1.0, args.G)  # [N, T]
    result["logps_after_equal_before"] = bool(torch.equal(before, after))
    # The weights themselves: on a small float32 model a drift of the last bits ([unmerge drift]) can
    # leave every log-prob's rounding as it was.
    result["weights_after_equal_before"] = all(torch.equal(weights_before[name], param)
                                               for name, param in model.named_parameters())
    model.unload()  # the base model as it was, for whatever runs next
    return result


def train_command(args, folder: str, data: str, attention: str, deepspeed_file: str | None, out: str) -> list[str]:
    """train.py with bench.py's flags (exactly --tokens tokens per completion, no saving), launched on
    --ranks processes (no --deepspeed: train.py's default, zero3.json)."""
    bench_args = types.SimpleNamespace(
        prompts=args.prompts, G=args.G, completion_length=args.tokens, beta=0.04, image_size=args.image_size,
        dtype=args.dtype, generation_batch_size=0, gradient_checkpointing=True, compile_decode=None, ranks=1)
    flags = bench.train_flags(bench_args, {"folder": folder, "data": data, "attn": attention}, True, out, args.steps)
    flags += ["--deepspeed", os.path.join(ROOT, deepspeed_file)] if deepspeed_file else []
    bench_args.ranks = args.ranks
    return bench.launch(bench_args, [os.path.join(ROOT, "train.py"), *flags])


def check_train(args, folder: str, data: str, attention: str, workdir: str, deadline: float) -> list[dict]:
    """4. A short train.py run per ZeRO stage that this many ranks can run: the last step of its
    metrics.jsonl (the first ones compile the decode step and warm up). A run that would end past
    `deadline` (time.time()) is stopped there, so the table is written in time."""
    rows = []
    for stage, deepspeed_file in STAGES.items():
        row = {"stage": stage, "config": f"--deepspeed {deepspeed_file}" if deepspeed_file else "no --deepspeed: zero3.json",
               "ranks": args.ranks}
        if (stage == 0) != (args.ranks == 1):
            rows.append({**row, "run": False, "why": NOT_RUN[args.ranks == 1]})
            continue
        if time.time() >= deadline:
            rows.append({**row, "run": False, "why": "not run: the checks before it spent the time budget (--budget_s)"})
            continue
        out = os.path.join(workdir, f"run-stage{stage}")
        start = time.time()
        # A session of its own: stopped at the deadline, the launcher's ranks stop with it.
        process = subprocess.Popen(train_command(args, folder, data, attention, deepspeed_file, out), cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            log, _ = process.communicate(timeout=deadline - start)
            exit_code = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            log, _ = process.communicate()
            exit_code = "stopped at the time budget (--budget_s)"
        row.update(run=True, exit=exit_code, seconds=time.time() - start)
        if exit_code == 0:
            with open(os.path.join(out, "metrics.jsonl")) as f:
                last = [json.loads(line) for line in f if line.strip()][-1]
            row.update({key: value for key, value in last.items() if key.startswith(("time/", "memory/"))})
            row["rollouts_per_second"] = args.ranks * args.prompts * args.G / last["time/step_seconds"]
        else:
            row["error"] = log[-3000:]
        rows.append(row)
        print(f"[gpu_check] train, stage {stage}: {json.dumps({k: v for k, v in row.items() if k != 'error'})}",
              flush=True)
    return rows


def check_rows(results: dict) -> list[str]:
    """The table's rows of checks 1-3; a check that raised says so in its row."""
    logps, decode, lora = results["logps"], results["decode"], results["lora"]
    attention = results["attention"] + ("" if results["attention"] == "flash_attention_2" or results["device"] == "CPU"
                                        else ", flash-attn not installed")
    rows = {
        f"log-probs, shared vs plain ({attention})": lambda: (
            f"max abs diff {logps['max_abs_difference']:.3g}, mean {logps['mean_abs_difference']:.3g} over "
            f"{logps['tokens']} tokens; {logps['shared_seconds']:.3f} s vs {logps['plain_seconds']:.3f} s"),
        "decode, compiled vs eager": lambda: (
            f"{decode['identical_completions']}/{decode['completions']} completions the same at one seed; "
            f"{decode['compiled_tokens_per_second']:.0f} vs {decode['eager_tokens_per_second']:.0f} tokens/s; "
            f"compile {decode['compile_seconds']:.1f} s, {decode['graphs_compiled']} graph(s)"
            + ("; FELL BACK TO EAGER" if decode["fell_back_to_eager"] else "")),
        "LoRA (r 16), merged vs unmerged sampling": lambda: (
            f"generate {lora['merged_generate_seconds']:.3f} s vs {lora['unmerged_generate_seconds']:.3f} s; "
            f"log-probs after = before: {lora['logps_after_equal_before']}, weights after = before: "
            f"{lora['weights_after_equal_before']}")}
    return [f"| {label} | {'failed: ' + found['error'].strip().splitlines()[-1] if 'error' in found else text()} |"
            for (label, text), found in zip(rows.items(), (logps, decode, lora))]


def table(results: dict) -> str:
    """The Markdown table for docs/PERFORMANCE.md's GPU section: one row per check and per train.py run."""
    lines = [f"`python gpu_check.py{' --quick' if results['quick'] else ''}` on {results['device']}, {results['date']} "
             f"(torch {results['torch']}, transformers {results['transformers']}); {results['model']}, random weights, "
             f"{results['dtype']}, {results['image_size']} px, {results['prompts']} prompts x G = {results['G']}, "
             f"{results['tokens']} tokens.", "",
             "| check | result |", "|---|---|", *check_rows(results)]
    for row in results["train"]:
        label = f"train.py, ZeRO stage {row['stage']} ({row['config']}), {row['ranks']} rank(s)"
        if not row["run"]:
            lines.append(f"| {label} | {row['why']} |")
        elif row["exit"] != 0:
            lines.append(f"| {label} | failed ({row['exit']}): see gpu_check.json |")
        else:
            phases = ", ".join(f"{phase} {row[f'time/{phase}_seconds']:.2f} s" for phase in bench.PHASES
                               if f"time/{phase}_seconds" in row)
            peak = max(value for key, value in row.items() if key.startswith("memory/"))
            lines.append(f"| {label} | step {row['time/step_seconds']:.2f} s ({phases}); "
                         f"{row['rollouts_per_second']:.2f} rollouts/s; peak {peak:.1f} GiB |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="Folder for gpu_check.md and gpu_check.json.")
    parser.add_argument("--quick", action="store_true",
                        help="The demo's tiny model, 56 px, G = 2, 8 tokens, one train.py step, on whatever device is here "
                        "(a dry run of every check).")
    parser.add_argument("--model", default="qwen2-vl-2b", choices=["qwen2-vl-2b", "qwen2.5-vl-7b"],
                        help="Published architecture, random weights.")
    parser.add_argument("--layers", type=int, default=None, help="Decoder layers (default: all).")
    parser.add_argument("--vision_layers", type=int, default=None, help="Vision blocks (default: all).")
    parser.add_argument("--image_size", type=int, default=448, help="Square picture side in pixels.")
    parser.add_argument("--prompts", type=int, default=2, help="Prompts per step per rank.")
    parser.add_argument("--G", type=int, default=8, help="Completions per prompt.")
    parser.add_argument("--tokens", type=int, default=128, help="Tokens per completion, exactly.")
    parser.add_argument("--steps", type=int, default=3, help="train.py steps per run; the last one is read.")
    parser.add_argument("--ranks", type=int, default=1,
                        help="train.py's processes: 1 runs ZeRO stage 0 (python train.py); 2 or more run zero2.json "
                             "and zero3.json (deepspeed --num_gpus RANKS), one GPU each.")
    parser.add_argument("--budget_s", type=float, default=450,
                        help="Seconds from the start after which a train.py run is stopped, so that the table is "
                             "written in time (the checks before it take what they take).")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.image_size, args.G, args.tokens, args.steps = "demo", 56, 2, 8, 1
    return args


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, args.dtype)
    import transformers

    os.makedirs(args.out, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU", "quick": args.quick,
               "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "transformers": transformers.__version__,
               "model": "the demo's tiny Qwen2-VL" if args.quick else
               f"{args.model} ({args.layers or 'all'} decoder, {args.vision_layers or 'all'} vision layers)",
               **{key: getattr(args, key) for key in ("dtype", "image_size", "prompts", "G", "tokens", "steps")}}
    deadline = time.time() + args.budget_s
    with tempfile.TemporaryDirectory() as workdir:
        start = time.time()
        folder = bench.save_model_folder(args.model, os.path.join(workdir, "model"), args.dtype, args.layers,
                                         args.vision_layers)
        results["setup_seconds"] = time.time() - start
        attention = config.attention_for(None, dtype == torch.bfloat16, device.type == "cuda",
                                         config.flash_attn_version())  # train.py's choice
        results["attention"] = attention
        processor = families.load_processor(folder, args.image_size ** 2, args.image_size ** 2)
        inputs = {key: value.to(device) for key, value in
                  prompt_inputs(processor, folder, args.image_size, args.prompts).items()}
        model = families.load_model(folder, dtype, attention).to(device).eval()
        for name, check in (("logps", check_logps), ("decode", check_decode), ("lora", check_lora)):
            start = time.time()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                results[name] = check(args, model, processor, inputs, device)
            except Exception:  # the other checks and the train.py runs still report: GPU time is scarce
                results[name] = {"error": traceback.format_exc()[-3000:]}
            results[name]["check_seconds"] = time.time() - start
            if device.type == "cuda":
                results[name]["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            print(f"[gpu_check] {name}: {json.dumps(results[name])}", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        data = os.path.join(workdir, "data.parquet")  # written here: checks 1-3 run without `datasets`
        bench.write_dataset(data, rows=64, image_size=args.image_size, prompt_words=20)
        results["train"] = check_train(args, folder, data, attention, workdir, deadline)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(table(results))
    print(table(results))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
