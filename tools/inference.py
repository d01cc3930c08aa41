# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""The inference API every front-end shares (`vica2 ask` / `vica2 chat`, the VSI-Bench evaluator, the web app).

    from vica2.tools.inference import ChatSession, load_model_and_processor

    model, processor = load_model_and_processor("ViCA2-7B-hf", dtype="bfloat16")
    chat = ChatSession(model, processor)
    chat.set_video("room.mp4")                   # vision towers + prefill of the video's prompt prefix, once
    print(chat.ask("How many chairs are there?").text)
    for text in chat.iter_ask("And tables?"):    # streamed; continues from the conversation's KV cache
        print(text, end="")

Encode once, ask many. Everything in a ViCA2 prompt before the question (system turn, the video's ~22k visual
tokens, the time instruction) is the same for every question about one video, and is ~99% of a question's
compute. `EncodedPrefix` runs the towers and the language model over that shared prefix once, keeps its KV cache
(transformers' `DynamicCache`) and answers any number of continuations from it, one at a time or batched.
The shared prefix is found from token ids (the longest common prefix of the rendered prompts), so any prompt
style works; a prompt whose video comes after its question simply gets no reuse.

Memory: the cache holds 2 x layers x kv_heads x head_dim values per token: 57 KiB per token in bf16 for ViCA2-7B,
~1.2 GB for a 64-frame video (22k tokens). Batched continuations copy it per row; `max_cache_bytes` caps the rows.

This is library code: it imports the model, processor and config modules only, never a front-end. Its errors name
the API arguments (`model_path`, `device`, ...); the front-ends' shell (`vica2.tools.shell`) shows them as flags.
"""

from __future__ import annotations

import contextlib
import copy
import json
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..configuration_vica2 import TOKEN_RATIO_ARGS, num_image_tokens, num_video_tokens


class UsageError(ValueError):
    """An error in what the user asked for (a missing file, a bad setting): front-ends print it as one line.

    `argument` names the API argument at fault (e.g. "model_path"), when the message starts with it: a front-end
    writes that name as its own flag (`--model`)."""

    def __init__(self, message: str, *, argument: str | None = None):
        super().__init__(message)
        self.argument = argument


DTYPE_NAMES = ("auto", "bfloat16", "float16", "float32")


# ---------------------------------------------------------------------------------------------------- loading
RELEASE_MODEL_TYPE = "vica_qwen"


def load_model_and_processor(model_path: str, dtype: str = "auto", device: str | None = "auto", *, load_in_4bit=False,
                             load_in_8bit=False, attn_implementation: str | None = None,
                             trust_remote_code: bool = False):
    """A converted ViCA2 (local folder or hub repo id) and its processor, in eval mode.

    By default the installed vica2 classes are used and no Python file that comes with the folder or repo runs
    (`trust_remote_code=False`); `trust_remote_code=True` runs the folder's own code instead, by explicit choice.
    `dtype`: "auto" (the checkpoint's), "bfloat16", "float16" or "float32". `device`: "auto" (all GPUs when there
    are, else CPU), "cpu", "cuda", "cuda:N", "mps", or None (left on the CPU for a trainer to place: fine-tuning).
    The processor loads first (a processor that would need code from the folder is refused before the slow model
    load). Raises `UsageError` for a missing folder, a research-release folder that needs converting, an unknown or
    unavailable device, a missing optional package, or a folder that does not load (truncated weights, a tensor
    that does not fit config.json, JSON nested too deeply to read).
    """
    check_model_path(model_path)
    if device is not None:
        check_device(device)
    try:
        return _from_pretrained(model_path, dtype, device, load_in_4bit, load_in_8bit, attn_implementation,
                                trust_remote_code)
    except (UsageError, ImportError):
        raise
    except Exception as error:  # noqa: BLE001 - truncated weights, mismatched sizes, bad JSON: the folder's fault
        why = ("a tensor's shape does not fit config.json" if "ignore_mismatched_sizes" in str(error)
               else f"{type(error).__name__}: {' '.join(str(error).split())}")
        raise UsageError(f"model_path {model_path!r}: could not load it ({why}).", argument="model_path") from error


def _from_pretrained(model_path, dtype, device, load_in_4bit, load_in_8bit, attn_implementation, trust_remote_code):
    model_class, processor_class = _classes(trust_remote_code)
    processor = processor_class.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    kwargs = {"dtype": dtype if dtype == "auto" else _torch_dtype(dtype)}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    if load_in_4bit or load_in_8bit:
        from transformers import BitsAndBytesConfig

        _require("bitsandbytes", "pip install bitsandbytes (or pip install 'vica2-hf[quant]')")
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
            if load_in_4bit else BitsAndBytesConfig(load_in_8bit=True)
        )
    if device == "auto":
        kwargs["device_map"] = "auto" if torch.cuda.is_available() or load_in_4bit or load_in_8bit else None
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = model_class.from_pretrained(model_path, **kwargs).eval()
    if device not in ("auto", None) and not (load_in_4bit or load_in_8bit):
        model = model.to(device)
    return model, processor


def _classes(trust_remote_code: bool) -> tuple:
    """(model class, processor class) to load with: the auto classes, which run the folder's code, when trusted;
    else the installed classes themselves. Only the config and image processor are registered with the auto classes
    (the processor loads its parts through them): an auto class with a registered model or processor would prefer
    it to the folder's code, so a later `trust_remote_code=True` load in this process would not run that code."""
    if trust_remote_code:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        return AutoModelForImageTextToText, AutoProcessor
    from ..modeling_vica2 import Vica2ForConditionalGeneration
    from ..processing_vica2 import Vica2Processor

    _register(_config_and_image_processor())
    return Vica2ForConditionalGeneration, Vica2Processor


def _config_and_image_processor() -> list:
    from transformers import AutoConfig
    # transformers 5.17 guards the top-level `AutoImageProcessor` behind torchvision (which ViCA2 does not need); the
    # class in its own module is not guarded.
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    from ..configuration_vica2 import Vica2Config
    from ..image_processing_vica2 import Vica2ImageProcessor

    return [lambda: AutoConfig.register(Vica2Config.model_type, Vica2Config, exist_ok=True),
            lambda: AutoImageProcessor.register(Vica2Config, image_processor_classes={"pil": Vica2ImageProcessor},
                                                exist_ok=True)]


def _register(registrations: list) -> None:
    for register in registrations:
        try:
            register()
        except ValueError:  # already registered (a second load in this process)
            pass


def register_installed_classes() -> None:
    """Make the auto classes resolve model_type "vica2" to the installed classes, process-wide (no code from a model
    folder; `pipeline(...)` then uses them too). They win over a folder's own code from then on in this process."""
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

    from ..configuration_vica2 import Vica2Config
    from ..modeling_vica2 import Vica2ForConditionalGeneration, Vica2Model
    from ..processing_vica2 import Vica2Processor

    _register([*_config_and_image_processor(),
               lambda: AutoModel.register(Vica2Config, Vica2Model),
               lambda: AutoModelForImageTextToText.register(Vica2Config, Vica2ForConditionalGeneration),
               lambda: AutoProcessor.register(Vica2Config, Vica2Processor)])


def check_model_path(model_path: str) -> None:
    """A local folder must exist and be converted; anything else must read as a hub repo id (owner/name)."""
    path = Path(model_path).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise UsageError(f"model_path {model_path!r}: the folder has no config.json (not a converted ViCA2).",
                             argument="model_path")
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except RecursionError as error:  # a config.json nested a million levels deep
            raise UsageError(f"model_path {model_path!r}: config.json is nested too deeply to read ({error}).",
                             argument="model_path") from None
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
            raise UsageError(f"model_path {model_path!r}: config.json is not a JSON object ({error}).",
                             argument="model_path") from None
        if model_type == RELEASE_MODEL_TYPE:
            raise UsageError(
                f"model_path {model_path!r} is a research-release checkpoint (model_type {RELEASE_MODEL_TYPE!r}): "
                f"convert it first: vica2 convert --input-dir {model_path} --output-dir {model_path.rstrip('/')}-hf",
                argument="model_path",
            )
        return
    if path.exists():
        raise UsageError(f"model_path {model_path!r} is a file; give a converted ViCA2 folder or a hub repo id.",
                         argument="model_path")
    looks_like_path = model_path.startswith((".", "/", "~")) or model_path.count("/") != 1 or "\\" in model_path
    if looks_like_path:
        raise UsageError(f"model_path {model_path!r}: no such folder (nor a hub repo id of the form owner/name).",
                         argument="model_path")


def check_device(device: str) -> None:
    """'auto', or a device this torch can use; anything else is a `UsageError` saying what is available."""
    if device == "auto":
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        problem = "unknown device; use auto, cpu, cuda, cuda:N or mps."
    else:
        problem = _device_problem(parsed)
    if problem:
        raise UsageError(f"device {device!r}: {problem}", argument="device")


def _device_problem(device: torch.device) -> str | None:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            return f"{build}; use device='cpu' (or install a CUDA build of torch)."
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"only {torch.cuda.device_count()} CUDA device(s) are visible."
    elif device.type == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available here; use device='cpu'."
    elif device.type not in ("cpu", "cuda", "mps", "xpu"):
        return "unsupported device type; use auto, cpu, cuda, cuda:N or mps."
    return None


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise UsageError(f"dtype {name!r}: use {', '.join(DTYPE_NAMES)}.", argument="dtype")
    return dtype


def _require(module: str, hint: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise UsageError(f"{module} is not installed: {hint}") from error


def inputs_to_model(inputs, model) -> dict:
    """Move the processor's output onto the model's device; pixels in the model's dtype, ids unchanged."""
    device, dtype = model.device, model.dtype
    moved = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            moved[name] = value.to(device, dtype) if value.is_floating_point() else value.to(device)
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            moved[name] = [v.to(device, dtype) if v.is_floating_point() else v.to(device) for v in value]
        else:
            moved[name] = value
    return moved


# ---------------------------------------------------------------------------------------------------- token counts
def implied_token_counts(config, *, num_frames: int | None = None, image_size: tuple[int, int] | None = None,
                         **overrides) -> dict[str, int]:
    """Visual tokens {"siglip", "hiera", "total"} a video of `num_frames` frames (default: the frame budget) or an
    image of `image_size` (height, width) gives with the token-ratio `overrides`, before anything runs.
    Raises `UsageError` for an invalid setting (e.g. a frame budget that is not a multiple of hiera_frames)."""
    overrides = {name: value for name, value in overrides.items() if value is not None}
    layout = {**config.token_layout(), **overrides}
    try:
        if image_size is not None:
            siglip, hiera = num_image_tokens(int(image_size[0]), int(image_size[1]), **layout)
        else:
            frames = layout["video_frames_budget"] if num_frames is None else num_frames
            if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
                raise ValueError(f"num_frames must be a positive whole number, got {frames!r}.")
            siglip, hiera = num_video_tokens(frames, **layout)
    except (ValueError, TypeError) as error:
        raise UsageError(str(error)) from None
    return {"siglip": siglip, "hiera": hiera, "total": siglip + hiera}


def visual_token_counts(config, inputs) -> dict[str, int]:
    """Visual tokens per stream {"siglip", "hiera"} of processor outputs `inputs` (all their videos and images), each
    video with the token-ratio settings of its `video_token_ratio` row (as the model reads them)."""
    counts = {"siglip": 0, "hiera": 0}
    videos = inputs.get("pixel_values_videos")
    ratios = inputs.get("video_token_ratio")
    for index, video in enumerate(list(videos) if videos is not None else []):
        settings = dict(zip(TOKEN_RATIO_ARGS, ratios[index].tolist())) if ratios is not None else {}
        siglip, hiera = config.num_video_tokens(video.shape[0], **settings)
        counts["siglip"] += siglip
        counts["hiera"] += hiera
    sizes = inputs.get("image_sizes")
    for height, width in (sizes.tolist() if sizes is not None else []):
        siglip, hiera = config.num_image_tokens(int(height), int(width))
        counts["siglip"] += siglip
        counts["hiera"] += hiera
    return counts


# ---------------------------------------------------------------------------------------------------- media
@dataclass
class MediaInputs:
    """One video or image processed once: its pixel tensors and the placeholder run it expands to in a prompt.

    Make it with `prepare_media`; `tokenize` turns prompts that hold its placeholder (once) into token ids without
    touching the pixels again, exactly as `processor(text=prompt, videos=...)` would.
    """

    kind: str  # "video" or "image"
    source: object  # the DecodedVideo, or the image as given
    pixels: dict  # model inputs without the ids: pixel_values_videos / hiera_pixel_values_videos, or image tensors
    num_tokens: int  # placeholder tokens of the item (SigLIP + Hiera)
    visual_tokens: dict  # {"siglip", "hiera"}
    overrides: dict  # token-ratio overrides the processor was called with (they reach the model as
    # `pixels["video_token_ratio"]`, the processor's per-video carrier, never as separate model arguments)
    placeholder: str  # "<video>" or "<image>"
    placeholder_id: int
    metadata: object = None  # the video's VideoMetadata (timing), None for images
    processor_kwargs: dict = field(default_factory=dict)  # what the processor was called with (num_frames, ...)

    def tokenize(self, processor, prompts: list[str]) -> list[list[int]]:
        """Token ids of `prompts`, each holding this item's placeholder once, expanded as the processor does."""
        for prompt in prompts:
            if prompt.count(self.placeholder) != 1:
                raise ValueError(f"Each prompt needs exactly one {self.placeholder}; got {prompt.count(self.placeholder)}.")
        run = self.placeholder * self.num_tokens
        replacements = {"videos_replacements" if self.kind == "video" else "images_replacements": [run] * len(prompts)}
        expanded, _ = processor.get_text_with_replacements(list(prompts), **replacements)
        return [list(ids) for ids in processor.tokenizer(expanded, padding=False)["input_ids"]]


def prepare_media(model, processor, *, video=None, image=None, num_frames: int | None = None,
                  fast_decode: bool = False, **overrides) -> MediaInputs:
    """Read and preprocess one video (path, file object, decoded frames or `DecodedVideo`) or one image (path or
    PIL image / array) once. Missing files are a `UsageError`. Token-ratio `overrides` as in the processor."""
    if (video is None) == (image is None):
        raise UsageError("Give exactly one of a video or an image.")
    for value, argument in ((video, "video"), (image, "image")):
        if isinstance(value, (str, Path)) and not Path(value).is_file():
            raise UsageError(f"{argument} {str(value)!r}: no such file.", argument=argument)
    overrides = {name: value for name, value in overrides.items() if value is not None}
    try:
        return _prepare_media(model, processor, video, image, num_frames, fast_decode, overrides)
    except (ValueError, OSError) as error:  # an unreadable file, a bad setting: the user's to fix
        raise UsageError(str(error)) from error


def _prepare_media(model, processor, video, image, num_frames, fast_decode, overrides) -> MediaInputs:
    if video is not None:
        from ..video_loading_vica2 import DecodedVideo

        if not isinstance(video, DecodedVideo) and isinstance(video, (str, Path)):
            video = processor.load_video(str(video), num_frames=num_frames, fast_decode=fast_decode, **overrides)
        kwargs = {"num_frames": num_frames} if num_frames is not None and not isinstance(video, DecodedVideo) else {}
        inputs = processor(text=[processor.video_token], videos=[video], return_tensors="pt", **kwargs, **overrides)
        kind, placeholder, placeholder_id = "video", processor.video_token, processor.video_token_id
        metadata = getattr(video, "metadata", None)
    else:
        from PIL import Image

        if isinstance(image, (str, Path)):
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        kwargs = {}
        inputs = processor(text=[processor.image_token], images=[image], return_tensors="pt", **overrides)
        kind, placeholder, placeholder_id = "image", processor.image_token, processor.image_token_id
        metadata = None
    ids = inputs.pop("input_ids")
    inputs.pop("attention_mask", None)
    pixels = inputs_to_model(inputs, model)
    return MediaInputs(
        kind=kind, source=video if video is not None else image, pixels=pixels,
        num_tokens=int((ids == placeholder_id).sum()), visual_tokens=visual_token_counts(model.config, pixels),
        overrides=overrides, placeholder=placeholder, placeholder_id=placeholder_id, metadata=metadata,
        processor_kwargs=kwargs,
    )


# ---------------------------------------------------------------------------------------------------- the prefix
def common_prefix_length(sequences: list[list[int]]) -> int:
    """Length of the longest common prefix of token-id sequences."""
    if not sequences:
        return 0
    first, length = sequences[0], min(len(s) for s in sequences)
    for other in sequences[1:]:
        end = 0
        while end < length and other[end] == first[end]:
            end += 1
        length = end
    return length


def reusable_prefix_length(sequences: list[list[int]], media: MediaInputs | None,
                           cached: list[int] | None = None) -> int:
    """How many leading tokens the sequences can share from one cache: their common prefix (and that of `cached`,
    the tokens a cache already holds, when given), leaving every sequence at least one token to run (generation
    needs its logits), and 0 when the prefix would end before the media's last placeholder (the towers' output must
    lie wholly inside the cache: e.g. a video after the question)."""
    shared = sequences if cached is None else [cached, *sequences]
    length = min(common_prefix_length(shared), min(len(s) for s in sequences) - 1)
    if length <= 0 or media is not None and any(media.placeholder_id in sequence[length:] for sequence in sequences):
        return 0
    return length


def cache_bytes_per_token(model) -> int:
    """Bytes of KV cache one prompt token takes: keys and values of every language-model layer, in the model's
    dtype (ViCA2-7B in bf16: 57 KiB)."""
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * model.dtype.itemsize


def _cache_name() -> str:
    from ..modeling_vica2 import CACHE_NAME  # `cache` in transformers >= 5.2x, `past_key_values` before

    return CACHE_NAME


def _truncate(cache, length: int) -> None:
    """Cut every layer of `cache` to its first `length` tokens. Layer by layer: a forward that failed half-way (out
    of memory, a bad input) leaves the first layers longer than the others, and a cut by one count would be wrong
    for some of them."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.dim() > 1 and layer.keys.shape[-2] > length:
            # negative counts mean "remove this many" in every supported transformers version (the meaning of a
            # positive count changed during 5.x; 5.17 read crop(0) as "keep nothing")
            layer.crop(length - layer.keys.shape[-2])


def check_continuation(model, sequences: list[list[int]], generate_kwargs: dict) -> None:
    """What generating from a cached prefix cannot do, refused before any work: beams and several return sequences
    (the cache holds one row per prompt; use `answer_prompts(..., reuse=False)` for them), and token ids outside
    the vocabulary (the model checks ids only at a prefill from an empty cache; a continuation is not one)."""
    config = model.generation_config
    for name in ("num_beams", "num_return_sequences"):
        value = generate_kwargs.get(name, getattr(config, name, 1)) or 1
        if value != 1:
            raise UsageError(f"{name}={value} is not supported when answering from a cached prefix (one row per "
                             f"prompt); use {name}=1, or answer_prompts(..., reuse=False) for {name} > 1.",
                             argument=name)
    vocab_size = model.get_input_embeddings().num_embeddings
    for sequence in sequences:
        if sequence and (min(sequence) < 0 or max(sequence) >= vocab_size):
            raise UsageError(f"input ids range from {min(sequence)} to {max(sequence)} but the vocabulary has "
                             f"{vocab_size} tokens (ids 0 to {vocab_size - 1}); tokenize with this model's processor.")


# New tokens per forward when a prompt continues a cache: with a cache, sdpa and eager attention get a (new tokens x
# context) mask (and eager a float score matrix per head), so one forward over a 10,000-token question asked for
# gigabytes; in chunks the cost is at most chunk x context.
PREFILL_CHUNK_TOKENS = 512


def check_chunk_tokens(chunk_tokens) -> int:
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise UsageError(f"prefill_chunk_tokens must be a positive whole number, got {chunk_tokens!r}.",
                         argument="prefill_chunk_tokens")
    return chunk_tokens


def prefill_in_chunks(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache,
                      chunk_tokens: int = PREFILL_CHUNK_TOKENS) -> None:
    """Run the tokens of `input_ids` that `cache` does not hold yet into it, `chunk_tokens` per forward, all but the
    last `chunk_tokens`, which `generate` then prefills. Causal attention shows each chunk exactly what it sees in
    one forward over all of them (same results up to float rounding). Text only: no pixels go with the chunks."""
    end = input_ids.shape[1] - check_chunk_tokens(chunk_tokens)
    with torch.inference_mode():
        for start in range(cache.get_seq_length(), end, chunk_tokens):
            stop = min(start + chunk_tokens, end)
            model(input_ids=input_ids[:, start:stop], attention_mask=attention_mask[:, :stop], use_cache=True,
                  logits_to_keep=1, **{_cache_name(): cache})


class EncodedPrefix:
    """A prompt prefix run once through the model (vision towers + language-model prefill), with its KV cache.

    `generate` answers continuations of it, each row getting exactly the positions and attention it would get in
    its full prompt: the cache is copied per row, and shorter continuations are padded *between* the prefix and
    the continuation (masked), so the prefix keeps positions 0..P-1 in every row and positions are counted from the
    attention mask. Greedy tokens then equal those of the full prompts run from scratch.
    """

    def __init__(self, model, input_ids: list[int], cache, visual_tokens: dict | None = None):
        self.model, self.input_ids, self.cache = model, list(input_ids), cache
        self.visual_tokens = visual_tokens or {"siglip": 0, "hiera": 0}

    @classmethod
    def encode(cls, model, input_ids: list[int], media: MediaInputs | None = None) -> EncodedPrefix:
        """Run `input_ids` (the prefix; holding the media's whole placeholder run, if any) through the model."""
        from transformers import DynamicCache

        ids = torch.tensor([input_ids], device=model.device)
        cache = DynamicCache()
        kwargs = media.pixels if media is not None and media.placeholder_id in input_ids else {}
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1,
                  **{_cache_name(): cache}, **kwargs)
        return cls(model, input_ids, cache, media.visual_tokens if kwargs else None)

    def __len__(self) -> int:
        return len(self.input_ids)

    def cache_bytes(self) -> int:
        """Bytes of the KV cache of one row."""
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values)
                   if t is not None)

    def rows_within(self, max_rows: int, max_cache_bytes: int | None) -> int:
        """Rows per batch: at most `max_rows`, and no more copies of the cache than `max_cache_bytes` holds (>= 1)."""
        if max_cache_bytes is None:
            return max(1, max_rows)
        return max(1, min(max_rows, max_cache_bytes // max(self.cache_bytes(), 1)))

    def cache_for(self, rows: int):
        """A copy of the cache for `rows` rows (generation appends to it; the prefix's own cache stays as it is)."""
        cache = copy.deepcopy(self.cache)
        if rows > 1:
            cache.batch_repeat_interleave(rows)
        return cache

    def generate(self, sequences: list[list[int]], *, pad_token_id: int, cache=None,
                 prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS, **generate_kwargs):
        """`model.generate` over full prompts that start with this prefix; returns (new token ids per row, output).

        `sequences` are whole prompts (prefix + continuation). `generate_kwargs` go to `generate` (max_new_tokens,
        do_sample, temperature, streamer, output_logits, return_dict_in_generate, ...). `cache` (default: a fresh
        copy of the prefix's) is the cache to generate into; it holds the prefix's rows' prefix on return.
        Continuations are prefilled at most `prefill_chunk_tokens` per forward (see `prefill_in_chunks`).
        """
        length = len(self.input_ids)
        for sequence in sequences:
            if len(sequence) <= length or list(sequence[:length]) != self.input_ids:
                raise ValueError("Every sequence must start with the encoded prefix and continue after it.")
        check_continuation(self.model, [s[length:] for s in sequences], generate_kwargs)
        rows, width = len(sequences), max(len(s) for s in sequences) - length
        device = self.model.device
        ids = torch.full((rows, length + width), pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        ids[:, :length] = torch.tensor(self.input_ids, device=device)
        mask[:, :length] = 1
        for row, sequence in enumerate(sequences):
            tail = torch.tensor(sequence[length:], device=device)
            ids[row, ids.shape[1] - len(tail):] = tail  # right-aligned: every row's new tokens start together
            mask[row, ids.shape[1] - len(tail):] = 1
        cache = self.cache_for(rows) if cache is None else cache
        prefill_in_chunks(self.model, ids, mask, cache, prefill_chunk_tokens)
        with torch.inference_mode():
            output = self.model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad_token_id,
                                         **{_cache_name(): cache}, **generate_kwargs)
        sequences_out = output if isinstance(output, torch.Tensor) else output.sequences
        return [row.tolist() for row in sequences_out[:, ids.shape[1]:]], output


# ---------------------------------------------------------------------------------------------------- answers
@dataclass
class Answer:
    """One answer: its text and new token ids, prompt and visual token counts, how much came from a cache."""

    text: str
    new_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from an encoded prefix (not prefilled for this answer)
    visual_tokens: dict = field(default_factory=lambda: {"siglip": 0, "hiera": 0})
    timings: dict = field(default_factory=dict)  # preprocess_s, encode_s, time_to_first_token_s, decode_tokens_per_s

    @property
    def new_tokens(self) -> int:
        return len(self.new_ids)


@dataclass
class ReuseStats:
    """What prefix reuse saved: prompts answered, prefixes encoded, tower runs and LM prefills of the prefix."""

    prompts: int = 0
    prefixes_encoded: int = 0  # one per media item and settings (each runs the towers once)
    tower_runs: int = 0
    prefills_saved: int = 0  # prompts whose prefix came from a cache instead of being prefilled again
    prefill_tokens: int = 0  # tokens run through the language model at prefill
    cached_tokens: int = 0  # prompt tokens read from a cache instead

    def add(self, other: ReuseStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _pad_id(processor) -> int:
    tokenizer = processor.tokenizer
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def answer_prompts(model, processor, prompts: list[str], media: MediaInputs | None, **kwargs) -> list[str]:
    """Generated text (raw, not stripped) for each of `prompts`, which all show the same `media` (or none).

    With `reuse=True` (default) their common token prefix is encoded once and they are answered from its cache in
    batches of `batch_size` rows (fewer if `max_cache_bytes` cannot hold that many cache copies). With
    `reuse=False` each batch runs from scratch, the towers included (left padding, as plain batched `generate`).
    Continuations of the prefix are prefilled at most `prefill_chunk_tokens` tokens per forward.
    Other keyword arguments go to `generate` (max_new_tokens, do_sample, ...); `stats` (a `ReuseStats`) is updated.
    """
    return [text for batch in iter_answer_prompts(model, processor, prompts, media, **kwargs) for text in batch]


def iter_answer_prompts(model, processor, prompts: list[str], media: MediaInputs | None, *, batch_size: int = 1,
                        reuse: bool = True, max_cache_bytes: int | None = None, stats: ReuseStats | None = None,
                        skip_special_tokens: bool = True, prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS,
                        **generate_kwargs) -> Iterator[list[str]]:
    """`answer_prompts`, one batch at a time (in prompt order), e.g. to save each batch as it is done."""
    stats = stats if stats is not None else ReuseStats()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive whole number, got {batch_size!r}.", argument="batch_size")
    if not prompts:
        return
    ids = media.tokenize(processor, prompts) if media is not None else [
        list(row) for row in processor.tokenizer(list(prompts), padding=False)["input_ids"]]
    length = reusable_prefix_length(ids, media) if reuse else 0
    stats.prompts += len(prompts)
    if length == 0:
        for start in range(0, len(prompts), batch_size):
            yield _generate_from_scratch(model, processor, ids[start:start + batch_size], media, stats,
                                         skip_special_tokens, **generate_kwargs)
        return
    check_continuation(model, [row[length:] for row in ids], generate_kwargs)  # before the prefix's work
    prefix = EncodedPrefix.encode(model, ids[0][:length], media)
    stats.prefixes_encoded += 1
    stats.tower_runs += int(media is not None)
    stats.prefill_tokens += length
    rows = prefix.rows_within(batch_size, max_cache_bytes)
    for start in range(0, len(ids), rows):
        batch = ids[start:start + rows]
        new_ids, _ = prefix.generate(batch, pad_token_id=_pad_id(processor), prefill_chunk_tokens=prefill_chunk_tokens,
                                     **generate_kwargs)
        stats.prefill_tokens += sum(len(s) - length for s in batch)
        stats.cached_tokens += length * len(batch)
        stats.prefills_saved += len(batch) - (start == 0)  # every prompt but the first skips the prefix's prefill
        yield processor.batch_decode(new_ids, skip_special_tokens=skip_special_tokens)


def _generate_from_scratch(model, processor, ids: list[list[int]], media: MediaInputs | None, stats: ReuseStats,
                           skip_special_tokens: bool, **generate_kwargs) -> list[str]:
    """Plain batched generation over whole prompts, left padded, the towers run for every row."""
    width = max(len(row) for row in ids)
    pad = _pad_id(processor)
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids], device=model.device)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], device=model.device)
    kwargs = {}
    if media is not None:
        kwargs = _repeated_pixels(media, len(ids))
        stats.tower_runs += len(ids)
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids, attention_mask=mask, pad_token_id=pad, **kwargs, **generate_kwargs)
    stats.prefill_tokens += sum(len(row) for row in ids)
    return processor.batch_decode(output[:, width:], skip_special_tokens=skip_special_tokens)


def _repeated_pixels(media: MediaInputs, rows: int) -> dict:
    """The media's pixel inputs for `rows` prompts that each show it (one item per row, as the processor makes)."""
    repeated = {}
    for name, value in media.pixels.items():
        if isinstance(value, torch.Tensor):
            repeated[name] = value.repeat(rows, *([1] * (value.dim() - 1))) if rows > 1 else value
        elif isinstance(value, list):
            repeated[name] = value * rows
        else:
            repeated[name] = value
    return repeated


# ---------------------------------------------------------------------------------------------------- streaming
def _text_streamer_class():
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        """Hands each finished piece of text to `on_text` and records when the first new token came."""

        def __init__(self, tokenizer, on_text: Callable[[str], None] | None):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.on_text, self.first_token_at, self._prompt_seen = on_text, None, False

        def put(self, value):
            if self._prompt_seen and self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            self._prompt_seen = True
            super().put(value)

        @staticmethod
        def _is_chinese_char(codepoint: int) -> bool:
            # TextStreamer releases text at once after these (else it waits for a space): let every token through,
            # holding back only an incomplete UTF-8 character (decoded as U+FFFD until its last byte arrives).
            return codepoint != 0xFFFD

        def on_finalized_text(self, text: str, stream_end: bool = False):
            if self.on_text is not None and text:
                self.on_text(text)

    return _Streamer


def _on_text(stream) -> Callable[[str], None] | None:
    """stream=True prints to stdout as text arrives; a callable receives each piece; None/False streams nothing."""
    if stream is True:
        return lambda text: print(text, end="", flush=True)
    return stream or None


def _timings(started: float, generate_started: float, streamer, done: float, new_tokens: int, **extra) -> dict:
    first = streamer.first_token_at or done
    return {
        **extra,
        "preprocess_s": generate_started - started,
        "time_to_first_token_s": first - generate_started,
        "decode_tokens_per_s": (new_tokens - 1) / (done - first) if done > first and new_tokens > 1 else float("nan"),
        "total_s": done - started,
    }


# ---------------------------------------------------------------------------------------------------- one-shot ask
def ask(model, processor, questions: str | list[str], *, video=None, image=None, frames: int | None = None,
        max_new_tokens: int = 64, stream=None, add_time_instruction: bool | None = None, fast_decode: bool = False,
        stats: ReuseStats | None = None, on_answer_start: Callable[[], None] | None = None,
        **overrides) -> list[Answer]:
    """Answer each of `questions` (independently, greedily) about one video or image, all from one encoded prefix.

    `stream`: True prints each answer as it is generated; a callable gets each piece of text. `on_answer_start` is
    called before each answer is generated (e.g. to print its question above a streamed answer). Token-ratio
    `overrides`: video_frames_budget, hiera_frames, siglip_pool_stride, hiera_pool_stride.
    """
    questions = [questions] if isinstance(questions, str) else list(questions)
    if not questions:
        raise UsageError("Give at least one question.")
    started = time.perf_counter()
    media = prepare_media(model, processor, video=video, image=image, num_frames=frames, fast_decode=fast_decode,
                          **overrides)
    prompts = [render_chat(processor, [user_message(media, q)], add_time_instruction) for q in questions]
    ids = media.tokenize(processor, prompts)
    length = reusable_prefix_length(ids, media)
    prepared = time.perf_counter()
    prefix = EncodedPrefix.encode(model, ids[0][:length], media)
    encoded = time.perf_counter()
    if stats is not None:
        stats.prompts += len(questions)
        stats.prefixes_encoded += 1
        stats.tower_runs += 1
        stats.prefills_saved += len(questions) - 1
    streamer_class = _text_streamer_class()
    answers = []
    for sequence in ids:
        if on_answer_start is not None:
            on_answer_start()
        start = time.perf_counter()
        streamer = streamer_class(processor.tokenizer, _on_text(stream))
        new_ids, _ = prefix.generate([sequence], pad_token_id=_pad_id(processor), max_new_tokens=max_new_tokens,
                                     do_sample=False, streamer=streamer)
        done = time.perf_counter()
        answers.append(Answer(
            text=processor.decode(new_ids[0], skip_special_tokens=True).strip(), new_ids=new_ids[0],
            prompt_tokens=len(sequence), cached_tokens=length, visual_tokens=dict(media.visual_tokens),
            # the first answer's time to first token includes encoding the prefix (towers + prefill)
            timings=_timings(start if answers else started, start if answers else prepared, streamer, done,
                             len(new_ids[0]), encode_s=0.0 if answers else encoded - prepared),
        ))
        if stream:
            _on_text(stream)("\n")
    return answers


def user_message(media: MediaInputs | None, question: str) -> dict:
    """A user turn showing `media` (first) and asking `question`, as the chat template renders it."""
    content = [{"type": "text", "text": question}]
    if media is not None:
        entry = {"type": "video", "video": media.source} if media.kind == "video" else {"type": "image"}
        content.insert(0, entry)
    return {"role": "user", "content": content}


def render_chat(processor, messages: list[dict], add_time_instruction: bool | None = None) -> str:
    """The prompt text of a conversation (ending with the assistant's turn to speak), one placeholder per item."""
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         add_time_instruction=add_time_instruction)


# ---------------------------------------------------------------------------------------------------- chat
@dataclass
class SessionStats:
    """Counters of a `ChatSession`: how often the towers ran and how many tokens were prefilled vs reused."""

    tower_runs: int = 0
    turns: int = 0
    prefill_tokens: int = 0  # prompt tokens run through the language model
    cached_tokens: int = 0  # prompt tokens read from the conversation's cache instead
    generated_tokens: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


DEFAULT_MAX_QUESTION_CHARS = 4000  # a question's prefill is quadratic in its length: bound it (a setting)


class SessionBusy(UsageError):
    """A `ChatSession` was used while another turn of it was running (from another thread): one turn at a time."""


class TurnCancelled(Exception):
    """A streamed turn was cancelled (`ChatSession.cancel`, or its `iter_ask` generator closed); the session is as
    it was before the turn."""


def check_question(question: str, max_chars: int | None = DEFAULT_MAX_QUESTION_CHARS) -> None:
    """A question a chat path will run: not empty, and at most `max_chars` characters (None: no limit).
    Front-ends may call it before anything else; `ChatSession.ask` does."""
    if not isinstance(question, str) or not question.strip():
        raise UsageError("Ask a question (the text is empty).", argument="question")
    if max_chars is not None and len(question) > max_chars:
        raise UsageError(f"question: {len(question):,} characters, over the limit of {max_chars:,} "
                         f"(max_question_chars='{max_chars}'); ask a shorter question or raise the limit.",
                         argument="question")


class ChatSession:
    """A conversation about one video or image; each turn continues from the conversation's KV cache.

    `set_video(path)` / `set_image(path)` encode the media once (towers + the prompt's shared prefix); `ask` renders
    the whole conversation with the chat template, keeps the cached tokens it shares with it (the longest common
    prefix of token ids), prefills only the rest and generates. `reset()` forgets the conversation and cuts the cache
    back to the encoded media prefix. Greedy answers equal those of the full conversation run from scratch.

    A turn that fails (out of memory, a bad input) or is cancelled leaves the session as it was before it. One turn
    runs at a time: a call from another thread while a turn runs raises `SessionBusy`. `max_question_chars` bounds a
    question's length (None: no limit); a question is prefilled at most `prefill_chunk_tokens` tokens per forward
    (bounding the attention mask; see `prefill_in_chunks`). Beams and several return sequences are refused (one
    cached row).

    Attributes: `stats` (`SessionStats`), `history` (the messages so far), `media` (`MediaInputs` or None),
    `last_answer` (the latest `Answer`), `encode_s` (seconds the last media encoding took).
    """

    def __init__(self, model, processor, *, num_frames: int | None = None, fast_decode: bool = False,
                 add_time_instruction: bool | None = None, max_new_tokens: int = 256,
                 max_question_chars: int | None = DEFAULT_MAX_QUESTION_CHARS,
                 prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS, **overrides):
        self.model, self.processor = model, processor
        self.prefill_chunk_tokens = check_chunk_tokens(prefill_chunk_tokens)
        self.num_frames, self.fast_decode, self.add_time_instruction = num_frames, fast_decode, add_time_instruction
        self.max_new_tokens, self.max_question_chars = max_new_tokens, max_question_chars
        self.overrides = {name: value for name, value in overrides.items() if value is not None}
        self.media: MediaInputs | None = None
        self.history: list[dict] = []
        self.stats = SessionStats()
        self.last_answer: Answer | None = None
        self.encode_s = 0.0
        self._ids: list[int] = []  # the tokens whose keys/values `_cache` holds
        self._cache = None
        self._prefix_length = 0  # tokens of the encoded media prefix at the start of `_ids`
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._worker: threading.Thread | None = None

    # ------------------------------------------------------------------ one turn at a time
    @contextlib.contextmanager
    def _busy(self):
        if not self._lock.acquire(blocking=False):
            raise SessionBusy("This ChatSession is running another turn (from another thread, or a streamed answer "
                              "not finished or cancelled); wait for it, call cancel(), or use one session per thread.")
        try:
            yield
        finally:
            self._lock.release()

    def cancel(self) -> None:
        """Stop the streamed turn in flight (if any) and wait for its generation thread; the session is then as it
        was before that turn."""
        worker = self._worker
        if worker is not None:
            self._cancel.set()
            worker.join()

    # ------------------------------------------------------------------ media
    def set_video(self, video, *, encode: bool = True) -> MediaInputs:
        """Read `video` (path or decoded) and, with `encode`, run the towers and its prompt prefix now."""
        return self._set_media(video=video, encode=encode)

    def set_image(self, image, *, encode: bool = True) -> MediaInputs:
        """Read `image` (path or PIL image) and, with `encode`, run the towers and its prompt prefix now."""
        return self._set_media(image=image, encode=encode)

    def _set_media(self, encode: bool, **item) -> MediaInputs:
        with self._busy():
            start = time.perf_counter()
            media = prepare_media(self.model, self.processor, num_frames=self.num_frames,
                                  fast_decode=self.fast_decode, **item, **self.overrides)
            ids, cache = [], None
            if encode:  # the prefix every first question shares: the common part of two probe prompts
                probes = media.tokenize(self.processor, [self._render([user_message(media, q)]) for q in "AB"])
                length = reusable_prefix_length(probes, media)
                if length:
                    prefix = EncodedPrefix.encode(self.model, probes[0][:length], media)
                    ids, cache = prefix.input_ids, prefix.cache
                    self.stats.tower_runs += 1
                    self.stats.prefill_tokens += length
            # replaced only once the new media is encoded: a failure keeps the session as it was
            self.media, self.history, self._ids, self._cache, self._prefix_length = media, [], ids, cache, len(ids)
            self.encode_s = time.perf_counter() - start
            return media

    def implied_token_counts(self, **overrides) -> dict[str, int]:
        """Visual tokens the session's media (or a frame-budget video) gives with `overrides`, before running."""
        settings = {**self.overrides, **overrides}
        if self.media is not None and self.media.kind == "image":
            height, width = self.media.pixels["image_sizes"][0].tolist()
            return implied_token_counts(self.model.config, image_size=(height, width), **settings)
        frames = self.media.pixels["pixel_values_videos"][0].shape[0] if self.media is not None else self.num_frames
        return implied_token_counts(self.model.config, num_frames=frames, **settings)

    def reset(self) -> None:
        """Forget the conversation; the encoded media stays (the cache is cut back to exactly its prefix)."""
        with self._busy():
            self.history = []
            if self._cache is not None:
                _truncate(self._cache, self._prefix_length)
                self._ids = self._ids[: self._prefix_length]

    # ------------------------------------------------------------------ turns
    def ask(self, question: str, *, stream=None, max_new_tokens: int | None = None, **generate_kwargs) -> Answer:
        """The answer to `question` in this conversation. `stream`: True prints text as it comes, a callable gets
        each piece. `generate_kwargs` go to `generate` (do_sample, temperature, top_p, ...; default greedy)."""
        check_question(question, self.max_question_chars)
        with self._busy():
            return self._turn(question, stream, max_new_tokens, generate_kwargs)

    def _turn(self, question: str, stream, max_new_tokens: int | None, generate_kwargs: dict) -> Answer:
        started = time.perf_counter()
        messages = [*self.history, user_message(None if self.history else self.media, question)]
        text = self._render(messages)
        ids = (self.media.tokenize(self.processor, [text])[0] if self.media is not None
               else list(self.processor.tokenizer(text)["input_ids"]))
        # nothing is kept when the media's placeholders would not all be inside the cache (then the towers rerun)
        keep = reusable_prefix_length([ids], self.media, cached=self._ids)
        check_continuation(self.model, [ids[keep:]], generate_kwargs)
        streamer = _text_streamer_class()(self.processor.tokenizer, _on_text(stream))
        generate_started = time.perf_counter()
        sequence, cache = self._generate(ids, keep, streamer, max_new_tokens, generate_kwargs)
        done = time.perf_counter()
        new_ids = sequence[len(ids):]
        self._cache, self._ids = cache, sequence[: cache.get_seq_length()]
        answer_text = self.processor.decode(new_ids, skip_special_tokens=True)
        self.history = [*messages, {"role": "assistant", "content": [{"type": "text", "text": answer_text}]}]
        self.stats.turns += 1
        self.stats.tower_runs += int(keep == 0 and self.media is not None)
        self.stats.prefill_tokens += len(ids) - keep
        self.stats.cached_tokens += keep
        self.stats.generated_tokens += len(new_ids)
        self.last_answer = Answer(
            text=answer_text.strip(), new_ids=new_ids, prompt_tokens=len(ids), cached_tokens=keep,
            visual_tokens=dict(self.media.visual_tokens) if self.media is not None else {"siglip": 0, "hiera": 0},
            timings=_timings(started, generate_started, streamer, done, len(new_ids)),
        )
        return self.last_answer

    def _generate(self, ids: list[int], keep: int, streamer, max_new_tokens, generate_kwargs) -> tuple[list, object]:
        """(prompt + new token ids, the cache holding them) of one turn. When generation fails or is cancelled, the
        conversation's cache is cut back to the `keep` tokens it shares with this turn (layer by layer: a failed
        forward extends only some layers) and the error raised: the session is as before the turn."""
        from transformers import DynamicCache, StoppingCriteriaList

        if keep:
            cache, kwargs = self._cache, {}
        else:  # nothing reusable: run the whole prompt, the towers included, into a new cache
            cache, kwargs = DynamicCache(), (self.media.pixels if self.media is not None else {})
        input_ids = torch.tensor([ids], device=self.model.device)
        mask = torch.ones_like(input_ids)  # all ones: where the backend needs no mask, it builds none
        stopping = StoppingCriteriaList(generate_kwargs.pop("stopping_criteria", None) or [])
        stopping.append(lambda input_ids, scores, **_: torch.full((input_ids.shape[0],), self._cancel.is_set(),
                                                                   dtype=torch.bool, device=input_ids.device))
        try:
            if keep:
                _truncate(cache, keep)
            if not kwargs:  # no pixels in this forward: a long question goes in chunks
                prefill_in_chunks(self.model, input_ids, mask, cache, self.prefill_chunk_tokens)
            with torch.inference_mode():
                output = self.model.generate(
                    input_ids=input_ids, attention_mask=mask,
                    pad_token_id=_pad_id(self.processor), max_new_tokens=max_new_tokens or self.max_new_tokens,
                    streamer=streamer, stopping_criteria=stopping, **{"do_sample": False, **generate_kwargs},
                    **{_cache_name(): cache}, **kwargs)
            if self._cancel.is_set():
                raise TurnCancelled("the turn was cancelled")
        except BaseException:
            if keep:
                _truncate(self._cache, keep)
                self._ids = self._ids[:keep]
            raise
        sequence = output if isinstance(output, torch.Tensor) else output.sequences
        return sequence[0].tolist(), cache

    def iter_ask(self, question: str, **kwargs) -> Iterator[str]:
        """`ask`, streamed: yields pieces of the answer's text as they are generated; afterwards `last_answer`
        holds the whole `Answer` (and it is the generator's return value). Closing the generator early (or
        `cancel()`) stops the generation and waits for its thread: the session is then as before the turn."""
        check_question(question, self.max_question_chars)
        pieces: queue.Queue = queue.Queue()
        outcome: dict = {}
        self._cancel.clear()

        def run():
            try:
                outcome["answer"] = self.ask(question, stream=pieces.put, **kwargs)
            except BaseException as error:  # re-raised in the caller's thread
                outcome["error"] = error
            finally:
                pieces.put(None)

        worker = threading.Thread(target=run, daemon=True)
        self._worker = worker
        worker.start()
        try:
            while (piece := pieces.get()) is not None:
                yield piece
        finally:  # also when the consumer stops early (GeneratorExit): stop generating before anything else runs
            if worker.is_alive():
                self._cancel.set()
            worker.join()
            self._worker = None
            self._cancel.clear()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["answer"]

    def _render(self, messages: list[dict]) -> str:
        return render_chat(self.processor, messages, self.add_time_instruction)


__all__ = [
    "UsageError", "DTYPE_NAMES", "load_model_and_processor", "register_installed_classes", "check_model_path",
    "check_device", "inputs_to_model", "implied_token_counts", "visual_token_counts", "MediaInputs", "prepare_media",
    "common_prefix_length", "reusable_prefix_length", "cache_bytes_per_token", "EncodedPrefix", "Answer", "ReuseStats",
    "answer_prompts", "iter_answer_prompts", "ask", "user_message", "render_chat", "SessionStats", "ChatSession",
    "SessionBusy", "TurnCancelled", "check_question", "check_continuation", "DEFAULT_MAX_QUESTION_CHARS",
]
