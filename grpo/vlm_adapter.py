"""Everything specific to a model family, in one place: Qwen2-VL and Qwen2.5-VL.

- load the processor (with the pixel limits) and the model;
- turn conversations and images into model inputs, and repeat each prompt G times (pixel_values
  split per image by image_grid_thw, trap 2);
- the tokens the sampler must never emit (image placeholders, trap 5);
- completion-token log-probs from a forward that carries the images (trap 1), with the 3-D mRoPE
  positions computed from the real tokens (trap 10), and only completion logits kept (trap 11);
- the shared prompt: each prompt (and image) forwarded once, its keys/values read by its G
  completions (PromptKV, SharedPromptKV), gradients included.

A new family is a new set of these few functions, not a branch in the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_layers import GradientCheckpointingLayer

from .loss import selective_log_softmax, token_entropy

@dataclass(frozen=True)
class Media:
    """One kind of picture input (images, or video) as a family's processor lays it out.

    Each item (an image, a video) stands in input_ids as one unbroken run of its placeholder token,
    whose id is the model config's attribute `token_id`, in prompt order. Its tensors either have one
    entry per item along dim 0 (`per_item`), or stack all the items' patches along dim 0, item k
    owning grid[k].prod() of them (`per_patch`: (tensor, grid) pairs)."""

    token_id: str
    per_item: tuple[str, ...] = ()
    per_patch: tuple[tuple[str, str], ...] = ()
    count_key: str | None = None  # LLaVA-OneVision's batch_num_images: items per prompt that has any
    runs_per_item: str | None = None  # Qwen3-VL's video: one run per frame group, grid[k][0] of them per video


@dataclass(frozen=True)
class Family:
    """What differs between model families, as data: the loop and the sampler never branch on it.

    placeholders: tokens sampling must never emit ("Image features and image tokens do not match"
    at the next forward, trap 5). media: how picture tensors split per item. per_row: tensors with one
    entry per prompt along dim 0 (a text-only row's is a blank the model skips). mrope: Qwen's 3-D rotary positions (get_rope_index, rope_deltas);
    otherwise positions are 1-D and count the real tokens of each left-padded row. Tensors shaped
    like input_ids (mm_token_type_ids, token_type_ids) are token types: sliced with the text and 0
    on completion tokens, which are text."""

    placeholders: tuple[str, ...]
    media: tuple[Media, ...] = ()
    per_row: tuple[str, ...] = ()
    mrope: bool = False
    nested_images: bool = False  # the processor takes one list of images per prompt, not one flat list
    takes_video: bool = False
    pixel_budget: bool = False  # images resized to any shape within --min_pixels / --max_pixels (Qwen)


_QWEN_VL = Family(
    placeholders=("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"),
    media=(Media("image_token_id", per_item=("image_grid_thw",), per_patch=(("pixel_values", "image_grid_thw"),)),
           Media("video_token_id", per_item=("video_grid_thw", "second_per_grid_ts"),
                 per_patch=(("pixel_values_videos", "video_grid_thw"),))),
    mrope=True,
    takes_video=True,
    pixel_budget=True,
)
_LLAVA_ONEVISION = Family(
    placeholders=("<image>", "<video>"),
    media=(Media("image_token_id", per_item=("pixel_values", "image_sizes"), count_key="batch_num_images"),),
    nested_images=True,
)
_IDEFICS3 = Family(
    # Images expand to <fake_token_around_image><global-img><image>...; split crops add <row_i_col_j>.
    placeholders=("<image>", "<fake_token_around_image>", "<global-img>",
                  *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))),
    media=(Media("image_token_id"),),
    per_row=("pixel_values", "pixel_attention_mask"),
    nested_images=True,
)
_GEMMA3 = Family(
    placeholders=("<image_soft_token>", "<start_of_image>", "<end_of_image>"),
    media=(Media("image_token_id", per_item=("pixel_values",)),),
    nested_images=True,
)
_ARIA = Family(
    placeholders=("<|img|>", "<fim_prefix>", "<fim_suffix>"),
    media=(Media("image_token_index", per_item=("pixel_values", "pixel_mask")),),
)
# Qwen3-VL writes a timestamp before each frame group of a video, so a video is several runs.
_QWEN3_VL = Family(
    placeholders=_QWEN_VL.placeholders,
    media=(_QWEN_VL.media[0], Media("video_token_id", per_item=("video_grid_thw",), runs_per_item="video_grid_thw",
                                    per_patch=(("pixel_values_videos", "video_grid_thw"),))),
    mrope=True,
    takes_video=True,
    pixel_budget=True,
)
FAMILIES = {"qwen2_vl": _QWEN_VL, "qwen2_5_vl": _QWEN_VL, "qwen3_vl": _QWEN3_VL,
            "llava_onevision": _LLAVA_ONEVISION, "idefics3": _IDEFICS3, "smolvlm": _IDEFICS3, "gemma3": _GEMMA3,
            "aria": _ARIA}


def family_of(model_or_config) -> Family:
    config = getattr(unwrap(model_or_config), "config", model_or_config)
    return FAMILIES[config.model_type]


def check_model_type(model_name_or_path: str) -> Family:
    """The model's family, from its config alone, so an unsupported one fails before any weights load."""
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(model_name_or_path).model_type
    if model_type not in FAMILIES:
        from .config import UsageError

        raise UsageError(f"--model_name_or_path {model_name_or_path!r} is a {model_type!r} model; "
                         f"this trainer supports {sorted(FAMILIES)}.")
    return FAMILIES[model_type]


def load_processor(model_name_or_path: str, min_pixels: int, max_pixels: int):
    """The model's processor; for a family with a pixel budget (Qwen) images and video frames are
    resized to any shape whose area is within [min_pixels, max_pixels]."""
    from transformers import AutoConfig, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_name_or_path)
    if family_of(AutoConfig.from_pretrained(model_name_or_path)).pixel_budget:
        for pictures in (processor.image_processor, getattr(processor, "video_processor", None)):
            if pictures is not None:
                pictures.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    processor.tokenizer.padding_side = "left"  # prompts are left-padded so generation appends on the right
    return processor


def define_model_classes(model_name_or_path: str) -> None:
    """Import every module class the model is built from, by building it once on the meta device (no
    memory). Call it before a ZeRO-3 load (HfDeepSpeedConfig): DeepSpeed's zero.Init wraps the
    __init__ of every class defined while it is active and puts back what it wrapped when it exits,
    which undoes what a class decorator did in between. transformers (5.25, with `kernels` installed)
    decorates attention classes (Qwen2Attention: use_kernelized_func); LLaVA-OneVision and Aria import
    their text model's module inside their own __init__, so under ZeRO-3 the first load defined it
    inside zero.Init, and every later instance (the reference model) lost its decorated __init__ and
    failed at its first forward ("'Qwen2Attention' object has no attribute '_kernel_funcs'")."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_name_or_path))


def load_model(model_name_or_path: str, dtype: torch.dtype, attn_implementation: str | None = None):
    """The model, in `dtype`, with the given attention (None: flash_attention_2 where it can run, else
    sdpa; config.settle_precision_and_attention). Under ZeRO-3 call this while an HfDeepSpeedConfig
    is alive, so that from_pretrained partitions the weights as it loads them."""
    from transformers import AutoModelForImageTextToText

    from .config import GRPOArguments, flash_attn_version, settle_precision_and_attention

    if attn_implementation is None:
        chosen = GRPOArguments(bf16=dtype in (torch.bfloat16, torch.float16))
        settle_precision_and_attention(chosen, on_gpu=torch.cuda.is_available(), flash_attn=flash_attn_version())
        attn_implementation = chosen.attn_implementation
    return AutoModelForImageTextToText.from_pretrained(model_name_or_path, dtype=dtype,
                                                       attn_implementation=attn_implementation)


def forbidden_token_ids(processor, config) -> list[int]:
    vocab = processor.tokenizer.get_vocab()
    return [vocab[token] for token in family_of(config).placeholders if token in vocab]


def count_prompt_tokens(processor, conversation: list[dict], images: list, family: Family,
                        videos: list | None = None) -> int:
    """Prompt length once each image placeholder is expanded. Qwen's image processor can tell its
    patch count from the image size alone, without processing pixels; other processors run."""
    image_processor = getattr(processor, "image_processor", None)
    counts_from_size = hasattr(image_processor, "get_number_of_image_patches") and hasattr(image_processor, "merge_size")
    if videos or (images and not counts_from_size):
        return build_inputs(processor, [conversation], [images], family, [videos or []])["input_ids"].shape[1]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    length = len(processor.tokenizer(text)["input_ids"])
    for image in images:  # one placeholder token in the text becomes patches / merge^2 tokens
        patches = image_processor.get_number_of_image_patches(image.height, image.width, {})
        length += patches // image_processor.merge_size ** 2 - 1
    return length


def build_inputs(processor, conversations: list[list[dict]], images: list[list], family: Family,
                 videos: list[list] | None = None) -> dict:
    """Left-padded prompt inputs [B, P] (input_ids, attention_mask, token types) and the pictures,
    laid out as the family's processor does. images (and videos): one list per prompt, in the order
    its conversation places them (empty for a prompt without)."""
    texts = [processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    if not any(images):
        images = None  # processors reject empty image lists
    elif not family.nested_images:
        images = [image for prompt_images in images for image in prompt_images]
    pictures = {"images": images}
    if videos and any(videos):
        pictures["videos"] = [video for prompt_videos in videos for video in prompt_videos]
    return dict(processor(text=texts, **pictures, return_tensors="pt", padding=True))


def _item_counts(input_ids: torch.Tensor, token_id: int) -> list[int]:
    """How many items (unbroken runs of token_id) each row of input_ids [B, P] holds."""
    is_token = (input_ids == token_id).long()
    starts = (is_token[:, 1:] > is_token[:, :-1]).sum(1) + is_token[:, 0]
    return starts.tolist()


def _blocks_per_prompt(inputs: dict, config) -> tuple[dict[str, list[torch.Tensor]], list[int]]:
    """Every picture tensor cut into one block per prompt along dim 0 (empty for a prompt without
    that kind of picture; per_row tensors keep a leading dim of 1), and each prompt's item count."""
    family = family_of(config)
    blocks = {key: list(inputs[key].split(1)) for key in family.per_row if key in inputs}
    items = [0] * inputs["input_ids"].shape[0]
    for media in family.media:
        counts = _item_counts(inputs["input_ids"], getattr(config, media.token_id))
        if media.runs_per_item and media.runs_per_item in inputs:
            counts = _runs_to_items(counts, inputs[media.runs_per_item][:, 0].tolist())
        items = [a + b for a, b in zip(items, counts)]
        for key in media.per_item:
            if key in inputs:
                blocks[key] = list(inputs[key].split(counts))
        for key, grid in media.per_patch:
            if key in inputs:
                per_item, patches = inputs[grid].prod(-1).tolist(), []
                for count in counts:
                    patches.append(sum(per_item[:count]))
                    per_item = per_item[count:]
                blocks[key] = list(inputs[key].split(patches))
        if media.count_key in inputs:  # one entry per prompt that holds items: its count
            blocks[media.count_key] = [torch.tensor([n]) if n else torch.zeros(0, dtype=torch.long) for n in counts]
    return blocks, items


def _runs_to_items(runs_per_row: list[int], runs_per_item: list[int]) -> list[int]:
    """Items per row, from each row's run count and each item's (in order)."""
    items, k = [], 0
    for runs in runs_per_row:
        count = 0
        while runs > 0:
            runs -= runs_per_item[k]
            k, count = k + 1, count + 1
        items.append(count)
    return items


def _regroup(inputs: dict, config, prompts: list[int], first_column: int = 0) -> dict:
    """The batch of the given prompts (in that order, repeats allowed): text rows from first_column
    on, and their pictures. Picture tensors are left out when none of the prompts holds a picture,
    as the processor would leave them out (a forward given empty ones fails)."""
    blocks, items = _blocks_per_prompt(inputs, config)
    any_pictures = any(items[i] for i in prompts)
    batch = {}
    for key, value in inputs.items():
        if key not in blocks:
            batch[key] = value[prompts, first_column:]
        elif any_pictures and any(len(blocks[key][i]) for i in prompts):
            batch[key] = torch.cat([blocks[key][i].to(value.device) for i in prompts])
    return batch


def repeat_for_group(inputs: dict, group_size: int, config) -> dict:
    """Each prompt's row G times in a row (prompt i -> rows i*G .. i*G+G-1), its pictures included
    in the same order (trap 2: pixel_values split per prompt, then each block repeated G times)."""
    num_prompts = inputs["input_ids"].shape[0]
    return _regroup(inputs, config, [i for i in range(num_prompts) for _ in range(group_size)])


def select_prompts(inputs: dict, start: int, stop: int, config, blank: dict | None = None) -> dict:
    """Prompts start .. stop-1 of a batch (their pictures too), without the padding columns that only
    longer prompts of the batch needed (prompts are left-padded, so those are leading columns).
    Given `blank` (blank_picture_prompt), a selection without pictures gets it (with_pictures)."""
    used = inputs["attention_mask"][start:stop].bool()
    for media in family_of(config).media:  # a masked-out blank image (with_pictures) is in use too
        used |= inputs["input_ids"][start:stop] == getattr(config, media.token_id)
    first_column = int(used.any(0).long().argmax())  # the first column any selected prompt uses
    selected = _regroup(inputs, config, list(range(start, stop)), first_column)
    return with_pictures(selected, blank) if blank is not None else selected


def unwrap(model):
    """The transformers model inside a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


def token_type_keys(inputs: dict) -> list[str]:
    """The per-token type ids among the inputs (mm_token_type_ids, token_type_ids): shaped like input_ids."""
    shape = inputs["input_ids"].shape
    return [key for key, value in inputs.items()
            if key not in ("input_ids", "attention_mask") and value.shape == shape]


def prompt_positions(model, prompt_inputs: dict) -> torch.Tensor:
    """Rotary positions of left-padded prompts, counting real tokens only (padding holds 0).

    Qwen's 3-D mRoPE [3, B, P]: text advances all three axes by one per token, an image's tokens
    take (t, h, w) grid positions and the text after it continues from the largest one + 1.
    Other families [B, P]: 0, 1, 2, ... over each row's real tokens, as `generate` numbers them."""
    unwrapped = unwrap(model)
    if family_of(unwrapped).mrope:
        kwargs = {key: prompt_inputs[key] for key in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
                  if key in prompt_inputs}
        positions, _ = unwrapped.model.get_rope_index(
            prompt_inputs["input_ids"], mm_token_type_ids=prompt_inputs["mm_token_type_ids"],
            attention_mask=prompt_inputs["attention_mask"], **kwargs)
        return positions
    return (prompt_inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)


def continuation_positions(prompt_position_ids: torch.Tensor, group_size: int, length: int) -> torch.Tensor:
    """Positions of the `length` tokens after each prompt, for its G rows: [3, B*G, length] (mRoPE)
    or [B*G, length]. Completions are text, so every axis counts on from the prompt's largest position
    + 1; left padding puts every prompt's last real token in the last column."""
    last = prompt_position_ids[..., -1]  # [3, B] or [B]
    if last.dim() == 2:
        last = last.amax(0)
    steps = torch.arange(1, length + 1, device=last.device)
    positions = (last[:, None] + steps[None, :]).repeat_interleave(group_size, dim=0)
    return positions[None].expand(3, -1, -1) if prompt_position_ids.dim() == 3 else positions


class PromptKV(CacheLayerMixin):
    """The prompt pass's cache for one decoder layer: it keeps the prompt's keys/values [B, H, P, D].

    It overwrites rather than appends: gradient checkpointing runs the layer's forward again during
    the backward, and that replay must not store a second copy. The prompt pass sees no past.
    """

    is_sliding = False

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys, self.values, self.is_initialized = key_states, value_states, True
        return key_states, value_states

    def get_seq_length(self) -> int:
        return 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_max_length(self) -> int:
        return -1


class SharedPromptKV(PromptKV):
    """The completion pass's cache for one decoder layer: each of the B*G completions attends to its
    prompt's keys/values (prompt i's repeated for rows i*G .. i*G+G-1) followed by its own. It reads
    and never stores, so a replay under gradient checkpointing sees exactly what the first run saw,
    and the gradient reaches the prompt pass through the repeated tensors."""

    def __init__(self, prompt: PromptKV, group_size: int):
        super().__init__()
        self.prompt, self.group_size = prompt, group_size

    def update(self, key_states, value_states, *args, **kwargs):
        G = self.group_size
        return (torch.cat([self.prompt.keys.repeat_interleave(G, dim=0), key_states], dim=-2),
                torch.cat([self.prompt.values.repeat_interleave(G, dim=0), value_states], dim=-2))

    def get_seq_length(self) -> int:
        return self.prompt.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


def vision_tower(model):
    """The vision encoder, whatever the family calls it (visual, vision_tower, vision_model)."""
    for name in ("visual", "vision_tower", "vision_model"):
        found = getattr(unwrap(model).model, name, None)
        if found is not None:
            return found
    raise ValueError(f"no vision tower found in {type(unwrap(model)).__name__}")


def picture_keys(inputs: dict) -> list[str]:
    return [key for key in inputs if key not in ("input_ids", "attention_mask", *token_type_keys(inputs))]


def blank_picture_prompt(processor, family: Family, device) -> dict:
    """The inputs of one prompt holding one small blank image (see with_pictures)."""
    from PIL import Image

    from .data import build_conversation

    inputs = build_inputs(processor, [build_conversation("", num_images=1)], [[Image.new("RGB", (56, 56))]], family)
    return {key: value.to(device) for key, value in inputs.items()}


def with_pictures(inputs: dict, blank: dict) -> dict:
    """A batch without pictures gets the blank image prompt as extra left padding of its first row:
    masked out (attention 0, no position), so no real token sees it, but the vision tower runs on it.

    Why (trap 12): under ZeRO-3 every rank must run the same modules in the same order, in generate
    and in every forward, or a rank whose batch is text-only while another's has images waits
    forever (or DeepSpeed stops: "disagreement on list length between rank0 and rank1"); and the
    vision tower's weights get a gradient (of 0) on every rank. A batch with pictures is returned as is.
    """
    if picture_keys(inputs):
        return inputs
    rows, width = inputs["input_ids"].shape[0], blank["input_ids"].shape[1]
    padded = dict(inputs)
    for key in ("input_ids", "attention_mask", *token_type_keys(inputs)):
        if key == "input_ids":  # other rows: any text token, masked out like padding
            fill = torch.full((rows, width), int(blank["input_ids"][0, 0]), dtype=inputs[key].dtype)
        else:
            fill = torch.zeros((rows, width), dtype=inputs[key].dtype)
        fill = fill.to(inputs[key].device)
        if key != "attention_mask":
            fill[0] = blank[key][0]
        padded[key] = torch.cat([fill, inputs[key]], dim=1)
    padded.update({key: blank[key] for key in picture_keys(blank)})
    return padded


def completion_logps(model, prompt_inputs: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                     temperature: float, group_size: int, share_prompt: bool = True, with_entropy: bool = False):
    """log pi(o_t | q, image, o_<t) for every completion token, at the sampling temperature.

    prompt_inputs: B prompts (left-padded [B, P] rows and their images), NOT repeated; completion_ids,
    completion_mask: [B*G, T], completion i belonging to prompt i // G. Returns logps [B*G, T] (and
    the per-token entropy [B*G, T] when asked, without gradient).

    share_prompt=True runs each prompt (and its image) through the model once and lets its G
    completions attend to the same keys/values: P + G*T token positions instead of G*(P + T), and
    the gradient of all G completions flows back through the one prompt pass into the vision tower.
    share_prompt=False repeats every prompt G times: the plain path, kept to check the shared one.
    """
    return (_shared_completion_logps if share_prompt else _plain_completion_logps)(
        model, prompt_inputs, completion_ids, completion_mask, temperature, group_size, with_entropy)


def _shared_completion_logps(model, prompt_inputs: dict, completion_ids, completion_mask, temperature, group_size,
                             with_entropy):
    """Each prompt forwarded once, its keys/values read by its G completions (see completion_logps).

    One [B*G, T-1, V] logits tensor lives through forward and backward (the completion pass's, whose
    gradient overwrites it; selective_log_softmax), plus the prompt pass's [B, 1, V]; no copy, slice or
    division of a full-vocabulary tensor is made."""
    G, T = group_size, completion_ids.shape[1]
    B = prompt_inputs["input_ids"].shape[0]
    config = unwrap(model).config.get_text_config()
    prompt_cache = Cache(layers=[PromptKV() for _ in range(config.num_hidden_layers)])
    shared_cache = Cache(layers=[SharedPromptKV(layer, G) for layer in prompt_cache.layers])
    positions = prompt_positions(model, prompt_inputs)
    # 1. The prompt, once per prompt: fills the cache; its last logit predicts every completion's first
    # token, read by its G completions through a view (expand), not a copy.
    first_logits = model(**prompt_inputs, position_ids=positions, cache=prompt_cache, use_cache=True,
                         logits_to_keep=1).logits  # [B, 1, V]
    first_logits = first_logits.expand(B, G, first_logits.shape[-1])  # [B, G, V]
    first_logps = selective_log_softmax(first_logits, completion_ids[:, 0].view(B, G), temperature).view(B * G, 1)
    # 2. The completions on top of the shared prompt. The attention mask is each prompt's padding
    # (per row), then the completion's. Token t's logit predicts token t + 1: logits are made for
    # positions 0 .. T-2 only. The last token is still fed, so that this pass never has zero length
    # (under ZeRO-3 every rank must run the same forwards, whatever its completions' lengths).
    rest_logits = model(
        input_ids=completion_ids,
        attention_mask=torch.cat([prompt_inputs["attention_mask"].repeat_interleave(G, dim=0),
                                  completion_mask.to(prompt_inputs["attention_mask"].dtype)], dim=1),
        position_ids=continuation_positions(positions, G, T), cache=shared_cache, use_cache=True,
        logits_to_keep=torch.arange(T - 1, device=completion_ids.device),
    ).logits  # [B*G, T-1, V]
    entropy = torch.cat([token_entropy(first_logits, temperature).view(B * G, 1), token_entropy(rest_logits, temperature)],
                        dim=1) if with_entropy else None  # before the backward overwrites rest_logits
    rest_logps = selective_log_softmax(rest_logits, completion_ids[:, 1:], temperature, overwrite_logits=True)
    logps = torch.cat([first_logps, rest_logps], dim=1)
    return (logps, entropy) if with_entropy else logps


def _plain_completion_logps(model, prompt_inputs: dict, completion_ids, completion_mask, temperature, group_size,
                            with_entropy):
    """The same log-probs from one forward over [prompt; completion] per completion row, each prompt
    repeated G times: the plain path."""
    prompt_inputs = repeat_for_group(prompt_inputs, group_size, unwrap(model).config)
    mask = completion_mask.to(prompt_inputs["attention_mask"].dtype)
    inputs = dict(prompt_inputs, input_ids=torch.cat([prompt_inputs["input_ids"], completion_ids], dim=1),
                  attention_mask=torch.cat([prompt_inputs["attention_mask"], mask], dim=1))
    # Completion tokens are text: their token types are 0 (transformers 5.x needs them per row).
    for key in token_type_keys(prompt_inputs):
        inputs[key] = torch.cat([prompt_inputs[key], torch.zeros_like(completion_ids)], dim=1)
    # Positions over the real tokens, as generate numbered them (the model's own default would count
    # left padding in some families, and reuse a stale rope_deltas in Qwen's for a text-only batch).
    inputs["position_ids"] = prompt_positions(model, inputs)
    # The logit at position p predicts token p + 1: logits for the T positions before each completion token.
    P, T = prompt_inputs["input_ids"].shape[1], completion_ids.shape[1]
    logits = model(**inputs, logits_to_keep=torch.arange(P - 1, P + T - 1, device=completion_ids.device),
                   use_cache=False).logits  # [B*G, T, V]
    entropy = token_entropy(logits, temperature) if with_entropy else None
    logps = selective_log_softmax(logits, completion_ids, temperature, overwrite_logits=True)
    return (logps, entropy) if with_entropy else logps


def allow_checkpointing_with_shared_prompt(model) -> None:
    """Gradient checkpointing drops any cache passed to a checkpointed decoder layer, which would
    silently run the completions without their prompt. PromptKV and SharedPromptKV are safe to replay (the
    prompt pass overwrites, the completion pass only reads), so the decoder layers may keep it."""
    for module in unwrap(model).modules():
        if isinstance(module, GradientCheckpointingLayer):
            module._can_checkpoint_with_cache = True
