# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""ViCA2 video processor: reads (PyAV), samples, keeps metadata and prepares both towers' pixels (Hiera's only for the
frames it encodes), following transformers 5.x's video-processor conventions (own config file, `do_sample_frames`,
`VideoMetadata`) that serving engines rely on; not `BaseVideoProcessor`, which needs torchvision."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import torch
from PIL import Image

from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling
from transformers.utils import VIDEO_PROCESSOR_NAME, logging
from transformers.utils.hub import cached_file
from transformers.video_utils import VideoMetadata

from .configuration_vica2 import positive_int
from .image_processing_vica2 import as_array, hiera_pixels, normalize_uint8, pil_resize, rgb_uint8, square_side, to_rgb_uint8
from .video_loading_vica2 import DEFAULT_MAX_VIDEO_PIXELS, DecodedVideo, FastResize, probe_video, read_video
from .video_loading_vica2 import sample_frame_indices


logger = logging.get_logger(__name__)

# What `from_pretrained` passes on to the hub download of the config file.
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "subfolder")


class Vica2VideoProcessor:
    r"""
    Args:
        size (`dict`, default 384 x 384), resample, rescale_factor, image_mean, image_std: the SigLIP recipe.
        hiera_size (`int`, default 1024), hiera_image_mean, hiera_image_std: the Hiera recipe (ImageNet stats).
        hiera_antialias (`bool`, defaults to `False`): antialias the Hiera resize (the release did not).
        do_sample_frames (`bool`, defaults to `True`): tells serving engines to hand over decoded frames with their
            metadata; a call samples them as the release samples a file when asked (`do_sample_frames` or `num_frames`).
        max_video_pixels (`int`, default 64 frames at 4K): a file whose declared width x height x frames sampled is
            above it is refused before decoding (a call's `max_video_pixels` overrides it).
    """

    model_input_names = ["pixel_values_videos", "hiera_pixel_values_videos", "video_token_ratio"]
    settings = (
        "size", "resample", "rescale_factor", "image_mean", "image_std", "hiera_size", "hiera_image_mean",
        "hiera_image_std", "hiera_antialias", "do_sample_frames", "max_video_pixels",
    )  # fmt: skip

    def __init__(self, size: dict | None = None, resample=PILImageResampling.BICUBIC, rescale_factor=1 / 255,
                 image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), hiera_size: int = 1024,
                 hiera_image_mean=IMAGENET_DEFAULT_MEAN, hiera_image_std=IMAGENET_DEFAULT_STD,
                 hiera_antialias: bool = False, do_sample_frames: bool = True,
                 max_video_pixels: int = DEFAULT_MAX_VIDEO_PIXELS, **kwargs):
        unknown = sorted(set(kwargs) - {"video_processor_type", "processor_class", "auto_map"})
        if unknown:
            raise TypeError(f"Unknown setting(s) {', '.join(unknown)} for Vica2VideoProcessor; known: {self.settings}.")
        self.size = dict(size) if size is not None else {"height": 384, "width": 384}
        self.resample, self.rescale_factor = PILImageResampling(int(resample)), rescale_factor
        self.image_mean, self.image_std, self.hiera_size = tuple(image_mean), tuple(image_std), int(hiera_size)
        self.hiera_image_mean, self.hiera_image_std = tuple(hiera_image_mean), tuple(hiera_image_std)
        self.hiera_antialias, self.do_sample_frames = bool(hiera_antialias), bool(do_sample_frames)
        self.max_video_pixels = positive_int("max_video_pixels", max_video_pixels, "declared pixels x frames")
        square_side(self.size)

    @classmethod
    def from_image_processor(cls, image_processor) -> Vica2VideoProcessor:  # folders saved before videos had a config
        side = square_side(image_processor.size)
        return cls({"height": side, "width": side}, **{name: getattr(image_processor, name) for name in cls.settings[1:9]})

    def to_dict(self) -> dict:
        values = {name: getattr(self, name) for name in self.settings}
        values["resample"] = int(values["resample"])
        return {**values, "video_processor_type": type(self).__name__}

    def save_pretrained(self, save_directory, **kwargs) -> list[str]:
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, VIDEO_PROCESSOR_NAME)
        with open(path, "w", encoding="utf-8") as file:
            file.write(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return [path]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> Vica2VideoProcessor | None:
        """The video processor of a folder or hub repo, or None when it has no `video_preprocessor_config.json`."""
        hub_kwargs = {name: kwargs[name] for name in HUB_KWARGS if kwargs.get(name) is not None}
        path = cached_file(pretrained_model_name_or_path, VIDEO_PROCESSOR_NAME,
                           _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if path is None:
            return None
        with open(path, encoding="utf-8") as file:
            return cls(**json.load(file))

    def __repr__(self) -> str:
        return f"{type(self).__name__} {json.dumps(self.to_dict(), sort_keys=True)}"

    # ------------------------------------------------------------------------------------------- the call
    def __call__(self, videos, video_metadata=None, num_frames: int | None = None, default_num_frames=None,
                 do_sample_frames: bool = False, hiera_frame_stride: int = 1, hiera_antialias=None, device=None,
                 fast_decode=False, decode_workers=None, input_data_format=None, return_metadata=False,
                 allow_network=True, allow_playlists=False, max_video_pixels=None) -> BatchFeature:
        r"""
        Read / sample `videos` and prepare their pixels.

        Args:
            videos: a video or a list of them: a path / URL / binary file object (sampled with PyAV), decoded frames
                (a uint8 (T, H, W, 3) array / tensor or a list of frames; used as given), a `DecodedVideo`, or a
                (frames, metadata) pair; `video_metadata`: `VideoMetadata` (or dict) per decoded-frames video.
            num_frames: frames to sample from a file (default: `default_num_frames`, the processor's frame budget);
                given for decoded frames, it samples them as `do_sample_frames=True` does (as the release samples a
                file, when their metadata says which frames they are).
            hiera_frame_stride: k; Hiera pixels are prepared for frames 0, k, 2k, ... only.
            hiera_antialias (default: the setting), device (where pixels are prepared and returned; SigLIP's PIL
                resize stays on the CPU), input_data_format (where decoded frames' channels are).
            fast_decode: files only: resize while decoding (swscale, from YUV); faster, not bit-exact.
            decode_workers: threads decoding a file's keyframe segments (default: one per usable core).
            return_metadata: also return each video's `video_metadata`.
            allow_network (False refuses URLs), allow_playlists, max_video_pixels: as in `load_video`.

        Returns: `BatchFeature` with `pixel_values_videos` (T, 3, S, S) and `hiera_pixel_values_videos` (ceil(T / k),
        3, Hs, Hs) per video, stacked when frame counts agree, else lists.
        """
        videos = flatten_videos(videos)
        metadata_list = _metadata_list(video_metadata, len(videos))
        frames_to_read = num_frames if num_frames is not None else default_num_frames
        options = {"hiera_antialias": hiera_antialias, "device": device}
        decoded = []
        for video, metadata in zip(videos, metadata_list):
            if isinstance(video, DecodedVideo):
                check_decoded_video(video.num_frames, video.metadata, num_frames)
            elif is_file_source(video):
                video = self.load_video(video, frames_to_read, hiera_frame_stride, fast_decode, decode_workers, **options,
                                        allow_network=allow_network, allow_playlists=allow_playlists,
                                        max_video_pixels=max_video_pixels)
            else:
                sample = frames_to_read if do_sample_frames or num_frames is not None else None
                video = self._decoded_frames(video, metadata, sample, num_frames, input_data_format)
                if fast_decode:
                    logger.warning_once("fast_decode applies to video files only; decoded frames are processed exactly.")
            decoded.append(video)
        data = self._stack([self._pixels(video, hiera_frame_stride, options) for video in decoded])
        if return_metadata:
            data["video_metadata"] = [video.metadata for video in decoded]
        return BatchFeature(data)

    def _decoded_frames(self, video, metadata, sample: int | None, requested: int | None, input_data_format):
        """Decoded frames, sampled as the release samples a file with `sample` when the metadata says which they are."""
        if isinstance(video, tuple) and len(video) == 2 and _is_metadata(video[1]):
            video, metadata = video
        frames, metadata = to_video_frames(video, input_data_format), as_metadata(metadata)
        if sample is not None:
            frames, metadata = self.sample_frames(frames, metadata, sample)
        check_decoded_video(len(frames), metadata, requested)
        return DecodedVideo(metadata, frames=frames)

    @staticmethod
    def _stack(pixels: list[dict]) -> dict:
        names = ("pixel_values_videos", "hiera_pixel_values_videos")
        if len(pixels) == 1:  # a view, not a copy of the (large) pixels
            return {name: pixels[0][name][None] for name in names}
        if len({item[names[0]].shape[0] for item in pixels}) == 1:
            return {name: torch.stack([item[name] for item in pixels]) for name in names}
        return {name: [item[name] for item in pixels] for name in names}

    def load_video(self, source, num_frames: int, hiera_frame_stride: int = 1, fast_decode=False, decode_workers=None,
                   hiera_antialias=None, device=None, keep_frames=False, **access) -> DecodedVideo:
        """Read and sample `num_frames` frames of a video file. In exact mode its pixels are prepared as its frames
        decode (for `hiera_frame_stride`, `hiera_antialias`, `device`), keeping the full-size frames only with
        `keep_frames`; with `fast_decode` swscale resizes the frames while decoding. `access`: `allow_network`,
        `allow_playlists` (playlists / concat lists may name other media) and `max_video_pixels` (default: the
        setting), as in `read_video`."""
        access = self._access(**access)
        if fast_decode:
            fast = FastResize(square_side(self.size), self.hiera_size, hiera_frame_stride)
            return read_video(source, num_frames, fast, decode_workers, **access)
        sinks = []

        def make_sink(metadata):  # called once the sampled indices are known, before decoding starts
            sinks.append(VideoPixelSink(self, metadata.frames_indices, hiera_frame_stride, hiera_antialias, device))
            return sinks[0]

        video = read_video(source, num_frames, None, decode_workers, make_sink, keep_frames, **access)
        video.pixels, video.pixels_key = sinks[0].pixels(), self.pixels_key(hiera_frame_stride, hiera_antialias, device)
        return video

    def probe_video(self, source, num_frames: int, **access) -> VideoMetadata:
        """The metadata `load_video` would give (frame count, fps, sampled indices), without decoding a frame."""
        return probe_video(source, num_frames, **self._access(**access))

    def _access(self, allow_network=True, allow_playlists=False, max_video_pixels=None) -> dict:
        limit = self.max_video_pixels if max_video_pixels is None else max_video_pixels
        return {"allow_network": allow_network, "allow_playlists": bool(allow_playlists), "max_video_pixels": limit}

    def sample_frames(self, frames, metadata: VideoMetadata | None, num_frames: int) -> tuple[object, VideoMetadata]:
        """The release's `num_frames`-frame sampling of a video, taken from decoded frames whose metadata says which
        of the video's frames they are (else they are left as they are). The frames the release reads must be among
        them, or this raises: other frames would change the answer silently."""
        known = metadata is not None and metadata.total_num_frames and metadata.frames_indices is not None
        if not known or len(metadata.frames_indices) != len(frames):
            return frames, metadata
        total = int(metadata.total_num_frames)
        wanted = sample_frame_indices(total, num_frames)
        position = {int(index): i for i, index in enumerate(metadata.frames_indices)}
        missing = sorted({index for index in wanted if index not in position})
        if missing:
            raise ValueError(
                f"ViCA2 samples {num_frames} frames of this {total}-frame video as the release does "
                f"(floor(linspace(0, {total - 1}, {num_frames}))), but frame(s) {', '.join(map(str, missing[:5]))}"
                f"{' ...' if len(missing) > 5 else ''} were not decoded (only {len(position)} were). Decode the video "
                f"with num_frames={num_frames} (a serving engine's video loading option), or all of its frames."
            )
        picked = [position[index] for index in wanted]
        frames = frames[torch.tensor(picked)] if isinstance(frames, torch.Tensor) else frames[picked]
        return frames, dataclasses.replace(metadata, frames_indices=list(wanted))

    def pixels_key(self, hiera_frame_stride: int, hiera_antialias=None, device=None) -> tuple:  # what pixels depend on
        antialias = self.hiera_antialias if hiera_antialias is None else bool(hiera_antialias)
        return hiera_frame_stride, antialias, str(torch.device(device if device is not None else "cpu"))

    def _pixels(self, video: DecodedVideo, stride: int, options: dict) -> dict:
        """A video's pixels: those prepared while it decoded when made for the same settings, else from its frames."""
        key = self.pixels_key(stride, **options)
        if video.pixels is not None and video.pixels_key == key:
            return video.pixels
        if video.siglip_frames is None and video.frames is None:
            raise ValueError(
                f"This video's pixels were prepared for (Hiera frame stride, antialias, device) = {video.pixels_key} "
                f"and its frames were not kept, but the call asks for {key}: load it with the call's settings, or with "
                "`processor.load_video(..., keep_frames=True)`, which keeps the full-size frames."
            )
        if video.frames is not None:
            return self.preprocess_video(video.frames, stride, input_data_format="channels_last", **options)
        if video.hiera_frame_stride != stride:
            raise ValueError(
                f"This video was fast-decoded for a Hiera frame stride of {video.hiera_frame_stride}, but the call's "
                f"settings give {stride}: load it again with the same token-ratio settings."
            )
        return self.preprocess_resized_video(video.siglip_frames, video.hiera_frames, device=options.get("device"))

    def preprocess_video(
        self, frames, hiera_frame_stride: int = 1, hiera_antialias=None, device=None, input_data_format=None
    ) -> BatchFeature:
        """SigLIP pixels (T, 3, S, S) of every frame and Hiera pixels (ceil(T / k), 3, Hs, Hs) of every
        `hiera_frame_stride`-th, from decoded frames ((T, H, W, 3) uint8 RGB, or anything `to_video_frames` takes).
        With `device` the uint8 frames move there once and the Hiera resize and normalisations run there."""
        frames = to_video_frames(frames, input_data_format)
        resized = np.stack([pil_resize(frame, square_side(self.size), self.resample) for frame in frames])
        hiera_frames = np.ascontiguousarray(frames[::hiera_frame_stride])
        if device is not None:
            resized, hiera_frames = (torch.from_numpy(x).to(device) for x in (resized, hiera_frames))
        antialias = self.hiera_antialias if hiera_antialias is None else hiera_antialias
        hiera = hiera_pixels(hiera_frames, self.hiera_size, self.hiera_image_mean, self.hiera_image_std, antialias)
        siglip = normalize_uint8(resized, self.rescale_factor, self.image_mean, self.image_std)
        return BatchFeature({"pixel_values_videos": siglip, "hiera_pixel_values_videos": hiera})

    def preprocess_resized_video(self, siglip_frames, hiera_frames, device=None) -> BatchFeature:
        """Normalise frames that fast decoding already resized: (T, 3, S, S) and (T_h, 3, Hs, Hs) uint8 RGB."""
        if device is not None:
            siglip_frames, hiera_frames = (torch.from_numpy(x).to(device) for x in (siglip_frames, hiera_frames))
        siglip = normalize_uint8(siglip_frames, self.rescale_factor, self.image_mean, self.image_std, True)
        hiera = normalize_uint8(hiera_frames, 1 / 255, self.hiera_image_mean, self.hiera_image_std, True)
        return BatchFeature({"pixel_values_videos": siglip, "hiera_pixel_values_videos": hiera})


class VideoPixelSink:
    """`preprocess_video` one decoded frame at a time (a `read_video` frame sink), into every output slot sampling
    it: no full-size frame is kept, and the result is bit-identical (every step works on each frame alone)."""

    def __init__(self, video_processor, indices: list[int], hiera_frame_stride: int, hiera_antialias, device):
        self.processor, self.side = video_processor, square_side(video_processor.size)
        self.antialias = video_processor.hiera_antialias if hiera_antialias is None else hiera_antialias
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.siglip_slots, self.hiera_slots = _slots(indices), _slots(indices[::hiera_frame_stride])
        self.siglip = torch.empty(len(indices), 3, self.side, self.side, device=self.device)
        size = video_processor.hiera_size
        self.hiera = torch.empty(len(indices[::hiera_frame_stride]), 3, size, size, device=self.device)

    def __call__(self, position: int, frame: np.ndarray) -> None:
        vp = self.processor
        resized = torch.from_numpy(np.array(pil_resize(frame, self.side, vp.resample)[None])).to(self.device)
        first, *repeats = self.siglip_slots[position]  # written in place; a frame sampled twice is copied
        normalize_uint8(resized, vp.rescale_factor, vp.image_mean, vp.image_std, out=self.siglip[first : first + 1])
        for slot in repeats:
            self.siglip[slot].copy_(self.siglip[first])
        if position in self.hiera_slots:
            full = torch.from_numpy(frame[None]).to(self.device)
            first, *repeats = self.hiera_slots[position]
            out = self.hiera[first : first + 1]
            hiera_pixels(full, vp.hiera_size, vp.hiera_image_mean, vp.hiera_image_std, self.antialias, out=out)
            for slot in repeats:
                self.hiera[slot].copy_(self.hiera[first])

    def pixels(self) -> dict:
        return {"pixel_values_videos": self.siglip, "hiera_pixel_values_videos": self.hiera}


def _slots(indices: list[int]) -> dict[int, list[int]]:  # frame index -> its output slots (a repeated frame has two)
    slots: dict[int, list[int]] = {}
    for slot, index in enumerate(indices):
        slots.setdefault(index, []).append(slot)
    return slots


def to_video_frames(video, input_data_format=None) -> np.ndarray:
    """Decoded frames as a uint8 RGB (T, H, W, 3) array: from an array / tensor (T, H, W, C) or (T, C, H, W), C in 1,
    3, 4, or a list of PIL images / (H, W, C) arrays of one size (see `rgb_uint8`)."""
    if isinstance(video, (list, tuple)):
        if not video:
            raise ValueError("A video has no frames: pass at least one frame.")
        frames = [to_rgb_uint8(frame, "video frame", input_data_format) for frame in video]
        sizes = sorted({frame.shape[:2] for frame in frames})
        if len(sizes) > 1:
            raise ValueError(
                f"The frames of one video must all have the same size; got {', '.join(map(str, sizes))}. Resize them "
                "to one size first."
            )
        return np.stack(frames)
    video = as_array(video, "video type", "a path, a file object, a uint8 array of shape (frames, height, width, 3), "
                     "or a list of frames")
    if video.ndim != 4:
        raise ValueError(
            f"A video array must have 4 dimensions (frames, height, width, 3); got shape {tuple(video.shape)}. For a "
            "single frame use `frame[None]`; for a still picture consider `images=`."
        )
    if video.shape[0] == 0:
        raise ValueError("A video has no frames (its first dimension is 0): pass at least one frame.")
    return rgb_uint8(video, "video frame", input_data_format)


def check_decoded_video(num_frames: int, metadata: VideoMetadata | None, requested: int | None) -> None:
    """Decoded frames are used as given: another `num_frames`, or metadata of other frames, would be a wrong prompt."""
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


def is_file_source(video) -> bool:
    return isinstance(video, (str, os.PathLike)) or (hasattr(video, "read") and not isinstance(video, np.ndarray))


def _is_metadata(value) -> bool:
    return isinstance(value, (VideoMetadata, dict))


def _is_frame(value) -> bool:
    return isinstance(value, Image.Image) or (isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 3)


def _is_single_video(video) -> bool:
    if isinstance(video, DecodedVideo) or is_file_source(video):
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


def decoded_frame_count(video) -> int | None:  # of decoded frames (an array / tensor or a list of frames), else None
    if isinstance(video, (np.ndarray, torch.Tensor)):
        return int(video.shape[0]) if video.ndim == 4 else None
    if isinstance(video, (list, tuple)) and video and all(_is_frame(frame) for frame in video):
        return len(video)
    return None


def as_metadata(metadata) -> VideoMetadata | None:
    if metadata is None or isinstance(metadata, (VideoMetadata, dict)):
        return VideoMetadata(**metadata) if isinstance(metadata, dict) else metadata
    raise TypeError(f"Video metadata must be a VideoMetadata or a dict, got {type(metadata).__name__}.")


__all__ = ["Vica2VideoProcessor"]
