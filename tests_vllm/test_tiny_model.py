"""The built-in tiny ViCA2 (`vica2.tools.tiny_model`, the offline default) served by vLLM: the folder
`servable_copy` writes (what `vica2 demo` leaves and `vica2 serve` loads) gives the prompt transformers builds, token
for token (no time instruction: the model was trained without it), and the right answers to its held-out demo clip."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import engine_kwargs, greedy

from vica2.tools import tiny_model


PLUGIN_CHAT = {"engine_expands_videos": True}  # what `vica2 serve` sets for every chat


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from vllm import LLM

    folder = tiny_model.servable_copy(tmp_path_factory.mktemp("tiny") / "model")
    samples = tiny_model.demo_samples(folder)
    engine = LLM(**engine_kwargs(folder, allowed_local_media_path=str(Path(samples[0]["video"]).parent),
                                 media_io_kwargs={"video": {"num_frames": tiny_model.FRAMES}}))
    yield folder, samples, engine
    del engine


def test_the_built_in_tiny_model_serves_and_answers_its_demo_clip_right(served):
    folder, samples, engine = served
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)  # our own copy's code
    assert processor.add_time_instruction is False
    for sample in samples:
        question = {"type": "text", "text": sample["prompt"]}
        chat = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{sample['video']}"}},
                                             question]}]
        output = engine.chat(chat, greedy(8), use_tqdm=False, chat_template_kwargs=PLUGIN_CHAT)[0]
        expected = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "video", "path": sample["video"]}, question]}],
            add_generation_prompt=True, tokenize=True, return_dict=True, num_frames=tiny_model.FRAMES)
        assert list(output.prompt_token_ids) == list(expected["input_ids"][0])
        assert output.outputs[0].text.strip() == sample["answer"], sample["question"]

