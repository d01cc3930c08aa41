"""Vica2Processor: parity with the release's preprocessing and prompts, exact placeholder counts, chat template,
saving / loading, and a clear error for every kind of bad input."""

from __future__ import annotations

import base64
import io
import json
import math
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import (
    media_server,
    FIXTURE_DIR,
    FIXTURE_IMAGE_TOKEN_ID,
    FIXTURE_VIDEO_TOKEN_ID,
    expand_release_ids,
    fixture_sample,
    load_fixture_config,
    requires_fixture,
    tiny_config,
    tiny_model,
)


pytestmark = requires_fixture  # the fixture's tokenizer is used throughout

MAX_PIXEL_DIFF = 1e-5
MAX_LOGIT_DIFF = 1e-4


def fixture_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(FIXTURE_DIR))


def make_processor(config):
    from vica2.processing_vica2 import Vica2Processor

    return Vica2Processor.from_model_config(config, fixture_tokenizer())


@pytest.fixture(scope="module")
def processor():
    """The release fixture's processor: SigLIP 384, Hiera 1024, frame budget 64 / Hiera frames 32."""
    return make_processor(load_fixture_config())


@pytest.fixture(scope="module")
def tiny():
    """A tiny model (SigLIP 56, Hiera 64, frame budget 8 / Hiera frames 4) and its processor."""
    model = tiny_model()
    return model, make_processor(model.config)


@pytest.fixture(scope="module")
def samples():
    return {name: fixture_sample(name) for name in ("video", "image")}


def write_video(path, num_frames=30, fps=10, width=48, height=32):
    av = pytest.importorskip("av")
    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            frame = np.stack([(xx * 5 + 7 * i) % 256, (yy * 7) % 256, np.full_like(xx, 8 * i % 256)], -1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame.astype(np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    """30 frames at 10 fps (3 s), 48 x 32."""
    return write_video(tmp_path_factory.mktemp("processing") / "clip.mp4")


def user_turn(*content):
    return [{"role": "user", "content": list(content)}]


def release_question_text(sample) -> str:
    """The release's user message without its leading '<image>\\n' (the chat template renders the placeholder)."""
    assert sample["question"].startswith("<image>\n")
    return sample["question"][len("<image>\n") :]


def count(ids, token_id) -> int:
    return int((torch.as_tensor(ids) == token_id).sum())


# ----------------------------------------------------------------------------------------------- parity: pixels
def test_video_siglip_pixels_match_the_release(processor, samples):
    out = processor(videos=samples["video"]["frames_uint8"])
    assert out["pixel_values_videos"].shape == (1, 4, 3, 384, 384)
    diff = (out["pixel_values_videos"][0] - samples["video"]["siglip_pixel_values"]).abs().max()
    assert diff <= MAX_PIXEL_DIFF


def assert_hiera_matches_release(hiera: torch.Tensor, name: str, frames: list[int]):
    """Compare with what the fixture stores of the release's SAM2 output: a 1/16 sub-grid, five rows, channel sums."""
    folder = FIXTURE_DIR / name
    summary = json.loads((folder / "summary.json").read_text())["sam_pixel_values"]
    stride16 = np.load(folder / "sam_pixel_values_stride16.npy")[frames]
    rows = np.load(folder / "sam_pixel_values_rows.npy")[frames]
    ours = hiera.numpy()
    assert np.abs(ours[:, :, ::16, ::16] - stride16).max() <= MAX_PIXEL_DIFF
    assert np.abs(ours[:, :, summary["rows"], :] - rows).max() <= MAX_PIXEL_DIFF
    sums = ours.astype(np.float64).sum(axis=(2, 3))
    expected = np.asarray(summary["per_frame_channel_sum"])[frames]
    # A sum of 1024^2 values each within 1e-5 of the release's.
    np.testing.assert_allclose(sums, expected, rtol=0, atol=MAX_PIXEL_DIFF * 1024 * 1024)
    assert np.abs(sums - expected).max() < 1e-6  # in fact they are identical up to summation order


def test_video_hiera_pixels_match_the_release(processor, samples):
    frames = samples["video"]["frames_uint8"]
    # The processor prepares only the frames Hiera encodes: every 2nd (64 / 32).
    out = processor(videos=frames)
    assert out["hiera_pixel_values_videos"].shape == (1, 2, 3, 1024, 1024)
    assert_hiera_matches_release(out["hiera_pixel_values_videos"][0], "video", [0, 2])
    # All four frames, as the release's SAM2 processor prepared them.
    every_frame = processor.video_processor.preprocess_video(frames, hiera_frame_stride=1)
    assert_hiera_matches_release(every_frame["hiera_pixel_values_videos"], "video", [0, 1, 2, 3])


def test_image_pixels_match_the_release(processor, samples):
    image = samples["image"]["frames_uint8"][0]  # 300 x 500: best grid 384 x 768, base view + 2 tiles
    out = processor(images=image)
    assert out["pixel_values"].shape == (1, 3, 3, 384, 384)
    assert (out["pixel_values"][0] - samples["image"]["siglip_pixel_values"]).abs().max() <= MAX_PIXEL_DIFF
    assert out["image_sizes"].tolist() == [[300, 500]]
    assert_hiera_matches_release(out["hiera_pixel_values"], "image", [0])


def reference_anyres_views(image: Image.Image, pinpoints, side: int) -> list[np.ndarray]:
    """The release's anyres views written out from the spec (LLaVA's select_best_resolution on (width, height),
    resize keeping aspect with the other side min(ceil(side * scale), target), paste centred at floor offsets on
    black, crops row by row, preceded by the image squashed to side x side)."""
    width, height = image.size
    best, best_effective, best_wasted = None, -1, None
    for target_h, target_w in pinpoints:
        scale = min(target_w / width, target_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = target_w * target_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (target_w, target_h), effective, wasted
    target_w, target_h = best
    if target_w / width < target_h / height:
        new_w, new_h = target_w, min(math.ceil(height * target_w / width), target_h)
    else:
        new_w, new_h = min(math.ceil(width * target_h / height), target_w), target_h
    canvas = Image.new("RGB", (target_w, target_h))
    canvas.paste(image.resize((new_w, new_h), Image.BICUBIC), ((target_w - new_w) // 2, (target_h - new_h) // 2))
    crops = [
        canvas.crop((x, y, x + side, y + side)) for y in range(0, target_h, side) for x in range(0, target_w, side)
    ]
    return [np.asarray(view) for view in [image.resize((side, side), Image.BICUBIC), *crops]]


@pytest.mark.parametrize("size", [(300, 500), (61, 173), (173, 61), (400, 401), (20, 20), (57, 113)])
def test_anyres_tiles_follow_the_release_recipe(tiny, size):
    _, processor = tiny
    image = Image.fromarray(np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8))
    views = reference_anyres_views(image, processor.image_processor.image_grid_pinpoints, 56)
    expected = (torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    pixel_values = processor(images=image)["pixel_values"][0]
    assert (pixel_values[: len(views)] - expected).abs().max() <= MAX_PIXEL_DIFF
    assert pixel_values[len(views) :].abs().sum() == 0


def test_hiera_antialias_is_an_option(tiny):
    _, processor = tiny
    frames = np.random.default_rng(0).integers(0, 256, (2, 200, 300, 3), dtype=np.uint8)  # downscaled to 64
    plain = processor(videos=frames)["hiera_pixel_values_videos"]
    smooth = processor(videos=frames, hiera_antialias=True)["hiera_pixel_values_videos"]
    assert not torch.allclose(plain, smooth)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    x = torch.from_numpy(frames[:1]).permute(0, 3, 1, 2).float() / 255
    reference = (torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", antialias=True) - mean) / std
    assert (smooth[0, :1] - reference).abs().max() <= MAX_PIXEL_DIFF


def test_image_processor_declares_its_extra_kwargs_and_checks_its_grid():
    from vica2.image_processing_vica2 import Vica2ImageProcessor

    image = np.zeros((30, 40, 3), np.uint8)
    image_processor = Vica2ImageProcessor(
        size={"height": 56, "width": 56}, hiera_size=64, image_grid_pinpoints=[[56, 112]]
    )
    out = image_processor(image, hiera_antialias=True, hiera_size=32)  # declared in valid_kwargs
    assert out["hiera_pixel_values"].shape == (1, 3, 32, 32) and out["pixel_values"].shape == (1, 3, 3, 56, 56)
    with pytest.raises(TypeError, match="bogus"):
        image_processor(image, bogus=1)
    with pytest.raises(ValueError, match="multiples of the SigLIP size 56"):
        Vica2ImageProcessor(size={"height": 56, "width": 56})(image)  # the 384-based default grid


# ----------------------------------------------------------------------------------------------- parity: ids, logits
@pytest.mark.parametrize("name", ["video", "image"])
def test_chat_template_renders_the_release_prompt(processor, samples, name):
    sample = samples[name]
    media = {"type": name, name: sample["frames_uint8"] if name == "video" else sample["frames_uint8"][0]}
    prompt = processor.apply_chat_template(
        user_turn(media, {"type": "text", "text": release_question_text(sample)}), add_generation_prompt=True
    )
    assert prompt == sample["prompt"].replace("<image>", f"<{name}>")


def release_chat_inputs(processor, sample, name):
    """The fixture sample's frames and question through `apply_chat_template` (tokenized)."""
    media = {"type": name, name: sample["frames_uint8"] if name == "video" else sample["frames_uint8"][0]}
    inputs = processor.apply_chat_template(
        user_turn(media, {"type": "text", "text": release_question_text(sample)}),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    return media, inputs


@pytest.mark.parametrize("name", ["video", "image"])
def test_input_ids_match_the_release(processor, samples, name):
    sample = samples[name]
    media, inputs = release_chat_inputs(processor, sample, name)
    token_id = FIXTURE_VIDEO_TOKEN_ID if name == "video" else FIXTURE_IMAGE_TOKEN_ID
    expected = expand_release_ids(sample["input_ids"], sample["summary"]["num_visual_tokens"], token_id)
    assert inputs["input_ids"][0].tolist() == expected
    # The same through __call__ with the release's prompt text.
    direct = processor(text=sample["prompt"].replace("<image>", f"<{name}>"), **{f"{name}s": media[name]})
    assert direct["input_ids"][0].tolist() == expected


@pytest.mark.parametrize("name", ["video", "image"])
def test_processor_to_model_reproduces_the_release_logits(processor, samples, fixture_model, name):
    sample = samples[name]
    _, inputs = release_chat_inputs(processor, sample, name)
    with torch.no_grad():
        logits = fixture_model(**inputs).logits
    assert logits.shape == sample["logits"].shape
    assert (logits - sample["logits"]).abs().max() <= MAX_LOGIT_DIFF


# ----------------------------------------------------------------------------------------------- placeholder counts
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    num_frames=st.integers(1, 6),
    frame_stride=st.sampled_from([1, 2, 4]),
    hiera_frames=st.sampled_from([1, 2, 3]),
    siglip_pool_stride=st.integers(1, 3),
    hiera_pool_stride=st.integers(1, 3),
    frame_size=st.tuples(st.integers(8, 90), st.integers(8, 90)),
    image_size=st.tuples(st.integers(10, 200), st.integers(10, 200)),
)
def test_placeholders_equal_the_tokens_the_model_emits(
    tiny, num_frames, frame_stride, hiera_frames, siglip_pool_stride, hiera_pool_stride, frame_size, image_size
):
    model, processor = tiny
    rng = np.random.default_rng(num_frames)
    overrides = {
        "video_frames_budget": frame_stride * hiera_frames,
        "hiera_frames": hiera_frames,
        "siglip_pool_stride": siglip_pool_stride,
        "hiera_pool_stride": hiera_pool_stride,
    }
    inputs = processor(
        text="<image>\nand <video>\nwhat?",
        images=rng.integers(0, 256, (*image_size, 3), dtype=np.uint8),
        videos=rng.integers(0, 256, (num_frames, *frame_size, 3), dtype=np.uint8),
        **overrides,
    )
    assert inputs["video_token_ratio"].tolist() == [list(overrides.values())]  # handed to the model, per video
    with torch.no_grad():
        video_tokens = model.get_video_features(
            inputs["pixel_values_videos"], inputs["hiera_pixel_values_videos"], inputs["video_token_ratio"]
        )[0].shape[0]
        image_tokens = model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"], inputs["hiera_pixel_values"]
        )[0].shape[0]
        model(**inputs)  # the model's own placeholder check passes
    assert count(inputs["input_ids"], processor.video_token_id) == video_tokens
    assert count(inputs["input_ids"], processor.image_token_id) == image_tokens
    assert inputs["hiera_pixel_values_videos"].shape[1] == math.ceil(num_frames / frame_stride)


def test_large_images_downscaled_past_anyres_max_still_match(tiny):
    """Pinpoints up to 6 x 6 tiles, as ViCA2-7B's: big images take the anyres_max_9 downscale branch."""
    pinpoints = [[56 * h, 56 * w] for h in range(1, 7) for w in range(1, 7)]
    model = tiny_model(image_grid_pinpoints=pinpoints)
    processor = make_processor(model.config)
    rng = np.random.default_rng(6)
    for size in ((330, 300), (90, 330), (200, 200)):
        inputs = processor(text="<image>", images=rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        with torch.no_grad():
            tokens = model.get_image_features(
                inputs["pixel_values"], inputs["image_sizes"], inputs["hiera_pixel_values"]
            )[0].shape[0]
        assert count(inputs["input_ids"], processor.image_token_id) == tokens, size


def test_num_multimodal_tokens_for_serving_engines(tiny):
    _, processor = tiny
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size, dtype=np.uint8) for size in ((30, 100, 3), (170, 40, 3))]
    videos = [rng.integers(0, 256, (t, 20, 30, 3), dtype=np.uint8) for t in (8, 5)]
    for overrides in ({}, {"hiera_frames": 2, "siglip_pool_stride": 1}):
        inputs = processor(text=["<image><image>", "<video><video>"], images=images, videos=videos, **overrides)
        data = processor._get_num_multimodal_tokens(
            image_sizes=[i.shape[:2] for i in images], video_sizes=[v.shape[:3] for v in videos], **overrides
        )
        assert sum(data["num_image_tokens"]) == count(inputs["input_ids"][0], processor.image_token_id)
        assert sum(data["num_video_tokens"]) == count(inputs["input_ids"][1], processor.video_token_id)
        assert data["num_image_patches"] == [1, 1]
    # ViCA2-7B's figures (SPEC.md): a 64-frame video is 13,440 + 8,704 tokens; an image adds 32 x 33 Hiera tokens.
    from vica2.configuration_vica2 import Vica2Config

    seven_b = make_processor(Vica2Config(image_token_id=FIXTURE_IMAGE_TOKEN_ID, video_token_id=FIXTURE_VIDEO_TOKEN_ID))
    data = seven_b._get_num_multimodal_tokens(image_sizes=[(300, 500)], video_sizes=[(64, 720, 1280)])
    assert data["num_video_tokens"] == [22144]
    assert data["num_image_tokens"] == [1998 + 1056]


def test_batches_pad_left_by_default_and_right_on_request(tiny):
    model, processor = tiny
    rng = np.random.default_rng(1)
    videos = [rng.integers(0, 256, (t, 24, 24, 3), dtype=np.uint8) for t in (4, 2)]  # different lengths
    texts = ["<video>\nA long question about the first video?", "<video>\nShort?"]
    left = processor(text=texts, videos=videos)
    right = processor(text=texts, videos=videos, padding_side="right")
    assert isinstance(left["pixel_values_videos"], list)  # frame counts differ: one tensor per video
    assert left["attention_mask"][1, 0] == 0 and left["attention_mask"][1, -1] == 1
    assert right["attention_mask"][1, 0] == 1 and right["attention_mask"][1, -1] == 0
    with torch.no_grad():
        logits_left = model(**left).logits
        logits_right = model(**right).logits
    length = int(right["attention_mask"][1].sum())
    # The same tokens at the same positions (the model derives positions from the mask) give the same logits.
    assert (logits_left[1, -length:] - logits_right[1, :length]).abs().max() < 1e-4


def test_generate_uses_the_overrides_and_batches_like_single_prompts(tiny):
    model, processor = tiny
    rng = np.random.default_rng(7)
    videos = [rng.integers(0, 256, (t, 30, 40, 3), dtype=np.uint8) for t in (5, 3)]
    texts = ["<video>\nWhat is it?", "<video>\nQ"]
    overrides = {"hiera_frames": 2, "siglip_pool_stride": 3}
    batch = model.generate(**processor(text=texts, videos=videos, **overrides), max_new_tokens=4, do_sample=False)
    for i in range(2):
        single = model.generate(
            **processor(text=texts[i], videos=videos[i], **overrides), max_new_tokens=4, do_sample=False
        )
        assert batch[i, -4:].tolist() == single[0, -4:].tolist()


def test_images_and_videos_fill_their_placeholders_in_order(tiny):
    _, processor = tiny
    rng = np.random.default_rng(2)
    small, large = (
        rng.integers(0, 256, (20, 20, 3), dtype=np.uint8),
        rng.integers(0, 256, (150, 60, 3), dtype=np.uint8),
    )
    inputs = processor(text=["<image> then <image>"], images=[[small, large]])
    ids = inputs["input_ids"][0]
    runs = torch.diff(torch.nonzero(ids == processor.image_token_id).flatten())
    first_run = int(torch.nonzero(runs != 1).flatten()[0]) + 1
    expected_first = processor._get_num_multimodal_tokens(image_sizes=[(20, 20)])["num_image_tokens"][0]
    assert first_run == expected_first  # the small image's tokens come first
    assert inputs["image_sizes"].tolist() == [[20, 20], [150, 60]]
    # The small image has its base view and one grid tile; its row of `pixel_values` is zero past them.
    assert inputs["pixel_values"].shape[1] > 2
    assert inputs["pixel_values"][0, 1].abs().sum() > 0 and inputs["pixel_values"][0, 2:].abs().sum() == 0


# ----------------------------------------------------------------------------------------------- chat template
def test_time_instruction_is_the_release_text():
    from transformers.video_utils import VideoMetadata

    from vica2.processing_vica2 import time_instruction

    metadata = VideoMetadata(total_num_frames=300, fps=30.0, duration=10.0, frames_indices=[0, 149, 299])
    assert time_instruction(metadata) == (
        "The video lasts for 10.00 seconds, and 3 frames are uniformly sampled from it. These frames are located at "
        "0.00s,4.97s,9.97s.Please answer the following questions related to this video."
    )
    assert time_instruction(VideoMetadata(total_num_frames=4)) is None  # no fps: timing unknown


def expected_time_instruction(total, fps, num_frames):
    indices = np.linspace(0, total - 1, num_frames, dtype=int)
    times = ",".join(f"{i / fps:.2f}s" for i in indices)
    return (
        f"The video lasts for {total / fps:.2f} seconds, and {num_frames} frames are uniformly sampled from it. "
        f"These frames are located at {times}.Please answer the following questions related to this video."
    )


def test_chat_template_loads_a_video_path_and_adds_the_time_instruction(tiny, video_file):
    model, processor = tiny
    messages = user_turn({"type": "video", "path": str(video_file)}, {"type": "text", "text": "What moves?"})
    instruction = expected_time_instruction(30, 10, 8)  # the tiny budget: 8 frames
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"<video>\n{instruction}\n\nWhat moves?<|im_end|>\n<|im_start|>assistant\n"
    )
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert inputs["pixel_values_videos"].shape == (1, 8, 3, 56, 56)
    assert inputs["hiera_pixel_values_videos"].shape == (1, 4, 3, 64, 64)
    decoded = processor.tokenizer.decode(inputs["input_ids"][0])
    assert decoded.replace("<video>", "") == text.replace("<video>", "")
    assert messages[0]["content"][0] == {"type": "video", "path": str(video_file)}  # caller's messages untouched
    with torch.no_grad():
        model(**inputs)


def test_chat_template_marks_a_video_without_a_source_only_for_the_plugin(tiny):
    """vLLM renders a chat before it decodes the video and gives the template a video part without a source. With
    `engine_expands_videos` (what `vica2 serve` sets) the template writes `<video><video>`, which ViCA2's vLLM plugin
    replaces with the placeholders and the time instruction (tests_vllm checks the result against
    `apply_chat_template(..., tokenize=True)`); any other engine gets the plain `<video>\n`, no stray placeholder."""
    _, processor = tiny
    messages = user_turn({"type": "video"}, {"type": "text", "text": "What moves?"})
    render = lambda **kwargs: processor.tokenizer.apply_chat_template(  # noqa: E731
        messages, chat_template=processor.chat_template, tokenize=False, **kwargs)
    assert "<|im_start|>user\n<video><video>What moves?<|im_end|>" in render(engine_expands_videos=True)
    assert "<|im_start|>user\n<video>\nWhat moves?<|im_end|>" in render()
    assert "<|im_start|>user\n<video>\nWhat moves?<|im_end|>" in render(engine_expands_videos=False)
    with_source = user_turn({"type": "video", "path": "room.mp4"}, {"type": "text", "text": "What moves?"})
    text = processor.tokenizer.apply_chat_template(with_source, chat_template=processor.chat_template, tokenize=False,
                                                   engine_expands_videos=True)
    assert "<video>\nWhat moves?" in text  # a video with its source is transformers' to read, marked or not
    with pytest.raises(ValueError, match="exactly one of 'video', 'path' or 'url'"):
        processor.apply_chat_template(messages)  # transformers' own rendering needs the video


def test_chat_template_settings_reach_loading_and_the_model(tiny, video_file):
    model, processor = tiny
    messages = user_turn({"type": "video", "url": str(video_file)}, {"type": "text", "text": "Q"})
    inputs = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, num_frames=6, processor_kwargs={"hiera_frames": 2}
    )
    assert inputs["pixel_values_videos"].shape[1] == 6 and inputs["video_token_ratio"][0, 1] == 2  # hiera_frames
    assert inputs["hiera_pixel_values_videos"].shape[1] == 2  # every 4th of 6 frames (8 / 2 = 4)
    assert expected_time_instruction(30, 10, 6) in processor.tokenizer.decode(inputs["input_ids"][0])
    with torch.no_grad():
        model(**inputs)
    # The metadata of what was sampled, on request.
    direct = processor(text="<video>", videos=str(video_file), num_frames=6, return_metadata=True)
    assert direct["video_metadata"][0].frames_indices == np.linspace(0, 29, 6, dtype=int).tolist()


def test_time_instruction_off_without_timing_or_on_request(tiny, video_file):
    _, processor = tiny
    frames = np.zeros((3, 16, 16, 3), np.uint8)
    question = {"type": "text", "text": "Q"}
    raw = processor.apply_chat_template(user_turn({"type": "video", "video": frames}, question))
    assert "<video>\nQ<|im_end|>" in raw  # decoded frames: no timing, no instruction
    off = processor.apply_chat_template(
        user_turn({"type": "video", "path": str(video_file)}, question), add_time_instruction=False
    )
    assert "<video>\nQ<|im_end|>" in off
    metadata = {"total_num_frames": 90, "fps": 30.0, "frames_indices": [0, 44, 89]}
    with_metadata = processor.apply_chat_template(
        user_turn({"type": "video", "video": frames, "metadata": metadata}, question), tokenize=True, return_dict=True
    )
    assert "The video lasts for 3.00 seconds, and 3 frames" in processor.tokenizer.decode(
        with_metadata["input_ids"][0]
    )


def test_chat_template_with_system_history_and_images(tiny):
    _, processor = tiny
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Green."}]},
        {"role": "user", "content": "Sure?"},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nColour?<|im_end|>\n"
        "<|im_start|>assistant\nGreen.<|im_end|>\n<|im_start|>user\nSure?<|im_end|>\n<|im_start|>assistant\n"
    )
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert inputs["image_sizes"].tolist() == [[30, 40]]


def test_chat_template_batches_conversations(tiny, video_file):
    model, processor = tiny
    conversations = [
        user_turn({"type": "video", "path": str(video_file)}, {"type": "text", "text": "What moves?"}),
        user_turn({"type": "image", "image": np.zeros((20, 30, 3), np.uint8)}, {"type": "text", "text": "Empty?"}),
    ]
    inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert inputs["input_ids"].shape[0] == 2 and inputs["attention_mask"][1, 0] == 0  # left-padded
    assert inputs["pixel_values_videos"].shape[:2] == (1, 8) and inputs["pixel_values"].shape[0] == 1
    with torch.no_grad():
        model(**inputs)


def test_fast_decoding_is_close_to_exact(tiny, video_file):
    _, processor = tiny
    exact = processor(text="<video>", videos=str(video_file))
    fast = processor(text="<video>", videos=str(video_file), fast_decode=True)
    assert torch.equal(exact["input_ids"], fast["input_ids"])
    for key in ("pixel_values_videos", "hiera_pixel_values_videos"):
        assert exact[key].shape == fast[key].shape
        assert (exact[key] - fast[key]).abs().mean() < 0.1  # normalised units; a few uint8 levels


# ----------------------------------------------------------------------------------------------- saving and loading
def test_save_and_load_through_auto_classes(processor, samples, tmp_path):
    from transformers import AutoProcessor
    from transformers.models.auto.image_processing_auto import AutoImageProcessor  # 5.17: not torchvision-gated

    processor.save_pretrained(tmp_path)
    for name in ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
                 "chat_template.jinja", "tokenizer_config.json"):
        assert (tmp_path / name).is_file(), name
    for module in ("processing_vica2", "image_processing_vica2", "video_processing_vica2", "video_loading_vica2",
                   "configuration_vica2"):
        assert (tmp_path / f"{module}.py").is_file(), module
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["auto_map"]["AutoProcessor"] == "processing_vica2.Vica2Processor"
    assert config["token_layout"] == processor.token_layout
    preprocessor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert preprocessor["auto_map"]["AutoImageProcessor"] == "image_processing_vica2.Vica2ImageProcessor"
    assert preprocessor["hiera_size"] == 1024 and preprocessor["size"] == {"height": 384, "width": 384}

    loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "Vica2Processor" and loaded.token_layout == processor.token_layout
    assert (loaded.image_token_id, loaded.video_token_id) == (FIXTURE_IMAGE_TOKEN_ID, FIXTURE_VIDEO_TOKEN_ID)
    assert loaded.chat_template == processor.chat_template
    frames = samples["video"]["frames_uint8"]
    ours, theirs = processor(text="<video>", videos=frames), loaded(text="<video>", videos=frames)
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    image_processor = AutoImageProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(image_processor).__name__ == "Vica2ImageProcessor" and image_processor.hiera_size == 1024
    # The remote-media switch is unset in a saved processor (the environment decides) and can be set at load.
    assert loaded.allow_remote_media is None
    strict = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True, allow_remote_media=False)
    with pytest.raises(ValueError, match="Refusing to fetch the image"):
        strict(text="<image>", images="https://127.0.0.1:1/a.png")


def test_the_video_processor_round_trips_through_its_own_config_file(tiny, tmp_path):
    """`save_pretrained` writes the video processor's settings to `video_preprocessor_config.json`, and
    `AutoProcessor.from_pretrained` (remote code) reads them back from there, not from the image processor."""
    from transformers import AutoProcessor

    from vica2.video_processing_vica2 import Vica2VideoProcessor

    _, processor = tiny
    processor.video_processor = Vica2VideoProcessor(
        size=processor.video_processor.size, hiera_size=48, hiera_antialias=True, image_mean=(0.4, 0.5, 0.6),
        do_sample_frames=False,
    )  # fmt: skip
    try:
        processor.save_pretrained(tmp_path)
    finally:
        processor.video_processor = Vica2VideoProcessor.from_image_processor(processor.image_processor)
    saved = json.loads((tmp_path / "video_preprocessor_config.json").read_text())
    assert saved["video_processor_type"] == "Vica2VideoProcessor" and saved["hiera_size"] == 48
    assert "video_processing_vica2.py" in {path.name for path in tmp_path.iterdir()}
    loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True).video_processor
    assert type(loaded).__name__ == "Vica2VideoProcessor"
    assert json.loads(json.dumps(loaded.to_dict())) == saved
    assert (loaded.hiera_size, loaded.hiera_antialias, loaded.image_mean, loaded.do_sample_frames) == (
        48, True, (0.4, 0.5, 0.6), False)
    assert processor.image_processor.hiera_size != 48  # the image processor keeps its own settings
    frames = np.random.default_rng(0).integers(0, 256, (4, 20, 20, 3), dtype=np.uint8)
    assert loaded(frames)["hiera_pixel_values_videos"].shape == (1, 4, 3, 48, 48)
    # A folder saved before the video processor had its own file gets it from the image processor's recipe.
    (tmp_path / "video_preprocessor_config.json").unlink()
    rebuilt = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True).video_processor
    assert rebuilt.hiera_size == processor.image_processor.hiera_size and rebuilt.hiera_antialias is False
    with pytest.raises(TypeError, match="Unknown setting.*bogus"):
        Vica2VideoProcessor(bogus=1)


def test_optional_packages_are_guarded(monkeypatch):
    """Remote code: `check_imports` must pass for every file with PyAV absent (the hub checks each file)."""
    from transformers.dynamic_module_utils import check_imports

    from conftest import REPO_ROOT

    monkeypatch.setitem(sys.modules, "av", None)
    for name in ("processing_vica2.py", "image_processing_vica2.py", "video_processing_vica2.py", "video_loading_vica2.py"):
        check_imports(str(REPO_ROOT / name))


# ----------------------------------------------------------------------------------------------- bad input
def test_missing_video_and_image_files(tiny, tmp_path):
    _, processor = tiny
    with pytest.raises(FileNotFoundError, match="Video file not found: .*absent.mp4"):
        processor(text="<video>", videos=str(tmp_path / "absent.mp4"))
    with pytest.raises(FileNotFoundError, match="Image file not found: .*absent.png"):
        processor(text="<image>", images=str(tmp_path / "absent.png"))


def test_a_file_that_is_not_a_video(tiny, tmp_path):
    from vica2.video_loading_vica2 import VideoLoadError

    _, processor = tiny
    path = tmp_path / "image.mp4"
    path.write_bytes(b"\x00\x01garbage" * 500)
    with pytest.raises(VideoLoadError, match="not a video"):
        processor(text="<video>", videos=str(path))


@pytest.mark.parametrize(
    "frames, message",
    [
        (np.zeros((16, 16, 3), np.uint8), "must have 4 dimensions"),  # one frame without the frame axis
        (np.zeros((2, 16, 16, 3), np.float32), "dtype float32.*uint8"),
        (np.zeros((2, 16, 16, 2), np.uint8), "expected \\(height, width, 3\\)"),
        (np.zeros((0, 16, 16, 3), np.uint8), "no frames"),
        ([np.zeros((16, 16, 3), np.uint8), np.zeros((8, 16, 3), np.uint8)], "same size"),
        ([np.zeros((16, 16, 5), np.uint8)], "shape \\(16, 16, 5\\); expected \\(height, width, 3\\)"),
        (torch.zeros(2, 16, 16, 3), "dtype float32.*uint8"),
        ("a string that is not a file", "Video file not found"),
        (42, "Unsupported video input"),
    ],
)
def test_bad_frames_get_a_clear_error(tiny, frames, message):
    _, processor = tiny
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=message):
        processor(text="<video>", videos=frames)


def test_channels_first_and_rgba_or_gray_frames_are_converted(tiny):
    _, processor = tiny
    rgb = np.random.default_rng(3).integers(0, 256, (2, 20, 24, 3), dtype=np.uint8)
    reference = processor(videos=rgb)["pixel_values_videos"]
    rgba = np.concatenate([rgb, np.full((2, 20, 24, 1), 7, np.uint8)], axis=-1)
    assert torch.equal(processor(videos=rgba)["pixel_values_videos"], reference)
    assert torch.equal(processor(videos=torch.from_numpy(rgb).permute(0, 3, 1, 2))["pixel_values_videos"], reference)
    gray = rgb[..., :1]
    assert torch.equal(
        processor(videos=gray)["pixel_values_videos"], processor(videos=np.repeat(gray, 3, -1))["pixel_values_videos"]
    )


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA"])
def test_grayscale_and_rgba_images_are_converted_like_the_release(tiny, mode):
    _, processor = tiny
    rgb = Image.fromarray(np.random.default_rng(4).integers(0, 256, (40, 70, 3), dtype=np.uint8))
    image = rgb.convert(mode)
    out = processor(text="<image>", images=image)
    expected = processor(text="<image>", images=image.convert("RGB"))  # the release: Image.convert("RGB")
    for key in ("pixel_values", "hiera_pixel_values", "input_ids"):
        assert torch.equal(out[key], expected[key]), key


def test_gray_and_rgba_arrays_are_converted(tiny):
    _, processor = tiny
    gray = np.random.default_rng(5).integers(0, 256, (30, 50), dtype=np.uint8)
    expected = processor(images=np.repeat(gray[..., None], 3, -1))["pixel_values"]
    assert torch.equal(processor(images=gray)["pixel_values"], expected)
    rgba = np.concatenate([np.repeat(gray[..., None], 3, -1), np.zeros((30, 50, 1), np.uint8)], -1)
    assert torch.equal(processor(images=rgba)["pixel_values"], expected)
    with pytest.raises(ValueError, match="dtype float64"):
        processor(images=gray.astype(float))
    with pytest.raises(ValueError, match="shape \\(2, 30, 50, 7\\)|expected \\(height, width, 3\\)"):
        processor(images=np.zeros((30, 50, 7), np.uint8))


@pytest.mark.parametrize(
    "text, num_images, num_videos, message",
    [
        ("<video>\n<video>\nQ", 0, 1, "2 <video> placeholder\\(s\\) but 1 video"),
        ("Q", 0, 1, "0 <video> placeholder\\(s\\) but 1 video"),
        ("<image>\nQ", 0, 0, "1 <image> placeholder\\(s\\) but 0 image"),
        ("<image><image>", 1, 0, "2 <image> placeholder\\(s\\) but 1 image"),
        ("<video>" * 5, 0, 1, "5 <video> placeholder"),  # already expanded by hand
    ],
)
def test_placeholder_count_must_match_the_media(tiny, text, num_images, num_videos, message):
    _, processor = tiny
    images = [np.zeros((20, 20, 3), np.uint8)] * num_images or None
    videos = [np.zeros((2, 20, 20, 3), np.uint8)] * num_videos or None
    with pytest.raises(ValueError, match=message):
        processor(text=text, images=images, videos=videos)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hiera_frames": 0}, "hiera_frames must be a positive integer"),
        ({"siglip_pool_stride": -1}, "siglip_pool_stride must be a positive integer"),
        ({"hiera_pool_stride": 1.5}, "hiera_pool_stride must be a positive integer"),
        ({"video_frames_budget": 0}, "video_frames_budget must be a positive integer"),
        ({"video_frames_budget": 6, "hiera_frames": 4}, "must be a multiple of hiera_frames"),
        ({"num_frames": 0}, "num_frames must be a positive integer"),
        ({"hiera_frame": 2}, "Unknown argument\\(s\\) hiera_frame"),  # a typo is not silently ignored
    ],
)
def test_bad_settings_get_a_clear_error(tiny, video_file, overrides, message):
    _, processor = tiny
    with pytest.raises((ValueError, TypeError), match=message):
        processor(text="<video>", videos=str(video_file), **overrides)


def test_overrides_as_tensors_are_accepted(tiny):
    model, processor = tiny
    frames = np.zeros((4, 20, 20, 3), np.uint8)
    inputs = processor(text="<video>", videos=frames, hiera_frames=torch.tensor(2))
    assert inputs["video_token_ratio"].tolist() == [[8, 2, 2, 2]] and inputs["hiera_pixel_values_videos"].shape[1] == 1
    with torch.no_grad():
        model(**inputs)


def test_tokenizer_without_placeholders_is_refused():
    from vica2.processing_vica2 import Vica2Processor

    with pytest.raises(ValueError, match="no <image> token.*from_model_config"):
        Vica2Processor(image_processor=None, tokenizer=fixture_tokenizer())


def test_config_and_tokenizer_ids_must_agree():
    from vica2.processing_vica2 import Vica2Processor

    with pytest.raises(ValueError, match="expects 100"):
        Vica2Processor.from_model_config(tiny_config(image_token_id=100), fixture_tokenizer())



# ----------------------------------------------------------------------------------------------- pixel types, layout
def _scaled(image8: np.ndarray, dtype) -> np.ndarray:
    """uint8 pixels written in a wider integer type, spanning that type's range (65535 is white in 16 bits)."""
    return np.rint(image8 * (np.iinfo(dtype).max / 255)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.uint32, np.int32])
def test_wide_integer_pixels_are_scaled_by_their_range(tiny, dtype):
    """16/32-bit images were refused (arrays) or clipped at 255 (PIL's convert("RGB")): scale them instead."""
    _, processor = tiny
    image8 = np.random.default_rng(6).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    expected = processor(images=image8)
    out = processor(images=_scaled(image8, dtype))
    for key in ("pixel_values", "hiera_pixel_values"):
        assert torch.equal(out[key], expected[key]), key
    video8 = np.stack([image8, image8[::-1]])
    assert torch.equal(processor(videos=torch.from_numpy(_scaled(video8, dtype)))["pixel_values_videos"],
                       processor(videos=video8)["pixel_values_videos"])


def test_16_and_32_bit_pil_images_and_bool_masks_are_scaled(tiny):
    _, processor = tiny
    gray8 = np.random.default_rng(7).integers(0, 256, (24, 36), dtype=np.uint8)
    expected = processor(images=np.repeat(gray8[..., None], 3, -1))["pixel_values"]
    for wide in (_scaled(gray8, np.uint16), _scaled(gray8, np.int32)):
        image = Image.fromarray(wide)
        assert image.mode in ("I;16", "I")
        assert torch.equal(processor(images=image)["pixel_values"], expected), image.mode
    mask = gray8 > 128
    assert torch.equal(processor(images=mask)["pixel_values"],
                       processor(images=mask.astype(np.uint8) * 255)["pixel_values"])
    with pytest.raises(ValueError, match="negative values"):
        processor(images=np.full((8, 8, 3), -1, np.int16))
    with pytest.raises(ValueError, match="dtype int64.*astype\\(np.uint8\\)"):  # 0..255 in the default int type
        processor(images=torch.randint(0, 256, (8, 8, 3)))
    with pytest.raises(ValueError, match="dtype float32"):  # PIL "F": its range is the caller's convention
        processor(images=Image.fromarray(gray8.astype(np.float32)))


def test_ambiguous_channel_layout_asks_for_input_data_format(tiny):
    """A channels-first (T, 3, 4, 4) video of tiny frames was read as channels-last 3 x 4 RGBA frames."""
    from transformers.image_utils import ChannelDimension

    _, processor = tiny
    last = np.random.default_rng(8).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    first = np.ascontiguousarray(last.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match="Cannot tell where the channels .* input_data_format='channels_first'"):
        processor(videos=first)
    with pytest.raises(ValueError, match="Cannot tell where the channels"):
        processor(videos=last)
    reference = processor(videos=last, input_data_format="channels_last")["pixel_values_videos"]
    assert torch.equal(processor(videos=first, input_data_format="channels_first")["pixel_values_videos"], reference)
    assert torch.equal(processor(videos=torch.from_numpy(first),
                                 input_data_format=ChannelDimension.FIRST)["pixel_values_videos"], reference)
    with pytest.raises(ValueError, match="Cannot tell"):
        processor(images=first[0])
    assert torch.equal(processor(images=first[0], input_data_format="channels_first")["pixel_values"],
                       processor(images=Image.fromarray(last[0]))["pixel_values"])
    with pytest.raises(ValueError, match="input_data_format must be 'channels_last' or 'channels_first'"):
        processor(images=first[0], input_data_format="sideways")


@pytest.mark.parametrize(
    "images, videos",
    [
        (np.zeros((0, 10, 3), np.uint8), None),
        (Image.new("RGB", (12, 0)), None),
        (None, np.zeros((2, 0, 10, 3), np.uint8)),
    ],
)
def test_empty_pictures_are_named(tiny, images, videos):
    _, processor = tiny
    text = "<image>" if images is not None else "<video>"
    with pytest.raises(ValueError, match="is empty \\(height"):
        processor(text=text, images=images, videos=videos)


# ----------------------------------------------------------------------------------------------- decoded videos
def test_decoded_video_metadata_must_describe_its_frames(tiny):
    _, processor = tiny
    frames = np.zeros((4, 16, 16, 3), np.uint8)
    short = {"total_num_frames": 90, "fps": 30.0, "frames_indices": [0, 44, 89]}  # 3 indices for 4 frames
    with pytest.raises(ValueError, match="lists 3 frame indices \\(frames_indices\\) for 4 frames"):
        processor(text="<video>", videos=frames, video_metadata=short)
    chat = user_turn({"type": "video", "video": frames, "metadata": short}, {"type": "text", "text": "Q"})
    for tokenize in (False, True):  # the prompt alone would already say "3 frames"
        with pytest.raises(ValueError, match="lists 3 frame indices"):
            processor.apply_chat_template(chat, tokenize=tokenize)
    outside = {"total_num_frames": 10, "fps": 5.0, "frames_indices": [0, 3, 6, 12]}
    with pytest.raises(ValueError, match="outside its total_num_frames=10"):
        processor(text="<video>", videos=(frames, outside))


def test_decoded_video_with_another_num_frames_is_an_error(tiny, video_file):
    """num_frames cannot resample decoded frames; it used to be ignored with a log line."""
    _, processor = tiny
    frames = np.zeros((4, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="num_frames=3 was asked for, but this video is already decoded into 4"):
        processor(text="<video>", videos=frames, num_frames=3)
    assert processor(text="<video>", videos=frames, num_frames=4)["pixel_values_videos"].shape[1] == 4
    loaded = processor.load_video(str(video_file), num_frames=5)
    with pytest.raises(ValueError, match="num_frames=8 was asked for, but this video is already decoded into 5"):
        processor(text="<video>", videos=loaded, num_frames=8)
    for source in (frames, loaded):
        with pytest.raises(ValueError, match="num_frames=6 was asked for"):
            processor.apply_chat_template(user_turn({"type": "video", "video": source}), num_frames=6, tokenize=True)


# ----------------------------------------------------------------------------------------------- remote media
def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_image_url_answering_an_http_error_says_so(tiny, monkeypatch):
    """A 404 page is reported as the server's answer, not as PIL's "cannot identify image file"."""
    _, processor = tiny
    monkeypatch.setattr(processor, "allow_remote_media", True)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1")
    with media_server({}) as (base, requested):
        with pytest.raises(ValueError, match=f"image '{base}/gone.png': .*the server answered HTTP 404") as error:
            processor(text="<image>", images=f"{base}/gone.png")
    assert requested == ["/gone.png"] and "cannot identify" not in str(error.value)


@pytest.mark.parametrize("text", ["What is <video> here?", "<image>\nAnd this?"])
def test_a_placeholder_typed_into_a_text_part_is_refused_by_the_chat_template(tiny, video_file, text):
    """Serving engines render the template themselves (vLLM's server runs no processor for a text-only request), so
    the refusal lives in the template: transformers gets it as a ValueError, vLLM as a 400 with the same text."""
    _, processor = tiny
    for content in ([{"type": "text", "text": text}], [{"type": "video", "path": str(video_file)},
                                                       {"type": "text", "text": text}]):
        with pytest.raises(ValueError, match="contains '<video>' or '<image>', ViCA2's placeholders"):
            processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
    # The template refuses it by itself, rendered by the tokenizer as vLLM's server renders it.
    with pytest.raises(Exception, match="ViCA2's placeholders"):
        processor.tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": text}]}],
                                                chat_template=processor.chat_template, tokenize=False)
    # A prompt written whole (string content, as the evaluator builds its release prompt) is the writer's own.
    rendered = processor.apply_chat_template([{"role": "user", "content": f"<video>\n{text}"}], tokenize=False)
    assert rendered.count("<video>") == 1 + text.count("<video>")


def test_remote_media_are_fetched_by_default_and_refused_by_the_switch(tiny, monkeypatch):
    _, processor = tiny
    picture = np.random.default_rng(9).integers(0, 256, (20, 28, 3), dtype=np.uint8)
    data_url = "data:image/png;base64," + base64.b64encode(_png_bytes(picture)).decode()
    expected = processor(text="<image>", images=picture)["pixel_values"]
    with media_server({"/a.png": _png_bytes(picture), "/clip.mp4": b"\x00" * 64}) as (base, requested):
        # Default (transformers' behaviour): URLs are fetched.
        monkeypatch.delenv("VICA2_ALLOW_REMOTE_MEDIA", raising=False)
        assert torch.equal(processor(text="<image>", images=f"{base}/a.png")["pixel_values"], expected)
        assert torch.equal(processor(text="<image>", images=data_url)["pixel_values"], expected)
        assert requested == ["/a.png"]
        question = {"type": "text", "text": "Q"}
        chats = [
            user_turn({"type": "image", "url": f"{base}/a.png"}, question),
            user_turn({"type": "image_url", "image_url": {"url": f"{base}/a.png"}}, question),
            user_turn({"type": "video", "url": f"{base}/clip.mp4"}, question),
            user_turn({"type": "video", "path": "rtsp://127.0.0.1:1/stream"}, question),
        ]
        # The switch, as an attribute and as the environment variable: refused before anything is fetched.
        for switch in ("attribute", "environment"):
            if switch == "attribute":
                monkeypatch.setattr(processor, "allow_remote_media", False)
            else:
                monkeypatch.setattr(processor, "allow_remote_media", None)
                monkeypatch.setenv("VICA2_ALLOW_REMOTE_MEDIA", "0")
            for kwargs in (dict(text="<image>", images=f"{base}/a.png"), dict(text="<image>", images=data_url),
                           dict(text="<video>", videos=f"{base}/clip.mp4"),
                           dict(text="<video>", videos="ftp://127.0.0.1/clip.mp4")):
                with pytest.raises(ValueError, match="Refusing to fetch the (image|video) '(http|data|ftp)"):
                    processor(**kwargs)
            for chat in chats:
                for tokenize in (False, True):
                    with pytest.raises(ValueError, match="Refusing to fetch"):
                        processor.apply_chat_template(chat, tokenize=tokenize)
            with pytest.raises(ValueError, match="Refusing to fetch"):
                processor.load_video(f"{base}/clip.mp4")
            assert torch.equal(processor(text="<image>", images=picture)["pixel_values"], expected)  # local: fine
        assert requested == ["/a.png"]
        monkeypatch.setenv("VICA2_ALLOW_REMOTE_MEDIA", "maybe")
        with pytest.raises(ValueError, match="VICA2_ALLOW_REMOTE_MEDIA='maybe'"):
            processor(text="<image>", images=f"{base}/a.png")


def _ts_segment(path) -> bytes:
    """A real 10-frame MPEG-TS segment, as an HLS playlist names them."""
    import av

    with av.open(str(path), "w", format="mpegts") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 20 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path.read_bytes()


def test_a_local_playlist_naming_remote_segments_fetches_nothing_with_remote_media_off(tiny, tmp_path, monkeypatch):
    """A local file can make FFmpeg fetch (an HLS playlist's http segments). A playlist is refused unless the caller
    asks for it (`allow_playlists=True`); even then, with remote media off no protocol but local files reaches
    FFmpeg, for every read the processor makes: the call, load_video, and the chat template's probe."""
    _, processor = tiny
    segment = _ts_segment(tmp_path / "seg.ts")
    monkeypatch.setattr(processor, "allow_remote_media", False)
    with media_server({"/seg.ts": segment}) as (base, requested):
        playlist = tmp_path / "list.m3u8"
        playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{base}/seg.ts\n#EXT-X-ENDLIST\n")
        reads = [lambda source, **kw: processor(text="<video>", videos=source, num_frames=2, **kw),
                 lambda source, **kw: processor.load_video(source, num_frames=2, **kw),
                 lambda source, **kw: processor.apply_chat_template(
                     user_turn({"type": "video", "video": source}, {"type": "text", "text": "Q"}), tokenize=False, **kw)]
        for read in reads:
            for source in (str(playlist), playlist.open("rb")):
                with pytest.raises(ValueError, match="is a playlist.*allow_playlists=True"):
                    read(source)
            for source in (str(playlist), playlist.open("rb")):
                with pytest.raises(ValueError, match="With remote media off, a file that refers to remote parts"):
                    read(source, allow_playlists=True)
        assert requested == []
        monkeypatch.setattr(processor, "allow_remote_media", True)  # remote media on: still refused unless asked for
        with pytest.raises(ValueError, match="is a playlist"):
            processor(text="<video>", videos=playlist.open("rb"), num_frames=2)
        assert requested == []
        inputs = processor(text="<video>", videos=playlist.open("rb"), num_frames=2, allow_playlists=True)
        assert inputs["pixel_values_videos"].shape[1] == 2
        assert requested and set(requested) == {"/seg.ts"}  # (once per pass that opens the file)


def test_a_video_above_the_pixel_limit_is_refused_wherever_it_is_read(tiny, video_file, tmp_path):
    """The video processor's `max_video_pixels` (a setting, saved with it, and a call argument) bounds declared size
    x frames sampled before decoding, for the call, load_video and the chat template (read or probed)."""
    from vica2.video_processing_vica2 import Vica2VideoProcessor

    _, processor = tiny
    limit = 48 * 32 * 4  # the clip is 48 x 32: four frames fit
    message = r"48x32 frames.*limit of 6,144 \(max_video_pixels"
    chat = user_turn({"type": "video", "path": str(video_file)}, {"type": "text", "text": "Q"})
    reads = [lambda **kw: processor(text="<video>", videos=str(video_file), num_frames=5, **kw),
             lambda **kw: processor.load_video(str(video_file), num_frames=5, **kw),
             lambda **kw: processor.apply_chat_template(chat, num_frames=5, tokenize=True, **kw),
             lambda **kw: processor.apply_chat_template(chat, num_frames=5, tokenize=False, **kw)]
    for read in reads:
        with pytest.raises(ValueError, match=message):
            read(max_video_pixels=limit)
    assert processor(text="<video>", videos=str(video_file), num_frames=4, max_video_pixels=limit)["pixel_values_videos"].shape[1] == 4
    setting = Vica2VideoProcessor(max_video_pixels=limit)
    with pytest.raises(ValueError, match=message):
        setting(str(video_file), num_frames=5)
    setting.save_pretrained(tmp_path)
    assert Vica2VideoProcessor.from_pretrained(tmp_path).max_video_pixels == limit
    assert Vica2VideoProcessor().max_video_pixels == 64 * 3840 * 2160


def test_a_decompression_bomb_image_is_a_clear_error(tiny, tmp_path, monkeypatch):
    _, processor = tiny
    path = tmp_path / "huge.png"
    Image.new("RGB", (40, 40)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses above twice its limit
    with pytest.raises(ValueError, match=r"image '.*huge.png' is too large.*1600 pixels.*Image.MAX_IMAGE_PIXELS = 100"):
        processor(text="<image>", images=str(path))


def test_an_image_url_that_fails_is_named(tiny):
    _, processor = tiny
    with media_server({"/page.html": b"<html>not an image</html>"}) as (base, requested):
        for path in ("/missing.png", "/page.html"):
            with pytest.raises(ValueError, match=f"Could not read the image '{base}{path}'.*Check the URL"):
                processor(text="<image>", images=base + path)
        assert requested == ["/missing.png", "/page.html"]
    with pytest.raises(ValueError, match=f"Could not read the image '{base}/a.png': Connect"):  # server gone
        processor(text="<image>", images=f"{base}/a.png")
