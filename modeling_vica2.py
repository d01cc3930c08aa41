# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""ViCA2: SigLIP (semantics) + SAM2.1 Hiera (spatial structure) in front of a Qwen2 language model.

The towers and the language model are the library's own (`SiglipVisionModel`, `Sam2HieraDetModel`,
`Qwen2Model`); this file is the composition: per-stream features, video pooling, newline rows, the
[SigLIP ; Hiera] concatenation of each visual item, and the placeholder merge. See SPEC.md for what
the research release computes; every step below reproduces it.
"""

from __future__ import annotations

import copy
import inspect
import logging as std_logging
import math
import numbers
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model
from transformers.utils import logging

from .configuration_vica2 import (
    Vica2Config,
    anyres_feature_shape,
    anyres_max_patches,
    TOKEN_RATIO_ARGS,
    check_frame_ratio,
    pooled_grid,
    positive_int,
)
from .kernels_vica2 import ATTENTION_NAME as FUSED_ATTENTION, register_vica2_attention, use_fused_hiera_blocks


logger = logging.get_logger(__name__)

# `attn_implementation="vica2_fused"` (kernels_vica2.py): Triton attention for Qwen2, SigLIP and Hiera.
register_vica2_attention()

# transformers renamed the KV-cache argument and output field from `past_key_values` to `cache` during 5.x;
# speak whichever name the installed library uses (5.17 .. 5.2x are supported).
CACHE_NAME = "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else "past_key_values"

# Hiera pixel inputs are ours, so `generate` does not know to drop them after prefill (it does for the
# standard `pixel_values*` / `image_sizes` names).
HIERA_PIXEL_INPUTS = ("hiera_pixel_values", "hiera_pixel_values_videos")

VISUAL_INPUTS = (
    "pixel_values",
    "image_sizes",
    "hiera_pixel_values",
    "pixel_values_videos",
    "hiera_pixel_values_videos",
    "video_token_ratio",
)

# bitsandbytes' 8-bit matmul says it casts its (float32 / bfloat16) inputs to float16 on every call of every quantized
# Linear: hundreds of identical lines per forward. Once is enough; only that message is deduplicated.
BNB_CAST_MESSAGE = "MatMul8bitLt: inputs will be cast"


class _FirstRecordOnly(std_logging.Filter):
    """Lets the first log record starting with `prefix` through and drops its repeats; others pass untouched."""

    vica2_once_filter = True  # marker: remote code may import this file more than once, so isinstance won't do

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: std_logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        if self.seen:
            return False
        self.seen = True
        return True


def _show_bnb_cast_warning_once() -> None:
    bnb_logger = std_logging.getLogger("bitsandbytes.autograd._functions")  # bitsandbytes 0.50 logs it
    if not any(getattr(f, "vica2_once_filter", False) for f in bnb_logger.filters):
        bnb_logger.addFilter(_FirstRecordOnly(BNB_CAST_MESSAGE))
    warnings.filterwarnings("once", message=BNB_CAST_MESSAGE)  # up to 0.49 it used `warnings.warn`


_show_bnb_cast_warning_once()


@dataclass
class Vica2ModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus the visual features that were merged into the sequence."""

    image_hidden_states: list[torch.Tensor] | None = None
    video_hidden_states: list[torch.Tensor] | None = None


@dataclass
class Vica2CausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the visual features that were merged into the sequence."""

    image_hidden_states: list[torch.Tensor] | None = None
    video_hidden_states: list[torch.Tensor] | None = None


class Vica2PreTrainedModel(PreTrainedModel):
    config_class = Vica2Config
    base_model_prefix = "model"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    # A visual item's features are computed tower-block by tower-block; keep each block whole on one device.
    _no_split_modules = [
        "Qwen2DecoderLayer",
        "SiglipEncoderLayer",
        "SiglipVisionEmbeddings",
        "Sam2MultiScaleBlock",
        "Vica2FusedHieraBlock",
    ]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    # Modules that stay in full precision when the language model is quantized (bitsandbytes 4/8-bit): the vision
    # towers are small next to the LLM and sensitive, the projectors and the head carry every token.
    vision_module_names = ("vision_tower", "hiera_tower", "multi_modal_projector", "hiera_projector")

    @classmethod
    def quantization_skip_modules(cls) -> list[str]:
        """Full module-name prefixes that bitsandbytes must not quantize (for `llm_int8_skip_modules`)."""
        prefix = "model." if cls.base_model_prefix and issubclass(cls, GenerationMixin) else ""
        names = [prefix + name for name in cls.vision_module_names]
        return names + (["lm_head"] if prefix else [])

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # A BitsAndBytesConfig without its own skip list would quantize the vision towers too; keep them (and the
        # head) in full precision unless the caller chose otherwise.
        quantization_config = kwargs.get("quantization_config")
        if getattr(quantization_config, "quant_method", None) == "bitsandbytes" and not getattr(
            quantization_config, "llm_int8_skip_modules", None
        ):
            quantization_config = copy.deepcopy(quantization_config)
            quantization_config.llm_int8_skip_modules = cls.quantization_skip_modules()
            kwargs["quantization_config"] = quantization_config
        return super().from_pretrained(*args, **kwargs)

    def _init_weights(self, module):
        # The towers and the language model are PreTrainedModels and initialise themselves.
        super()._init_weights(module)
        if isinstance(module, Vica2Model) and module.image_newline is not None:
            init.normal_(module.image_newline, mean=0.0, std=1 / math.sqrt(self.config.text_config.hidden_size))


class Vica2MultiModalProjector(nn.Module):
    """Linear -> activation -> Linear into the language model's width (the release's `mlp2x_gelu`)."""

    def __init__(self, in_features: int, hidden_size: int, hidden_act: str):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.act = ACT2FN[hidden_act]
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


def pool_video_features(features: torch.Tensor, stride: int, mode: str) -> torch.Tensor:
    """Spatially pool (T, h, w, C) frame features as the release's `get_2dPool` does."""
    if stride == 1:
        return features
    height, width = features.shape[1:3]
    size = (pooled_grid(height, stride, mode), pooled_grid(width, stride, mode))  # also rejects a too-large stride
    features = features.permute(0, 3, 1, 2)
    if mode == "bilinear":
        features = F.interpolate(features, size=size, mode="bilinear", align_corners=False)
    elif mode == "average":
        features = F.avg_pool2d(features, stride)
    elif mode == "max":
        features = F.max_pool2d(features, stride)
    else:
        raise ValueError(f"Unknown video_pool_mode {mode!r}.")
    return features.permute(0, 2, 3, 1)


def newline_rows(features: torch.Tensor, newline: torch.Tensor | None) -> torch.Tensor:
    """(T, h, w, C) -> (T * h * (w + 1), C): frame by frame, row by row, each row followed by `newline`."""
    frames, height, width, channels = features.shape
    if newline is not None:
        newline = newline.to(features.device, features.dtype).expand(frames, height, 1, channels)
        features = torch.cat([features, newline], dim=2)
    return features.reshape(-1, channels)


def _as_item_list(pixels, name: str, channels: int, size: int) -> list[torch.Tensor]:
    """Accept a (N, T, C, H, W) tensor or a list of (T, C, H, W) tensors; check the per-frame shape."""
    items = list(pixels.unbind(0)) if isinstance(pixels, torch.Tensor) and pixels.dim() == 5 else pixels
    if isinstance(items, torch.Tensor) or not isinstance(items, (list, tuple)):
        raise ValueError(
            f"`{name}` must be a (num_items, frames, {channels}, {size}, {size}) tensor or a list of "
            f"(frames, {channels}, {size}, {size}) tensors, got {_describe(pixels)}. Use the Vica2Processor."
        )
    for item in items:
        if not isinstance(item, torch.Tensor) or item.dim() != 4 or tuple(item.shape[1:]) != (channels, size, size):
            raise ValueError(
                f"`{name}` items must be (frames, {channels}, {size}, {size}) tensors, got {_describe(item)}. "
                "Use the Vica2Processor to prepare the pixels."
            )
        if item.shape[0] == 0:
            raise ValueError(f"`{name}` holds an item with zero frames.")
    _check_pixel_values(items, name)
    return list(items)


def _check_pixel_values(items: list[torch.Tensor], name: str) -> None:
    """Pixels must be normalised floats: raw uint8 frames would be cast to float unscaled (wrong features), and one
    NaN / inf spreads to every logit (greedy decoding then emits id 0 forever). One reduction per item, at prefill."""
    for item in items:
        if not item.is_floating_point():
            raise TypeError(
                f"`{name}` has dtype {item.dtype}; the model takes normalised floating-point pixels (float32, "
                "bfloat16 or float16), not raw image values. Prepare images and videos with the Vica2Processor, "
                "which rescales and normalises them."
            )
    bad = [index for index, item in enumerate(items) if not torch.isfinite(item.sum(dtype=torch.float32))]
    if bad:
        raise ValueError(
            f"`{name}` contains NaN or infinite values (item(s) {', '.join(map(str, bad))}); the model would "
            "produce NaN logits. Check the source frames or the code that made these pixels (the Vica2Processor "
            "never does)."
        )


def _image_size_list(image_sizes) -> list[tuple[int, int]]:
    """`image_sizes` as (height, width) pairs of positive integers; anything else is named, not a deep shape error."""
    sizes = image_sizes.tolist() if hasattr(image_sizes, "tolist") else image_sizes  # a tensor or numpy array
    pairs = list(sizes) if isinstance(sizes, (list, tuple)) else []
    if not pairs:
        raise ValueError(f"`image_sizes` must be a (num_images, 2) tensor of (height, width); got {sizes!r}.")
    for index, size in enumerate(pairs):
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(map(_is_positive_integer, size))):
            raise ValueError(
                f"`image_sizes` must hold each image's original (height, width) in pixels, positive integers; item "
                f"{index} is {size!r}. Pass the Vica2Processor's `image_sizes` unchanged (an empty image cannot be "
                "used)."
            )
    return [(int(height), int(width)) for height, width in pairs]


def _is_positive_integer(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value >= 1 and float(value).is_integer()


def _setting(name: str, value, default: int) -> int:
    """A per-call integer setting (a plain int, or the 0-d tensor a BatchFeature makes of it), else the default."""
    return default if value is None else positive_int(name, value)


def _per_video_ratio(video_token_ratio, num_videos: int, scalar_settings: tuple) -> list[tuple]:
    """The (video_frames_budget, hiera_frames, siglip_pool_stride, hiera_pool_stride) of each video: the rows of
    `video_token_ratio` when given (None entries fall back to the config), else the scalar settings for all."""
    if video_token_ratio is None:
        return [scalar_settings] * num_videos
    rows = video_token_ratio.tolist() if isinstance(video_token_ratio, torch.Tensor) else list(video_token_ratio)
    if len(rows) != num_videos or any(len(row) != len(TOKEN_RATIO_ARGS) for row in rows):
        raise ValueError(
            f"`video_token_ratio` must hold one row of {len(TOKEN_RATIO_ARGS)} settings ({', '.join(TOKEN_RATIO_ARGS)}) "
            f"per video; got {_describe(video_token_ratio)} for {num_videos} video(s). Use the Vica2Processor."
        )
    return [tuple(row) for row in rows]


def _describe(value) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


class Vica2Model(Vica2PreTrainedModel):
    """The towers, the two projectors, `image_newline` and the language model (no LM head)."""

    # No `_keys_to_ignore_on_load_unexpected` here: transformers merges a child's patterns into its parent's, and
    # loaders that read the merged list (vLLM's Transformers backend) then skipped `lm_head.weight` of the full model
    # silently, leaving the head uninitialised. Only the base model, loaded by itself, leaves the head behind.

    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        # Called on the model being loaded only (never on a child), so this quiets the head of a full checkpoint
        # when the base model alone is loaded, and nothing else.
        super()._adjust_missing_and_unexpected_keys(loading_info)
        loading_info.unexpected_keys = {k for k in loading_info.unexpected_keys if not k.startswith("lm_head.")}

    def __init__(self, config: Vica2Config):
        super().__init__(config)
        hidden_size = config.text_config.hidden_size
        self.vision_tower = AutoModel.from_config(config.vision_config)
        # ViCA2 takes SigLIP's last encoder layer as it leaves that layer: no post-layernorm (nor pooling head).
        self.vision_tower.post_layernorm = nn.Identity()
        self.hiera_tower = AutoModel.from_config(config.hiera_config)
        if self.hiera_tower.config._attn_implementation == FUSED_ATTENTION:
            use_fused_hiera_blocks(self.hiera_tower)  # windowed attention without partition copies
        self.multi_modal_projector = Vica2MultiModalProjector(
            config.vision_config.hidden_size, hidden_size, config.projector_hidden_act
        )
        self.hiera_projector = Vica2MultiModalProjector(
            config.spatial_projector_input_size, hidden_size, config.projector_hidden_act
        )
        # One learned vector ends every feature row of both streams.
        self.image_newline = nn.Parameter(torch.empty(hidden_size)) if config.use_image_newline else None
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    # ------------------------------------------------------------------------------------- tower streams
    def _siglip_frames(self, pixel_values: torch.Tensor, chunk_size: int, pool_stride: int = 1) -> torch.Tensor:
        """(N, 3, 384, 384) -> projected (and, for videos, pooled) features (N, h, w, H), `chunk_size` at a time."""
        grid, mode = self.config.siglip_grid, self.config.video_pool_mode
        dtype = self.vision_tower.embeddings.patch_embedding.weight.dtype
        outputs = []
        for chunk in pixel_values.split(chunk_size):
            features = self.vision_tower(pixel_values=chunk.to(dtype)).last_hidden_state
            features = self.multi_modal_projector(features).unflatten(1, (grid, grid))
            outputs.append(pool_video_features(features, pool_stride, mode))
        return torch.cat(outputs)

    def _hiera_frames(self, pixel_values: torch.Tensor, chunk_size: int, pool_stride: int = 1) -> torch.Tensor:
        """(N, 3, 1024, 1024) -> projected (and, for videos, pooled) stage features (N, g, g, H)."""
        stage, mode = self.config.hiera_feature_stage, self.config.video_pool_mode
        dtype = self.hiera_tower.patch_embed.projection.weight.dtype
        outputs = []
        for chunk in pixel_values.split(chunk_size):
            features = self.hiera_tower(pixel_values=chunk.to(dtype)).intermediate_hidden_states[stage - 1]
            features = self.hiera_projector(features)
            outputs.append(pool_video_features(features, pool_stride, mode))
        return torch.cat(outputs)

    # ------------------------------------------------------------------------------------- videos
    def get_video_features(
        self,
        pixel_values_videos,
        hiera_pixel_values_videos,
        video_frames_budget: int | None = None,
        hiera_frames: int | None = None,
        siglip_pool_stride: int | None = None,
        hiera_pool_stride: int | None = None,
        vision_chunk_size: int | None = None,
        video_token_ratio: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> list[torch.Tensor] | BaseModelOutputWithPooling:
        """The token sequence of each video: [SigLIP tokens ; Hiera tokens], each stream in newline rows.

        Args:
            pixel_values_videos: (num_videos, T, 3, 384, 384) or a list of (T_i, 3, 384, 384) SigLIP pixels.
            hiera_pixel_values_videos: the Hiera pixels (…, 3, 1024, 1024) of the same videos, either all T frames
                (every k-th is encoded) or already the ceil(T / k) encoded frames.
            video_frames_budget, hiera_frames: k = video_frames_budget / hiera_frames (defaults: config, 64 / 32).
            siglip_pool_stride, hiera_pool_stride: spatial pool strides (defaults: config, 2 and 2).
            vision_chunk_size: frames per tower forward (default: config); does not change the result.
            video_token_ratio: (num_videos, 4) per-video (video_frames_budget, hiera_frames, siglip_pool_stride,
                hiera_pool_stride), as the processor returns them; takes the place of the four settings above, so
                that videos prepared with different settings can share one call (a serving engine batches them).
            return_dict: return a `BaseModelOutputWithPooling` whose `pooler_output` is the list (serving engines
                ask for it).

        Returns:
            A list with one (T * p * (p + 1) + ceil(T / k) * q * (q + 1), hidden_size) tensor per video.
        """
        scalar_settings = (video_frames_budget, hiera_frames, siglip_pool_stride, hiera_pool_stride)
        chunk_size = self._chunk_size(vision_chunk_size)
        siglip_size, hiera_size = self.config.vision_config.image_size, self._hiera_image_size()
        videos = _as_item_list(pixel_values_videos, "pixel_values_videos", 3, siglip_size)
        hiera_videos = _as_item_list(hiera_pixel_values_videos, "hiera_pixel_values_videos", 3, hiera_size)
        if len(videos) != len(hiera_videos):
            raise ValueError(
                f"Got SigLIP pixels for {len(videos)} videos but Hiera pixels for {len(hiera_videos)}; pass both for "
                "every video (the Vica2Processor returns `pixel_values_videos` and `hiera_pixel_values_videos`)."
            )
        rows = _per_video_ratio(video_token_ratio, len(videos), scalar_settings)
        features = []
        for video, hiera_video, row in zip(videos, hiera_videos, rows):
            settings = self._token_ratio(*row)
            hiera_video = self._hiera_video_frames(video.shape[0], hiera_video, settings["frame_stride"])
            siglip = self._siglip_frames(video, chunk_size, settings["siglip_pool_stride"])
            hiera = self._hiera_frames(hiera_video, chunk_size, settings["hiera_pool_stride"])
            features.append(torch.cat([newline_rows(siglip, self.image_newline), newline_rows(hiera, self.image_newline)]))
        return BaseModelOutputWithPooling(pooler_output=features) if return_dict else features

    def _hiera_video_frames(self, num_frames: int, hiera_video: torch.Tensor, frame_stride: int) -> torch.Tensor:
        """The frames Hiera encodes: every `frame_stride`-th of the video's frames."""
        num_encoded = math.ceil(num_frames / frame_stride)
        if hiera_video.shape[0] == num_frames:
            return hiera_video[::frame_stride]
        if hiera_video.shape[0] == num_encoded:
            return hiera_video
        raise ValueError(
            f"A video has {num_frames} SigLIP frames but {hiera_video.shape[0]} Hiera frames; Hiera needs either all "
            f"{num_frames} frames or the {num_encoded} it encodes (every {frame_stride}-th). Prepare both with the "
            "same processor call and the same token-ratio settings."
        )

    def _token_ratio(self, video_frames_budget, hiera_frames, siglip_pool_stride, hiera_pool_stride) -> dict:
        config = self.config
        budget = _setting("video_frames_budget", video_frames_budget, config.video_frames_budget)
        frames = _setting("hiera_frames", hiera_frames, config.hiera_frames)
        return {
            "frame_stride": check_frame_ratio(budget, frames),
            "siglip_pool_stride": _setting("siglip_pool_stride", siglip_pool_stride, config.siglip_pool_stride),
            "hiera_pool_stride": _setting("hiera_pool_stride", hiera_pool_stride, config.hiera_pool_stride),
        }

    def _chunk_size(self, vision_chunk_size) -> int:
        return _setting("vision_chunk_size", vision_chunk_size, self.config.vision_chunk_size)

    def _hiera_image_size(self) -> int:
        size = self.config.hiera_config.image_size
        return size[0] if isinstance(size, (list, tuple)) else size

    # ------------------------------------------------------------------------------------- images
    def get_image_features(
        self,
        pixel_values,
        image_sizes,
        hiera_pixel_values,
        vision_chunk_size: int | None = None,
        return_dict: bool | None = None,
    ) -> list[torch.Tensor] | BaseModelOutputWithPooling:
        """The token sequence of each image: [SigLIP tokens ; Hiera tokens].

        SigLIP: the base view's 27 x 27 tokens (no newline), then the anyres tiles' feature map unpadded to the
        image's aspect ratio (downscaled past `anyres_max_N` base views) in newline rows. Hiera: the single image,
        not pooled, in newline rows.

        Args:
            pixel_values: (num_images, max_tiles, 3, 384, 384) zero-padded, or a list of (tiles_i, 3, 384, 384);
                tile 0 is the whole image squashed to 384 x 384, then the grid tiles row by row.
            image_sizes: (num_images, 2) original (height, width) of each image.
            hiera_pixel_values: (num_images, 3, 1024, 1024) (or a list of (1, 3, 1024, 1024)).
            vision_chunk_size: tiles per tower forward (default: config).
            return_dict: return a `BaseModelOutputWithPooling` whose `pooler_output` is the list.

        Returns:
            A list with one (num_tokens_i, hidden_size) tensor per image.
        """
        chunk_size = self._chunk_size(vision_chunk_size)
        siglip_size, hiera_size = self.config.vision_config.image_size, self._hiera_image_size()
        image_sizes = _image_size_list(image_sizes)
        if isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 4 and len(image_sizes) == 1:
            pixel_values = pixel_values[None]
        if isinstance(hiera_pixel_values, torch.Tensor) and hiera_pixel_values.dim() == 4:
            hiera_pixel_values = hiera_pixel_values[:, None]
        images = _as_item_list(pixel_values, "pixel_values", 3, siglip_size)
        hiera_images = _as_item_list(hiera_pixel_values, "hiera_pixel_values", 3, hiera_size)
        if not len(images) == len(hiera_images) == len(image_sizes):
            raise ValueError(
                f"Got {len(images)} images in `pixel_values`, {len(hiera_images)} in `hiera_pixel_values` and "
                f"{len(image_sizes)} `image_sizes`; each image needs all three."
            )
        features = []
        for tiles, hiera_image, (height, width) in zip(images, hiera_images, image_sizes):
            if hiera_image.shape[0] != 1:
                raise ValueError(f"An image has {hiera_image.shape[0]} Hiera frames; it must have exactly one.")
            siglip = self._anyres_tokens(tiles, int(height), int(width), chunk_size)
            hiera = newline_rows(self._hiera_frames(hiera_image, chunk_size), self.image_newline)
            features.append(torch.cat([siglip, hiera]))
        return BaseModelOutputWithPooling(pooler_output=features) if return_dict else features

    def _anyres_tokens(self, tiles: torch.Tensor, height: int, width: int, chunk_size: int) -> torch.Tensor:
        config = self.config
        grid = config.siglip_grid
        (rows, cols), (unpadded_h, unpadded_w), downscaled = anyres_feature_shape(
            height,
            width,
            config.image_grid_pinpoints,
            config.vision_config.image_size,
            grid,
            anyres_max_patches(config.vision_aspect_ratio),
        )
        num_tiles = 1 + rows * cols
        if tiles.shape[0] < num_tiles or tiles[num_tiles:].any():
            raise ValueError(
                f"An image of size (height={height}, width={width}) is tiled into 1 + {rows}x{cols} = {num_tiles} "
                f"views, but its `pixel_values` hold {tiles.shape[0]} (non-padding) views. Prepare images with the "
                "Vica2Processor and pass its `image_sizes` unchanged."
            )
        features = self._siglip_frames(tiles[:num_tiles], chunk_size)  # (tiles, 27, 27, H)
        base, grid_tiles = features[0].flatten(0, 1), features[1:]
        # (rows * cols, 27, 27, H) -> one (rows * 27, cols * 27, H) map, tiles placed row by row.
        feature_map = grid_tiles.view(rows, cols, grid, grid, -1).permute(0, 2, 1, 3, 4).flatten(0, 1).flatten(1, 2)
        top = (feature_map.shape[0] - unpadded_h) // 2
        left = (feature_map.shape[1] - unpadded_w) // 2
        feature_map = feature_map[top : top + unpadded_h, left : left + unpadded_w]
        if downscaled is not None:
            feature_map = F.interpolate(
                feature_map.permute(2, 0, 1)[None], size=downscaled, mode="bilinear", align_corners=False
            )[0].permute(1, 2, 0)
        return torch.cat([base, newline_rows(feature_map[None], self.image_newline)])

    # ------------------------------------------------------------------------------------- merge
    def _merge_placeholders(self, input_ids, inputs_embeds, features: list[torch.Tensor], token_id: int, kind: str):
        """Scatter the items' tokens into the placeholder positions (one placeholder per visual token)."""
        mask = self._placeholder_mask(input_ids, inputs_embeds, token_id)
        lengths = [item.shape[0] for item in features]
        _check_placeholder_runs(mask, lengths, kind)
        merged = torch.cat(features).to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1).to(inputs_embeds.device), merged)

    def _placeholder_mask(self, input_ids, inputs_embeds, token_id: int) -> torch.Tensor:
        if input_ids is not None:
            return input_ids == token_id
        placeholder = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
        return (inputs_embeds == placeholder).all(-1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values=None,
        image_sizes=None,
        hiera_pixel_values=None,
        pixel_values_videos=None,
        hiera_pixel_values_videos=None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        video_frames_budget: int | None = None,
        hiera_frames: int | None = None,
        siglip_pool_stride: int | None = None,
        hiera_pool_stride: int | None = None,
        vision_chunk_size: int | None = None,
        video_token_ratio: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> Vica2ModelOutputWithPast | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        cache = cache if cache is not None else past_key_values
        past_length = _cache_length(cache)
        if input_ids is not None:
            _check_input_ids(input_ids, self.get_input_embeddings(), past_length)
        input_shape = (input_ids if input_ids is not None else inputs_embeds).shape
        _check_attention_mask(attention_mask, input_shape, past_length)
        _check_position_ids(position_ids, input_shape)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_features = video_features = None
        if pixel_values is not None:
            if image_sizes is None or hiera_pixel_values is None:
                raise ValueError("Images need `pixel_values`, `image_sizes` and `hiera_pixel_values` together.")
            image_features = self.get_image_features(pixel_values, image_sizes, hiera_pixel_values, vision_chunk_size)
            inputs_embeds = self._merge_placeholders(
                input_ids, inputs_embeds, image_features, self.config.image_token_id, "image"
            )
        if pixel_values_videos is not None:
            if hiera_pixel_values_videos is None:
                raise ValueError("Videos need both `pixel_values_videos` and `hiera_pixel_values_videos`.")
            video_features = self.get_video_features(
                pixel_values_videos,
                hiera_pixel_values_videos,
                video_frames_budget,
                hiera_frames,
                siglip_pool_stride,
                hiera_pool_stride,
                vision_chunk_size,
                video_token_ratio,
            )
            inputs_embeds = self._merge_placeholders(
                input_ids, inputs_embeds, video_features, self.config.video_token_id, "video"
            )
        if input_ids is not None and past_length == 0:
            _check_no_orphan_placeholders(input_ids, self.config, image_features is not None, video_features is not None)

        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            position_ids = _positions_from_mask(attention_mask, inputs_embeds.shape[1], past_length)
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **{CACHE_NAME: cache},
            **kwargs,
        )
        output = Vica2ModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
            video_hidden_states=video_features,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )
        # Serving engines (vLLM's Transformers backend) call with return_dict=False and read output[0].
        return output if return_dict is None or return_dict else output.to_tuple()


def _cache_length(cache) -> int:
    return cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0


def _positions_from_mask(attention_mask: torch.Tensor, length: int, past_length: int) -> torch.LongTensor:
    """Positions that count only attended tokens, so a left-padded row gets the positions it has alone.

    For a right-padded batch (as in the release's training) this is 0..L-1 on every valid token.
    """
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, past_length : past_length + length] if positions.shape[1] != length else positions


def _check_placeholder_runs(mask: torch.Tensor, lengths: list[int], kind: str) -> None:
    """Each item must fill its own placeholders: the total count matches and no item straddles two runs."""
    flat = mask.flatten()
    num_placeholders = int(flat.sum())
    if num_placeholders != sum(lengths):
        raise ValueError(
            f"The prompt has {num_placeholders} `<{kind}>` placeholder tokens but the {len(lengths)} {kind}(s) give "
            f"{sum(lengths)} features ({', '.join(map(str, lengths))}). Expand each `<{kind}>` with the Vica2Processor, "
            "using the same frames and token-ratio settings as this call."
        )
    # Contiguous placeholder runs (a run may hold several adjacent items, never part of one).
    positions = flat.nonzero().flatten()
    if positions.numel() == 0:
        return
    breaks = ((positions[1:] - positions[:-1]) != 1).nonzero().flatten() + 1
    row_length = mask.shape[-1]
    row_breaks = ((positions[1:] // row_length) != (positions[:-1] // row_length)).nonzero().flatten() + 1
    boundaries = sorted(set(breaks.tolist()) | set(row_breaks.tolist()))
    item_ends = set(torch.tensor(lengths).cumsum(0).tolist())
    for boundary in boundaries:
        if boundary not in item_ends:
            raise ValueError(
                f"The `<{kind}>` placeholder runs in the prompt do not line up with the {kind} features "
                f"({', '.join(map(str, lengths))} tokens per {kind}): some {kind} would be split across runs. "
                "Give every item exactly its own expanded placeholder run, in order."
            )


def _check_no_orphan_placeholders(input_ids: torch.Tensor, config, has_images: bool, has_videos: bool) -> None:
    """Placeholders of a kind without that kind's pixels would silently be embedded as text; never what a caller
    wants (e.g. a `<video>` prompt given image pixels)."""
    kinds = [
        ("image", config.image_token_id, "`pixel_values`, `image_sizes`, `hiera_pixel_values`", has_images),
        ("video", config.video_token_id, "`pixel_values_videos`, `hiera_pixel_values_videos`", has_videos),
    ]
    for kind, token_id, names, has_pixels in kinds:
        if not has_pixels and bool((input_ids == token_id).any()):
            given = "no pixels were given" if not (has_images or has_videos) else f"no {kind} pixels were given"
            raise ValueError(
                f"`input_ids` contain `<{kind}>` placeholders but {given}; pass the processor's {names} along with "
                f"the ids (a {kind} must go in as {kind}s=, and its placeholder must be `<{kind}>`)."
            )


def _check_input_ids(input_ids, embeddings: nn.Module, past_length: int) -> None:
    """Integer ids inside the vocabulary: otherwise the embedding lookup fails deep inside torch (on CUDA as a
    device-side assert that breaks the whole process). The range is checked at prefill only (one reduction; the ids
    `generate` appends are the model's own)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"`input_ids` must be a torch tensor of token ids, got {type(input_ids).__name__}.")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(
            f"`input_ids` has dtype {input_ids.dtype}; token ids must be integers (torch.long). Use the ids the "
            "Vica2Processor / tokenizer returns, without converting them."
        )
    vocab_size = getattr(embeddings, "num_embeddings", None)
    if past_length or vocab_size is None or input_ids.numel() == 0:
        return
    low, high = (int(value) for value in torch.aminmax(input_ids))
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"`input_ids` hold ids from {low} to {high} but the vocabulary has {vocab_size} tokens (ids 0 to "
            f"{vocab_size - 1}). Tokenize with this checkpoint's processor; pad with its pad_token_id (-100 marks "
            "ignored labels, not input ids)."
        )


def _check_attention_mask(attention_mask, input_shape, past_length: int) -> None:
    """A 2-D mask covers the cached tokens and the new ones of every row; a wrong length would fail deep in the
    mask builder or shift positions. (Shape only: no cost per decoding step.)"""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return
    expected = (input_shape[0], past_length + input_shape[1])
    if tuple(attention_mask.shape) != expected:
        cached = f" after {past_length} cached token(s)" if past_length else ""
        raise ValueError(
            f"`attention_mask` has shape {tuple(attention_mask.shape)}, but the input is {input_shape[0]} row(s) of "
            f"{input_shape[1]} token(s){cached}: it must be {expected}. Pass the mask the processor / tokenizer "
            "returned with these ids."
        )


def _check_position_ids(position_ids, input_shape) -> None:
    """One position per new token (`generate` derives them from the attention mask, so a mask of the wrong length
    shows up here)."""
    if isinstance(position_ids, torch.Tensor) and position_ids.dim() >= 1 and position_ids.shape[-1] != input_shape[1]:
        raise ValueError(
            f"`position_ids` has shape {tuple(position_ids.shape)} but the input has {input_shape[1]} new token(s) per "
            "row. (With `generate` they come from `attention_mask`: it must have one entry per token of `input_ids`.)"
        )


def _check_generation_mask(attention_mask, input_shape, past_length: int) -> None:
    """`generate`'s mask covers `input_ids` (or, continuing from a cache, the cached tokens and the new ones); any
    other length would shift every position silently (an all-ones mask is dropped after positions are made)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return
    batch, length = input_shape[0], input_shape[1]
    allowed = {(batch, length)} | ({(batch, past_length + length)} if past_length else set())
    if tuple(attention_mask.shape) not in allowed:
        raise ValueError(
            f"`attention_mask` has shape {tuple(attention_mask.shape)} but `input_ids` has shape {(batch, length)}: "
            f"give one mask entry per token (the processor / tokenizer returns matching ids and mask)."
        )


def _row_major_item_order(input_ids, token_id: int, lengths: list[int], expand_size: int) -> list[int]:
    """Item indices in the order of rows repeated `expand_size` times, each copy holding its row's items."""
    if input_ids is None:  # no ids to read the rows from: one item per row, as the library assumes
        return [item for item in range(len(lengths)) for _ in range(expand_size)]
    per_row = (input_ids == token_id).sum(-1).tolist()
    order, item = [], 0
    for count in per_row:
        row_items = []
        while count > 0 and item < len(lengths):
            row_items.append(item)
            count -= lengths[item]
            item += 1
        order.extend(row_items * expand_size)
    return order


def _take_items(value, order: list[int]):
    if isinstance(value, torch.Tensor):
        return value.index_select(0, torch.tensor(order, device=value.device))
    return [value[index] for index in order]


class Vica2ForConditionalGeneration(Vica2PreTrainedModel, GenerationMixin):
    """ViCA2 with its language-modeling head; `generate` runs the vision towers only at prefill."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: Vica2Config):
        super().__init__(config)
        self.model = Vica2Model(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self.model.language_model

    def get_image_features(self, *args, **kwargs) -> list[torch.Tensor]:
        return self.model.get_image_features(*args, **kwargs)

    def get_video_features(self, *args, **kwargs) -> list[torch.Tensor]:
        return self.model.get_video_features(*args, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values=None,
        image_sizes=None,
        hiera_pixel_values=None,
        pixel_values_videos=None,
        hiera_pixel_values_videos=None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        video_frames_budget: int | None = None,
        hiera_frames: int | None = None,
        siglip_pool_stride: int | None = None,
        hiera_pool_stride: int | None = None,
        vision_chunk_size: int | None = None,
        video_token_ratio: torch.Tensor | None = None,
        **kwargs,
    ) -> Vica2CausalLMOutputWithPast:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(num_images, max_tiles, 3, 384, 384)`, *optional*):
            SigLIP anyres tiles of each image (see `Vica2Model.get_image_features`).
        image_sizes (`torch.LongTensor` of shape `(num_images, 2)`, *optional*): original (height, width).
        hiera_pixel_values (`torch.FloatTensor` of shape `(num_images, 3, 1024, 1024)`, *optional*): Hiera pixels.
        pixel_values_videos (`torch.FloatTensor` of shape `(num_videos, frames, 3, 384, 384)`, *optional*).
        hiera_pixel_values_videos (`torch.FloatTensor` of shape `(num_videos, hiera_frames, 3, 1024, 1024)`, *optional*).
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): next-token targets; -100 is
            ignored, and so is every visual placeholder position.
        video_frames_budget, hiera_frames, siglip_pool_stride, hiera_pool_stride (`int`, *optional*): per-call token
            ratio control (defaults from the config); the processor must expand placeholders with the same values.
        video_token_ratio (`torch.LongTensor` of shape `(num_videos, 4)`, *optional*): the same four settings per
            video, as the processor returns them (they take precedence over the scalar settings).
        vision_chunk_size (`int`, *optional*): frames per vision-tower forward.
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            hiera_pixel_values=hiera_pixel_values,
            pixel_values_videos=pixel_values_videos,
            hiera_pixel_values_videos=hiera_pixel_values_videos,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            video_frames_budget=video_frames_budget,
            hiera_frames=hiera_frames,
            siglip_pool_stride=siglip_pool_stride,
            hiera_pool_stride=hiera_pool_stride,
            vision_chunk_size=vision_chunk_size,
            video_token_ratio=video_token_ratio,
            **{k: v for k, v in kwargs.items() if k not in ("num_items_in_batch", "return_dict")},
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.mask_ungeneratable_logits(self.lm_head(hidden_states[:, keep, :]))

        loss = None
        if labels is not None:
            if input_ids is not None:
                is_visual = (input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)
                labels = labels.masked_fill(is_visual.to(labels.device), -100)
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )

        return Vica2CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            video_hidden_states=outputs.video_hidden_states,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )

    def mask_ungeneratable_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Set the logits of ids >= `config.generatable_vocab_size` to -inf (see `Vica2Config`)."""
        limit = self.config.generatable_vocab_size
        if limit is None or limit >= logits.shape[-1]:
            return logits
        return torch.cat([logits[..., :limit], torch.full_like(logits[..., limit:], float("-inf"))], dim=-1)

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beam search / `num_return_sequences` repeat each row; repeat each row's visual items along with it.

        The library repeats every tensor item by item (a, a, b, b), which pairs the wrong pixels with a row's copies
        as soon as one row holds two items; per-call settings are scalars and must not be repeated at all.
        """
        if expand_size == 1:
            return super()._expand_inputs_for_generation(
                expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
            )
        visual = {name: model_kwargs.pop(name) for name in VISUAL_INPUTS if model_kwargs.get(name) is not None}
        settings = {
            name: model_kwargs.pop(name) for name in (*TOKEN_RATIO_ARGS, "vision_chunk_size") if name in model_kwargs
        }
        expanded_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if visual:
            visual = self._expand_visual_inputs(input_ids, visual, expand_size, settings)
        return expanded_ids, {**model_kwargs, **visual, **settings}

    def _expand_visual_inputs(self, input_ids, visual: dict, expand_size: int, settings: dict) -> dict:
        config = self.config
        overrides = {name: int(settings[name]) for name in TOKEN_RATIO_ARGS if settings.get(name) is not None}
        groups = {}
        if "pixel_values" in visual:
            sizes = visual["image_sizes"]
            sizes = sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes
            lengths = [sum(config.num_image_tokens(int(h), int(w))) for h, w in sizes]
            groups[config.image_token_id] = (("pixel_values", "image_sizes", "hiera_pixel_values"), lengths)
        if "pixel_values_videos" in visual:
            videos = visual["pixel_values_videos"]
            frames = [video.shape[0] for video in (videos.unbind(0) if isinstance(videos, torch.Tensor) else videos)]
            scalars = tuple(overrides.get(name) for name in TOKEN_RATIO_ARGS)
            rows = _per_video_ratio(visual.get("video_token_ratio"), len(frames), scalars)
            lengths = [
                sum(config.num_video_tokens(t, **{k: int(v) for k, v in zip(TOKEN_RATIO_ARGS, row) if v is not None}))
                for t, row in zip(frames, rows)
            ]
            groups[config.video_token_id] = (
                ("pixel_values_videos", "hiera_pixel_values_videos", "video_token_ratio"),
                lengths,
            )
        expanded = {}
        for token_id, (names, lengths) in groups.items():
            order = _row_major_item_order(input_ids, token_id, lengths, expand_size)
            for name in names:
                if name in visual:
                    expanded[name] = _take_items(visual[name], order)
        return expanded

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        # The last point where `generate` still holds the caller's mask (it drops an all-ones mask next).
        cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        _check_generation_mask(model_kwargs.get("attention_mask"), inputs_tensor.shape, _cache_length(cache))
        return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)

    def prepare_inputs_for_generation(self, input_ids, *args, is_first_iteration: bool = False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, *args, is_first_iteration=is_first_iteration, **kwargs
        )
        # The library drops its own pixel inputs after prefill; the Hiera pixels are ours to drop. The vision towers
        # then run only at prefill, when the prompt's placeholders are in the input.
        if not is_first_iteration and kwargs.get("use_cache", True):
            for name in HIERA_PIXEL_INPUTS:
                model_inputs.pop(name, None)
        return model_inputs


# `save_pretrained` then copies this file and its relative imports next to the weights (remote code).
Vica2Model.register_for_auto_class("AutoModel")
Vica2ForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["Vica2PreTrainedModel", "Vica2Model", "Vica2ForConditionalGeneration"]
