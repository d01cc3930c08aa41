# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""ViCA2: SigLIP + SAM2.1 Hiera in front of Qwen2 (the library's towers; this file composes them as the release does).

Compile-ready: a decode step (no pixels, filled cache) reads nothing back from the device and branches on no tensor
value; checks that need values run where input enters (prefill, pixels given, `generate`'s entry).
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model

from .configuration_vica2 import TOKEN_RATIO_ARGS, Vica2Config, anyres_feature_shape, anyres_max_patches
from .configuration_vica2 import check_frame_ratio, pooled_grid, positive_int
from .kernels_vica2 import ATTENTION_NAME as FUSED_ATTENTION, register_vica2_attention, use_fused_hiera_blocks


# `attn_implementation="vica2_fused"` (kernels_vica2.py): Triton attention for Qwen2, SigLIP and Hiera.
register_vica2_attention()

# transformers renamed the KV-cache argument and output field from `past_key_values` to `cache` during 5.x;
# speak whichever name the installed library uses (5.17 .. 5.2x are supported).
CACHE_NAME = "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else "past_key_values"

# Inputs of ours that `generate` does not know to drop after prefill (it does for `pixel_values*` / `image_sizes`).
PREFILL_ONLY_INPUTS = ("hiera_pixel_values", "hiera_pixel_values_videos", "video_token_ratio")

IMAGE_INPUTS = ("pixel_values", "image_sizes", "hiera_pixel_values")
VIDEO_INPUTS = ("pixel_values_videos", "hiera_pixel_values_videos", "video_token_ratio")


@dataclass
class Vica2ModelOutputWithPast(BaseModelOutputWithPast):  # plus the visual features merged into the sequence
    image_hidden_states: list[torch.Tensor] | None = None
    video_hidden_states: list[torch.Tensor] | None = None


@dataclass
class Vica2CausalLMOutputWithPast(CausalLMOutputWithPast):  # plus the visual features merged into the sequence
    image_hidden_states: list[torch.Tensor] | None = None
    video_hidden_states: list[torch.Tensor] | None = None


class Vica2PreTrainedModel(PreTrainedModel):
    config_class = Vica2Config
    base_model_prefix = "model"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    # A visual item's features are computed tower-block by tower-block; keep each block whole on one device.
    _no_split_modules = ["Qwen2DecoderLayer", "SiglipEncoderLayer", "SiglipVisionEmbeddings", "Sam2MultiScaleBlock",
                         "Vica2FusedHieraBlock"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # decode steps: no host reads, no value-dependent branches (see the module doc)

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
        quantization = kwargs.get("quantization_config")
        if getattr(quantization, "quant_method", None) == "bitsandbytes" and not getattr(quantization, "llm_int8_skip_modules", None):
            kwargs["quantization_config"] = quantization = copy.deepcopy(quantization)
            quantization.llm_int8_skip_modules = cls.quantization_skip_modules()
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
    """Spatially pool (T, h, w, C) frame features as the release's `get_2dPool` does (mode: the config's, checked)."""
    if stride == 1:
        return features
    height, width = features.shape[1:3]
    size = (pooled_grid(height, stride, mode), pooled_grid(width, stride, mode))  # also rejects a too-large stride
    features = features.permute(0, 3, 1, 2)
    if mode == "bilinear":
        return F.interpolate(features, size=size, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    return (F.avg_pool2d if mode == "average" else F.max_pool2d)(features, stride).permute(0, 2, 3, 1)


def newline_rows(features: torch.Tensor, newline: torch.Tensor | None) -> torch.Tensor:
    """(T, h, w, C) -> (T * h * (w + 1), C): frame by frame, row by row, each row followed by `newline`."""
    frames, height, width, channels = features.shape
    if newline is not None:
        newline = newline.to(features.device, features.dtype).expand(frames, height, 1, channels)
        features = torch.cat([features, newline], dim=2)
    return features.reshape(-1, channels)


def _as_item_list(pixels, name: str, channels: int, size: int) -> list[torch.Tensor]:
    """Accept a (N, T, C, H, W) tensor or a list of (T, C, H, W) tensors; check the per-frame shape and values."""
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
        if not item.is_floating_point():  # raw uint8 frames would be cast to float unscaled: wrong features
            raise TypeError(
                f"`{name}` has dtype {item.dtype}; the model takes normalised floating-point pixels (float32, "
                "bfloat16 or float16), not raw image values. Prepare images and videos with the Vica2Processor, "
                "which rescales and normalises them."
            )
    # One NaN / inf spreads to every logit (greedy decoding then emits id 0 forever). One host read for all items.
    finite = torch.stack([item.sum(dtype=torch.float32).isfinite().to(items[0].device) for item in items]).tolist()
    if not all(finite):
        bad = ", ".join(str(index) for index, ok in enumerate(finite) if not ok)
        raise ValueError(
            f"`{name}` contains NaN or infinite values (item(s) {bad}); the model would produce NaN logits. Check "
            "the source frames or the code that made these pixels (the Vica2Processor never does)."
        )
    return list(items)


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


def token_ratio_rows(video_token_ratio, num_videos: int, config) -> list[dict]:
    """The token-ratio settings ({name: int} over `TOKEN_RATIO_ARGS`) of each video: the rows of `video_token_ratio`
    (the processor's (num_videos, 4) tensor), or the config's defaults for every video when it is None."""
    if video_token_ratio is None:
        return [{name: getattr(config, name) for name in TOKEN_RATIO_ARGS}] * num_videos
    rows = video_token_ratio.tolist() if isinstance(video_token_ratio, torch.Tensor) else list(video_token_ratio)
    if len(rows) != num_videos or any(len(row) != len(TOKEN_RATIO_ARGS) for row in rows):
        raise ValueError(
            f"`video_token_ratio` must hold one row of {len(TOKEN_RATIO_ARGS)} settings "
            f"({', '.join(TOKEN_RATIO_ARGS)}) per video; got {_describe(video_token_ratio)} for {num_videos} "
            "video(s). Use the Vica2Processor."
        )
    return [{name: positive_int(name, value) for name, value in zip(TOKEN_RATIO_ARGS, row)} for row in rows]


def _describe(value) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


class Vica2Model(Vica2PreTrainedModel):
    """The towers, the two projectors, `image_newline` and the language model (no LM head)."""

    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        # Not `_keys_to_ignore_on_load_unexpected`: the library merges a child's patterns into its parent's, and vLLM
        # then skipped the full model's `lm_head.weight`. This runs on the loaded model only: a base model alone.
        super()._adjust_missing_and_unexpected_keys(loading_info)
        loading_info.unexpected_keys = {k for k in loading_info.unexpected_keys if not k.startswith("lm_head.")}

    def __init__(self, config: Vica2Config):
        super().__init__(config)
        hidden_size, act = config.text_config.hidden_size, config.projector_hidden_act
        self.vision_tower = AutoModel.from_config(config.vision_config)
        # ViCA2 takes SigLIP's last encoder layer as it leaves that layer: no post-layernorm (nor pooling head).
        self.vision_tower.post_layernorm = nn.Identity()
        self.hiera_tower = AutoModel.from_config(config.hiera_config)
        if self.hiera_tower.config._attn_implementation == FUSED_ATTENTION:
            use_fused_hiera_blocks(self.hiera_tower)  # windowed attention without partition copies
        self.multi_modal_projector = Vica2MultiModalProjector(config.vision_config.hidden_size, hidden_size, act)
        self.hiera_projector = Vica2MultiModalProjector(config.spatial_projector_input_size, hidden_size, act)
        # One learned vector ends every feature row of both streams.
        self.image_newline = nn.Parameter(torch.empty(hidden_size)) if config.use_image_newline else None
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    # ------------------------------------------------------------------------------------- tower streams
    def _stream_features(self, stream: str, pixel_values, chunk_size: int, pool_stride: int = 1) -> torch.Tensor:
        """(N, 3, S, S) -> projected (and, for videos, pooled) (N, h, w, H) features of the "siglip" or "hiera"
        stream, `chunk_size` frames per tower forward."""
        config, outputs = self.config, []
        tower = self.vision_tower if stream == "siglip" else self.hiera_tower
        for chunk in pixel_values.split(chunk_size):
            output = tower(pixel_values=chunk.to(tower.dtype))
            if stream == "siglip":
                grid = config.siglip_grid
                features = self.multi_modal_projector(output.last_hidden_state).unflatten(1, (grid, grid))
            else:
                features = self.hiera_projector(output.intermediate_hidden_states[config.hiera_feature_stage - 1])
            outputs.append(pool_video_features(features, pool_stride, config.video_pool_mode))
        return torch.cat(outputs)

    def _chunk_size(self, vision_chunk_size) -> int:
        chunk_size = self.config.vision_chunk_size if vision_chunk_size is None else vision_chunk_size
        return positive_int("vision_chunk_size", chunk_size)

    # ------------------------------------------------------------------------------------- videos
    def get_video_features(
        self, pixel_values_videos, hiera_pixel_values_videos, video_token_ratio: torch.Tensor | None = None,
        vision_chunk_size: int | None = None, return_dict: bool | None = None,
    ) -> list[torch.Tensor] | BaseModelOutputWithPooling:
        """One [SigLIP tokens ; Hiera tokens] sequence per video, each stream in newline rows.

        Pixels as the processor returns them: (num_videos, T, 3, S, S) or a list of (T_i, 3, S, S); Hiera's hold all T
        frames (every k-th is encoded) or the ceil(T / k) encoded ones. `video_token_ratio`: (num_videos, 4) rows of
        `TOKEN_RATIO_ARGS` (default: the config's). `vision_chunk_size`: frames per tower forward (not the result).
        `return_dict`: a `BaseModelOutputWithPooling` whose `pooler_output` is the list (serving engines ask for it)."""
        chunk_size = self._chunk_size(vision_chunk_size)
        siglip_size, hiera_size = self.config.vision_config.image_size, self.config.hiera_image_size
        videos = _as_item_list(pixel_values_videos, "pixel_values_videos", 3, siglip_size)
        hiera_videos = _as_item_list(hiera_pixel_values_videos, "hiera_pixel_values_videos", 3, hiera_size)
        if len(videos) != len(hiera_videos):
            raise ValueError(
                f"Got SigLIP pixels for {len(videos)} videos but Hiera pixels for {len(hiera_videos)}; pass both for "
                "every video (the Vica2Processor returns `pixel_values_videos` and `hiera_pixel_values_videos`)."
            )
        features, rows = [], token_ratio_rows(video_token_ratio, len(videos), self.config)
        for video, hiera_video, row in zip(videos, hiera_videos, rows):
            frame_stride = check_frame_ratio(row["video_frames_budget"], row["hiera_frames"])
            hiera_video = self._hiera_video_frames(video.shape[0], hiera_video, frame_stride)
            siglip = self._stream_features("siglip", video, chunk_size, row["siglip_pool_stride"])
            hiera = self._stream_features("hiera", hiera_video, chunk_size, row["hiera_pool_stride"])
            features.append(torch.cat([newline_rows(stream, self.image_newline) for stream in (siglip, hiera)]))
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

    # ------------------------------------------------------------------------------------- images
    def get_image_features(
        self, pixel_values, image_sizes, hiera_pixel_values, vision_chunk_size: int | None = None,
        return_dict: bool | None = None,
    ) -> list[torch.Tensor] | BaseModelOutputWithPooling:
        """One [SigLIP tokens ; Hiera tokens] sequence per image: the base view's tokens (no newline), the anyres tile
        map unpadded to the image's aspect (downscaled past `anyres_max_N`) in newline rows; Hiera un-pooled in newline
        rows. Pixels, `image_sizes` (original (height, width)) as the processor returns them; the rest as in
        `get_video_features`."""
        chunk_size = self._chunk_size(vision_chunk_size)
        siglip_size, hiera_size = self.config.vision_config.image_size, self.config.hiera_image_size
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
            siglip = self._anyres_tokens(tiles, height, width, chunk_size)
            hiera = newline_rows(self._stream_features("hiera", hiera_image, chunk_size), self.image_newline)
            features.append(torch.cat([siglip, hiera]))
        return BaseModelOutputWithPooling(pooler_output=features) if return_dict else features

    def _anyres_tokens(self, tiles: torch.Tensor, height: int, width: int, chunk_size: int) -> torch.Tensor:
        config = self.config
        grid = config.siglip_grid
        max_patches = anyres_max_patches(config.vision_aspect_ratio)
        (rows, cols), (unpadded_h, unpadded_w), downscaled = anyres_feature_shape(
            height, width, config.image_grid_pinpoints, config.vision_config.image_size, grid, max_patches
        )
        num_tiles = 1 + rows * cols
        if tiles.shape[0] < num_tiles or tiles[num_tiles:].any():
            raise ValueError(
                f"An image of size (height={height}, width={width}) is tiled into 1 + {rows}x{cols} = {num_tiles} "
                f"views, but its `pixel_values` hold {tiles.shape[0]} (non-padding) views. Prepare images with the "
                "Vica2Processor and pass its `image_sizes` unchanged."
            )
        features = self._stream_features("siglip", tiles[:num_tiles], chunk_size)  # (tiles, 27, 27, H)
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
    def _merge_placeholders(self, input_ids, inputs_embeds, features: list[torch.Tensor], kind: str):
        """Scatter the items' tokens into the `<kind>` placeholder positions (one placeholder per visual token)."""
        token_id = getattr(self.config, f"{kind}_token_id")
        if input_ids is not None:
            mask = input_ids == token_id
        else:
            placeholder = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
            mask = (inputs_embeds == placeholder).all(-1)
        _check_placeholder_runs(mask, [item.shape[0] for item in features], kind)
        merged = torch.cat(features).to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1).to(inputs_embeds.device), merged)

    def forward(
        self, input_ids: torch.LongTensor | None = None, pixel_values=None, image_sizes=None, hiera_pixel_values=None,
        pixel_values_videos=None, hiera_pixel_values_videos=None, attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None, past_key_values=None, cache=None,
        inputs_embeds: torch.FloatTensor | None = None, use_cache: bool | None = None,
        vision_chunk_size: int | None = None, video_token_ratio: torch.Tensor | None = None,
        return_dict: bool | None = None, **kwargs,
    ) -> Vica2ModelOutputWithPast | tuple:
        """The merged sequence through the language model (the arguments are `Vica2ForConditionalGeneration`'s)."""
        cache, embeddings = (cache if cache is not None else past_key_values), self.get_input_embeddings()
        past_length = _past_length(cache)
        _check_inputs(input_ids, inputs_embeds, attention_mask, position_ids, past_length, kwargs)
        if inputs_embeds is None:
            if past_length == 0:  # prefill: ids and placeholders checked once, with one host read
                pixels = {"image": pixel_values is not None, "video": pixel_values_videos is not None}
                _check_prompt_ids(input_ids, self.config, getattr(embeddings, "num_embeddings", math.inf), pixels)
            inputs_embeds = embeddings(input_ids)

        image_features = video_features = None
        if pixel_values is not None:
            if image_sizes is None or hiera_pixel_values is None:
                raise ValueError("Images need `pixel_values`, `image_sizes` and `hiera_pixel_values` together.")
            image_features = self.get_image_features(pixel_values, image_sizes, hiera_pixel_values, vision_chunk_size)
            inputs_embeds = self._merge_placeholders(input_ids, inputs_embeds, image_features, "image")
        if pixel_values_videos is not None:
            if hiera_pixel_values_videos is None:
                raise ValueError("Videos need both `pixel_values_videos` and `hiera_pixel_values_videos`.")
            video_features = self.get_video_features(
                pixel_values_videos, hiera_pixel_values_videos, video_token_ratio, vision_chunk_size
            )
            inputs_embeds = self._merge_placeholders(input_ids, inputs_embeds, video_features, "video")

        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            # Count only attended tokens, so a left-padded row gets the positions it has alone (0..L-1 on every
            # valid token of a right-padded batch, as in the release's training); the last columns are the new tokens.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1] :]
        outputs = self.language_model(
            attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
            use_cache=use_cache, **{CACHE_NAME: cache}, **kwargs,
        )
        output = Vica2ModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions, image_hidden_states=image_features, video_hidden_states=video_features,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )
        # Serving engines (vLLM's Transformers backend) call with return_dict=False and read output[0].
        return output if return_dict is None or return_dict else output.to_tuple()


def _past_length(cache) -> int | None:
    """Tokens in `cache` when the host knows it for free; None for a filled static cache, whose length lives on the
    device (reading it back would stall every decode step and break a compiled one)."""
    length = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
    return length if isinstance(length, int) else None


def _check_placeholder_runs(mask: torch.Tensor, lengths: list[int], kind: str) -> None:
    """Each item must fill its own placeholders: the total count matches and no item straddles two runs."""
    positions = mask.flatten().nonzero().flatten()
    if positions.numel() != sum(lengths):
        raise ValueError(
            f"The prompt has {positions.numel()} `<{kind}>` placeholder tokens but the {len(lengths)} {kind}(s) give "
            f"{sum(lengths)} features ({', '.join(map(str, lengths))}). Expand each `<{kind}>` with the "
            "Vica2Processor, using the same frames and token-ratio settings as this call."
        )
    # Contiguous placeholder runs (a run may hold several adjacent items, never part of one), rows apart.
    row_length = mask.shape[-1]
    gaps = (positions[1:] - positions[:-1] != 1) | (positions[1:] // row_length != positions[:-1] // row_length)
    if not set(torch.tensor(lengths).cumsum(0).tolist()).issuperset((gaps.nonzero().flatten() + 1).tolist()):
        raise ValueError(
            f"The `<{kind}>` placeholder runs in the prompt do not line up with the {kind} features "
            f"({', '.join(map(str, lengths))} tokens per {kind}): some {kind} would be split across runs. "
            "Give every item exactly its own expanded placeholder run, in order."
        )


def _check_inputs(input_ids, inputs_embeds, attention_mask, position_ids, past_length: int | None, kwargs) -> None:
    """What can be checked from types and shapes alone (free at every step, compiled or not)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
    if any(name in kwargs for name in TOKEN_RATIO_ARGS):
        raise TypeError(
            f"The model takes the token-ratio settings only as `video_token_ratio`; pass {', '.join(TOKEN_RATIO_ARGS)} "
            "to the processor (or its chat template), which returns `video_token_ratio` for the model."
        )
    if input_ids is not None and not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"`input_ids` must be a torch tensor of token ids, got {type(input_ids).__name__}.")
    dtype = input_ids.dtype if input_ids is not None else None
    if dtype is not None and (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool):
        raise TypeError(
            f"`input_ids` has dtype {input_ids.dtype}; token ids must be integers (torch.long). Use the ids the "
            "Vica2Processor / tokenizer returns, without converting them."
        )
    input_shape = (input_ids if input_ids is not None else inputs_embeds).shape
    _check_attention_mask(attention_mask, input_shape, past_length)
    if isinstance(position_ids, torch.Tensor) and position_ids.dim() and position_ids.shape[-1] != input_shape[1]:
        raise ValueError(
            f"`position_ids` has shape {tuple(position_ids.shape)} but the input has {input_shape[1]} new token(s) "
            "per row. (With `generate` they come from `attention_mask`: it must have one entry per token of "
            "`input_ids`.)"
        )


def _check_prompt_ids(input_ids, config, vocab_size: int, pixels_given: dict) -> None:
    """At prefill, with one host read: ids inside the vocabulary (otherwise the embedding lookup fails deep inside
    torch, on CUDA as a device-side assert that breaks the whole process), and no placeholder of a kind whose pixels
    are missing (it would silently be embedded as text, e.g. a `<video>` prompt given image pixels)."""
    if input_ids.numel() == 0:
        return
    token_ids = {"image": config.image_token_id, "video": config.video_token_id}
    found = [(input_ids == token_id).any() for token_id in token_ids.values()]
    low, high, *has_tokens = torch.stack([input_ids.min(), input_ids.max(), *found]).long().tolist()
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"`input_ids` hold ids from {low} to {high} but the vocabulary has {vocab_size} tokens (ids 0 to "
            f"{vocab_size - 1}). Tokenize with this checkpoint's processor; pad with its pad_token_id (-100 marks "
            "ignored labels, not input ids)."
        )
    names = {"image": "`pixel_values`, `image_sizes`, `hiera_pixel_values`",
             "video": "`pixel_values_videos`, `hiera_pixel_values_videos`"}
    for kind, has_tokens in zip(token_ids, has_tokens):
        if has_tokens and not pixels_given[kind]:
            given = f"no {kind} pixels were given" if any(pixels_given.values()) else "no pixels were given"
            raise ValueError(
                f"`input_ids` contain `<{kind}>` placeholders but {given}; pass the processor's {names[kind]} along "
                f"with the ids (a {kind} must go in as {kind}s=, and its placeholder must be `<{kind}>`)."
            )


def _check_attention_mask(attention_mask, input_shape, past_length: int | None, uncached_too: bool = False) -> None:
    """A 2-D mask has one entry per token, the cached ones and the new ones: any other length fails deep in the mask
    builder or shifts every position silently. Behind a filled static cache, whose length is on the device, it must
    at least cover the new tokens. `generate` may be given only the new ids' mask (`uncached_too`)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return
    (batch, length), shape = tuple(input_shape[:2]), tuple(attention_mask.shape)
    if past_length is None:
        if shape[0] == batch and shape[1] > length:
            return
        expected = f"({batch}, cached tokens + {length})"
    else:
        allowed = {(batch, past_length + length)} | ({(batch, length)} if uncached_too else set())
        if shape in allowed:
            return
        expected = " or ".join(map(str, sorted(allowed)))
    cached = f" after {past_length} cached token(s)" if past_length else ""
    raise ValueError(
        f"`attention_mask` has shape {shape} but `input_ids` has shape {(batch, length)}{cached}: it must be "
        f"{expected}. Pass the mask the processor / tokenizer returned with these ids (one entry per token)."
    )


class Vica2ForConditionalGeneration(Vica2PreTrainedModel, GenerationMixin):
    """ViCA2 with its language-modeling head; `generate` runs the vision towers only at prefill."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: Vica2Config):
        super().__init__(config)
        self.model = Vica2Model(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    # The embedding / output-embedding / decoder accessors are the library's: they find `model.language_model`
    # and `lm_head` by name.
    def get_image_features(self, *args, **kwargs) -> list[torch.Tensor]:
        return self.model.get_image_features(*args, **kwargs)

    def get_video_features(self, *args, **kwargs) -> list[torch.Tensor]:
        return self.model.get_video_features(*args, **kwargs)

    def forward(
        self, input_ids: torch.LongTensor | None = None, pixel_values=None, image_sizes=None, hiera_pixel_values=None,
        pixel_values_videos=None, hiera_pixel_values_videos=None, attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None, past_key_values=None, cache=None,
        inputs_embeds: torch.FloatTensor | None = None, labels: torch.LongTensor | None = None,
        use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0, vision_chunk_size: int | None = None,
        video_token_ratio: torch.Tensor | None = None, **kwargs,
    ) -> Vica2CausalLMOutputWithPast:
        r"""Pixels, `video_token_ratio` and `vision_chunk_size` as in `Vica2Model.get_image_features` /
        `get_video_features` (the processor's outputs). `labels`: next-token targets; -100 and every visual
        placeholder position are ignored."""
        outputs = self.model(
            input_ids, pixel_values, image_sizes, hiera_pixel_values, pixel_values_videos, hiera_pixel_values_videos,
            attention_mask, position_ids, past_key_values, cache, inputs_embeds, use_cache, vision_chunk_size,
            video_token_ratio, **{k: v for k, v in kwargs.items() if k not in ("num_items_in_batch", "return_dict")},
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.mask_ungeneratable_logits(self.lm_head(outputs.last_hidden_state[:, keep, :]))

        loss = None
        if labels is not None:
            if input_ids is not None:
                is_visual = (input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)
                labels = labels.masked_fill(is_visual.to(labels.device), -100)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs)
        return Vica2CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states, video_hidden_states=outputs.video_hidden_states,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )

    def mask_ungeneratable_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Set the logits of ids >= `config.generatable_vocab_size` to -inf (see `Vica2Config`)."""
        limit = self.config.generatable_vocab_size
        if limit is None or limit >= logits.shape[-1]:
            return logits
        return torch.cat([logits[..., :limit], torch.full_like(logits[..., limit:], float("-inf"))], dim=-1)

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Repeat each row's visual items with the row (beams, `num_return_sequences`): the library repeats item by
        item (a, a, b, b), which pairs the wrong pixels with a row's copies once a row holds two items."""
        visual = {}
        if expand_size > 1:
            visual = {n: model_kwargs.pop(n) for n in IMAGE_INPUTS + VIDEO_INPUTS if model_kwargs.get(n) is not None}
        expanded_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        config, groups = self.config, []
        if "pixel_values" in visual:
            lengths = [sum(config.num_image_tokens(h, w)) for h, w in _image_size_list(visual["image_sizes"])]
            groups.append((IMAGE_INPUTS, config.image_token_id, lengths))
        if "pixel_values_videos" in visual:
            frames = [video.shape[0] for video in visual["pixel_values_videos"]]
            rows = token_ratio_rows(visual.get("video_token_ratio"), len(frames), config)
            lengths = [sum(config.num_video_tokens(t, **row)) for t, row in zip(frames, rows)]
            groups.append((VIDEO_INPUTS, config.video_token_id, lengths))
        for names, token_id, lengths in groups:
            order = _row_major_item_order(input_ids, token_id, lengths, expand_size)
            for name in set(names) & set(visual):
                value = visual[name]
                visual[name] = (value.index_select(0, torch.tensor(order, device=value.device))
                                if isinstance(value, torch.Tensor) else [value[index] for index in order])
        return expanded_ids, {**model_kwargs, **visual}

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        # `generate`'s entry, the last point where it still holds the caller's mask (it drops an all-ones mask next).
        cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        past_length = int(cache.get_seq_length()) if cache is not None else 0  # once per `generate`
        _check_attention_mask(model_kwargs.get("attention_mask"), inputs_tensor.shape, past_length, uncached_too=True)
        return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)

    def prepare_inputs_for_generation(self, input_ids, *args, is_first_iteration: bool = False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(input_ids, *args, is_first_iteration=is_first_iteration, **kwargs)
        # The library drops its own pixel inputs after prefill; the Hiera pixels and the token ratio are ours to drop.
        # The vision towers then run only at prefill, when the prompt's placeholders are in the input.
        if not is_first_iteration and kwargs.get("use_cache", True):
            for name in PREFILL_ONLY_INPUTS:
                model_inputs.pop(name, None)
        return model_inputs


def _row_major_item_order(input_ids, token_id: int, lengths: list[int], expand_size: int) -> list[int]:
    """Item indices in the order of rows repeated `expand_size` times, each copy holding its row's items."""
    if input_ids is None:  # no ids to read the rows from: one item per row, as the library assumes
        return [item for item in range(len(lengths)) for _ in range(expand_size)]
    order, item = [], 0
    for count in (input_ids == token_id).sum(-1).tolist():
        first = item
        while count > 0 and item < len(lengths):
            count, item = count - lengths[item], item + 1
        order.extend(list(range(first, item)) * expand_size)
    return order


# `save_pretrained` then copies this file and its relative imports next to the weights (remote code).
Vica2Model.register_for_auto_class("AutoModel")
Vica2ForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["Vica2PreTrainedModel", "Vica2Model", "Vica2ForConditionalGeneration"]
