"""A tiny Qwen2-VL made here, saved like a real one.

Model weights cannot come from the hub on an offline machine, so the tests and the CPU demo build a
small random Qwen2-VL in code: transformers' own config classes, a byte-level BPE tokenizer trained
with the `tokenizers` library, and the real Qwen2-VL image processor. `save_tiny_qwen2_vl(folder)`
writes it with `save_pretrained`, and everything else loads it through the same
`--model_name_or_path` path as Qwen/Qwen2-VL-2B-Instruct.
"""

from __future__ import annotations

import json
import os

# Qwen2-VL's chat format (the same tokens as the real template), written out so the tiny
# tokenizer needs no hub file. An image item becomes <|vision_start|><|image_pad|><|vision_end|>;
# the processor then repeats <|image_pad|> once per merged image patch.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]

# Text the tokenizer's BPE merges are learned from: the answer format, digits, letters and the
# words of the demo's questions, so that common pieces are single tokens.
_TOKENIZER_CORPUS = [
    "<think>I see.</think><answer>",
    "A conversation between User and Assistant. The assistant first thinks about the reasoning "
    "process in the mind and then provides the user with the answer.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 A B C D E (A) (B) (C) (D) A: B: C: D:",
    "What colour is the background? Is the white circle on the left or the right? Answer left or "
    "right. square triangle red green blue yellow Choices: A: red B: green C: blue D: yellow",
    "system user assistant image question answer choose the correct option",
]


def byte_level_bpe(special_tokens: list[str], vocab_size: int = 400, extra_text: tuple[str, ...] = ()):
    """A byte-level BPE model (`tokenizers`) learned from this module's small corpus, holding each
    of `special_tokens` as one token, in that order from id 0. Tiny models of every family use it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator((_TOKENIZER_CORPUS + list(extra_text)) * 4, trainer=trainer)
    return bpe


def build_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer with Qwen2-VL's special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    bpe = byte_level_bpe(SPECIAL_TOKENS, vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    # The format tags as single (ordinary, decodable) tokens: short answers for a small model.
    tokenizer.add_tokens(["<think>", "</think>", "<answer>", "</answer>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# What each family's published checkpoint ships in generation_config.json, with token names for ids
# (each tiny model maps them to its own tokenizer's ids). Tiny models carry these, so every test meets
# what a real checkpoint puts in front of `generate`: a list of end ids ([end ids]) and sampling defaults
# that must not reach the rollouts ([checkpoint sampling defaults]). The sources, as far as public material shows (the hub
# files themselves cannot be read from this offline machine):
#   qwen2_vl    Qwen/Qwen2-VL-2B-Instruct: end ids <|im_end|>, <|endoftext|>; top_k 1, top_p 0.001,
#               temperature 0.01 (the hub file as recalled; the same greedy-like triple as Qwen2.5-VL's).
#   qwen2_5_vl  Qwen/Qwen2.5-VL-7B-Instruct: top_k 1 and top_p 0.001 (QwenLM/Qwen3-VL issue 722, which links
#               the file), repetition_penalty 1.05 (Qwen2.5 Instruct checkpoints: prime-rl PR 886; a public
#               copy of a Qwen2.5-VL derivative's file carries 1.05, top_k 1, top_p 0.001, temperature 0.1
#               and end ids [151645, 151643]).
#   qwen3_vl    Qwen/Qwen3-VL-8B-Instruct: top_k 20, top_p 0.8, temperature 0.7, end ids <|im_end|>, <|endoftext|>.
#   gemma3      google/gemma-3-4b-it: end ids <eos> (1) and <end_of_turn> (106), top_k 64, top_p 0.95.
#   llava_onevision (llava-hf/llava-onevision-qwen2-0.5b-ov-hf), idefics3, smolvlm, aria: ids only, as
#               far as read here; their tiny models keep their tokenizer's eos.
PUBLISHED_GENERATION_CONFIGS = {
    "qwen2_vl": dict(eos_token_id=["<|im_end|>", "<|endoftext|>"], pad_token_id="<|endoftext|>",
                     bos_token_id="<|endoftext|>", do_sample=True, top_k=1, top_p=0.001, temperature=0.01),
    "qwen2_5_vl": dict(eos_token_id=["<|im_end|>", "<|endoftext|>"], pad_token_id="<|endoftext|>",
                       bos_token_id="<|endoftext|>", do_sample=True, repetition_penalty=1.05, top_k=1, top_p=0.001,
                       temperature=0.1),
    "qwen3_vl": dict(eos_token_id=["<|im_end|>", "<|endoftext|>"], pad_token_id="<|endoftext|>",
                     bos_token_id="<|endoftext|>", do_sample=True, top_k=20, top_p=0.8, temperature=0.7),
    "gemma3": dict(eos_token_id=["<eos>", "<end_of_turn>"], pad_token_id="<pad>", bos_token_id="<bos>",
                   do_sample=True, top_k=64, top_p=0.95),
}


def carry_published_generation_config(model, tokenizer, family: str) -> None:
    """Set `model.generation_config` to what the family's published checkpoint ships
    (PUBLISHED_GENERATION_CONFIGS), its token names turned into this tokenizer's ids."""
    from transformers import GenerationConfig

    def ids(value):
        return [tokenizer.convert_tokens_to_ids(v) for v in value] if isinstance(value, list) \
            else tokenizer.convert_tokens_to_ids(value)

    fields = {key: ids(value) if key.endswith("token_id") else value
              for key, value in PUBLISHED_GENERATION_CONFIGS[family].items()}
    model.generation_config = GenerationConfig(**fields)


def save_tiny_qwen2_vl(folder: str, hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> str:
    """Build a random Qwen2-VL (text `hidden_size` wide, `num_layers` deep, a 1-layer vision tower)
    with its tokenizer and processor, and save all three to `folder`. Returns `folder`."""
    import torch
    from transformers import (
        Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = build_tokenizer()
    token_id = tokenizer.convert_tokens_to_ids
    heads = max(2, hidden_size // 32)
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=heads,
            max_position_embeddings=4096,
            # mRoPE splits the rotary half-dimension (head_dim / 2) into temporal, height, width.
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": _mrope_section(hidden_size // heads)},
            bos_token_id=token_id("<|endoftext|>"), eos_token_id=token_id("<|im_end|>"),
            pad_token_id=token_id("<|endoftext|>"),
        ),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=hidden_size, num_heads=2, mlp_ratio=2),
        image_token_id=token_id("<|image_pad|>"), video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"), vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    carry_published_generation_config(model, tokenizer, "qwen2_vl")
    # Small images keep the demo fast: 56x56 to 112x112 pixels is 4 to 16 image tokens.
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2
    return [half - 2 * (half // 4), half // 4, half // 4]


# ---------------------------------------------------------------------------------------------
# The demo task: small drawings with verifiable answers, made deterministically.
# ---------------------------------------------------------------------------------------------

DEMO_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (225, 205, 40)}
DEMO_SHAPES = ("circle", "square", "triangle")
DEMO_SIZES = {"train": 2000, "test": 200}
# The demo's train.py flags, which main passes to train.py as --config.
DEMO_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes", "demo.yaml")


def _recipe_system_prompt() -> str:
    import yaml

    with open(DEMO_RECIPE) as f:
        return yaml.safe_load(f)["system_prompt"]


# The recipe's system prompt, read here for the format warm-up: the model learns the format under the
# prompt its GRPO run will give it.
DEMO_SYSTEM_PROMPT = _recipe_system_prompt()


def draw_shape(colour: str, shape: str, side: str, jitter: tuple[int, int], shrink: int = 0, size: int = 56):
    """A white shape on a canvas of the colour, in the left or right half.

    (A coloured shape on white left the tiny model's four image tokens mostly white: even
    supervised training could not read the colour back. A coloured canvas puts it in every token.)
    """
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), DEMO_COLOURS[colour])
    draw = ImageDraw.Draw(image)
    r = size // 4 - shrink  # large, so the side is plain in the image tokens (28x28 quadrants)
    cx = (size // 4 if side == "left" else 3 * size // 4) + jitter[0]
    cy = size // 2 + jitter[1]
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = (255, 255, 255)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def demo_rows(split: str, seed: int = 1234) -> list[dict]:
    """The demo questions of one split, in the real data's schema (image, problem, solution).

    Three in four ask for the shape's colour as a multiple choice (options shuffled, chance 0.25);
    the rest ask whether it is on the left or the right, answered in a word (chance 0.5). Train and
    test come from one stream of unique drawings-and-questions, so the splits never overlap.
    """
    import random

    if split not in DEMO_SIZES:
        raise ValueError(f"--dataset_split {split!r}: the demo dataset has splits {sorted(DEMO_SIZES)}.")
    rng = random.Random(seed)
    seen, rows = set(), {"train": [], "test": []}
    while len(rows["test"]) < DEMO_SIZES["test"]:
        colour, shape = rng.choice(list(DEMO_COLOURS)), rng.choice(DEMO_SHAPES)
        side, jitter = rng.choice(("left", "right")), (rng.randint(-2, 2), rng.randint(-6, 6))
        shrink = rng.randint(0, 2)
        options = list(DEMO_COLOURS)  # a fixed option order: colour -> letter is what is learned
        task = "colour" if rng.random() < 0.75 else "side"
        key = (task, colour, shape, side, jitter, shrink)
        if key in seen:
            continue
        seen.add(key)
        if task == "colour":
            choices = " ".join(f"{letter}: {name}" for letter, name in zip("ABCD", options))
            problem = f"What colour is the background? Choices: {choices}"
            answer = "ABCD"[options.index(colour)]
        else:
            problem = f"Is the white {shape} on the left or the right? Answer left or right."
            answer = side
        target = "train" if len(rows["train"]) < DEMO_SIZES["train"] else "test"
        rows[target].append({"image": draw_shape(colour, shape, side, jitter, shrink), "problem": problem,
                             "solution": f"<think>A white {shape} on {colour}, on the {side}.</think><answer>{answer}</answer>"})
    return rows[split]


def demo_dataset(split: str):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "problem": datasets.Value("string"),
                                  "solution": datasets.Value("string")})
    return datasets.Dataset.from_list(demo_rows(split), features=features)


# ---------------------------------------------------------------------------------------------
# The demo's starting point: the tiny model, warmed up on the answer FORMAT only.
# ---------------------------------------------------------------------------------------------

def warm_up_format(folder: str, rows: list[dict], valid_answers, steps: int = 60, batch_size: int = 8,
                   learning_rate: float = 3e-3, seed: int = 0, system_prompt: str | None = None) -> str:
    """A short supervised cold start on the answer format, as R1 does before RL.

    A random model almost never writes <think>...</think><answer>...</answer>, so RL alone would see
    no reward. The warm-up targets are well-formed but each answer is drawn at random from
    `valid_answers(row)`, so the model learns the format and which answers exist, not which one is
    right: accuracy stays at chance and everything above it is GRPO's doing. Rewrites `folder`.
    """
    import random

    import torch

    from grpo.data import build_conversation
    from grpo.families import FAMILIES, build_inputs, load_model, load_processor
    from grpo.policy import completion_logps

    processor = load_processor(folder, 56 * 56, 56 * 56)
    tokenizer = processor.tokenizer
    model = load_model(folder, torch.float32, "sdpa")
    # The targets do not depend on the image, so the vision tower would only learn noise (and at
    # this learning rate its features grow until colours are hard to tell apart): keep it as built.
    model.model.visual.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    for _ in range(steps):
        batch = rng.sample(rows, batch_size)
        targets = [tokenizer.encode(f"<think>I see.</think><answer>{rng.choice(valid_answers(row))}"
                                    f"</answer><|im_end|>") for row in batch]
        width = max(map(len, targets))
        ids = torch.tensor([t + [tokenizer.pad_token_id] * (width - len(t)) for t in targets])
        mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in targets])
        conversations = [build_conversation(r["problem"], system_prompt) for r in batch]
        inputs = build_inputs(processor, conversations, [[r["image"]] for r in batch], FAMILIES["qwen2_vl"])
        logps = completion_logps(model, inputs, ids, mask, temperature=1.0, group_size=1, share_prompt=False)
        loss = -(logps * mask).sum() / mask.sum()  # cross-entropy on the target tokens
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    return folder


def demo_valid_answers(row: dict) -> list[str]:
    return list("ABCD") if "Choices:" in row["problem"] else ["left", "right"]


# ---------------------------------------------------------------------------------------------
# The demo run: data and model written to disk, then train.py on them like on any user's.
# ---------------------------------------------------------------------------------------------

def prepare(output_dir: str, warm_up_steps: int = 200) -> tuple[str, str]:
    """The demo's dataset (train and test splits, a save_to_disk folder) and its starting model (the
    tiny Qwen2-VL after `warm_up_steps` of format warm-up), written under output_dir once. Returns
    (model, data)."""
    import datasets

    data_folder, model_folder = os.path.join(output_dir, "demo-data"), os.path.join(output_dir, "demo-base-model")
    if not os.path.exists(os.path.join(data_folder, "dataset_dict.json")):
        datasets.DatasetDict({split: demo_dataset(split) for split in DEMO_SIZES}).save_to_disk(data_folder)
    if not os.path.exists(os.path.join(model_folder, "config.json")):
        print(f"[demo] building the tiny Qwen2-VL and its format warm-up in {model_folder}")
        save_tiny_qwen2_vl(model_folder + ".tmp")
        warm_up_format(model_folder + ".tmp", demo_rows("train"), demo_valid_answers, steps=warm_up_steps,
                       system_prompt=DEMO_SYSTEM_PROMPT)
        # What eval.py reads to prompt this model as it was trained (train.py writes the same file).
        with open(os.path.join(model_folder + ".tmp", "training_args.json"), "w") as f:
            json.dump({"system_prompt": DEMO_SYSTEM_PROMPT}, f)
        os.replace(model_folder + ".tmp", model_folder)
    return model_folder, data_folder


def main(argv: list[str]) -> None:
    """python demo.py [--output_dir outputs/demo] [--num_gpus 2] [train.py flags ...]

    Writes the demo's data and model, runs `deepspeed --num_gpus N train.py --config recipes/demo.yaml`
    on them (printed first; the flags given here come last, so they win), then draws rewards.png from
    the run's metrics.jsonl."""
    import argparse
    import socket
    import subprocess

    parser = argparse.ArgumentParser(description="The CPU demo: GRPO teaches a tiny VLM a visual task.")
    parser.add_argument("--output_dir", default="outputs/demo", help="Where the data, models and logs go.")
    parser.add_argument("--num_gpus", type=int, default=2, help="Ranks deepspeed starts (CPU ranks without a GPU).")
    args, train_flags = parser.parse_known_args(argv)
    model_folder, data_folder = prepare(args.output_dir)
    with socket.socket() as s:  # a free rendezvous port: several demos may run on one machine
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    command = ["deepspeed", "--master_port", port, "--num_gpus", str(args.num_gpus),
               os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"),
               "--config", DEMO_RECIPE, "--model_name_or_path", model_folder, "--dataset_name", data_folder,
               "--output_dir", args.output_dir, *train_flags]
    print("[demo] " + " ".join(command), flush=True)
    subprocess.run(command, check=True)
    png = plot_rewards(args.output_dir)
    print(f"[demo] rewards plotted in {png}; completion lengths and loss terms in "
          f"{os.path.join(args.output_dir, 'plots')}")


def plot_rewards(output_dir: str) -> str:
    """The run's plots (data_tools.plot_runs) in output_dir/plots, and its rewards figure (reward,
    accuracy and format rate per logged step) copied to output_dir/rewards.png, where the README
    points. Returns that path."""
    import shutil

    from data_tools import plot_runs

    plots = os.path.join(output_dir, "plots")
    plot_runs([os.path.join(output_dir, "metrics.jsonl")], plots)
    png = os.path.join(output_dir, "rewards.png")
    shutil.copyfile(os.path.join(plots, "rewards.png"), png)
    return png


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
