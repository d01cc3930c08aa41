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
from vica2.tools.demo import build_demo_release, write_demo_video


pytest.importorskip("av")

VICA2 = [sys.executable, "-m", "vica2.tools.cli"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny random release, converted by the real converter, plus a generated video and an image."""
    root = tmp_path_factory.mktemp("cli")
    convert_checkpoint(build_demo_release(root / "release"), root / "hub", progress=False)
    video = write_demo_video(root / "room.mp4", num_frames=24, fps=12)
    image = root / "room.png"
    Image.fromarray((np.random.default_rng(0).random((120, 200, 3)) * 255).astype("uint8")).save(image)
    return {"hub": root / "hub", "video": video, "image": image, "root": root}


def _run(*args, cwd=None, stdin=None, env=None):
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([*VICA2, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=600,
                          input=stdin)


def _one_error_line(result, command="ask"):
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"vica2 {command}: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


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
    result = _run("demo", "--workdir", tmp_path, "--frames", "4", "--max-new-tokens", "2",
                  env={"TRANSFORMERS_VERBOSITY": "warning"})
    assert result.returncode == 0, result.stderr[-2000:]
    for step in ("1. wrote a tiny random ViCA2", "2. converted it", "3. generated", "4. asking", "answer:"):
        assert step in result.stdout
    assert json.loads((tmp_path / "hub" / "config.json").read_text())["model_type"] == "vica2"
    assert "(SigLIP 840, Hiera 544)" in result.stderr
    assert result.stderr.count("Loading weights: 100%") <= 1  # the converter's verification load shows none
    command = result.stdout.split("Run it yourself: ")[1].strip()  # the frames and files the demo used
    assert command == (f"vica2 ask --model {tmp_path / 'hub'} --video {tmp_path / 'room.mp4'} --frames 4 "
                       "--max-new-tokens 2 --question \"How many chairs are in the room?\" --verbose")


def test_demo_removes_the_temporary_folder_it_made(tmp_path):
    result = _run("demo", "--frames", "2", "--max-new-tokens", "1", env={"TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--workdir DIR --frames 2 keeps the files" in result.stdout
    assert not list(tmp_path.glob("vica2-demo-*"))  # (torch may leave its own caches there)


def test_ask_several_questions_from_one_prefix(converted):
    result = _run("ask", "--model", converted["hub"], "--video", converted["video"], "--question", "How many?",
                  "--question", "Where is the ball?", "--frames", "4", "--max-new-tokens", "2", "--verbose")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("[tokens] prompt") == 2
    assert "[reuse] 2 questions from one encoded prefix: the towers ran once, 1 prefills saved" in result.stderr


def test_chat_through_a_pipe(converted):
    stdin = "How many chairs?\nAnd tables?\n/reset\nHow many chairs?\n/video missing.mp4\n/bogus\n/quit\nnever\n"
    result = _run("chat", "--model", converted["hub"], "--video", converted["video"], "--frames", "4",
                  "--max-new-tokens", "3", "--verbose", stdin=stdin, cwd=converted["root"])
    assert result.returncode == 0, result.stderr[-2000:]
    sessions = [line for line in result.stderr.splitlines() if line.startswith("[session]")]
    assert len(sessions) == 3 and all("towers ran 1x" in line for line in sessions)  # encoded once, /reset kept it
    assert "3 turns" in sessions[-1]
    assert "conversation reset" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("vica2 chat: error:")]
    assert len(errors) == 2 and "missing.mp4" in errors[0] and "/bogus" in errors[1]
    answers = result.stdout.split("conversation reset")
    first, again = answers[0].splitlines()[1], answers[1].splitlines()[1]
    assert first == again  # the same question about the same video after /reset: the same greedy answer
    assert result.stderr.count("[tokens] prompt") == 3  # "never" after /quit was not asked


def test_model_folder_code_runs_only_when_asked(converted, tmp_path):
    import shutil

    folder = tmp_path / "tampered"
    shutil.copytree(converted["hub"], folder)
    marker = tmp_path / "ran.txt"
    with open(folder / "modeling_vica2.py", "a") as handle:
        handle.write(f"\nopen({str(marker)!r}, 'w').write('folder code ran')\n")
    args = ("ask", "--model", folder, "--video", converted["video"], "--question", "Why?", "--frames", "2",
            "--max-new-tokens", "1")
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = _run(*args, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not marker.exists()
    result = _run(*args, "--trust-remote-code", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert marker.read_text() == "folder code ran"


def test_bad_device_model_and_release_folder_are_one_line_errors(converted, tmp_path):
    video = converted["video"]
    ask = ("ask", "--video", video, "--question", "Why?")
    line = _one_error_line(_run(*ask, "--model", converted["hub"], "--device", "banana"))
    assert "--device 'banana': unknown device" in line
    if not torch.cuda.is_available():
        line = _one_error_line(_run(*ask, "--model", converted["hub"], "--device", "cuda"))
        assert "--device 'cuda'" in line and "--device cpu" in line
    for missing in (tmp_path / "nowhere", "./models/vica2", "~/nope"):
        line = _one_error_line(_run(*ask, "--model", missing))
        assert "no such folder" in line
    line = _one_error_line(_run(*ask, "--model", converted["root"] / "release"))
    assert "research-release checkpoint" in line and "vica2 convert --input-dir" in line
    # the missing video is reported before any model is looked for (this repo id does not exist offline)
    line = _one_error_line(_run("ask", "--model", "nobody/no-such-model", "--video", tmp_path / "gone.mp4",
                                "--question", "Why?"))
    assert "gone.mp4" in line and "no such file" in line


def test_debug_works_after_the_command_and_convert_help_names_itself(tmp_path):
    for args in (("--debug", "ask"), ("ask", "--debug")):
        result = _run(*args, "--model", tmp_path / "nowhere", "--video", tmp_path / "v.mp4", "--question", "?")
        assert result.returncode != 2 and "Traceback" in result.stderr and "UsageError" in result.stderr
    result = _run("convert", "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: vica2 convert")


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


def test_layout_hub_files_at_the_root_tools_apart_and_front_ends_import_only_the_library():
    """The remote code never reaches into vica2.tools; library modules never import a front-end; front-ends never
    import each other (the `vica2` command names the commands it delegates to, and imports one when it is chosen)."""
    import ast

    from transformers.dynamic_module_utils import get_imports

    root = Path(__file__).resolve().parents[1]
    hub_files = sorted(path.name for path in root.glob("*.py"))
    assert hub_files == ["app.py", "configuration_vica2.py", "convert_checkpoint.py", "image_processing_vica2.py",
                         "kernels_vica2.py", "modeling_vica2.py", "processing_vica2.py", "video_loading_vica2.py",
                         "video_processing_vica2.py"]
    for name in hub_files:
        if name.endswith("_vica2.py"):
            assert not {"tools", "vica2"} & set(get_imports(root / name)), name

    def imported(path):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names.add("." * node.level + (node.module or ""))
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        return names

    front_ends = {"vica2.tools.cli", "vica2.tools.evaluate_vsibench", "vica2.tools.finetune", "vica2.app"}
    for path in [*sorted((root / "tools").glob("*.py")), root / "app.py"]:
        module = "vica2.app" if path.name == "app.py" else f"vica2.tools.{path.stem}"
        assert not (front_ends - {module}) & imported(path), path
