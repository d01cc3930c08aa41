"""`vllm.LLM` on a ViCA2 folder (our remote code through vLLM's Transformers backend) vs transformers, greedy.

One engine (conftest's `llm`) serves this module and the evaluator's tests (an engine start is most of the time here). vLLM decodes the videos itself
(its own loader, as `vllm serve` does); transformers reads the file with ViCA2's PyAV reader.
"""

from __future__ import annotations

import pytest
from PIL import Image

from conftest import greedy, vllm_decoded_video


def chat(text: str) -> str:
    return f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


MAX_TOKENS = 10
# What `vica2 serve` sets for every chat (--default-chat-template-kwargs): the video is marked for ViCA2's plugin.
PLUGIN_CHAT = {"engine_expands_videos": True}


def _token_ids(outputs) -> list[list[int]]:
    return [list(output.outputs[0].token_ids) for output in outputs]


@pytest.fixture(scope="module", params=["compiled", "eager"])
def engine(request, llm, hub_folder):
    """The session's engine (vLLM's default mode: the language model compiled), and an eager one for this module."""
    if request.param == "compiled":
        yield llm
        return
    from vllm import LLM

    from conftest import engine_kwargs

    eager = LLM(**engine_kwargs(hub_folder, enforce_eager=True))
    yield eager
    del eager


def vllm_chat_prompt(processor, text: str) -> str:
    """A user turn with a video then `text`, rendered as vLLM renders a chat (the tokenizer and the processor's
    template; the video part has no source: the engine expands it, and ViCA2's plugin is told so)."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
    return processor.tokenizer.apply_chat_template(messages, chat_template=processor.chat_template,
                                                   add_generation_prompt=True, tokenize=False, **PLUGIN_CHAT)


def transformers_metadata(metadata: dict) -> dict:
    """vLLM's video metadata without its own key (`do_sample_frames`), as transformers' `VideoMetadata` takes it."""
    return {key: value for key, value in metadata.items() if key != "do_sample_frames"}


def test_mixed_requests_submitted_together_match_transformers(engine, reference, hub_folder, media, tmp_path):
    """11 requests in one call, token for token (prompt and answer), compiled and eager: text, an image, a video decoded
    by vLLM at its frame budget (8) and at 4 frames (the release's 4-frame sampling chosen from all decoded frames), a
    6-frame video (the release repeats frames), a token-ratio override, decoded frames without metadata (an array and a
    list of PIL images: taken as already sampled), and a chat's video given as frames with metadata (vLLM adds the time
    instruction, as transformers' chat template does) and without (no timing: no instruction)."""
    from transformers import AutoProcessor

    from conftest import frames_file

    long, short, other = (str(media[name]) for name in ("long", "short", "other"))
    frames, metadata = vllm_decoded_video(other, 8)
    pil_frames = [Image.fromarray(frame) for frame in frames[:5]]
    processor = AutoProcessor.from_pretrained(hub_folder, trust_remote_code=True)
    chat_frames = {"type": "video", "video": frames_file(tmp_path, frames, metadata=transformers_metadata(metadata))}
    cases = [
        (chat("Hello there"), None, {}, {}),
        (chat("<image>\nWhat is it?"), {"image": Image.open(media["image"])}, {}, {"images": str(media["image"])}),
        (chat("<video>\nWhat happens?"), {"video": vllm_decoded_video(long, 8)}, {}, {"videos": long}),
        (
            chat("<video>\nWhat happens?"),
            {"video": vllm_decoded_video(long, -1)},
            {"num_frames": 4},
            {"videos": long, "num_frames": 4},
        ),
        (chat("<video>\nHow many?"), {"video": vllm_decoded_video(short, -1)}, {}, {"videos": short}),
        (
            chat("<video>\nWhere?"),
            {"video": vllm_decoded_video(other, 8)},
            {"hiera_frames": 2, "siglip_pool_stride": 1},
            {"videos": other, "hiera_frames": 2, "siglip_pool_stride": 1},
        ),
        (chat("<video>\nWhich way?"), {"video": frames}, {}, {"videos": frames_file(tmp_path, frames)}),
        (chat("<video>\nAnd now?"), {"video": pil_frames}, {}, {"videos": frames_file(tmp_path, frames[:5], pil=True)}),
        (
            vllm_chat_prompt(processor, "When?"),
            {"video": (frames, metadata)},
            {},
            {"messages": [{"role": "user", "content": [chat_frames, {"type": "text", "text": "When?"}]}]},
        ),
        (
            vllm_chat_prompt(processor, "And here?"),
            {"video": frames[:5]},
            {},
            {"messages": [{"role": "user", "content": [{"type": "video", "video": frames_file(tmp_path, frames[:5])},
                                                       {"type": "text", "text": "And here?"}]}]},
        ),
        (chat("Tell me more"), None, {}, {}),
    ]
    prompts = []
    for text, data, kwargs, _ in cases:
        prompt = {"prompt": text}
        if data:
            prompt["multi_modal_data"] = data
        if kwargs:
            prompt["mm_processor_kwargs"] = kwargs
        prompts.append(prompt)
    requests = [{"max_new_tokens": MAX_TOKENS, **ref} if "messages" in ref else
                {"prompt": text, "max_new_tokens": MAX_TOKENS, **ref} for text, _, _, ref in cases]
    expected = reference.run(requests)
    outputs = engine.generate(prompts, greedy(MAX_TOKENS), use_tqdm=False)
    assert [list(output.prompt_token_ids) for output in outputs] == [result["prompt_ids"] for result in expected]
    assert _token_ids(outputs) == [result["tokens"] for result in expected]
    assert len({tuple(result["tokens"]) for result in expected}) >= 3  # the inputs really steer the answers
    instruction = processor.tokenizer.encode(" frames are located at", add_special_tokens=False)
    with_instruction = [_contains(output.prompt_token_ids, instruction) for output in outputs]
    assert with_instruction == [False] * 8 + [True, False, False]  # only the chat's video with timing has it


def _contains(sequence, part) -> bool:
    sequence = list(sequence)
    return any(sequence[i : i + len(part)] == part for i in range(len(sequence) - len(part) + 1))


def test_chat_with_a_video_file_carries_the_time_instruction(llm, reference, media):
    """`LLM.chat` with a video file vLLM decodes (8 frames, its media setting): the prompt is transformers'
    `apply_chat_template(..., tokenize=True)` of the same chat, time instruction included, token for token."""
    long = str(media["long"])
    question = [{"type": "text", "text": "What happens in it?"}]
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{long}"}}, *question]}]
    expected = reference.run([{"messages": [{"role": "user", "content": [{"type": "video", "path": long}, *question]}],
                               "max_new_tokens": MAX_TOKENS, "num_frames": 8}])
    output = llm.chat(messages, greedy(MAX_TOKENS), use_tqdm=False, chat_template_kwargs=PLUGIN_CHAT)[0]
    assert list(output.prompt_token_ids) == expected[0]["prompt_ids"]
    assert list(output.outputs[0].token_ids) == expected[0]["tokens"]


def test_placeholder_ids_are_never_generated_whatever_the_request_asks(llm, reference):
    """The engine's logits processor masks ids >= generatable_vocab_size for every request: even with a huge bias on
    the placeholders (which would otherwise win every step), the answer is transformers' greedy answer."""
    from conftest import GENERATABLE

    prompt = chat("Hello there")
    bias = {GENERATABLE: 100.0, GENERATABLE + 1: 100.0}
    output = llm.generate(prompt, greedy(MAX_TOKENS, logit_bias=bias), use_tqdm=False)[0]
    assert list(output.outputs[0].token_ids) == reference.generate([{"prompt": prompt, "max_new_tokens": MAX_TOKENS}])[0]
    assert max(output.outputs[0].token_ids) < GENERATABLE
    # the same bias on a generatable id does win every step: the bias reached the logits
    assert list(llm.generate(prompt, greedy(3, logit_bias={7: 100.0}), use_tqdm=False)[0].outputs[0].token_ids) == [7] * 3


def test_the_vllm_plugin_is_installed():
    """ViCA2's processor reaches vLLM through the package's `vllm.general_plugins` entry point (setup.cfg)."""
    from importlib.metadata import entry_points

    assert [e.value for e in entry_points(group="vllm.general_plugins") if e.name == "vica2"] == [
        "vica2.tools.vllm_plugin:register"
    ]


def test_placeholder_counts_follow_the_frames_and_overrides(llm, media):
    """The prompt vLLM builds holds exactly the placeholder tokens transformers' processor counts."""
    from vica2.configuration_vica2 import num_video_tokens

    long = str(media["long"])
    outputs = llm.generate(
        [
            {"prompt": chat("<video>\nQ"), "multi_modal_data": {"video": vllm_decoded_video(long, 8)}},
            {
                "prompt": chat("<video>\nQ"),
                "multi_modal_data": {"video": vllm_decoded_video(long, -1)},
                "mm_processor_kwargs": {"num_frames": 4, "hiera_pool_stride": 1},
            },
        ],
        greedy(1),
        use_tqdm=False,
    )
    layout = dict(siglip_grid=4, hiera_grid=2, use_image_newline=True, video_pool_mode="bilinear")
    counts = [output.prompt_token_ids.count(384) for output in outputs]
    assert counts == [
        sum(num_video_tokens(8, video_frames_budget=8, hiera_frames=4, siglip_pool_stride=2, hiera_pool_stride=2, **layout)),
        sum(num_video_tokens(4, video_frames_budget=8, hiera_frames=4, siglip_pool_stride=2, hiera_pool_stride=1, **layout)),
    ]


def _prefix_cache_hits(llm) -> float:
    return sum(metric.value for metric in llm.get_metrics() if metric.name == "vllm:prefix_cache_hits")


def test_second_question_about_a_video_hits_the_prefix_cache(llm, reference, media):
    """vLLM hashes the video into its cache keys: the second question reuses the video's KV blocks, and answers as
    transformers (no cache) does."""
    other = str(media["other"])
    questions = [chat("<video>\nWhat colour is the bar?"), chat("<video>\nWhich way does it move?")]
    video = vllm_decoded_video(other, 8)
    expected = reference.generate([{"prompt": q, "max_new_tokens": MAX_TOKENS, "videos": other} for q in questions])
    before = _prefix_cache_hits(llm)
    first = _token_ids(llm.generate({"prompt": questions[0], "multi_modal_data": {"video": video}}, greedy(MAX_TOKENS), use_tqdm=False))
    after_first = _prefix_cache_hits(llm)
    second = _token_ids(llm.generate({"prompt": questions[1], "multi_modal_data": {"video": video}}, greedy(MAX_TOKENS), use_tqdm=False))
    after_second = _prefix_cache_hits(llm)
    assert [first[0], second[0]] == expected
    # The second prompt shares the system turn and the video (56 placeholder tokens) with the first: their full
    # blocks of 32 come from the cache.
    assert after_second - after_first >= 64
    assert after_first >= before


def _messages(error: BaseException) -> str:
    """The messages of an error and of the errors it was raised from (vLLM wraps the processor's)."""
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(messages)


@pytest.mark.parametrize(
    ("prompt", "data", "kwargs", "message"),
    [
        (chat("<video>\n<video>\nQ"), "two_videos", {}, "At most 1 video"),
        (chat("<video>\nQ"), "video", {"hiera_frames": 3}, "multiple of hiera_frames=3"),
        (chat("<video>\nQ"), "video", {"num_frames": 16}, "were not decoded"),
    ],
    ids=["two-videos", "bad-override", "frames-not-decoded"],
)
def test_bad_requests_name_the_problem_and_the_engine_goes_on(llm, media, prompt, data, kwargs, message):
    video = vllm_decoded_video(str(media["long"]), 8)
    multi_modal_data = {"video": [video, video]} if data == "two_videos" else {"video": video}
    request = {"prompt": prompt, "multi_modal_data": multi_modal_data, "mm_processor_kwargs": kwargs}
    with pytest.raises(Exception) as error:
        llm.generate(request, greedy(2), use_tqdm=False)
    assert message in _messages(error.value)
    assert len(_token_ids(llm.generate(chat("Still there?"), greedy(2), use_tqdm=False))[0]) == 2


def test_front_end_engine_answers_as_transformers(llm, reference, hub_folder, media):
    """`VllmEngine` (what the evaluator submits through): ViCA2's own decoded videos, all questions at once."""
    from transformers import AutoTokenizer

    from vica2.video_loading_vica2 import read_video
    from vica2.tools.vllm_engine import VllmEngine

    paths = [str(media[name]) for name in ("long", "other", "long", "short")]
    prompts = [chat(f"<video>\nQuestion {i}?") for i in range(len(paths))]
    engine = VllmEngine(str(hub_folder), llm=llm)
    got = engine.generate(prompts, [read_video(path, 8) for path in paths], MAX_TOKENS)
    tokenizer = AutoTokenizer.from_pretrained(hub_folder)
    expected = reference.generate([{"prompt": p, "max_new_tokens": MAX_TOKENS, "videos": v} for p, v in zip(prompts, paths)])
    assert got == [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in expected]
    with pytest.raises(ValueError, match="one video per prompt"):
        engine.generate(prompts, [], MAX_TOKENS)


def test_stream_keeps_the_next_videos_queued_and_answers_as_generate(llm, hub_folder, media):
    """`VllmEngine.stream` (the evaluator's submission): the next video's questions are in the engine before the
    current video's are answered, never more than `videos_in_flight` videos at once, and the answers are those of
    one `generate` call per video."""
    from vica2.video_loading_vica2 import read_video
    from vica2.tools.vllm_engine import VllmEngine

    engine = VllmEngine(str(hub_folder), llm=llm)
    videos = {name: read_video(str(media[name]), 8) for name in ("long", "other", "short")}
    groups = [(group, [chat(f"<video>\nAbout {name}, question {i}?") for i in range(3)], video)
              for group, (name, video) in enumerate(videos.items())]
    expected = [engine.generate(prompts, [video] * len(prompts), MAX_TOKENS) for _, prompts, video in groups]
    events = []

    def lazily():
        for group, item in enumerate(groups):
            events.append(("queued", group))
            yield item

    answers = {}
    for group, index, text in engine.stream(lazily(), MAX_TOKENS, videos_in_flight=2):
        events.append(("answered", group))
        answers[group, index] = text
    assert answers == {(g, i): text for g, texts in enumerate(expected) for i, text in enumerate(texts)}
    assert events[:2] == [("queued", 0), ("queued", 1)]  # video 1 is in the engine before video 0 is answered
    answered, held = {0: 0, 1: 0, 2: 0}, set()
    for kind, group in events:  # at no point more than 2 videos with unanswered questions
        if kind == "queued":
            held.add(group)
        else:
            answered[group] += 1
            held -= {group} if answered[group] == 3 else set()
        assert len(held) <= 2
    assert not llm.llm_engine.has_unfinished_requests()


def test_a_stream_closed_early_leaves_nothing_in_the_engine(llm, hub_folder, media):
    from vica2.video_loading_vica2 import read_video
    from vica2.tools.vllm_engine import VllmEngine

    engine = VllmEngine(str(hub_folder), llm=llm)
    video = read_video(str(media["long"]), 8)
    stream = engine.stream([("tag", [chat(f"<video>\nQ{i}?") for i in range(4)], video)] * 2, MAX_TOKENS)
    next(stream)
    stream.close()  # an interrupted evaluation: the engine drops the rest
    assert not llm.llm_engine.has_unfinished_requests()
    assert engine.generate([chat("<video>\nStill there?")], [video], MAX_TOKENS)  # and answers the next call
    with pytest.raises(ValueError, match="videos_in_flight must be at least 1"):
        next(engine.stream([], MAX_TOKENS, videos_in_flight=0))


def test_stream_reaches_the_ideal_prefix_cache_hits(llm, hub_folder, media):
    """A video's questions, streamed (queued together), find in vLLM's cache every whole KV block they share with an
    earlier question of their video, and so at least 95% of the shared tokens (counts: vLLM's counters against the
    prompts). vLLM (V1) caches a block as it schedules it, so questions prefilled in the same step share the video;
    prefilling the first question alone first found exactly as many (bench_vllm). The rest of a shared prefix's last
    block (32 tokens here) is recomputed: the videos have 32 frames, a shared prefix of ~560 tokens (ViCA2-7B's 64
    frames make ~22,000; at 8 frames the tiny model's ~250 would give 90%)."""
    from vica2.processing_vica2 import time_instruction
    from vica2.video_loading_vica2 import read_video
    from vica2.tools.vllm_engine import VllmEngine, prefix_cache_counts

    engine = VllmEngine(str(hub_folder), llm=llm)
    groups = []
    for name in ("long", "other", "short"):  # prompts as the evaluator writes them: video, time instruction, question
        video = read_video(str(media[name]), 32)
        prompts = [chat(f"<video>\n{time_instruction(video.metadata)}\n\nQuestion {i}?") for i in range(6)]
        groups.append((name, prompts, video))
    llm.reset_prefix_cache()
    before = prefix_cache_counts(llm)
    answers = list(engine.stream(groups, 4, videos_in_flight=2, num_frames=32))
    after = prefix_cache_counts(llm)
    assert len(answers) == 18
    hits = after["cache_hit_tokens"] - before["cache_hit_tokens"]
    ideal = engine.ideal_prefix_counts()
    assert ideal["prompt_tokens"] == after["cache_queried_tokens"] - before["cache_queried_tokens"]
    assert ideal["ideal_hit_tokens"] > 0.5 * ideal["prompt_tokens"]  # the video is most of each prompt
    assert hits >= ideal["ideal_block_hit_tokens"]
    assert hits >= 0.95 * ideal["ideal_hit_tokens"]
