# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""ViCA2 processor: tokenizes, expands every `<image>` / `<video>` to exactly the model's token count for the item
(`_get_num_multimodal_tokens`, the one place that counts, with the config's `token_layout` and per-call token-ratio
overrides, which reach the model as each video's `video_token_ratio` row) and renders the chat; pixels come from
`Vica2ImageProcessor` and `Vica2VideoProcessor`."""

from __future__ import annotations

import json
import os
import re

import torch

from transformers import processing_utils
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import MultiModalData, ProcessorMixin, TextKwargs
from transformers.video_utils import VideoMetadata

from .configuration_vica2 import (
    TOKEN_RATIO_ARGS,
    Vica2Config,
    check_frame_ratio,
    num_image_tokens,
    num_video_tokens,
    positive_int,
)
from .image_processing_vica2 import Vica2ImageProcessor, flatten_images, is_remote_media
from .video_loading_vica2 import DecodedVideo
from .video_processing_vica2 import (
    Vica2VideoProcessor,
    as_metadata,
    check_decoded_video,
    decoded_frame_count,
    flatten_videos,
    is_file_source,
)


# Settings of the video processor's call (reading, sampling, pixels) besides the token ratio.
VIDEO_ARGS = (
    "num_frames", "fast_decode", "decode_workers", "allow_playlists", "max_video_pixels", "do_sample_frames",
    "video_metadata", "hiera_antialias", "device", "input_data_format",
)  # fmt: skip
TEXT_OPTIONS = ("return_text_replacement_offsets", "return_mm_token_type_ids")  # ours, not the tokenizer's
TOKENIZER_ARGS = frozenset(TextKwargs.__annotations__) - set(TEXT_OPTIONS)
# Media URLs are fetched by default, as transformers does; a server passing users' chats sets `allow_remote_media=False`
# (or this variable to 0) so that a chat cannot make it call internal addresses.
REMOTE_MEDIA_ENV = "VICA2_ALLOW_REMOTE_MEDIA"

# Arguments of `ProcessorMixin.apply_chat_template` itself (the rest goes to `__call__`).
CHAT_TEMPLATE_ARGS = frozenset({
    "tools", "documents", "add_generation_prompt", "continue_final_message", "return_assistant_tokens_mask",
    "tokenize", "return_tensors", "return_dict", "load_audio_from_video", "sanitize_control_tokens",
})  # fmt: skip

# A typed placeholder would be expanded into media the request does not have (or read as a stray token where the
# engine expands only its media's, as vLLM does): the template refuses it, so every engine that renders it does.
TYPED_PLACEHOLDER_ERROR = (
    "A text part of the conversation contains '<video>' or '<image>', ViCA2's placeholders: a typed placeholder "
    "would be read as a video or image that is not there. Send the media as their own content parts "
    "(video / video_url, image / image_url), which add the placeholder, and leave it out of the text."
)

# The release's "qwen_1_5" conversation: a default system turn, ChatML turns, and each visual item rendered as its
# placeholder followed by a newline (the release's `<image>\n{question}`). Text parts must not hold placeholders. With
# `engine_expands_videos` (vLLM with ViCA2's plugin) a video without a source is `<video><video>`, which the plugin
# replaces with the placeholders and the time instruction (tools/vllm_plugin.py); any other engine gets `<video>\n`.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif item['type'] == 'video' -%}"
    "{{- '<video><video>' if engine_expands_videos | default(false) and not ('video' in item or 'path' in item or "
    "'url' in item) else '<video>\\n' -}}"
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
    """The release's time instruction (exactly as its train.py writes it: no space before "Please"), or None when the
    timing is unknown."""
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
    Tokenizer + [`Vica2ImageProcessor`] + [`Vica2VideoProcessor`] (`video_processor`) for ViCA2.

    Args:
        image_processor, tokenizer (the Qwen2 tokenizer with `<image>` / `<video>` special tokens: `from_model_config`).
        chat_template (`str`, *optional*): defaults to the release's "qwen_1_5" conversation.
        image_token, video_token (`str`, defaults to `"<image>"`, `"<video>"`): the placeholders.
        token_layout (`dict`, *optional*): `Vica2Config.token_layout()` of the checkpoint (defaults: ViCA2-7B).
        add_time_instruction (`bool`, defaults to `True`): the chat template adds the release's time instruction.
        allow_remote_media (`bool`, *optional*): whether media URLs are fetched (unset: `VICA2_ALLOW_REMOTE_MEDIA`).
        video_processor ([`Vica2VideoProcessor`], *optional*): default: built from the image processor's recipe.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_token: str = "<image>",
                 video_token: str = "<video>", token_layout: dict | None = None, add_time_instruction: bool = True,
                 allow_remote_media: bool | None = None, **kwargs):
        # Not a named parameter: ProcessorMixin would type-check it against a base class needing torchvision (< 5.18).
        video_processor = kwargs.pop("video_processor", None)
        self.image_token, self.video_token = image_token, video_token
        self.image_token_id, self.video_token_id = _placeholder_id(tokenizer, image_token), _placeholder_id(tokenizer, video_token)
        self.token_layout = dict(token_layout) if token_layout is not None else Vica2Config().token_layout()
        self.add_time_instruction, self.allow_remote_media = add_time_instruction, allow_remote_media
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE, **kwargs)
        self.video_processor = video_processor or Vica2VideoProcessor.from_image_processor(self.image_processor)
        _check_layout_matches(self.token_layout, self.image_processor, self.video_processor)

    @classmethod
    def from_model_config(cls, config, tokenizer, image_processor=None, **kwargs) -> Vica2Processor:
        """A checkpoint's processor from its `Vica2Config` and tokenizer: adds `<image>` / `<video>` as special tokens
        when missing (they must get the config's ids), pads on the left (generation), sizes the processors from the
        towers."""
        tokenizer.add_tokens([t for t in ("<image>", "<video>") if _token_in_vocab(tokenizer, t) is None], True)
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
            image_processor = Vica2ImageProcessor(
                size={"height": config.vision_config.image_size, "width": config.vision_config.image_size},
                hiera_size=config.hiera_image_size, image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
            )
        return cls(image_processor=image_processor, tokenizer=tokenizer, token_layout=config.token_layout(), **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """With the video processor's own config file (older folders: built from the image processor's recipe)."""
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        video_processor = Vica2VideoProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        if video_processor is not None:
            _check_layout_matches(processor.token_layout, processor.image_processor, video_processor)
            processor.video_processor = video_processor
        return processor

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Also writes the video processor's config and a `preprocessor_config.json` (transformers 4.x, some serving
        engines look for one), first, so that a push includes them."""
        written = self.video_processor.save_pretrained(save_directory)
        image_config = self.image_processor.to_dict()
        image_config["processor_class"] = type(self).__name__
        auto = lambda cls: f"{cls.__module__.split('.')[-1]}.{cls.__name__}"  # noqa: E731
        image_config.setdefault("auto_map", {}).update(AutoImageProcessor=auto(type(self.image_processor)), AutoProcessor=auto(type(self)))
        written.append(os.path.join(save_directory, "preprocessor_config.json"))
        with open(written[-1], "w", encoding="utf-8") as file:
            file.write(json.dumps(image_config, indent=2, sort_keys=True) + "\n")
        return [*super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs), *written]

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs) -> BatchFeature:
        r"""
        Tokenize `text` (one placeholder per visual item, in order), expanding every `<image>` / `<video>`, and prepare
        the pixels of `images` (PIL images, uint8 arrays / tensors, paths) and `videos` (anything `Vica2VideoProcessor`
        reads), each a (nested) list or one item.

        Keyword arguments: token-ratio overrides (`TOKEN_RATIO_ARGS`); the video processor's settings (`VIDEO_ARGS`,
        `return_metadata`; `hiera_antialias`, `input_data_format` apply to images too); tokenizer options (padding,
        truncation, max_length, return_tensors (default `"pt"`), ...).

        Returns: `BatchFeature` with `input_ids`, `attention_mask`, the images' `pixel_values`, `image_sizes`,
        `hiera_pixel_values`, the videos' `pixel_values_videos`, `hiera_pixel_values_videos` (lists when frame counts
        differ) and `video_token_ratio` (each video's four token-ratio settings, for the model).
        """
        if audio is not None:
            raise ValueError("ViCA2 does not take audio; pass images and/or videos.")
        kwargs = _flatten_modality_kwargs(kwargs)
        overrides = {name: kwargs.pop(name) for name in TOKEN_RATIO_ARGS if name in kwargs}
        overrides = {name: value for name, value in overrides.items() if value is not None}
        layout = self.resolve_token_layout(**overrides)
        video_kwargs = {name: kwargs.pop(name) for name in VIDEO_ARGS[:7] if name in kwargs}
        video_kwargs.update({name: kwargs[name] for name in VIDEO_ARGS[7:] if name in kwargs})  # images' too
        return_metadata = bool(kwargs.pop("return_metadata", False))
        options = {name: bool(kwargs.pop(name, False)) for name in TEXT_OPTIONS}
        image_kwargs = self._image_kwargs(kwargs)
        text_kwargs = _tokenizer_kwargs(kwargs)
        texts = _as_text_list(text)
        image_list, video_list = flatten_images(images), flatten_videos(videos)
        for kind, items in (("image", image_list), ("video", video_list)):
            for item in items:
                self.check_media_source(item, kind)
        if texts is not None:  # before any decoding: a wrong prompt fails fast
            self._check_placeholders(texts, len(image_list), len(video_list))
        data = dict(self.image_processor(image_list, **image_kwargs)) if image_list else {}
        if video_list:
            video_kwargs.update(
                num_frames=self._num_frames(video_kwargs.get("num_frames"), None),
                default_num_frames=layout["video_frames_budget"],
                hiera_frame_stride=check_frame_ratio(layout["video_frames_budget"], layout["hiera_frames"]),
                allow_network=self._remote_media_allowed(),
                return_metadata=return_metadata,
            )
            data.update(self.video_processor(videos, **video_kwargs))  # flattened there the same way
            row = [layout[name] for name in TOKEN_RATIO_ARGS]
            data["video_token_ratio"] = torch.tensor([row] * len(video_list), dtype=torch.long)
        if texts is not None:
            data = {**self._text_inputs(texts, data, overrides, text_kwargs, **options), **data}
        return BatchFeature(data)

    def _text_inputs(self, texts, data, overrides, text_kwargs, return_text_replacement_offsets=False,
                     return_mm_token_type_ids=False) -> dict:
        """Tokenized `texts`, each placeholder expanded to its item's token count."""
        sizes = {}
        if "image_sizes" in data:
            sizes["image_sizes"] = data["image_sizes"].tolist()
        if "pixel_values_videos" in data:
            sizes["video_sizes"] = [(len(frames), 0, 0) for frames in data["pixel_values_videos"]]
        counts = self._get_num_multimodal_tokens(**sizes, **overrides)
        images = [self.image_token * count for count in getattr(counts, "num_image_tokens", None) or []]
        videos = [self.video_token * count for count in getattr(counts, "num_video_tokens", None) or []]
        expanded, offsets = self.get_text_with_replacements(list(texts), images, videos, [])
        text_inputs = self.tokenizer(expanded, **text_kwargs)
        self._check_special_mm_tokens(expanded, text_inputs, modalities=["image", "video"])  # e.g. truncation
        if return_text_replacement_offsets:
            text_inputs["text_replacement_offsets"] = offsets
        if return_mm_token_type_ids:
            text_inputs["mm_token_type_ids"] = self.create_mm_token_type_ids(text_inputs["input_ids"])
        return dict(text_inputs)

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs) -> MultiModalData:
        """Placeholder tokens per item (serving engines ask before processing): `image_sizes` (original (height,
        width)), `video_sizes` ((frames, height, width)), token-ratio overrides in `kwargs` (other keys ignored)."""
        layout = self.resolve_token_layout(**{k: v for k, v in kwargs.items() if k in TOKEN_RATIO_ARGS})
        data = {}
        if image_sizes is not None:
            data["num_image_tokens"] = [sum(num_image_tokens(int(h), int(w), **layout)) for h, w in image_sizes]
            data["num_image_patches"] = [1] * len(image_sizes)  # one row of `pixel_values` per image
        if video_sizes is not None:
            data["num_video_tokens"] = [sum(num_video_tokens(int(size[0]), **layout)) for size in video_sizes]
        return MultiModalData(**data)

    def resolve_token_layout(self, **overrides) -> dict:
        """The token layout with per-call overrides applied; raises a clear error for a bad override."""
        layout = dict(self.token_layout)
        for name, value in overrides.items():
            if name not in TOKEN_RATIO_ARGS:
                raise TypeError(f"Unknown token-ratio setting {name!r}; known: {', '.join(TOKEN_RATIO_ARGS)}.")
            layout[name] = positive_int(name, value, f"default from the checkpoint: {self.token_layout[name]}")
        check_frame_ratio(layout["video_frames_budget"], layout["hiera_frames"])
        return layout

    @staticmethod
    def _num_frames(num_frames, layout: dict | None) -> int | None:
        """`num_frames` checked, defaulting to the frame budget of `layout` (None: no default)."""
        if num_frames is None:
            return None if layout is None else layout["video_frames_budget"]
        return positive_int("num_frames", num_frames, "frames to sample")

    def _image_kwargs(self, kwargs: dict) -> dict:
        names = set(self.image_processor.valid_kwargs.__annotations__) - {"return_tensors"}
        return {name: kwargs.pop(name) for name in list(kwargs) if name in names}

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

    @property
    def model_input_names(self) -> list[str]:
        names = list(self.tokenizer.model_input_names) + list(self.image_processor.model_input_names)
        return list(dict.fromkeys(names + list(self.video_processor.model_input_names)))

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
        value = os.environ.get(REMOTE_MEDIA_ENV, "").strip().lower()
        if value in ("", "1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{REMOTE_MEDIA_ENV}={value!r}: set it to 1 (fetch media URLs) or 0 (refuse them).")

    def load_video(self, source, num_frames=None, fast_decode=False, decode_workers=None, hiera_antialias=None,
                   device=None, keep_frames: bool = False, allow_playlists=False, max_video_pixels=None,
                   **overrides) -> DecodedVideo:
        """Read and sample a video file once (e.g. to reuse across prompts: pass the result as `videos=`); `num_frames`
        defaults to the (overridden) frame budget. Its pixels are prepared while decoding for the token-ratio
        `overrides`, `hiera_antialias` and `device`; calls with other settings need the full-size frames, kept only
        with `keep_frames=True`. `allow_playlists`, `max_video_pixels`: as in `Vica2VideoProcessor.load_video`."""
        self.check_media_source(source, "video")
        layout = self.resolve_token_layout(**overrides)
        stride = check_frame_ratio(layout["video_frames_budget"], layout["hiera_frames"])
        return self.video_processor.load_video(
            source, self._num_frames(num_frames, layout), stride, fast_decode, decode_workers, hiera_antialias, device,
            keep_frames=keep_frames, allow_network=self._remote_media_allowed(), allow_playlists=allow_playlists,
            max_video_pixels=max_video_pixels,
        )  # fmt: skip

    def apply_chat_template(self, conversation, chat_template=None, add_time_instruction=None, **kwargs):
        """`ProcessorMixin.apply_chat_template` with ViCA2's media: video entries (`{"type": "video", "path" | "url" |
        "video": ...}`) are read once here when tokenizing (else only probed for their timing); with
        `add_time_instruction` (default: the processor's) the release's time instruction follows a video of known timing
        (decoded frames: from the entry's `"metadata"`), as in training. ViCA2 settings may be keyword arguments or
        in `processor_kwargs`."""
        processor_kwargs = dict(kwargs.pop("processor_kwargs", None) or {})
        template = chat_template or self.chat_template
        template = template.get("default") if isinstance(template, dict) else template
        for name in [k for k in kwargs if k not in CHAT_TEMPLATE_ARGS and k not in _template_variables(template)]:
            processor_kwargs[name] = kwargs.pop(name)
        loading = {name: processor_kwargs.pop(name) for name in VIDEO_ARGS[:5] if name in processor_kwargs}
        flat = _flatten_modality_kwargs(processor_kwargs)
        loading.update({name: flat[name] for name in ("hiera_antialias", "device") if name in flat})
        loading.update({name: flat[name] for name in TOKEN_RATIO_ARGS if flat.get(name) is not None})
        add_time = self.add_time_instruction if add_time_instruction is None else add_time_instruction
        conversations, is_batched = _copy_conversations(conversation)
        contents = [m["content"] for messages in conversations for m in messages if isinstance(m.get("content"), list)]
        for kind, source in (item for content in contents for block in content for item in _chat_media_sources(block)):
            self.check_media_source(source, kind)  # every source, before anything is read or probed
        for content in contents:
            content[:] = self._with_loaded_videos(content, kwargs.get("tokenize", False), add_time, loading)
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

    def _with_loaded_videos(self, content: list, tokenize: bool, add_time: bool, loading: dict) -> list:
        new_content = []
        for block in content:
            if not (isinstance(block, dict) and block.get("type") == "video"):
                new_content.append(block)
                continue
            video, metadata = self._chat_video(block, tokenize, add_time, loading)
            new_content.append({"type": "video", "video": video} if tokenize else block)
            instruction = time_instruction(metadata) if add_time else None
            if instruction is not None:
                new_content.append({"type": "text", "text": f"{instruction}\n\n"})
        return new_content

    def _chat_video(self, block: dict, tokenize: bool, add_time: bool, loading: dict):
        """(what `__call__` gets, metadata or None) for a chat video entry. A file is read only when tokenizing, and
        otherwise probed (index pass only) only when its timing is needed for the time instruction."""
        sources = [block[key] for key in ("video", "path", "url") if key in block]
        if len(sources) != 1:
            raise ValueError(f"A video entry needs exactly one of 'video', 'path' or 'url'; got {sorted(block)}.")
        source, requested = sources[0], loading.get("num_frames")
        if isinstance(source, DecodedVideo):
            check_decoded_video(source.num_frames, source.metadata, requested)
            return source, source.metadata
        if is_file_source(source):
            if tokenize:
                video = self.load_video(source, keep_frames=False, **loading)
                return video, video.metadata
            if not add_time:
                return source, None
            num_frames = self._num_frames(requested, self.resolve_token_layout(**{k: v for k, v in loading.items() if k in TOKEN_RATIO_ARGS}))
            access = {name: loading[name] for name in ("allow_playlists", "max_video_pixels") if name in loading}
            return source, self.video_processor.probe_video(
                source, num_frames, allow_network=self._remote_media_allowed(), **access)
        metadata = as_metadata(block.get("metadata"))
        num_frames = decoded_frame_count(source)
        if num_frames is not None:  # else `__call__` names what is wrong with the frames
            check_decoded_video(num_frames, metadata, requested)
        if metadata is None:
            return source, None
        return (source, metadata), metadata


def _token_in_vocab(tokenizer, token: str) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids(token)
    return None if token_id is None or (tokenizer.unk_token_id is not None and token_id == tokenizer.unk_token_id) else token_id


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


def _check_layout_matches(layout: dict, image_processor, video_processor) -> None:
    """The processors' sizes and tiling grid must be the ones the token layout counts with."""
    for name, processor in (("image", image_processor), ("video", video_processor)):
        size = processor.size
        side = size["height"] if isinstance(size, dict) else size.height
        if side != layout["siglip_image_size"]:
            raise ValueError(
                f"The {name} processor resizes to {side} but the token layout counts with SigLIP images of "
                f"{layout['siglip_image_size']}: build both from the same config (Vica2Processor.from_model_config)."
            )
    pinpoints = [list(p) for p in image_processor.image_grid_pinpoints]
    if pinpoints != [list(p) for p in layout["image_grid_pinpoints"]]:
        raise ValueError(
            "The image processor's image_grid_pinpoints differ from the token layout's: build both from the same "
            "config (Vica2Processor.from_model_config)."
        )


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
            f"{', '.join(TOKEN_RATIO_ARGS + VIDEO_ARGS)}, return_metadata; "
            "other arguments go to the tokenizer (padding, padding_side, truncation, max_length, return_tensors, ...)."
        )
    return {"padding": True, "return_tensors": "pt", **kwargs}


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


def _copy_conversations(conversation) -> tuple[list, bool]:  # the structure, not the media: the caller's stays intact
    first = conversation[0] if isinstance(conversation, (list, tuple)) and conversation else None
    is_batched = isinstance(first, (list, tuple))
    copy = lambda m: {**m, "content": [dict(b) if isinstance(b, dict) else b for b in m["content"]]}  # noqa: E731
    conversations = conversation if is_batched else [conversation]
    return [[copy(m) if isinstance(m.get("content"), list) else dict(m) for m in c] for c in conversations], is_batched


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
