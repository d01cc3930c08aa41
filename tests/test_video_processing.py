"""The video processor: the release's frame sampling from frames a serving engine decoded (no vLLM needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import requires_fixture, tiny_config
from test_processing import make_processor, write_video
from vica2.video_loading_vica2 import load_video


pytestmark = requires_fixture  # the fixture's tokenizer


@pytest.fixture(scope="module")
def processor():
    return make_processor(tiny_config())  # frame budget 8, Hiera frames 4


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("video-processing")
    return {"long": write_video(folder / "long.mp4", num_frames=30), "short": write_video(folder / "short.mp4", 5)}


def _all_frames(path):
    frames, metadata = load_video(path, 1)
    total = metadata.total_num_frames
    frames, _ = load_video(path, total)  # every frame once, in order
    return frames, {"total_num_frames": total, "fps": metadata.fps, "duration": metadata.duration,
                    "frames_indices": list(range(total))}


def _same(a, b):
    assert a["input_ids"].tolist() == b["input_ids"].tolist()
    for name in ("pixel_values_videos", "hiera_pixel_values_videos", "video_token_ratio"):
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize(("clip", "num_frames"), [("long", None), ("long", 4), ("short", None)])
def test_sampling_decoded_frames_equals_reading_the_file(processor, clips, clip, num_frames):
    """All decoded frames + their metadata, sampled by the processor (as vLLM hands them over), give exactly what
    the processor gives for the file: the release's floor(linspace) indices, repeats for a short video included."""
    frames, metadata = _all_frames(clips[clip])
    kwargs = {} if num_frames is None else {"num_frames": num_frames}
    from_frames = processor(text="<video>\nQ", videos=[(frames, metadata)], do_sample_frames=True,
                            return_metadata=True, **kwargs)
    from_file = processor(text="<video>\nQ", videos=str(clips[clip]), return_metadata=True, **kwargs)
    _same(from_frames, from_file)
    assert from_frames["video_metadata"][0].frames_indices == from_file["video_metadata"][0].frames_indices
    assert from_frames["pixel_values_videos"].shape[1] == (num_frames or 8)


def test_frames_already_sampled_as_the_release_does_are_used_as_they_are(processor, clips):
    frames, metadata = load_video(clips["long"], 8)  # what vLLM's loader gives for num_frames=8
    given = {"total_num_frames": 30, "fps": metadata.fps, "frames_indices": metadata.frames_indices}
    for do_sample in (True, False):
        _same(processor(text="<video>\nQ", videos=[(frames, given)], do_sample_frames=do_sample),
              processor(text="<video>\nQ", videos=str(clips["long"])))


def test_frames_the_release_would_not_read_are_refused(processor, clips):
    frames, metadata = load_video(clips["long"], 8)
    given = {"total_num_frames": 30, "fps": metadata.fps, "frames_indices": metadata.frames_indices}
    with pytest.raises(ValueError, match=r"ViCA2 samples 6 frames .* were not decoded .*num_frames=6"):
        processor(text="<video>\nQ", videos=[(frames, given)], num_frames=6)


def test_the_video_processor_is_what_serving_engines_look_for(processor):
    video_processor = processor.video_processor
    assert video_processor.do_sample_frames is True
    assert video_processor.size == {"height": 56, "width": 56}
    assert set(video_processor.model_input_names) <= set(processor.model_input_names)
    frames = np.zeros((3, 20, 20, 3), np.uint8)  # no metadata: used as given
    out = processor(text="<video>", videos=frames, do_sample_frames=True, hiera_frames=2)
    assert out["pixel_values_videos"].shape[1] == 3 and out["video_token_ratio"].tolist() == [[8, 2, 2, 2]]
