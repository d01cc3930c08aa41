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


def write_video(path, num_frames=300, fps=30, width=64, height=48, gop=30, codec="libx264", preset="veryfast"):
    """An h264 video of a bar moving over a gradient, with the frame number in the blue channel (B-frames on)."""
    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options={"preset": preset} if codec == "libx264" else {})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        for i in range(num_frames):
            frame = np.zeros((height, width, 3), np.uint8)
            frame[..., 0] = (xx * 3 + 2 * i) % 256
            frame[..., 1] = (yy * 4) % 256
            frame[..., 2] = i % 256
            frame[(abs(xx - (3 * i) % width) < 6) & (abs(yy - height // 2) < 8)] = (250, 250, 20)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
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
    try:
        frames, metadata = load_video(path, 8)
    except VideoLoadError as error:
        assert "truncated or corrupt" in str(error)
    else:  # the demuxer dropped the missing packets: only frames that exist were counted and decoded
        assert metadata.total_num_frames < 60 and frames.shape[0] == 8


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
    from_full_decode = processor.image_processor.preprocess_video(
        reference_frames["mp4"][expected], hiera_frame_stride=2
    )
    assert torch.equal(inputs["pixel_values_videos"][0], from_full_decode["pixel_values_videos"])
    assert torch.equal(inputs["hiera_pixel_values_videos"][0], from_full_decode["hiera_pixel_values_videos"])
