"""grpo/sampler.py: the rollouts are samples of the policy and of nothing else (traps 13 and 14).

The checkpoint here is the tiny Qwen2-VL with two changes that make it look like a published one to
`generate`:
- its logits have a real model's scale: the final norm is multiplied by LOGIT_SCALE, so the logits'
  standard deviation is about 1 and the largest about 7, a next-token entropy of about 3 nats (the
  random model's logits are about 0.16 across, where a repetition penalty of 1.05 moves nothing
  measurable);
- its generation_config.json carries every sampling field transformers 5.x knows (CHECKPOINT_FIELDS),
  each set to a value that changes what is drawn.

The on-policy tests draw SAMPLES tokens and compare their frequencies with softmax(logits / T) computed
here from a plain forward (no cache, no generate), the placeholder tokens removed (the sampler forbids
them, trap 5) and, when top_p < 1, restricted to the nucleus: Pearson's chi-square, bins of expected
count >= 5 (the rest pooled), each test at SIGNIFICANCE. The draws are seeded, so each test's outcome is
fixed; the significance says how unlikely a failure is for a correct sampler over the seeds.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from PIL import Image

from grpo import sampler, vlm_adapter
from grpo.data import build_conversation

SIGNIFICANCE = 1e-4
SAMPLES = 6000
LOGIT_SCALE = 6.0
TEMPERATURE = 1.0
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


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A folder like a published checkpoint: real-scale logits, every sampling field in its generation config."""
    from transformers import GenerationConfig

    from demo import save_tiny_qwen2_vl

    folder = save_tiny_qwen2_vl(str(tmp_path_factory.mktemp("real-scale-qwen2-vl")))
    processor = vlm_adapter.load_processor(folder, 56 * 56, 56 * 56)
    model = vlm_adapter.load_model(folder, torch.float32, "sdpa")
    with torch.no_grad():
        model.model.language_model.norm.weight.mul_(LOGIT_SCALE)
        top = _first_token_logits(model, _prompt(processor)).topk(2).indices.tolist()
    ids = {key: getattr(model.generation_config, key) for key in ("eos_token_id", "pad_token_id", "bos_token_id")}
    # The likeliest first token (about half the probability) suppressed at the start and biased down, the
    # second banned, by the checkpoint.
    fields = dict(CHECKPOINT_FIELDS, begin_suppress_tokens=[top[0]], sequence_bias={(top[0],): -3.0},
                  bad_words_ids=[[top[1]]])
    model.generation_config = GenerationConfig(**ids, **fields)
    model.save_pretrained(folder)
    return folder, fields


@pytest.fixture(scope="module")
def loaded(checkpoint):
    folder, _ = checkpoint
    processor = vlm_adapter.load_processor(folder, 56 * 56, 56 * 56)
    return vlm_adapter.load_model(folder, torch.float32, "sdpa"), processor


def _prompt(processor, copies: int = 1) -> dict:
    """The demo's question words under its short system prompt (100 tokens; they hold about 60% of the
    first token's probability, so a repetition penalty moves it), and a 56 x 56 image, `copies` times."""
    from demo import _TOKENIZER_CORPUS, DEMO_SYSTEM_PROMPT

    conversation = build_conversation(_TOKENIZER_CORPUS[3], DEMO_SYSTEM_PROMPT)
    return vlm_adapter.build_inputs(processor, [conversation] * copies,
                                    [[Image.new("RGB", (56, 56), (220, 40, 40))]] * copies, vlm_adapter.FAMILIES["qwen2_vl"])


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


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of observed counts [V] against probabilities [V]: bins with an expected
    count of at least 5, the others pooled into one bin (merged with the smallest when still under 5).
    A count where the probability is 0 fails at once (p-value 0)."""
    n = counts.sum().double()
    expected = probs.double() * n
    if (counts[probs == 0] > 0).any():
        return 0.0
    big = expected >= 5
    observed_bins, expected_bins = list(counts[big].double()), list(expected[big])
    rest_o, rest_e = counts[~big].double().sum(), expected[~big].sum()
    if rest_e >= 5:
        observed_bins.append(rest_o)
        expected_bins.append(rest_e)
    elif rest_e > 0:
        smallest = int(torch.stack(expected_bins).argmin())
        observed_bins[smallest] += rest_o
        expected_bins[smallest] += rest_e
    o, e = torch.stack(observed_bins), torch.stack(expected_bins)
    statistic = ((o - e) ** 2 / e).sum()
    dof = len(o) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2))


def _draw(model, processor, share_prompt: bool, tokens: int = 1, top_p: float = 1.0, seed: int = 0) -> torch.Tensor:
    """SAMPLES completions of `tokens` tokens for the prompt, half as many on the plain path (it
    repeats the prompt and its image for every draw): [n, <= tokens]."""
    copies, group = (6, SAMPLES // 6) if share_prompt else (3, SAMPLES // 6)
    torch.manual_seed(seed)
    rollout = sampler.sample_groups(
        model, _prompt(processor, copies), processor.tokenizer, group_size=group, max_new_tokens=tokens,
        temperature=TEMPERATURE, top_p=top_p, suppress_token_ids=vlm_adapter.forbidden_token_ids(processor, model.config),
        share_prompt=share_prompt, generation_batch_size=group)
    return rollout.completion_ids


def _first_token_p_value(model, processor, share_prompt: bool, top_p: float = 1.0) -> float:
    forbidden = vlm_adapter.forbidden_token_ids(processor, model.config)
    probs = _policy(_first_token_logits(model, _prompt(processor)), TEMPERATURE, top_p, forbidden)
    drawn = _draw(model, processor, share_prompt, top_p=top_p)[:, 0]
    return chi_square_p_value(torch.bincount(drawn, minlength=len(probs)), probs)


@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared", "plain"])
def test_first_token_is_drawn_from_the_policy(loaded, share_prompt):
    model, processor = loaded
    assert _first_token_p_value(model, processor, share_prompt) > SIGNIFICANCE


def test_first_token_is_drawn_from_the_nucleus(loaded):
    model, processor = loaded
    assert _first_token_p_value(model, processor, share_prompt=True, top_p=0.9) > SIGNIFICANCE


@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared", "plain"])
def test_a_later_token_is_drawn_from_the_policy(loaded, share_prompt):
    """The second token, from the decode loop (cache, positions): for every first token drawn at least
    400 times, the second tokens that followed it against softmax(logits / T) after prompt + that token.
    The tests for different first tokens are independent, so their statistics add (and their dofs)."""
    model, processor = loaded
    forbidden = vlm_adapter.forbidden_token_ids(processor, model.config)
    end_ids = sampler.end_token_ids(model, processor.tokenizer)
    drawn = _draw(model, processor, share_prompt, tokens=2, seed=1)
    firsts, counts = drawn[:, 0].unique(return_counts=True)
    tested = 0
    for first, count in zip(firsts.tolist(), counts.tolist()):
        if count < 400 or first in end_ids:
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


@pytest.mark.parametrize("field", FIRST_TOKEN_FIELDS)
def test_the_check_fails_when_a_checkpoint_field_leaks(loaded, checkpoint, field):
    """The on-policy test has the power to see each leak: with one checkpoint field let through, the
    first token's frequencies are rejected at SIGNIFICANCE (the bug this file guards, put back by hand).
    The checkpoint's values as set (transformers writes sequence_bias to JSON in a form it cannot read
    back, so a leak of the file's would fail outright)."""
    from transformers import GenerationConfig

    model, processor = loaded
    value = getattr(GenerationConfig(**checkpoint[1]), field)
    with _letting_through(field, value):
        assert _first_token_p_value(model, processor, share_prompt=True) < SIGNIFICANCE


def test_no_checkpoint_field_reaches_generate(loaded, checkpoint, monkeypatch):
    """The config generate runs with holds, for every field the checkpoint sets, the run's value or
    transformers' neutral default, never the checkpoint's; and end ids are the checkpoint's list."""
    from transformers import GenerationConfig
    from transformers.generation.utils import GenerationMixin

    model, processor = loaded
    published = GenerationConfig.from_pretrained(checkpoint[0]).to_diff_dict()
    seen = []
    prepare = GenerationMixin._prepare_generation_config

    def spy(self, generation_config, **kwargs):
        config, model_kwargs = prepare(self, generation_config, **kwargs)
        seen.append(config)
        return config, model_kwargs

    monkeypatch.setattr(GenerationMixin, "_prepare_generation_config", spy)
    for share_prompt in (True, False):
        sampler.sample_groups(model, _prompt(processor), processor.tokenizer, group_size=2, max_new_tokens=2,
                              temperature=0.9, top_p=0.95, suppress_token_ids=[], share_prompt=share_prompt)
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
    first of any of them, and its mask, padding, truncation flag and text agree (trap 14). Here the
    list also holds the two likeliest first tokens, so about two completions in three end at once."""
    model, processor = loaded
    tokenizer = processor.tokenizer
    inputs = _prompt(processor)
    likeliest = _first_token_logits(model, inputs).topk(2).indices.tolist()
    listed = [*tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]), *likeliest]
    monkeypatch.setattr(model.generation_config, "eos_token_id", listed)
    assert sampler.end_token_ids(model, tokenizer) == listed  # the tokenizer's eos (<|im_end|>) is listed already
    torch.manual_seed(0)
    rollout = sampler.sample_groups(model, inputs, tokenizer, group_size=64, max_new_tokens=6, temperature=1.0,
                                    top_p=1.0, suppress_token_ids=vlm_adapter.forbidden_token_ids(processor, model.config))
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


def test_generate_never_compiles_the_decode_step(loaded, monkeypatch):
    """On a GPU, transformers compiles the decode step (CUDA graphs) whenever generate is given a static
    cache, as the shared prompt's generate is: minutes of compiling, and a recompile whenever the cache
    length changes. The hazard is real for transformers' own defaults, and the sampler's config turns it off."""
    from transformers import GenerationConfig, StaticCache

    model, _ = loaded
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    cache = StaticCache(config=model.config.get_text_config(), max_cache_len=8)
    assert model._valid_auto_compile_criteria({"cache": cache}, GenerationConfig()) is True
    ours = sampler.generation_config(max_new_tokens=4, end_ids=[1], pad_token_id=0, suppress_token_ids=[],
                                     temperature=1.0)
    assert model._valid_auto_compile_criteria({"cache": cache}, ours) is False


def _host_syncs_while_sampling(folder: str, max_new_tokens: int, share_prompt: bool) -> int:
    """How many times sample_groups reads a tensor's value on the host (aten::_local_scalar_dense: .item(),
    bool(), int() of a tensor; on a GPU each one waits for every kernel queued before it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountSyncs(TorchDispatchMode):
        syncs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountSyncs.syncs += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    processor = vlm_adapter.load_processor(folder, 56 * 56, 56 * 56)
    model = vlm_adapter.load_model(folder, torch.float32, "sdpa")
    inputs = vlm_adapter.build_inputs(processor, [build_conversation("What colour?"), build_conversation("Which side is it on?")],
                                      [[Image.new("RGB", (56, 56))]] * 2, vlm_adapter.FAMILIES["qwen2_vl"])
    with CountSyncs():
        sampler.sample_groups(model, inputs, processor.tokenizer, group_size=3, max_new_tokens=max_new_tokens,
                              temperature=1.0, top_p=1.0, suppress_token_ids=[], ignore_eos=True, share_prompt=share_prompt)
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
        with sampler.decode_attention(model):
            inside = implementations()
        after = implementations()
    finally:
        model.set_attn_implementation("sdpa")
    assert inside == {"sdpa"} and after == {"flash_attention_2"}
