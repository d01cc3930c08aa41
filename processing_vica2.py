# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""ViCA2 processor: tokenizer + image processor + video loading, with exact placeholder expansion.

Every `<image>` / `<video>` in the text becomes exactly as many placeholder tokens as the model emits for that item:
[SigLIP tokens ; Hiera tokens], counted by `configuration_vica2.num_image_tokens` / `num_video_tokens`, the
functions the model's own layout follows. The token layout is stored in the processor's config
(`token_layout`, from `Vica2Config.token_layout()`), and per-call token-ratio overrides (`video_frames_budget`,
`hiera_frames`, `siglip_pool_stride`, `hiera_pool_stride`) change the count and are handed to the model in the
output, so `model(**inputs)` / `model.generate(**inputs)` use the same values.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from transformers import processing_utils
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import MultiModalData, ProcessorMixin, TextKwargs
from transformers.utils import logging
from transformers.video_utils import VideoMetadata

from .configuration_vica2 import (
    TOKEN_RATIO_ARGS,
    Vica2Config,
    check_frame_ratio,
    num_image_tokens,
    num_video_tokens,
    positive_int,
)
from .image_processing_vica2 import Vica2ImageProcessor, flatten_images, is_remote_media, to_video_frames
from .video_loading_vica2 import DecodedVideo, FastResize, probe_video, read_video
from .video_processing_vica2 import Vica2VideoProcessor


logger = logging.get_logger(__name__)

# Settings that only matter when a video file is read.
VIDEO_LOADING_ARGS = ("num_frames", "fast_decode", "decode_workers")
# Image-processor settings that decide a video's pixels (prepared while it decodes, so needed before it is read).
VIDEO_PIXEL_ARGS = ("hiera_antialias", "device")
# Per-video outputs of the token-ratio settings, read by the model (`video_token_ratio`).
VIDEO_TOKEN_RATIO = "video_token_ratio"
TOKENIZER_ARGS = frozenset(TextKwargs.__annotations__) - {
    "return_mm_token_type_ids",
    "return_text_replacement_offsets",
}
# The switch for media URLs (http(s), rtsp, ftp, data, ...): fetched by default, as transformers does. A server that
# passes users' chats through the processor sets `allow_remote_media=False` (or this variable to 0), so that a chat
# cannot make it call internal addresses.
REMOTE_MEDIA_ENV = "VICA2_ALLOW_REMOTE_MEDIA"

# Arguments of `ProcessorMixin.apply_chat_template` itself (the rest goes to `__call__`).
CHAT_TEMPLATE_ARGS = frozenset(
    {
        "tools",
        "documents",
        "add_generation_prompt",
        "continue_final_message",
        "return_assistant_tokens_mask",
        "tokenize",
        "return_tensors",
        "return_dict",
        "load_audio_from_video",
        "sanitize_control_tokens",
    }
)

# A placeholder typed into a text part would be expanded into a video / image that the request does not have (or,
# where the engine only expands the placeholders of the media it got, as vLLM does, read as a stray token): the
# template refuses it, so every engine that renders it (transformers, vLLM's server: a 400 with this text) does.
TYPED_PLACEHOLDER_ERROR = (
    "A text part of the conversation contains '<video>' or '<image>', ViCA2's placeholders: a typed placeholder "
    "would be read as a video or image that is not there. Send the media as their own content parts "
    "(video / video_url, image / image_url), which add the placeholder, and leave it out of the text."
)

# The release's "qwen_1_5" conversation: a default system turn, ChatML turns, and each visual item rendered as its
# placeholder followed by a newline (the release's `<image>\n{question}`). Text parts must not hold placeholders.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif item['type'] == 'video' -%}{{- '<video>\\n' -}}"
    "{%- elif item['type'] == 'text' -%}"
    "{%- if '<video>' in item['text'] or '<image>' in item['text'] -%}"
    "{{- raise_exception(\"" + TYPED_PLACEHOLDER_ERROR + "\") -}}"
    "{%- endif -%}{{- item['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- render(message['content']) + '<|im_end|>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- render(message['content']) + '<|im_end|>' -}}{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def time_instruction(metadata: VideoMetadata | None) -> str | None:
    """The release's time instruction for a sampled video, or None when the timing is unknown.

    Exactly as the release's training code writes it (train.py): frame times with two decimals joined by ",", and
    no space before "Please".
    """
    if metadata is None or not metadata.fps or metadata.frames_indices is None:
        return None
    duration = metadata.duration if metadata.duration is not None else metadata.total_num_frames / metadata.fps
    times = ",".join(f"{t:.2f}s" for t in metadata.timestamps)
    return (
        f"The video lasts for {duration:.2f} seconds, and {len(metadata.frames_indices)} frames are uniformly "
        f"sampled from it. These frames are located at {times}.Please answer the following questions related to "
        "this video."
    )


class Vica2Processor(ProcessorMixin):
    r"""
    Tokenizer + [`Vica2ImageProcessor`] + PyAV video loading for ViCA2.

    Args:
        image_processor ([`Vica2ImageProcessor`]): SigLIP / Hiera pixel recipes.
        tokenizer: the Qwen2 tokenizer, with `<image>` and `<video>` as special tokens (see `from_model_config`).
        chat_template (`str`, *optional*): defaults to the release's "qwen_1_5" conversation.
        image_token (`str`, defaults to `"<image>"`), video_token (`str`, defaults to `"<video>"`): placeholders.
        token_layout (`dict`, *optional*): `Vica2Config.token_layout()` of the checkpoint (defaults: ViCA2-7B).
        add_time_instruction (`bool`, defaults to `True`): `apply_chat_template` adds the release's time
            instruction after a video whose timing is known (training used it).
        allow_remote_media (`bool`, *optional*): whether media given as URLs (http, https, rtsp, ftp, data, ...) are
            fetched. `False` refuses them before anything is fetched; unset (`None`), the environment variable
            `VICA2_ALLOW_REMOTE_MEDIA` decides (`0` refuses), and URLs are fetched when it is unset too.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        image_token: str = "<image>",
        video_token: str = "<video>",
        token_layout: dict | None = None,
        add_time_instruction: bool = True,
        allow_remote_media: bool | None = None,
        **kwargs,
    ):
        self.image_token = image_token
        self.video_token = video_token
        self.image_token_id = _placeholder_id(tokenizer, image_token)
        self.video_token_id = _placeholder_id(tokenizer, video_token)
        self.token_layout = dict(token_layout) if token_layout is not None else Vica2Config().token_layout()
        self.add_time_instruction = add_time_instruction
        self.allow_remote_media = allow_remote_media
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE, **kwargs)
        _check_layout_matches(self.token_layout, self.image_processor)
        # Built from the image processor (it has no settings of its own to save); serving engines look for it.
        self.video_processor = Vica2VideoProcessor(self.image_processor)

    @classmethod
    def from_model_config(cls, config, tokenizer, image_processor=None, **kwargs) -> Vica2Processor:
        """Build the processor of a checkpoint from its `Vica2Config` and tokenizer (what the converter uses).

        Adds `<image>` and `<video>` to the tokenizer as special tokens when missing (they must get the config's
        `image_token_id` / `video_token_id`), makes left padding the default (generation), and sizes the image
        processor from the towers: S = `vision_config.image_size`, Hs = `hiera_config.image_size[0]`.
        """
        missing = [t for t in ("<image>", "<video>") if _token_in_vocab(tokenizer, t) is None]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
        for token, expected in (("<image>", config.image_token_id), ("<video>", config.video_token_id)):
            actual = tokenizer.convert_tokens_to_ids(token)
            if actual != expected:
                raise ValueError(
                    f"The tokenizer gives {token} the id {actual} but the model config expects {expected}: the model "
                    "would not find its placeholders. Use the checkpoint's own tokenizer, or set the config's "
                    "image_token_id / video_token_id to the tokenizer's ids."
                )
        tokenizer.padding_side = "left"
        if image_processor is None:
            hiera_size = config.hiera_config.image_size
            image_processor = Vica2ImageProcessor(
                size={"height": config.vision_config.image_size, "width": config.vision_config.image_size},
                hiera_size=hiera_size[0] if isinstance(hiera_size, (list, tuple)) else hiera_size,
                image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
            )
        return cls(image_processor=image_processor, tokenizer=tokenizer, token_layout=config.token_layout(), **kwargs)

    # ------------------------------------------------------------------------------------------- __call__
    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs) -> BatchFeature:
        r"""
        Tokenize `text`, expanding every `<image>` / `<video>`, and prepare the pixels of `images` / `videos`.

        Args:
            images: a PIL image, uint8 array / tensor (H, W, 3), path, or a (nested) list of them, one per `<image>`.
            text (`str` or `list[str]`): prompts holding exactly one placeholder per visual item, in order.
            videos: one per `<video>`: a path / URL / binary file object (sampled with PyAV), decoded frames (a uint8
                (T, H, W, 3) array or tensor, or a list of PIL images / arrays; used as given), a `DecodedVideo`
                (`processor.load_video`), or a (frames, metadata) pair; or a (nested) list of those.
            num_frames (`int`): frames to sample from each video file (default: the video frame budget).
            video_frames_budget, hiera_frames, siglip_pool_stride, hiera_pool_stride (`int`): token-ratio overrides;
                returned in the output for the model.
            decode_workers (`int`): threads decoding keyframe segments of a video file in parallel (default: one
                per core this process may use); the pixels do not depend on it.
            device (`str` or `torch.device`): prepare video pixels there (e.g. `"cuda"`): the Hiera resize and both
                normalisations run on it, SigLIP's exact PIL resize stays on the CPU. Outputs are on `device`.
            fast_decode (`bool`, defaults to `False`): resize while decoding (swscale, from YUV); faster, not
                bit-exact.
            do_sample_frames (`bool`, defaults to `False`): decoded frames given with metadata (which frames of the
                video they are: `frames_indices`, `total_num_frames`) are sampled as the release samples a file,
                `num_frames` (default: the frame budget) of the whole video. An explicit `num_frames` samples too.
                Serving engines (vLLM) pass it with the frames they decoded.
            hiera_antialias (`bool`): antialias the Hiera resize (default off, as the release).
            video_metadata: `VideoMetadata` (or dict) per decoded-frames video, kept for `return_metadata=True`.
            padding, padding_side, truncation, max_length, return_tensors (default `"pt"`), ...: tokenizer options.

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask`, and for images `pixel_values`, `image_sizes`,
            `hiera_pixel_values`, for videos `pixel_values_videos`, `hiera_pixel_values_videos` (lists when the
            videos have different frame counts) and `video_token_ratio` (the four token-ratio settings of each video,
            overrides applied, for the model).
        """
        if audio is not None:
            raise ValueError("ViCA2 does not take audio; pass images and/or videos.")
        settings = self._call_settings(kwargs)
        texts = _as_text_list(text)
        image_list, video_list = flatten_images(images), flatten_videos(videos)
        for item in image_list:
            self.check_media_source(item, "image")
        for item in video_list:
            self.check_media_source(item, "video")
        if texts is not None:  # before any decoding: a wrong prompt fails fast
            self._check_placeholders(texts, len(image_list), len(video_list))
        data = {}
        image_replacements = self._image_inputs(image_list, settings, data)
        video_replacements = self._video_inputs(video_list, settings, data)
        if texts is not None:
            data = {**self._text_inputs(texts, image_replacements, video_replacements, settings), **data}
        # Token-ratio overrides reach the model through each video's `video_token_ratio` row (a per-item field is
        # what a serving engine can batch; call-level scalars would not be attributable to an item).
        return BatchFeature(data)

    def _call_settings(self, kwargs: dict) -> _CallSettings:
        kwargs = _flatten_modality_kwargs(kwargs)
        overrides = {name: kwargs.pop(name) for name in TOKEN_RATIO_ARGS if name in kwargs}
        overrides = {name: value for name, value in overrides.items() if value is not None}
        num_frames = kwargs.pop("num_frames", None)
        return _CallSettings(
            overrides=overrides,
            layout=self.resolve_token_layout(**overrides),
            num_frames=None if num_frames is None else positive_int("num_frames", num_frames, "frames to sample"),
            fast_decode=bool(kwargs.pop("fast_decode", False)),
            decode_workers=kwargs.pop("decode_workers", None),
            sample_frames=bool(kwargs.pop("do_sample_frames", False)),
            video_metadata=kwargs.pop("video_metadata", None),
            return_metadata=bool(kwargs.pop("return_metadata", False)),
            return_offsets=bool(kwargs.pop("return_text_replacement_offsets", False)),
            return_mm_token_type_ids=bool(kwargs.pop("return_mm_token_type_ids", False)),
            image_kwargs=self._image_kwargs(kwargs),
            text_kwargs=_tokenizer_kwargs(kwargs),
        )

    def _image_inputs(self, images: list, settings: _CallSettings, data: dict) -> list[str]:
        """Adds the images' pixels to `data`; returns each image's expanded placeholder."""
        if not images:
            return []
        image_inputs = self.image_processor(images, **settings.image_kwargs)
        data.update(image_inputs)
        return [
            self.image_token * sum(num_image_tokens(int(height), int(width), **settings.layout))
            for height, width in image_inputs["image_sizes"].tolist()
        ]

    def _video_inputs(self, videos: list, settings: _CallSettings, data: dict) -> list[str]:
        """Reads / checks the videos and adds their pixels to `data`; returns each video's expanded placeholder."""
        if not videos:
            return []
        decoded = self._decoded_videos(videos, settings)
        data.update(self._video_pixels(decoded, settings.layout, _pixel_options(settings.image_kwargs)))
        if settings.return_metadata:
            data["video_metadata"] = [video.metadata for video in decoded]
        row = [settings.layout[name] for name in TOKEN_RATIO_ARGS]
        data[VIDEO_TOKEN_RATIO] = torch.tensor([row] * len(decoded), dtype=torch.long)
        return [self.video_token * sum(num_video_tokens(v.num_frames, **settings.layout)) for v in decoded]

    def _text_inputs(self, texts, image_replacements, video_replacements, settings: _CallSettings) -> dict:
        expanded, offsets = self.get_text_with_replacements(list(texts), image_replacements, video_replacements, [])
        text_inputs = self.tokenizer(expanded, **settings.text_kwargs)
        self._check_special_mm_tokens(expanded, text_inputs, modalities=["image", "video"])  # e.g. truncation
        if settings.return_offsets:
            text_inputs["text_replacement_offsets"] = offsets
        if settings.return_mm_token_type_ids:
            text_inputs["mm_token_type_ids"] = self.create_mm_token_type_ids(text_inputs["input_ids"])
        return dict(text_inputs)

    def resolve_token_layout(self, **overrides) -> dict:
        """The token layout with per-call overrides applied; raises a clear error for a bad override."""
        layout = dict(self.token_layout)
        for name, value in overrides.items():
            if name not in TOKEN_RATIO_ARGS:
                raise TypeError(f"Unknown token-ratio setting {name!r}; known: {', '.join(TOKEN_RATIO_ARGS)}.")
            layout[name] = positive_int(name, value, f"default from the checkpoint: {self.token_layout[name]}")
        check_frame_ratio(layout["video_frames_budget"], layout["hiera_frames"])
        return layout

    def check_media_source(self, source, kind: str = "media") -> None:
        """Refuse a media URL when remote media are off (`allow_remote_media`); called before anything is fetched."""
        if not is_remote_media(source) or self._remote_media_allowed():
            return
        source = os.fspath(source)
        shown = source if len(source) <= 120 else source[:120] + "..."
        raise ValueError(
            f"Refusing to fetch the {kind} '{shown}': this processor does not fetch remote media "
            f"(allow_remote_media=False or {REMOTE_MEDIA_ENV}=0). Download it yourself and pass the local file, a PIL "
            "image or decoded frames."
        )

    def _remote_media_allowed(self) -> bool:
        if self.allow_remote_media is not None:
            return bool(self.allow_remote_media)
        value = os.environ.get(REMOTE_MEDIA_ENV, "")
        if value.strip().lower() in ("", "1", "true", "yes", "on"):
            return True
        if value.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{REMOTE_MEDIA_ENV}={value!r}: set it to 1 (fetch media URLs) or 0 (refuse them).")

    # ------------------------------------------------------------------------------------------- videos
    def load_video(
        self,
        source,
        num_frames: int | None = None,
        fast_decode: bool = False,
        decode_workers: int | None = None,
        hiera_antialias: bool | None = None,
        device=None,
        **overrides,
    ) -> DecodedVideo:
        """Read and sample a video file once, e.g. to reuse it across prompts: pass the result as `videos=`.

        `num_frames` defaults to the (overridden) frame budget. The model's pixels are prepared while the video
        decodes, for the Hiera frame stride of `overrides` and the given `hiera_antialias` / `device`; calls with
        those settings reuse them, calls with others prepare them again from the kept frames. With
        `fast_decode=True` the frames are resized while decoding; use the same overrides when passing the result on.
        """
        layout = self.resolve_token_layout(**overrides)
        options = {"hiera_antialias": hiera_antialias, "device": device}
        return self._read_video(source, layout, num_frames, fast_decode, decode_workers, options, keep_frames=True)

    def _read_video(
        self, source, layout, num_frames, fast_decode, decode_workers=None, pixel_options=None, keep_frames=False
    ) -> DecodedVideo:
        """Read a video file; in exact mode its pixels are prepared as its frames decode (`pixel_options`: the
        call's `hiera_antialias` / `device`), keeping the full-size frames only with `keep_frames`."""
        self.check_media_source(source, "video")
        num_frames = positive_int(
            "num_frames", num_frames if num_frames is not None else layout["video_frames_budget"], "frames to sample"
        )
        stride = _hiera_frame_stride(layout)
        if fast_decode:
            fast = FastResize(_side(self.image_processor), self.image_processor.hiera_size, stride)
            return read_video(source, num_frames, fast, decode_workers=decode_workers,
                              allow_network=self._remote_media_allowed())
        options = pixel_options or {}
        sinks = []

        def make_sink(metadata):  # called once the sampled indices are known, before decoding starts
            sinks.append(
                self.image_processor.video_pixel_sink(
                    metadata.frames_indices, stride, options.get("hiera_antialias"), options.get("device")
                )
            )
            return sinks[0]

        video = read_video(source, num_frames, None, decode_workers, make_frame_sink=make_sink, keep_frames=keep_frames,
                           allow_network=self._remote_media_allowed())
        video.pixels, video.pixels_key = sinks[0].pixels(), self._pixels_key(layout, options)
        return video

    def _pixels_key(self, layout: dict, options: dict) -> tuple:
        return self.video_processor.pixels_key(_hiera_frame_stride(layout), options)

    def _decoded_videos(self, videos: list, settings: _CallSettings) -> list[DecodedVideo]:
        metadata_list = _metadata_list(settings.video_metadata, len(videos))
        decoded = []
        for video, metadata in zip(videos, metadata_list):
            if isinstance(video, DecodedVideo):
                _check_decoded_video(video.num_frames, video.metadata, settings.num_frames)
                decoded.append(video)
            elif _is_file_source(video):
                decoded.append(
                    self._read_video(
                        video,
                        settings.layout,
                        settings.num_frames,
                        settings.fast_decode,
                        settings.decode_workers,
                        _pixel_options(settings.image_kwargs),
                    )
                )
            else:
                decoded.append(self._decoded_frames_video(video, metadata, settings))
        return decoded

    def _decoded_frames_video(self, video, metadata, settings: _CallSettings) -> DecodedVideo:
        """Already-decoded frames (optionally with their metadata): sampled as the release samples a file when asked
        (`do_sample_frames` / `num_frames`) and the metadata says which frames they are, else used as given (then a
        different `num_frames` is an error)."""
        if isinstance(video, tuple) and len(video) == 2 and _is_metadata(video[1]):
            video, metadata = video
        frames = to_video_frames(video, settings.image_kwargs.get("input_data_format"))
        metadata = _as_metadata(metadata)
        if settings.sample_frames or settings.num_frames is not None:
            num_frames = settings.num_frames or settings.layout["video_frames_budget"]
            frames, metadata = self.video_processor.sample_frames(frames, metadata, num_frames)
        _check_decoded_video(len(frames), metadata, settings.num_frames)
        if settings.fast_decode:
            logger.warning_once("fast_decode applies to video files only; decoded frames are processed exactly.")
        return DecodedVideo(metadata, frames=frames)

    def _video_pixels(self, decoded: list[DecodedVideo], layout: dict, options: dict) -> dict:
        return self.video_processor(decoded, _hiera_frame_stride(layout), options)

    # ------------------------------------------------------------------------------------------- text
    def _check_placeholders(self, texts: list[str], num_images: int, num_videos: int) -> None:
        """Exactly one placeholder per visual item: anything else would make a silently wrong prompt."""
        for token, count, kind in ((self.image_token, num_images, "image"), (self.video_token, num_videos, "video")):
            found = sum(len(re.findall(re.escape(token), _unmarked(text))) for text in texts)
            if found != count:
                raise ValueError(
                    f"The text has {found} {token} placeholder(s) but {count} {kind}(s) were given. Write exactly "
                    f"one {token} per {kind}, where it goes, in order (apply_chat_template does this for you); do not "
                    "expand placeholders yourself, the processor does."
                )

    def _image_kwargs(self, kwargs: dict) -> dict:
        names = set(self.image_processor.valid_kwargs.__annotations__) - {"return_tensors"}
        return {name: kwargs.pop(name) for name in list(kwargs) if name in names}

    # ------------------------------------------------------------------------------------------- serving engines
    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs) -> MultiModalData:
        """Placeholder tokens per item, for serving engines that allocate them before processing.

        Args:
            image_sizes: (height, width) of each image (original size).
            video_sizes: (num_frames, height, width) of each video, num_frames being the frames given to the model.
            **kwargs: token-ratio overrides.
        """
        layout = self.resolve_token_layout(**{k: v for k, v in kwargs.items() if k in TOKEN_RATIO_ARGS})
        data = {}
        if image_sizes is not None:
            data["num_image_tokens"] = [sum(num_image_tokens(int(h), int(w), **layout)) for h, w in image_sizes]
            data["num_image_patches"] = [1] * len(image_sizes)  # one row of `pixel_values` per image
        if video_sizes is not None:
            data["num_video_tokens"] = [sum(num_video_tokens(int(size[0]), **layout)) for size in video_sizes]
        return MultiModalData(**data)

    @property
    def model_input_names(self) -> list[str]:
        names = list(self.tokenizer.model_input_names) + list(self.image_processor.model_input_names)
        return list(dict.fromkeys(names + list(self.video_processor.model_input_names)))

    # ------------------------------------------------------------------------------------------- chat template
    def apply_chat_template(self, conversation, chat_template=None, add_time_instruction=None, **kwargs):
        """`ProcessorMixin.apply_chat_template` with ViCA2's media handling.

        Video entries (`{"type": "video", "path" | "url" | "video": ...}`) are read once here (with `tokenize=True`;
        only their timing is probed otherwise), and, when `add_time_instruction` (default: the processor's setting)
        and the video's timing is known, the release's time instruction follows the video, so the user turn reads
        `<video>\\n{time instruction}\\n\\n{text}` as in training. Decoded frames have no timing unless the entry
        has `"metadata"`. ViCA2 settings (`num_frames`, `fast_decode`, token-ratio overrides, tokenizer options) may
        be given as keyword arguments or in `processor_kwargs`.
        """
        processor_kwargs = dict(kwargs.pop("processor_kwargs", None) or {})
        template = self._template_string(chat_template)
        for name in [k for k in kwargs if k not in CHAT_TEMPLATE_ARGS and k not in _template_variables(template)]:
            processor_kwargs[name] = kwargs.pop(name)
        loading = {name: processor_kwargs.pop(name) for name in VIDEO_LOADING_ARGS if name in processor_kwargs}
        loading["pixel_options"] = _pixel_options(_flatten_modality_kwargs(processor_kwargs))
        overrides = {
            name: processor_kwargs[name] for name in TOKEN_RATIO_ARGS if processor_kwargs.get(name) is not None
        }
        add_time = self.add_time_instruction if add_time_instruction is None else add_time_instruction
        conversations, is_batched = _copy_conversations(conversation)
        for messages in conversations:  # before anything is read or probed
            for message in messages:
                for block in message.get("content") if isinstance(message.get("content"), list) else []:
                    for kind, source in _chat_media_sources(block):
                        self.check_media_source(source, kind)
        for messages in conversations:
            for message in messages:
                if isinstance(message.get("content"), list):
                    message["content"] = self._with_loaded_videos(
                        message["content"], kwargs.get("tokenize", False), add_time, loading, overrides
                    )
        from jinja2 import TemplateError  # transformers' chat templates need jinja2

        try:
            return super().apply_chat_template(
                conversations if is_batched else conversations[0],
                chat_template=chat_template,
                processor_kwargs=processor_kwargs,
                **kwargs,
            )
        except TemplateError as error:  # the template's refusals (a typed placeholder) are bad input, as elsewhere
            raise ValueError(str(error)) from error

    def _with_loaded_videos(self, content: list, tokenize: bool, add_time: bool, loading: dict, overrides) -> list:
        new_content = []
        for block in content:
            if not (isinstance(block, dict) and block.get("type") == "video"):
                new_content.append(block)
                continue
            video, metadata = self._chat_video(block, tokenize, add_time, loading, overrides)
            new_content.append({"type": "video", "video": video} if tokenize else block)
            instruction = time_instruction(metadata) if add_time else None
            if instruction is not None:
                new_content.append({"type": "text", "text": f"{instruction}\n\n"})
        return new_content

    def _chat_video(self, block: dict, tokenize: bool, add_time: bool, loading: dict, overrides: dict):
        """(what `__call__` gets, metadata or None) for a chat video entry. A file is read only when tokenizing, and
        otherwise probed (index pass only) only when its timing is needed for the time instruction."""
        sources = [block[key] for key in ("video", "path", "url") if key in block]
        if len(sources) != 1:
            raise ValueError(f"A video entry needs exactly one of 'video', 'path' or 'url'; got {sorted(block)}.")
        source = sources[0]
        if isinstance(source, DecodedVideo):
            _check_decoded_video(source.num_frames, source.metadata, loading.get("num_frames"))
            return source, source.metadata
        if _is_file_source(source):
            layout = self.resolve_token_layout(**overrides)
            if tokenize:
                video = self._read_video(
                    source,
                    layout,
                    loading.get("num_frames"),
                    loading.get("fast_decode", False),
                    loading.get("decode_workers"),
                    loading["pixel_options"],
                )
                return video, video.metadata
            if not add_time:
                return source, None
            num_frames = loading.get("num_frames") or layout["video_frames_budget"]
            frames = positive_int("num_frames", num_frames, "frames to sample")
            return source, probe_video(source, frames, allow_network=self._remote_media_allowed())
        metadata = _as_metadata(block.get("metadata"))
        num_frames = _decoded_frame_count(source)
        if num_frames is not None:  # else `__call__` names what is wrong with the frames
            _check_decoded_video(num_frames, metadata, loading.get("num_frames"))
        if metadata is None:
            return source, None
        return (source, metadata), metadata

    def _template_string(self, chat_template):
        if chat_template is None:
            chat_template = self.chat_template
        if isinstance(chat_template, dict):
            chat_template = chat_template.get("default")
        return chat_template

    # ------------------------------------------------------------------------------------------- saving
    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """`ProcessorMixin.save_pretrained`, plus a `preprocessor_config.json` of the image processor for loaders
        that look for one (transformers 4.x, some serving engines). Written first, so a push includes it."""
        os.makedirs(save_directory, exist_ok=True)
        image_config = self.image_processor.to_dict()
        image_config["processor_class"] = type(self).__name__
        image_processor_class = type(self.image_processor)
        auto_map = image_config.setdefault("auto_map", {})
        auto_map["AutoImageProcessor"] = (
            f"{image_processor_class.__module__.split('.')[-1]}.{image_processor_class.__name__}"
        )
        auto_map["AutoProcessor"] = f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"
        path = os.path.join(save_directory, "preprocessor_config.json")
        with open(path, "w", encoding="utf-8") as file:
            file.write(json.dumps(image_config, indent=2, sort_keys=True) + "\n")
        return [*super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs), path]


# ----------------------------------------------------------------------------------------------- helpers
@dataclass
class _CallSettings:
    """The options of one `Vica2Processor.__call__`, sorted out and checked."""

    overrides: dict  # token-ratio overrides given by the caller (returned in the output for the model)
    layout: dict  # the token layout with those overrides applied
    num_frames: int | None
    fast_decode: bool
    decode_workers: int | None
    sample_frames: bool
    video_metadata: object
    return_metadata: bool
    return_offsets: bool
    return_mm_token_type_ids: bool
    image_kwargs: dict
    text_kwargs: dict


def _pixel_options(kwargs: dict) -> dict:
    """The call's settings that decide a video's pixels besides the token layout."""
    return {name: kwargs.get(name) for name in VIDEO_PIXEL_ARGS}


def _check_decoded_video(num_frames: int, metadata: VideoMetadata | None, requested: int | None) -> None:
    """Decoded frames are used as given, so a `num_frames` asking for another count, or metadata describing other
    frames (its indices make the time instruction), would leave a silently wrong prompt."""
    if requested is not None and requested != num_frames:
        raise ValueError(
            f"num_frames={requested} was asked for, but this video is already decoded into {num_frames} frames, "
            f"which are used as they are. Leave num_frames out, sample the frames yourself, or pass the video file "
            f"to have {requested} frames sampled."
        )
    indices = None if metadata is None else metadata.frames_indices
    if indices is None:
        return
    if len(indices) != num_frames:
        raise ValueError(
            f"The video's metadata lists {len(indices)} frame indices (frames_indices) for {num_frames} frames; give "
            "one index per frame: its position in the source video."
        )
    total = metadata.total_num_frames
    if len(indices) and (min(indices) < 0 or (total is not None and max(indices) >= total)):
        raise ValueError(
            f"The video's metadata has frames_indices from {min(indices)} to {max(indices)}, outside its "
            f"total_num_frames={total} (indices run from 0 to total_num_frames - 1)."
        )


def _token_in_vocab(tokenizer, token: str) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (tokenizer.unk_token_id is not None and token_id == tokenizer.unk_token_id):
        return None
    return token_id


def _placeholder_id(tokenizer, token: str) -> int:
    if tokenizer is None:
        raise ValueError("Vica2Processor needs a tokenizer.")
    token_id = _token_in_vocab(tokenizer, token)
    if token_id is None:
        raise ValueError(
            f"The tokenizer has no {token} token. Build the processor with "
            "`Vica2Processor.from_model_config(config, tokenizer)`, which adds <image> and <video> as special tokens."
        )
    return token_id


def _side(image_processor) -> int:
    size = image_processor.size
    return size["height"] if isinstance(size, dict) else size.height


def _check_layout_matches(layout: dict, image_processor) -> None:
    """The image processor's sizes and tiling grid must be the ones the token layout counts with."""
    side = _side(image_processor)
    if side != layout["siglip_image_size"]:
        raise ValueError(
            f"The image processor resizes to {side} but the token layout counts with SigLIP images of "
            f"{layout['siglip_image_size']}: build both from the same config (Vica2Processor.from_model_config)."
        )
    pinpoints = [list(p) for p in image_processor.image_grid_pinpoints]
    if pinpoints != [list(p) for p in layout["image_grid_pinpoints"]]:
        raise ValueError(
            "The image processor's image_grid_pinpoints differ from the token layout's: build both from the same "
            "config (Vica2Processor.from_model_config)."
        )


def _hiera_frame_stride(layout: dict) -> int:
    return check_frame_ratio(layout["video_frames_budget"], layout["hiera_frames"])


def _flatten_modality_kwargs(kwargs: dict) -> dict:
    """Accept transformers' nested `text_kwargs` / `images_kwargs` / `videos_kwargs` / `common_kwargs` too."""
    flat = {}
    for key, value in kwargs.items():
        if key in ("text_kwargs", "images_kwargs", "videos_kwargs", "common_kwargs") and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _tokenizer_kwargs(kwargs: dict) -> dict:
    unknown = sorted(set(kwargs) - TOKENIZER_ARGS)
    if unknown:
        raise TypeError(
            f"Unknown argument(s) {', '.join(unknown)} for Vica2Processor. ViCA2 settings: "
            f"{', '.join(TOKEN_RATIO_ARGS + VIDEO_LOADING_ARGS)}, hiera_antialias, video_metadata, return_metadata; "
            "other arguments go to the tokenizer (padding, padding_side, truncation, max_length, return_tensors, ...)."
        )
    text_kwargs = {"padding": True, "return_tensors": "pt", **kwargs}
    return text_kwargs


def _as_text_list(text) -> list[str] | None:
    if text is None:
        return None
    texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
    if texts is None or not all(isinstance(t, str) for t in texts):
        raise ValueError("`text` must be a string or a list of strings.")
    return texts


def _unmarked(text: str) -> str:
    # transformers >= 5.24 can mark user-written control tokens as text (`sanitize_control_tokens`); those are not
    # placeholders.
    marked = getattr(processing_utils, "_MARKED_RE", None)
    return marked.sub("", text) if marked is not None else text


def _is_file_source(video) -> bool:
    return isinstance(video, (str, os.PathLike)) or (hasattr(video, "read") and not isinstance(video, np.ndarray))


def _is_metadata(value) -> bool:
    return isinstance(value, (VideoMetadata, dict))


def _is_frame(value) -> bool:
    return isinstance(value, Image.Image) or (isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 3)


def _is_single_video(video) -> bool:
    if isinstance(video, DecodedVideo) or _is_file_source(video):
        return True
    if isinstance(video, (np.ndarray, torch.Tensor)):
        return video.ndim != 5
    if isinstance(video, tuple) and len(video) == 2 and _is_metadata(video[1]):
        return True
    return isinstance(video, (list, tuple)) and len(video) > 0 and all(_is_frame(frame) for frame in video)


def flatten_videos(videos) -> list:
    """A flat list of single videos from a video or a (nested) list of videos; a list of frames is one video."""
    if videos is None:
        return []
    if _is_single_video(videos):
        return [videos]
    if isinstance(videos, (np.ndarray, torch.Tensor)):  # (num_videos, T, H, W, C)
        return list(videos)
    if isinstance(videos, (list, tuple)):
        return [video for item in videos for video in flatten_videos(item)]
    raise TypeError(
        f"Unsupported video input {type(videos).__name__}: pass a path, a file object, decoded frames (a uint8 "
        "(T, H, W, 3) array or a list of frames), or a list of those."
    )


def _metadata_list(video_metadata, count: int) -> list:
    if video_metadata is None:
        return [None] * count
    items = [video_metadata] if _is_metadata(video_metadata) else list(video_metadata)
    if len(items) != count:
        raise ValueError(f"Got {len(items)} video_metadata entries for {count} videos; give one per video.")
    return items


def _decoded_frame_count(video) -> int | None:
    """The number of frames of decoded frames (an array / tensor (T, ...) or a list of frames), else None."""
    if isinstance(video, (np.ndarray, torch.Tensor)):
        return int(video.shape[0]) if video.ndim == 4 else None
    if isinstance(video, (list, tuple)) and video and all(_is_frame(frame) for frame in video):
        return len(video)
    return None


def _as_metadata(metadata) -> VideoMetadata | None:
    if metadata is None or isinstance(metadata, VideoMetadata):
        return metadata
    if isinstance(metadata, dict):
        return VideoMetadata(**metadata)
    raise TypeError(f"Video metadata must be a VideoMetadata or a dict, got {type(metadata).__name__}.")


def _copy_conversations(conversation) -> tuple[list, bool]:
    """Copy the message structure (not the media in it) so that rewriting entries leaves the caller's intact."""
    is_batched = (
        isinstance(conversation, (list, tuple)) and conversation and isinstance(conversation[0], (list, tuple))
    )
    conversations = conversation if is_batched else [conversation]
    copied = []
    for messages in conversations:
        copied.append(
            [
                {**message, "content": [dict(b) if isinstance(b, dict) else b for b in message["content"]]}
                if isinstance(message.get("content"), list)
                else dict(message)
                for message in messages
            ]
        )
    return copied, bool(is_batched)


def _chat_media_sources(block) -> list[tuple[str, object]]:
    """(kind, source) of the media a chat content block names (HF and OpenAI "image_url" forms)."""
    if not isinstance(block, dict):
        return []
    kind = block.get("type")
    if kind == "image_url":
        url = block.get("image_url")
        return [("image", url.get("url") if isinstance(url, dict) else url)]
    if kind not in ("image", "video"):
        return []
    return [(kind, block[key]) for key in (kind, "url", "path") if key in block]


def _template_variables(template) -> frozenset:
    try:  # private in transformers; only used to leave the template's own variables in place
        from transformers.utils.chat_template_utils import _get_template_variables
    except ImportError:
        return frozenset()
    return _get_template_variables(template) if isinstance(template, str) else frozenset()


Vica2Processor.register_for_auto_class("AutoProcessor")

__all__ = ["Vica2Processor"]
