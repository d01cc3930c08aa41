# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""ViCA2 video processor: the release's frame sampling from decoded frames, and the two towers' video pixels.

transformers 5.x models keep their video handling in a video processor (`processor.video_processor`), and serving
engines look for it there (vLLM's Transformers backend serves videos only when the processor has one). Its
`do_sample_frames = True` tells such an engine to hand over the decoded frames together with their metadata (which
frames of how many, at what fps), so the frames the model sees can be chosen the way the release chooses them:
`floor(linspace(0, total - 1, N))` of the whole video (`sample_frame_indices`).

transformers' `BaseVideoProcessor` needs torchvision (and decodes with torchcodec), neither of which ViCA2 depends
on, so this is a small class of its own over the image processor's exact video recipes (`preprocess_video`).
"""

from __future__ import annotations

import dataclasses

import torch

from transformers.video_utils import VideoMetadata

from .video_loading_vica2 import DecodedVideo, sample_frame_indices


class Vica2VideoProcessor:
    r"""
    Samples and prepares videos for ViCA2 (built by `Vica2Processor` from its image processor; no torchvision).

    Args:
        image_processor ([`Vica2ImageProcessor`]): owns the SigLIP / Hiera pixel recipes.

    Attributes read by serving engines:
        do_sample_frames (`True`): give the processor the decoded frames with their metadata; it samples them.
        size: the SigLIP frame size (frames of any size are resized; the token count does not depend on it).
        model_input_names: the outputs that belong to videos.
    """

    do_sample_frames = True
    model_input_names = ["pixel_values_videos", "hiera_pixel_values_videos", "video_token_ratio"]

    def __init__(self, image_processor):
        self.image_processor = image_processor

    @property
    def size(self) -> dict:
        size = self.image_processor.size
        return dict(size) if isinstance(size, dict) else {"height": size.height, "width": size.width}

    def sample_frames(self, frames, metadata: VideoMetadata | None, num_frames: int) -> tuple[object, VideoMetadata]:
        """The release's `num_frames`-frame sampling of a video, taken from already-decoded frames.

        `metadata.frames_indices` says which of the `metadata.total_num_frames` frames of the video were decoded (a
        serving engine decodes either all of them or its own uniform sample). The indices the release reads must be
        among the decoded ones, or this raises: other frames than the release's would change the answer silently.
        Metadata that does not say which frames were decoded leaves the frames as they are.

        Returns:
            (frames, metadata) with the sampled frames, their indices and so their timestamps.
        """
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
                f"{' ...' if len(missing) > 5 else ''} were not decoded (only {len(position)} were). Have the video "
                f"decoded with num_frames={num_frames} (vLLM: --media-io-kwargs "
                f"'{{\"video\": {{\"num_frames\": {num_frames}}}}}' or the request's media_io_kwargs), or all of "
                "its frames (num_frames=-1)."
            )
        picked = [position[index] for index in wanted]
        frames = frames[torch.tensor(picked)] if isinstance(frames, torch.Tensor) else frames[picked]
        return frames, dataclasses.replace(metadata, frames_indices=list(wanted))

    def pixels_key(self, frame_stride: int, options: dict) -> tuple:
        """What a video's prepared pixels depend on besides its frames (Hiera frame stride, antialias, device)."""
        antialias = options.get("hiera_antialias")
        device = options.get("device")
        return (
            frame_stride,
            self.image_processor.hiera_antialias if antialias is None else bool(antialias),
            str(torch.device(device if device is not None else "cpu")),
        )

    def __call__(self, videos: list[DecodedVideo], frame_stride: int, options: dict | None = None) -> dict:
        """SigLIP pixels of every frame and Hiera pixels of every `frame_stride`-th, per video (stacked when the
        frame counts agree, else lists). `options`: `hiera_antialias` and `device` (see `Vica2Processor.__call__`);
        pixels already prepared while a video decoded are reused when they were made for the same settings."""
        options = options or {}
        key = self.pixels_key(frame_stride, options)
        siglip, hiera = [], []
        for video in videos:
            if video.pixels is not None and video.pixels_key == key:  # prepared while decoding
                pixels = video.pixels
            elif video.siglip_frames is None and video.frames is None:
                raise ValueError(
                    f"This video's pixels were prepared for (Hiera frame stride, antialias, device) = "
                    f"{video.pixels_key} and its frames were not kept, but the call asks for {key}: load it with "
                    "`processor.load_video(...)` (which keeps the frames), or with the call's settings."
                )
            elif video.frames is None:  # fast-decoded: already resized
                if video.hiera_frame_stride != frame_stride:
                    raise ValueError(
                        f"This video was fast-decoded for a Hiera frame stride of {video.hiera_frame_stride}, but the "
                        f"call's settings give {frame_stride}: load it again with the same token-ratio settings."
                    )
                pixels = self.image_processor.preprocess_resized_video(
                    video.siglip_frames, video.hiera_frames, device=options.get("device")
                )
            else:
                pixels = self.image_processor.preprocess_video(
                    video.frames,
                    frame_stride,
                    hiera_antialias=options.get("hiera_antialias"),
                    device=options.get("device"),
                    input_data_format="channels_last",
                )
            siglip.append(pixels["pixel_values_videos"])
            hiera.append(pixels["hiera_pixel_values_videos"])
        if len(siglip) == 1:  # a view, not a copy of the (large) pixels
            return {"pixel_values_videos": siglip[0][None], "hiera_pixel_values_videos": hiera[0][None]}
        if len({item.shape[0] for item in siglip}) == 1:
            return {"pixel_values_videos": torch.stack(siglip), "hiera_pixel_values_videos": torch.stack(hiera)}
        return {"pixel_values_videos": siglip, "hiera_pixel_values_videos": hiera}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, do_sample_frames={self.do_sample_frames})"


__all__ = ["Vica2VideoProcessor"]
