"""Command-line arguments and their checks.

Every flag of train.py is a field of GRPOArguments, `name: type = flag(default, "help")`, grouped in
the order of a step: GRPO (the group, its rewards, the objective), sampling, optimisation, the run
(model and data, precision, logging and saving), LoRA; a new flag is a field in its group (and a
line in docs/GUIDE.md's Flags). transformers' HfArgumentParser makes them flags (the ecosystem's
convention: open-r1-multimodal's published command runs unchanged); the help is what --help shows,
and a flag that takes one of a few names has them as `choices`, from the module that defines them.

Defaults are the real run: Qwen2-VL-2B-Instruct on lmms-lab/multimodal-open-r1-8k-verified, G = 8,
beta = 0.04, lr = 1e-6, 256 completion tokens, one prompt per GPU. `--config recipes/NAME.yaml` (as
in open-r1 and TRL) takes the flags from a recipe, flags on the command line overriding it; the CPU
demo's is recipes/demo.yaml. `validate(args)` runs before any model is loaded, so a run that cannot
work stops in a second with a message naming the argument.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field


# The names the objective's switches take (grpo/objective.py imports them from here: the flags' page is
# stdlib alone, so the scripts start without loading torch).
SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
LR_SCHEDULERS = ("constant", "linear", "cosine")
REPORT_TO = ("tensorboard", "wandb")  # where the logs go besides metrics.jsonl; `none` alone: nowhere else
ATTN_IMPLEMENTATIONS = ("flash_attention_2", "sdpa", "eager")
# LoRA's default targets: every attention and MLP projection of the language model (all eight families name them so).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def flag(default, help: str, choices: tuple[str, ...] | None = None):
    """One flag: a dataclass field whose default, help text and choices HfArgumentParser reads (a
    list default is copied for every GRPOArguments, as dataclasses require)."""
    metadata = {"help": help} if choices is None else {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class GRPOArguments:
    # --- GRPO: the group, its rewards and the objective (grpo/objective.py) ---
    num_generations: int = flag(8, "G: completions sampled per prompt (the group).")
    reward_funcs: list[str] = flag(["accuracy", "format"], "Reward functions by registry name.")
    reward_weights: list[float] | None = flag(None, "One weight per reward function (default 1 each).")
    scale_rewards: str = flag("group", "Advantage scaling: group, batch or none (Dr. GRPO).", choices=SCALES)
    loss_type: str = flag(
        "grpo", "grpo, bnpo, dr_grpo or dapo (how per-token losses are averaged), or cispo or sapo (the per-token "
        "loss itself: grpo/objective.py).", choices=LOSS_TYPES)
    epsilon: float = flag(0.2, "Lower clip range of the ratio (and upper, unless --epsilon_high).")
    epsilon_high: float | None = flag(
        None, "Upper clip range (DAPO clip-higher uses 0.28); with --loss_type cispo the importance weight's cap "
        "is 1 + this.")
    importance_sampling_level: str = flag(
        "token", "token (GRPO) or sequence (GSPO: one ratio per completion; use --epsilon 3e-4 --epsilon_high 4e-4).",
        choices=IMPORTANCE_SAMPLING_LEVELS)
    sapo_temperature_pos: float = flag(
        1.0, "--loss_type sapo: the soft gate's temperature for positive advantages (SAPO's and TRL's 1.0).")
    sapo_temperature_neg: float = flag(
        1.05, "--loss_type sapo: ... for negative advantages (1.05; above the positive one, so they fade faster).")
    beta: float = flag(0.04, "KL coefficient; 0 skips the reference model entirely.")
    num_iterations: int = flag(1, "Updates per rollout batch (mu); > 1 computes and reuses old log-probs.")

    # --- sampling: how the group's completions are drawn (grpo/policy.py) ---
    max_completion_length: int = flag(256, "Most tokens sampled per completion.")
    temperature: float = flag(1.0, "Sampling temperature (log-probs are taken at the same temperature).")
    top_p: float = flag(1.0, "Nucleus sampling threshold.")
    share_prompt: bool = flag(
        True, "Encode each prompt and image once per group and share its keys/values with its G completions "
        "(false: repeat it G times, the plain path).")
    generation_batch_size: int = flag(
        0, "Most completions per generate call (0: the whole optimizer step's prompts x G in one call).")
    ignore_eos: bool = flag(
        False, "Sample exactly max_completion_length tokens, never stopping at EOS (for benchmarks).")
    compile_decode: bool | None = flag(
        None, "Decode with the model's forward compiled (torch.compile; once per cache-length bucket, the first "
        "step waits for it); default: true on a GPU, false on the CPU.")

    # --- optimisation: the batch, AdamW and its schedule, how long, what trains ---
    per_device_train_batch_size: int = flag(
        1, "PROMPTS per device per micro-step; each is sampled G times, so G x this completions.")
    gradient_accumulation_steps: int = flag(
        1, "Micro-batches per optimizer step; the step's prompts are all sampled in one rollout first.")
    learning_rate: float = flag(1e-6, "Peak learning rate (AdamW).")
    lr_scheduler_type: str = flag("linear", "constant, linear or cosine decay after warmup.", choices=LR_SCHEDULERS)
    warmup_ratio: float = flag(0.0, "Fraction of steps spent warming the LR up from 0.")
    weight_decay: float = flag(0.0, "AdamW weight decay.")
    adam_beta1: float = flag(0.9, "AdamW beta1.")
    adam_beta2: float = flag(0.999, "AdamW beta2.")
    adam_epsilon: float = flag(1e-8, "AdamW epsilon.")
    max_grad_norm: float = flag(1.0, "Gradient clipping norm.")
    num_train_epochs: float = flag(1.0, "Passes over the dataset (ignored when --max_steps > 0).")
    max_steps: int = flag(-1, "Optimizer steps to run; > 0 overrides --num_train_epochs.")
    freeze_vision_tower: bool = flag(
        False, "The vision encoder keeps its weights (Qwen's includes its patch merger); the rest trains.")
    gradient_checkpointing: bool = flag(False, "Recompute activations in the backward to save memory.")

    # --- the run: the model and the data ---
    model_name_or_path: str = flag(
        "Qwen/Qwen2-VL-2B-Instruct",
        "Hub id or local folder of a model of a supported family (README: Model families).")
    dataset_name: str = flag(
        "lmms-lab/multimodal-open-r1-8k-verified", "Hub id, a save_to_disk folder, or a .parquet / .jsonl file.")
    dataset_split: str = flag("train", "Dataset split to train on.")
    system_prompt: str | None = flag(
        None, "System prompt; default asks for <think>...</think><answer>...</answer>.")
    max_prompt_length: int = flag(
        8192, "Rows whose prompt (image tokens included) is longer are dropped at load time, never truncated.")
    min_pixels: int = flag(
        3136, "Qwen families: smallest image area after resizing (pixels); others use their processor's sizes.")
    max_pixels: int = flag(
        12845056, "Qwen families: largest image area after resizing (pixels); fewer pixels, fewer image tokens.")
    # --- the run: precision, attention, seed, launcher ---
    bf16: bool | None = flag(
        None, "Train in bfloat16 (`--bf16` alone means true); default: true on a GPU (the published run), "
        "false (float32) on the CPU.")
    attn_implementation: str | None = flag(
        None, "flash_attention_2 (16-bit weights on a GPU, flash-attn >= 2.3.3), sdpa or eager; default "
        "flash_attention_2 where it can run, else sdpa.", choices=ATTN_IMPLEMENTATIONS)
    seed: int = flag(42, "Seed for data order, init and sampling (each rank samples with seed + rank).")
    deepspeed: str | None = flag(
        None, "DeepSpeed JSON config; default zero3.json next to train.py.")
    local_rank: int = flag(-1, "Set by the deepspeed launcher.")
    # --- the run: data at scale, and ranks that wait (Hugging Face's names; check_data_and_waits) ---
    dataset_num_proc: int | None = flag(
        None, "Worker processes per rank that check the rows at load (each rank checks its share of them); "
        "default: this machine's cores over its ranks, at most 16.")
    dataloader_num_workers: int | None = flag(
        None, "Background threads that read the next steps' rows and run the processor on their pictures while the "
        "current step trains (0: each step prepares its own); default: 1 on a GPU, 0 on the CPU, where the thread "
        "takes its time from the cores the step runs on (docs/PERFORMANCE.md).")
    ddp_timeout: int = flag(
        1800, "Seconds a rank waits for the others in a collective before the run stops; one rank working alone "
        "(the data check, a save's 16-bit write) is waited for by files, as long as it shows it lives.")
    # --- the run: where it goes, logging and saving ---
    output_dir: str = flag("outputs/grpo", "Where checkpoints, TensorBoard logs and the final model go.")
    run_name: str | None = flag(
        None, "Name of the run (TensorBoard sub-folder); defaults to the output_dir's name.")
    logging_steps: int = flag(1, "Log every N optimizer steps.")
    log_completions_steps: int = flag(
        10, "Write sample completions with their rewards to TensorBoard every N steps.")
    report_to: list[str] = flag(
        ["tensorboard"], "Where the logs go besides metrics.jsonl: tensorboard, wandb (pip install wandb), both, "
        "or none.", choices=(*REPORT_TO, "none"))
    save_steps: int = flag(
        500, "Save a resumable checkpoint every N optimizer steps, the last one included (num_iterations > 1: at "
        "the end of that rollout; 0: only the final model).")
    save_total_limit: int | None = flag(
        None, "Keep at most this many checkpoints (oldest removed; never the newest complete one).")
    resume_from_checkpoint: str | None = flag(
        None, "A checkpoint-<step> folder, or `latest` (the newest complete one in output_dir; none yet: start at "
        "step 0).")
    overwrite_output_dir: bool = flag(
        False, "Start over in an output_dir that holds an earlier run, deleting its checkpoints and logs (with "
        "--resume_from_checkpoint latest: only when there is nothing to resume).")
    max_nonfinite_steps: int = flag(
        3, "A step with a non-finite loss or gradient is skipped; this many in a row save a checkpoint and stop "
        "the run.")

    # --- LoRA (PEFT), the flags as TRL names them ---
    use_peft: bool = flag(
        False, "Train LoRA adapters (PEFT) instead of every weight: the reference is then the same weights with the "
        "adapters off (no second copy), and the final output is the adapter.")
    lora_r: int = flag(16, "--use_peft: each adapter's rank r (W x + (alpha / r) B A x, A: r x in, B: out x r).")
    lora_alpha: int = flag(32, "--use_peft: the adapters' scale alpha (their output is multiplied by alpha / r).")
    lora_dropout: float = flag(0.05, "--use_peft: dropout on each adapter's input.")
    lora_target_modules: list[str] = flag(
        list(LORA_TARGETS), "--use_peft: the linear layers that get adapters, by the last part of their names, in "
        "the language model only (all-linear: every one of its linear layers).")
    lora_vision: bool = flag(
        False, "--use_peft: put adapters on the vision tower's linear layers named in --lora_target_modules too "
        "(Qwen2-VL's: qkv proj fc1 fc2); without it the vision tower stays as it is.")
    merge_adapter: bool = flag(
        False, "--use_peft: also write output_dir/merged/, the base weights with the adapters merged in, which "
        "from_pretrained loads.")


def parse_args(argv: list[str]) -> GRPOArguments:
    """train.py's command line as GRPOArguments (transformers' HfArgumentParser, the ecosystem's convention).
    `--config FILE.yaml` reads a recipe's flags as the defaults, so a flag on the command line wins
    wherever it stands, before or after --config (as TRL's and open-r1's --config)."""
    from transformers import HfArgumentParser

    class TrainParser(UsageParser, HfArgumentParser):
        """HfArgumentParser with UsageParser's errors (a class made here: transformers loads only when
        train.py's flags are read, not whenever this module is imported)."""

    parser = TrainParser(GRPOArguments, prog="train.py", description="GRPO for vision-language models (train.py). "
                         "--config FILE.yaml takes the flags from a recipe (recipes/); flags given here override it.")
    for name in ("--bf16", "--compile_decode"):  # unset (None) means "on a GPU": `--bf16` alone still means true
        parser._option_string_actions[name].nargs, parser._option_string_actions[name].const = "?", True
    recipe, argv = split_config_flag(argv)
    if recipe is not None:
        parser.set_defaults(**read_recipe(recipe, parser))
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    args.run_name = args.run_name or os.path.basename(os.path.normpath(args.output_dir))
    return args


class UsageError(ValueError):
    """A mistake in the command line or its files: a script prints the message on one line, with no
    traceback, and exits with status 2."""


def exit_status(prog: str, run) -> int:
    """A script's command line: run(), then 0; a UsageError is one line on stderr and status 2."""
    try:
        run()
    except UsageError as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


class UsageParser(argparse.ArgumentParser):
    """argparse for every script's command line (train.py's through HfArgumentParser, eval.py, bench.py,
    data_tools.py): a bad command line is a UsageError, one line and status 2 like every other, instead
    of argparse's usage text and the error; a mistyped flag names the nearest one."""

    def parse_known_args(self, args=None, namespace=None):
        # A word no flag takes is an error here, not a leftover to return: HfArgumentParser and
        # sub-commands parse through this method, not through parse_args.
        namespace, unknown = super().parse_known_args(args, namespace)
        if unknown:
            raise unknown_flag_error(unknown, self)
        return namespace, []

    def error(self, message):
        # argparse names a flag "argument --top_p/--top-p: "; every other error here starts "--top_p: ".
        raise UsageError(re.sub(r"^argument (-[^/:]+)(/[^:]+)?: ", r"\1: ", message))


def unknown_flag_error(unknown: list[str], parser: argparse.ArgumentParser) -> UsageError:
    """The error for the words of a command line that no flag took: the first unknown flag and the
    parser's nearest one, as a recipe's unknown key names the nearest flag."""
    typed = next((word.partition("=")[0] for word in unknown if word.startswith("--")), None)
    if typed is None:
        return UsageError(f"unrecognized arguments: {' '.join(unknown)}")
    flags = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
    close = difflib.get_close_matches(typed, flags, n=1)
    return UsageError(f"unknown flag {typed}; "
                      + (f"did you mean {close[0]}?" if close else f"{parser.prog} --help lists them."))


def bad(flag: str, why: str):
    raise UsageError(f"--{flag}: {why}")


def split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the file of `--config FILE` or `--config=FILE`, or None; the command line without it)."""
    recipe, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" or arg.startswith("--config="):
            if recipe is not None:
                raise UsageError("--config: given twice; a run reads one recipe (put the other's changes on the "
                                 "command line).")
            recipe = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            if not recipe or recipe.startswith("--"):
                raise UsageError("--config: needs a recipe file, e.g. --config recipes/qwen2-vl-2b-grpo-8k.yaml.")
            i += 1 if "=" in arg else 2
            continue
        rest.append(arg)
        i += 1
    return recipe, rest


# The flags' types, as a recipe's error names them.
_TYPE_NAMES = {"int": "a whole number", "float": "a number", "string_to_bool": "true or false", "str": "text"}


def read_recipe(path: str, parser) -> dict:
    """A recipe's flags: a YAML mapping from each flag's name (without its --) to its value, a list for
    the flags that take several. Each value goes through its flag's own type, as if typed on the
    command line, so a recipe means exactly what the same command line means."""
    import yaml

    try:
        with open(path) as f:
            recipe = yaml.safe_load(f)
    except FileNotFoundError:
        raise UsageError(f"--config: {path!r}: no such file; give a recipe's path, e.g. "
                         "recipes/qwen2-vl-2b-grpo-8k.yaml.") from None
    except OSError as e:
        raise UsageError(f"--config: {path!r} cannot be read: {e.strerror or e}.") from None
    except yaml.YAMLError as e:
        raise UsageError(f"--config: {path!r} is not YAML: {' '.join(str(e).split())}") from None
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise UsageError(f"--config: {path!r} must map flag names to values (`learning_rate: 1.0e-6` lines), "
                         f"not hold a {type(recipe).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(GRPOArguments)}
    values = {}
    for key, value in recipe.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            raise UsageError(f"--config: {path!r}: unknown key {key!r}; " + (
                f"did you mean {close[0]!r}?" if close else "its keys are train.py's flags without their --."))
        if value is None and fields[key].default is None:  # `epsilon_high: null`: a flag that may be unset, unset
            values[key] = None
        else:
            values[key] = _as_typed(value, parser._option_string_actions[f"--{key}"], f"--config: {path!r}: {key}")
    return values


def _as_typed(value, action, where: str):
    """A recipe's value converted as the command line converts the flag's words: by the flag's type,
    from its text (so 8.5 is no whole number, as "8.5" is none), a list for the flags that take several."""
    several = action.nargs == "+"
    items = value if isinstance(value, list) and several else [value]
    try:
        if any(isinstance(item, (list, dict)) or item is None for item in items):
            raise ValueError
        converted = [action.type(str(item)) for item in items]
        if action.choices is not None and any(item not in action.choices for item in converted):
            raise ValueError
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        kind = (f"one of {list(action.choices)}" if action.choices is not None
                else _TYPE_NAMES.get(action.type.__name__, action.type.__name__))
        raise UsageError(f"{where}: {value!r} will not do; {action.option_strings[0]} takes "
                         f"{'a list, each item ' if several else ''}{kind}.") from None
    return converted if several else converted[0]


def looks_like_hub_id(name: str) -> bool:
    """owner/name, as on the Hugging Face hub (a path that does not exist may look like one too)."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.startswith((".", "/"))


def check_model_path(model: str) -> None:
    """--model_name_or_path of train.py, eval.py and data_tools.py: a folder save_pretrained wrote (its
    config.json, or a LoRA adapter's adapter_config.json, which names its base model), or a hub id."""
    if os.path.isdir(model):
        if not any(os.path.isfile(os.path.join(model, name)) for name in ("config.json", "adapter_config.json")):
            bad("model_name_or_path", f"folder {model!r} holds no config.json (nor a LoRA adapter's "
                "adapter_config.json); give a folder written by save_pretrained (a train.py output_dir or "
                "checkpoint), or a hub id such as Qwen/Qwen2-VL-2B-Instruct.")
    elif not looks_like_hub_id(model):
        bad("model_name_or_path", f"{model!r} is neither a model folder (no such folder) nor a hub id (owner/name).")


def check_paths(args: GRPOArguments) -> None:
    """The model, the dataset and the output folder, checked before anything loads."""
    check_model_path(args.model_name_or_path)
    data = args.dataset_name
    if not os.path.exists(data) and (os.path.splitext(data)[1] in (".parquet", ".jsonl", ".json")
                                     or not looks_like_hub_id(data)):
        bad("dataset_name", f"{data!r}: no such file or folder (give a .parquet / .jsonl file, a save_to_disk "
            "folder, or a hub id owner/name).")
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=args.output_dir):
            pass
    except OSError as e:
        bad("output_dir", f"{args.output_dir!r} cannot be written: {e.strerror or e}.")


def validate(args: GRPOArguments) -> None:
    """Stop before any model is loaded when the arguments cannot work: ranges, and rules between flags
    (a flag that takes one of a few names was checked against its choices as it was read)."""
    from .rewards import REWARD_FUNCS, get_reward_funcs

    if args.num_generations < 2:
        bad("num_generations", f"is {args.num_generations}; GRPO compares completions within a group, so G must "
            "be >= 2.")
    if not args.reward_funcs:
        bad("reward_funcs", f"is empty; name at least one of {sorted(REWARD_FUNCS)} or a module:function path.")
    try:
        get_reward_funcs(args.reward_funcs)
    except ValueError as e:
        bad("reward_funcs", str(e))
    if args.reward_weights is not None and len(args.reward_weights) != len(args.reward_funcs):
        bad("reward_weights", f"has {len(args.reward_weights)} values for {len(args.reward_funcs)} reward functions "
            f"{args.reward_funcs}.")
    if "none" in args.report_to and len(args.report_to) > 1:
        bad("report_to", f"{args.report_to} asks for none and for some; give none alone, or leave it out.")
    if "wandb" in args.report_to and importlib.util.find_spec("wandb") is None:
        bad("report_to", "wandb is not installed: pip install wandb (and `wandb login`, or WANDB_MODE=offline); "
            "or leave wandb out of --report_to.")
    for flag in ("per_device_train_batch_size", "gradient_accumulation_steps", "num_iterations",
                 "max_completion_length", "max_prompt_length", "logging_steps", "max_nonfinite_steps"):
        if getattr(args, flag) < 1:
            bad(flag, f"is {getattr(args, flag)}; it must be at least 1.")
    if args.beta < 0:
        bad("beta", f"is {args.beta}; the KL coefficient cannot be negative.")
    if args.temperature <= 0:
        bad("temperature", f"is {args.temperature}; sampling needs a positive temperature.")
    if not 0 < args.top_p <= 1:
        bad("top_p", f"is {args.top_p}; it must be in (0, 1].")
    if args.generation_batch_size < 0 or 0 < args.generation_batch_size < args.num_generations:
        bad("generation_batch_size", f"is {args.generation_batch_size}; use 0 (no limit) or at least one group "
            f"(--num_generations {args.num_generations} completions).")
    if args.loss_type in ("cispo", "sapo") and args.importance_sampling_level != "token":
        bad("importance_sampling_level", f"{args.importance_sampling_level!r} (GSPO) goes with grpo, bnpo, dr_grpo or "
            f"dapo; --loss_type {args.loss_type} weighs each token by its own ratio.")
    for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
        if getattr(args, name) <= 0:
            bad(name, f"is {getattr(args, name)}; SAPO's gate sigmoid(tau (r - 1)) needs tau > 0 (the paper: 1.0 "
                "and 1.05).")
    if args.epsilon_high is not None and args.epsilon_high < args.epsilon:
        bad("epsilon_high", f"{args.epsilon_high} is below --epsilon {args.epsilon}; clip-higher wants it above "
            "(DAPO: 0.28).")
    if args.min_pixels > args.max_pixels:
        bad("min_pixels", f"{args.min_pixels} is above --max_pixels {args.max_pixels}.")
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        bad("num_train_epochs", "must be positive when --max_steps is not set.")
    check_lora(args)
    check_data_and_waits(args)


def check_data_and_waits(args: GRPOArguments) -> None:
    """--dataset_num_proc, --dataloader_num_workers, --ddp_timeout."""
    if args.dataset_num_proc is not None and args.dataset_num_proc < 1:
        bad("dataset_num_proc", f"is {args.dataset_num_proc}; give at least 1 worker process, or leave it out "
            "(the cores per rank).")
    if args.dataloader_num_workers is not None and args.dataloader_num_workers < 0:
        bad("dataloader_num_workers", f"is {args.dataloader_num_workers}; give 0 (no background threads) or more.")
    if args.ddp_timeout < 1:
        bad("ddp_timeout", f"is {args.ddp_timeout}; give the seconds a collective may wait, at least 1 "
            "(Hugging Face's default: 1800).")


def check_lora(args: GRPOArguments) -> None:
    """The LoRA flags' values; whether the target names exist is checked against the model's layers
    (families.lora_targets) before its weights load."""
    for flag in ("lora_vision", "merge_adapter"):
        if getattr(args, flag) and not args.use_peft:
            bad(flag, "applies to LoRA adapters; add --use_peft true, or drop it.")
    if not args.use_peft:
        return
    if args.lora_r < 1:
        bad("lora_r", f"is {args.lora_r}; an adapter's rank must be at least 1 (TRL's default: 16).")
    if args.lora_alpha <= 0:
        bad("lora_alpha", f"is {args.lora_alpha}; the adapters' scale alpha / r must be positive (TRL's default: 32).")
    if not 0 <= args.lora_dropout < 1:
        bad("lora_dropout", f"is {args.lora_dropout}; a dropout probability is in [0, 1) (TRL's default: 0.05).")
    if not args.lora_target_modules:
        bad("lora_target_modules", f"is empty; name linear layers, e.g. {' '.join(LORA_TARGETS)}, or all-linear.")
    if "all-linear" in args.lora_target_modules and len(args.lora_target_modules) > 1:
        bad("lora_target_modules", "all-linear already means every linear layer; give it alone, or list names.")
    if args.lora_vision and args.freeze_vision_tower:
        bad("lora_vision", "puts adapters in the vision tower, which --freeze_vision_tower true keeps as it is; "
            "drop one.")


# transformers' own floor (5.25, utils/import_utils.is_flash_attn_2_available: below it transformers
# refuses flash_attention_2 at load). It covers [flash-attn causal alignment]: before 2.1 the causal mask
# of fewer queries than keys is aligned to the top left; the completion pass (T queries over P + T keys)
# needs the bottom right.
MIN_FLASH_ATTN = (2, 3, 3)


# Before 5.24 transformers drops, without an error, the `cache=` keyword the shared prompt's forward
# passes: its log-probs come out wrong (0.26 nats on the demo's model) and sampling fails (seen with
# gpu_check.py --quick on 5.17, 5.21.1 and 5.23.0, 2026-12-07; requirements.txt's floor).
MIN_TRANSFORMERS = (5, 24)


def check_transformers(version: str) -> None:
    """A UsageError unless the installed transformers (`version`) is MIN_TRANSFORMERS or newer."""
    if tuple(int(part) for part in re.findall(r"\d+", version)[:2]) < MIN_TRANSFORMERS:
        raise UsageError(f"transformers {version} is installed, and before 5.24 it drops the KV cache the shared "
                         "prompt passes (wrong log-probs, no error); pip install -U 'transformers>=5.24,<6'.")


def flash_attn_version() -> str | None:
    """The installed flash-attn's version, or None."""
    from importlib import metadata

    try:
        return metadata.version("flash-attn")
    except metadata.PackageNotFoundError:
        return None


def attention_for(requested: str | None, half_precision: bool, on_gpu: bool, flash_attn: str | None) -> str:
    """The attention kernel a model runs: `requested` (--attn_implementation) if it can run, else a
    UsageError naming the flag; None: flash_attention_2 where it can run, else sdpa.

    flash_attention_2 runs on a CUDA GPU (`on_gpu`), with 16-bit weights (`half_precision`: flash-attn
    rejects float32 at the first forward), and flash-attn >= 2.3.3 installed (`flash_attn`: its version,
    flash_attn_version(), or None; transformers' floor, MIN_FLASH_ATTN): an older one is refused even
    when flash_attention_2 was not asked for (before 2.1 it would make the completion pass wrong without
    any error: [flash-attn causal alignment])."""
    if requested is None and not (on_gpu and half_precision and flash_attn is not None):
        return "sdpa"
    if requested not in (None, "flash_attention_2"):
        return requested
    if not on_gpu:
        bad("attn_implementation", "flash_attention_2 runs on a CUDA GPU only; use sdpa here.")
    if not half_precision:
        bad("attn_implementation", "flash_attention_2 takes 16-bit weights only, and --bf16 is false; "
            "drop --bf16 false, or use sdpa.")
    if flash_attn is None:
        bad("attn_implementation", "flash_attention_2 needs flash-attn (pip install flash-attn "
            "--no-build-isolation); or use sdpa.")
    if tuple(int(part) for part in re.findall(r"\d+", flash_attn)[:3]) < MIN_FLASH_ATTN:
        bad("attn_implementation", f"flash-attn {flash_attn} is installed, and transformers takes 2.3.3 or newer "
            "(before 2.1 it also aligns a causal mask of fewer queries than keys to the top left, which would make "
            "the completion pass wrong without any error); upgrade it (pip install -U flash-attn "
            "--no-build-isolation) or use sdpa.")
    return "flash_attention_2"


def settle_device_defaults(args: GRPOArguments, on_gpu: bool, flash_attn: str | None) -> None:
    """Fill --bf16, --attn_implementation, --compile_decode and --dataloader_num_workers, and refuse an
    attention that cannot run, before loading.

    --bf16 unset: true on a GPU (the published run), false on the CPU (bf16 matmuls there are slow
    and the tests compare float32 numbers). --attn_implementation: attention_for's. --compile_decode
    unset: true on a GPU, false on the CPU (docs/PERFORMANCE.md: there a compile costs more than short
    runs win back). --dataloader_num_workers unset: 1 on a GPU (the host is idle while the accelerator
    steps), 0 on the CPU (the thread slows the step it would feed: docs/PERFORMANCE.md)."""
    if args.dataloader_num_workers is None:
        args.dataloader_num_workers = 1 if on_gpu else 0
    if args.bf16 is None:
        args.bf16 = on_gpu
    if args.compile_decode is None:
        args.compile_decode = on_gpu
    args.attn_implementation = attention_for(args.attn_implementation, args.bf16, on_gpu, flash_attn)
