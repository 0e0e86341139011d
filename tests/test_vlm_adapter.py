"""grpo/vlm_adapter.py and grpo/sampler.py on the tiny Qwen2-VL: shapes, masks, row order, images."""

import contextlib

import pytest
import torch
from conftest import COLOURS, colour_rows
from PIL import Image

from grpo import sampler, vlm_adapter
from grpo.data import build_conversation


@pytest.fixture(scope="module")
def model_and_processor(tiny_model):
    processor = vlm_adapter.load_processor(tiny_model, 56 * 56, 112 * 112)
    model = vlm_adapter.load_model(tiny_model, torch.float32, "eager")
    return model, processor


def _inputs(processor, images, problems=None):
    problems = problems or [f"Question {i}?" for i in range(len(images))]
    return vlm_adapter.build_inputs(processor, [build_conversation(p) for p in problems], [[image] for image in images],
                                    vlm_adapter.FAMILIES["qwen2_vl"])


def _sample(model, processor, inputs, group_size, suppress=True, max_new_tokens=12, **kwargs):
    ids = vlm_adapter.forbidden_token_ids(processor, model.config) if suppress else []
    return sampler.sample_groups(model, inputs, processor.tokenizer, group_size=group_size, max_new_tokens=max_new_tokens,
                                 temperature=1.0, top_p=1.0, suppress_token_ids=ids, **kwargs)


def test_repeat_for_group_keeps_each_image_with_its_rows(model_and_processor):
    model, processor = model_and_processor
    images = [Image.new("RGB", (56, 56), "red"), Image.new("RGB", (112, 56), "blue"), Image.new("RGB", (56, 84), "green")]
    inputs = _inputs(processor, images)
    patches = inputs["image_grid_thw"].prod(-1).tolist()
    assert len(set(patches)) == 3  # three different patch counts: an off-by-one would misalign
    G = 3
    repeated = vlm_adapter.repeat_for_group(inputs, G, model.config)
    assert repeated["input_ids"].shape[0] == 9
    blocks = repeated["pixel_values"].split(repeated["image_grid_thw"].prod(-1).tolist())
    originals = inputs["pixel_values"].split(patches)
    for row in range(9):
        prompt = row // G  # rows i*G .. i*G+G-1 belong to prompt i
        assert torch.equal(repeated["input_ids"][row], inputs["input_ids"][prompt])
        assert torch.equal(blocks[row], originals[prompt])


def test_forbidden_tokens_are_the_placeholders(model_and_processor):
    model, processor = model_and_processor
    ids = vlm_adapter.forbidden_token_ids(processor, model.config)
    assert sorted(processor.tokenizer.convert_ids_to_tokens(ids)) == sorted(vlm_adapter.FAMILIES["qwen2_vl"].placeholders)


def test_completion_mask_through_first_eos():
    eos = 7
    ids = torch.tensor([[1, 2, 7, 3, 7], [7, 1, 1, 1, 1], [1, 2, 3, 4, 5]])
    mask, truncated = sampler.completion_mask_through_eos(ids, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_sampler_shapes_masks_and_texts(model_and_processor):
    model, processor = model_and_processor
    torch.manual_seed(0)
    inputs = _inputs(processor, [Image.new("RGB", (56, 56), "red")] * 2)
    rollout = _sample(model, processor, inputs, 4)
    n, t = rollout.completion_ids.shape
    assert n == 8 and t <= 12
    assert rollout.completion_mask.shape == (n, t) and len(rollout.texts) == n
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row, mask, truncated in zip(rollout.completion_ids, rollout.completion_mask, rollout.truncated):
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()  # one block of ones from the start
        assert bool(truncated) == (eos not in row[:length].tolist())
        assert (row[length:] == processor.tokenizer.pad_token_id).all()
    assert rollout.texts[0] == processor.tokenizer.decode(rollout.completion_ids[0], skip_special_tokens=True)


def test_placeholder_tokens_never_sampled(model_and_processor):
    """Push the placeholders' logits far up: unsuppressed they are sampled, suppressed never (trap 5)."""
    model, processor = model_and_processor
    forbidden = vlm_adapter.forbidden_token_ids(processor, model.config)
    with _logits_pushed_up(model, forbidden):
        inputs = _inputs(processor, [Image.new("RGB", (56, 56), "red")])
        for share_prompt in (True, False):
            torch.manual_seed(1)
            free = _sample(model, processor, inputs, 4, suppress=False, max_new_tokens=6, share_prompt=share_prompt)
            assert set(free.completion_ids.flatten().tolist()) & set(forbidden)
            torch.manual_seed(1)
            guarded = _sample(model, processor, inputs, 4, suppress=True, max_new_tokens=6, share_prompt=share_prompt)
            assert not set(guarded.completion_ids.flatten().tolist()) & set(forbidden)


@contextlib.contextmanager
def _logits_pushed_up(model, token_ids, by: float = 50.0):
    """Within the block, the model's logits for token_ids are raised by `by`: it prefers them."""
    def push(module, args, output):
        output[..., token_ids] += by
        return output

    handle = model.lm_head.register_forward_hook(push)
    try:
        yield
    finally:
        handle.remove()


def test_logps_see_the_image(model_and_processor):
    """Changing only the image must change the completion log-probs (trap 1)."""
    model, processor = model_and_processor
    completion = torch.tensor([processor.tokenizer.encode("<think>red</think><answer>A</answer>")])
    mask = torch.ones_like(completion)
    logps = {}
    for colour in ("red", "blue"):
        inputs = _inputs(processor, [Image.new("RGB", (56, 56), COLOURS[colour])])
        with torch.no_grad():
            logps[colour] = vlm_adapter.completion_logps(model, inputs, completion, mask, temperature=1.0, group_size=1)
    assert logps["red"].shape == completion.shape
    assert (logps["red"] - logps["blue"]).abs().max() > 1e-4


def test_logps_equal_a_full_forward_and_ignore_padding(model_and_processor):
    """Completion log-probs equal log_softmax of a plain forward over prompt + completion, at the
    temperature; a second, left-padded prompt in the batch does not change them (trap 10)."""
    model, processor = model_and_processor
    tok = processor.tokenizer
    completion = torch.tensor([tok.encode("<answer>B</answer>")])
    image = Image.new("RGB", (56, 56), "blue")
    single = _inputs(processor, [image], ["Short?"])
    with torch.no_grad():
        got = vlm_adapter.completion_logps(model, single, completion, torch.ones_like(completion), temperature=0.7,
                                           group_size=1, share_prompt=False)
        full_ids = torch.cat([single["input_ids"], completion], 1)
        logits = model(input_ids=full_ids, attention_mask=torch.ones_like(full_ids),
                       mm_token_type_ids=torch.cat([single["mm_token_type_ids"], torch.zeros_like(completion)], 1),
                       pixel_values=single["pixel_values"], image_grid_thw=single["image_grid_thw"]).logits
        P = single["input_ids"].shape[1]
        expected = torch.log_softmax(logits[0, P - 1:-1] / 0.7, -1).gather(-1, completion[0, :, None])[:, 0]
        torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=1e-5)
        # Batch it after a longer prompt: "Short?" is now left-padded.
        batch = _inputs(processor, [Image.new("RGB", (56, 56), "red"), image],
                        ["A much longer question with many more words in it?", "Short?"])
        assert batch["attention_mask"][1, 0] == 0
        for share_prompt in (False, True):
            both = vlm_adapter.completion_logps(model, batch, completion.repeat(2, 1),
                                                torch.ones(2, completion.shape[1], dtype=torch.long), temperature=0.7,
                                                group_size=1, share_prompt=share_prompt)
            torch.testing.assert_close(both[1], expected, atol=1e-4, rtol=1e-4)


def test_each_completion_scored_against_its_own_prompt():
    """Several prompts per device: completion i is judged against prompt i // G's solution (trap 2)."""
    import train

    examples = [{"problem": r["problem"], "solution": r["solution"], "image": None, "prompt": None}
                for r in colour_rows(3)]  # answers A, B, C
    G = 2
    seen = []

    def record(completions, solution, problem, **_):
        seen.extend(zip(completions, solution, problem))
        return [0.0] * len(completions)

    from grpo.rewards import RewardFaults

    faults = RewardFaults(log=lambda message: None)
    texts = [f"completion {i}" for i in range(6)]
    train.score([record], ["record"], [1.0], texts, examples, G, faults)
    assert [s for _, s, _ in seen] == [ex["solution"] for ex in examples for _ in range(G)]
    assert [p for _, _, p in seen] == [ex["problem"] for ex in examples for _ in range(G)]
    # And with the real accuracy reward: right answers placed in each prompt's own rows score 1.
    answers = ["<answer>A</answer>", "<answer>A</answer>", "<answer>B</answer>", "<answer>A</answer>",
               "<answer>C</answer>", "<answer>C</answer>"]
    from grpo.rewards import accuracy_reward

    _, total, _ = train.score([accuracy_reward], ["accuracy"], [1.0], answers, examples, G, faults)
    assert total.tolist() == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]


# --- the shared prompt: each prompt encoded once per group -------------------------------------


def _three_prompts(processor):
    """Three prompts of different lengths (so two are left-padded) and images of different sizes."""
    images = [Image.new("RGB", (56, 56), COLOURS["red"]), Image.new("RGB", (112, 84), COLOURS["blue"]),
              Image.new("RGB", (84, 56), COLOURS["green"])]
    problems = ["Short?", "A much longer question, with many more words in it than the others?", "Mid-sized one?"]
    inputs = _inputs(processor, images, problems)
    assert len(set(inputs["image_grid_thw"].prod(-1).tolist())) == 3 and (inputs["attention_mask"] == 0).any()
    return inputs


def _logps_and_grads(model, inputs, ids, mask, G, share_prompt):
    model.zero_grad()
    logps = vlm_adapter.completion_logps(model, inputs, ids, mask, 0.9, G, share_prompt=share_prompt)
    weights = torch.randn(logps.shape, generator=torch.Generator().manual_seed(2))
    (logps * weights * mask).sum().backward()
    return logps.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family, checkpointing", [("qwen2_vl", False), ("qwen2_vl", True), ("qwen2_5_vl", True)])
def test_shared_prompt_equals_plain_path(request, family, checkpointing):
    """Same sampled tokens: the shared-prompt forward gives the plain path's log-probs and the same
    gradient for every parameter, the vision tower included, with and without gradient checkpointing
    (transformers' checkpointed layers drop a cache unless told not to: then the completions would
    run without their prompt and the vision tower would get no gradient)."""
    folder = request.getfixturevalue({"qwen2_vl": "tiny_model", "qwen2_5_vl": "tiny_qwen2_5_vl"}[family])
    processor = vlm_adapter.load_processor(folder, 56 * 56, 112 * 112)
    model = vlm_adapter.load_model(folder, torch.float32, "sdpa")
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        vlm_adapter.allow_checkpointing_with_shared_prompt(model)
    inputs = _three_prompts(processor)
    G, T = 3, 7
    ids = torch.randint(10, len(processor.tokenizer) - 20, (3 * G, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # completions of different lengths (right padding)
    mask[7, 2:] = 0
    plain_logps, plain_grads = _logps_and_grads(model, inputs, ids, mask, G, share_prompt=False)
    shared_logps, shared_grads = _logps_and_grads(model, inputs, ids, mask, G, share_prompt=True)
    torch.testing.assert_close(shared_logps * mask, plain_logps * mask, atol=1e-5, rtol=0)
    assert set(shared_grads) == set(plain_grads) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(name.startswith("model.visual.") for name in shared_grads)
    for name, grad in plain_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


def test_shared_prompt_generation_samples_what_the_plain_path_samples(model_and_processor):
    """With one seed, prefilling each prompt once and copying its cache to its G rows samples the same
    tokens as repeating the prompt G times (its decode logits are the same), in chunks or not; the
    vision tower sees each image once instead of G times."""
    model, processor = model_and_processor
    _check_shared_generation(model, processor)


def test_shared_prompt_generation_qwen2_5_vl(tiny_qwen2_5_vl):
    processor = vlm_adapter.load_processor(tiny_qwen2_5_vl, 56 * 56, 112 * 112)
    _check_shared_generation(vlm_adapter.load_model(tiny_qwen2_5_vl, torch.float32, "sdpa"), processor)


def _check_shared_generation(model, processor):
    inputs = _three_prompts(processor)
    G = 4
    patches = int(inputs["image_grid_thw"].prod(-1).sum())
    patches_seen = []
    handle = model.model.visual.register_forward_hook(lambda module, args, output: patches_seen.append(args[0].shape[0]))
    try:
        results = {}
        for share_prompt, generation_batch_size in ((False, 0), (True, 0), (True, 2 * G), (True, G)):
            torch.manual_seed(5)
            patches_seen.clear()
            results[share_prompt, generation_batch_size] = _sample(
                model, processor, inputs, G, share_prompt=share_prompt, generation_batch_size=generation_batch_size)
            expected = patches if share_prompt else G * patches  # each image once, or G times
            assert sum(patches_seen) == expected, (share_prompt, generation_batch_size, patches_seen)
    finally:
        handle.remove()
    plain = results[False, 0]
    assert torch.equal(results[True, 0].completion_ids, plain.completion_ids)
    # Chunks draw from the generator in another order, so only their shapes and row count compare.
    assert results[True, G].completion_ids.shape[0] == results[True, 2 * G].completion_ids.shape[0] == 3 * G


def test_one_generate_call_for_the_whole_step(model_and_processor, monkeypatch):
    """All prompts of a step in one generate call (or generation_batch_size chunks), prompt-major:
    rows i*G .. i*G+G-1 continue prompt i."""
    model, processor = model_and_processor
    inputs = _three_prompts(processor)
    G, calls = 2, []
    real_generate = model.generate

    def spy(**kwargs):
        calls.append(kwargs["input_ids"].clone())
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    rollout = _sample(model, processor, inputs, G, max_new_tokens=4)
    assert len(calls) == 1 and rollout.completion_ids.shape[0] == 3 * G
    real = inputs["attention_mask"].bool()
    for row in range(3 * G):
        prompt = row // G
        assert calls[0][row][real[prompt]].tolist() == inputs["input_ids"][prompt][real[prompt]].tolist()
    calls.clear()
    _sample(model, processor, inputs, G, max_new_tokens=4, generation_batch_size=2 * G)
    assert [c.shape[0] for c in calls] == [2 * G, G]  # 2 prompts, then the last one


def test_ignore_eos_samples_the_full_length(model_and_processor):
    """--ignore_eos (benchmarks) never stops early, even when EOS is by far the likeliest token."""
    model, processor = model_and_processor
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with _logits_pushed_up(model, [eos]):
        inputs = _inputs(processor, [Image.new("RGB", (56, 56), "red")])
        stops = _sample(model, processor, inputs, 3, max_new_tokens=6)
        full = _sample(model, processor, inputs, 3, max_new_tokens=6, ignore_eos=True)
    assert stops.completion_mask.sum(1).tolist() == [1, 1, 1]  # EOS first, then nothing
    assert full.completion_mask.sum(1).tolist() == [6, 6, 6] and full.truncated.all()


def test_select_prompts_drops_padding_only_the_others_needed(model_and_processor):
    model, processor = model_and_processor
    inputs = _three_prompts(processor)
    patches = inputs["image_grid_thw"].prod(-1).tolist()
    part = vlm_adapter.select_prompts(inputs, 2, 3, model.config)  # the third prompt alone
    real = inputs["attention_mask"][2].bool()
    assert part["input_ids"].tolist() == [inputs["input_ids"][2][real].tolist()]  # no padding column left
    assert torch.equal(part["pixel_values"], inputs["pixel_values"][patches[0] + patches[1]:])
    assert torch.equal(part["image_grid_thw"], inputs["image_grid_thw"][2:])


@pytest.mark.parametrize("max_pixels, tokens", [(448 * 448, 256), (112 * 112, 16)])
def test_pixel_limits_size_qwen_images(tiny_model, max_pixels, tokens):
    """--max_pixels reaches the processor: a 448 x 448 image is 32 x 32 patches of 14 px, merged 2 x 2
    into 256 tokens when allowed its full area, and 16 tokens at 112 x 112."""
    processor = vlm_adapter.load_processor(tiny_model, 56 * 56, max_pixels)
    inputs = vlm_adapter.build_inputs(processor, [build_conversation("?")], [[Image.new("RGB", (448, 448), "red")]],
                                      vlm_adapter.FAMILIES["qwen2_vl"])
    assert int(inputs["image_grid_thw"].prod()) == 4 * tokens
    assert int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) == tokens


class LiveVocabularyTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Follows every tensor an operation returns whose last dimension is the vocabulary and that holds
    at least `min_elements`, by its memory (views share it), and records the most of them alive at once
    and the largest. Alive: some tensor on that memory is still referenced (by the caller, or saved for
    backward)."""

    def __init__(self, vocab: int, min_elements: int):
        super().__init__()
        self.vocab, self.min_elements = vocab, min_elements
        self.alive: dict[int, list] = {}  # memory address -> weak references to the tensors on it
        self.most_alive, self.largest = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        from torch.utils._pytree import tree_flatten

        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2 and tensor.shape[-1] == self.vocab \
                    and tensor.numel() >= self.min_elements:
                self.alive.setdefault(tensor.untyped_storage().data_ptr(), []).append(weakref.ref(tensor))
                self.largest = max(self.largest, tensor.numel())
        self.alive = {ptr: refs for ptr, refs in self.alive.items() if any(ref() is not None for ref in refs)}
        self.most_alive = max(self.most_alive, len(self.alive))
        return out


@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared", "plain"])
def test_one_full_vocabulary_tensor_in_the_log_prob_forward_and_backward(model_and_processor, share_prompt,
                                                                         monkeypatch):
    """The logits of the completion tokens are the only [N, T, V] tensor alive at any time, forward and
    backward, entropy included: no slice, concatenation or division by the temperature copies them, and
    the backward writes its gradient into their memory (at Qwen2-VL's 151,936 words and N x T = 8 x
    1,024 each copy is 2.5 GB in bf16). The float32 chunks stay far below the size counted here."""
    model, processor = model_and_processor
    monkeypatch.setattr("grpo.loss.CHUNK_ELEMENTS", 2 * model.config.get_text_config().vocab_size)
    text = model.config.get_text_config()
    G, T, V = 4, 40, text.vocab_size
    # Counted: tensors of at least half the completion logits, more than the lm_head weight [V, hidden]
    # (or its transpose), which is a parameter and not an activation.
    min_elements = G * (T - 1) * V // 2
    assert min_elements > text.hidden_size * V
    inputs = _inputs(processor, [Image.new("RGB", (56, 56), "red")])
    special = len(processor.tokenizer.all_special_ids)  # the special tokens (placeholders among them) come first
    ids = torch.randint(special, 300, (G, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    with LiveVocabularyTensors(V, min_elements) as tracked:
        logps, entropy = vlm_adapter.completion_logps(model, inputs, ids, mask, temperature=0.7, group_size=G,
                                                      share_prompt=share_prompt, with_entropy=True)
        (-(logps * advantages[:, None]).sum()).backward()
    model.zero_grad(set_to_none=True)
    assert tracked.most_alive == 1
    assert tracked.largest == G * (T - 1) * V if share_prompt else G * T * V  # the shared path's first token comes from the prompt pass
    assert torch.isfinite(entropy).all() and entropy.shape == (G, T)
