"""generate(): parity with the release, batching, decoding strategies, streaming, placement, quantization."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from conftest import (
    FIXTURE_VIDEO_TOKEN_ID,
    fixture_model_inputs,
    fixture_prompt_ids,
    fixture_sample,
    random_video_pixels,
    requires_fixture,
    tiny_model,
    token_ratio,
)
from vica2.modeling_vica2 import Vica2ForConditionalGeneration


PAD = 0
V = FIXTURE_VIDEO_TOKEN_ID


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=11)


def _video_row(model, num_frames, prefix, suffix, num_videos=1):
    n = sum(model.config.num_video_tokens(num_frames))
    ids = list(prefix)
    for _ in range(num_videos):
        ids += [V] * n + list(suffix)
    return ids


def _left_pad(rows):
    length = max(map(len, rows))
    ids = torch.tensor([[PAD] * (length - len(r)) + r for r in rows])
    return ids, torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])


@requires_fixture
@pytest.mark.parametrize("name", ["video", "image"])
def test_greedy_matches_the_release(fixture_model, name):
    sample = fixture_sample(name)
    ids = fixture_prompt_ids(sample, name)
    out = fixture_model.generate(
        input_ids=ids, **fixture_model_inputs(sample, name), max_new_tokens=6, do_sample=False,
        eos_token_id=382, pad_token_id=380,
    )
    assert out[0, ids.shape[1]:].tolist() == sample["generated_ids"]


def test_vision_towers_run_only_at_prefill(model):
    siglip, hiera = random_video_pixels(model.config, 4)
    calls = {"siglip": 0, "hiera": 0}
    hooks = [
        model.model.vision_tower.register_forward_hook(lambda *a: calls.__setitem__("siglip", calls["siglip"] + 1)),
        model.model.hiera_tower.register_forward_hook(lambda *a: calls.__setitem__("hiera", calls["hiera"] + 1)),
    ]
    try:
        ids = torch.tensor([_video_row(model, 4, [5, 6], [7])])
        out = model.generate(input_ids=ids, pixel_values_videos=siglip, hiera_pixel_values_videos=hiera,
                             max_new_tokens=5, min_new_tokens=5, do_sample=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert out.shape[1] == ids.shape[1] + 5
    # One chunk of frames per tower, once: the decode steps reuse the KV cache.
    assert calls == {"siglip": 1, "hiera": 1}


def test_left_padded_mixed_batch_equals_each_row_alone(model):
    config = model.config
    siglip, hiera = random_video_pixels(config, 4, num_videos=2, seed=2)
    rows = [_video_row(model, 4, [5, 6], [7, 8]), [9, 10, 11], _video_row(model, 4, [12], [13, 14, 15])]
    ids, mask = _left_pad(rows)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=PAD)
    batched = model.generate(input_ids=ids, attention_mask=mask, pixel_values_videos=siglip,
                             hiera_pixel_values_videos=hiera, **kwargs)
    pixels = [dict(pixel_values_videos=siglip[:1], hiera_pixel_values_videos=hiera[:1]), {},
              dict(pixel_values_videos=siglip[1:], hiera_pixel_values_videos=hiera[1:])]
    for row, (ids_row, pixel_row) in enumerate(zip(rows, pixels)):
        single = model.generate(input_ids=torch.tensor([ids_row]), **pixel_row, **kwargs)
        assert batched[row, -6:].tolist() == single[0, -6:].tolist()


def test_beam_search_keeps_each_rows_items_together(model):
    siglip, hiera = random_video_pixels(model.config, 4, num_videos=3, seed=4)
    rows = [_video_row(model, 4, [5], [6], num_videos=2), [8, 9, 10], _video_row(model, 4, [11], [12])]
    ids, mask = _left_pad(rows)
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False,
                  pad_token_id=PAD)
    batched = model.generate(input_ids=ids, attention_mask=mask, pixel_values_videos=siglip,
                             hiera_pixel_values_videos=hiera, **kwargs)
    first = model.generate(input_ids=torch.tensor([rows[0]]), pixel_values_videos=siglip[:2],
                           hiera_pixel_values_videos=hiera[:2], **kwargs)
    last = model.generate(input_ids=torch.tensor([rows[2]]), pixel_values_videos=siglip[2:],
                          hiera_pixel_values_videos=hiera[2:], **kwargs)
    assert batched[:2, -4:].tolist() == first[:, -4:].tolist()
    assert batched[4:, -4:].tolist() == last[:, -4:].tolist()


def test_sampling_is_seeded_and_overrides_pass_through(model):
    siglip, hiera = random_video_pixels(model.config, 4)
    overrides = dict(hiera_frames=8, hiera_pool_stride=1)
    n = sum(model.config.num_video_tokens(4, **overrides))
    ids = torch.tensor([[5] + [V] * n + [6]])
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(model.generate(input_ids=ids, pixel_values_videos=siglip, hiera_pixel_values_videos=hiera,
                                   do_sample=True, top_k=50, temperature=1.5, max_new_tokens=8,
                                   video_token_ratio=token_ratio(model.config, **overrides)))
    assert torch.equal(runs[0], runs[1]) and runs[0].shape[1] > ids.shape[1]


def test_generate_refuses_a_mask_of_the_wrong_length(model):
    """`generate` made positions from the mask and then dropped it (all ones): a longer mask shifted every position
    silently, a shorter one failed deep in the rotary embedding."""
    ids = torch.tensor([[5, 6, 7]])
    for length in (2, 5):
        with pytest.raises(ValueError, match=rf"`attention_mask` has shape \(1, {length}\) but `input_ids` has shape"):
            model.generate(input_ids=ids, attention_mask=torch.ones(1, length, dtype=torch.long), max_new_tokens=1)
    out = model.generate(input_ids=ids, attention_mask=torch.ones(1, 3, dtype=torch.long), max_new_tokens=1,
                         do_sample=False)
    assert out.shape == (1, 4)


def test_text_iterator_streamer(model):
    from transformers import TextIteratorStreamer

    class IdTokenizer:  # the streamer only needs `decode`
        def decode(self, ids, **kwargs):
            return "".join(f"<{i}>" for i in ids)

    streamer = TextIteratorStreamer(IdTokenizer(), skip_prompt=True)
    siglip, hiera = random_video_pixels(model.config, 2)
    ids = torch.tensor([_video_row(model, 2, [5], [6])])
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=model.generate(
        input_ids=ids, pixel_values_videos=siglip, hiera_pixel_values_videos=hiera, max_new_tokens=4,
        min_new_tokens=4, do_sample=False, streamer=streamer)))
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed == "".join(f"<{i}>" for i in result["out"][0, ids.shape[1]:].tolist())


def test_offloaded_model_generates_the_same_tokens(model, tmp_path):
    model.save_pretrained(tmp_path / "model")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    offloaded = Vica2ForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": int(size * 0.4)},
        offload_folder=str(tmp_path / "offload"), attn_implementation="eager",
    )
    placements = set(offloaded.hf_device_map.values())
    assert "disk" in placements and "cpu" in placements
    # Blocks are never split: every tower block sits whole on one device.
    assert all(not key.count(".") > 3 for key in offloaded.hf_device_map)
    siglip, hiera = random_video_pixels(model.config, 4, seed=6)
    ids = torch.tensor([_video_row(model, 4, [5], [6])])
    kwargs = dict(input_ids=ids, pixel_values_videos=siglip, hiera_pixel_values_videos=hiera, max_new_tokens=5,
                  min_new_tokens=5, do_sample=False)
    assert offloaded.generate(**kwargs).tolist() == model.generate(**kwargs).tolist()


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_quantizes_only_the_language_model(model, tmp_path, bits, caplog):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    model.save_pretrained(tmp_path / "model")
    quantization = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                       bnb_4bit_compute_dtype=torch.float32)
                    if bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
    quantized = Vica2ForConditionalGeneration.from_pretrained(tmp_path / "model", quantization_config=quantization)
    expected = "Linear4bit" if bits == 4 else "Linear8bitLt"
    llm_linears = {type(m).__name__ for n, m in quantized.named_modules()
                   if n.startswith("model.language_model.layers") and n.endswith(("q_proj", "down_proj"))}
    assert llm_linears == {expected}
    kept = [m for n, m in quantized.named_modules()
            if n.startswith(tuple(Vica2ForConditionalGeneration.quantization_skip_modules())) and hasattr(m, "weight")]
    assert kept and all(type(m).__name__ in ("Linear", "Conv2d", "LayerNorm", "Embedding") for m in kept)
    assert type(quantized.lm_head) is torch.nn.Linear
    siglip, hiera = random_video_pixels(model.config, 2)
    ids = torch.tensor([_video_row(model, 2, [5], [6])])
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"):
        out = quantized.generate(input_ids=ids, pixel_values_videos=siglip, hiera_pixel_values_videos=hiera,
                                 max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3
    # bitsandbytes' own notices reach the caller unfiltered: the model installs no log or warning filter.
    casts = [r for r in caplog.records if r.getMessage().startswith("MatMul8bitLt: inputs will be cast")]
    assert (len(casts) > 0) == (bits == 8)
    assert not logging.getLogger("bitsandbytes.autograd._functions").filters


def test_quantization_skip_list_has_full_prefixes():
    from vica2.modeling_vica2 import Vica2Model

    assert Vica2ForConditionalGeneration.quantization_skip_modules() == [
        "model.vision_tower", "model.hiera_tower", "model.multi_modal_projector", "model.hiera_projector", "lm_head"
    ]
    assert Vica2Model.quantization_skip_modules() == [
        "vision_tower", "hiera_tower", "multi_modal_projector", "hiera_projector"
    ]
