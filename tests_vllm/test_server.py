"""`vica2 serve` (vLLM's OpenAI server, set up for ViCA2) on a ViCA2 folder, started by the test on 127.0.0.1, asked
with the `openai` client.

One server for the module, eager (the offline tests run vLLM's default, compiled, mode); every answer is compared
with transformers' greedy answer to the same conversation, token for token where the API returns ids: the prompt
(the time instruction included) and the answer.
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

from conftest import GENERATABLE, media_server


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
    response = _create(client, content, stream=stream, **extra)
    if stream:
        return "".join(chunk.choices[0].delta.content or "" for chunk in response if chunk.choices)
    return response.choices[0].message.content


def _ask_ids(client, content, **extra) -> dict:
    """The prompt's token ids and the answer's, as the server reports them."""
    response = _create(client, content, return_token_ids=True, **extra)
    return {"prompt_ids": response.model_extra["prompt_token_ids"],
            "tokens": response.choices[0].model_extra["token_ids"]}


def _create(client, content, stream: bool = False, **extra):
    return client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": content}],
        temperature=0.0,
        max_tokens=MAX_TOKENS,
        stream=stream,
        extra_body=extra,  # no allowed_token_ids: the logits processor vica2 serve sets limits the vocabulary
    )


def _expected(reference, conversations) -> list[dict]:
    """transformers' prompt ids and greedy answer ids for each user turn, rendered and tokenized by
    `processor.apply_chat_template(..., tokenize=True)` (the time instruction included for a video)."""
    return reference.run([{"messages": [{"role": "user", "content": content}], "max_new_tokens": MAX_TOKENS, **kwargs}
                          for content, kwargs in conversations])


def _data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def test_video_image_and_streamed_chats_answer_as_transformers(server, reference, hub_folder, media):
    """A video the server decodes (a file URL, a base64 data URL) carries the release's time instruction, as in
    transformers' chat template; the prompt and the answer are transformers' token for token."""
    from transformers import AutoTokenizer

    long, image = Path(media["long"]), Path(media["image"])
    question = {"type": "text", "text": "What happens?"}
    video_chat = [{"type": "video_url", "video_url": {"url": f"file://{long}"}}, question]
    base64_chat = [{"type": "video_url", "video_url": {"url": _data_url(long, "video/mp4")}}, question]
    image_chat = [{"type": "image_url", "image_url": {"url": _data_url(image, "image/png")}},
                  {"type": "text", "text": "What is it?"}]
    text_chat = [{"type": "text", "text": "Hello there"}]
    expected = _expected(reference, [
        ([{"type": "video", "path": str(long)}, question], {"num_frames": 8}),
        ([{"type": "image", "path": str(image)}, {"type": "text", "text": "What is it?"}], {}),
        (text_chat, {}),
    ])
    tokenizer = AutoTokenizer.from_pretrained(hub_folder, trust_remote_code=True)
    assert " frames are located at" in tokenizer.decode(expected[0]["prompt_ids"])  # the time instruction
    assert _ask_ids(server, video_chat) == expected[0]
    assert _ask_ids(server, base64_chat) == expected[0]
    assert _ask_ids(server, image_chat) == expected[1]
    assert _ask_ids(server, text_chat) == expected[2]
    # streamed: the text of those tokens (vLLM's detokenizer holds back a trailing incomplete UTF-8 character, where
    # transformers' decode writes U+FFFD)
    assert _ask(server, video_chat, stream=True) == _ask(server, video_chat)
    assert expected[0]["tokens"] != expected[1]["tokens"]


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


def test_the_generatable_vocabulary_limit_holds_for_every_request(server, reference):
    """A +100 logit bias on every id the release could never generate (untrained rows, <image>, <video>) would make
    them the greedy choice; the logits processor `vica2 serve` sets masks them after the bias for every request, so
    the answer is transformers' own (and the same bias on a generatable id does win: the bias reaches the logits)."""
    from vica2.configuration_vica2 import Vica2Config

    vocab = Vica2Config.from_pretrained(server.model_folder).text_config.vocab_size
    text_chat = [{"type": "text", "text": "Hello there"}]
    expected = _expected(reference, [(text_chat, {})])[0]
    biased = _ask_ids(server, text_chat, logit_bias={str(i): 100 for i in range(GENERATABLE, vocab)})
    assert biased == expected and max(biased["tokens"]) < GENERATABLE
    assert _ask_ids(server, text_chat, logit_bias={"7": 100})["tokens"] == [7] * MAX_TOKENS


def test_remote_media_is_off_unless_asked(server, media):
    """An http URL is refused before anything is fetched (a local web server that has the video sees no request)."""
    with media_server({"/clip.mp4": Path(media["long"]).read_bytes()}) as (base, requested):
        with pytest.raises(openai.APIStatusError) as error:
            video = {"type": "video_url", "video_url": {"url": f"{base}/clip.mp4"}}
            _ask(server, [video, {"type": "text", "text": "Q"}])
    assert 400 <= error.value.status_code < 500
    assert "--allow-remote-media" in str(error.value)
    assert requested == []


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
