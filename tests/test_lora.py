"""LoRA through PEFT (--use_peft): where the adapters go, the reference as the policy with its
adapters off, the shared prompt with adapters, and whole runs: what a run saves and merges, eval.py on
an adapter, and a ZeRO-3 run on 2 ranks killed and resumed."""

import json
import os
import sys

import pytest
import torch
from conftest import read_metrics, run_command
from safetensors.torch import load_file
from test_policy import _logps_and_grads, _three_prompts

from grpo import config, distributed, families, policy
from grpo.config import UsageError


def _with_adapters(folder, checkpointing=False):
    """The tiny model with adapters on the default targets, their B drawn at random (PEFT starts B at
    0, where the adapters change nothing and a test of them could not fail)."""
    model = families.load_model(folder, torch.float32, "sdpa")
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    targets = families.lora_targets(model, list(config.LORA_TARGETS), vision=False)
    wrapped = families.add_lora(model, targets, r=4, alpha=8, dropout=0.0, seed=0)
    draws = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=draws) * 0.5)
    return wrapped


def test_adapters_go_on_the_language_models_projections_alone(tiny_qwen2_5_vl):
    """Qwen2.5-VL's vision blocks name their MLP gate_proj, up_proj, down_proj as the decoder's do:
    the default targets reach the decoder alone, and the vision tower only when asked."""
    skeleton = families.define_model_classes(tiny_qwen2_5_vl)
    layers, blocks = skeleton.config.text_config.num_hidden_layers, skeleton.config.vision_config.depth
    text = families.lora_targets(skeleton, list(config.LORA_TARGETS), vision=False)
    assert len(text) == 7 * layers and all(name.startswith("model.language_model.layers.") for name in text)
    both = families.lora_targets(skeleton, list(config.LORA_TARGETS), vision=True)
    vision = sorted(set(both) - set(text))
    assert len(vision) == 3 * blocks and all(name.startswith("model.visual.blocks.") for name in vision)
    assert {name.rsplit(".", 1)[1] for name in vision} == {"gate_proj", "up_proj", "down_proj"}
    with pytest.raises(UsageError, match=r"--lora_target_modules: 'qkv_proj' names no linear layer of the language "
                                         r"model; the language model's are down_proj, gate_proj, k_proj, o_proj"):
        families.lora_targets(skeleton, ["q_proj", "qkv_proj"], vision=False)
    with pytest.raises(UsageError, match=r"--lora_vision: none of --lora_target_modules q_proj is a linear layer of the vision tower"):
        families.lora_targets(skeleton, ["q_proj"], vision=True)


def test_an_adapter_folder_stands_for_its_base_model_before_any_weight_loads(tiny_model, tmp_path):
    """An adapter folder given as --model_name_or_path (to train on from it, or to evaluate): its
    family and its module skeleton are the base model's, which its adapter_config.json names."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": tiny_model}))
    config.check_model_path(str(adapter))
    assert families.check_model_type(str(adapter)) is families.FAMILIES["qwen2_vl"]
    skeleton = families.define_model_classes(str(adapter))
    assert skeleton.config.model_type == "qwen2_vl" and skeleton.device.type == "meta"


class _Engine:
    """What WithoutAdapters needs of a DeepSpeed engine: its module, and a call that runs it."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_reference_is_the_base_model_and_the_shared_prompt_runs_the_adapters(tiny_model):
    """The reference of a LoRA run (the policy with its adapters off) gives the base model's
    log-probs, on the shared-prompt path, and leaves the policy in train mode; with the adapters on,
    the shared path gives the plain path's log-probs and gradients, which reach the adapters alone."""
    processor = families.load_processor(tiny_model, 56 * 56, 112 * 112)
    base = families.load_model(tiny_model, torch.float32, "sdpa")
    lora = _with_adapters(tiny_model, checkpointing=True)
    assert not getattr(families.unwrap(lora), "_require_grads_hooks", None)  # [LoRA's input gradients]
    policy.allow_checkpointing_with_shared_prompt(lora)
    inputs = _three_prompts(processor)
    G, T = 3, 7
    ids = torch.randint(10, len(processor.tokenizer) - 20, (3 * G, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    with torch.no_grad():
        base_logps = policy.completion_logps(base.eval(), inputs, ids, mask, 0.9, G, share_prompt=False)
        reference = policy.completion_logps(families.WithoutAdapters(_Engine(lora)), inputs, ids, mask, 0.9, G,
                                            share_prompt=True)
    assert lora.training
    torch.testing.assert_close(reference * mask, base_logps * mask, atol=1e-5, rtol=0)

    plain_logps, plain_grads = _logps_and_grads(lora, inputs, ids, mask, G, share_prompt=False)
    shared_logps, shared_grads = _logps_and_grads(lora, inputs, ids, mask, G, share_prompt=True)
    assert ((plain_logps - base_logps) * mask).abs().max() > 1e-2  # the adapters change the policy
    torch.testing.assert_close(shared_logps * mask, plain_logps * mask, atol=1e-5, rtol=0)
    trained = {name for name, param in lora.named_parameters() if param.requires_grad}
    assert trained and all(".lora_A." in name or ".lora_B." in name for name in trained)
    assert set(shared_grads) == set(plain_grads) == trained
    for name, grad in plain_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


def test_sampling_runs_the_merged_weights_and_leaves_the_model_bitwise_as_it_was(tiny_model):
    """sample_groups on a LoRA model (families.adapters_merged): generate runs on W + (alpha / r) B A with
    no adapter branch called, and draws exactly what the same weights merged by PEFT's merge_and_unload
    draw at the same seed; afterwards every weight and the log-probs are bitwise as before (float32 here;
    PEFT's own unmerge subtracts the delta again, and W + d - d is not W in floating point)."""
    import copy

    processor = families.load_processor(tiny_model, 56 * 56, 112 * 112)
    lora = _with_adapters(tiny_model)
    inputs = _three_prompts(processor)
    G, T = 3, 7
    ids = torch.randint(10, len(processor.tokenizer) - 20, (3 * G, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)

    def sample(model) -> torch.Tensor:
        torch.manual_seed(5)
        settings = dict(group_size=G, max_new_tokens=8, temperature=1.0, ignore_eos=True,
                        suppressed_ids=tuple(families.forbidden_token_ids(processor, families.unwrap(model).config)))
        return policy.sample_groups(model, inputs, policy.Sampling.for_model(model, processor.tokenizer, **settings)
                                    ).completion_ids

    def logps() -> torch.Tensor:
        with torch.no_grad():
            return policy.completion_logps(lora.eval(), inputs, ids, mask, 0.9, G)

    weights, logps_before = {name: p.detach().clone() for name, p in lora.named_parameters()}, logps()
    adapter_calls = []
    for name, module in lora.named_modules():
        if name.endswith(".lora_A.default"):
            module.register_forward_hook(lambda *_: adapter_calls.append(1))
    sampled = sample(lora)
    assert adapter_calls == []
    assert all(torch.equal(p, weights[name]) for name, p in lora.named_parameters())
    assert torch.equal(logps(), logps_before)
    assert adapter_calls  # the hooks count: outside sampling the adapters run
    merged = copy.deepcopy(lora).merge_and_unload()
    assert torch.equal(sample(merged), sampled)
    assert not torch.equal(sample(families.load_model(tiny_model, torch.float32, "sdpa")), sampled)  # the adapters count


LORA_RUN = ["--use_peft", "true", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.0",
            "--num_generations", "4", "--per_device_train_batch_size", "2", "--max_completion_length", "12",
            "--learning_rate", "1e-2", "--beta", "0.04", "--logging_steps", "1", "--max_pixels", "3136",
            "--log_completions_steps", "0", "--report_to", "none", "--gradient_checkpointing", "true"]


def test_one_process_run_saves_the_adapter_merges_it_and_eval_reads_it(format_warmed_model, colour_dataset, tmp_path):
    """The final output is the adapter (no full weights); its frozen weights never moved (the merged
    model differs from the base in the adapted projections alone, by (alpha / r) B A, computed here from
    the adapter's file); eval.py takes the adapter folder and answers as the merged model does."""
    out = tmp_path / "run"
    log = run_command([sys.executable, "train.py", "--output_dir", str(out), "--model_name_or_path", format_warmed_model,
                       "--dataset_name", colour_dataset, "--max_steps", "2", "--save_steps", "1",
                       "--merge_adapter", "true", *LORA_RUN], tmp_path)
    assert "training LoRA adapters (r 8, alpha 16) on the language model, the rest frozen" in log
    assert "reference model: the policy with its adapters off (no second model loaded)" in log
    for folder in (out, out / "checkpoint-1"):
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(folder))
        assert not [name for name in os.listdir(folder) if name.startswith("model") and name.endswith(".safetensors")]
    assert [m["step"] for m in read_metrics(str(out))] == [1, 2]

    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all(".lora_A." in key or ".lora_B." in key for key in adapter)
    assert any(tensor.abs().max() > 0 for key, tensor in adapter.items() if ".lora_B." in key)  # it trained

    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(format_warmed_model).state_dict()
    merged = AutoModelForImageTextToText.from_pretrained(str(out / "merged")).state_dict()
    assert merged.keys() == base.keys()
    changed = {key for key in base if not torch.equal(base[key], merged[key])}
    adapted = {key.split("base_model.model.", 1)[1].replace(".lora_A.weight", ".weight")
               for key in adapter if ".lora_A." in key}
    assert changed and changed <= adapted  # the vision tower, the embeddings and the norms as they were
    for key in sorted(adapted)[:4]:
        prefix = "base_model.model." + key.removesuffix(".weight")
        delta = (16 / 8) * adapter[prefix + ".lora_B.weight"] @ adapter[prefix + ".lora_A.weight"]
        torch.testing.assert_close(merged[key], base[key] + delta, atol=1e-5, rtol=1e-5)

    answers = {}
    for name, folder in (("adapter", out), ("merged", out / "merged")):
        run_command([sys.executable, "eval.py", "--model_name_or_path", str(folder), "--dataset_name", colour_dataset,
                     "--split", "train", "--max_new_tokens", "8", "--max_pixels", "3136",
                     "--output", str(tmp_path / f"{name}.json")], tmp_path)
        with open(tmp_path / f"{name}.samples.jsonl") as f:
            answers[name] = [json.loads(line)["completion"] for line in f]
    assert answers["adapter"] == answers["merged"] and len(answers["adapter"]) == 8


def test_zero3_two_ranks_killed_and_resumed_ends_with_the_straight_runs_adapter(format_warmed_model, colour_dataset,
                                                                               tmp_path):
    """4 steps straight against 2 steps, SIGKILL, and a resume to 4, under ZeRO-3 on 2 ranks with
    the shared prompt, gradient checkpointing and the adapters-off reference: the same rewards at every
    step and the same adapter at the end; the straight run also merges its adapter (--merge_adapter)."""
    flags = ["--deepspeed", "zero3.json", "--max_steps", "4", "--save_steps", "2", *LORA_RUN]
    launcher = ["deepspeed", "--num_gpus", "2", "tests/fault_worker.py"]

    def train(out, faults, *more, returncode=0):
        return run_command([*launcher, "--output_dir", str(out), "--model_name_or_path", format_warmed_model,
                            "--dataset_name", colour_dataset, *flags, *more], tmp_path, returncode=returncode,
                           env={"GRPO_TEST_FAULTS": json.dumps(faults)})

    straight, broken = tmp_path / "straight", tmp_path / "broken"
    log = train(straight, {}, "--merge_adapter", "true")
    assert "ZeRO stage 3" in log and "2 rank(s)" in log
    # rank 0 merges the saved adapter into the base weights on its own, the other rank waiting
    from transformers import AutoModelForImageTextToText

    merged = AutoModelForImageTextToText.from_pretrained(str(straight / "merged")).state_dict()
    base = AutoModelForImageTextToText.from_pretrained(format_warmed_model).state_dict()
    assert any(not torch.equal(merged[key], base[key]) for key in base)
    train(broken, {"kill_after_save": 2}, returncode=None)
    assert os.path.isdir(broken / "checkpoint-2") and not os.path.exists(broken / "adapter_model.safetensors")
    log = train(broken, {}, "--resume_from_checkpoint", "latest")
    assert f"resumed from {broken / 'checkpoint-2'} at step 2 of 4" in log

    resumed, uninterrupted = read_metrics(str(broken)), read_metrics(str(straight))
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(resumed, uninterrupted):
        assert a["reward/mean"] == b["reward/mean"] and a["completion/length_mean"] == b["completion/length_mean"]
    assert any(m["loss/kl"] > 0 for m in uninterrupted)  # the reference (adapters off) left behind
    ends = [load_file(str(folder / "adapter_model.safetensors")) for folder in (broken, straight)]
    assert ends[0].keys() == ends[1].keys()
    assert max((ends[0][k] - ends[1][k]).abs().max().item() for k in ends[0]) < 1e-5
    assert max(tensor.abs().max().item() for key, tensor in ends[1].items() if ".lora_B." in key) > 1e-4


ENGINE_LORA_LAYERS = """
import json, sys, torch
from grpo import config, distributed, families
rank, world_size, device = distributed.init_distributed()
args = config.parse_args(sys.argv[1:])
config.validate(args)
config.settle_device_defaults(args, on_gpu=False, flash_attn=None)
ds_config = distributed.fill_deepspeed_config(distributed.read_deepspeed_config(args.deepspeed), args, world_size, 1, on_gpu=False)
engine = distributed.load_engine(args, ds_config, torch.float32, 1, train=True)
print("ADAPTED", json.dumps(sorted(name.rsplit(".lora_A", 1)[0] for name, _ in engine.module.named_modules()
                        if name.endswith(".lora_A"))))
distributed.end_distributed()
"""


@pytest.mark.parametrize("vision", [False, True])
def test_the_trained_engine_has_adapters_where_lora_targets_says(tiny_qwen2_5_vl, colour_dataset, tmp_path, vision):
    """The policy engine train.py builds with --use_peft (distributed.load_engine), on Qwen2.5-VL, whose
    vision blocks name their MLP as the decoder's does: adapters on exactly the layers lora_targets
    lists, the language model's alone unless --lora_vision ([LoRA in the vision tower])."""
    flags = ["--model_name_or_path", tiny_qwen2_5_vl, "--dataset_name", colour_dataset, "--output_dir", str(tmp_path),
             "--use_peft", "true", "--lora_vision", str(vision).lower(), "--deepspeed", "zero3.json"]
    log = run_command([sys.executable, "-c", ENGINE_LORA_LAYERS, *flags], tmp_path)
    adapted = json.loads(next(line for line in log.splitlines() if line.startswith("ADAPTED ")).split(" ", 1)[1])
    skeleton = families.define_model_classes(tiny_qwen2_5_vl)
    expected = families.lora_targets(skeleton, list(config.LORA_TARGETS), vision=vision)
    assert [name.removeprefix("base_model.model.") for name in adapted] == expected
    assert any(".visual." in name for name in adapted) == vision
