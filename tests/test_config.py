"""Bad arguments stop before any model loads; zero3.json's "auto" values are filled from the flags."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, read_metrics, run_command

import train
from grpo import config, distributed

# A model path that does not exist: if validation did not stop first, loading it would fail with
# a different error, so each test also shows that nothing was loaded.
REPO_PATH = Path(REPO)
NO_MODEL = ["--model_name_or_path", "/nonexistent/model", "--dataset_name", "/nonexistent/data"]


@pytest.mark.parametrize("flags, message", [
    (["--num_generations", "1"], "--num_generations: is 1; GRPO compares completions within a group"),
    # A flag that takes one of a few names: its choices, checked as the command line is read.
    (["--loss_type", "ppo"], "--loss_type: invalid choice: 'ppo' .*'grpo', 'bnpo', 'dr_grpo', 'dapo', 'cispo', 'sapo'"),
    (["--scale_rewards", "std"], "--scale_rewards: invalid choice: 'std' .*'group', 'batch', 'none'"),
    (["--importance_sampling_level", "seq"], "--importance_sampling_level: invalid choice: 'seq' .*'token', 'sequence'"),
    (["--lr_scheduler_type", "cosine_with_restarts"], "--lr_scheduler_type: invalid choice: 'cosine_with_restarts'"),
    (["--attn_implementation", "flash"], "--attn_implementation: invalid choice: 'flash' .*'sdpa', 'eager'"),
    (["--reward_funcs", "accuracy", "length"], r"--reward_funcs: unknown reward function 'length'; known: accuracy, format"),
    (["--reward_funcs", "no_such_module:fn"], r"--reward_funcs: reward function 'no_such_module:fn': cannot import module"),
    (["--max_nonfinite_steps", "0"], "--max_nonfinite_steps: is 0"),
    (["--reward_funcs", "accuracy", "format", "--reward_weights", "1.0"], "--reward_weights: has 1 values for 2 reward functions"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size: is 0"),
    (["--report_to", "tensorboard", "mlflow"], "--report_to: invalid choice: 'mlflow' .*'tensorboard', 'wandb', 'none'"),
    (["--num_generations", "eight"], "--num_generations: invalid int value: 'eight'"),
    (["--report_to", "none", "wandb"], r"--report_to: \['none', 'wandb'\] asks for none and for some"),
    (["--loss_type", "cispo", "--importance_sampling_level", "sequence"],
     r"--importance_sampling_level: 'sequence' \(GSPO\) goes with grpo, bnpo, dr_grpo or dapo; --loss_type cispo"),
    (["--loss_type", "sapo", "--sapo_temperature_neg", "0"], r"--sapo_temperature_neg: is 0.0; SAPO's gate"),
    (["--dataset_num_proc", "0"], r"--dataset_num_proc: is 0; give at least 1 worker process, or leave it out"),
    (["--dataloader_num_workers", "-1"], r"--dataloader_num_workers: is -1; give 0 \(no background threads\) or more"),
    (["--ddp_timeout", "0"], r"--ddp_timeout: is 0; give the seconds a collective may wait, at least 1"),
])
def test_bad_arguments_stop_before_loading(flags, message):
    with pytest.raises(ValueError, match=message):
        train.main(NO_MODEL + flags)


def test_unreadable_deepspeed_config(tmp_path):
    broken = tmp_path / "ds.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="--deepspeed: cannot read DeepSpeed config .*ds.json"):
        train.main(NO_MODEL + ["--deepspeed", str(broken)])
    with pytest.raises(ValueError, match="--deepspeed: cannot read DeepSpeed config .*missing.json"):
        train.main(NO_MODEL + ["--deepspeed", str(tmp_path / "missing.json")])


@pytest.mark.parametrize("path, stage", [(None, 3), ("zero2.json", 2)])
def test_deepspeed_json_autos_filled_from_flags(path, stage):
    """zero3.json (the default) and zero2.json, filled for 8 GPUs: the batch sizes from the flags, and
    torch's fused AdamW (DeepSpeed's FusedAdam would be JIT-built on first use); on the CPU torch's AdamW."""
    args = config.parse_args(["--num_generations", "4", "--per_device_train_batch_size", "3",
                             "--gradient_accumulation_steps", "2", "--learning_rate", "5e-6", "--bf16"])
    filled = distributed.fill_deepspeed_config(distributed.read_deepspeed_config(path), args, world_size=8,
                                          total_steps=100, on_gpu=True)
    assert filled["train_micro_batch_size_per_gpu"] == 12  # 3 prompts x G=4 completions
    assert filled["gradient_accumulation_steps"] == 2
    assert filled["train_batch_size"] == 12 * 2 * 8
    assert filled["optimizer"]["params"]["lr"] == 5e-6
    assert filled["bf16"]["enabled"] is True
    assert filled["zero_optimization"]["stage"] == stage
    assert filled["optimizer"]["params"]["torch_adam"] is True and filled["optimizer"]["params"]["fused"] is True
    assert "auto" not in json.dumps(filled)
    on_cpu = distributed.fill_deepspeed_config(distributed.read_deepspeed_config(path), args, 1, 100, on_gpu=False)
    assert on_cpu["optimizer"]["params"]["torch_adam"] is True and "fused" not in on_cpu["optimizer"]["params"]
    assert on_cpu["zero_optimization"] == {"stage": 0}  # a world of one


def test_an_optimizer_the_config_names_itself_is_left_as_it_is(tmp_path):
    """torch_adam is set only where the user has not decided: their own torch_adam false keeps DeepSpeed's
    FusedAdam, and an optimizer other than Adam is not given Adam's switches."""
    path = tmp_path / "ds.json"
    args = config.parse_args([])
    for optimizer in ({"type": "Adam", "params": {"torch_adam": False}}, {"type": "Lamb", "params": {}}):
        path.write_text(json.dumps({"optimizer": optimizer}))
        filled = distributed.fill_deepspeed_config(distributed.read_deepspeed_config(str(path)), args, 8, 10, on_gpu=True)
        assert filled["optimizer"] == optimizer


# The optimizer DeepSpeed builds from the config filled for a GPU, here on the CPU (torch's fused AdamW
# runs on both); one step of it against torch.optim.AdamW unfused, from the same weights and gradient.
GPU_CONFIG_OPTIMIZER = """
import copy, json, sys, torch
import deepspeed
from grpo import config, distributed
distributed.init_distributed()
args = config.parse_args(["--learning_rate", "0.1", "--weight_decay", "0.01", "--bf16", "false", "--max_grad_norm", "0"])
ds_config = distributed.fill_deepspeed_config(distributed.read_deepspeed_config(sys.argv[1]), args, 1, 10, on_gpu=True)
torch.manual_seed(0)
model = torch.nn.Linear(4, 3)
reference, initial = copy.deepcopy(model), copy.deepcopy(model)
engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds_config)
x = torch.randn(5, 4)
engine.backward(engine(x).square().sum())
engine.step()
adamw = torch.optim.AdamW(reference.parameters(), lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
reference(x).square().sum().backward()
adamw.step()
print("RESULT", json.dumps({"optimizer": type(engine.basic_optimizer).__module__ + "." + type(engine.basic_optimizer).__name__,
    "fused": engine.basic_optimizer.param_groups[0].get("fused"),
    "difference": max((a - b).abs().max().item() for a, b in zip(model.parameters(), reference.parameters())),
    "moved": min((a - b).abs().min().item() for a, b in zip(model.parameters(), initial.parameters()))}))
distributed.end_distributed()
"""


def test_the_gpu_configs_optimizer_is_torchs_fused_adamw_with_no_build(tmp_path):
    """The first GPU run cannot fail on an optimizer build: the config written for a GPU makes DeepSpeed
    build torch.optim.AdamW with fused=True (not its FusedAdam), and its step is AdamW's."""
    log = run_command([sys.executable, "-c", GPU_CONFIG_OPTIMIZER, "zero3.json"], tmp_path)
    result = json.loads(next(line for line in log.splitlines() if line.startswith("RESULT ")).split(" ", 1)[1])
    assert result["optimizer"] == "torch.optim.adamw.AdamW" and result["fused"] is True
    assert result["moved"] > 0.05 and result["difference"] < 1e-6  # Adam's first step moves every weight by about lr


def test_unknown_auto_key_is_named(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "mystery": {"knob": "auto"}}))
    args = config.parse_args([])
    with pytest.raises(ValueError, match="sets mystery.knob to \"auto\""):
        distributed.fill_deepspeed_config(distributed.read_deepspeed_config(str(path)), args, 1, 10, on_gpu=False)


def test_defaults_are_the_published_run():
    args = config.parse_args([])
    assert (args.model_name_or_path, args.dataset_name) == ("Qwen/Qwen2-VL-2B-Instruct", "lmms-lab/multimodal-open-r1-8k-verified")
    assert (args.num_generations, args.beta, args.learning_rate, args.max_completion_length) == (8, 0.04, 1e-6, 256)
    assert args.reward_funcs == ["accuracy", "format"] and args.per_device_train_batch_size == 1


def test_published_open_r1_command_parses():
    argv = ("--deepspeed zero3.json --output_dir checkpoints/run --model_name_or_path Qwen/Qwen2-VL-2B-Instruct "
            "--dataset_name lmms-lab/multimodal-open-r1-8k-verified --max_prompt_length 8192 "
            "--per_device_train_batch_size 1 --gradient_accumulation_steps 1 --logging_steps 1 --bf16 "
            "--report_to tensorboard --gradient_checkpointing true --attn_implementation flash_attention_2 "
            "--max_pixels 2359296 --save_total_limit 8 --num_train_epochs 1 --run_name Qwen2-VL-2B-GRPO-8k").split()
    args = config.parse_args(argv + ["--local_rank=0"])
    config.validate(args)
    assert args.bf16 is True and args.gradient_checkpointing is True and args.max_pixels == 2359296
    assert args.run_name == "Qwen2-VL-2B-GRPO-8k" and args.save_total_limit == 8


def test_wandb_asked_for_and_not_installed_says_how_to_install(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"--report_to: wandb is not installed: pip install wandb"):
        train.main(NO_MODEL + ["--report_to", "tensorboard", "wandb"])


RECIPES = sorted((REPO_PATH / "recipes").glob("*.yaml"))


def test_the_recipes_are_the_published_runs_and_the_demo():
    assert [path.name for path in RECIPES] == ["demo.yaml", "qwen2-vl-2b-grpo-8k.yaml", "qwen2-vl-7b-grpo-8k.yaml"]


def test_the_2b_recipe_is_open_r1_multimodals_command():
    """recipes/qwen2-vl-2b-grpo-8k.yaml means what open-r1-multimodal's published command means (its
    README, commit 232b7ba; `--deepspeed scripts/zero3.json` is train.py's default zero3.json)."""
    published = ("--output_dir checkpoints/Qwen2-VL-2B-GRPO-8k "
                 "--model_name_or_path Qwen/Qwen2-VL-2B-Instruct --dataset_name lmms-lab/multimodal-open-r1-8k-verified "
                 "--max_prompt_length 8192 --per_device_train_batch_size 1 --gradient_accumulation_steps 1 "
                 "--logging_steps 1 --bf16 --report_to wandb --gradient_checkpointing true "
                 "--attn_implementation flash_attention_2 --max_pixels 2359296 --save_total_limit 8 "
                 "--num_train_epochs 1 --run_name Qwen2-VL-2B-GRPO-8k").split()
    from_recipe = config.parse_args(["--config", "recipes/qwen2-vl-2b-grpo-8k.yaml"])
    assert from_recipe == config.parse_args(published)
    seven_b = config.parse_args(["--config", "recipes/qwen2-vl-7b-grpo-8k.yaml"])
    changed = {k for k, v in vars(seven_b).items() if vars(from_recipe)[k] != v}
    assert changed == {"model_name_or_path", "output_dir", "run_name"}
    assert seven_b.model_name_or_path == "Qwen/Qwen2-VL-7B-Instruct"


def test_command_line_flags_override_the_recipe_wherever_they_stand():
    after = config.parse_args(["--config", "recipes/demo.yaml", "--learning_rate", "1e-4", "--reward_weights", "2", "1"])
    before = config.parse_args(["--learning_rate", "1e-4", "--reward_weights", "2", "1", "--config=recipes/demo.yaml"])
    assert after == before
    assert after.learning_rate == 1e-4 and after.reward_weights == [2.0, 1.0]  # the command line's
    assert after.max_steps == 300 and after.reward_funcs == ["accuracy", "format"]  # the recipe's
    assert after.per_device_train_batch_size == 4 and after.min_pixels == after.max_pixels == 56 * 56
    assert after.num_train_epochs == 1.0  # in neither: train.py's default


def test_demo_recipe_carries_the_prompt_the_demo_warms_up_with():
    """demo.py warms its model up under the system prompt that recipes/demo.yaml gives train.py."""
    import demo

    args = config.parse_args(["--model_name_or_path", "m", "--dataset_name", "d", "--config", demo.DEMO_RECIPE])
    config.validate(args)
    assert args.system_prompt == demo.DEMO_SYSTEM_PROMPT == "Think in <think> </think>, then answer in <answer> </answer>."
    assert args.lr_scheduler_type == "constant" and args.beta == 0.0 and args.save_steps == 0


@pytest.mark.parametrize("text, message", [
    ("learning_rate: 1.0e-6\nlearnin_rate: 2.0e-6\n", r"unknown key 'learnin_rate'; did you mean 'learning_rate'\?"),
    ("zzz_unheard_of: 1\n", r"unknown key 'zzz_unheard_of'; its keys are train.py's flags without their --"),
    ("num_generations: 8.5\n", r"num_generations: 8.5 will not do; --num_generations takes a whole number"),
    ("reward_weights: [1.0, heavy]\n", r"reward_weights: \[1.0, 'heavy'\] will not do; --reward_weights takes a list, each item a number"),
    ("gradient_checkpointing: maybe\n", r"gradient_checkpointing: 'maybe' will not do; --gradient_checkpointing takes true or false"),
    ("loss_type: ppo\n", r"loss_type: 'ppo' will not do; --loss_type takes one of \['grpo', 'bnpo', 'dr_grpo', 'dapo', 'cispo', 'sapo'\]"),
    ("report_to: [tensorboard, mlflow]\n", r"report_to: \['tensorboard', 'mlflow'\] will not do; --report_to takes a list, each item one of "
     r"\['tensorboard', 'wandb', 'none'\]"),
    ("- learning_rate\n", r"must map flag names to values"),
    ("learning_rate: [1\n", r"is not YAML"),
])
def test_a_bad_recipe_is_a_usage_error_naming_the_file_and_key(text, message, tmp_path):
    recipe = tmp_path / "run.yaml"
    recipe.write_text(text)
    with pytest.raises(ValueError, match=r"--config: '.*run.yaml'.*" + message):
        config.parse_args(["--config", str(recipe)])


def test_config_flag_mistakes_are_usage_errors(tmp_path):
    with pytest.raises(ValueError, match=r"--config: '.*missing.yaml': no such file"):
        config.parse_args(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(ValueError, match="--config: needs a recipe file"):
        config.parse_args(["--config"])
    with pytest.raises(ValueError, match="--config: given twice"):
        config.parse_args(["--config", "recipes/demo.yaml", "--config", "recipes/demo.yaml"])


def test_recipe_under_the_deepspeed_launcher(tiny_model, colour_dataset, tmp_path):
    """`deepspeed train.py --config FILE` with flags after it: the launcher passes --local_rank too."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"model_name_or_path: {tiny_model}\ndataset_name: {colour_dataset}\nnum_generations: 4\n"
                      "per_device_train_batch_size: 2\nmax_completion_length: 4\nmax_steps: 1\nreport_to: none\n"
                      "save_steps: 0\nmax_pixels: 3136\nlearning_rate: 1.0e-3\n")
    out = tmp_path / "run"
    run_command(["deepspeed", "--num_gpus", "1", "train.py", "--config", str(recipe), "--output_dir", str(out),
                 "--max_steps", "2", "--logging_steps", "1"], tmp_path)
    assert [m["step"] for m in read_metrics(str(out))] == [1, 2]  # --max_steps 2 beat the recipe's 1


@pytest.mark.parametrize("flags, named", [
    (["--num_generations", "1"], "--num_generations"),
    (["--epsilon", "0.2", "--epsilon_high", "0.1"], "--epsilon_high"),
    (["--deepspeed", "/nonexistent/ds.json"], "--deepspeed"),
    (["--model_name_or_path", "/nonexistent/model"], "--model_name_or_path"),
    (["--model_name_or_path", "EMPTY_FOLDER"], "--model_name_or_path"),
    (["--dataset_name", "/nonexistent/rows.parquet"], "--dataset_name"),
    (["--output_dir", "A_FILE/run"], "--output_dir"),
    (["EARLIER_RUN"], "--output_dir"),
    (["--resume_from_checkpoint", "/nonexistent/checkpoint-3"], "--resume_from_checkpoint"),
    (["--attn_implementation", "flash_attention_2"], "--attn_implementation"),  # no GPU here
    (["WRONG_WORLD", "--resume_from_checkpoint", "latest"], "--resume_from_checkpoint"),
])
def test_usage_errors_exit_2_with_one_line(flags, named, tiny_model, colour_dataset, tmp_path):
    """A mistake on the command line: exit status 2, one line naming the argument, no traceback, and
    nothing loaded (the run stops in seconds)."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    flags = [str(tmp_path / "empty") if f == "EMPTY_FOLDER" else str(tmp_path / "a_file" / "run") if f == "A_FILE/run"
             else f for f in flags]
    if "EARLIER_RUN" in flags:  # a run's log already there: a new run must not overwrite it
        flags.remove("EARLIER_RUN")
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "metrics.jsonl").write_text('{"step": 1}\n')
    if "WRONG_WORLD" in flags:  # a checkpoint written by 2 ranks, resumed by 1
        flags.remove("WRONG_WORLD")
        (tmp_path / "out" / "checkpoint-2").mkdir(parents=True)
        (tmp_path / "out" / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"step": 2, "world_size": 2}))
    command = [sys.executable, "train.py", "--model_name_or_path", tiny_model, "--dataset_name", colour_dataset,
               "--output_dir", str(tmp_path / "out"), *flags]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(lines) == 1 and named in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flags, on_gpu, flash_attn, bf16, attention", [
    ([], False, None, False, "sdpa"),                              # the CPU: float32, sdpa
    ([], True, None, True, "sdpa"),                                # a GPU without flash-attn: bf16, sdpa
    ([], True, "2.7.4", True, "flash_attention_2"),                # a GPU with flash-attn: the published run
    (["--bf16", "false"], True, "2.7.4", False, "sdpa"),           # float32 asked for: flash-attn cannot take it
    (["--bf16"], False, "2.7.4", True, "sdpa"),                    # bf16 asked for on the CPU: given, with sdpa
    (["--attn_implementation", "eager"], True, "2.7.4", True, "eager"),
    (["--attn_implementation", "flash_attention_2"], True, "2.3.3", True, "flash_attention_2"),
])
def test_precision_and_attention_defaults(flags, on_gpu, flash_attn, bf16, attention):
    args = config.parse_args(flags)
    config.settle_device_defaults(args, on_gpu=on_gpu, flash_attn=flash_attn)
    assert (args.bf16, args.attn_implementation) == (bf16, attention)


@pytest.mark.parametrize("flags, on_gpu, compile_decode", [
    ([], True, True),                                              # a GPU: the decode step compiled
    ([], False, False),                                            # the CPU: eager (docs/PERFORMANCE.md)
    (["--compile_decode"], False, True),                           # the flag alone means true
    (["--compile_decode", "true"], False, True),
    (["--compile_decode", "false"], True, False),
])
def test_compile_decode_defaults(flags, on_gpu, compile_decode):
    args = config.parse_args(flags)
    config.settle_device_defaults(args, on_gpu=on_gpu, flash_attn=None)
    assert args.compile_decode is compile_decode


@pytest.mark.parametrize("flags, on_gpu, workers", [
    ([], True, 1),                                                 # a GPU: the next prompts prepared on a thread
    ([], False, 0),                                                # the CPU: in the step (docs/PERFORMANCE.md)
    (["--dataloader_num_workers", "2"], False, 2),
    (["--dataloader_num_workers", "0"], True, 0),
])
def test_dataloader_num_workers_defaults(flags, on_gpu, workers):
    args = config.parse_args(flags)
    config.settle_device_defaults(args, on_gpu=on_gpu, flash_attn=None)
    assert args.dataloader_num_workers == workers


@pytest.mark.parametrize("command, nearest", [
    (["train.py", "--leraning_rate", "1e-6"], "--learning_rate"),
    (["eval.py", "--model_name_or_path", "m", "--dataset_name", "d", "--bacth_size", "2"], "--batch_size"),
    (["bench.py", "--stpes", "2"], "--steps"),
    (["data_tools.py", "inspect", "rows.parquet", "--smaples", "3"], "--samples"),
])
def test_a_mistyped_flag_is_one_line_naming_the_nearest_flag(command, nearest):
    """Every script, run as a user runs it: a mistyped flag is one line on stderr naming the flag
    meant, and exit status 2, as every other usage error (not transformers' traceback, nor argparse's
    usage text)."""
    result = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    typo = command[-2]
    assert result.stderr.splitlines() == [f"{command[0]}: error: unknown flag {typo}; did you mean {nearest}?"]
    assert result.returncode == 2 and result.stdout == ""


@pytest.mark.parametrize("argv, message", [
    (["--leraning_rate=1e-6"], "unknown flag --leraning_rate; did you mean --learning_rate?"),
    (["--config", "recipes/demo.yaml", "--num_generatoins", "4"], "unknown flag --num_generatoins; did you mean --num_generations?"),
    (["--zzz_unheard_of", "1"], "unknown flag --zzz_unheard_of; train.py --help lists them."),
    (["--learning_rate", "1e-6", "1e-5"], "unrecognized arguments: 1e-5"),  # a word where no flag takes one
])
def test_words_no_flag_takes_are_a_usage_error(argv, message):
    with pytest.raises(config.UsageError) as error:
        config.parse_args(argv)
    assert str(error.value) == message


# attention_for(requested, half_precision, on_gpu, flash_attn): what each machine gets, worked out by hand
# from the rule "flash_attention_2 needs a CUDA GPU, 16-bit weights and flash-attn >= 2.3.3" (transformers'
# floor, in transformers/utils/import_utils.py: is_flash_attn_2_available).
@pytest.mark.parametrize("requested, half_precision, on_gpu, flash_attn, attention", [
    (None, False, False, None, "sdpa"),                            # the CPU, float32
    (None, True, False, "2.7.4", "sdpa"),                          # bf16 on the CPU: flash-attn cannot run there
    (None, True, True, None, "sdpa"),                              # a GPU without flash-attn
    (None, False, True, "2.7.4", "sdpa"),                          # float32 on a GPU: flash-attn cannot take it
    (None, True, True, "2.7.4", "flash_attention_2"),              # the published run
    (None, True, True, "2.10.0", "flash_attention_2"),             # 2.10 is after 2.3 (numbers, not text)
    (None, True, True, "2.3.10", "flash_attention_2"),             # 2.3.10 is after 2.3.3
    (None, True, True, "2.7.4.post1", "flash_attention_2"),        # a release's suffix is no fourth number to compare
    ("sdpa", True, True, "2.7.4", "sdpa"),                         # asked for: given
    ("eager", False, False, None, "eager"),
    ("flash_attention_2", True, True, "2.3.3", "flash_attention_2"),
])
def test_attention_for(requested, half_precision, on_gpu, flash_attn, attention):
    assert config.attention_for(requested, half_precision, on_gpu, flash_attn) == attention


@pytest.mark.parametrize("requested, half_precision, on_gpu, flash_attn, says", [
    ("flash_attention_2", True, False, "2.7.4", "CUDA GPU only"),
    ("flash_attention_2", False, True, "2.7.4", "16-bit weights only"),
    ("flash_attention_2", True, True, None, "needs flash-attn"),
    ("flash_attention_2", True, True, "2.0.9", "takes 2.3.3 or newer"),
    ("flash_attention_2", True, True, "2.3.2", "takes 2.3.3 or newer"),  # one below transformers' floor
    ("flash_attention_2", True, True, "2.3", "takes 2.3.3 or newer"),
    (None, True, True, "2.1.0", "takes 2.3.3 or newer"),           # the default would pick an old flash-attn: refused
    (None, True, True, "1.0.9", "takes 2.3.3 or newer"),
])
def test_attention_that_cannot_run_is_a_usage_error(requested, half_precision, on_gpu, flash_attn, says):
    with pytest.raises(config.UsageError, match=f"^--attn_implementation: .*{says}"):
        config.attention_for(requested, half_precision, on_gpu, flash_attn)


@pytest.mark.parametrize("version, refused", [
    ("5.17.0", True), ("5.23.0", True), ("5.23.99", True), ("4.57.1", True),  # the keyword dropped: wrong log-probs
    ("5.24.0", False), ("5.25.1", False), ("5.30.0.dev0", False), ("6.0.0", False),
])
def test_a_transformers_that_drops_the_cache_keyword_is_refused_before_loading(version, refused):
    """Before 5.24 transformers silently drops the shared prompt's `cache=` keyword; load_model refuses it
    with a usage error naming what to install, and takes 5.24 and every later version."""
    if refused:
        with pytest.raises(config.UsageError, match=rf"^transformers {re.escape(version)} is installed.*>=5\.24"):
            config.check_transformers(version)
    else:
        config.check_transformers(version)


def test_load_model_checks_the_installed_transformers(tiny_model, monkeypatch):
    import transformers

    from grpo import families

    monkeypatch.setattr(transformers, "__version__", "5.23.0")
    with pytest.raises(config.UsageError, match="^transformers 5.23.0 is installed"):
        families.load_model(tiny_model, torch.float32, "sdpa")
