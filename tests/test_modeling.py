"""Core model: parity with the research release (fixture A), token layout, batching, errors, loading."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import (
    FIXTURE_7B_KEYS,
    FIXTURE_DIR,
    FIXTURE_IMAGE_TOKEN_ID,
    FIXTURE_VIDEO_TOKEN_ID,
    REPO_ROOT,
    expand_release_ids,
    expand_release_labels,
    fixture_model_inputs,
    fixture_sample,
    load_fixture_model,
    random_video_pixels,
    requires_fixture,
    tiny_config,
    tiny_model,
    token_ratio,
)
from vica2.configuration_vica2 import Vica2Config, anyres_feature_shape
from vica2.convert_checkpoint import release_key_to_hub
from vica2.modeling_vica2 import CACHE_NAME, Vica2ForConditionalGeneration


TOKEN_ID = {"video": FIXTURE_VIDEO_TOKEN_ID, "image": FIXTURE_IMAGE_TOKEN_ID}


# ----------------------------------------------------------------------------------------------- config
def test_default_config_is_vica2_7b():
    config = Vica2Config()
    assert config.text_config.hidden_size == 3584 and config.text_config.num_hidden_layers == 28
    assert config.text_config.num_key_value_heads == 4 and config.text_config.vocab_size == 152064
    assert config.text_config.rope_parameters["rope_theta"] == 1e6
    assert config.vision_config.num_hidden_layers == 26 and config.vision_config.hidden_size == 1152
    assert config.hiera_config.embed_dim_per_stage == [112, 224, 448, 896]
    assert config.hiera_config.global_attention_blocks == [12, 16, 20]
    assert (config.siglip_grid, config.hiera_grid, config.spatial_projector_input_size) == (27, 32, 896)
    # The paper's numbers: 64 frames -> 13,440 SigLIP + 8,704 Hiera tokens (22,144; ratio ~1.54).
    assert config.num_video_tokens(64) == (13440, 8704)
    # A single image: 729 base tokens + unpadded anyres grid with newlines; Hiera un-pooled 32 x 33.
    assert config.num_image_tokens(300, 500) == (729 + 27 * 47, 1056)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"hiera_feature_stage": 5}, "hiera_feature_stage"),
        ({"hiera_feature_stage": 0}, "hiera_feature_stage"),
        ({"hiera_feature_stage": 3}, "spatial_projector_input_size"),  # 448 channels vs a 896-wide projector
        ({"spatial_projector_input_size": 448}, "spatial_projector_input_size"),
        ({"siglip_pool_stride": 0}, "siglip_pool_stride"),
        ({"hiera_pool_stride": -1}, "hiera_pool_stride"),
        ({"hiera_frames": 24}, "video_frames_budget"),  # 64 is not a multiple of 24
        ({"hiera_frames": 128}, "video_frames_budget"),
        ({"video_pool_mode": "nearest"}, "video_pool_mode"),
        ({"vision_aspect_ratio": "anyres"}, "vision_aspect_ratio"),
        ({"vision_chunk_size": 0}, "vision_chunk_size"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    base = {"spatial_projector_input_size": 896} if "hiera_feature_stage" in overrides else {}
    with pytest.raises(ValueError, match=field):
        Vica2Config(**{**base, **overrides})


@pytest.mark.parametrize("value, ok", [(3, True), (np.int64(3), True), (torch.tensor(3), True), (0, False),
                                       (-2, False), (2.0, False), (True, False), (torch.tensor(2.0), False)])
def test_positive_int_accepts_integer_likes_only(value, ok):
    from vica2.configuration_vica2 import positive_int

    if ok:
        assert positive_int("x", value) == int(value)
    else:
        with pytest.raises(ValueError, match="x must be a positive integer"):
            positive_int("x", value)


def test_stage_change_with_matching_projector_is_valid():
    config = Vica2Config(hiera_feature_stage=3)  # projector width follows the stage when not stored
    assert config.spatial_projector_input_size == 448 and config.hiera_grid == 64
    assert config.num_video_tokens(64) == (13440, 32 * 32 * 33)


def test_config_round_trip(tmp_path):
    config = tiny_config(hiera_frames=2, siglip_pool_stride=1, video_pool_mode="average")
    config.save_pretrained(tmp_path)
    loaded = Vica2Config.from_pretrained(tmp_path)
    for name in ("hiera_frames", "siglip_pool_stride", "video_pool_mode", "image_grid_pinpoints", "image_token_id"):
        assert getattr(loaded, name) == getattr(config, name)
    assert loaded.hiera_config.embed_dim_per_stage == config.hiera_config.embed_dim_per_stage
    assert loaded.vision_config.image_size == config.vision_config.image_size
    assert loaded.text_config.num_key_value_heads == config.text_config.num_key_value_heads
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"].endswith(
        "Vica2ForConditionalGeneration"
    )


def test_7b_meta_model_has_exactly_the_release_parameters():
    release = json.loads(FIXTURE_7B_KEYS.read_text())["tensors"]
    config = Vica2Config()
    with torch.device("meta"):
        model = Vica2ForConditionalGeneration(config)
    ours = {name: tuple(p.shape) for name, p in model.named_parameters()}
    mapped, dropped = {}, []
    for tensor in release:
        name = release_key_to_hub(tensor["name"], config.vision_config.num_hidden_layers)
        if name is None:
            dropped.append(tensor["name"])
        else:
            mapped[name] = tuple(tensor["shape"])
    assert dropped == [
        "model.vision_tower.vision_tower.vision_model.post_layernorm.weight",
        "model.vision_tower.vision_tower.vision_model.post_layernorm.bias",
    ]
    assert sorted(set(ours) - set(mapped)) == [] and sorted(set(mapped) - set(ours)) == []
    assert {name: shape for name, shape in mapped.items() if ours[name] != shape} == {}


# ----------------------------------------------------------------------------------------------- parity
def _run_fixture(model, name, *, loss=False):
    sample = fixture_sample(name)
    summary = sample["summary"]
    n_visual = summary["num_siglip_tokens"] + summary["num_hiera_tokens"]
    ids_key, labels = ("loss_input_ids", sample["loss_labels"]) if loss else ("input_ids", None)
    input_ids = torch.tensor([expand_release_ids(sample[ids_key], n_visual, TOKEN_ID[name])])
    kwargs = {}
    if labels is not None:
        kwargs["labels"] = torch.tensor([expand_release_labels(sample[ids_key], labels, n_visual)])
    with torch.no_grad():
        out = model(input_ids=input_ids, **fixture_model_inputs(sample, name), **kwargs)
    return sample, out


@requires_fixture
@pytest.mark.parametrize("name", ["video", "image"])
def test_fixture_tower_and_stream_features(fixture_model, name):
    sample = fixture_sample(name)
    summary = sample["summary"]
    model = fixture_model.model
    with torch.no_grad():
        siglip_tower = model.vision_tower(pixel_values=sample["siglip_pixel_values"]).last_hidden_state
        hiera_pixels = sample["hiera_pixel_values"][::2]  # the release's Hiera frame stride
        hiera_tower = model.hiera_tower(pixel_values=hiera_pixels).intermediate_hidden_states[3].flatten(1, 2)
        inputs = fixture_model_inputs(sample, name)
        if name == "video":
            (features,) = model.get_video_features(inputs["pixel_values_videos"], inputs["hiera_pixel_values_videos"])
        else:
            (features,) = model.get_image_features(
                inputs["pixel_values"], inputs["image_sizes"], inputs["hiera_pixel_values"]
            )
    torch.testing.assert_close(siglip_tower, sample["siglip_tower_features"], atol=1e-4, rtol=0)
    torch.testing.assert_close(hiera_tower, sample["hiera_tower_features"], atol=1e-4, rtol=0)
    n_siglip = summary["num_siglip_tokens"]
    assert features.shape == (n_siglip + summary["num_hiera_tokens"], model.config.text_config.hidden_size)
    torch.testing.assert_close(features[:n_siglip], sample["siglip_features"], atol=1e-4, rtol=0)
    torch.testing.assert_close(features[n_siglip:], sample["hiera_features"], atol=1e-4, rtol=0)


@requires_fixture
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["video", "image"])
def test_fixture_logits_and_loss(name, attn):
    model = load_fixture_model(attn)
    sample, out = _run_fixture(model, name)
    assert out.logits.shape == sample["logits"].shape
    # The release's outputs on its own machine; same maths, other kernels (torch 2.14 vs ours): ~1e-5.
    torch.testing.assert_close(out.logits, sample["logits"], atol=1e-4, rtol=0)
    _, loss_out = _run_fixture(model, name, loss=True)
    assert abs(loss_out.loss.item() - sample["summary"]["loss"]) <= 1e-5


@requires_fixture
def test_fixture_inputs_embeds(fixture_model):
    sample = fixture_sample("video")
    captured = {}
    hook = fixture_model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    try:
        _run_fixture(fixture_model, "video")
    finally:
        hook.remove()
    torch.testing.assert_close(captured["embeds"], sample["inputs_embeds"], atol=1e-4, rtol=0)


@requires_fixture
def test_fixture_is_deterministic(fixture_model):
    # A difference that changes from run to run would point at uninitialised memory.
    _, first = _run_fixture(fixture_model, "image")
    _, second = _run_fixture(fixture_model, "image")
    assert torch.equal(first.logits, second.logits)


@requires_fixture
def test_fixture_right_padded_batch(fixture_model):
    """The fixture's two-sample training batch: same loss as the release, rows equal their single runs."""
    batch = FIXTURE_DIR / "batch"
    summary = json.loads((batch / "summary.json").read_text())
    ids, labels = np.load(batch / "input_ids.npy"), np.load(batch / "labels.npy")
    mask = np.load(batch / "attention_mask.npy")
    samples = {name: fixture_sample(name) for name in ("video", "image")}
    rows_ids, rows_labels = [], []
    for row, name in enumerate(summary["modalities"]):
        n = samples[name]["summary"]["num_siglip_tokens"] + samples[name]["summary"]["num_hiera_tokens"]
        valid = mask[row]
        rows_ids.append(expand_release_ids(ids[row][valid].tolist(), n, TOKEN_ID[name]))
        rows_labels.append(expand_release_labels(ids[row][valid].tolist(), labels[row][valid].tolist(), n))
    length = max(map(len, rows_ids))
    pad = summary["pad_token_id"]
    input_ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows_ids])
    label_ids = torch.tensor([r + [-100] * (length - len(r)) for r in rows_labels])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows_ids])
    assert length == summary["padded_len_after_expansion"]
    video_in = fixture_model_inputs(samples["video"], "video")
    image_in = fixture_model_inputs(samples["image"], "image")
    with torch.no_grad():
        out = fixture_model(
            input_ids=input_ids, attention_mask=attention_mask, labels=label_ids, **video_in, **image_in
        )
    assert abs(out.loss.item() - summary["loss"]) <= 1e-5
    for row, name in enumerate(summary["modalities"]):
        _, single = _run_fixture(fixture_model, name, loss=True)
        n = len(rows_ids[row])
        torch.testing.assert_close(out.logits[row, :n], single.logits[0], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------- token layout
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_frames=st.integers(1, 9),
    hiera_frames=st.sampled_from([1, 2, 4, 8]),
    siglip_pool_stride=st.integers(1, 4),
    hiera_pool_stride=st.integers(1, 2),
    pool_mode=st.sampled_from(["bilinear", "average", "max"]),
)
def test_video_token_count_matches_formula(num_frames, hiera_frames, siglip_pool_stride, hiera_pool_stride, pool_mode):
    model = _small_model(video_pool_mode=pool_mode)
    siglip, hiera = random_video_pixels(model.config, num_frames)
    overrides = dict(hiera_frames=hiera_frames, siglip_pool_stride=siglip_pool_stride,
                     hiera_pool_stride=hiera_pool_stride)
    with torch.no_grad():
        (features,) = model.model.get_video_features(siglip, hiera, token_ratio(model.config, **overrides))
    n_siglip, n_hiera = model.config.num_video_tokens(num_frames, **overrides)
    assert features.shape[0] == n_siglip + n_hiera
    # Independent check of the documented formula.
    p = _pooled(model.config.siglip_grid, siglip_pool_stride, pool_mode)
    q = _pooled(model.config.hiera_grid, hiera_pool_stride, pool_mode)
    k = model.config.video_frames_budget // hiera_frames
    assert n_siglip == num_frames * p * (p + 1) and n_hiera == math.ceil(num_frames / k) * q * (q + 1)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(height=st.integers(20, 400), width=st.integers(20, 400))
def test_image_token_count_matches_formula(height, width):
    model = _small_model()
    inputs = _image_inputs(model.config, height, width)
    with torch.no_grad():
        (features,) = model.model.get_image_features(**inputs)
    assert features.shape[0] == sum(model.config.num_image_tokens(height, width))


def _image_inputs(config, height, width, seed=0):
    """Random model inputs for one image of the given size, with the tile count its anyres grid needs."""
    (rows, cols), _, _ = anyres_feature_shape(
        height, width, config.image_grid_pinpoints, config.vision_config.image_size, config.siglip_grid, 9
    )
    generator = torch.Generator().manual_seed(seed)
    size, hiera_size = config.vision_config.image_size, config.hiera_config.image_size[0]
    return dict(
        pixel_values=torch.randn(1, 1 + rows * cols, 3, size, size, generator=generator),
        image_sizes=torch.tensor([[height, width]]),
        hiera_pixel_values=torch.randn(1, 3, hiera_size, hiera_size, generator=generator),
    )


def _pooled(grid, stride, mode):
    if stride == 1:
        return grid
    return math.ceil(grid / stride) if mode == "bilinear" else grid // stride


_SMALL_MODELS = {}


def _small_model(**overrides):
    key = tuple(sorted(overrides.items()))
    if key not in _SMALL_MODELS:
        _SMALL_MODELS[key] = tiny_model(**overrides)
    return _SMALL_MODELS[key]


def test_image_anyres_unpad_and_downscale():
    # 56 x 336 (6:1) picks the 1x3 grid (4 x 12 features); unpadding to 6:1 keeps int(56 * 12 / 336) = 2 rows.
    config = tiny_config()
    assert config.num_image_tokens(56, 56 * 6) == (16 + 2 * 13, 2 * 3)
    # 6x6 tiles give a 24 x 24 map = 36 base views > 9: downscaled by sqrt(36 / 9) = 2 to 12 x 12.
    config = tiny_config(image_grid_pinpoints=[[56 * r, 56 * c] for r in range(1, 7) for c in range(1, 7)])
    assert config.num_image_tokens(56 * 6, 56 * 6)[0] == 16 + 12 * 13


# ----------------------------------------------------------------------------------------------- chunking, batching
def test_chunked_vision_encoding_equals_unchunked():
    model = _small_model()
    siglip, hiera = random_video_pixels(model.config, 7, seed=3)
    image = _image_inputs(model.config, 100, 150)  # 1 + 2x3 tiles
    with torch.no_grad():
        whole = model.model.get_video_features(siglip, hiera, vision_chunk_size=64)[0]
        image_whole = model.model.get_image_features(**image, vision_chunk_size=64)[0]
        for chunk in (1, 3):
            torch.testing.assert_close(
                model.model.get_video_features(siglip, hiera, vision_chunk_size=chunk)[0], whole, atol=1e-6, rtol=0
            )
            torch.testing.assert_close(
                model.model.get_image_features(**image, vision_chunk_size=chunk)[0], image_whole, atol=1e-6, rtol=0
            )


def test_hiera_accepts_all_frames_or_only_encoded_frames():
    model = _small_model()
    siglip, hiera = random_video_pixels(model.config, 5, seed=1)
    with torch.no_grad():
        from_all = model.model.get_video_features(siglip, hiera)[0]
        from_encoded = model.model.get_video_features(siglip, hiera[:, ::2])[0]
    assert torch.equal(from_all, from_encoded)
    with pytest.raises(ValueError, match="5 SigLIP frames but 2 Hiera frames"):
        model.model.get_video_features(siglip, hiera[:, :2])


def _text_ids(seed, length):
    return torch.randint(0, 370, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_mixed_batch_equals_rows_alone():
    """Video row, image row and text-only row, left-padded, give each row's own logits."""
    model = _small_model()
    config = model.config
    video_s, video_h = random_video_pixels(config, 4, seed=5)
    n_video, n_image = sum(config.num_video_tokens(4)), sum(config.num_image_tokens(100, 150))
    rows = [
        _text_ids(1, 5) + [FIXTURE_VIDEO_TOKEN_ID] * n_video + _text_ids(2, 7),
        _text_ids(3, 3) + [FIXTURE_IMAGE_TOKEN_ID] * n_image + _text_ids(4, 4),
        _text_ids(5, 9),
    ]
    pixel_inputs = [
        dict(pixel_values_videos=video_s, hiera_pixel_values_videos=video_h),
        _image_inputs(config, 100, 150, seed=6),
        {},
    ]
    length = max(map(len, rows))
    input_ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        batched = model(input_ids=input_ids, attention_mask=attention_mask, **pixel_inputs[0], **pixel_inputs[1])
        for row, (ids, pixels) in enumerate(zip(rows, pixel_inputs)):
            single = model(input_ids=torch.tensor([ids]), **pixels)
            torch.testing.assert_close(batched.logits[row, -len(ids):], single.logits[0], atol=2e-5, rtol=0)


def test_per_call_overrides_follow_the_formula():
    model = _small_model()
    siglip, hiera = random_video_pixels(model.config, 6, seed=2)
    overrides = dict(hiera_frames=8, siglip_pool_stride=1, hiera_pool_stride=1)  # k = 1: Hiera sees all 6 frames
    n = sum(model.config.num_video_tokens(6, **overrides))
    ids = torch.tensor([[1, 2] + [FIXTURE_VIDEO_TOKEN_ID] * n + [3]])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values_videos=siglip, hiera_pixel_values_videos=hiera,
                    video_token_ratio=token_ratio(model.config, **overrides))
    assert out.video_hidden_states[0].shape[0] == n == 6 * 4 * 5 + 6 * 2 * 3


# ----------------------------------------------------------------------------------------------- errors
def test_placeholder_count_mismatch_names_both_counts():
    model = _small_model()
    siglip, hiera = random_video_pixels(model.config, 4)
    n = sum(model.config.num_video_tokens(4))
    ids = torch.tensor([[1] + [FIXTURE_VIDEO_TOKEN_ID] * (n - 1) + [2]])
    with pytest.raises(ValueError, match=rf"{n - 1} `<video>` placeholder tokens .* give {n} features"):
        model(input_ids=ids, pixel_values_videos=siglip, hiera_pixel_values_videos=hiera)


def test_items_must_own_their_placeholder_runs():
    model = _small_model()
    siglip, hiera = random_video_pixels(model.config, 4, num_videos=2)
    n = sum(model.config.num_video_tokens(4))
    # Right total, wrong split: 1.5 videos in one run, 0.5 in the other.
    ids = torch.tensor([[1] + [FIXTURE_VIDEO_TOKEN_ID] * (n + n // 2) + [2] + [FIXTURE_VIDEO_TOKEN_ID] * (n - n // 2)])
    with pytest.raises(ValueError, match="do not line up"):
        model(input_ids=ids, pixel_values_videos=siglip, hiera_pixel_values_videos=hiera)


def test_placeholders_without_pixels_are_an_error():
    model = _small_model()
    with pytest.raises(ValueError, match="no pixels were given"):
        model(input_ids=torch.tensor([[1, FIXTURE_IMAGE_TOKEN_ID, 2]]))


def test_placeholders_of_the_other_kind_are_an_error():
    """A `<video>` prompt given only image pixels (or the reverse) would embed its placeholders as text."""
    model = _small_model()
    config = model.config
    siglip, hiera = random_video_pixels(config, 4)
    n_video, n_image = sum(config.num_video_tokens(4)), sum(config.num_image_tokens(100, 150))
    image_row = [1] + [FIXTURE_IMAGE_TOKEN_ID] * n_image + [2]
    with pytest.raises(ValueError, match="`<video>` placeholders but no video pixels"):
        model(input_ids=torch.tensor([image_row + [FIXTURE_VIDEO_TOKEN_ID] * n_video]),
              **_image_inputs(config, 100, 150))
    with pytest.raises(ValueError, match="`<image>` placeholders but no image pixels"):
        model(input_ids=torch.tensor([image_row + [FIXTURE_VIDEO_TOKEN_ID] * n_video]),
              pixel_values_videos=siglip, hiera_pixel_values_videos=hiera)


def _video_call(model, siglip, hiera):
    n = sum(model.config.num_video_tokens(siglip.shape[1]))
    ids = torch.tensor([[1] + [FIXTURE_VIDEO_TOKEN_ID] * n + [2]])
    return model(input_ids=ids, pixel_values_videos=siglip, hiera_pixel_values_videos=hiera)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_non_float_pixels_are_refused(dtype):
    """Raw uint8 frames (or any integer pixels) were cast to float unscaled: wrong logits, no error."""
    model = _small_model()
    siglip, hiera = random_video_pixels(model.config, 2)
    with pytest.raises(TypeError, match=f"`pixel_values_videos` has dtype {dtype}.*Vica2Processor"):
        _video_call(model, (siglip * 40 + 128).clamp(0, 255).to(dtype), hiera)
    with pytest.raises(TypeError, match=f"`hiera_pixel_values` has dtype {dtype}"):
        inputs = _image_inputs(model.config, 60, 60)
        model.model.get_image_features(**{**inputs, "hiera_pixel_values": inputs["hiera_pixel_values"].to(dtype)})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_pixels_are_refused(bad):
    """One NaN / inf pixel made every logit NaN (greedy decoding then emits id 0 forever)."""
    model = _small_model()
    siglip, hiera = random_video_pixels(model.config, 2, num_videos=2)
    hiera[1, 0, 2, 5, 5] = bad
    with pytest.raises(ValueError, match=r"`hiera_pixel_values_videos` contains NaN or infinite values \(item\(s\) 1\)"):
        model.model.get_video_features(siglip, hiera)
    inputs = _image_inputs(model.config, 60, 60)
    inputs["pixel_values"][0, 0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match="`pixel_values` contains NaN or infinite"):
        model.model.get_image_features(**inputs)
    half = siglip[:1].to(torch.bfloat16)  # half-precision pixels are checked too
    half[0, 1, 0, 3, 3] = bad
    with pytest.raises(ValueError, match="`pixel_values_videos` contains NaN or infinite"):
        model.model.get_video_features(half, hiera[:1].nan_to_num().to(torch.bfloat16))


@pytest.mark.parametrize("sizes", [[[0, 60]], [[60, -4]], [[60.5, 60]], [[60]], [60, 60]])
def test_bad_image_sizes_are_named(sizes):
    model = _small_model()
    inputs = _image_inputs(model.config, 60, 60)
    with pytest.raises(ValueError, match="`image_sizes` must"):
        model.model.get_image_features(**{**inputs, "image_sizes": torch.tensor(sizes)})


def test_bad_input_ids_are_named():
    model = _small_model()
    vocab = model.config.text_config.vocab_size
    with pytest.raises(TypeError, match="`input_ids` has dtype torch.float32; token ids must be integers"):
        model(input_ids=torch.tensor([[1.0, 2.0]]))
    for bad in (vocab, -100):
        with pytest.raises(ValueError, match=f"ids from .* the vocabulary has {vocab} tokens"):
            model(input_ids=torch.tensor([[1, bad, 2]]))
    with pytest.raises(TypeError, match="must be a torch tensor"):
        model(input_ids=[[1, 2]])


def test_attention_mask_of_the_wrong_length_is_named():
    model = _small_model()
    ids = torch.tensor([[1, 2, 3, 4]])
    for mask in (torch.ones(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long), torch.ones(2, 4)):
        with pytest.raises(ValueError, match=r"`attention_mask` has shape .* it must be \(1, 4\)"):
            model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"`position_ids` has shape \(1, 3\) but the input has 4 new token"):
        model(input_ids=ids, position_ids=torch.arange(3)[None])
    # After prefill the mask covers the cached tokens too.
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones(1, 4, dtype=torch.long), use_cache=True)
        cache = {CACHE_NAME: getattr(out, CACHE_NAME)}
        model(input_ids=torch.tensor([[5]]), attention_mask=torch.ones(1, 5, dtype=torch.long), **cache)
    with pytest.raises(ValueError, match=r"after 5 cached token\(s\): it must be \(1, 6\)"):
        model(input_ids=torch.tensor([[6]]), attention_mask=torch.ones(1, 1, dtype=torch.long), **cache)


@pytest.mark.parametrize(
    "pixels, message",
    [
        (torch.randn(1, 4, 3, 32, 32), r"\(frames, 3, 56, 56\)"),
        (torch.randn(4, 3, 56, 56), r"num_items, frames, 3, 56, 56"),
        ([torch.randn(0, 3, 56, 56)], "zero frames"),
    ],
)
def test_bad_video_pixels_are_named(pixels, message):
    model = _small_model()
    _, hiera = random_video_pixels(model.config, 4)
    with pytest.raises(ValueError, match=message):
        model.model.get_video_features(pixels, hiera)


def test_bad_overrides_are_rejected():
    model = _small_model()
    siglip, hiera = random_video_pixels(model.config, 4)
    with pytest.raises(ValueError, match="larger than the 2x2 feature grid"):
        _small_model(video_pool_mode="average").model.get_video_features(
            siglip, hiera, token_ratio(model.config, hiera_pool_stride=3))
    with pytest.raises(ValueError, match="siglip_pool_stride"):
        model.model.get_video_features(siglip, hiera, token_ratio(model.config, siglip_pool_stride=0))
    with pytest.raises(ValueError, match="multiple of hiera_frames=3"):
        model.model.get_video_features(siglip, hiera, token_ratio(model.config, hiera_frames=3))


def test_image_tiles_must_match_image_size():
    model = _small_model()
    inputs = _image_inputs(model.config, 100, 150)
    inputs["pixel_values"] = inputs["pixel_values"][:, :5]
    with pytest.raises(ValueError, match=r"1 \+ 2x3 = 7 views, but its `pixel_values` hold 5"):
        model.model.get_image_features(**inputs)


# ----------------------------------------------------------------------------------------------- head behaviour
def test_labels_on_placeholders_are_ignored():
    model = _small_model()
    siglip, hiera = random_video_pixels(model.config, 2)
    n = sum(model.config.num_video_tokens(2))
    ids = torch.tensor([[5, 6] + [FIXTURE_VIDEO_TOKEN_ID] * n + [7, 8, 9]])
    masked = ids.clone()
    masked[ids == FIXTURE_VIDEO_TOKEN_ID] = -100
    with torch.no_grad():
        raw = model(input_ids=ids, labels=ids, pixel_values_videos=siglip, hiera_pixel_values_videos=hiera).loss
        ref = model(input_ids=ids, labels=masked, pixel_values_videos=siglip, hiera_pixel_values_videos=hiera).loss
    assert torch.equal(raw, ref)


def test_generatable_vocab_size_masks_only_the_rows_above_it():
    model = tiny_model(generatable_vocab_size=383)
    reference = tiny_model()
    ids = torch.tensor([_text_ids(7, 6)])
    with torch.no_grad():
        masked, plain = model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert torch.equal(masked[..., :383], plain[..., :383])
    assert torch.isneginf(masked[..., 383:]).all()


def test_logits_to_keep():
    model = _small_model()
    ids = torch.tensor([_text_ids(8, 10)])
    with torch.no_grad():
        full, last = model(input_ids=ids).logits, model(input_ids=ids, logits_to_keep=1).logits
    assert last.shape[1] == 1
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=1e-6, rtol=0)  # a GEMV vs a GEMM row


# ----------------------------------------------------------------------------------------------- loading
def test_missing_weights_and_buffers_are_initialised(tmp_path):
    model = tiny_model(seed=4)
    state = {k: v for k, v in model.state_dict().items() if "image_newline" not in k and "hiera_projector" not in k}
    model.save_pretrained(tmp_path, state_dict=state)
    loaded = Vica2ForConditionalGeneration.from_pretrained(tmp_path)
    fresh = tiny_model(seed=4)
    assert loaded.model.image_newline.abs().max() < 1.0 and loaded.model.image_newline.std() > 0
    for name, buffer in loaded.named_buffers():
        torch.testing.assert_close(buffer, dict(fresh.named_buffers())[name], msg=name)
    for name, param in loaded.named_parameters():
        assert torch.isfinite(param).all(), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_load_in_each_dtype(tmp_path, dtype):
    tiny_model().save_pretrained(tmp_path)
    model = Vica2ForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype).eval()
    assert {p.dtype for p in model.parameters()} == {dtype}
    siglip, hiera = random_video_pixels(model.config, 2)
    n = sum(model.config.num_video_tokens(2))
    ids = torch.tensor([[1] + [FIXTURE_VIDEO_TOKEN_ID] * n + [2]])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values_videos=siglip, hiera_pixel_values_videos=hiera)
    assert out.logits.dtype == dtype and torch.isfinite(out.logits).all()


AUTO_LOAD_SCRIPT = """
import sys, torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText
path = sys.argv[1]
expected = torch.load(sys.argv[2])
config = AutoConfig.from_pretrained(path, trust_remote_code=True)
assert type(config).__name__ == "Vica2Config", type(config)
base = AutoModel.from_pretrained(path, trust_remote_code=True, attn_implementation="eager")
assert type(base).__name__ == "Vica2Model", type(base)
for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
    model = auto.from_pretrained(path, trust_remote_code=True, attn_implementation="eager").eval()
    assert type(model).__name__ == "Vica2ForConditionalGeneration", type(model)
    assert "transformers_modules" in type(model).__module__
    with torch.no_grad():
        logits = model(**expected["inputs"]).logits
    assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
print("ok")
"""


def test_save_then_auto_load_in_fresh_process(tmp_path):
    model = tiny_model(seed=9)
    siglip, hiera = random_video_pixels(model.config, 3)
    n = sum(model.config.num_video_tokens(3))
    inputs = dict(input_ids=torch.tensor([[4] + [FIXTURE_VIDEO_TOKEN_ID] * n + [5, 6]]),
                  pixel_values_videos=siglip, hiera_pixel_values_videos=hiera)
    with torch.no_grad():
        logits = model(**inputs).logits
    model.save_pretrained(tmp_path / "model")
    assert {"modeling_vica2.py", "configuration_vica2.py"} <= {p.name for p in (tmp_path / "model").iterdir()}
    torch.save({"inputs": inputs, "logits": logits}, tmp_path / "expected.pt")
    result = subprocess.run(
        [sys.executable, "-c", AUTO_LOAD_SCRIPT, str(tmp_path / "model"), str(tmp_path / "expected.pt")],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


CHECK_IMPORTS_SCRIPT = """
import sys
for name in ("triton", "av", "bitsandbytes", "peft"):
    sys.modules[name] = None  # as if not installed
from transformers.dynamic_module_utils import check_imports
for path in sys.argv[1:]:
    check_imports(path)
print("ok")
"""


def test_remote_code_files_import_without_optional_packages():
    files = sorted(str(p) for p in REPO_ROOT.glob("*_vica2.py"))
    assert any(f.endswith("modeling_vica2.py") for f in files)
    result = subprocess.run([sys.executable, "-c", CHECK_IMPORTS_SCRIPT, *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_model_imports_without_optional_packages():
    script = textwrap.dedent(
        """
        import sys
        for name in ("triton", "av", "bitsandbytes", "peft"):
            sys.modules[name] = None
        import vica2.modeling_vica2, vica2.configuration_vica2
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


NO_SIDE_EFFECTS_SCRIPT = """
import logging, sys, tempfile, warnings
sys.path.insert(0, sys.argv[1])
# What the model file imports sets filters of its own (torch, numpy, sympy): take the baseline after those.
import torch, transformers
import transformers.models.qwen2.modeling_qwen2, transformers.models.sam2.modeling_sam2
import transformers.models.siglip.modeling_siglip
def state():
    loggers = [name for name in logging.root.manager.loggerDict if name.startswith("bitsandbytes")]
    bnb_filters = {name: list(logging.getLogger(name).filters) for name in loggers}
    return list(warnings.filters), {name: filters for name, filters in bnb_filters.items() if filters}
before = state()
import vica2.modeling_vica2
from conftest import tiny_model
with tempfile.TemporaryDirectory() as path:
    tiny_model().save_pretrained(path)
    vica2.modeling_vica2.Vica2ForConditionalGeneration.from_pretrained(path)
after = state()
assert after == before, (before, after)
print("ok")
"""


def test_importing_and_loading_the_model_changes_no_process_wide_filter():
    """Only the model's own classes get registered: no `warnings` filter, no filter on bitsandbytes' loggers."""
    result = subprocess.run([sys.executable, "-c", NO_SIDE_EFFECTS_SCRIPT, str(REPO_ROOT / "tests")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_scalar_token_ratio_kwargs_are_refused_by_the_model():
    """The processor turns the scalar settings into `video_token_ratio`; the model refuses them instead of ignoring."""
    model = _small_model()
    with pytest.raises(TypeError, match="only as `video_token_ratio`.*processor"):
        model(input_ids=torch.tensor([[1, 2]]), hiera_frames=2)


# ----------------------------------------------------------------------------------------------- serving engines
@pytest.mark.parametrize("model_class", ["Vica2ForConditionalGeneration", "Vica2Model"])
def test_no_ignore_pattern_matches_a_weight_of_the_model(model_class):
    """Loaders skip checkpoint keys that match `_keys_to_ignore_on_load_unexpected` (merged over all sub-models by
    transformers); vLLM drops them outright. A pattern matching one of the model's own weights (the old `^lm_head\\.`
    of Vica2Model, merged into the full model) leaves that weight uninitialised: every logit NaN in vLLM."""
    import re

    import vica2.modeling_vica2 as modeling

    model = getattr(modeling, model_class)(tiny_config())
    patterns = [re.compile(p) for p in (model._keys_to_ignore_on_load_unexpected or ())]
    dropped = sorted(key for key in model.state_dict() if any(p.search(key) for p in patterns))
    assert dropped == []


def test_loading_a_full_checkpoint_keeps_the_head_and_the_base_model_leaves_it(tmp_path, caplog):
    from vica2.modeling_vica2 import Vica2Model

    model = tiny_model(seed=3)
    model.save_pretrained(tmp_path)
    loaded = Vica2ForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    with caplog.at_level("WARNING"):
        base = Vica2Model.from_pretrained(tmp_path)
    assert "lm_head" not in caplog.text  # the head is left behind by design, not reported as unexpected
    assert torch.equal(base.language_model.norm.weight, model.model.language_model.norm.weight)


def test_serving_engine_calling_conventions():
    """vLLM's Transformers backend calls `get_*_features(..., return_dict=True)` and reads `.pooler_output`, calls
    `Vica2Model.forward(..., return_dict=False)` and reads `[0]`, and batches videos of different requests with one
    `video_token_ratio` row per video."""
    model = tiny_model(seed=5)
    config = model.config
    siglip, hiera = random_video_pixels(config, 8, num_videos=2)
    plain = model.model.get_video_features(siglip, hiera)
    wrapped = model.model.get_video_features(siglip, hiera, return_dict=True).pooler_output
    assert all(torch.equal(a, b) for a, b in zip(plain, wrapped, strict=True))
    # Row 0: the defaults; row 1: a token-ratio override. Each equals the video computed alone with its settings.
    ratio = torch.tensor([[8, 4, 2, 2], [8, 2, 1, 2]])
    batched = model.model.get_video_features(siglip, hiera, video_token_ratio=ratio)
    alone = model.model.get_video_features(
        siglip[1:], hiera[1:], token_ratio(config, hiera_frames=2, siglip_pool_stride=1))[0]
    assert torch.equal(batched[0], plain[0]) and torch.equal(batched[1], alone)
    assert batched[1].shape[0] == sum(config.num_video_tokens(8, hiera_frames=2, siglip_pool_stride=1))
    with pytest.raises(ValueError, match="one row of 4 settings"):
        model.model.get_video_features(siglip, hiera, video_token_ratio=ratio[:1])
    n = sum(config.num_video_tokens(8))
    ids = torch.tensor([[4] + [FIXTURE_VIDEO_TOKEN_ID] * n + [5]])
    with torch.no_grad():
        as_dict = model.model(input_ids=ids, pixel_values_videos=siglip[:1], hiera_pixel_values_videos=hiera[:1])
        as_tuple = model.model(input_ids=ids, pixel_values_videos=siglip[:1], hiera_pixel_values_videos=hiera[:1],
                               return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], as_dict.last_hidden_state)
    images = model.model.get_image_features(torch.randn(1, 2, 3, 56, 56), torch.tensor([[56, 56]]),
                                            torch.randn(1, 3, 64, 64), return_dict=True)
    assert images.pooler_output[0].shape[0] == sum(config.num_image_tokens(56, 56))
