"""Beyond one engine on vLLM's CPU build: tensor parallel (offline engine) and data parallel (`vica2 serve`), each
answering token for token as transformers.

Opt-in (VICA2_VLLM_PARALLEL=1; about 4 minutes on 2 cores, so `make test-vllm` leaves them out): each starts two
workers, bound to one core each (VLLM_CPU_OMP_THREADS_BIND="0|1": the CPU build binds a rank per NUMA node and
refuses two ranks on a one-node machine otherwise).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import engine_kwargs


pytestmark = pytest.mark.skipif(os.environ.get("VICA2_VLLM_PARALLEL") != "1" or (os.cpu_count() or 1) < 2,
                                reason="two-worker vLLM runs are opt-in: VICA2_VLLM_PARALLEL=1 (2+ cores)")
MAX_TOKENS = 8


@pytest.fixture(autouse=True)
def one_core_per_worker(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def _chats(media):
    long, image = Path(media["long"]), Path(media["image"])
    return [
        [{"type": "text", "text": "Describe a room."}],
        [{"type": "image", "path": str(image)}, {"type": "text", "text": "What is it?"}],
        [{"type": "video", "path": str(long)}, {"type": "text", "text": "What happens?"}],
    ]


def _expected(reference, media) -> list[dict]:
    """transformers' prompt ids (`apply_chat_template(..., tokenize=True)`: the video's time instruction included)
    and greedy answer ids."""
    return reference.run([{"messages": [{"role": "user", "content": chat}], "max_new_tokens": MAX_TOKENS,
                           **({"num_frames": 8} if chat[0]["type"] == "video" else {})} for chat in _chats(media)])


def _openai_content(chat) -> list[dict]:
    """The chat as a vLLM user sends it: the image / video as a file URL the engine loads (8 frames for a video)."""
    item = chat[0]
    if item["type"] == "text":
        return chat
    return [{"type": f"{item['type']}_url", f"{item['type']}_url": {"url": f"file://{item['path']}"}}, *chat[1:]]


def test_tensor_parallel_2_answers_as_transformers(hub_folder, media, reference):
    from vllm import LLM, SamplingParams

    llm = LLM(**engine_kwargs(hub_folder, tensor_parallel_size=2, allowed_local_media_path=str(Path(media["long"]).parent),
                              media_io_kwargs={"video": {"num_frames": 8}}))
    try:
        outputs = llm.chat([[{"role": "user", "content": _openai_content(chat)}] for chat in _chats(media)],
                           SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False,
                           chat_template_kwargs={"engine_expands_videos": True})
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    got = [{"prompt_ids": list(output.prompt_token_ids), "tokens": list(output.outputs[0].token_ids)} for output in outputs]
    assert got == _expected(reference, media)


def test_data_parallel_2_server_answers_as_transformers(hub_folder, media, reference):
    import openai

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "vica2.tools.cli", "serve", str(hub_folder), "--trust-remote-code",
               "--data-parallel-size", "2", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--enforce-eager", "--max-num-seqs", "4", "--allowed-local-media-path", str(Path(media["long"]).parent)]
    log_path = Path(hub_folder).parent / "server-dp2.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert process.poll() is None, log_path.read_text()[-4000:]
            try:
                model = client.models.list().data[0].id
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, log_path.read_text()[-4000:]
                time.sleep(2)
        got = []
        for chat in _chats(media):
            response = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": _openai_content(chat)}], temperature=0.0,
                max_tokens=MAX_TOKENS, extra_body={"return_token_ids": True})
            got.append({"prompt_ids": response.model_extra["prompt_token_ids"],
                        "tokens": response.choices[0].model_extra["token_ids"]})
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert got == _expected(reference, media)
