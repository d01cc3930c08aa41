# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""PyAV video reading with the release's sampling (`linspace(0, total - 1, n, dtype=int)`, frame i at i / average fps),
decoding only the frames it needs (transformers' pyav `load_video` decodes and keeps every frame). An index pass
demuxes without decoding (frame count, timestamps, keyframes); the decode pass seeks to keyframes, skips non-reference
frames nobody asked for (sampled frames stay bit-identical), and `decode_workers` threads decode independent keyframe
segments, handing frames to a `frame_sink` on the calling thread as they come. Display-matrix rotation is applied."""

from __future__ import annotations

import bisect
import errno
import io
import itertools
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from transformers.utils import logging
from transformers.video_utils import VideoMetadata

from .configuration_vica2 import positive_int
from .image_processing_vica2 import URL_SCHEME


try:
    import av
except ImportError:
    av = None


logger = logging.get_logger(__name__)

AV_INSTALL_HINT = (
    "Reading video files needs PyAV: `pip install av` (or `pip install 'vica2-hf[video]'`). Alternatively pass "
    "frames you decoded yourself: a uint8 array of shape (frames, height, width, 3)."
)

# Remote reads: http(s) URLs only. FFmpeg takes any "scheme:" name for an address ("tcp:HOST:PORT" connects), so a local
# file is opened as `file:<path>`, with FFmpeg's file protocol only, whatever its name.
URL_PREFIXES = ("http://", "https://")
REMOTE_PROTOCOLS = "http,https,tcp,tls"
# Demuxers that open the files or addresses a file names (playlists, concat lists, manifests, SDP): refused unless the
# caller allows playlists, so that untrusted input cannot point the reader at another file.
FOLLOWING_DEMUXERS = frozenset({"hls", "concat", "dash", "imf", "sdp"})
READ_TIMEOUT = 30.0  # seconds FFmpeg may wait for data, opening or reading: no read hangs forever
DEFAULT_MAX_VIDEO_PIXELS = 64 * 3840 * 2160  # declared width x height x frames sampled: 64 frames at 4K
# Decoded frames waiting for the frame sink, per decode worker: bounds memory when preprocessing is the slower stage.
QUEUED_FRAMES_PER_WORKER = 2


class VideoLoadError(ValueError):
    """A video file that cannot be used: the message says what is wrong with it and what to do."""


@dataclass
class FastResize:
    """Opt-in fast decoding: swscale resizes the decoder's YUV to the towers' sizes (pixels differ slightly)."""

    siglip_size: int
    hiera_size: int
    hiera_frame_stride: int
    siglip_interpolation: str = "BICUBIC"
    hiera_interpolation: str = "BILINEAR"


@dataclass
class DecodeStats:  # what the decode pass did: tests and benchmarks check that only what is needed was decoded

    frames_decoded: int = 0
    frames_converted: int = 0
    seeks: int = 0
    workers: int = 0  # decode workers that ran

    def add(self, other: DecodeStats) -> None:
        for name in ("frames_decoded", "frames_converted", "seeks", "workers"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


class DecodedVideo:
    """Sampled frames and metadata: exact mode `frames` (T, H, W, 3) uint8 RGB; fast mode `siglip_frames` (T, 3, S, S)
    and `hiera_frames` (ceil(T / k), 3, Hs, Hs), k = `hiera_frame_stride`. `pixels`: the processor's outputs prepared
    while decoding, for the settings `pixels_key` (`frames` may then be None). Not a dataclass: chat templates turn
    those into dicts."""

    def __init__(self, metadata: VideoMetadata | None, frames=None, siglip_frames=None, hiera_frames=None,
                 hiera_frame_stride: int | None = None, stats: DecodeStats | None = None, pixels: dict | None = None,
                 pixels_key: tuple | None = None):
        self.metadata, self.frames, self.siglip_frames, self.hiera_frames = metadata, frames, siglip_frames, hiera_frames
        self.hiera_frame_stride, self.stats = hiera_frame_stride, stats if stats is not None else DecodeStats()
        self.pixels, self.pixels_key = pixels, pixels_key

    @property
    def num_frames(self) -> int:
        for held in (self.frames, self.siglip_frames):
            if held is not None:
                return len(held)
        return len(self.pixels["pixel_values_videos"])

    def __repr__(self) -> str:
        mode = "exact" if self.siglip_frames is None else "fast"
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


def sample_frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """The release's uniform sampling: `np.linspace(0, total_frames - 1, num_frames, dtype=int)`; indices repeat when
    `num_frames > total_frames` (as the release's training did, with `force_sample=True`)."""
    positive_int("total_frames", total_frames)
    return np.linspace(0, total_frames - 1, _num_frames(num_frames), dtype=int).tolist()


def _num_frames(num_frames) -> int:
    return positive_int("num_frames", num_frames, "frames to sample from the video")


def load_video(source, num_frames: int) -> tuple[np.ndarray, VideoMetadata]:
    """`num_frames` frames of a video (path, URL or binary file object) sampled as the release does: ((T, H, W, 3)
    uint8, metadata with the sampled `frames_indices`, `timestamps` and `duration` = total frames / average fps)."""
    video = read_video(source, num_frames)
    return video.frames, video.metadata


def read_video(source, num_frames: int, fast_resize: FastResize | None = None, decode_workers: int | None = None,
               make_frame_sink: Callable | None = None, keep_frames=True, allow_network=True, allow_playlists=False,
               max_video_pixels: int | None = None) -> DecodedVideo:
    """Sample and decode `num_frames` frames of a video (see `load_video`); `fast_resize` selects fast mode.

    `decode_workers`: threads decoding keyframe segments (default: the usable cores; the frames do not depend on it).
    `make_frame_sink(metadata)` is called before decoding and returns `sink(position, frame)`, called on this thread
    once per distinct sampled frame as it decodes (`frame`: (H, W, 3) uint8 RGB, or fast mode's (siglip, hiera or
    None) pair); with a sink, `keep_frames=False` keeps no frames. `allow_network=False` refuses URLs;
    `allow_playlists=True` lets playlists / concat lists name other media; `max_video_pixels` bounds declared
    width x height x `num_frames` (default `DEFAULT_MAX_VIDEO_PIXELS`), checked before decoding."""
    num_frames = _num_frames(num_frames)
    workers = default_decode_workers() if decode_workers is None else positive_int(
        "decode_workers", decode_workers, f"threads decoding the video; unset: one per core, {default_decode_workers()} here"
    )
    video_file = _VideoFile(source, allow_network, allow_playlists)
    index, metadata = _probe(video_file, num_frames, max_video_pixels)
    indices = metadata.frames_indices
    if video_file.start is not None:
        workers = 1  # one file object cannot be read at two places at once
    frame_sink = make_frame_sink(metadata) if make_frame_sink is not None else None
    kept, sizes = {}, set()

    def take(position: int, value, size: tuple[int, int]) -> None:
        sizes.add(size)
        _check_cost(video_file.name, size, num_frames, max_video_pixels)  # a header may understate the size
        if len(sizes) > 1:
            raise _size_changes(video_file, sorted(sizes))
        if frame_sink is not None:
            frame_sink(position, value)
        if frame_sink is None or keep_frames:
            kept[position] = value

    stats = DecodeStats()
    _decode_positions(video_file, index, sorted(set(indices)), _converter(indices, fast_resize), take, stats, workers)
    (metadata.height, metadata.width), = sizes  # as displayed: rotation applied
    if frame_sink is not None and not keep_frames:
        return DecodedVideo(metadata, stats=stats)
    return _assemble(kept, indices, metadata, fast_resize, stats)


def default_decode_workers() -> int:
    """The cores this process may run on (its CPU affinity, which containers narrow), not the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity outside Linux
        return max(1, os.cpu_count() or 1)


def probe_video(source, num_frames: int, allow_network=True, allow_playlists=False, max_video_pixels=None) -> VideoMetadata:
    """The metadata `load_video` would return (frame count, fps, sampled indices), from the index pass alone."""
    return _probe(_VideoFile(source, allow_network, allow_playlists), _num_frames(num_frames), max_video_pixels)[1]


def _probe(video_file: _VideoFile, num_frames: int, max_video_pixels=None) -> tuple[StreamIndex, VideoMetadata]:
    with video_file.open() as container:
        stream = video_file.video_stream(container)
        _check_cost(video_file.name, (stream.codec_context.height, stream.codec_context.width), num_frames, max_video_pixels)
        index = _index_stream(container, stream, video_file.name)
        return index, _metadata(stream, index.num_frames, _sample_checked(index.num_frames, num_frames, video_file.name))


class _VideoFile:
    """A video source that can be opened more than once (the index pass and the decode pass each open it)."""

    def __init__(self, source, allow_network: bool = True, allow_playlists: bool = False):
        if av is None:
            raise ImportError(AV_INSTALL_HINT)
        self.allow_network, self.allow_playlists = allow_network, allow_playlists
        # A playlist the caller allowed may name local parts (and remote ones when the network is on), nothing else.
        protocols = ("file,crypto,data" + ("," + REMOTE_PROTOCOLS if allow_network else "")) if allow_playlists else "file"
        self.options = {"protocol_whitelist": protocols}
        if not allow_playlists:
            self.options["format_whitelist"] = ",".join(sorted(set(av.formats_available) - FOLLOWING_DEMUXERS))
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            self.name, self.start = f"video '{path}'", None
            if os.path.isfile(path):  # a local file, whatever its name looks like
                self.source = "file:" + os.path.abspath(path)
            elif not path.startswith(URL_PREFIXES):
                remote = " (remote videos are read from http(s) URLs only)" if URL_SCHEME.match(path) else ""
                raise FileNotFoundError(
                    f"Video file not found: '{path}'{remote}. Check the path, or pass decoded frames (a uint8 array of "
                    "shape (frames, height, width, 3)) instead."
                )
            elif not allow_network:
                raise ValueError(f"Refusing to fetch the {self.name}: the network is off for this read.")
            else:
                self.source = path
                self.options["protocol_whitelist"] = REMOTE_PROTOCOLS + (",crypto,data" if allow_playlists else "")
        elif hasattr(source, "read"):
            self.name = f"video file object ({type(source).__name__})"
            if _reads_text(source):
                raise TypeError(
                    f"The {self.name} was opened in text mode: a video is binary data. Open it with "
                    "`open(path, 'rb')`, or pass the path itself."
                )
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
            return av.open(self.source, "r", metadata_errors="ignore", container_options=self.options, timeout=READ_TIMEOUT)
        except av.FFmpegError as error:
            if error.errno == errno.EINVAL and not self.allow_playlists:  # its demuxer is off the format whitelist
                raise VideoLoadError(
                    f"The {self.name} is a playlist or a list of other media (HLS, ffconcat, DASH, ...): reading it "
                    "would open the files it names, which untrusted input may not do. Pass the video itself, or "
                    "allow_playlists=True if you trust the list and everything it names."
                ) from error
            # FFmpeg reports a refused protocol as invalid data: say that it may be one when the network is off.
            remote = (" With remote media off, a file that refers to remote parts (an HLS playlist naming http "
                      "segments) is refused too: download the video itself.") if not self.allow_network else ""
            raise VideoLoadError(
                f"Could not open the {self.name} as a video ({error}). The file is not a video, it did not answer "
                f"within {READ_TIMEOUT:g} s, or it is truncated or corrupt (an mp4 whose recording was interrupted "
                f"usually lacks its index). Re-encode it, e.g. `ffmpeg -i in.mp4 out.mp4`, or pass decoded frames instead.{remote}"
            ) from error

    def video_stream(self, container):
        stream = container.streams.best("video") if hasattr(container.streams, "best") else None
        stream = stream or (container.streams.video[0] if container.streams.video else None)
        if stream is None:
            found = ", ".join(sorted({s.type for s in container.streams})) or "nothing"
            raise VideoLoadError(f"The {self.name} has no video stream (it holds: {found}). Pass a file with video in it.")
        return stream


def _reads_text(fileobj) -> bool:
    if isinstance(fileobj, io.TextIOBase):
        return True
    try:
        return isinstance(fileobj.read(0), str)  # reads nothing, even from a pipe
    except (OSError, ValueError, TypeError):
        return False


def _is_seekable(fileobj) -> bool:
    try:
        return bool(fileobj.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def _index_stream(container, stream, name: str) -> StreamIndex:
    """Demux every packet of the stream (no decoding): frame count, presentation order, keyframes."""
    packets = []  # (pts, dts, is_keyframe) in decode order
    demuxed = 0  # every packet with data, those to be dropped included: what a header's frame count counts
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue  # flush packets
            demuxed += 1
            if getattr(packet, "is_discard", False):
                continue  # packets the demuxer marks to be dropped (edit lists)
            packets.append((packet.pts, packet.dts, packet.is_keyframe))
    except av.FFmpegError as error:
        raise VideoLoadError(
            f"The {name} could not be read to the end ({error}): it is truncated or corrupt. Re-encode it, or pass "
            "decoded frames instead."
        ) from error
    if not packets:
        raise VideoLoadError(f"The {name} contains no video frames. Check that the file was written completely, or "
                             "pass decoded frames instead.")
    if stream.frames and demuxed < stream.frames:
        raise _truncated(name, stream, demuxed)
    if stream.frames and stream.frames != len(packets):
        logger.info(f"The {name} declares {stream.frames} frames but holds {len(packets)}; using {len(packets)}.")
    pts = [p for p, _, _ in packets]
    if not _presentation_timestamps(pts, container.format.name):
        return StreamIndex(len(packets))
    order = sorted(pts)
    position = {value: i for i, value in enumerate(order)}
    keyframes = sorted((position[p], p if d is None else d) for p, d, key in packets if key)
    return StreamIndex(len(order), order, [k for k, _ in keyframes], [d for _, d in keyframes])


def _truncated(name: str, stream, demuxed: int) -> VideoLoadError:
    # Sampling the part that is there would silently answer about the start of the video only.
    rate = _frame_rate(stream)
    seconds = lambda frames: f" ({frames / float(rate):.2f} s)" if rate else ""  # noqa: E731
    return VideoLoadError(
        f"The {name} is truncated: its header lists {stream.frames} frames{seconds(stream.frames)} but the file "
        f"holds only {demuxed}{seconds(demuxed)}. Download or copy it again; to use only the part that is there, "
        "rewrite its header for those frames (`ffmpeg -i in.mp4 -c copy part.mp4`) or pass decoded frames instead."
    )


def _presentation_timestamps(pts: list, format_name: str) -> bool:
    """Whether packet pts give the presentation order (AVI stores decode-order stamps only, raw streams none)."""
    if any(p is None for p in pts) or len(set(pts)) != len(pts):
        return False
    in_decode_order = all(a < b for a, b in zip(pts, pts[1:]))
    return not (in_decode_order and "avi" in format_name.split(","))


def _check_cost(name: str, size: tuple, num_frames: int, max_video_pixels) -> None:
    """Refuse what decoding would cost before it is paid: a small upload can declare 16000 x 16000 frames."""
    limit = DEFAULT_MAX_VIDEO_PIXELS if max_video_pixels is None else positive_int("max_video_pixels", max_video_pixels)
    if size[0] * size[1] * num_frames > limit:
        raise VideoLoadError(
            f"The {name} has {size[1]}x{size[0]} frames: decoding {num_frames} of them takes "
            f"{size[0] * size[1] * num_frames:,} pixels, above the limit of {limit:,} (max_video_pixels; default: 64 "
            "frames at 4K). Sample fewer frames, downscale the video (e.g. `ffmpeg -i in.mp4 -vf scale=1280:-2 "
            "out.mp4`), or raise max_video_pixels if you trust it."
        )


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


def _frame_rate(stream):
    return stream.average_rate or stream.guessed_rate or stream.base_rate


def _metadata(stream, total_frames: int, indices: list[int]) -> VideoMetadata:
    fps = float(_frame_rate(stream)) if _frame_rate(stream) else None
    return VideoMetadata(  # duration: the release's "video lasts for" figure, total frames / average fps
        total_num_frames=total_frames, fps=fps, width=stream.codec_context.width, height=stream.codec_context.height,
        duration=total_frames / fps if fps else None, video_backend="pyav", frames_indices=list(indices),
    )


def _converter(indices: list[int], fast_resize: FastResize | None) -> Callable:
    """What to keep of a sampled frame, turned as the display matrix says, and its displayed (height, width): the
    full-size RGB array, or (fast mode) the two resized RGB arrays."""
    if fast_resize is None:

        def convert_exact(frame, position):
            turns = _quarter_turns(frame)
            rgb = frame.to_ndarray(format="rgb24")
            if turns:
                rgb = np.ascontiguousarray(np.rot90(rgb, turns))
            return rgb, rgb.shape[:2]

        return convert_exact

    hiera_positions = set(indices[:: fast_resize.hiera_frame_stride])

    def convert_fast(frame, position):
        turns = _quarter_turns(frame)
        siglip = _turned(_reformat(frame, fast_resize.siglip_size, fast_resize.siglip_interpolation), turns)
        hiera = None
        if position in hiera_positions:
            hiera = _turned(_reformat(frame, fast_resize.hiera_size, fast_resize.hiera_interpolation), turns)
        size = (frame.height, frame.width)
        return (siglip, hiera), size[::-1] if turns % 2 else size

    return convert_fast


def _quarter_turns(frame) -> int:
    """Counter-clockwise quarter turns that show the frame upright (PyAV's `frame.rotation`: the display matrix's
    angle; phones store multiples of 90 degrees; mirroring is not applied)."""
    rotation = frame.rotation
    if rotation % 90:
        logger.warning_once(f"A video's display matrix rotates by {rotation} degrees; rounding to a quarter turn.")
    return round(rotation / 90) % 4


def _turned(channels_first: np.ndarray, turns: int) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(channels_first, turns, axes=(1, 2))) if turns else channels_first


def _reformat(frame, size: int, interpolation: str) -> np.ndarray:
    """(3, size, size) uint8 RGB from swscale's planar output: channels-first, and closer to the exact recipe than
    its packed RGB (mean 1.9 vs 4.8 uint8 levels at 384)."""
    out = frame.reformat(width=size, height=size, format="gbrp", interpolation=interpolation)
    green, blue, red = (
        np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[:size, :size] for plane in out.planes
    )
    return np.stack([red, green, blue])


def _size_changes(video_file: _VideoFile, sizes: list) -> VideoLoadError:
    shown = ", ".join(f"{width}x{height}" for height, width in sizes)
    return VideoLoadError(
        f"The frame size of the {video_file.name} changes mid-stream ({shown}): the sampled frames of one video must "
        "share one size. Re-encode it to one size, e.g. `ffmpeg -i in.h264 -vf scale=1280:720 out.mp4`, or pass "
        "decoded frames of one size instead."
    )


class _UnreliableTimestamps(Exception):  # frames came out of timestamp order: positions cannot be derived from them
    pass


def _decode_positions(video_file: _VideoFile, index: StreamIndex, positions: list[int], convert, take, stats, workers):
    """Decode the frames at the given (sorted, unique) positions, handing each to `take(position, converted, size)`."""
    if index.frame_pts is not None:
        attempt = DecodeStats()
        try:
            _run_workers(_SeekingDecoder, video_file, index, _segments(index, positions), convert, take, attempt, workers)
            return stats.add(attempt)
        except _UnreliableTimestamps:
            logger.info(f"Timestamps of the {video_file.name} do not follow presentation order; decoding sequentially.")
    _run_workers(_SequentialDecoder, video_file, index, [positions], convert, take, stats, 1)


def _segments(index: StreamIndex, positions: list[int]) -> list[list[int]]:
    """The positions grouped by their last keyframe (frames before the first form a group): independent to decode."""
    groups: dict[int, list[int]] = {}
    for position in positions:
        groups.setdefault(bisect.bisect_right(index.keyframe_positions, position), []).append(position)
    return list(groups.values())


_DONE = object()


def _run_workers(decoder_class, video_file, index, tasks: list, convert, take, stats, workers: int) -> None:
    """Decode `tasks` (lists of positions) on up to `workers` threads, each with its own container, from a shared
    queue; the calling thread hands the frames to `take` through a bounded queue (flat memory however long the video)."""
    workers = max(1, min(workers, len(tasks)))
    # The cores left per worker go to FFmpeg's frame threads (one decoder on many cores; none when GOPs use them).
    decoder_threads = max(1, default_decode_workers() // workers)
    todo: queue.SimpleQueue = queue.SimpleQueue()
    list(map(todo.put, tasks))
    done: queue.Queue = queue.Queue(maxsize=QUEUED_FRAMES_PER_WORKER * workers)
    stop = threading.Event()

    def put(item) -> None:
        while not stop.is_set():
            try:
                return done.put(item, timeout=0.05)
            except queue.Full:
                continue

    def work() -> None:
        worker_stats = DecodeStats(workers=1)
        try:
            with decoder_class(video_file, index, convert, worker_stats, decoder_threads) as decoder:
                while not stop.is_set():
                    try:
                        task = todo.get_nowait()
                    except queue.Empty:
                        break
                    for item in decoder.decode(task):
                        put(item)
                        if stop.is_set():
                            return
            put((_DONE, worker_stats))
        except BaseException as error:  # noqa: BLE001 - handed to the calling thread, which raises it
            put(error)

    threads = [threading.Thread(target=work, name=f"vica2-decode-{i}", daemon=True) for i in range(workers)]
    list(map(threading.Thread.start, threads))
    try:
        finished = 0
        while finished < workers:
            item = done.get()
            if isinstance(item, BaseException):
                raise item
            if item[0] is _DONE:
                stats.add(item[1])
                finished += 1
                continue
            take(*item)
            stats.frames_converted += 1
    finally:
        stop.set()
        for thread in threads:
            thread.join()


class _Decoder:
    """One worker's container and decoder (a context manager); `decode(positions)` yields (position, converted, size)."""

    def __init__(self, video_file: _VideoFile, index: StreamIndex, convert, stats: DecodeStats, threads: int):
        self.video_file, self.index, self.convert, self.stats, self.threads = video_file, index, convert, stats, threads

    def __enter__(self):
        self.container = self.video_file.open()
        self.stream = self.video_file.video_stream(self.container)
        self.stream.thread_type = "AUTO"  # frame and slice threads where the worker has cores to spare
        self.stream.codec_context.thread_count = self.threads
        return self

    def __exit__(self, *exc_info):
        # Drop the frame generator too: its cycle would leave the codec's frame threads to the garbage collector, and
        # collected in a forked process (a DataLoader worker) freeing it waits forever for the parent's threads.
        try:
            self.container.close()
        finally:
            self.frames = self.stream = self.container = None

    def _frames(self, locate, wanted_pts, first_packet=None) -> Iterator:
        return _decoded_frames(self.container, self.stream, locate, wanted_pts, self.video_file, self.stats, first_packet)


class _SeekingDecoder(_Decoder):
    """Seeks to the last keyframe before a sampled frame when a keyframe lies between it and the current position."""

    def __enter__(self):
        super().__enter__()
        self.position_of = {pts: position for position, pts in enumerate(self.index.frame_pts)}
        self.frames, self.current = None, -1
        return self

    def decode(self, positions: list[int]) -> Iterator:
        index = self.index
        wanted_pts = {index.frame_pts[p] for p in positions}
        locate = lambda frame: self.position_of.get(frame.pts)  # noqa: E731
        if self.frames is None:
            self.frames = self._frames(locate, wanted_pts)
        for target in positions:
            if _keyframe_between(index, self.current, target):
                first_packet = _seek_to_keyframe(self.container, self.stream, index, target)
                if first_packet is None:  # the demuxer could not seek there: decode in order instead
                    raise _UnreliableTimestamps
                self.stats.seeks += 1
                self.frames = self._frames(locate, wanted_pts, first_packet)
            for position, frame in self.frames:
                self.current = max(self.current, position)
                if position == target:
                    yield (target, *self.convert(frame, position))
                    break
                if position > target:
                    raise _UnreliableTimestamps  # the frame was never produced: its pts did not come out
            else:
                raise _ended_early(self.video_file, target, index.num_frames)


class _SequentialDecoder(_Decoder):
    """Decodes from the start, counting frames: for streams without usable timestamps, or when seeking misbehaves."""

    def decode(self, positions: list[int]) -> Iterator:
        missing = set(positions)
        counter = iter(range(1 << 62))
        for position, frame in self._frames(lambda _: next(counter), None):
            if position in missing:
                yield (position, *self.convert(frame, position))
                missing.discard(position)
                if not missing:
                    return
        raise _ended_early(self.video_file, min(missing), None)


def _keyframe_between(index: StreamIndex, current: int, target: int) -> bool:
    """True when a keyframe lies after the current position and at or before the target: seeking skips work."""
    following = bisect.bisect_right(index.keyframe_positions, current)
    return following < len(index.keyframe_positions) and index.keyframe_positions[following] <= target


def _seek_to_keyframe(container, stream, index: StreamIndex, target: int):
    """Seek to the last keyframe at or before `target`; the first packet read there, or None. Demuxers seek by pts
    (mp4, Matroska) or dts (MPEG-TS): both are tried (landing early costs time, landing late would lose the frame)."""
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
        for packet in itertools.chain([first_packet] if first_packet is not None else [], container.demux(stream)):
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
    hiera = np.stack([decoded[i][1] for i in indices[:: fast_resize.hiera_frame_stride]])
    return DecodedVideo(metadata, siglip_frames=siglip, hiera_frames=hiera,
                        hiera_frame_stride=fast_resize.hiera_frame_stride, stats=stats)


__all__ = ["load_video", "read_video", "probe_video", "sample_frame_indices", "default_decode_workers", "FastResize",
           "DecodedVideo", "VideoLoadError", "DEFAULT_MAX_VIDEO_PIXELS"]
