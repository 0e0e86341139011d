"""grpo/vlm_adapter.py and grpo/sampler.py on the tiny Qwen2-VL: shapes, masks, row order, images."""

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
    return vlm_adapter.build_inputs(processor, [build_conversation(p) for p in problems], images)


def _sample(model, processor, inputs, group_size, suppress=True, max_new_tokens=12, **kwargs):
    ids = vlm_adapter.forbidden_token_ids(processor) if suppress else []
    return sampler.sample_groups(model, inputs, processor.tokenizer, group_size=group_size, max_new_tokens=max_new_tokens,
                                 temperature=1.0, top_p=1.0, suppress_token_ids=ids, **kwargs)


def test_repeat_for_group_keeps_each_image_with_its_rows(model_and_processor):
    _, processor = model_and_processor
    images = [Image.new("RGB", (56, 56), "red"), Image.new("RGB", (112, 56), "blue"), Image.new("RGB", (56, 84), "green")]
    inputs = _inputs(processor, images)
    patches = inputs["image_grid_thw"].prod(-1).tolist()
    assert len(set(patches)) == 3  # three different patch counts: an off-by-one would misalign
    G = 3
    repeated = vlm_adapter.repeat_for_group(inputs, G)
    assert repeated["input_ids"].shape[0] == 9
    blocks = repeated["pixel_values"].split(repeated["image_grid_thw"].prod(-1).tolist())
    originals = inputs["pixel_values"].split(patches)
    for row in range(9):
        prompt = row // G  # rows i*G .. i*G+G-1 belong to prompt i
        assert torch.equal(repeated["input_ids"][row], inputs["input_ids"][prompt])
        assert torch.equal(blocks[row], originals[prompt])


def test_forbidden_tokens_are_the_placeholders(model_and_processor):
    _, processor = model_and_processor
    ids = vlm_adapter.forbidden_token_ids(processor)
    assert sorted(processor.tokenizer.convert_ids_to_tokens(ids)) == sorted(vlm_adapter.PLACEHOLDER_TOKENS)


def test_completion_mask_through_first_eos():
    eos = 7
    ids = torch.tensor([[1, 2, 7, 3, 7], [7, 1, 1, 1, 1], [1, 2, 3, 4, 5]])
    mask, truncated = sampler.completion_mask_through_eos(ids, eos)
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
    forbidden = vlm_adapter.forbidden_token_ids(processor)

    def favour_placeholders(module, args, output):
        output[..., forbidden] += 50.0
        return output

    handle = model.lm_head.register_forward_hook(favour_placeholders)
    try:
        inputs = _inputs(processor, [Image.new("RGB", (56, 56), "red")])
        for share_prompt in (True, False):
            torch.manual_seed(1)
            free = _sample(model, processor, inputs, 4, suppress=False, max_new_tokens=6, share_prompt=share_prompt)
            assert set(free.completion_ids.flatten().tolist()) & set(forbidden)
            torch.manual_seed(1)
            guarded = _sample(model, processor, inputs, 4, suppress=True, max_new_tokens=6, share_prompt=share_prompt)
            assert not set(guarded.completion_ids.flatten().tolist()) & set(forbidden)
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

    texts = [f"completion {i}" for i in range(6)]
    train.score([record], [1.0], texts, examples, G)
    assert [s for _, s, _ in seen] == [ex["solution"] for ex in examples for _ in range(G)]
    assert [p for _, _, p in seen] == [ex["problem"] for ex in examples for _ in range(G)]
    # And with the real accuracy reward: right answers placed in each prompt's own rows score 1.
    answers = ["<answer>A</answer>", "<answer>A</answer>", "<answer>B</answer>", "<answer>A</answer>",
               "<answer>C</answer>", "<answer>C</answer>"]
    from grpo.rewards import accuracy_reward

    _, total = train.score([accuracy_reward], [1.0], answers, examples, G)
    assert total.tolist() == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
