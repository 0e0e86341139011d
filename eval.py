"""Accuracy and format rate of a model on a dataset split, with greedy answers.

    python eval.py --model_name_or_path outputs/demo --dataset_name outputs/demo/demo-data --split test

One process, no DeepSpeed: the same data loading, prompts and rewards as train.py.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from grpo import data, rewards, sampler, vlm_adapter


def trained_system_prompt(model_name_or_path: str) -> str | None:
    """The system prompt the model was trained with, from the training_args.json train.py saves."""
    path = os.path.join(model_name_or_path, "training_args.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("system_prompt")


def evaluate(model_name_or_path: str, dataset_name: str, split: str, batch_size: int = 16,
             max_new_tokens: int = 64, max_prompt_length: int = 8192, min_pixels: int = 3136,
             max_pixels: int = 12845056, limit: int | None = None, system_prompt: str | None = None,
             log=print) -> dict:
    system_prompt = system_prompt or trained_system_prompt(model_name_or_path)
    family = vlm_adapter.check_model_type(model_name_or_path)
    processor = vlm_adapter.load_processor(model_name_or_path, min_pixels, max_pixels)
    model = vlm_adapter.load_model(model_name_or_path, torch.float32 if not torch.cuda.is_available() else torch.bfloat16)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    dataset = data.load_prompt_dataset(dataset_name, split, processor, family, max_prompt_length, system_prompt, log=log)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    eos = processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.eos_token)
    accuracy, formatted = [], []
    from tqdm.auto import tqdm

    for start in tqdm(range(0, count, batch_size), desc="evaluating", unit="batch"):
        examples = [dataset[i] for i in range(start, min(start + batch_size, count))]
        inputs = vlm_adapter.build_inputs(processor, [ex["prompt"] for ex in examples], [ex["images"] for ex in examples], family,
                                           [ex["videos"] for ex in examples])
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with torch.no_grad():
            output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                    suppress_tokens=vlm_adapter.forbidden_token_ids(processor, model.config),
                                    eos_token_id=eos, pad_token_id=processor.tokenizer.pad_token_id)
        texts = sampler.to_rollout(output[:, inputs["input_ids"].shape[1]:].cpu(), processor.tokenizer).texts
        accuracy += rewards.accuracy_reward(texts, [ex["solution"] for ex in examples], [ex["problem"] for ex in examples])
        formatted += rewards.format_reward(texts)
    result = {"model": model_name_or_path, "dataset": dataset_name, "split": split, "examples": count,
              "accuracy": sum(accuracy) / count, "format": sum(formatted) / count}
    log(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_name_or_path", required=True, help="Folder or hub id of the model to evaluate.")
    parser.add_argument("--dataset_name", required=True, help="Hub id, save_to_disk folder, or .parquet / .jsonl file.")
    parser.add_argument("--split", default="test", help="Dataset split.")
    parser.add_argument("--batch_size", type=int, default=16, help="Prompts per generate call.")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="Most tokens per answer.")
    parser.add_argument("--limit", type=int, default=None, help="Evaluate only the first N rows.")
    parser.add_argument("--system_prompt", default=None, help="System prompt (default: the one the model was trained with, from its training_args.json, else train.py's).")
    args = parser.parse_args()
    evaluate(args.model_name_or_path, args.dataset_name, args.split, args.batch_size, args.max_new_tokens,
             limit=args.limit, system_prompt=args.system_prompt)


if __name__ == "__main__":
    main()
