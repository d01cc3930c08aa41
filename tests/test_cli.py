"""The main job: `vica2 ask` / `vica2 demo`, the hub pipeline, and generate after apply_chat_template."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import HOSTILE_DAMAGES, damaged_model_copy, media_server
from vica2.convert_checkpoint import convert_checkpoint, hub_key_to_release, release_key_to_hub
from vica2.tools import tiny_model
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
    assert "(SigLIP 840, Hiera 544), generated 3\n" in result.stderr  # one question: nothing "read from the cache"
    assert "cache" not in result.stderr and "time to first token" in result.stderr
    assert not result.stdout.startswith("Q: ")  # one question: a bare answer, as scripts read it


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


def test_demo_answers_a_held_out_clip_right_and_its_printed_command_does_too(tmp_path):
    sample = tiny_model.demo_samples()[0]
    result = _run("demo", "--workdir", tmp_path, "--max-new-tokens", "8", env={"TRANSFORMERS_VERBOSITY": "warning"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"The model is {tiny_model.TOY_NOTICE}" in result.stdout  # says plainly that it is a toy
    for step in ("1. the trained tiny ViCA2, with its remote code", "2. a held-out clip it never saw in training",
                 f"3. asking: {sample['question']}", f"(the right answer is {sample['answer']!r}: right)"):
        assert step in result.stdout
    assert (tmp_path / "hub" / "modeling_vica2.py").is_file()  # a folder vLLM's Transformers backend loads as is
    command = result.stdout.split("Run it yourself: ")[1].strip()  # the files and the prompt the demo used
    assert command == (f"vica2 ask --model {tmp_path / 'hub'} --video {tmp_path / 'clip.mp4'} --max-new-tokens 8 "
                       f"--question {shlex.quote(sample['prompt'])} --verbose")
    again = _run(*shlex.split(command)[1:])
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.strip() == sample["answer"]


def test_demo_removes_the_temporary_folder_it_made(tmp_path):
    result = _run("demo", "--max-new-tokens", "1", env={"TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "vica2 demo --workdir DIR keeps the files, then: vica2 ask --model DIR/hub --video DIR/clip.mp4" in (
        result.stdout)
    assert not list(tmp_path.glob("vica2-demo-*"))  # (torch may leave its own caches there)


@pytest.mark.parametrize("stream", [False, True])
def test_several_questions_are_labelled_and_share_one_prefix(converted, stream):
    result = _run("ask", "--model", converted["hub"], "--video", converted["video"], "--question", "How many?",
                  "--question", "Where is the ball?", "--frames", "4", "--max-new-tokens", "2", "--verbose",
                  *(["--stream"] if stream else []))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and lines[0] == "Q: How many?" and lines[2] == "Q: Where is the ball?"
    assert lines[1].startswith("A: ") and lines[3].startswith("A: ")
    assert result.stderr.count("[tokens] prompt") == 2
    assert result.stderr.count("prompt tokens shared with the other questions (encoded once)") == 2
    assert "[reuse] 2 questions from one encoded prefix: the towers ran once, 1 prefill saved" in result.stderr


def test_chat_through_a_pipe(converted):
    stdin = "How many chairs?\nAnd tables?\n/reset\nHow many chairs?\n/video missing.mp4\n/bogus\n/quit\nnever\n"
    result = _run("chat", "--model", converted["hub"], "--video", converted["video"], "--frames", "4",
                  "--max-new-tokens", "3", "--verbose", stdin=stdin, cwd=converted["root"])
    assert result.returncode == 0, result.stderr[-2000:]
    sessions = [line for line in result.stderr.splitlines() if line.startswith("[session]")]
    assert len(sessions) == 3 and all("towers ran 1x" in line for line in sessions)  # encoded once, /reset kept it
    assert "; 1 turn," in sessions[0] and "; 3 turns," in sessions[-1]
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


def test_debug_works_after_the_command_keeps_exit_code_2_and_convert_help_names_itself(tmp_path):
    for args in (("--debug", "ask"), ("ask", "--debug")):
        result = _run(*args, "--model", tmp_path / "nowhere", "--video", tmp_path / "v.mp4", "--question", "?")
        assert result.returncode == 2 and "Traceback" in result.stderr and "UsageError" in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("vica2 ask: error: --video")
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

    front_ends = {"vica2.tools.cli", "vica2.tools.evaluate_vsibench", "vica2.tools.finetune", "vica2.tools.serve",
                  "vica2.app"}
    for path in [*sorted((root / "tools").glob("*.py")), root / "app.py"]:
        module = "vica2.app" if path.name == "app.py" else f"vica2.tools.{path.stem}"
        assert not (front_ends - {module}) & imported(path), path


# ---------------------------------------------------------------------------------------------------- the command line
def test_every_option_and_subcommand_has_help():
    import argparse

    from vica2.tools.cli import build_parser

    def walk(parser, name):
        assert parser.description or name == "vica2", f"{name} has no description"
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {choice.dest: choice.help for choice in action._choices_actions}
                for command, subparser in action.choices.items():
                    assert helps.get(command), f"{name} {command} has no help"
                    if subparser.add_help:  # convert, eval-vsibench, app: their own parsers give their help
                        yield from walk(subparser, f"{name} {command}")
            elif action.help != argparse.SUPPRESS:
                yield name, action

    actions = list(walk(build_parser(), "vica2"))
    assert len(actions) > 40
    for name, action in actions:
        assert action.help and action.help.strip(), f"{name} {action.option_strings} has no help"
    frames = [action for name, action in actions if name == "vica2 ask" and "--frames" in action.option_strings]
    assert "the model's frame budget, 64 for ViCA2-7B" in frames[0].help


def test_eval_vsibench_help_lists_the_question_types():
    from vica2.tools.evaluate_vsibench import QUESTION_TYPES, REL_DIRECTION_TASK, parse_question_types
    from vica2.tools.inference import UsageError

    result = _run("eval-vsibench", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for name in (*QUESTION_TYPES, REL_DIRECTION_TASK):
        assert name in text
    with pytest.raises(UsageError) as refused:
        parse_question_types("object_counting,object_colour")
    assert "unknown type 'object_colour'; known: " + ", ".join(QUESTION_TYPES) in str(refused.value)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` (a few bytes: what a decompression bomb looks like to a reader)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def test_options_and_media_are_checked_in_the_commands_terms_before_the_model_loads(converted, tmp_path):
    """A bad option is reported even when the model could not load at all (this folder does not exist)."""
    video, image = converted["video"], converted["image"]
    jpg = tmp_path / "photo.jpg"
    Image.open(image).save(jpg)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(30000, 30000))
    nowhere = tmp_path / "no-model"
    cases = [
        (("--video", video, "--frames", "0"), "argument --frames: 0 is not allowed"),
        (("--video", video, "--max-new-tokens", "-3"), "argument --max-new-tokens: -3 is not allowed"),
        (("--video", video, "--hiera-pool-stride", "two"), "argument --hiera-pool-stride: 'two' is not a whole"),
        (("--video", jpg), f"--video '{jpg}' is an image: use --image {jpg}"),
        (("--video", image), "is an image: use --image"),  # a PNG as a video
        (("--image", video), f"--image '{video}' is a video: use --video {video}"),
        (("--image", bomb), "too many pixels to decode"),
        (("--image", "http://127.0.0.1:9/room.png"), "is a URL; add --allow-remote-media to fetch it"),
        (("--video", video, "--max-question-chars", "10"), "--question: 14 characters, over the limit of 10"),
    ]
    for args, message in cases:
        line = _one_error_line(_run("ask", "--model", nowhere, *args, "--question", "How many rooms"))
        assert message in line, (args, line)
    line = _one_error_line(_run("ask", "--model", converted["hub"], "--image", bomb, "--question", "?"))
    assert "bomb.png" in line and "too many pixels" in line


def test_an_image_url_answering_404_says_so(converted):
    with media_server({}) as (base, requested):  # serves nothing: every path is a 404
        url = f"{base}/room.png"
        no_proxy = {"NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
        line = _one_error_line(_run("ask", "--model", converted["hub"], "--image", url, "--question", "?",
                                    "--allow-remote-media", env=no_proxy))
    assert requested == ["/room.png"]
    assert f"--image '{url}': the server answered HTTP 404" in line and "cannot identify" not in line


@pytest.mark.parametrize("damage", HOSTILE_DAMAGES)
def test_a_hostile_model_folder_is_one_line(converted, tmp_path, damage):
    folder = damaged_model_copy(converted["hub"], tmp_path / "model", damage)
    line = _one_error_line(_run("ask", "--model", folder, "--video", converted["video"], "--question", "?",
                                "--frames", "2", "--max-new-tokens", "1"))
    expected = {"truncated weights": "SafetensorError", "mismatched sizes": "a tensor's shape does not fit config.json",
                "deep config": "config.json is nested too deeply"}[damage]
    assert f"--model '{folder}'" in line and expected in line


def test_chat_survives_bad_lines_and_a_closed_stdin(converted):
    stdin = b"\xff\xfe not text\n" + b"x" * 50_000 + b"\n" + b"y" * 120 + b"\nHow many chairs?\n"
    result = subprocess.run([*VICA2, "chat", "--model", str(converted["hub"]), "--video", str(converted["video"]),
                             "--frames", "2", "--max-new-tokens", "2", "--max-question-chars", "100", "--verbose"],
                            input=stdin, capture_output=True, timeout=600,
                            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"})
    stderr = result.stderr.decode()
    assert result.returncode == 0 and "Traceback" not in stderr, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("vica2 chat: error:")]
    assert len(errors) == 3, stderr
    assert "not UTF-8" in errors[0] and "--max-question-chars 100" in errors[1]
    assert "120 characters, longer than --max-question-chars 100" in errors[2]
    assert stderr.count("[tokens] prompt") == 1 and "; 1 turn," in stderr  # the good question after them was asked
    closed = subprocess.run(["bash", "-c", 'exec "$@" <&-', "bash", *VICA2, "chat", "--model", "nobody/none"],
                            capture_output=True, text=True, timeout=600)
    assert _one_error_line(closed, "chat").endswith("standard input is closed: pipe the questions in, or run vica2 "
                                                    "chat in a terminal.")


def test_chat_stops_cleanly_when_its_output_is_closed(converted):
    process = subprocess.Popen([*VICA2, "chat", "--model", str(converted["hub"]), "--video", str(converted["video"]),
                                "--frames", "2", "--max-new-tokens", "40", "--verbose"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"})
    process.stdout.close()  # the reader is gone before the first answer
    _, stderr = process.communicate(b"How many chairs?\nAnd tables?\n" * 3, timeout=600)
    stderr = stderr.decode()
    assert process.returncode == 0 and "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "vica2 chat: the output was closed; stopped."
    assert "[tokens] prompt" not in stderr  # no answer was finished for nobody: it stopped at the first write


def test_demo_never_writes_over_the_users_files(tmp_path):
    from vica2.tools.cli import DEMO_MARKER, demo_workdir

    (tmp_path / "room.mp4").write_bytes(b"my holiday video")
    result = _run("demo", "--workdir", tmp_path, "--frames", "2", "--max-new-tokens", "1")
    line = _one_error_line(result, "demo")
    assert "already holds files that are not the demo's" in line
    assert (tmp_path / "room.mp4").read_bytes() == b"my holiday video" and sorted(tmp_path.iterdir()) == [
        tmp_path / "room.mp4"]
    assert "is a file" in _one_error_line(_run("demo", "--workdir", tmp_path / "room.mp4"), "demo")
    own = demo_workdir(str(tmp_path / "new" / "demo"))  # a folder it makes is marked as the demo's ...
    assert (own / DEMO_MARKER).is_file()
    (own / "room.mp4").write_bytes(b"the demo's video")
    assert demo_workdir(str(own)) == own  # ... and may be written again
