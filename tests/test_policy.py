"""grpo/policy.py on the tiny Qwen2-VL: shapes, masks, row order, images, the shared prompt against the
plain path, and the rollouts as samples of the policy and of nothing else."""

import contextlib
import time
from dataclasses import dataclass

import pytest
import torch
from conftest import COLOURS
from PIL import Image

from grpo import families, policy
from grpo.data import build_conversation


@pytest.fixture(scope="module")
def model_and_processor(tiny_model):
    processor = families.load_processor(tiny_model, 56 * 56, 112 * 112)
    model = families.load_model(tiny_model, torch.float32, "eager")
    return model, processor


def _inputs(processor, images, problems=None):
    problems = problems or [f"Question {i}?" for i in range(len(images))]
    return families.build_inputs(processor, [build_conversation(p) for p in problems], [[image] for image in images],
                                    families.FAMILIES["qwen2_vl"])


def _sample(model, processor, inputs, group_size, suppress=True, max_new_tokens=12, **kwargs):
    ids = families.forbidden_token_ids(processor, model.config) if suppress else []
    return policy.sample_groups(model, inputs,
        policy.Sampling.for_model(model, processor.tokenizer, group_size=group_size, max_new_tokens=max_new_tokens,
                                  temperature=1.0, top_p=1.0, suppressed_ids=ids, **kwargs))


def test_completion_mask_through_first_eos():
    eos = 7
    ids = torch.tensor([[1, 2, 7, 3, 7], [7, 1, 1, 1, 1], [1, 2, 3, 4, 5]])
    mask, truncated = policy.completion_mask_through_eos(ids, [eos])
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


def test_sampling_runs_in_eval_mode_with_its_cache_and_gives_train_mode_back(model_and_processor):
    """[cache off in train mode]: the model is left in train mode, as the loop holds it; sampling runs it
    in eval mode and each decode step feeds one new token (the KV cache holds the rest), on both paths,
    and train mode comes back."""
    model, processor = model_and_processor
    inputs = _inputs(processor, [Image.new("RGB", (56, 56), "red")])
    for share_prompt in (True, False):
        seen = []  # (training, tokens fed) of each decoder layer 0 call
        layer = model.model.language_model.layers[0]
        handle = layer.register_forward_pre_hook(lambda m, args: seen.append((m.training, args[0].shape[1])))
        model.train()
        try:
            _sample(model, processor, inputs, 2, max_new_tokens=5, ignore_eos=True, share_prompt=share_prompt)
        finally:
            handle.remove()
        assert model.training
        assert not any(training for training, _ in seen)
        assert [tokens for _, tokens in seen[-4:]] == [1, 1, 1, 1]  # the last four of five tokens, one at a time
    model.eval()


def test_placeholder_tokens_never_sampled(model_and_processor):
    """Push the placeholders' logits far up: unsuppressed they are sampled, suppressed never ([sampled placeholders])."""
    model, processor = model_and_processor
    forbidden = families.forbidden_token_ids(processor, model.config)
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
    """Changing only the image must change the completion log-probs ([pictures in every forward])."""
    model, processor = model_and_processor
    completion = torch.tensor([processor.tokenizer.encode("<think>red</think><answer>A</answer>")])
    mask = torch.ones_like(completion)
    logps = {}
    for colour in ("red", "blue"):
        inputs = _inputs(processor, [Image.new("RGB", (56, 56), COLOURS[colour])])
        with torch.no_grad():
            logps[colour] = policy.completion_logps(model, inputs, completion, mask, temperature=1.0, group_size=1)
    assert logps["red"].shape == completion.shape
    assert (logps["red"] - logps["blue"]).abs().max() > 1e-4


def test_logps_equal_a_full_forward_and_ignore_padding(model_and_processor):
    """Completion log-probs equal log_softmax of a plain forward over prompt + completion, at the
    temperature; a second, left-padded prompt in the batch does not change them ([padding positions])."""
    model, processor = model_and_processor
    tok = processor.tokenizer
    completion = torch.tensor([tok.encode("<answer>B</answer>")])
    image = Image.new("RGB", (56, 56), "blue")
    single = _inputs(processor, [image], ["Short?"])
    with torch.no_grad():
        got = policy.completion_logps(model, single, completion, torch.ones_like(completion), temperature=0.7,
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
            both = policy.completion_logps(model, batch, completion.repeat(2, 1),
                                                torch.ones(2, completion.shape[1], dtype=torch.long), temperature=0.7,
                                                group_size=1, share_prompt=share_prompt)
            torch.testing.assert_close(both[1], expected, atol=1e-4, rtol=1e-4)


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
    logps = policy.completion_logps(model, inputs, ids, mask, 0.9, G, share_prompt=share_prompt)
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
    processor = families.load_processor(folder, 56 * 56, 112 * 112)
    model = families.load_model(folder, torch.float32, "sdpa")
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        policy.allow_checkpointing_with_shared_prompt(model)
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
    processor = families.load_processor(tiny_qwen2_5_vl, 56 * 56, 112 * 112)
    _check_shared_generation(families.load_model(tiny_qwen2_5_vl, torch.float32, "sdpa"), processor)


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
                model, processor, inputs, G, share_prompt=share_prompt, completions_per_call=generation_batch_size)
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
    _sample(model, processor, inputs, G, max_new_tokens=4, completions_per_call=2 * G)
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


@contextlib.contextmanager
def _writing(model, rows: list[list[int]]):
    """Within the block, the model writes rows[r][k] as the k-th token of completion r, whatever it would
    have drawn: at every forward whose logits have one row per completion (the prefill of the shared
    prompt has one per prompt), all other tokens' logits are pushed 10^4 below."""
    step = [0]

    def steer(module, args, output):
        if output.shape[0] == len(rows):
            for r, script in enumerate(rows):
                output[r, -1, :] = -1e4
                output[r, -1, script[min(step[0], len(script) - 1)]] = 0.0
            step[0] += 1
        return output

    handle = model.lm_head.register_forward_hook(steer)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared", "plain"])
def test_real_vocabulary_think_tags_are_text_and_the_published_end_ids_end_completions(tiny_qwen2_5_vl_real_vocab,
                                                                                        share_prompt):
    """With Qwen's tokenizer, <think> (151667) and </think> (151668) are added tokens that are not special:
    a completion keeps them in its text, where the format reward reads them. <|im_end|> (151645) and
    <|endoftext|> (151643), the end ids of Qwen2.5-VL-Instruct's generation_config.json, each end a
    completion and are left out of its text; a completion without either runs to max_new_tokens."""
    from grpo.rewards import format_reward

    processor = families.load_processor(tiny_qwen2_5_vl_real_vocab, 56 * 56, 56 * 56)
    model = families.load_model(tiny_qwen2_5_vl_real_vocab, torch.float32, "sdpa")
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids(["<think>", "</think>", "<|im_end|>", "<|endoftext|>"]) == [
        151667, 151668, 151645, 151643]
    text = "<think>It is red.</think><answer>A</answer>"
    answer = tokenizer.encode(text)
    assert answer[0] == 151667 and 151668 in answer  # each tag one token
    (more,) = tokenizer.encode(" more")
    rows = [answer + [151645], answer + [151643], answer + [more]]
    inputs = _inputs(processor, [Image.new("RGB", (56, 56), "red")])
    with _writing(model, rows):
        rollout = policy.sample_groups(model, inputs, policy.Sampling.for_model(
            model, tokenizer, group_size=3, max_new_tokens=len(answer) + 1, temperature=1.0, top_p=1.0,
            suppressed_ids=families.forbidden_token_ids(processor, model.config), share_prompt=share_prompt))
    assert rollout.sampling.end_ids == (151645, 151643)  # the checkpoint's list; the tokenizer's eos is in it
    assert rollout.completion_ids.tolist() == rows
    assert rollout.texts == [text, text, text + " more"]
    assert rollout.truncated.tolist() == [False, False, True]
    assert format_reward(rollout.texts) == [1.0, 1.0, 0.0]


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
@pytest.mark.parametrize("vocabulary", ["small_vocab", "real_vocab"])
def test_one_full_vocabulary_tensor_in_the_log_prob_forward_and_backward(request, vocabulary, share_prompt,
                                                                         monkeypatch):
    """The logits of the completion tokens are the only [N, T, V] tensor alive at any time, forward and
    backward, entropy included: no slice, concatenation or division by the temperature copies them, and
    the backward writes its gradient into their memory (at Qwen2-VL's 151,936 words and N x T = 8 x
    1,024 each copy is 2.5 GB in bf16). The float32 chunks stay far below the size counted here: on the
    small vocabulary two positions each (CHUNK_ELEMENTS made small), on the real one as they are (110
    positions of 151,936 words, within one row)."""
    if vocabulary == "small_vocab":
        model, processor = request.getfixturevalue("model_and_processor")
        monkeypatch.setattr("grpo.objective.CHUNK_ELEMENTS", 2 * model.config.get_text_config().vocab_size)
    else:
        folder = request.getfixturevalue("tiny_qwen2_5_vl_real_vocab")
        model = families.load_model(folder, torch.float32, "eager")
        processor = families.load_processor(folder, 56 * 56, 112 * 112)
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
        logps, entropy = policy.completion_logps(model, inputs, ids, mask, temperature=0.7, group_size=G,
                                                      share_prompt=share_prompt, with_entropy=True)
        (-(logps * advantages[:, None]).sum()).backward()
    model.zero_grad(set_to_none=True)
    assert tracked.most_alive == 1
    assert tracked.largest == G * (T - 1) * V if share_prompt else G * T * V  # the shared path's first token comes from the prompt pass
    assert torch.isfinite(entropy).all() and entropy.shape == (G, T)


# ---------------------------------------------------------------- on-policy sampling ([checkpoint sampling defaults], [end ids])
#
# The checkpoints here are tiny models (ON_POLICY_MODELS) with two changes that make them look like
# published ones to `generate`:
# - their logits have a real model's scale: the final norm is multiplied by a logit scale (the random
#   models' logits are about 0.16 or 0.7 across, where a repetition penalty of 1.05 moves nothing
#   measurable), to a next-token entropy of about 3 nats;
# - their generation_config.json carries every sampling field transformers 5.x knows (CHECKPOINT_FIELDS),
#   each set to a value that changes what is drawn.
#
# The on-policy tests draw a model's `samples` tokens and compare their frequencies with softmax(logits / T)
# computed here from a plain forward (no cache, no generate), the placeholder tokens removed (the sampler
# forbids them, [sampled placeholders]) and, when top_p < 1, restricted to the nucleus: Pearson's
# chi-square (chi_square_p_value: bins of expected count >= 5), each test at SIGNIFICANCE. The draws are
# seeded, so each test's outcome is fixed; the significance says how unlikely a failure is for a correct
# sampler over the seeds.

SIGNIFICANCE = 1e-4
TEMPERATURE = 1.0


@dataclass(frozen=True)
class OnPolicyModel:
    fixture: str        # the conftest fixture of the tiny model's folder
    logit_scale: float  # the final norm multiplied by it
    samples: int        # first tokens drawn per test on the shared path (half as many on the plain path)


ON_POLICY_MODELS = {
    # The tiny Qwen2-VL, 400 words: logits of standard deviation about 1, the largest about 7.
    "small_vocab": OnPolicyModel("tiny_model", logit_scale=6.0, samples=6000),
    # The tiny Qwen2.5-VL with Qwen's 151,936-word vocabulary: logits of standard deviation about 5.5, the
    # largest about 24 (a trained model's scale), the three likeliest tokens 57% of the probability and a
    # long tail (12% in tokens below 3e-3 each). Fewer draws: on a CPU each costs a softmax and a
    # multinomial over 151,936 words (~13 ms a row on this shared 2-core machine), and at 1,200 every
    # leak checked below is still rejected at p < 1e-10 (the subtlest, repetition_penalty, at p = 8e-7
    # with 600 draws, 6e-15 with 1,200; without a leak p = 0.93 shared, 0.92 plain).
    "real_vocab": OnPolicyModel("tiny_qwen2_5_vl_real_vocab", logit_scale=70.0, samples=1200),
}
# Every field of transformers' GenerationConfig that changes what is sampled, as a checkpoint could
# ship it (the values are chosen to move the distribution measurably; the published ones are in
# demo.PUBLISHED_GENERATION_CONFIGS). Fields naming tokens are filled in by the fixture.
CHECKPOINT_FIELDS = dict(
    do_sample=True, temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, typical_p=0.9, epsilon_cutoff=3e-3,
    eta_cutoff=1e-3, top_h=0.5, repetition_penalty=1.05, no_repeat_ngram_size=1, guidance_scale=1.5,
    num_beams=2, min_new_tokens=3, exponential_decay_length_penalty=(0, 1.5), max_length=4,
    cache_implementation="static", renormalize_logits=True, remove_invalid_values=True,
    watermarking_config={"greenlist_ratio": 0.25, "bias": 2.0, "hashing_key": 15485863,
                         "seeding_scheme": "lefthash", "context_width": 1},
)
# The fields whose leak shows in the first sampled token. The others act on end ids or later positions,
# or break the shared prompt's generate outright (num_beams: the beams do not fit its cache), and are
# checked through the config generate runs with (test_no_checkpoint_field_reaches_generate).
FIRST_TOKEN_FIELDS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h",
                      "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "sequence_bias",
                      "begin_suppress_tokens", "watermarking_config")
# Of the fields Qwen2.5-VL-Instruct's published generation_config.json sets (demo.PUBLISHED_GENERATION_CONFIGS),
# the leaks the check must see at the real vocabulary too: the greedy-like top_k (p = 9e-33), and the
# repetition penalty, the subtlest (p = 6e-15). Tried once and left to the small model, for time:
# temperature (p = 9e-45) and top_p (5e-22 with 600 draws; it sorts 151,936 words a row).
REAL_VOCAB_LEAKS = ("top_k", "repetition_penalty")
# The on-policy tests run on both models; the nucleus, the other leaks and the later token on the plain
# path on the small one alone (they cost more draws or a sort of the vocabulary).
ON_BOTH_MODELS = pytest.mark.parametrize("checkpoint", list(ON_POLICY_MODELS), indirect=True)


@dataclass(frozen=True)
class Checkpoint:
    folder: str
    fields: dict   # the sampling fields of its generation config
    samples: int   # how many first tokens a test draws from it


@pytest.fixture(scope="module")
def made() -> dict:
    """What this module made, kept for its other tests: each model's Checkpoint (by name) and the model
    and processor loaded from it (by folder)."""
    return {}


@pytest.fixture
def checkpoint(request, made, tmp_path_factory) -> Checkpoint:
    """A folder like a published checkpoint: real-scale logits, every sampling field in its generation
    config. Of the tiny model named by the test's parameter (ON_POLICY_MODELS), the small one by default."""
    name = getattr(request, "param", "small_vocab")
    if name not in made:
        made[name] = _published_like(name, request.getfixturevalue(ON_POLICY_MODELS[name].fixture),
                                     str(tmp_path_factory.mktemp(f"real-scale-{name}") / "model"))
    return made[name]


def _published_like(name: str, tiny_model_folder: str, folder: str) -> Checkpoint:
    import shutil

    from transformers import GenerationConfig

    shutil.copytree(tiny_model_folder, folder)
    processor = families.load_processor(folder, 56 * 56, 56 * 56)
    model = families.load_model(folder, torch.float32, "sdpa")
    with torch.no_grad():
        model.model.language_model.norm.weight.mul_(ON_POLICY_MODELS[name].logit_scale)
        top = _first_token_logits(model, _prompt(processor)).topk(2).indices.tolist()
    ids = {key: getattr(model.generation_config, key) for key in ("eos_token_id", "pad_token_id", "bos_token_id")}
    # The likeliest first token (about half the probability in the small model, a fifth in the real
    # vocabulary's) suppressed at the start and biased down, the second banned, by the checkpoint.
    fields = dict(CHECKPOINT_FIELDS, begin_suppress_tokens=[top[0]], sequence_bias={(top[0],): -3.0},
                  bad_words_ids=[[top[1]]])
    model.generation_config = GenerationConfig(**ids, **fields)
    model.save_pretrained(folder)
    return Checkpoint(folder, fields, ON_POLICY_MODELS[name].samples)


@pytest.fixture
def loaded(checkpoint, made):
    if checkpoint.folder not in made:
        processor = families.load_processor(checkpoint.folder, 56 * 56, 56 * 56)
        made[checkpoint.folder] = families.load_model(checkpoint.folder, torch.float32, "sdpa"), processor
    return made[checkpoint.folder]


def _prompt(processor, copies: int = 1) -> dict:
    """The demo's question words under its short system prompt (100 tokens; they hold about 60% of the
    first token's probability, so a repetition penalty moves it), and a 56 x 56 image, `copies` times."""
    from demo import _TOKENIZER_CORPUS, DEMO_SYSTEM_PROMPT

    conversation = build_conversation(_TOKENIZER_CORPUS[3], DEMO_SYSTEM_PROMPT)
    return families.build_inputs(processor, [conversation] * copies,
                                    [[Image.new("RGB", (56, 56), (220, 40, 40))]] * copies, families.FAMILIES["qwen2_vl"])


@torch.no_grad()
def _first_token_logits(model, inputs: dict, continuation: list[int] = ()) -> torch.Tensor:
    """The logits [V] of the token after a one-prompt batch (and `continuation`), from one plain forward."""
    extra = torch.tensor([list(continuation)], dtype=torch.long)
    full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], extra], 1),
                attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(extra)], 1),
                mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], 1))
    return model(**full).logits[0, -1].double()


def _policy(logits: torch.Tensor, temperature: float, top_p: float, forbidden: list[int]) -> torch.Tensor:
    """softmax(logits / T) over the allowed tokens, restricted to the top_p nucleus (the smallest set of
    likeliest tokens whose probability reaches top_p), renormalised: what the sampler must draw from."""
    z = logits / temperature
    z[forbidden] = -float("inf")
    p = torch.softmax(z, -1)
    if top_p < 1.0:
        order = p.argsort(descending=True)
        before = p[order].cumsum(0) - p[order]  # probability of the likelier tokens
        p[order[before >= top_p]] = 0.0
        p = p / p.sum()
    return p


# The tokens of expected count under 5 are binned in this many runs (fewer when they expect under 50 draws).
TAIL_RUNS = 10


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of observed counts [V] against probabilities [V], on bins of expected
    count at least 5: one per token that reaches 5 alone, and the others (the tail), in order of
    probability, in TAIL_RUNS runs of about equal expected count (a last run short of it joins the one
    before it; with no run before it, the smallest single-token bin). At 151,936 words most tokens
    expect far less than one draw and the tail can hold much of the probability: one pooled bin would
    say nothing of how the draws spread over it, and a run per 5 expected draws would add so many
    degrees of freedom that a leak on one token drowns (banning a token of 1% probability in the
    400-word model, 6,000 draws: p = 3e-5 with ten runs, 9e-4 with 114, 5e-5 with one). The bins
    follow from `probs` alone, never from the counts, so the statistic has bins - 1 degrees of freedom.
    A count where the probability is 0 fails at once (p-value 0). When everything falls in one bin (one
    token all but certain), the draws off that token are tested against their Poisson count instead."""
    n = counts.sum().double()
    expected = probs.double() * n  # [V]
    if (counts[probs == 0] > 0).any():
        return 0.0
    order = expected.argsort(descending=True)[:int((probs > 0).sum())]  # [K] the possible tokens, likeliest first
    singles = int((expected >= 5).sum())
    run_size = max(5.0, float(expected[order[singles:]].sum()) / TAIL_RUNS)
    bin_of = list(range(singles))  # each token's bin, in probability order
    bins, filled = singles, 0.0  # bins so far; what the open run expects
    for value in expected[order[singles:]].tolist():
        bin_of.append(bins)
        filled += value
        if filled >= run_size:
            bins, filled = bins + 1, 0.0
    bin_of = torch.tensor(bin_of)  # [K]
    if filled > 0:  # the last run is short
        bin_of[bin_of == bins] = bins - 1 if bins > singles else singles - 1
    if bins == 1:  # one token all but certain, under 5 draws expected off it: too few to bin
        return _poisson_upper_tail(int(n - counts[order[0]]), float(n - expected[order[0]]))
    o = torch.zeros(bins, dtype=torch.float64).index_add_(0, bin_of, counts[order].double())  # [bins]
    e = torch.zeros(bins, dtype=torch.float64).index_add_(0, bin_of, expected[order])  # [bins]
    statistic = ((o - e) ** 2 / e).sum()
    dof = len(o) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2))


def _poisson_upper_tail(observed: int, mean: float) -> float:
    """P(X >= observed) for X ~ Poisson(mean) = the regularized lower incomplete gamma P(observed, mean): the
    one-sided test of a count of rare draws (Binomial(n, q) with small q; Poisson's tail is the wider)."""
    if observed == 0:
        return 1.0
    return float(torch.special.gammainc(torch.tensor(float(observed), dtype=torch.float64), torch.tensor(mean)))


def _draw(model, processor, samples: int, share_prompt: bool, tokens: int = 1, top_p: float = 1.0,
          seed: int = 0, compile_decode: bool = False) -> torch.Tensor:
    """`samples` completions of `tokens` tokens for the prompt, half as many on the plain path (it
    repeats the prompt and its image for every draw): [n, <= tokens]."""
    copies, group = (6, samples // 6) if share_prompt else (3, samples // 6)
    torch.manual_seed(seed)
    rollout = policy.sample_groups(model, _prompt(processor, copies),
        policy.Sampling.for_model(model, processor.tokenizer, group_size=group, max_new_tokens=tokens,
                                  temperature=TEMPERATURE, top_p=top_p,
                                  suppressed_ids=families.forbidden_token_ids(processor, model.config),
                                  share_prompt=share_prompt, completions_per_call=group,
                                  compile_decode=compile_decode))
    return rollout.completion_ids


def _first_token_p_value(model, processor, samples: int, share_prompt: bool, top_p: float = 1.0,
                         compile_decode: bool = False) -> float:
    forbidden = families.forbidden_token_ids(processor, model.config)
    probs = _policy(_first_token_logits(model, _prompt(processor)), TEMPERATURE, top_p, forbidden)
    drawn = _draw(model, processor, samples, share_prompt, top_p=top_p, compile_decode=compile_decode)[:, 0]
    return chi_square_p_value(torch.bincount(drawn, minlength=len(probs)), probs)


# The decode step eager, and compiled (--compile_decode true: docs/TRAPS.md [auto-compile]).
DECODE = pytest.mark.parametrize("compile_decode", [False, True], ids=["eager", "compiled"])


# The first token comes from the prompt pass, which runs eagerly either way: compiled, the small model's
# cases check the rest of the compiled path (the rows padded per call, the kept cache).
@pytest.mark.parametrize("checkpoint, share_prompt, compile_decode",
                         [(name, share, compiled) for name in ON_POLICY_MODELS for compiled in (False, True)
                          for share in (True, False) if not (compiled and name == "real_vocab")],
                         ids=["small_vocab-shared-eager", "small_vocab-plain-eager", "small_vocab-shared-compiled",
                              "small_vocab-plain-compiled", "real_vocab-shared-eager", "real_vocab-plain-eager"],
                         indirect=["checkpoint"])
def test_first_token_is_drawn_from_the_policy(loaded, checkpoint, share_prompt, compile_decode):
    model, processor = loaded
    assert _first_token_p_value(model, processor, checkpoint.samples, share_prompt,
                                compile_decode=compile_decode) > SIGNIFICANCE


@DECODE
def test_first_token_is_drawn_from_the_nucleus(loaded, checkpoint, compile_decode):
    model, processor = loaded
    assert _first_token_p_value(model, processor, checkpoint.samples, share_prompt=True, top_p=0.9,
                                compile_decode=compile_decode) > SIGNIFICANCE


@DECODE
@pytest.mark.parametrize("checkpoint, share_prompt",
                         [("small_vocab", True), ("small_vocab", False), ("real_vocab", True)],
                         ids=["small_vocab-shared", "small_vocab-plain", "real_vocab-shared"], indirect=["checkpoint"])
def test_a_later_token_is_drawn_from_the_policy(loaded, checkpoint, share_prompt, compile_decode):
    """The second token, from the decode loop (cache, positions; compiled, the compiled decode step): for
    every first token drawn at least 1/15 of the time (400 of 6,000), the second tokens that followed it
    against softmax(logits / T) after prompt + that token. The tests for different first tokens are
    independent, so their statistics add (and their dofs). (The real-vocabulary model repeats most of its
    likeliest first tokens with probability ~1, its tied embedding's echo: there the test is the count of
    draws off the repeat.)"""
    model, processor = loaded
    forbidden = families.forbidden_token_ids(processor, model.config)
    end_ids = policy.end_token_ids(model, processor.tokenizer)
    drawn = _draw(model, processor, checkpoint.samples, share_prompt, tokens=2, seed=1, compile_decode=compile_decode)
    firsts, counts = drawn[:, 0].unique(return_counts=True)
    tested = 0
    for first, count in zip(firsts.tolist(), counts.tolist()):
        if count < len(drawn) / 15 or first in end_ids:
            continue
        probs = _policy(_first_token_logits(model, _prompt(processor), [first]), TEMPERATURE, 1.0, forbidden)
        seconds = drawn[drawn[:, 0] == first, 1]
        assert chi_square_p_value(torch.bincount(seconds, minlength=len(probs)), probs) > SIGNIFICANCE, first
        tested += count
    assert tested >= len(drawn) / 3  # most draws were tested, not skipped


@contextlib.contextmanager
def _letting_through(field: str, value):
    """A leak put back by hand: whatever config generate prepares, `field` takes the checkpoint's value."""
    from transformers.generation.utils import GenerationMixin

    prepare = GenerationMixin._prepare_generation_config

    def leaky(self, generation_config, **kwargs):
        config, model_kwargs = prepare(self, generation_config, **kwargs)
        setattr(config, field, value)
        return config, model_kwargs

    GenerationMixin._prepare_generation_config = leaky
    try:
        yield
    finally:
        GenerationMixin._prepare_generation_config = prepare


@pytest.mark.parametrize("checkpoint, field", [("small_vocab", field) for field in FIRST_TOKEN_FIELDS]
                         + [("real_vocab", field) for field in REAL_VOCAB_LEAKS], indirect=["checkpoint"])
def test_the_check_fails_when_a_checkpoint_field_leaks(loaded, checkpoint, field):
    """The on-policy test has the power to see each leak: with one checkpoint field let through, the
    first token's frequencies are rejected at SIGNIFICANCE (the bug this file guards, put back by hand).
    The checkpoint's values as set (transformers writes sequence_bias to JSON in a form it cannot read
    back, so a leak of the file's would fail outright)."""
    from transformers import GenerationConfig

    model, processor = loaded
    value = getattr(GenerationConfig(**checkpoint.fields), field)
    with _letting_through(field, value):
        assert _first_token_p_value(model, processor, checkpoint.samples, share_prompt=True) < SIGNIFICANCE


@ON_BOTH_MODELS
def test_no_checkpoint_field_reaches_generate(loaded, checkpoint, monkeypatch):
    """The config generate runs with holds, for every field the checkpoint sets, the run's value or
    transformers' neutral default, never the checkpoint's; and end ids are the checkpoint's list."""
    from transformers import GenerationConfig
    from transformers.generation.utils import GenerationMixin

    model, processor = loaded
    published = GenerationConfig.from_pretrained(checkpoint.folder).to_diff_dict()
    seen = []
    prepare = GenerationMixin._prepare_generation_config

    def spy(self, generation_config, **kwargs):
        config, model_kwargs = prepare(self, generation_config, **kwargs)
        seen.append(config)
        return config, model_kwargs

    monkeypatch.setattr(GenerationMixin, "_prepare_generation_config", spy)
    for share_prompt in (True, False):
        policy.sample_groups(model, _prompt(processor),
            policy.Sampling.for_model(model, processor.tokenizer, group_size=2, max_new_tokens=2, temperature=0.9,
                                      top_p=0.95, suppressed_ids=[], share_prompt=share_prompt))
    tokenizer = processor.tokenizer
    expected_end_ids = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    run = dict(do_sample=True, temperature=0.9, top_p=0.95, top_k=0, max_new_tokens=2, use_cache=True)
    defaults = GenerationConfig._get_default_generation_params()
    assert len(seen) == 2
    for config in seen:
        assert config.eos_token_id == expected_end_ids
        assert config.disable_compile is True
        for field, checkpoint_value in published.items():
            if field in ("eos_token_id", "pad_token_id", "bos_token_id", "transformers_version"):
                continue
            value = getattr(config, field)
            want = run[field] if field in run else defaults.get(field)
            if field == "max_length":  # generate derives it: the prompt's length + max_new_tokens
                want = _prompt(processor)["input_ids"].shape[1] + 2
            assert value == want, (field, value, checkpoint_value)


def test_a_completion_ends_at_any_end_id_the_checkpoint_lists(loaded, monkeypatch):
    """Checkpoints list several end ids (Qwen: <|im_end|> and <|endoftext|>); a completion ends at the
    first of any of them, and its mask, padding, truncation flag and text agree ([end ids]). Here the
    list also holds the two likeliest first tokens, so about two completions in three end at once."""
    model, processor = loaded
    tokenizer = processor.tokenizer
    inputs = _prompt(processor)
    likeliest = _first_token_logits(model, inputs).topk(2).indices.tolist()
    listed = [*tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]), *likeliest]
    monkeypatch.setattr(model.generation_config, "eos_token_id", listed)
    assert policy.end_token_ids(model, tokenizer) == listed  # the tokenizer's eos (<|im_end|>) is listed already
    torch.manual_seed(0)
    rollout = policy.sample_groups(model, inputs,
        policy.Sampling.for_model(model, tokenizer, group_size=64, max_new_tokens=6, temperature=1.0, top_p=1.0,
                                  suppressed_ids=families.forbidden_token_ids(processor, model.config)))
    ended = 0
    for ids, mask, truncated, text in zip(rollout.completion_ids.tolist(), rollout.completion_mask.tolist(),
                                          rollout.truncated.tolist(), rollout.texts):
        stops = [t for t, token in enumerate(ids) if token in listed]  # padding (<|endoftext|>) comes after the first
        length = stops[0] + 1 if stops else len(ids)
        assert mask == [1] * length + [0] * (len(ids) - length)
        assert truncated == (not stops)
        assert ids[length:] == [tokenizer.pad_token_id] * (len(ids) - length)
        assert text == tokenizer.decode(ids[:length], skip_special_tokens=True)
        ended += length == 1
    assert ended > 64 / 3  # the likeliest tokens ended many at once: the list was used, not the tokenizer's eos alone


def test_generate_compiles_the_decode_step_only_when_asked(loaded, monkeypatch):
    """On a GPU, transformers compiles the decode step (CUDA graphs) whenever generate is given a static
    cache, as the shared prompt's generate is: minutes of compiling, and a recompile whenever the cache
    length changes. The hazard is real for transformers' own defaults; the sampler's config turns it
    off, unless --compile_decode asks for it, and then it compiles on any device (transformers' own
    criteria skip CPUs), in one graph of static shapes."""
    from transformers import GenerationConfig, StaticCache

    model, _ = loaded
    cache = StaticCache(config=model.config.get_text_config(), max_cache_len=8)
    settings = dict(max_new_tokens=4, end_ids=[1], pad_token_id=0, suppress_token_ids=[], temperature=1.0)
    assert model._valid_auto_compile_criteria({"cache": cache}, GenerationConfig()) is False  # the CPU
    asked = policy.generation_config(**settings, compile_for=torch.device("cpu"))
    assert model._valid_auto_compile_criteria({"cache": cache}, asked) is True
    assert (asked.compile_config.fullgraph, asked.compile_config.dynamic, asked.compile_config.mode) == \
        (True, False, "default")
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    assert model._valid_auto_compile_criteria({"cache": cache}, GenerationConfig()) is True
    assert model._valid_auto_compile_criteria({"cache": cache}, policy.generation_config(**settings)) is False
    assert policy.generation_config(**settings, compile_for=torch.device("cuda")).compile_config.mode == "reduce-overhead"


def _host_syncs_while_sampling(folder: str, max_new_tokens: int, share_prompt: bool) -> int:
    """How many times sample_groups reads a tensor's value on the host (aten::_local_scalar_dense: .item(),
    bool(), int() of a tensor; on a GPU each one waits for every kernel queued before it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountSyncs(TorchDispatchMode):
        syncs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountSyncs.syncs += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    processor = families.load_processor(folder, 56 * 56, 56 * 56)
    model = families.load_model(folder, torch.float32, "sdpa")
    inputs = families.build_inputs(processor, [build_conversation("What colour?"), build_conversation("Which side is it on?")],
                                      [[Image.new("RGB", (56, 56))]] * 2, families.FAMILIES["qwen2_vl"])
    with CountSyncs():
        policy.sample_groups(model, inputs, policy.Sampling.for_model(model, processor.tokenizer, group_size=3,
                                                                      max_new_tokens=max_new_tokens, temperature=1.0,
                                                                      top_p=1.0, suppressed_ids=[], ignore_eos=True,
                                                                      share_prompt=share_prompt))
    return CountSyncs.syncs


@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared", "plain"])
def test_decoding_syncs_the_host_per_step_not_per_layer(tmp_path, share_prompt):
    """Host syncs while sampling do not grow with the model's depth, and at most two come with each decode
    step (transformers' stopping check; the plain path's mask once more); flash-attention-2 would add one
    per layer per step, which is why decoding runs on sdpa (next test)."""
    from demo import save_tiny_qwen2_vl

    syncs = {(layers, tokens): _host_syncs_while_sampling(save_tiny_qwen2_vl(str(tmp_path / f"{layers}"), num_layers=layers),
                                                          tokens, share_prompt)
             for layers in (2, 4) for tokens in (4, 12)}
    assert syncs[2, 4] == syncs[4, 4] and syncs[2, 12] == syncs[4, 12]
    assert syncs[2, 12] - syncs[2, 4] <= 2 * 8


def test_decoding_runs_on_sdpa_when_the_model_runs_flash_attention(loaded, monkeypatch):
    """flash-attention-2 unpads a padded batch in every layer at every decode step (a host sync each
    time); the sampler decodes on sdpa and gives the model back its flash-attention-2 for training."""
    from transformers import PreTrainedModel

    model, _ = loaded
    # flash-attn is not installed on this CPU machine: accept the name without checking the package.
    monkeypatch.setattr(PreTrainedModel, "_check_and_adjust_attn_implementation",
                        lambda self, implementation, **kwargs: implementation)

    def implementations():
        return {model.config._attn_implementation, model.config.get_text_config()._attn_implementation,
                model.config.vision_config._attn_implementation}

    model.set_attn_implementation("flash_attention_2")
    try:
        assert implementations() == {"flash_attention_2"}
        with policy.decode_attention(model):
            inside = implementations()
        after = implementations()
    finally:
        model.set_attn_implementation("sdpa")
    assert inside == {"sdpa"} and after == {"flash_attention_2"}


# ---------------------------------------------------------------- the compiled decode step ([auto-compile])
#
# --compile_decode true runs each decode step through torch.compile (inductor; on this CPU its C++
# kernels): the static cache's length rounded up to a power of two and the rows of every generate call
# fixed, so a run compiles once per length bucket. The models these tests compile, by ON_POLICY_MODELS'
# name (one line adds a model; each compile takes some seconds here, so the tests share their shapes;
# the real vocabulary's compiled decode is checked by the on-policy test of a later token).
COMPILED_DECODE_MODELS = ["small_vocab"]
ATTENTION_SCALE = 6.0


@pytest.fixture(scope="module", params=COMPILED_DECODE_MODELS)
def decode_model(request):
    """The model with real-scale logits (its ON_POLICY_MODELS logit_scale) and attention sharpened (queries and keys x
    ATTENTION_SCALE: scores of about 1 instead of 0.03), so that where a token attends, and so its
    position, moves what is sampled: a random model attends almost uniformly, and would sample the
    same tokens from the wrong positions."""
    folder = request.getfixturevalue(ON_POLICY_MODELS[request.param].fixture)
    processor = families.load_processor(folder, 56 * 56, 112 * 112)
    model = families.load_model(folder, torch.float32, "sdpa")
    text_model = model.model.language_model
    with torch.no_grad():
        text_model.norm.weight.mul_(ON_POLICY_MODELS[request.param].logit_scale)
        for layer in text_model.layers:
            layer.self_attn.q_proj.weight.mul_(ATTENTION_SCALE)
            layer.self_attn.k_proj.weight.mul_(ATTENTION_SCALE)
    return model, processor


def _two_prompts(processor, config, words: int) -> dict:
    """A short prompt and one of `words` words, with pictures of two sizes: left-padded [2, P]."""
    problems = ["Which colour?", " ".join(["red"] * words)]
    images = [[Image.new("RGB", (56, 56), COLOURS["red"])], [Image.new("RGB", (112, 84), COLOURS["blue"])]]
    return families.build_inputs(processor, [build_conversation(p) for p in problems], images,
                                 families.family_of(config))


def _prompts_across_a_bucket(processor, config, new_tokens: int) -> list[dict]:
    """Three batches whose cache lengths P + new_tokens differ: the first two within one power of two
    (the bucket), the third in the next one."""
    def bucket(batch):
        return 1 << (batch["input_ids"].shape[1] + new_tokens - 1).bit_length()

    first = _two_prompts(processor, config, 1)
    batches = [first]
    for words in range(2, 400):
        batch = _two_prompts(processor, config, words)
        if len(batches) == 1 and bucket(batch) == bucket(first) and batch["input_ids"].shape[1] > first["input_ids"].shape[1]:
            batches.append(batch)
        if bucket(batch) == 2 * bucket(first):
            assert len(batches) == 2, "no second length within the first bucket"
            return batches + [batch]
    raise AssertionError("no prompt reached the next bucket")


def _sample_at_seed(model, processor, inputs, seed, **settings):
    torch.manual_seed(seed)
    return policy.sample_groups(model, inputs, policy.Sampling.for_model(
        model, processor.tokenizer, temperature=1.0, suppressed_ids=families.forbidden_token_ids(processor, model.config),
        **settings))


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared", "plain"])
def test_compiled_decode_samples_what_eager_samples_and_compiles_once_per_bucket(decode_model, share_prompt):
    """Prompts whose length changes from step to step: the compiled decode step samples exactly the
    eager one's tokens at the same seed (it ends where they end, at an end id or max_new_tokens), and
    compiles once per cache-length bucket: two compiles for three lengths in two buckets, none when the
    first comes back."""
    model, processor = decode_model
    new_tokens = 10
    short, longer, longest = _prompts_across_a_bucket(processor, model.config, new_tokens)
    torch._dynamo.reset()  # count this test's compiles from none
    compiled_before = _graphs_compiled()
    for seed, batch in enumerate([short, longer, longest, short]):
        settings = dict(group_size=4, max_new_tokens=new_tokens, share_prompt=share_prompt)
        eager = _sample_at_seed(model, processor, batch, seed, **settings)
        compiled = _sample_at_seed(model, processor, batch, seed, compile_decode=True, **settings)
        assert torch.equal(compiled.completion_ids, eager.completion_ids), seed
        assert compiled.texts == eager.texts and torch.equal(compiled.truncated, eager.truncated)
    assert _graphs_compiled() - compiled_before == 2


def test_compiled_decode_keeps_the_rows_of_every_call(decode_model, monkeypatch):
    """Three prompts two at a time: the second call is padded with a copy of its last prompt to the
    first one's rows (no new compile), and the copy's rows are dropped; the first call samples the
    eager one's tokens."""
    model, processor = decode_model
    inputs = _three_prompts(processor)
    G, rows_seen = 4, []
    real_generate = model.generate

    def spy(**kwargs):
        rows_seen.append(kwargs["input_ids"].shape[0])
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    settings = dict(group_size=G, max_new_tokens=6, completions_per_call=2 * G)
    eager = _sample_at_seed(model, processor, inputs, 0, **settings)
    compiled_before = _graphs_compiled()
    compiled = _sample_at_seed(model, processor, inputs, 0, compile_decode=True, **settings)
    assert rows_seen == [2 * G, G, 2 * G, 2 * G]  # eager: 2 prompts, then 1; compiled: 2 and 2
    assert _graphs_compiled() - compiled_before <= 1  # one shape (none if an earlier test compiled it)
    assert compiled.completion_ids.shape[0] == len(compiled.texts) == 3 * G
    assert torch.equal(compiled.completion_ids[:2 * G], eager.completion_ids[:2 * G])


def test_compiled_decode_sets_the_model_s_own_hooks_aside(decode_model, capsys):
    """DeepSpeed's engine hooks the model's forward with a timer that reads the clock (and syncs the
    device), which cannot be compiled: a hook like it is set aside while the compiled decode runs (it
    compiles, nothing falls back) and is back after, in its place, on the next forward."""
    model, processor = decode_model
    calls = []
    handles = [model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(time.time()), with_kwargs=True),
               model.register_forward_hook(lambda module, args, output: calls.append("after"))]
    try:
        hooks = [list(getattr(model, name).items()) for name in ("_forward_pre_hooks", "_forward_hooks")]
        inputs = _two_prompts(processor, model.config, 1)
        _sample_at_seed(model, processor, inputs, 0, group_size=4, max_new_tokens=4, compile_decode=True)
        assert calls == [] and "[compile_decode]" not in capsys.readouterr().out
        assert [list(getattr(model, name).items()) for name in ("_forward_pre_hooks", "_forward_hooks")] == hooks
        with torch.no_grad():
            model(**inputs)
        assert len(calls) == 2 and calls[1] == "after"
    finally:
        for handle in handles:
            handle.remove()


def test_compiled_decode_syncs_the_host_as_often_as_eager(decode_model):
    """Each decode step the compiled path adds reads no tensor on the host beyond what the eager one
    reads (transformers' stopping check: at most two a step, test_decoding_syncs_the_host_per_step_not_per_layer).
    Counted with the profiler (aten::_local_scalar_dense, also inside CPU kernels, the same for both):
    a dispatch mode cannot watch a compiled graph."""
    model, processor = decode_model
    inputs = _two_prompts(processor, model.config, 1)
    syncs = {}
    for compile_decode in (True, False):
        for tokens in (4, 9, 12):  # 4 first: the compile's own reads are not counted
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                _sample_at_seed(model, processor, inputs, 0, group_size=4, max_new_tokens=tokens, ignore_eos=True,
                                compile_decode=compile_decode)
            syncs[compile_decode, tokens] = sum(event.name == "aten::_local_scalar_dense" for event in profile.events())
    assert syncs[True, 12] - syncs[True, 9] == syncs[False, 12] - syncs[False, 9] > 0


def test_a_compiler_that_fails_leaves_eager_decoding_and_says_so_once(tiny_model, monkeypatch, capsys):
    """A machine without a working C++ compiler (simulated: the backend raises inductor's error for a
    missing one): the run decodes eagerly, with the samples the eager path draws at the same seed,
    and one line says why, once, not at every step or generate call."""
    processor = families.load_processor(tiny_model, 56 * 56, 112 * 112)
    model = families.load_model(tiny_model, torch.float32, "sdpa")  # its own: it stays eager after this
    attempts = []

    def no_compiler(graph, example_inputs):
        attempts.append(graph)
        raise torch._inductor.exc.InvalidCxxCompiler()

    real_config = policy.decode_compile_config

    def failing_config(device):
        config = real_config(device)
        config.backend = no_compiler
        return config

    monkeypatch.setattr(policy, "decode_compile_config", failing_config)
    inputs = _two_prompts(processor, model.config, 1)
    for step in range(2):  # two steps of two generate calls each
        settings = dict(group_size=3, max_new_tokens=5, ignore_eos=True, completions_per_call=3)
        eager = _sample_at_seed(model, processor, inputs, step, **settings)
        compiled = _sample_at_seed(model, processor, inputs, step, compile_decode=True, **settings)
        assert torch.equal(compiled.completion_ids, eager.completion_ids), step
    lines = [line for line in capsys.readouterr().out.splitlines() if "compile" in line]
    assert len(attempts) == 1 and len(lines) == 1, lines
    assert lines[0].startswith("[compile_decode] compiling the decode step failed (InvalidCxxCompiler: No working C++ compiler")
