"""`vica2 serve` (vLLM's OpenAI server, set up for ViCA2) on a ViCA2 folder, started by the test on 127.0.0.1, asked
with the `openai` client.

One server for the module; every answer is compared with transformers' greedy answer to the same conversation.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import GENERATABLE


openai = pytest.importorskip("openai")

MAX_TOKENS = 10
START_TIMEOUT_S = 600  # an engine start takes about a minute on 2 CPU cores; more while other work shares them


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(hub_folder, media):
    port = _free_port()
    # `vica2 serve`: vLLM's server with the settings it derives from the folder's config (context and batched-token
    # budget, one video / image per prompt, 8 decoded frames = this tiny model's frame budget, the generatable-
    # vocabulary limit, remote media off); the rest are vLLM flags passed through.
    command = [
        sys.executable, "-m", "vica2.tools.cli", "serve", str(hub_folder), "--trust-remote-code",
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
        "--max-num-seqs", "4", "--block-size", "32",
        "--allowed-local-media-path", str(Path(media["long"]).parent),
        "--trust-request-mm-kwargs",  # per-request mm_processor_kwargs (token-ratio overrides, num_frames)
    ]
    log_path = Path(hub_folder).parent / "server.log"
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"vica2 serve exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    pytest.fail(f"vica2 serve did not start in {START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
                time.sleep(2)
        client.printed_command = log_path.read_text().splitlines()[0]  # what vica2 serve printed before vLLM ran
        client.model_folder = hub_folder
        yield client
    finally:
        process.terminate()  # vica2 serve became the vLLM server (exec): the signal reaches it
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _ask(client, content, stream: bool = False, **extra):
    response = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": content}],
        temperature=0.0,
        max_tokens=MAX_TOKENS,
        stream=stream,
        extra_body=extra,  # no allowed_token_ids: the server applies the generatable-vocabulary limit itself
    )
    if stream:
        return "".join(chunk.choices[0].delta.content or "" for chunk in response if chunk.choices)
    return response.choices[0].message.content


def _expected_text(reference, hub_folder, conversations) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hub_folder)
    requests = [{"messages": [{"role": "user", "content": content}], "max_new_tokens": MAX_TOKENS,
                 "add_time_instruction": False, **kwargs} for content, kwargs in conversations]
    return [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in reference.generate(requests)]


def _data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def test_video_image_and_streamed_chats_answer_as_transformers(server, reference, hub_folder, media):
    long, image = Path(media["long"]), Path(media["image"])
    video_chat = [{"type": "video_url", "video_url": {"url": f"file://{long}"}}, {"type": "text", "text": "What happens?"}]
    base64_chat = [{"type": "video_url", "video_url": {"url": _data_url(long, "video/mp4")}},
                   {"type": "text", "text": "What happens?"}]
    image_chat = [{"type": "image_url", "image_url": {"url": _data_url(image, "image/png")}},
                  {"type": "text", "text": "What is it?"}]
    expected = _expected_text(reference, hub_folder, [
        ([{"type": "video", "path": str(long)}, {"type": "text", "text": "What happens?"}], {"num_frames": 8}),
        ([{"type": "image", "path": str(image)}, {"type": "text", "text": "What is it?"}], {}),
    ])
    assert _ask(server, video_chat) == expected[0]
    assert _ask(server, base64_chat) == expected[0]
    assert _ask(server, image_chat) == expected[1]
    assert _ask(server, video_chat, stream=True) == expected[0]
    assert expected[0] != expected[1]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("two-videos", "At most 1 video"),
        ("not-a-video", "video"),
        # vLLM answers the processor's error with its own message, which names the setting but drops ours
        ("bad-override", "'hiera_frames': 3"),
        # vLLM runs no processor for a request without media: the chat template itself refuses the placeholder
        ("placeholder-in-text", "contains '<video>' or '<image>', ViCA2's placeholders"),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_goes_on(server, media, case, message):
    long = f"file://{media['long']}"
    video = {"type": "video_url", "video_url": {"url": long}}
    extra = {}
    if case == "two-videos":
        content = [video, video, {"type": "text", "text": "Q"}]
    elif case == "not-a-video":
        content = [{"type": "video_url", "video_url": {"url": f"file://{media['not_a_video']}"}},
                   {"type": "text", "text": "Q"}]
    elif case == "bad-override":
        content, extra = [video, {"type": "text", "text": "Q"}], {"mm_processor_kwargs": {"hiera_frames": 3}}
    else:  # a user typing the placeholder must not get text embedded where the model expects a video
        content = [{"type": "text", "text": "What is <video> here?"}]
    with pytest.raises(openai.APIStatusError) as error:
        _ask(server, content, **extra)
    assert 400 <= error.value.status_code < 500
    assert message in str(error.value)
    assert _ask(server, [{"type": "text", "text": "Still there?"}])  # the next request is answered


def _token_ids(client, content, **extra) -> list[int]:
    response = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": content}],
        temperature=0.0,
        max_tokens=MAX_TOKENS,
        extra_body={"return_token_ids": True, **extra},
    )
    return response.choices[0].model_extra["token_ids"]


def test_text_image_and_video_file_token_for_token_as_transformers(server, reference, media):
    long, image = Path(media["long"]), Path(media["image"])
    chats = {
        "text": ([{"type": "text", "text": "Describe a room."}], None),
        "image": ([{"type": "image_url", "image_url": {"url": _data_url(image, "image/png")}},
                   {"type": "text", "text": "What is it?"}], {"type": "image", "path": str(image)}),
        "video": ([{"type": "video_url", "video_url": {"url": f"file://{long}"}},
                   {"type": "text", "text": "What happens?"}], {"type": "video", "path": str(long)}),
    }
    expected = reference.generate([
        {"messages": [{"role": "user", "content": ([item] if item else []) + content[-1:]}], "max_new_tokens": MAX_TOKENS,
         "add_time_instruction": False, **({"num_frames": 8} if item and item["type"] == "video" else {})}
        for content, item in chats.values()
    ])
    got = [_token_ids(server, content) for content, _ in chats.values()]
    assert got == expected
    assert got[1] != got[2]  # the media reach the model


def test_the_generatable_vocabulary_limit_holds_for_every_request(server, reference):
    """A +100 logit bias on every id the release could never generate (untrained rows, <image>, <video>) would make
    them the greedy choice; the server's logits processor keeps them out, so the answer is transformers' own."""
    from vica2.configuration_vica2 import Vica2Config

    vocab = Vica2Config.from_pretrained(server.model_folder).text_config.vocab_size
    content = [{"type": "text", "text": "Describe a room."}]
    expected = reference.generate([{"messages": [{"role": "user", "content": content}], "max_new_tokens": MAX_TOKENS}])
    assert _token_ids(server, content, logit_bias={str(i): 100 for i in range(GENERATABLE, vocab)}) == expected[0]
    assert max(expected[0]) < GENERATABLE


def test_remote_media_is_off_unless_asked(server, media):
    """An http URL is refused before anything is fetched (a local web server sees no request)."""
    import http.server
    import threading

    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(Path(media["long"]).parent), **kwargs)

        def log_message(self, *args):
            requests.append(args)

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{web.server_address[1]}/{Path(media['long']).name}"
        with pytest.raises(openai.APIStatusError) as error:
            _ask(server, [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "Q"}])
    finally:
        web.shutdown()
        web.server_close()
    assert 400 <= error.value.status_code < 500
    assert "--allow-remote-media" in str(error.value)
    assert requests == []


def test_the_printed_command_is_the_one_run(server, hub_folder):
    import shlex

    from vica2.configuration_vica2 import Vica2Config

    config = Vica2Config.from_pretrained(hub_folder)
    command = shlex.split(server.printed_command)  # VLLM_CPU_KVCACHE_SPACE is the test's own: no variable first
    assert command[:4] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
    flags = dict(zip(command, command[1:]))
    assert int(flags["--max-num-batched-tokens"]) >= sum(config.num_video_tokens(8))
    assert json.loads(flags["--media-io-kwargs"]) == {"video": {"num_frames": 8}}
    assert flags["--logits-processors"] == "vica2.tools.vllm_logits:GeneratableVocabLimit"
