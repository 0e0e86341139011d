"""Every model family through the same adapter: the family table in grpo/families.py is all that
differs. For each, a tiny random model with its real processor class: pictures reach the model, the
shared-prompt path equals the plain one (log-probs, every gradient, sampled tokens) on a batch that
mixes one image, several images and no image, and placeholder tokens are never sampled."""

import pytest
import torch
from conftest import COLOURS, FAMILY_NAMES
from PIL import Image

from grpo import config, families, policy
from grpo.data import build_conversation

MULTI_IMAGE = set(FAMILY_NAMES)  # every family here takes several images in one prompt


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request, family_models):
    folder = family_models(request.param)
    processor = families.load_processor(folder, 56 * 56, 112 * 112)
    model = families.load_model(folder, torch.float32, "sdpa")
    return request.param, model, processor, families.family_of(model)


def _batch(processor, family_config, name, colours=("red", "blue", "green")):
    """Three prompts of different lengths: one image; two images (or one, for single-image families);
    no image (a text-only row)."""
    images = [[Image.new("RGB", (56, 56), COLOURS[colours[0]])],
              [Image.new("RGB", (112, 84), COLOURS[colours[1]]), Image.new("RGB", (84, 56), COLOURS[colours[2]])]
              if name in MULTI_IMAGE else [Image.new("RGB", (112, 84), COLOURS[colours[1]])],
              []]
    problems = ["Short?", "A longer question, with more words in it than the first?", "Text only, no picture?"]
    conversations = [build_conversation(p, num_images=len(i)) for p, i in zip(problems, images)]
    return families.build_inputs(processor, conversations, images, family_config)


def _completions(processor, model, rows, length=6, seed=1):
    forbidden = set(families.forbidden_token_ids(processor, model.config)) | set(processor.tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(len(processor.tokenizer)) if i not in forbidden])
    generator = torch.Generator().manual_seed(seed)
    ids = ordinary[torch.randint(len(ordinary), (rows, length), generator=generator)]
    mask = torch.ones_like(ids)
    mask[1, length - 2:] = 0  # completions of different lengths
    return ids, mask


def test_pictures_reach_the_model(family):
    name, model, processor, family_config = family
    G = 2
    ids, mask = _completions(processor, model, 3 * G)
    with torch.no_grad():
        a = policy.completion_logps(model, _batch(processor, family_config, name), ids, mask, 1.0, G)
        b = policy.completion_logps(model, _batch(processor, family_config, name, ("yellow", "green", "red")),
                                         ids, mask, 1.0, G)
    changed = ((a - b).abs() * mask).amax(1)
    assert (changed[:4] > 1e-5).all(), changed  # prompts 0 and 1 hold the pictures
    assert (changed[4:] == 0).all(), changed  # the text-only prompt is not affected by the others' pictures


def test_shared_prompt_equals_plain_path(family):
    name, model, processor, family_config = family
    model.train()
    inputs = _batch(processor, family_config, name)
    G = 2
    ids, mask = _completions(processor, model, 3 * G)
    results = {}
    for share_prompt in (False, True):
        model.zero_grad()
        logps = policy.completion_logps(model, inputs, ids, mask, 0.9, G, share_prompt=share_prompt)
        weights = torch.randn(logps.shape, generator=torch.Generator().manual_seed(2))
        (logps * weights * mask).sum().backward()
        results[share_prompt] = (logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                  if p.grad is not None})
    (plain, plain_grads), (shared, shared_grads) = results[False], results[True]
    torch.testing.assert_close(shared * mask, plain * mask, atol=1e-5, rtol=0)
    assert set(shared_grads) == set(plain_grads)
    vision = [n for n, g in plain_grads.items() if any(k in n for k in ("vision", "visual")) and g.abs().max() > 0]
    assert vision, "no gradient reached the vision tower"
    # Float32 noise is relative to the gradient's overall scale (a key bias's true gradient is exactly 0).
    scale = max(grad.abs().max().item() for grad in plain_grads.values())
    for n, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[n], grad, rtol=1e-4, atol=1e-6 * scale, msg=lambda m: f"{name} {n}: {m}")


def test_shared_generation_samples_what_the_plain_path_samples(family):
    name, model, processor, family_config = family
    inputs = _batch(processor, family_config, name)
    sampled = {}
    for share_prompt in (False, True):
        torch.manual_seed(3)
        sampled[share_prompt] = policy.sample_groups(model, inputs,
            policy.Sampling.for_model(model, processor.tokenizer, group_size=3, max_new_tokens=6, temperature=1.0,
                                      top_p=1.0, suppressed_ids=families.forbidden_token_ids(processor, model.config),
                                      share_prompt=share_prompt))
    assert torch.equal(sampled[True].completion_ids, sampled[False].completion_ids)


def test_placeholders_never_sampled(family):
    name, model, processor, family_config = family
    forbidden = families.forbidden_token_ids(processor, model.config)
    assert forbidden and len(forbidden) == len(family_config.placeholders)  # every placeholder is in the vocabulary

    def favour(module, args, output):
        output[..., forbidden] += 50.0
        return output

    handle = model.get_output_embeddings().register_forward_hook(favour)
    try:
        torch.manual_seed(4)
        free = policy.sample_groups(model, _batch(processor, family_config, name),
            policy.Sampling.for_model(model, processor.tokenizer, group_size=2, max_new_tokens=4, temperature=1.0,
                                      top_p=1.0, suppressed_ids=[]))
        torch.manual_seed(4)
        guarded = policy.sample_groups(model, _batch(processor, family_config, name),
            policy.Sampling.for_model(model, processor.tokenizer, group_size=2, max_new_tokens=4, temperature=1.0,
                                      top_p=1.0, suppressed_ids=forbidden))
    finally:
        handle.remove()
    assert set(free.completion_ids.flatten().tolist()) & set(forbidden)
    assert not set(guarded.completion_ids.flatten().tolist()) & set(forbidden)


def test_repeat_and_select_keep_pictures_with_their_rows(family):
    """Prompt i's rows after repeat_for_group, and prompt i alone from select_prompts, give the same
    log-probs as prompt i built on its own by the processor (pictures travel with their rows)."""
    name, model, processor, family_config = family
    inputs = _batch(processor, family_config, name)
    ids, mask = _completions(processor, model, 3)
    with torch.no_grad():
        together = policy.completion_logps(model, inputs, ids, mask, 1.0, 1, share_prompt=False)
        for i in range(3):
            alone = families.select_prompts(inputs, i, i + 1, model.config)
            got = policy.completion_logps(model, alone, ids[i:i + 1], mask[i:i + 1], 1.0, 1, share_prompt=False)
            torch.testing.assert_close(got * mask[i], together[i:i + 1] * mask[i], atol=1e-5, rtol=0)


def test_a_blank_picture_as_padding_changes_nothing(family):
    """A text-only batch given the masked-out blank image ([text-only rank]: under ZeRO-3 every rank runs the
    vision tower) has the same log-probs and samples as without it, and the vision tower did run."""
    name, model, processor, family_config = family
    text_only = families.select_prompts(_batch(processor, family_config, name), 2, 3, model.config)
    assert not families.picture_keys(text_only)
    padded = families.with_pictures(text_only, families.blank_picture_prompt(processor, family_config, "cpu"))
    assert families.picture_keys(padded) and padded["input_ids"].shape[1] > text_only["input_ids"].shape[1]
    G = 2
    ids, mask = _completions(processor, model, G)
    calls = []
    handle = families.vision_tower(model).register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad():
            for share_prompt in (True, False):
                plain = policy.completion_logps(model, text_only, ids, mask, 1.0, G, share_prompt=share_prompt)
                blank = policy.completion_logps(model, padded, ids, mask, 1.0, G, share_prompt=share_prompt)
                torch.testing.assert_close(blank * mask, plain * mask, atol=1e-5, rtol=0)
    finally:
        handle.remove()
    assert calls  # the vision tower ran on the blank image
    sampled = []
    for inputs in (text_only, padded):
        torch.manual_seed(5)
        sampled.append(policy.sample_groups(model, inputs,
            policy.Sampling.for_model(model, processor.tokenizer, group_size=G, max_new_tokens=5, temperature=1.0,
                                      top_p=1.0, suppressed_ids=[])).completion_ids)
    assert torch.equal(*sampled)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_video_rows_in_qwen_families(name, family_models):
    """A video (its frames) beside an image row and a text-only row: the frames reach the model, the
    shared-prompt path equals the plain one and samples the same tokens."""
    folder = family_models(name)
    processor = families.load_processor(folder, 56 * 56, 56 * 56)
    model = families.load_model(folder, torch.float32, "sdpa")
    family_config = families.family_of(model)

    def batch(colours):
        frames = [Image.new("RGB", (56, 56), COLOURS[c]) for c in colours]
        conversations = [build_conversation("What happens in the video?", num_images=0, num_videos=1),
                         build_conversation("And in the picture?", num_images=1),
                         build_conversation("No picture at all?", num_images=0)]
        return families.build_inputs(processor, conversations, [[], [Image.new("RGB", (56, 56), "red")], []],
                                        family_config, videos=[[frames], [], []])

    inputs = batch(("red", "blue", "green", "yellow"))
    assert "pixel_values_videos" in inputs and "pixel_values" in inputs
    G = 2
    ids, mask = _completions(processor, model, 3 * G)
    with torch.no_grad():
        plain = policy.completion_logps(model, inputs, ids, mask, 1.0, G, share_prompt=False)
        shared = policy.completion_logps(model, inputs, ids, mask, 1.0, G, share_prompt=True)
        other = policy.completion_logps(model, batch(("yellow", "green", "blue", "red")), ids, mask, 1.0, G)
    torch.testing.assert_close(shared * mask, plain * mask, atol=1e-5, rtol=0)
    changed = ((shared - other).abs() * mask).amax(1)
    assert (changed[:G] > 1e-5).all() and (changed[G:] == 0).all(), changed  # only the video rows moved
    sampled = []
    for share_prompt in (False, True):
        torch.manual_seed(6)
        sampled.append(policy.sample_groups(model, inputs,
            policy.Sampling.for_model(model, processor.tokenizer, group_size=G, max_new_tokens=5, temperature=1.0,
                                      top_p=1.0, suppressed_ids=[], share_prompt=share_prompt)).completion_ids)
    assert torch.equal(*sampled)


def test_vision_tower_is_found_and_holds_the_vision_weights(family):
    """--freeze_vision_tower freezes families.vision_tower(model): the family's vision encoder, and
    not the language model."""
    name, model, processor, family_config = family
    tower = {id(p) for p in families.vision_tower(model).parameters()}
    language = {id(p) for p in model.get_input_embeddings().parameters()}
    assert tower and not tower & language
    vision_named = {id(p) for n, p in model.named_parameters()
                    if any(k in n for k in ("visual.", "vision_tower.", "vision_model."))}
    assert tower == vision_named


# ---------------------------------------------------------------- inputs of the tiny Qwen2-VL


@pytest.fixture(scope="module")
def qwen2_vl(tiny_model):
    processor = families.load_processor(tiny_model, 56 * 56, 112 * 112)
    return families.load_model(tiny_model, torch.float32, "eager"), processor


def _inputs(processor, images, problems=None):
    problems = problems or [f"Question {i}?" for i in range(len(images))]
    return families.build_inputs(processor, [build_conversation(p) for p in problems], [[image] for image in images],
                                 families.FAMILIES["qwen2_vl"])


def test_repeat_for_group_keeps_each_image_with_its_rows(qwen2_vl):
    model, processor = qwen2_vl
    images = [Image.new("RGB", (56, 56), "red"), Image.new("RGB", (112, 56), "blue"), Image.new("RGB", (56, 84), "green")]
    inputs = _inputs(processor, images)
    patches = inputs["image_grid_thw"].prod(-1).tolist()
    assert len(set(patches)) == 3  # three different patch counts: an off-by-one would misalign
    G = 3
    repeated = families.repeat_for_group(inputs, G, model.config)
    assert repeated["input_ids"].shape[0] == 9
    blocks = repeated["pixel_values"].split(repeated["image_grid_thw"].prod(-1).tolist())
    originals = inputs["pixel_values"].split(patches)
    for row in range(9):
        prompt = row // G  # rows i*G .. i*G+G-1 belong to prompt i
        assert torch.equal(repeated["input_ids"][row], inputs["input_ids"][prompt])
        assert torch.equal(blocks[row], originals[prompt])


def test_forbidden_tokens_are_the_placeholders(qwen2_vl):
    model, processor = qwen2_vl
    ids = families.forbidden_token_ids(processor, model.config)
    assert sorted(processor.tokenizer.convert_ids_to_tokens(ids)) == sorted(families.FAMILIES["qwen2_vl"].placeholders)


def test_select_prompts_drops_padding_only_the_others_needed(qwen2_vl):
    model, processor = qwen2_vl
    images = [Image.new("RGB", (56, 56), COLOURS["red"]), Image.new("RGB", (112, 84), COLOURS["blue"]),
              Image.new("RGB", (84, 56), COLOURS["green"])]
    problems = ["Short?", "A much longer question, with many more words in it than the others?", "Mid-sized one?"]
    inputs = _inputs(processor, images, problems)  # the first two are left-padded
    patches = inputs["image_grid_thw"].prod(-1).tolist()
    part = families.select_prompts(inputs, 2, 3, model.config)  # the third prompt alone
    real = inputs["attention_mask"][2].bool()
    assert part["input_ids"].tolist() == [inputs["input_ids"][2][real].tolist()]  # no padding column left
    assert torch.equal(part["pixel_values"], inputs["pixel_values"][patches[0] + patches[1]:])
    assert torch.equal(part["image_grid_thw"], inputs["image_grid_thw"][2:])


@pytest.mark.parametrize("max_pixels, tokens", [(448 * 448, 256), (112 * 112, 16)])
def test_pixel_limits_size_qwen_images(tiny_model, max_pixels, tokens):
    """--max_pixels reaches the processor: a 448 x 448 image is 32 x 32 patches of 14 px, merged 2 x 2
    into 256 tokens when allowed its full area, and 16 tokens at 112 x 112."""
    processor = families.load_processor(tiny_model, 56 * 56, max_pixels)
    inputs = families.build_inputs(processor, [build_conversation("?")], [[Image.new("RGB", (448, 448), "red")]],
                                      families.FAMILIES["qwen2_vl"])
    assert int(inputs["image_grid_thw"].prod()) == 4 * tokens
    assert int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) == tokens




def test_load_model_without_an_attention_takes_attention_for_s_choice(tiny_model, monkeypatch):
    """families.load_model(attn_implementation=None) chooses as train.py does: config.attention_for,
    told whether the dtype is 16-bit, whether there is a GPU, and flash-attn's version."""
    asked = []

    def attention_for(*args):
        asked.append(args)
        return "eager"

    monkeypatch.setattr(config, "attention_for", attention_for)
    monkeypatch.setattr(config, "flash_attn_version", lambda: "2.7.4")
    model = families.load_model(tiny_model, torch.bfloat16)
    assert model.config._attn_implementation == "eager"
    families.load_model(tiny_model, torch.float32)
    assert asked == [(None, True, torch.cuda.is_available(), "2.7.4"), (None, False, torch.cuda.is_available(), "2.7.4")]
    monkeypatch.undo()
    assert families.load_model(tiny_model, torch.float32).config._attn_implementation == "sdpa"  # the CPU's choice
