"""Model families as data, and the inputs they take: what differs between Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, LLaVA-OneVision, Idefics3, SmolVLM, Gemma 3 and Aria, in one table (`FAMILIES`).

- the processor (Qwen's pixel limits) and the model (its attention; ZeRO-3's class patching);
- conversations and pictures to left-padded model inputs, and a batch cut or repeated by prompt with
  each prompt's pictures kept with it (`select_prompts`, `repeat_for_group`: [group order]);
- the tokens sampling must never emit ([sampled placeholders]);
- the positions of left-padded prompts, counted over real tokens (Qwen's 3-D mRoPE included:
  [padding positions]);
- the masked-out blank picture that keeps every rank's vision tower running ([text-only rank]);
- LoRA through PEFT: where the adapters go, the reference as the policy with them off
  (`WithoutAdapters`), and sampling with them merged into the weights (`adapters_merged`).
A new family is an entry in the table; the loop and the policy never branch on it. The names in
brackets are traps, described in docs/TRAPS.md.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass

import torch

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
    """What differs between model families, as data: the loop and the policy never branch on it.

    placeholders: tokens sampling must never emit ([sampled placeholders]). media: how picture
    tensors split per item. per_row: tensors with one entry per prompt along dim 0 (a text-only row's
    is a blank the model skips). mrope: Qwen's 3-D rotary positions (get_rope_index, rope_deltas);
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

    model_type = AutoConfig.from_pretrained(base_model_path(model_name_or_path)).model_type
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
    if family_of(AutoConfig.from_pretrained(base_model_path(model_name_or_path))).pixel_budget:
        for pictures in (processor.image_processor, getattr(processor, "video_processor", None)):
            if pictures is not None:
                pictures.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    processor.tokenizer.padding_side = "left"  # prompts are left-padded so generation appends on the right
    return processor


def define_model_classes(model_name_or_path: str):
    """Import every module class the model is built from, by building it once on the meta device (no
    memory), and return that skeleton (its layers' names, no weights; of the base model for a LoRA
    adapter's folder). Call it before a ZeRO-3 load (HfDeepSpeedConfig), whose zero.Init would otherwise
    be the one to define some of them, and undo their class decorators ([ZeRO-3 class patching])."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(base_model_path(model_name_or_path)))


def load_model(model_name_or_path: str, dtype: torch.dtype, attn_implementation: str | None = None):
    """The model, in `dtype`, with the given attention (None: flash_attention_2 where it can run, else
    sdpa; config.attention_for). Under ZeRO-3 call this while an HfDeepSpeedConfig is alive, so that
    from_pretrained partitions the weights as it loads them. A LoRA adapter's folder (train.py
    --use_peft) loads as its base model with the adapters merged into the weights."""
    from transformers import AutoModelForImageTextToText, __version__

    from .config import attention_for, check_transformers, flash_attn_version

    check_transformers(__version__)
    if attn_implementation is None:
        attn_implementation = attention_for(None, dtype in (torch.bfloat16, torch.float16), torch.cuda.is_available(),
                                            flash_attn_version())
    base = base_model_path(model_name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=dtype, attn_implementation=attn_implementation)
    if base != model_name_or_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, model_name_or_path).merge_and_unload()
    return model


def save_model(engine, processor, args, folder: str, zero_stage: int, is_main: bool) -> None:
    """Hugging Face format (safetensors + processor) that from_pretrained loads, and the run's
    arguments (training_args.json: eval.py prompts the model as it was trained). A LoRA model saves
    its adapters alone, as PEFT does (adapter_config.json, adapter_model.safetensors), which
    PeftModel.from_pretrained puts on the base model and load_model loads. Under ZeRO-3 the
    shards are gathered into one 16-bit state dict on rank 0 (a collective: every rank calls this)."""
    adapters = has_adapters(engine.module)
    state_dict = (engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=adapters) if zero_stage == 3
                  else engine.module.state_dict())
    if is_main and adapters:
        # save_embedding_layers=False: PEFT's "auto" would look the base model up on the Hub to compare vocabularies.
        engine.module.save_pretrained(folder, state_dict=state_dict, save_embedding_layers=False)
        _save_processor_and_arguments(folder, processor, args)
    elif is_main:
        model = engine.module
        # save_pretrained reverts the renames from_pretrained recorded; a ZeRO-3 load records extra ones
        # ([ZeRO-3 key names]). Without a record it reverts the family's defaults, as after a plain load.
        recorded = getattr(model, "_weight_conversions", None)
        if zero_stage == 3:
            model._weight_conversions = None
        try:
            model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        finally:
            model._weight_conversions = recorded
        _save_processor_and_arguments(folder, processor, args)


def save_merged(adapter_folder: str, processor, args, dtype) -> str:
    """--merge_adapter: adapter_folder/merged, the base model with the saved adapters merged into its
    weights (W + (alpha / r) B A), which from_pretrained loads with no PEFT. Read back from the files,
    on one process (rank 0), so it is what anyone loading the adapter gets. Returns the folder."""
    merged = os.path.join(adapter_folder, "merged")
    load_model(adapter_folder, dtype, "sdpa").save_pretrained(merged)
    _save_processor_and_arguments(merged, processor, args)
    return merged


def _save_processor_and_arguments(folder: str, processor, args) -> None:
    processor.save_pretrained(folder)
    with open(os.path.join(folder, "training_args.json"), "w") as f:
        json.dump(asdict(args), f, indent=1)


# ---------------------------------------------------------------- LoRA adapters (PEFT)

ADAPTER_CONFIG = "adapter_config.json"


def base_model_path(model_name_or_path: str) -> str:
    """The model a LoRA adapter's folder (its adapter_config.json) was trained from; any other path as it is."""
    import json
    import os

    adapter_config = os.path.join(model_name_or_path, ADAPTER_CONFIG)
    if not os.path.isfile(adapter_config):
        return model_name_or_path
    with open(adapter_config) as f:
        return json.load(f)["base_model_name_or_path"]


def lora_targets(model, names: list[str], vision: bool) -> list[str]:
    """The full names of the linear layers that get LoRA adapters: those of the language model whose
    last name part is in `names` (["all-linear"]: all of them), and with `vision` those of the
    vision tower too. Never elsewhere: the vision towers (SigLIP's q_proj, Qwen2.5-VL's gate_proj)
    and Aria's projector (q_proj) use the same names, and PEFT's own matching of `names` would put
    adapters there as well ([LoRA in the vision tower]). `model` may be define_model_classes'
    skeleton: a name that matches no layer stops the run before any weight loads."""
    from .config import UsageError

    scopes = {"the language model": unwrap(model).get_decoder()}
    if vision:
        scopes["the vision tower"] = vision_tower(model)
    full_name = {module: name for name, module in unwrap(model).named_modules()}
    linear = {scope: {f"{full_name[root]}.{name}": name.rsplit(".", 1)[-1] for name, module in root.named_modules()
                      if isinstance(module, torch.nn.Linear)} for scope, root in scopes.items()}
    known = {scope: sorted(set(layers.values())) for scope, layers in linear.items()}

    def refuse(message: str):
        error = UsageError(message)
        error.shared = True  # every rank finds the same: rank 0 alone says it
        raise error

    for name in names:
        if name != "all-linear" and not any(name in found for found in known.values()):
            refuse(f"--lora_target_modules: {name!r} names no linear layer of " + " or ".join(scopes) + "; "
                   + "; ".join(f"{scope}'s are {', '.join(found)}" for scope, found in known.items()) + ".")
    if vision and names != ["all-linear"] and not set(names) & set(known["the vision tower"]):
        refuse(f"--lora_vision: none of --lora_target_modules {' '.join(names)} is a linear layer of the vision "
               f"tower; add some of {', '.join(known['the vision tower'])}, or use all-linear.")
    return sorted(full for layers in linear.values() for full, last in layers.items()
                  if names == ["all-linear"] or last in names)


def add_lora(model, targets: list[str], r: int, alpha: int, dropout: float, seed: int):
    """The model wrapped by PEFT with a LoRA adapter on each of `targets` (lora_targets): W x becomes
    W x + (alpha / r) B A x, A initialised at random (from `seed`: the same on every rank, whatever
    was drawn before) and B at 0, so the wrapped model starts as the model. Only A and B train."""
    import os

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wrapped = get_peft_model(model, config)
    # PEFT makes the input embeddings' outputs require a gradient when checkpointing is on, for
    # reentrant checkpointing, which needs one; train.py's is non-reentrant, and those hooks would make
    # the frozen vision tower run its whole backward for nothing ([LoRA's input gradients]).
    model.disable_input_require_grads()
    # The adapter names its base model: a local folder by its absolute path, so it loads from anywhere.
    name = wrapped.peft_config["default"].base_model_name_or_path
    if name and os.path.isdir(name):
        wrapped.peft_config["default"].base_model_name_or_path = os.path.abspath(name)
    return wrapped


@contextlib.contextmanager
def adapters_merged(model):
    """Within the block a LoRA model's adapters are merged into the weights they adapt, W' = W + (alpha /
    r) B A (PEFT's merge), so that each layer runs one matmul instead of three: for sampling, where the
    weights do not change while a rollout is drawn. Exact afterwards: each merged weight is a new
    tensor, and the original tensors are put back (PEFT's unmerge subtracts, and W + d - d is not W in
    floating point: the frozen weights would drift every rollout, [unmerge drift]). Holds one more copy
    of the adapted weights while it lasts. `model`: a DeepSpeed engine or the model; without adapters,
    nothing. Under ZeRO-3, enter it inside the gather of every weight (policy.gathered_weights)."""
    model = getattr(model, "module", model)
    if not has_adapters(model):
        yield
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    originals = [(param, param.data) for layer in layers for param in layer.get_base_layer().parameters(recurse=False)]
    for param, data in originals:
        param.data = data.clone()
    model.base_model.merge_adapter()
    try:
        yield
    finally:
        model.base_model.unmerge_adapter()  # PEFT's bookkeeping: its layers run their adapters again
        for param, data in originals:
            param.data = data


class WithoutAdapters:
    """A LoRA policy's engine run with its adapters off, in eval mode as the frozen reference runs:
    the starting model. `module` is the policy's, so families.unwrap finds its transformers model.
    Under ZeRO-3 the adapters' weights are simply not gathered while they are off."""

    def __init__(self, engine):
        self.engine, self.module = engine, engine.module

    def __call__(self, *args, **kwargs):
        was_training = self.module.training
        self.module.eval()
        try:
            with self.module.disable_adapter():
                return self.engine(*args, **kwargs)
        finally:
            self.module.train(was_training)


def has_adapters(model) -> bool:
    """Whether `model` is PEFT's wrapper (add_lora). Without peft imported, nothing can be."""
    import sys

    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def forbidden_token_ids(processor, config) -> list[int]:
    vocab = processor.tokenizer.get_vocab()
    return [vocab[token] for token in family_of(config).placeholders if token in vocab]


def counts_from_size(processor) -> bool:
    """Whether the processor can tell an image's token count from its size alone, without processing
    pixels (Qwen's image processor: its patch count)."""
    image_processor = getattr(processor, "image_processor", None)
    return hasattr(image_processor, "get_number_of_image_patches") and hasattr(image_processor, "merge_size")


def count_prompt_tokens(processor, conversation: list[dict], images: list, family: Family,
                        videos: list | None = None) -> int:
    """Prompt length once each image placeholder is expanded. Where counts_from_size(processor), each
    image may be given as its (width, height) alone; other processors run on the pictures."""
    if videos or (images and not counts_from_size(processor)):
        return build_inputs(processor, [conversation], [images], family, [videos or []])["input_ids"].shape[1]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    length = len(processor.tokenizer(text)["input_ids"])
    for image in images:  # one placeholder token in the text becomes patches / merge^2 tokens
        width, height = image if isinstance(image, tuple) else image.size
        patches = processor.image_processor.get_number_of_image_patches(height, width, {})
        length += patches // processor.image_processor.merge_size ** 2 - 1
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
    in the same order ([group order]: pixel_values split per prompt, then each block repeated G times)."""
    num_prompts = inputs["input_ids"].shape[0]
    return _regroup(inputs, config, [i for i in range(num_prompts) for _ in range(group_size)])


def pad_prompts(inputs: dict, count: int, config) -> dict:
    """The batch padded to `count` prompts with copies of its last one (and their pictures)."""
    num_prompts = inputs["input_ids"].shape[0]
    if count <= num_prompts:
        return inputs
    return _regroup(inputs, config, list(range(num_prompts)) + [num_prompts - 1] * (count - num_prompts))


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
    """The transformers model inside a DeepSpeed engine and PEFT's wrapper (or the model itself). A LoRA
    model's adapters live in its layers, so running it runs them."""
    model = getattr(model, "module", model)
    return model.get_base_model() if has_adapters(model) else model


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
    """The inputs of one prompt holding one small blank image and nothing else (see with_pictures)."""
    from PIL import Image

    conversation = [{"role": "user", "content": [{"type": "image"}]}]
    inputs = build_inputs(processor, [conversation], [[Image.new("RGB", (56, 56))]], family)
    return {key: value.to(device) for key, value in inputs.items()}


def with_pictures(inputs: dict, blank: dict) -> dict:
    """A batch without pictures gets the blank image prompt as extra left padding of its first row:
    masked out (attention 0, no position), so no real token sees it, but the vision tower runs on it.

    Why ([text-only rank]): under ZeRO-3 every rank must run the same modules in the same order, in generate
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


