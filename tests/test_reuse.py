"""Encode once, ask many: answers from a reused prefix equal answers from scratch (vica2.tools.inference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_model
from vica2.tools.inference import (
    ChatSession,
    EncodedPrefix,
    ReuseStats,
    UsageError,
    answer_prompts,
    cache_bytes_per_token,
    check_device,
    check_model_path,
    common_prefix_length,
    implied_token_counts,
    prepare_media,
    render_chat,
    reusable_prefix_length,
    user_message,
)


QUESTIONS = ["How many chairs are in the room?", "Where is the red ball?", "Is the table left of the sofa, or not?"]


@pytest.fixture(scope="module")
def setup():
    from vica2.tools.demo import build_byte_tokenizer
    from vica2.processing_vica2 import Vica2Processor

    tokenizer = build_byte_tokenizer()
    model = tiny_model(seed=3, attn_implementation="sdpa", image_token_id=len(tokenizer),
                       video_token_id=len(tokenizer) + 1)
    model.generation_config.eos_token_id = None  # random weights: always generate max_new_tokens
    processor = Vica2Processor.from_model_config(model.config, tokenizer)
    frames = (np.random.default_rng(0).random((8, 40, 52, 3)) * 255).astype("uint8")
    image = (np.random.default_rng(1).random((70, 150, 3)) * 255).astype("uint8")
    return model, processor, frames, image


def _media(setup, kind, **overrides):
    model, processor, frames, image = setup
    item = {"video": frames} if kind == "video" else {"image": image}
    return prepare_media(model, processor, **item, **overrides)


def _from_scratch(model, processor, prompt, media, **generate_kwargs):
    """The plain path: the processor on the whole prompt, then generate (towers included)."""
    item = {"videos": [media.source]} if media.kind == "video" else {"images": [media.source]}
    inputs = processor(text=[prompt], **item, return_tensors="pt", **media.overrides)
    with torch.inference_mode():
        return model.generate(**inputs, pad_token_id=0, **generate_kwargs), inputs["input_ids"].shape[1]


GREEDY = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)


def _assert_same(reused_new_ids, reused_logits, scratch, prompt_length, row=0):
    assert reused_new_ids == scratch.sequences[0, prompt_length:].tolist()
    for step, logits in enumerate(scratch.logits):
        torch.testing.assert_close(reused_logits[step][row], logits[0], rtol=0, atol=1e-5)


# A video, an image and a video with a token-ratio override: what every reuse path must handle alike.
MEDIA_CASES = pytest.mark.parametrize("kind, overrides", [("video", {}), ("image", {}),
                                                          ("video", {"hiera_frames": 8, "hiera_pool_stride": 1})])


@MEDIA_CASES
def test_prompt_ids_equal_the_processors(setup, kind, overrides):
    model, processor = setup[:2]
    media = _media(setup, kind, **overrides)
    prompts = [render_chat(processor, [user_message(media, q)]) for q in QUESTIONS]
    item = {"videos": [media.source]} if kind == "video" else {"images": [media.source]}
    for prompt, ids in zip(prompts, media.tokenize(processor, prompts)):
        assert ids == processor(text=[prompt], **item, **overrides)["input_ids"][0].tolist()


@MEDIA_CASES
def test_batched_continuations_equal_each_prompt_from_scratch(setup, kind, overrides):
    model, processor = setup[:2]
    media = _media(setup, kind, **overrides)
    prompts = [render_chat(processor, [user_message(media, q)]) for q in QUESTIONS]
    ids = media.tokenize(processor, prompts)
    length = reusable_prefix_length(ids, media)
    assert len({len(row) for row in ids}) == 3 and 0 < length < min(map(len, ids))  # padding is exercised
    prefix = EncodedPrefix.encode(model, ids[0][:length], media)
    batched, output = prefix.generate(ids, pad_token_id=0, **GREEDY)
    for row, prompt in enumerate(prompts):
        scratch, prompt_length = _from_scratch(model, processor, prompt, media, **GREEDY)
        _assert_same(batched[row], output.logits, scratch, prompt_length, row)
        single, single_output = prefix.generate([ids[row]], pad_token_id=0, **GREEDY)
        _assert_same(single[0], single_output.logits, scratch, prompt_length)
    assert prefix.cache.get_seq_length() == length  # generation wrote into copies


def test_sampling_and_streaming_from_the_prefix_equal_from_scratch(setup):
    from transformers import TextIteratorStreamer

    model, processor = setup[:2]
    media = _media(setup, "video")
    prompts = [render_chat(processor, [user_message(media, q)]) for q in QUESTIONS[:2]]
    ids = media.tokenize(processor, prompts)
    prefix = EncodedPrefix.encode(model, ids[0][:reusable_prefix_length(ids, media)], media)
    sampling = dict(max_new_tokens=6, do_sample=True, temperature=1.5, top_k=50)
    torch.manual_seed(7)
    sampled, _ = prefix.generate([ids[1]], pad_token_id=0, **sampling)
    torch.manual_seed(7)
    scratch, prompt_length = _from_scratch(model, processor, prompts[1], media, **sampling)
    assert sampled[0] == scratch[0, prompt_length:].tolist()

    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True)
    streamed, _ = prefix.generate([ids[0]], pad_token_id=0, max_new_tokens=5, do_sample=False, streamer=streamer)
    assert "".join(streamer) == processor.decode(streamed[0])


@pytest.mark.parametrize("kind", ["video", "image"])
def test_answer_prompts_with_and_without_reuse_agree_and_count_what_was_saved(setup, kind):
    model, processor = setup[:2]
    media = _media(setup, kind)
    prompts = [render_chat(processor, [user_message(media, q)]) for q in QUESTIONS]
    reused, plain = ReuseStats(), ReuseStats()
    with_reuse = answer_prompts(model, processor, prompts, media, batch_size=2, stats=reused, max_new_tokens=4,
                                do_sample=False)
    without = answer_prompts(model, processor, prompts, media, batch_size=2, reuse=False, stats=plain,
                             max_new_tokens=4, do_sample=False)
    assert with_reuse == without
    assert (reused.tower_runs, reused.prefixes_encoded, reused.prefills_saved) == (1, 1, 2)
    assert (plain.tower_runs, plain.prefixes_encoded, plain.prefills_saved) == (3, 0, 0)
    ids = media.tokenize(processor, prompts)
    length = reusable_prefix_length(ids, media)
    assert plain.prefill_tokens == sum(map(len, ids)) and reused.cached_tokens == 3 * length
    assert reused.prefill_tokens == length + sum(len(row) - length for row in ids)  # the prefix once, then the rest


def test_a_video_after_the_question_gets_no_reuse_and_still_the_same_answers(setup):
    model, processor = setup[:2]
    media = _media(setup, "video")
    prompts = [f"<|im_start|>user\n{q}\n{processor.video_token}<|im_end|>\n<|im_start|>assistant\n"
               for q in QUESTIONS[:2]]
    ids = media.tokenize(processor, prompts)
    assert common_prefix_length(ids) > 0 and reusable_prefix_length(ids, media) == 0
    stats = ReuseStats()
    answers = answer_prompts(model, processor, prompts, media, stats=stats, max_new_tokens=3, do_sample=False)
    assert stats.prefills_saved == 0 and stats.tower_runs == 2
    for prompt, answer in zip(prompts, answers):
        scratch, prompt_length = _from_scratch(model, processor, prompt, media, max_new_tokens=3, do_sample=False)
        assert answer == processor.decode(scratch[0, prompt_length:], skip_special_tokens=True)


def test_batch_rows_are_bounded_by_the_cache_memory_budget(setup):
    model, processor = setup[:2]
    media = _media(setup, "video")
    ids = media.tokenize(processor, [render_chat(processor, [user_message(media, "Why?")])])[0]
    prefix = EncodedPrefix.encode(model, ids[:-1], media)
    config = model.config.text_config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * (config.hidden_size //
                                                                               config.num_attention_heads) * 4
    assert prefix.cache_bytes() == per_token * (len(ids) - 1) == cache_bytes_per_token(model) * (len(ids) - 1)
    assert prefix.rows_within(8, None) == 8
    assert prefix.rows_within(8, 3 * prefix.cache_bytes()) == 3
    assert prefix.rows_within(8, 1) == 1  # always at least one row


def test_implied_token_counts_before_running(setup):
    model = setup[0]
    config = model.config
    assert implied_token_counts(config, num_frames=8) == dict(zip(("siglip", "hiera"), config.num_video_tokens(8)),
                                                              total=sum(config.num_video_tokens(8)))
    media = _media(setup, "video", hiera_frames=8, hiera_pool_stride=1)
    counts = implied_token_counts(config, num_frames=8, hiera_frames=8, hiera_pool_stride=1)
    assert counts["total"] == media.num_tokens and {k: counts[k] for k in ("siglip", "hiera")} == media.visual_tokens
    with pytest.raises(UsageError):
        implied_token_counts(config, num_frames=8, hiera_frames=3)


@pytest.mark.parametrize("kind", ["video", "image"])
def test_chat_turns_equal_the_whole_conversation_from_scratch(setup, kind):
    model, processor, frames, image = setup
    chat = ChatSession(model, processor, max_new_tokens=4)
    chat.set_video(frames) if kind == "video" else chat.set_image(image)
    assert chat.stats.tower_runs == 1
    answers = []
    for turn, question in enumerate(QUESTIONS):
        conversation = [*chat.history, user_message(chat.media if turn == 0 else None, question)]
        prompt = render_chat(processor, conversation)
        answer = chat.ask(question, max_new_tokens=4, return_dict_in_generate=True)
        scratch, prompt_length = _from_scratch(model, processor, prompt, chat.media, max_new_tokens=4,
                                               do_sample=False)
        assert answer.new_ids == scratch[0, prompt_length:].tolist()
        assert answer.prompt_tokens == prompt_length and 0 < answer.cached_tokens < prompt_length
        assert chat.history[-1]["role"] == "assistant"
        answers.append(answer)
    assert chat.stats.tower_runs == 1 and chat.stats.turns == 3
    chat.reset()
    again = chat.ask(QUESTIONS[0])
    assert again.new_ids == answers[0].new_ids and chat.stats.tower_runs == 1  # media kept across /reset
    assert len(chat.history) == 2


def test_chat_turn_logits_equal_from_scratch_and_iter_ask_streams(setup):
    model, processor, frames, _ = setup
    chat = ChatSession(model, processor, max_new_tokens=4)
    chat.set_video(frames)
    chat.ask(QUESTIONS[0])
    prompt = render_chat(processor, [*chat.history, user_message(None, QUESTIONS[1])])
    pieces = list(chat.iter_ask(QUESTIONS[1]))
    assert "".join(pieces).strip() == chat.last_answer.text
    # the same turn again, compared logit by logit: rewind the conversation one turn
    chat.history = chat.history[:2]
    logits = []

    class Keep:
        def __call__(self, input_ids, scores):
            logits.append(scores.clone())
            return scores

    from transformers import LogitsProcessorList

    chat.ask(QUESTIONS[1], logits_processor=LogitsProcessorList([Keep()]))
    scratch, _ = _from_scratch(model, processor, prompt, chat.media, **GREEDY)
    for mine, reference in zip(logits, scratch.logits):
        torch.testing.assert_close(mine[0], reference[0], rtol=0, atol=1e-5)
    assert len(logits) == 4 and chat.stats.tower_runs == 1


def test_chat_without_media_and_bad_input(setup, tmp_path):
    model, processor, frames, _ = setup
    chat = ChatSession(model, processor, max_new_tokens=2)
    assert chat.ask("Hello?").prompt_tokens > 0 and chat.stats.tower_runs == 0
    with pytest.raises(UsageError):
        chat.ask("   ")
    with pytest.raises(UsageError, match="no such file"):
        chat.set_video("/nonexistent/room.mp4")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(UsageError, match="broken.mp4"):
        chat.set_video(tmp_path / "broken.mp4")
    with pytest.raises(UsageError, match="hiera_frames"):
        ChatSession(model, processor, hiera_frames=3).set_video(frames)


def test_token_ratio_overrides_reach_the_model_only_as_the_processors_video_token_ratio(setup):
    """The inference API hands the scalar overrides to the processor; the model gets its per-video carrier."""
    from vica2.configuration_vica2 import TOKEN_RATIO_ARGS

    model, processor, frames, _ = setup
    media = _media(setup, "video", hiera_frames=8, hiera_pool_stride=1)
    budget = model.config.video_frames_budget
    assert media.pixels["video_token_ratio"].tolist() == [[budget, 8, model.config.siglip_pool_stride, 1]]
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    try:
        chat = ChatSession(model, processor, max_new_tokens=2, hiera_frames=8, hiera_pool_stride=1)
        chat.set_video(frames)
        chat.ask(QUESTIONS[0])
        answer_prompts(model, processor, [render_chat(processor, [user_message(media, QUESTIONS[1])])], media,
                       reuse=False, max_new_tokens=2)
    finally:
        hook.remove()
    assert seen and not any(set(TOKEN_RATIO_ARGS) & kwargs for kwargs in seen)
    assert any("video_token_ratio" in kwargs for kwargs in seen)


def test_library_errors_name_the_api_argument_and_the_shell_shows_the_flag(tmp_path):
    from vica2.tools.shell import flag_message

    with pytest.raises(UsageError, match=r"^model_path '.*nowhere': no such folder") as missing:
        check_model_path(str(tmp_path / "nowhere"))
    assert missing.value.argument == "model_path" and "--" not in str(missing.value)
    assert flag_message(missing.value).startswith(f"--model '{tmp_path / 'nowhere'}': no such folder")
    assert flag_message(missing.value, {"model_path": "--model_name_or_path"}).startswith("--model_name_or_path '")
    with pytest.raises(UsageError, match=r"^device 'banana': unknown device") as banana:
        check_device("banana")
    assert flag_message(banana.value).startswith("--device 'banana': unknown device")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="use device='cpu'") as cuda:
            check_device("cuda")
        assert "use --device cpu" in flag_message(cuda.value)


# ---------------------------------------------------------------------------------------------------- hardening
class _FailOnce:
    """A forward hook on the last decoder layer that raises once when armed: a turn failing half-way through a
    forward (out of memory, a bad input), after the first layers already wrote their keys and values."""

    def __init__(self, model):
        self.armed = False
        self.handle = model.model.language_model.layers[-1].register_forward_hook(self)

    def __call__(self, module, args, output):
        if self.armed:
            self.armed = False
            raise RuntimeError("simulated out of memory")


def _cache_state(chat):
    return [(layer.keys.clone(), layer.values.clone()) for layer in chat._cache.layers]


def test_a_failed_turn_leaves_the_session_as_before_and_reset_restores_the_encoded_prefix(setup):
    model, processor, frames, _ = setup
    fresh = ChatSession(model, processor, max_new_tokens=4)
    fresh.set_video(frames)
    encoded_ids, encoded_cache = list(fresh._ids), _cache_state(fresh)
    expected = [fresh.ask(QUESTIONS[0]).new_ids, fresh.ask(QUESTIONS[1]).new_ids]

    chat = ChatSession(model, processor, max_new_tokens=4)
    chat.set_video(frames)
    chat.ask(QUESTIONS[0])
    failing = _FailOnce(model)
    try:
        failing.armed = True
        with pytest.raises(RuntimeError, match="simulated"):
            chat.ask(QUESTIONS[1])
    finally:
        failing.handle.remove()
    lengths = {layer.keys.shape[-2] for layer in chat._cache.layers}
    assert lengths == {len(chat._ids)} and len(chat.history) == 2 and chat.stats.turns == 1  # nothing half-done
    assert chat.ask(QUESTIONS[1]).new_ids == expected[1]
    chat.reset()
    assert chat._ids == encoded_ids
    for (keys, values), (fresh_keys, fresh_values) in zip(_cache_state(chat), encoded_cache):
        assert torch.equal(keys, fresh_keys) and torch.equal(values, fresh_values)
    assert chat.ask(QUESTIONS[0]).new_ids == expected[0]


class _Gate:
    """A logits processor that writes "a " (so the streamer hands out a first piece) and then holds generation
    until the session's turn is cancelled: the stream is mid-answer, deterministically."""

    def __init__(self, chat, tokenizer):
        self.chat, self.step = chat, 0
        self.forced = [tokenizer(text, add_special_tokens=False)["input_ids"][-1] for text in ("a", " ")]

    def __call__(self, input_ids, scores):
        if self.step < len(self.forced):
            scores = torch.full_like(scores, -float("inf"))
            scores[:, self.forced[self.step]] = 0
        else:
            self.chat._cancel.wait(timeout=120)
        self.step += 1
        return scores


def test_a_cancelled_stream_stops_its_thread_and_a_second_thread_is_refused(setup):
    import threading

    from transformers import LogitsProcessorList

    from vica2.tools.inference import SessionBusy

    model, processor, frames, _ = setup
    chat = ChatSession(model, processor, max_new_tokens=40)
    chat.set_video(frames)
    first = chat.ask(QUESTIONS[0], max_new_tokens=3)
    before = set(threading.enumerate())
    stream = chat.iter_ask(QUESTIONS[1], logits_processor=LogitsProcessorList([_Gate(chat, processor.tokenizer)]))
    assert next(stream).startswith("a")  # the generation thread now holds the session, mid-answer
    with pytest.raises(SessionBusy, match="another turn"):
        chat.ask(QUESTIONS[2])
    stream.close()  # the user stopped reading: generation must stop before the session is used again
    assert not [thread for thread in set(threading.enumerate()) - before if thread.is_alive()]
    assert len(chat.history) == 2 and chat.last_answer is first  # the cancelled turn left nothing behind
    assert {layer.keys.shape[-2] for layer in chat._cache.layers} == {len(chat._ids)}
    fresh = ChatSession(model, processor, max_new_tokens=3)
    fresh.set_video(frames)
    fresh.ask(QUESTIONS[0])
    assert chat.ask(QUESTIONS[1], max_new_tokens=3).new_ids == fresh.ask(QUESTIONS[1]).new_ids


def test_beams_and_out_of_range_ids_on_a_cached_prefix_are_refused_before_any_work(setup):
    model, processor, frames, _ = setup
    media = _media(setup, "video")
    ids = media.tokenize(processor, [render_chat(processor, [user_message(media, q)]) for q in QUESTIONS[:2]])
    prefix = EncodedPrefix.encode(model, ids[0][:reusable_prefix_length(ids, media)], media)
    calls = []
    hook = model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        for option in ({"num_beams": 2}, {"num_return_sequences": 2, "do_sample": True}):
            with pytest.raises(UsageError, match=f"{next(iter(option))}=2 is not supported"):
                prefix.generate(ids, pad_token_id=0, max_new_tokens=2, **option)
        vocab = model.get_input_embeddings().num_embeddings
        with pytest.raises(UsageError, match=f"vocabulary has {vocab} tokens"):
            prefix.generate([ids[0][:-1] + [vocab + 5]], pad_token_id=0, max_new_tokens=2)
        chat = ChatSession(model, processor, max_new_tokens=2)
        with pytest.raises(UsageError, match="num_beams=3"):
            chat.ask("Hello?", num_beams=3)
        with pytest.raises(UsageError, match="num_return_sequences=2"):
            answer_prompts(model, processor, [render_chat(processor, [user_message(media, q)]) for q in QUESTIONS],
                           media, num_return_sequences=2, do_sample=True, max_new_tokens=2)
    finally:
        hook.remove()
    assert not calls


def test_question_length_limit_and_bad_counts_are_refused(setup):
    from vica2.tools.inference import check_question

    model, processor = setup[:2]
    chat = ChatSession(model, processor, max_new_tokens=2, max_question_chars=20)
    with pytest.raises(UsageError, match=r"question: 21 characters, over the limit of 20 \(max_question_chars='20'\)"):
        chat.ask("x" * 21)
    assert chat.stats.turns == 0
    check_question("x" * 10**6, None)  # no limit
    with pytest.raises(UsageError, match="num_frames must be a positive"):
        implied_token_counts(model.config, num_frames=0)
    media = _media(setup, "video")
    with pytest.raises(UsageError, match="batch_size must be a positive"):
        answer_prompts(model, processor, [render_chat(processor, [user_message(media, "Why?")])], media,
                       batch_size=-1)


class _AttentionBlocks:
    """What the language model's first attention layer is given: query tokens and attention-mask shape per call."""

    def __init__(self, model):
        self.queries, self.masks = [], []
        attention = model.model.language_model.layers[0].self_attn
        self._handle = attention.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
        self.queries.append(hidden.shape[1])
        self.masks.append(None if mask is None else tuple(mask.shape))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()

    def assert_within(self, chunk, context):
        assert max(self.queries) <= chunk
        assert all(shape[-2] <= chunk and shape[-1] <= context for shape in self.masks if shape is not None)


def _keep_logits(logits):
    from transformers import LogitsProcessorList

    def keep(input_ids, scores):
        logits.append(scores.clone())
        return scores

    return LogitsProcessorList([keep])


@pytest.mark.parametrize("kind", ["video", None])
def test_a_long_question_is_prefilled_in_bounded_chunks_with_the_same_answers(setup, kind):
    """A question continuing a cache goes through the language model at most `prefill_chunk_tokens` tokens per
    forward, so no attention mask is larger than chunk x context; the answers and logits are the unchunked ones."""
    model, processor, frames, _ = setup
    question = " ".join(QUESTIONS) * 3  # ~300 tokens of the byte tokenizer
    runs = {}
    for chunk in (10**6, 32):
        chat = ChatSession(model, processor, max_new_tokens=4, prefill_chunk_tokens=chunk)
        if kind:
            chat.set_video(frames)
        logits = []
        with _AttentionBlocks(model) as blocks:
            new_ids = [chat.ask(question, logits_processor=_keep_logits(logits)).new_ids for _ in range(2)]
        runs[chunk] = new_ids, logits, blocks
        context = chat.last_answer.prompt_tokens + 4
    (whole_ids, whole_logits, whole_blocks), (ids, logits, blocks) = runs[10**6], runs[32]
    assert max(whole_blocks.queries) > 250  # unchunked: the whole question in one forward
    blocks.assert_within(32, context)
    assert ids == whole_ids and len(logits) == len(whole_logits) == 8
    for mine, reference in zip(logits, whole_logits):
        torch.testing.assert_close(mine, reference, rtol=0, atol=1e-5)


def test_long_continuations_of_an_encoded_prefix_are_prefilled_in_chunks(setup):
    model, processor = setup[:2]
    media = _media(setup, "video")
    prompts = [render_chat(processor, [user_message(media, question * 4)]) for question in QUESTIONS]
    ids = media.tokenize(processor, prompts)
    prefix = EncodedPrefix.encode(model, ids[0][:reusable_prefix_length(ids, media)], media)
    whole, whole_output = prefix.generate(ids, pad_token_id=0, prefill_chunk_tokens=10**6, **GREEDY)
    with _AttentionBlocks(model) as blocks:
        chunked, output = prefix.generate(ids, pad_token_id=0, prefill_chunk_tokens=16, **GREEDY)
    blocks.assert_within(16, max(map(len, ids)) + GREEDY["max_new_tokens"])
    assert chunked == whole and max(map(len, ids)) - len(prefix) > 100
    for mine, reference in zip(output.logits, whole_output.logits):
        torch.testing.assert_close(mine, reference, rtol=0, atol=1e-5)
    assert answer_prompts(model, processor, prompts, media, batch_size=3, prefill_chunk_tokens=16,
                          max_new_tokens=5) == processor.batch_decode(whole, skip_special_tokens=True)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(UsageError, match="prefill_chunk_tokens must be a positive whole number"):
            ChatSession(model, processor, prefill_chunk_tokens=bad)
