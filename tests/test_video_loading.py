"""Video reading with PyAV: the release's sampling, exact frames, decoding only what is needed, bad files."""

from __future__ import annotations

import io
import logging
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st


av = pytest.importorskip("av")

from vica2.video_loading_vica2 import (  # noqa: E402
    FastResize,
    VideoLoadError,
    load_video,
    probe_video,
    read_video,
    sample_frame_indices,
)


def write_video(
    path,
    num_frames=300,
    fps=30,
    width=64,
    height=48,
    gop=30,
    codec="libx264",
    preset="veryfast",
    x264_params=None,
    pts_ms=None,
    rotation=None,
    format=None,
):
    """An h264 video of a bar moving over a gradient, with the frame number in the blue channel (B-frames on).

    `x264_params` (e.g. open GOPs), `pts_ms` (variable frame rate: each frame's time in ms), `rotation` (a display
    matrix, counter-clockwise degrees) and `format` (e.g. "h264": a raw stream) vary the file."""
    yy, xx = np.mgrid[0:height, 0:width]
    options = {"preset": preset} if codec == "libx264" else {}
    if x264_params:
        options["x264-params"] = x264_params
    with av.open(str(path), "w", format=format) as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(num_frames):
            frame = np.zeros((height, width, 3), np.uint8)
            frame[..., 0] = (xx * 3 + 2 * i) % 256
            frame[..., 1] = (yy * 4) % 256
            frame[..., 2] = i % 256
            frame[(abs(xx - (3 * i) % width) < 6) & (abs(yy - height // 2) < 8)] = (250, 250, 20)
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if pts_ms is not None:
                video_frame.pts, video_frame.time_base = pts_ms[i], Fraction(1, 1000)
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decode_all(path) -> np.ndarray:
    """Reference: a plain sequential decode of every frame."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(container.streams.video[0])])


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    return {
        "mp4": write_video(folder / "moving.mp4"),
        "mkv": write_video(folder / "moving.mkv"),  # Matroska stores no frame count
        "avi": write_video(folder / "moving.avi"),  # AVI stores decode-order timestamps only
        "short": write_video(folder / "short.mp4", num_frames=10),
        "single": write_video(folder / "single.mp4", num_frames=1),
        # Keyframes every 30 frames whose leading B-frames reference the previous GOP (b-adapt=0 forces B-frames).
        "open_gop": write_video(
            folder / "open_gop.mp4", 120, x264_params="keyint=30:min-keyint=30:scenecut=0:open-gop=1:bframes=3:b-adapt=0"
        ),
        "vfr": write_video(folder / "vfr.mkv", 90, gop=20, pts_ms=np.cumsum(np.random.default_rng(0).integers(10, 80, 90))),
        "one_gop": write_video(folder / "one_gop.mp4", 90, gop=1000, x264_params="keyint=1000:scenecut=0"),
        "large": write_video(folder / "large.mp4", 30, width=160, height=96),  # above the tiny Hiera size (64)
    }


@pytest.fixture(scope="module")
def reference_frames(videos):
    return {name: decode_all(path) for name, path in videos.items()}


# ----------------------------------------------------------------------------------------------- sampling
def exact_uniform_indices(total: int, num: int) -> list[int]:
    """floor(i * (total - 1) / (num - 1)) in exact arithmetic (independent of numpy)."""
    return [0] * num if num == 1 else [int(Fraction(i * (total - 1), num - 1)) for i in range(num)]


@pytest.mark.parametrize("num_frames", [16, 64, 7])
def test_indices_and_timestamps_match_an_independent_computation(videos, num_frames):
    frames, metadata = load_video(videos["mp4"], num_frames)
    expected = exact_uniform_indices(300, num_frames)
    assert metadata.frames_indices == expected
    assert metadata.timestamps == pytest.approx([i / 30 for i in expected], abs=1e-12)
    assert (metadata.total_num_frames, metadata.fps, metadata.duration) == (300, 30.0, 10.0)
    assert (metadata.width, metadata.height) == (64, 48)
    assert frames.shape == (num_frames, 48, 64, 3) and frames.dtype == np.uint8


@settings(max_examples=60, deadline=None)
@given(total=st.integers(1, 5000), num=st.integers(1, 300))
def test_sampler_is_the_release_linspace(total, num):
    # The release: np.linspace(0, total - 1, n, dtype=int). Its float steps can floor an exact integer i*(t-1)/(n-1)
    # to one below (e.g. t=3, n=99); the hub sampler keeps that, so that it picks the frames the release picks.
    assert sample_frame_indices(total, num) == np.linspace(0, total - 1, num, dtype=int).tolist()


# ----------------------------------------------------------------------------------------------- exact frames
@pytest.mark.parametrize("container", ["mp4", "mkv", "avi"])
@pytest.mark.parametrize("num_frames", [16, 5])
def test_frames_equal_a_full_sequential_decode(videos, reference_frames, container, num_frames):
    video = read_video(videos[container], num_frames)
    indices = video.metadata.frames_indices
    assert video.metadata.total_num_frames == 300  # mkv has no count in its header: counted from packets
    np.testing.assert_array_equal(video.frames, reference_frames[container][indices])


@pytest.mark.parametrize("container", ["mp4", "mkv", "avi", "open_gop", "vfr", "one_gop"])
def test_parallel_segments_give_the_frames_of_a_sequential_decode(videos, reference_frames, container):
    # 37 frames: several per GOP and GOPs split over the workers; the order is presentation order whoever decoded.
    one = read_video(videos[container], 37, decode_workers=1)
    three = read_video(videos[container], 37, decode_workers=3)
    expected = reference_frames[container][one.metadata.frames_indices]
    np.testing.assert_array_equal(one.frames, expected)
    np.testing.assert_array_equal(three.frames, expected)
    assert one.stats.workers == 1
    # AVI has no presentation timestamps and one GOP has one segment: one worker; the others are split.
    assert three.stats.workers == (1 if container in ("avi", "one_gop") else 3)


@pytest.mark.parametrize("container", ["mp4", "one_gop"])
def test_decoders_are_freed_without_the_garbage_collector(videos, container):
    """A decoder left to the cyclic garbage collector was freed later in a forked DataLoader worker, where freeing
    its codec context waits forever for FFmpeg frame threads that only existed in the parent (a hang)."""
    import gc

    import av

    gc.collect()
    gc.disable()
    try:
        read_video(videos[container], 12, decode_workers=2)
        alive = [o for o in gc.get_objects() if isinstance(o, (av.container.InputContainer, av.codec.context.CodecContext))]
    finally:
        gc.enable()
    assert alive == []


def test_frame_sink_gets_each_frame_once_and_keeps_none(videos, reference_frames):
    received = {}

    def make_sink(metadata):
        assert metadata.frames_indices == exact_uniform_indices(300, 12)
        return lambda position, frame: received.setdefault(position, []).append(frame)

    video = read_video(videos["mp4"], 12, decode_workers=2, make_frame_sink=make_sink, keep_frames=False)
    assert video.frames is None and video.metadata.frames_indices == exact_uniform_indices(300, 12)
    assert sorted(received) == exact_uniform_indices(300, 12)
    for position, frames in received.items():
        assert len(frames) == 1
        np.testing.assert_array_equal(frames[0], reference_frames["mp4"][position])


@pytest.mark.parametrize("decode_workers", [0, -1, 1.5, True, "2"])
def test_bad_worker_counts(videos, decode_workers):
    with pytest.raises(ValueError, match="decode_workers must be a positive integer"):
        read_video(videos["mp4"], 4, decode_workers=decode_workers)


def test_default_workers_are_the_available_cores():
    import os

    from vica2.video_loading_vica2 import default_decode_workers

    assert default_decode_workers() == len(os.sched_getaffinity(0))


def test_decodes_only_what_is_needed(videos):
    video = read_video(videos["mp4"], 5)
    # Keyframes every 30 frames: it seeks past the frames between samples and skips unreferenced B-frames.
    assert video.stats.seeks >= 4
    assert video.stats.frames_converted == 5
    assert video.stats.frames_decoded < 300 // 2


def test_file_objects_give_the_same_frames(videos, reference_frames):
    data = videos["mp4"].read_bytes()

    class Unseekable(io.RawIOBase):  # a pipe-like stream: read only
        def __init__(self):
            self.inner = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, buffer):
            chunk = self.inner.read(len(buffer))
            buffer[: len(chunk)] = chunk
            return len(chunk)

    for source in (io.BytesIO(data), Unseekable()):
        frames, metadata = load_video(source, 8)
        np.testing.assert_array_equal(frames, reference_frames["mp4"][metadata.frames_indices])


def test_more_frames_than_the_video_has_repeats_frames_like_the_release(videos, reference_frames, caplog):
    with caplog.at_level(logging.WARNING):
        video = read_video(videos["short"], 16)
    assert "has 10 frames but 16 were requested: frames are repeated" in caplog.text
    indices = video.metadata.frames_indices
    assert indices == np.linspace(0, 9, 16, dtype=int).tolist() and len(set(indices)) == 10
    np.testing.assert_array_equal(video.frames, reference_frames["short"][indices])
    assert video.stats.frames_converted == 10  # each distinct frame decoded once


def test_probe_gives_the_metadata_without_decoding(videos):
    metadata = probe_video(videos["mp4"], 16)
    assert metadata.frames_indices == exact_uniform_indices(300, 16)
    assert metadata.fps == 30.0 and metadata.total_num_frames == 300


def test_fast_mode_resizes_while_decoding(videos, reference_frames):
    video = read_video(videos["mp4"], 9, FastResize(siglip_size=32, hiera_size=40, hiera_frame_stride=2))
    assert video.frames is None
    assert video.siglip_frames.shape == (9, 3, 32, 32)  # channels first, as the towers take them
    assert video.hiera_frames.shape == (5, 3, 40, 40)  # frames 0, 2, 4, 6, 8 of the sample only
    # Resized, not reinvented: close to a PIL resize of the exact frame.
    from PIL import Image

    exact = reference_frames["mp4"][video.metadata.frames_indices[0]]
    pil = np.asarray(Image.fromarray(exact).resize((32, 32), Image.BICUBIC)).astype(int)
    assert np.abs(video.siglip_frames[0].transpose(1, 2, 0).astype(int) - pil).mean() < 8


# ----------------------------------------------------------------------------------------------- bad files
def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="Video file not found: .*nope.mp4"):
        load_video(tmp_path / "nope.mp4", 8)


def test_a_text_file_is_not_a_video(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 100)
    with pytest.raises(VideoLoadError, match="not a video"):
        load_video(path, 8)


def test_truncated_mp4_is_reported(videos, tmp_path):
    data = videos["mp4"].read_bytes()
    path = tmp_path / "truncated.mp4"
    path.write_bytes(data[: len(data) // 2])  # the index (moov) is written last: it is gone
    with pytest.raises(VideoLoadError, match="truncated or corrupt"):
        load_video(path, 8)


def test_truncated_faststart_mp4_is_reported(tmp_path):
    # Index first (faststart), data cut: the index promises frames that are not there.
    path = tmp_path / "faststart.mp4"
    with av.open(str(path), "w", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(60):
            frame = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    # Not the frames that are there with a shorter duration (a silently wrong time instruction): an error.
    with pytest.raises(VideoLoadError, match=r"truncated: its header lists 60 frames \(2.00 s\) but the file holds only"):
        load_video(path, 8)
    with pytest.raises(VideoLoadError, match="truncated"):
        probe_video(path, 8)  # the chat template's time instruction comes from here


def test_text_mode_file_object_is_refused(videos):
    with open(videos["mp4"], encoding="latin-1") as text_file:
        with pytest.raises(TypeError, match="opened in text mode.*'rb'"):
            load_video(text_file, 8)
    with pytest.raises(TypeError, match="text mode"):
        load_video(io.StringIO("not a video"), 8)


def test_frame_size_change_mid_stream_is_an_error(tmp_path):
    first = write_video(tmp_path / "a.h264", 20, format="h264")
    second = write_video(tmp_path / "b.h264", 20, width=32, height=32, format="h264")
    path = tmp_path / "both.h264"
    path.write_bytes(first.read_bytes() + second.read_bytes())  # a raw stream: a new size is just a new header
    with pytest.raises(VideoLoadError, match=r"changes mid-stream \(32x32, 64x48\).*Re-encode it to one size"):
        load_video(path, 8)


@pytest.mark.parametrize("rotation", [90, -90, 180])
@pytest.mark.parametrize("suffix", ["mp4", "mkv"])
def test_display_matrix_rotation_is_applied(tmp_path, rotation, suffix):
    path = write_video(tmp_path / f"turned.{suffix}", 12, rotation=rotation)
    stored = decode_all(path)  # as coded: 48 x 64
    upright = np.rot90(stored, rotation // 90, axes=(1, 2))  # PyAV's rotation is counter-clockwise, as np.rot90
    for workers in (1, 2):
        video = read_video(path, 6, decode_workers=workers)
        np.testing.assert_array_equal(video.frames, upright[video.metadata.frames_indices])
        assert (video.metadata.height, video.metadata.width) == upright.shape[1:3]
    fast = read_video(path, 6, FastResize(siglip_size=16, hiera_size=24, hiera_frame_stride=2))
    plain = read_video(write_video(tmp_path / f"plain.{suffix}", 12), 6, FastResize(16, 24, 2))
    turned = np.rot90(plain.siglip_frames, rotation // 90, axes=(2, 3)).astype(int)
    # swscale's filters are not exactly mirror-symmetric: upright within a level or two, far from the coded frame
    assert np.abs(fast.siglip_frames - turned).mean() < 2 < np.abs(fast.siglip_frames - plain.siglip_frames.astype(int)).mean()


def test_corrupt_header_is_reported(videos, tmp_path):
    data = bytearray(videos["mp4"].read_bytes())
    data[:64] = b"\xff" * 64
    path = tmp_path / "corrupt.mp4"
    path.write_bytes(bytes(data))
    with pytest.raises(VideoLoadError, match="truncated or corrupt"):
        load_video(path, 8)


def test_zero_frame_video(tmp_path):
    # An MPEG-TS whose program declares a video stream that never gets a frame (the audio makes the muxer write it).
    path = tmp_path / "empty.ts"
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg2video", rate=30)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = container.add_stream("mp2", rate=44100)
        container.start_encoding()
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1152), np.int16), format="s16", layout="mono")
            frame.sample_rate, frame.pts = 44100, i * 1152
            for packet in audio.encode(frame):
                container.mux(packet)
    with pytest.raises(VideoLoadError, match="contains no video frames"):
        load_video(path, 8)


def test_one_frame_video_is_a_still_image(videos, reference_frames):
    with pytest.raises(VideoLoadError, match="single frame.*images="):
        load_video(videos["single"], 8)
    frames, metadata = load_video(videos["single"], 1)  # explicitly one frame is fine
    np.testing.assert_array_equal(frames, reference_frames["single"])


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "tone.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        samples = (np.sin(np.arange(8000) / 10) * 3000).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(VideoLoadError, match="no video stream"):
        load_video(path, 8)


@pytest.mark.parametrize("num_frames", [0, -3, 2.5, True])
def test_bad_frame_counts(videos, num_frames):
    with pytest.raises(ValueError, match="num_frames must be a positive integer"):
        load_video(videos["mp4"], num_frames)


def test_missing_pyav_says_how_to_install(videos, monkeypatch):
    import vica2.video_loading_vica2 as video_loading

    monkeypatch.setattr(video_loading, "av", None)
    with pytest.raises(ImportError, match="pip install av"):
        load_video(videos["mp4"], 8)


def test_through_the_processor(videos, reference_frames):
    """The h264 clip through `Vica2Processor`: the release's indices and times, and pixels of the exact frames."""
    from conftest import FIXTURE_DIR, fixture_available, tiny_config

    if not fixture_available():
        pytest.skip("needs the fixture's tokenizer")
    from transformers import AutoTokenizer

    from vica2.processing_vica2 import Vica2Processor

    processor = Vica2Processor.from_model_config(tiny_config(), AutoTokenizer.from_pretrained(str(FIXTURE_DIR)))
    inputs = processor(text="<video>\nWhat moves?", videos=str(videos["mp4"]), num_frames=16, return_metadata=True)
    metadata = inputs["video_metadata"][0]
    expected = exact_uniform_indices(300, 16)
    assert metadata.frames_indices == expected
    assert metadata.timestamps == pytest.approx([i / 30 for i in expected], abs=1e-12)
    from_full_decode = processor.video_processor.preprocess_video(
        reference_frames["mp4"][expected], hiera_frame_stride=2
    )
    assert torch.equal(inputs["pixel_values_videos"][0], from_full_decode["pixel_values_videos"])
    assert torch.equal(inputs["hiera_pixel_values_videos"][0], from_full_decode["hiera_pixel_values_videos"])


@pytest.fixture(scope="module")
def processor():
    from conftest import FIXTURE_DIR, fixture_available, tiny_config

    if not fixture_available():
        pytest.skip("needs the fixture's tokenizer")
    from transformers import AutoTokenizer

    from vica2.processing_vica2 import Vica2Processor

    return Vica2Processor.from_model_config(tiny_config(), AutoTokenizer.from_pretrained(str(FIXTURE_DIR)))


@pytest.mark.parametrize("container", ["mp4", "avi", "open_gop"])
def test_pixels_prepared_while_decoding_equal_the_batched_recipe(processor, videos, reference_frames, container):
    # Parallel decode + per-frame preprocessing, on the CPU and through the device path (device="cpu"), against
    # the batched recipe on frames of a plain sequential decode: bit for bit.
    indices = processor.load_video(videos[container], 9).metadata.frames_indices
    expected = processor.video_processor.preprocess_video(reference_frames[container][indices], hiera_frame_stride=2)
    for options in ({"decode_workers": 1}, {"decode_workers": 3}, {"device": "cpu", "decode_workers": 2}):
        inputs = processor(text="<video>\nWhat moves?", videos=str(videos[container]), num_frames=9, **options)
        for key in ("pixel_values_videos", "hiera_pixel_values_videos"):
            assert torch.equal(inputs[key][0], expected[key]), (key, options)


def test_device_path_of_the_video_processor_equals_the_default(processor, reference_frames):
    frames = reference_frames["mp4"][:5]
    video_processor = processor.video_processor
    default = video_processor.preprocess_video(frames, hiera_frame_stride=2)
    on_device = video_processor.preprocess_video(frames, hiera_frame_stride=2, device="cpu")
    fast_default = video_processor.preprocess_resized_video(frames.transpose(0, 3, 1, 2), frames[::2].transpose(0, 3, 1, 2))
    fast_device = video_processor.preprocess_resized_video(
        np.ascontiguousarray(frames.transpose(0, 3, 1, 2)), np.ascontiguousarray(frames[::2].transpose(0, 3, 1, 2)), device="cpu"
    )
    for key in ("pixel_values_videos", "hiera_pixel_values_videos"):
        assert torch.equal(default[key], on_device[key])
        assert torch.equal(fast_default[key], fast_device[key])


def test_a_loaded_video_keeps_only_its_pixels_unless_asked(processor, videos):
    """Full-size frames cost far more than the towers' inputs: load_video keeps them only with keep_frames=True."""
    video = processor.load_video(str(videos["large"]), 8)
    assert video.frames is None and video.pixels["pixel_values_videos"].shape[0] == 8
    assert processor(text="<video>\nQ", videos=video)["pixel_values_videos"][0].data_ptr() == video.pixels["pixel_values_videos"].data_ptr()
    with pytest.raises(ValueError, match="its frames were not kept.*keep_frames=True"):
        processor(text="<video>\nQ", videos=video, hiera_antialias=True)


def test_a_loaded_video_reuses_its_pixels_and_keeps_its_frames(processor, videos, reference_frames):
    video = processor.load_video(str(videos["large"]), 8, keep_frames=True)
    assert video.frames is not None and video.pixels is not None
    first = processor(text="<video>\nQ1", videos=video)
    second = processor(text="<video>\nQ2", videos=video)
    assert first["pixel_values_videos"][0].data_ptr() == video.pixels["pixel_values_videos"].data_ptr()  # not redone
    assert torch.equal(first["hiera_pixel_values_videos"], second["hiera_pixel_values_videos"])
    # Other settings are prepared again from the kept frames.
    antialiased = processor(text="<video>\nQ3", videos=video, hiera_antialias=True)
    expected = processor.video_processor.preprocess_video(
        reference_frames["large"][video.metadata.frames_indices], hiera_frame_stride=2, hiera_antialias=True
    )
    assert torch.equal(antialiased["hiera_pixel_values_videos"][0], expected["hiera_pixel_values_videos"])
    assert not torch.equal(antialiased["hiera_pixel_values_videos"], first["hiera_pixel_values_videos"])


def test_chat_template_reads_with_the_calls_settings(processor, videos, reference_frames):
    messages = [{"role": "user", "content": [{"type": "video", "path": str(videos["large"])}, {"type": "text", "text": "Q"}]}]
    indices = exact_uniform_indices(30, 6)
    frames = reference_frames["large"][indices]
    for antialias in (True, False):
        inputs = processor.apply_chat_template(
            messages, tokenize=True, return_dict=True, num_frames=6, hiera_antialias=antialias, decode_workers=2
        )
        expected = processor.video_processor.preprocess_video(frames, hiera_frame_stride=2, hiera_antialias=antialias)
        assert torch.equal(inputs["hiera_pixel_values_videos"][0], expected["hiera_pixel_values_videos"])


def test_pixels_of_repeated_frames_fill_every_slot(processor, videos, reference_frames):
    inputs = processor(text="<video>\nQ", videos=str(videos["short"]), num_frames=16)  # 10 frames: some sampled twice
    indices = np.linspace(0, 9, 16, dtype=int).tolist()
    expected = processor.video_processor.preprocess_video(reference_frames["short"][indices], hiera_frame_stride=2)
    for key in ("pixel_values_videos", "hiera_pixel_values_videos"):
        assert torch.equal(inputs[key][0], expected[key])


# ----------------------------------------------------------------------------------------------- untrusted files
def test_a_local_file_named_like_an_ffmpeg_url_is_read_as_a_file(tmp_path, monkeypatch):
    """FFmpeg reads `tcp:HOST:PORT` as an address: a local file so named is read from disk and connects nowhere."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(60)  # the acceptor stops itself even if nothing wakes it
    port, accepted, done = server.getsockname()[1], [], threading.Event()

    def accept():
        while not done.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                return
            accepted.append(done.is_set())  # False: a connection made by the read
            connection.close()  # a read that connected gets an empty answer: it ends, it does not hang

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    monkeypatch.chdir(tmp_path)
    name = f"tcp:127.0.0.1:{port}"
    write_video(tmp_path / "clip.mp4", num_frames=10).rename(tmp_path / name)
    try:
        for allow_network in (True, False):
            video = read_video(name, 3, allow_network=allow_network)
            assert video.frames.shape == (3, 48, 64, 3) and video.metadata.total_num_frames == 10
        assert probe_video(name, 3).frames_indices == [0, 4, 9]
    finally:
        done.set()
        socket.create_connection(("127.0.0.1", port)).close()  # wakes the acceptor
        thread.join()
        server.close()
    assert accepted == [True]  # only the wake-up call connected


def test_playlists_and_concat_lists_are_refused_unless_asked_for(tmp_path):
    """A playlist / concat list would make the reader open the files it names: refused for untrusted input, for a
    path and a file object, unless the caller allows playlists by name."""
    write_video(tmp_path / "clip.mp4", num_frames=10)
    (tmp_path / "list.ffconcat").write_text("ffconcat version 1.0\nfile clip.mp4\n")
    (tmp_path / "list.m3u8").write_text("#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\nclip.mp4\n#EXT-X-ENDLIST\n")
    for name in ("list.ffconcat", "list.m3u8"):
        for source in (lambda: str(tmp_path / name), lambda: (tmp_path / name).open("rb")):
            for allow_network in (True, False):
                with pytest.raises(VideoLoadError, match="playlist.*allow_playlists=True"):
                    read_video(source(), 2, allow_network=allow_network)
            with pytest.raises(VideoLoadError, match="allow_playlists=True"):
                probe_video(source(), 2)
    video = read_video(str(tmp_path / "list.ffconcat"), 2, allow_playlists=True)  # asked for by name: followed
    assert video.frames.shape == (2, 48, 64, 3)


def test_a_video_costing_more_than_the_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    """Declared size x frames sampled is bounded before anything is decoded (a small upload can declare 16000 x 16000
    frames); at the limit the video is read."""
    import vica2.video_loading_vica2 as video_loading

    path = write_video(tmp_path / "clip.mp4", num_frames=10)  # 64 x 48
    assert video_loading.DEFAULT_MAX_VIDEO_PIXELS == 64 * 3840 * 2160  # 64 frames at 4K
    decoded = []
    monkeypatch.setattr(video_loading, "_decode_positions", lambda *args: decoded.append(args))
    for read in (read_video, probe_video):
        with pytest.raises(VideoLoadError, match=r"64x48 frames.*12,288 pixels.*limit of 9,216 \(max_video_pixels"):
            read(str(path), 4, max_video_pixels=64 * 48 * 3)
    assert decoded == []
    monkeypatch.undo()
    assert read_video(str(path), 3, max_video_pixels=64 * 48 * 3).frames.shape == (3, 48, 64, 3)
    with pytest.raises(ValueError, match="max_video_pixels must be a positive integer"):
        read_video(str(path), 3, max_video_pixels=0)


def test_every_read_has_a_timeout(monkeypatch):
    """A server that accepts and never answers cannot hold a read forever."""
    import socket
    import threading

    import vica2.video_loading_vica2 as video_loading

    monkeypatch.setattr(video_loading, "READ_TIMEOUT", 1.0, raising=False)  # (absent before reads had one)
    server = socket.create_server(("127.0.0.1", 0))
    errors = []

    def read():
        try:
            read_video(f"http://127.0.0.1:{server.getsockname()[1]}/clip.mp4", 2)
        except VideoLoadError as error:
            errors.append(error)

    thread = threading.Thread(target=read, daemon=True)
    try:
        thread.start()
        thread.join(120)  # a bound for the failing case only; a read with a timeout ends long before
        assert not thread.is_alive() and len(errors) == 1
    finally:
        server.close()
