"""The main job: `vica2 ask` / `vica2 demo`, the hub pipeline, and generate after apply_chat_template."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vica2.convert_checkpoint import convert_checkpoint, hub_key_to_release, release_key_to_hub
from vica2.demo import build_demo_release, write_demo_video


pytest.importorskip("av")

VICA2 = [sys.executable, "-m", "vica2.cli"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny random release, converted by the real converter, plus a generated video and an image."""
    root = tmp_path_factory.mktemp("cli")
    convert_checkpoint(build_demo_release(root / "release"), root / "hub", progress=False)
    video = write_demo_video(root / "room.mp4", num_frames=24, fps=12)
    image = root / "room.png"
    Image.fromarray((np.random.default_rng(0).random((120, 200, 3)) * 255).astype("uint8")).save(image)
    return {"hub": root / "hub", "video": video, "image": image, "root": root}


def _run(*args, cwd=None):
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*VICA2, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_ask_about_a_video_prints_answer_tokens_and_timings(converted):
    result = _run("ask", "--model", converted["hub"], "--video", converted["video"], "--question",
                  "How many chairs are in the room?", "--frames", "4", "--max-new-tokens", "3", "--verbose")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("\n") >= 1  # the answer line (random weights: any text)
    # 4 frames: SigLIP 4 x 14 x 15 = 840, Hiera every 2nd frame: 2 x 16 x 17 = 544 (the demo towers are real-size).
    assert "(SigLIP 840, Hiera 544), generated 3" in result.stderr
    assert "time to first token" in result.stderr


def test_ask_with_token_ratio_overrides_and_stream(converted):
    result = _run("ask", "--model", converted["hub"], "--video", converted["video"], "--question", "Where?",
                  "--frames", "4", "--hiera-frames", "64", "--hiera-pool-stride", "1", "--max-new-tokens", "2",
                  "--stream", "--verbose", "--no-time-instruction")
    assert result.returncode == 0, result.stderr[-2000:]
    # k = 64 / 64 = 1: Hiera sees all 4 frames, un-pooled 32 x 33.
    assert "(SigLIP 840, Hiera 4224)" in result.stderr


def test_ask_about_an_image(converted):
    result = _run("ask", "--model", converted["hub"], "--image", converted["image"], "--question", "What is it?",
                  "--max-new-tokens", "2", "--verbose")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Hiera 1056)" in result.stderr  # a single image: un-pooled 32 x 33


@pytest.mark.parametrize("kind", ["missing", "corrupt"])
def test_bad_video_is_a_one_line_error_with_exit_code_2(converted, kind):
    video = converted["root"] / f"{kind}.mp4"
    if kind == "corrupt":
        video.write_bytes(converted["video"].read_bytes()[:2000])
    result = _run("ask", "--model", converted["hub"], "--video", video, "--question", "Why?")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("vica2 ask: error:")]
    assert len(lines) == 1 and str(video.name) in lines[0]


def test_demo_runs_the_whole_path_offline(tmp_path):
    result = _run("demo", "--workdir", tmp_path, "--frames", "4", "--max-new-tokens", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    for step in ("1. wrote a tiny random ViCA2", "2. converted it", "3. generated", "4. asking", "answer:"):
        assert step in result.stdout
    assert json.loads((tmp_path / "hub" / "config.json").read_text())["model_type"] == "vica2"
    assert "(SigLIP 840, Hiera 544)" in result.stderr


def test_pipeline_answers_image_and_video_chats(converted):
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=str(converted["hub"]), trust_remote_code=True)
    for item in ({"type": "image", "path": str(converted["image"])}, {"type": "video", "path": str(converted["video"])}):
        messages = [{"role": "user", "content": [item, {"type": "text", "text": "Describe the room."}]}]
        output = pipe(text=messages, max_new_tokens=3, processor_kwargs={"num_frames": 4})
        reply = output[0]["generated_text"][-1]
        assert reply["role"] == "assistant" and isinstance(reply["content"], str)


def test_generate_after_apply_chat_template_equals_processor_call(converted):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(converted["hub"], trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(converted["hub"], trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "video", "path": str(converted["video"])},
                                             {"type": "text", "text": "Is the ball moving?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", num_frames=4, add_time_instruction=False)
    direct = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True,
                                                          add_time_instruction=False),
                       videos=[str(converted["video"])], num_frames=4, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], direct["input_ids"])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        again = model.generate(**direct, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.tolist() == again.tolist() and out.shape[1] == inputs["input_ids"].shape[1] + 4


def test_demo_release_round_trips_through_the_key_mapping(tmp_path):
    from safetensors import safe_open

    folder = build_demo_release(tmp_path / "release")
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    mapped = [release_key_to_hub(key, 2) for key in keys]
    assert sum(m is None for m in mapped) == 2  # the release's stored, unused SigLIP post-layernorm
    assert all(hub_key_to_release(m) == key for key, m in zip(keys, mapped) if m is not None)


def test_hub_key_to_release_inverts_every_7b_key():
    from conftest import FIXTURE_7B_KEYS

    if not Path(FIXTURE_7B_KEYS).is_file():
        pytest.skip("7B key listing not available")
    for tensor in json.loads(Path(FIXTURE_7B_KEYS).read_text())["tensors"]:
        mapped = release_key_to_hub(tensor["name"], 26)
        assert mapped is None or hub_key_to_release(mapped) == tensor["name"]
