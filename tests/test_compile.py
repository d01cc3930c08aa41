"""Static-cache `generate` with `torch.compile(fullgraph=True)`: the decode step compiles as one graph (no host read,
no value-dependent branch) and gives exactly the eager tokens, for video, image and text prompts and a batch."""

from __future__ import annotations

import pytest
import torch

from conftest import (
    FIXTURE_IMAGE_TOKEN_ID,
    FIXTURE_VIDEO_TOKEN_ID,
    fixture_model_inputs,
    fixture_prompt_ids,
    fixture_sample,
    random_video_pixels,
    tiny_model,
)
from transformers import CompileConfig


NEW_TOKENS = 4
PAD = 0

if not hasattr(CompileConfig, "_compile_all_devices"):
    pytest.skip("this transformers cannot force generate's compilation on the CPU", allow_module_level=True)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=11)


def _prompts(model) -> dict:
    """(ids row, pixel inputs) per modality. A 56 x 56 image is one base view plus a 1 x 1 tile grid."""
    config = model.config
    siglip, hiera = random_video_pixels(config, 4, seed=3)
    generator = torch.Generator().manual_seed(4)
    image = dict(
        pixel_values=torch.randn(1, 2, 3, 56, 56, generator=generator),
        image_sizes=torch.tensor([[56, 56]]),
        hiera_pixel_values=torch.randn(1, 3, 64, 64, generator=generator),
    )
    video_row = [5, 6] + [FIXTURE_VIDEO_TOKEN_ID] * sum(config.num_video_tokens(4)) + [7]
    image_row = [8] + [FIXTURE_IMAGE_TOKEN_ID] * sum(config.num_image_tokens(56, 56)) + [9, 10]
    return {
        "video": ([video_row], dict(pixel_values_videos=siglip, hiera_pixel_values_videos=hiera)),
        "image": ([image_row], image),
        "text": ([[11, 12, 13, 14]], {}),
        "batch": ([video_row, [15, 16, 17], image_row],
                  dict(pixel_values_videos=siglip, hiera_pixel_values_videos=hiera, **image)),
    }


def _inputs(rows, pixels) -> dict:
    """Left-padded ids and mask for `rows`, with their pixels."""
    length = max(map(len, rows))
    ids = torch.tensor([[PAD] * (length - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows])
    return dict(input_ids=ids, attention_mask=mask, **pixels)


def _generate(model, inputs, compile_config=None, new_tokens=NEW_TOKENS, **options) -> tuple[torch.Tensor, int]:
    """Greedy static-cache generation; returns the tokens and how many steps ran through the compiled forward."""
    compiled_steps = []
    library_get_compiled_call = model.get_compiled_call

    def counting_compiled_call(config):
        compiled = library_get_compiled_call(config)

        def call(*args, **kwargs):
            compiled_steps.append(1)
            return compiled(*args, **kwargs)

        return call

    model.get_compiled_call = counting_compiled_call
    try:
        tokens = model.generate(
            **{"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "pad_token_id": PAD, **options, **inputs},
            do_sample=False, cache_implementation="static", compile_config=compile_config,
        )
    finally:
        del model.get_compiled_call
    return tokens, len(compiled_steps)


def _forced_compile_config(backend: str) -> CompileConfig:
    config = CompileConfig(fullgraph=True, backend=backend)
    # transformers compiles `generate`'s decode step by itself only on accelerators; this private flag (5.17+) lifts
    # that for the test, exactly as a CUDA device would.
    config._compile_all_devices = True
    return config


def _assert_compiled_equals_eager(model, name: str, backend: str):
    inputs = _inputs(*_prompts(model)[name])
    torch._dynamo.reset()
    eager, eager_steps = _generate(model, inputs)
    compiled, compiled_steps = _generate(model, inputs, _forced_compile_config(backend))
    assert eager_steps == 0
    # Every decode step (all tokens after the first, which prefill makes in eager mode) ran compiled.
    assert compiled_steps == NEW_TOKENS - 1
    assert compiled.tolist() == eager.tolist()


@pytest.mark.parametrize("name", ["video", "image", "text", "batch"])
def test_fullgraph_compiled_decode_gives_the_eager_tokens(model, name):
    """Dynamo captures the whole decode step (`fullgraph=True` raises on any graph break); the "eager" backend then
    runs the captured graph as is, so the tokens must be identical."""
    _assert_compiled_equals_eager(model, name, "eager")


@pytest.mark.parametrize("name", ["video", "image"])
def test_fullgraph_compiled_decode_reproduces_the_release_on_the_fixture(fixture_model, name):
    """The release's own greedy answer (the fixture's generated_ids), through the compiled static-cache decode."""
    sample = fixture_sample(name)
    ids = fixture_prompt_ids(sample, name)
    inputs = dict(input_ids=ids, **fixture_model_inputs(sample, name))
    expected = sample["generated_ids"]
    torch._dynamo.reset()
    compiled, steps = _generate(fixture_model, inputs, _forced_compile_config("eager"), new_tokens=len(expected),
                                min_new_tokens=0, eos_token_id=382, pad_token_id=380)
    assert steps == len(expected) - 1
    assert compiled[0, ids.shape[1]:].tolist() == expected


@pytest.mark.slow
def test_inductor_compiled_decode_gives_the_eager_tokens(model):
    """The default backend, as `generate` uses it on a GPU, on the mixed batch (about a minute on a CPU)."""
    _assert_compiled_equals_eager(model, "batch", "inductor")


def test_decode_step_reads_nothing_back_from_the_device(model):
    """Our part of a forward on a filled static cache without pixels (everything but the library's language model)
    runs no host read (`.item()`, `.tolist()`, `bool(tensor)`, ...): the prefill checks are not repeated there."""
    from transformers import StaticCache
    from vica2.modeling_vica2 import CACHE_NAME

    inputs = _inputs(*_prompts(model)["video"])
    length = inputs["input_ids"].shape[1]
    cache = StaticCache(config=model.config.text_config, max_cache_len=length + 2)
    refusal = _HostReadsRefused()
    hooks = [model.model.language_model.register_forward_pre_hook(lambda *args: refusal.pause()),
             model.model.language_model.register_forward_hook(lambda *args: refusal.resume())]
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=True, **{CACHE_NAME: cache})
            step = dict(input_ids=out.logits[:, -1:].argmax(-1), position_ids=torch.tensor([[length]]),
                        attention_mask=torch.ones(1, length + 1, dtype=torch.long), use_cache=True,
                        **{CACHE_NAME: cache})
            with refusal:
                model(**step)
    finally:
        for hook in hooks:
            hook.remove()
    assert refusal.resumed  # the refusal was really active around the language model


class _HostReadsRefused:
    """While active (and not paused), `Tensor.item` / `tolist` / `__bool__` / `__int__` / `__index__` raise."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__index__")

    def __init__(self):
        self.saved, self.resumed = {name: getattr(torch.Tensor, name) for name in self.NAMES}, False

    def __enter__(self):
        def refuse(*args, **kwargs):
            raise AssertionError("a host read (device sync) in the decode step")

        self.active = True
        for name in self.NAMES:
            setattr(torch.Tensor, name, refuse)

    def __exit__(self, *exc):
        self.pause()
        self.active = False

    def pause(self):
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)

    def resume(self):
        if getattr(self, "active", False):
            self.resumed = True
            self.__enter__()
