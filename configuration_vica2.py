# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""ViCA2 configuration and the token layout that follows from it: one definition for the model and the processor."""

from __future__ import annotations

import math
import operator
import re

from transformers import AutoConfig, PretrainedConfig
from transformers.image_processing_utils import select_best_resolution


# LLaVA-OneVision's "anyres" grid: every (height, width) with both sides in {384, ..., 2304}.
DEFAULT_IMAGE_GRID_PINPOINTS = [[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)]

POOL_MODES = ("bilinear", "average", "max")

# The token-ratio settings a call may override (model `forward` / `generate`, processor, CLI, training).
TOKEN_RATIO_ARGS = ("video_frames_budget", "hiera_frames", "siglip_pool_stride", "hiera_pool_stride")

# Every auto class a ViCA2 folder serves. `save_pretrained` would only record the class being saved; keeping the
# whole map in the config means any saved folder (converted, fine-tuned, ...) loads through all of them.
AUTO_MAP = {
    "AutoConfig": "configuration_vica2.Vica2Config",
    "AutoModel": "modeling_vica2.Vica2Model",
    **{auto: "modeling_vica2.Vica2ForConditionalGeneration"
       for auto in ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForMultimodalLM")},
}


def _default_text_config() -> dict:  # Qwen2-7B as used by ViCA2 (rope scaling forced off by the release)
    return dict(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6, use_sliding_window=False,
        max_window_layers=28, attention_dropout=0.0, tie_word_embeddings=False, bos_token_id=151643,
        eos_token_id=151645, initializer_range=0.02,
    )


def _default_vision_config() -> dict:  # SigLIP so400m-patch14-384 without its 27th (last) layer, as the release
    return dict(
        model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
        num_attention_heads=16, num_channels=3, image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6, attention_dropout=0.0, vision_use_head=False,
    )


def _default_hiera_config() -> dict:  # the trunk of SAM2.1 hiera_b+ ("base-plus")
    return dict(
        model_type="sam2_hiera_det_model", hidden_size=112, num_attention_heads=2, num_channels=3,
        image_size=[1024, 1024], patch_kernel_size=[7, 7], patch_stride=[4, 4], patch_padding=[3, 3],
        query_stride=[2, 2], window_positional_embedding_background_size=[14, 14], num_query_pool_stages=3,
        blocks_per_stage=[2, 3, 16, 3], embed_dim_per_stage=[112, 224, 448, 896],
        num_attention_heads_per_stage=[2, 4, 8, 16], window_size_per_stage=[8, 4, 14, 7],
        global_attention_blocks=[12, 16, 20], mlp_ratio=4.0, hidden_act="gelu", layer_norm_eps=1e-6,
    )


class Vica2ConfigError(ValueError, TypeError):
    """An invalid ViCA2 setting (also a TypeError: a value of the wrong type is one way a setting is invalid)."""


def _as_sub_config(value, default: dict, name: str) -> PretrainedConfig:
    if value is None:
        value = default()
    if isinstance(value, PretrainedConfig):
        return value
    if not isinstance(value, dict):
        raise Vica2ConfigError(f"`{name}` must be a dict or a PretrainedConfig, got {type(value).__name__}.")
    value = dict(value)
    model_type = value.pop("model_type", default()["model_type"])
    try:
        return AutoConfig.for_model(model_type, **value)
    except Exception as error:  # noqa: BLE001 - the library's own errors (strict field checks, ...): name the field
        raise Vica2ConfigError(f"`{name}` is invalid: {' '.join(str(error).split())}") from error


class Vica2Config(PretrainedConfig):
    r"""
    A ViCA2 model: SigLIP and SAM2.1 Hiera encoders, each with a projector, before Qwen2. `Vica2Config()` is ViCA2-7B.

    Args:
        text_config, vision_config, hiera_config (`dict` or config): Qwen2, SigLIP (26 layers, taken before
            `post_layernorm`), the SAM2.1 Hiera trunk.
        image_token_id, video_token_id (`int`): the `<image>` / `<video>` placeholder ids (one per visual token).
        projector_hidden_act (`str`): activation between the two Linear layers of both projectors.
        use_image_newline (`bool`): append the learned `image_newline` vector after every feature row.
        image_grid_pinpoints (`list[list[int]]`): candidate `[height, width]` resolutions for anyres image tiling.
        vision_aspect_ratio (`str`): `"anyres_max_N"`: a tiled feature map past N base views is downscaled.
        video_frames_budget (`int`): SigLIP frame budget, the number of frames sampled from a video (64).
        siglip_pool_stride (`int`): spatial pool stride of the SigLIP video features (27x27 -> 14x14 with 2).
        video_pool_mode (`str`): `"bilinear"` (ceil(grid / stride)), `"average"` or `"max"` (floor(grid / stride)); used
            for both streams of a video.
        hiera_frames (`int`): N_hiera, Hiera frames at the full frame budget. Hiera encodes every k-th frame with
            k = video_frames_budget / hiera_frames, whatever the number of frames that arrive.
        hiera_feature_stage (`int`): S_stage, the 1-based Hiera stage whose output feeds the spatial projector.
        hiera_pool_stride (`int`): s_pool, spatial pool stride of the Hiera video features (32x32 -> 16x16 with 2).
        spatial_projector_input_size (`int`, *optional*): input width of the spatial projector (default: the width of
            `hiera_feature_stage`; a stored value that does not match the stage is an error).
        vision_chunk_size (`int`): frames (or tiles) per vision-tower forward; bounds memory, not the result.
        generatable_vocab_size (`int`, *optional*): when set, logits of token ids at or above it are `-inf`. The release
            shrinks the embedding to its tokenizer at load time, so it can never emit the untrained rows above it; the
            converter sets this to the release tokenizer's size to keep that property.
    """

    model_type = "vica2"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig, "hiera_config": AutoConfig}

    def __init__(
        self, text_config=None, vision_config=None, hiera_config=None, image_token_id: int = 151646,
        video_token_id: int = 151647, projector_hidden_act: str = "gelu", use_image_newline: bool = True,
        image_grid_pinpoints: list | None = None, vision_aspect_ratio: str = "anyres_max_9",
        video_frames_budget: int = 64, siglip_pool_stride: int = 2, video_pool_mode: str = "bilinear",
        hiera_frames: int = 32, hiera_feature_stage: int = 4, hiera_pool_stride: int = 2,
        spatial_projector_input_size: int | None = None, vision_chunk_size: int = 8,
        generatable_vocab_size: int | None = None, tie_word_embeddings: bool = False, **kwargs,
    ):
        self.text_config = _as_sub_config(text_config, _default_text_config, "text_config")
        self.vision_config = _as_sub_config(vision_config, _default_vision_config, "vision_config")
        self.hiera_config = _as_sub_config(hiera_config, _default_hiera_config, "hiera_config")
        self.image_token_id, self.video_token_id = image_token_id, video_token_id
        self.projector_hidden_act, self.use_image_newline = projector_hidden_act, use_image_newline
        pinpoints = DEFAULT_IMAGE_GRID_PINPOINTS if image_grid_pinpoints is None else image_grid_pinpoints
        if isinstance(pinpoints, (list, tuple)):  # anything else is refused by validate_vica2, with its name
            pinpoints = [list(p) if isinstance(p, (list, tuple)) else p for p in pinpoints]
        self.image_grid_pinpoints = pinpoints
        self.vision_aspect_ratio, self.video_pool_mode = vision_aspect_ratio, video_pool_mode
        self.video_frames_budget, self.hiera_frames = video_frames_budget, hiera_frames
        self.siglip_pool_stride, self.hiera_pool_stride = siglip_pool_stride, hiera_pool_stride
        self.hiera_feature_stage, self.spatial_projector_input_size = hiera_feature_stage, spatial_projector_input_size
        self.vision_chunk_size, self.generatable_vocab_size = vision_chunk_size, generatable_vocab_size
        self.auto_map = {**AUTO_MAP, **(kwargs.pop("auto_map", None) or {})}
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self._check_hiera_feature_stage()  # before the projector width is derived from it
        if self.spatial_projector_input_size is None:
            self.spatial_projector_input_size = self.hiera_stage_width
        self.validate_vica2()
        self._vica2_constructed = True

    # Not the library's `@strict` fields: their validators see one value at a time, these checks relate fields. The
    # hooks are the library's: `validate()` (run by `save_pretrained`) and validation on assignment.
    def __setattr__(self, name, value):
        """Validate a ViCA2 setting changed after construction (what `from_pretrained(path, field=value)` and
        `from_dict(..., field=value)` do); an invalid value is refused and the config keeps its previous one."""
        if name not in _CHECKED_ON_ASSIGNMENT or not self.__dict__.get("_vica2_constructed"):
            return super().__setattr__(name, value)
        missing = object()
        previous = self.__dict__.get(name, missing)
        super().__setattr__(name, value)
        try:
            # The frame ratio is left to `validate()` and to each call: its two fields may be changed one at a time.
            self.validate_vica2(frame_ratio=False)
        except Vica2ConfigError:
            if previous is missing:
                self.__dict__.pop(name, None)
            else:
                super().__setattr__(name, previous)
            raise

    def _remove_keys_not_serialized(self, d: dict) -> None:
        super()._remove_keys_not_serialized(d)
        d.pop("_vica2_constructed", None)

    def validate(self):
        """The library's checks, then ViCA2's (`save_pretrained` calls this before writing)."""
        super().validate()
        self.validate_vica2()

    def validate_vica2(self, frame_ratio: bool = True):
        """Raise a `Vica2ConfigError` (a ValueError) naming the field when the ViCA2-specific settings are invalid."""
        for name in (*TOKEN_RATIO_ARGS, "vision_chunk_size"):
            _checked(positive_int, name, getattr(self, name))
        if frame_ratio:
            _checked(check_frame_ratio, self.video_frames_budget, self.hiera_frames)
        if not isinstance(self.video_pool_mode, str) or self.video_pool_mode not in POOL_MODES:
            raise Vica2ConfigError(f"video_pool_mode={self.video_pool_mode!r} is not one of {POOL_MODES}.")
        self._check_hiera_feature_stage()
        if self.spatial_projector_input_size != self.hiera_stage_width:
            raise Vica2ConfigError(
                f"spatial_projector_input_size={self.spatial_projector_input_size!r} does not match Hiera stage "
                f"{self.hiera_feature_stage}, whose features have {self.hiera_stage_width} channels. A different "
                "hiera_feature_stage needs a spatial projector trained for it; keep the stage the checkpoint was "
                "trained with."
            )
        self._check_vocabulary()
        _checked(anyres_max_patches, self.vision_aspect_ratio)
        self._check_pinpoints()

    def _check_hiera_feature_stage(self):
        num_stages, stage = len(self.hiera_config.blocks_per_stage), self.hiera_feature_stage
        if not _is_int(stage):
            raise Vica2ConfigError(f"hiera_feature_stage must be an integer (a stage number 1..{num_stages}), got "
                                   f"{stage!r} ({type(stage).__name__}).")
        if not 1 <= stage <= num_stages:
            raise Vica2ConfigError(f"hiera_feature_stage={stage} is out of range: the Hiera trunk has stages 1..{num_stages}.")

    def _check_vocabulary(self):
        """The placeholder ids must be two distinct rows of the embedding, and the generatable ids a non-empty prefix
        of it: otherwise the model could never find its placeholders or could emit nothing (or untrained rows)."""
        vocab_size = self.text_config.vocab_size
        for name in ("image_token_id", "video_token_id"):
            value = getattr(self, name)
            if not _is_int(value) or not 0 <= value < vocab_size:
                raise Vica2ConfigError(
                    f"{name}={value!r} is not a token id of the vocabulary (an integer in 0..{vocab_size - 1}, "
                    "text_config.vocab_size - 1)."
                )
        if self.image_token_id == self.video_token_id:
            raise Vica2ConfigError(
                f"image_token_id and video_token_id are both {self.image_token_id}: images and videos need distinct "
                "placeholder tokens."
            )
        generatable = self.generatable_vocab_size
        if generatable is not None and (not _is_int(generatable) or not 1 <= generatable <= vocab_size):
            raise Vica2ConfigError(
                f"generatable_vocab_size={generatable!r} must be None or an integer in 1..{vocab_size} "
                "(text_config.vocab_size): the ids below it are the ones the model may generate."
            )

    def _check_pinpoints(self):
        size = self.vision_config.image_size
        if not isinstance(self.image_grid_pinpoints, (list, tuple)) or not self.image_grid_pinpoints:
            raise Vica2ConfigError(
                f"image_grid_pinpoints must be a non-empty list of [height, width], got {self.image_grid_pinpoints!r}."
            )
        for pinpoint in self.image_grid_pinpoints:
            sides = pinpoint if isinstance(pinpoint, (list, tuple)) and len(pinpoint) == 2 else [None]
            if not all(_is_int(side) and side > 0 and side % size == 0 for side in sides):
                raise Vica2ConfigError(
                    f"image_grid_pinpoints entry {pinpoint!r} must be [height, width], positive multiples of "
                    f"vision_config.image_size={size}."
                )

    # ----------------------------------------------------------------------------------------------- geometry
    @property
    def hiera_stage_width(self) -> int:
        return self.hiera_config.embed_dim_per_stage[self.hiera_feature_stage - 1]

    @property
    def siglip_grid(self) -> int:  # 27 for 384 / 14
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def hiera_image_size(self) -> int:  # the square Hiera input's side (1024)
        return _first(self.hiera_config.image_size)

    @property
    def hiera_grid(self) -> int:  # at `hiera_feature_stage` (32 at stage 4 for a 1024 input)
        return hiera_stage_grid(self.hiera_config, self.hiera_feature_stage)

    def token_layout(self) -> dict:
        """The fields the processor needs to predict token counts (it stores them in its own config)."""
        fields = ("siglip_grid", "hiera_grid", "use_image_newline", *TOKEN_RATIO_ARGS, "video_pool_mode",
                  "image_grid_pinpoints", "vision_aspect_ratio")
        return {**{name: getattr(self, name) for name in fields}, "siglip_image_size": self.vision_config.image_size}

    def num_video_tokens(self, num_frames: int, **overrides) -> tuple[int, int]:
        """(SigLIP tokens, Hiera tokens) of a video of `num_frames` frames, with token-ratio overrides."""
        return num_video_tokens(num_frames, **{**self.token_layout(), **overrides})

    def num_image_tokens(self, height: int, width: int) -> tuple[int, int]:  # (SigLIP, Hiera) tokens of one image
        return num_image_tokens(height, width, **self.token_layout())


# Settings re-validated when assigned after construction (the rest are plain data or library fields).
_CHECKED_ON_ASSIGNMENT = frozenset(
    {"text_config", "vision_config", "hiera_config", "image_token_id", "video_token_id", "generatable_vocab_size",
     "hiera_feature_stage", "spatial_projector_input_size", "vision_chunk_size", "video_pool_mode",
     "vision_aspect_ratio", "image_grid_pinpoints", *TOKEN_RATIO_ARGS}
)


def _is_int(value) -> bool:  # a plain integer as JSON stores it: not a bool, a float or a tensor
    return isinstance(value, int) and not isinstance(value, bool)


def _checked(check, *args):
    """Run a shared check (which raises ValueError), re-raised as a `Vica2ConfigError`."""
    try:
        return check(*args)
    except Vica2ConfigError:
        raise
    except ValueError as error:
        raise Vica2ConfigError(str(error)) from error


def positive_int(name: str, value, hint: str = "") -> int:
    """`value` as a positive int, or a ValueError naming `name`. Accepts any integer-like value (numpy integers, the
    0-d tensor a BatchFeature makes of an int), never a bool or a float."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < 1:
        raise ValueError(f"{name} must be a positive integer{f' ({hint})' if hint else ''}, got {value!r}.")
    return number


def check_frame_ratio(video_frames_budget: int, hiera_frames: int) -> int:
    """Return the Hiera frame stride k = video_frames_budget / hiera_frames, or raise when it is not an integer."""
    positive_int("video_frames_budget", video_frames_budget)
    positive_int("hiera_frames", hiera_frames)
    if hiera_frames > video_frames_budget or video_frames_budget % hiera_frames:
        raise ValueError(
            f"video_frames_budget={video_frames_budget} must be a multiple of hiera_frames={hiera_frames}: Hiera "
            "encodes every k-th frame with k = video_frames_budget / hiera_frames (the release uses 64 / 32 = 2)."
        )
    return video_frames_budget // hiera_frames


def anyres_max_patches(vision_aspect_ratio: str) -> int:
    match = re.fullmatch(r"anyres_max_(\d+)", str(vision_aspect_ratio))
    if not match:
        raise ValueError(f"vision_aspect_ratio={vision_aspect_ratio!r} is not of the form 'anyres_max_N'.")
    return int(match.group(1))


def hiera_stage_grid(hiera_config, stage: int) -> int:
    """Side of the Hiera feature grid at a 1-based stage: the patch-embed conv, then one q-pool per stage change."""
    names = ("image_size", "patch_kernel_size", "patch_stride", "patch_padding")
    size, kernel, stride, padding = (_first(getattr(hiera_config, name)) for name in names)
    grid = (size + 2 * padding - kernel) // stride + 1
    for _ in range(min(stage - 1, hiera_config.num_query_pool_stages)):  # one q-pool per stage change
        grid //= _first(hiera_config.query_stride)
    return grid


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def pooled_grid(grid: int, stride: int, mode: str) -> int:
    """Side of a `grid` x `grid` map after the video pooling (`ViCA2`'s `get_2dPool`)."""
    if stride == 1:
        return grid
    pooled = math.ceil(grid / stride) if mode == "bilinear" else grid // stride
    if pooled < 1:
        raise ValueError(
            f"A pool stride of {stride} is larger than the {grid}x{grid} feature grid ({mode!r} pooling would leave "
            "nothing); use a smaller stride."
        )
    return pooled


def rows_tokens(num_frames: int, height: int, width: int, use_image_newline: bool) -> int:
    """Tokens of `num_frames` maps of height x width emitted row by row, each row followed by a newline."""
    return num_frames * height * (width + int(use_image_newline))


def num_video_tokens(
    num_frames: int, *, siglip_grid: int, hiera_grid: int, use_image_newline: bool, video_frames_budget: int,
    siglip_pool_stride: int, video_pool_mode: str, hiera_frames: int, hiera_pool_stride: int, **_,
) -> tuple[int, int]:
    """(SigLIP tokens, Hiera tokens) of a video of `num_frames` frames.

    SigLIP: T * p * (p + 1) with p = pooled 27-grid; Hiera: ceil(T / k) * q * (q + 1) with q = pooled stage grid and
    k = video_frames_budget / hiera_frames. A 64-frame video at the defaults: 64*14*15 = 13,440 and 32*16*17 = 8,704.
    """
    positive_int("num_frames", num_frames)
    num_hiera_frames = math.ceil(num_frames / check_frame_ratio(video_frames_budget, hiera_frames))
    p = pooled_grid(siglip_grid, positive_int("siglip_pool_stride", siglip_pool_stride), video_pool_mode)
    q = pooled_grid(hiera_grid, positive_int("hiera_pool_stride", hiera_pool_stride), video_pool_mode)
    return rows_tokens(num_frames, p, p, use_image_newline), rows_tokens(num_hiera_frames, q, q, use_image_newline)


def anyres_feature_shape(
    image_height: int, image_width: int, grid_pinpoints, siglip_image_size: int, siglip_grid: int, max_patches: int
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int] | None]:
    """An image's tiled SigLIP geometry as the release computes it: (tile rows, cols), the unpadded feature map's
    (height, width), and the (height, width) it is bilinearly downscaled to past `max_patches` base views (or None)."""
    best_height, best_width = select_best_resolution((image_height, image_width), grid_pinpoints)
    rows, cols = best_height // siglip_image_size, best_width // siglip_image_size
    height, width = rows * siglip_grid, cols * siglip_grid
    # Undo the letterboxing of `resize_and_pad_image` (release `unpad_image`; int() truncation as there).
    if image_width / image_height > width / height:
        height -= 2 * ((height - int(image_height * (width / image_width))) // 2)
    else:
        width -= 2 * ((width - int(image_width * (height / image_height))) // 2)
    times = math.sqrt(height * width / (max_patches * siglip_grid**2))
    downscaled = (int(height // times), int(width // times)) if times > 1.1 else None
    return (rows, cols), (height, width), downscaled


def num_image_tokens(
    image_height: int, image_width: int, *, siglip_grid: int, hiera_grid: int, use_image_newline: bool,
    image_grid_pinpoints, vision_aspect_ratio: str, siglip_image_size: int, **_,
) -> tuple[int, int]:
    """(SigLIP tokens, Hiera tokens) of one image: the base view (no newline) plus the unpadded tile grid with a
    newline per row; Hiera sees the single image un-pooled (32 x 33 at the defaults)."""
    positive_int("image height", image_height)
    positive_int("image width", image_width)
    max_patches = anyres_max_patches(vision_aspect_ratio)
    _, unpadded, downscaled = anyres_feature_shape(
        image_height, image_width, image_grid_pinpoints, siglip_image_size, siglip_grid, max_patches
    )
    height, width = downscaled or unpadded
    siglip = siglip_grid * siglip_grid + rows_tokens(1, height, width, use_image_newline)
    return siglip, rows_tokens(1, hiera_grid, hiera_grid, use_image_newline)


Vica2Config.register_for_auto_class()

__all__ = ["Vica2Config"]
