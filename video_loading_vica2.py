# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""Video decoding for ViCA2 with PyAV: the release's frame sampling, decoding only the frames it needs.

The release samples `n` frames with `np.linspace(0, total_frames - 1, n, dtype=int)` and stamps frame `i` at
`i / average_fps`. Decoding a whole video to keep 64 frames is most of the cost of preprocessing, so this module
reads a video in two passes:

1. an index pass that demuxes packets without decoding them: the exact frame count (the container's own count
   may be missing, as in Matroska, or wrong), each frame's presentation timestamp and the keyframes;
2. a decode pass over the sampled frames only: it seeks to the last keyframe before a sampled frame when a keyframe
   lies between it and the current position, tells the decoder to skip non-reference frames that are not sampled
   (they are not needed to decode any other frame, so the sampled frames are bit-identical to a full decode), and
   converts only the sampled frames to RGB. At most the sampled frames are held in memory.

transformers' own `load_video(..., backend="pyav")` decodes every frame of the video and keeps them all, which is
why ViCA2 has its own reader.
"""

from __future__ import annotations

import bisect
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from transformers.utils import logging
from transformers.video_utils import VideoMetadata


try:
    import av
except ImportError:
    av = None


logger = logging.get_logger(__name__)

AV_INSTALL_HINT = (
    "Reading video files needs PyAV: `pip install av` (or `pip install 'vica2-hf[video]'`). Alternatively pass "
    "frames you decoded yourself: a uint8 array of shape (frames, height, width, 3)."
)

URL_PREFIXES = ("http://", "https://", "rtsp://", "rtmp://", "ftp://")


class VideoLoadError(ValueError):
    """A video file that cannot be used: the message says what is wrong with it and what to do."""


@dataclass
class FastResize:
    """Opt-in "fast" decoding: swscale resizes straight from the decoder's YUV to the model's sizes.

    Skips the full-resolution RGB frame, PIL and torch resizes; pixels differ slightly from the release's recipe
    (different resampling filters and chroma handling). Hiera pixels are produced only for every
    `hiera_frame_stride`-th sampled frame, the frames Hiera encodes.
    """

    siglip_size: int
    hiera_size: int
    hiera_frame_stride: int
    siglip_interpolation: str = "BICUBIC"
    hiera_interpolation: str = "BILINEAR"


@dataclass
class DecodeStats:
    """What the decode pass did; lets tests and benchmarks check that only what is needed was decoded."""

    frames_decoded: int = 0
    frames_converted: int = 0
    seeks: int = 0


class DecodedVideo:
    """Sampled frames of a video and its metadata.

    Exact mode: `frames` is (T, H, W, 3) uint8 RGB. Fast mode: `frames` is None and `siglip_frames` (T, 3, S, S) /
    `hiera_frames` (ceil(T / k), 3, Hs, Hs) hold channels-first uint8 RGB already resized for the two towers, k
    being `hiera_frame_stride`. (A plain class, not a dataclass: transformers' chat templates turn dataclasses found
    in messages into dicts.)
    """

    def __init__(
        self,
        metadata: VideoMetadata | None,
        frames: np.ndarray | None = None,
        siglip_frames: np.ndarray | None = None,
        hiera_frames: np.ndarray | None = None,
        hiera_frame_stride: int | None = None,
        stats: DecodeStats | None = None,
    ):
        self.metadata = metadata
        self.frames = frames
        self.siglip_frames = siglip_frames
        self.hiera_frames = hiera_frames
        self.hiera_frame_stride = hiera_frame_stride
        self.stats = stats if stats is not None else DecodeStats()

    @property
    def num_frames(self) -> int:
        return len(self.frames if self.frames is not None else self.siglip_frames)

    def __repr__(self) -> str:
        mode = "exact" if self.frames is not None else "fast"
        return f"DecodedVideo({mode}, num_frames={self.num_frames}, metadata={self.metadata})"


@dataclass
class StreamIndex:
    """What the index pass learns from the packets: frame count, presentation order and where to seek."""

    num_frames: int
    # Presentation timestamps in presentation order; None when they cannot be trusted to give presentation order
    # (missing, duplicated, or decode-order stamps from a container such as AVI): then decoding is sequential.
    frame_pts: list[int] | None = None
    keyframe_positions: list[int] = field(default_factory=list)  # presentation positions of keyframes, sorted
    keyframe_dts: list[int] = field(default_factory=list)  # their decode timestamps (a second way to seek)


# --------------------------------------------------------------------------------------------------- sampling
def sample_frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """The release's uniform sampling: `np.linspace(0, total_frames - 1, num_frames, dtype=int)`.

    When `num_frames > total_frames` indices repeat (the release did this in training, with `force_sample=True`).
    """
    if total_frames < 1:
        raise ValueError(f"total_frames must be positive, got {total_frames}.")
    _check_num_frames(num_frames)
    return np.linspace(0, total_frames - 1, num_frames, dtype=int).tolist()


def _check_num_frames(num_frames) -> None:
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise ValueError(
            f"num_frames must be a positive integer (frames to sample from the video), got {num_frames!r}."
        )


# --------------------------------------------------------------------------------------------------- public API
def load_video(source, num_frames: int) -> tuple[np.ndarray, VideoMetadata]:
    """Sample `num_frames` frames of a video exactly as the release does; returns ((T, H, W, 3) uint8, metadata).

    `source` is a path, a URL PyAV can open, or a binary file-like object. `metadata.frames_indices` are the sampled
    frame indices and `metadata.timestamps` their times (index / average fps); `metadata.duration` is
    total_frames / average fps, as in the release's time instruction.
    """
    video = read_video(source, num_frames)
    return video.frames, video.metadata


def read_video(source, num_frames: int, fast_resize: FastResize | None = None) -> DecodedVideo:
    """Sample and decode `num_frames` frames of a video file (see `load_video`); `fast_resize` selects fast mode."""
    _check_num_frames(num_frames)
    video_file = _VideoFile(source)
    with video_file.open() as container:
        stream = video_file.video_stream(container)
        index = _index_stream(container, stream, video_file.name)
        indices = _sample_checked(index.num_frames, int(num_frames), video_file.name)
        metadata = _metadata(stream, index.num_frames, indices)
    convert = _converter(indices, fast_resize)
    stats = DecodeStats()
    decoded = _decode_positions(video_file, index, sorted(set(indices)), convert, stats)
    return _assemble(decoded, indices, metadata, fast_resize, stats)


def probe_video(source, num_frames: int) -> VideoMetadata:
    """The metadata `load_video` would return (frame count, fps, sampled indices), from the index pass alone."""
    _check_num_frames(num_frames)
    video_file = _VideoFile(source)
    with video_file.open() as container:
        stream = video_file.video_stream(container)
        index = _index_stream(container, stream, video_file.name)
        return _metadata(stream, index.num_frames, _sample_checked(index.num_frames, int(num_frames), video_file.name))


# --------------------------------------------------------------------------------------------------- opening
class _VideoFile:
    """A video source that can be opened more than once (the index pass and the decode pass each open it)."""

    def __init__(self, source):
        if av is None:
            raise ImportError(AV_INSTALL_HINT)
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            self.name = f"video '{path}'"
            if not path.startswith(URL_PREFIXES) and not os.path.isfile(path):
                raise FileNotFoundError(
                    f"Video file not found: '{path}'. Check the path, or pass decoded frames (a uint8 array of shape "
                    "(frames, height, width, 3)) instead."
                )
            self.source, self.start = path, None
        elif hasattr(source, "read"):
            self.name = f"video file object ({type(source).__name__})"
            if not _is_seekable(source):
                source = io.BytesIO(source.read())  # read twice (index pass, decode pass): buffer it
            self.source, self.start = source, source.tell()
        else:
            raise TypeError(
                f"Cannot read a video from a {type(source).__name__}: pass a path, a URL or a binary file object."
            )

    def open(self):
        if self.start is not None:
            self.source.seek(self.start)
        try:
            return av.open(self.source, mode="r", metadata_errors="ignore")
        except av.FFmpegError as error:
            raise VideoLoadError(
                f"Could not open the {self.name} as a video ({error}). The file is not a video, or it is truncated or "
                "corrupt (an mp4 whose recording was interrupted usually lacks its index). Re-encode it, e.g. "
                "`ffmpeg -i in.mp4 out.mp4`, or pass decoded frames instead."
            ) from error

    def video_stream(self, container):
        stream = container.streams.best("video") if hasattr(container.streams, "best") else None
        stream = stream or (container.streams.video[0] if container.streams.video else None)
        if stream is None:
            found = ", ".join(sorted({s.type for s in container.streams})) or "nothing"
            raise VideoLoadError(
                f"The {self.name} has no video stream (it holds: {found}). Pass a file with video in it."
            )
        return stream


def _is_seekable(fileobj) -> bool:
    try:
        return bool(fileobj.seekable())
    except (AttributeError, OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------- index pass
def _index_stream(container, stream, name: str) -> StreamIndex:
    """Demux every packet of the stream (no decoding): frame count, presentation order, keyframes."""
    packets = []  # (pts, dts, is_keyframe) in decode order
    try:
        for packet in container.demux(stream):
            if packet.size == 0 or getattr(packet, "is_discard", False):
                continue  # flush packets, and packets the demuxer marks to be dropped (edit lists)
            packets.append((packet.pts, packet.dts, packet.is_keyframe))
    except av.FFmpegError as error:
        raise VideoLoadError(
            f"The {name} could not be read to the end ({error}): it is truncated or corrupt. Re-encode it, or pass "
            "decoded frames instead."
        ) from error
    if not packets:
        raise VideoLoadError(
            f"The {name} contains no video frames. Check that the file was written completely, or pass decoded "
            "frames instead."
        )
    if stream.frames and stream.frames != len(packets):
        logger.info(f"The {name} declares {stream.frames} frames but holds {len(packets)}; using {len(packets)}.")
    pts = [p for p, _, _ in packets]
    if not _presentation_timestamps(pts, container.format.name):
        return StreamIndex(len(packets))
    order = sorted(pts)
    position = {value: i for i, value in enumerate(order)}
    keyframes = sorted((position[p], p if d is None else d) for p, d, key in packets if key)
    return StreamIndex(len(order), order, [k for k, _ in keyframes], [d for _, d in keyframes])


def _presentation_timestamps(pts: list, format_name: str) -> bool:
    """Whether packet pts give the presentation order. AVI stores decode-order stamps only (B-frames then come out
    of the decoder in a different order than their pts), raw elementary streams store none."""
    if any(p is None for p in pts) or len(set(pts)) != len(pts):
        return False
    in_decode_order = all(a < b for a, b in zip(pts, pts[1:]))
    return not (in_decode_order and "avi" in format_name.split(","))


def _sample_checked(total_frames: int, num_frames: int, name: str) -> list[int]:
    if total_frames == 1 and num_frames > 1:
        raise VideoLoadError(
            f"The {name} holds a single frame, so it is a still image: pass it as an image (`images=`, which ViCA2 "
            f"tiles at high resolution), or ask for num_frames=1. Sampling {num_frames} frames from it would feed "
            f"the model {num_frames} copies of one picture."
        )
    if num_frames > total_frames:
        # The release's sampler repeats frames here (training used force_sample=True, so the model has seen it).
        logger.warning_once(
            f"The {name} has {total_frames} frames but {num_frames} were requested: frames are repeated, as the "
            "release's sampler does. Pass num_frames <= the video's frame count to avoid repeats."
        )
    return sample_frame_indices(total_frames, num_frames)


def _metadata(stream, total_frames: int, indices: list[int]) -> VideoMetadata:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else None
    return VideoMetadata(
        total_num_frames=total_frames,
        fps=fps,
        width=stream.codec_context.width,
        height=stream.codec_context.height,
        # The release's "video lasts for" figure: total frames / average fps.
        duration=total_frames / fps if fps else None,
        video_backend="pyav",
        frames_indices=list(indices),
    )


# --------------------------------------------------------------------------------------------------- decode pass
def _converter(indices: list[int], fast_resize: FastResize | None) -> Callable:
    """What to keep of a sampled frame: its full-size RGB array, or (fast mode) the two resized RGB arrays."""
    if fast_resize is None:
        return lambda frame, position: frame.to_ndarray(format="rgb24")

    hiera_positions = {indices[j] for j in range(0, len(indices), fast_resize.hiera_frame_stride)}

    def convert(frame, position):
        siglip = _reformat(frame, fast_resize.siglip_size, fast_resize.siglip_interpolation)
        hiera = None
        if position in hiera_positions:
            hiera = _reformat(frame, fast_resize.hiera_size, fast_resize.hiera_interpolation)
        return siglip, hiera

    return convert


def _reformat(frame, size: int, interpolation: str) -> np.ndarray:
    """(3, size, size) uint8 RGB from swscale's planar output: channels-first as the model wants them, and closer
    to the exact recipe than swscale's packed RGB output (measured: mean 1.9 vs 4.8 uint8 levels at 384)."""
    out = frame.reformat(width=size, height=size, format="gbrp", interpolation=interpolation)
    green, blue, red = (
        np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[:size, :size] for plane in out.planes
    )
    return np.stack([red, green, blue])


class _UnreliableTimestamps(Exception):
    """Decoded frames came out of order of their timestamps: positions cannot be derived from them."""


def _decode_positions(video_file: _VideoFile, index: StreamIndex, positions: list[int], convert, stats) -> dict:
    """Decode the frames at the given presentation positions (sorted, unique); returns {position: converted}."""
    if index.frame_pts is None:
        return _decode_sequentially(video_file, positions, convert, stats)
    try:
        return _decode_with_seeks(video_file, index, positions, convert, stats)
    except _UnreliableTimestamps:
        logger.info(f"Timestamps of the {video_file.name} do not follow presentation order; decoding sequentially.")
        return _decode_sequentially(video_file, positions, convert, stats)


def _decode_with_seeks(video_file: _VideoFile, index: StreamIndex, positions: list[int], convert, stats) -> dict:
    wanted_pts = {index.frame_pts[p] for p in positions}
    position_of = {pts: position for position, pts in enumerate(index.frame_pts)}
    locate = lambda frame: position_of.get(frame.pts)  # noqa: E731
    results, current = {}, -1
    with video_file.open() as container:
        stream = _decoding_stream(video_file, container)
        frames = _decoded_frames(container, stream, locate, wanted_pts, video_file, stats)
        for target in positions:
            if _keyframe_between(index, current, target):
                first_packet = _seek_to_keyframe(container, stream, index, target)
                if first_packet is None:  # the demuxer could not seek there: decode in order instead
                    raise _UnreliableTimestamps
                stats.seeks += 1
                frames = _decoded_frames(container, stream, locate, wanted_pts, video_file, stats, first_packet)
            for position, frame in frames:
                current = max(current, position)
                if position == target:
                    results[target] = convert(frame, position)
                    stats.frames_converted += 1
                    break
                if position > target:
                    raise _UnreliableTimestamps  # the frame was never produced: its pts did not come out
            else:
                raise _ended_early(video_file, target, index.num_frames)
    return results


def _decoding_stream(video_file: _VideoFile, container):
    stream = video_file.video_stream(container)
    stream.thread_type = "AUTO"  # frame and slice threads: decoding is the bulk of the work
    return stream


def _keyframe_between(index: StreamIndex, current: int, target: int) -> bool:
    """True when a keyframe lies after the current position and at or before the target: seeking skips work."""
    following = bisect.bisect_right(index.keyframe_positions, current)
    return following < len(index.keyframe_positions) and index.keyframe_positions[following] <= target


def _seek_to_keyframe(container, stream, index: StreamIndex, target: int):
    """Seek to the last keyframe at or before `target`; returns the first packet read there (None if no seek works).

    Demuxers disagree on the timestamp they seek by (mp4 and Matroska land exactly on a keyframe's pts, MPEG-TS on
    its dts), so try both, and accept a landing at or before the keyframe: decoding from an earlier keyframe only
    costs time, landing after it would lose the frame.
    """
    k = bisect.bisect_right(index.keyframe_positions, target) - 1
    key_pts = index.frame_pts[index.keyframe_positions[k]]
    for timestamp in dict.fromkeys((key_pts, index.keyframe_dts[k])):
        container.seek(timestamp, stream=stream, backward=True, any_frame=False)
        packet = next((p for p in container.demux(stream) if p.size), None)
        if packet is not None and packet.pts is not None and packet.pts <= key_pts:
            return packet
    return None


def _decoded_frames(container, stream, locate, wanted_pts, video_file, stats, first_packet=None) -> Iterator:
    """Yield (position, frame) for the decoded frames whose position `locate` knows, in presentation order."""
    codec = stream.codec_context
    last_pts = None
    try:
        for packet in _packets(container, stream, first_packet):
            if wanted_pts is not None and packet.pts is not None:
                # A frame that nobody references and nobody asked for need not be decoded at all.
                codec.skip_frame = "DEFAULT" if packet.pts in wanted_pts else "NONREF"
            for frame in packet.decode():
                stats.frames_decoded += 1
                if wanted_pts is not None and last_pts is not None and frame.pts is not None and frame.pts < last_pts:
                    raise _UnreliableTimestamps
                last_pts = frame.pts if frame.pts is not None else last_pts
                position = locate(frame)
                if position is not None:
                    yield position, frame
    except av.FFmpegError as error:
        raise VideoLoadError(
            f"Decoding the {video_file.name} failed ({error}): the file is corrupt or truncated. Re-encode it, or "
            "pass decoded frames instead."
        ) from error


def _packets(container, stream, first_packet=None) -> Iterator:
    if first_packet is not None:
        yield first_packet
    yield from container.demux(stream)


def _decode_sequentially(video_file: _VideoFile, positions: list[int], convert, stats) -> dict:
    """Decode from the start, counting frames: for streams without usable timestamps, or when seeking misbehaves."""
    wanted, results = set(positions), {}
    counter = iter(range(1 << 62))
    with video_file.open() as container:
        stream = _decoding_stream(video_file, container)
        for position, frame in _decoded_frames(container, stream, lambda _: next(counter), None, video_file, stats):
            if position in wanted:
                results[position] = convert(frame, position)
                stats.frames_converted += 1
                if len(results) == len(wanted):
                    break
    missing = sorted(wanted - results.keys())
    if missing:
        raise _ended_early(video_file, missing[0], None)
    return results


def _ended_early(video_file: _VideoFile, target: int, total: int | None) -> VideoLoadError:
    of_total = f" of {total}" if total else ""
    return VideoLoadError(
        f"The {video_file.name} ended before frame {target}{of_total} could be decoded: it is truncated or corrupt. "
        "Re-encode it, or pass decoded frames instead."
    )


def _assemble(decoded: dict, indices: list[int], metadata, fast_resize, stats) -> DecodedVideo:
    if fast_resize is None:
        return DecodedVideo(metadata, frames=np.stack([decoded[i] for i in indices]), stats=stats)
    siglip = np.stack([decoded[i][0] for i in indices])
    hiera = np.stack([decoded[indices[j]][1] for j in range(0, len(indices), fast_resize.hiera_frame_stride)])
    return DecodedVideo(
        metadata,
        siglip_frames=siglip,
        hiera_frames=hiera,
        hiera_frame_stride=fast_resize.hiera_frame_stride,
        stats=stats,
    )


__all__ = [
    "load_video",
    "read_video",
    "probe_video",
    "sample_frame_indices",
    "FastResize",
    "DecodedVideo",
    "VideoLoadError",
]
