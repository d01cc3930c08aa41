"""Vica2Config refuses settings the model cannot honour, from the constructor, from_dict / from_pretrained and on
assignment, without getting in the way of the library's own round trips."""

from __future__ import annotations

import copy
import json

import pytest

from conftest import FIXTURE_IMAGE_TOKEN_ID, FIXTURE_VIDEO_TOKEN_ID, tiny_config
from vica2.configuration_vica2 import Vica2Config, Vica2ConfigError


VOCAB = 420  # tiny_config's text_config.vocab_size

BAD_SETTINGS = [
    ({"image_token_id": FIXTURE_VIDEO_TOKEN_ID}, "both"),  # equal to video_token_id
    ({"video_token_id": FIXTURE_IMAGE_TOKEN_ID}, "both"),
    ({"image_token_id": VOCAB}, "image_token_id"),
    ({"video_token_id": -1}, "video_token_id"),
    ({"image_token_id": 383.0}, "image_token_id"),
    ({"video_token_id": "384"}, "video_token_id"),
    ({"image_token_id": True}, "image_token_id"),
    ({"generatable_vocab_size": 0}, "generatable_vocab_size"),
    ({"generatable_vocab_size": -5}, "generatable_vocab_size"),
    ({"generatable_vocab_size": VOCAB + 1}, "generatable_vocab_size"),
    ({"generatable_vocab_size": 383.5}, "generatable_vocab_size"),
    ({"hiera_feature_stage": "4"}, "hiera_feature_stage must be an integer"),
    ({"hiera_feature_stage": 4.0}, "hiera_feature_stage must be an integer"),
    ({"hiera_feature_stage": True}, "hiera_feature_stage must be an integer"),
    ({"hiera_feature_stage": None}, "hiera_feature_stage must be an integer"),
    ({"hiera_feature_stage": 0}, "hiera_feature_stage=0 is out of range"),
    ({"hiera_feature_stage": 5}, "hiera_feature_stage=5 is out of range"),
    ({"image_grid_pinpoints": [[224]]}, "image_grid_pinpoints"),
    ({"image_grid_pinpoints": 224}, "image_grid_pinpoints"),
    ({"text_config": {"model_type": "qwen2", "vocab_size": "420"}}, "text_config"),
]
IDS = [f"{next(iter(s))}={next(iter(s.values()))!r}"[:40] for s, _ in BAD_SETTINGS]


@pytest.mark.parametrize(("settings", "message"), BAD_SETTINGS, ids=IDS)
def test_constructor_and_from_dict_refuse(settings, message):
    with pytest.raises(Vica2ConfigError, match=message):
        tiny_config(**settings)
    # from_dict (what from_pretrained uses) builds through the constructor: a stored bad value is refused too.
    stored = {**tiny_config().to_dict(), **settings}
    stored.pop("spatial_projector_input_size")  # derived from the stage when not stored
    with pytest.raises(ValueError, match=message):
        Vica2Config.from_dict(stored)


def test_errors_are_value_errors_and_type_errors():
    # ValueError is what callers catch for a bad setting; a wrong type is also a TypeError.
    with pytest.raises(ValueError):
        tiny_config(hiera_feature_stage="4")
    with pytest.raises(TypeError):
        tiny_config(hiera_feature_stage="4")


def test_from_pretrained_refuses_a_stored_bad_value(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    for field, value in (("video_token_id", FIXTURE_IMAGE_TOKEN_ID), ("hiera_feature_stage", 9),
                         ("generatable_vocab_size", 0), ("image_token_id", 10**6)):
        (tmp_path / "config.json").write_text(json.dumps({**stored, field: value}))
        with pytest.raises(ValueError, match=field if field != "video_token_id" else "both"):
            Vica2Config.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hiera_feature_stage", 3, "spatial_projector_input_size"),  # the projector was trained for stage 4
        ("hiera_feature_stage", 7, "out of range"),
        ("hiera_feature_stage", "4", "must be an integer"),
        ("image_token_id", FIXTURE_VIDEO_TOKEN_ID, "both"),
        ("video_token_id", VOCAB + 10, "video_token_id"),
        ("generatable_vocab_size", VOCAB + 1, "generatable_vocab_size"),
        ("generatable_vocab_size", 0, "generatable_vocab_size"),
        ("siglip_pool_stride", 0, "siglip_pool_stride"),
        ("video_pool_mode", "nearest", "video_pool_mode"),
    ],
)
def test_assignment_after_construction_is_refused_and_keeps_the_old_value(field, value, message):
    config = tiny_config()
    before = getattr(config, field)
    with pytest.raises(Vica2ConfigError, match=message):
        setattr(config, field, value)
    assert getattr(config, field) == before
    config.validate()  # still a valid config


def test_from_pretrained_and_from_dict_overrides_are_checked(tmp_path):
    config = tiny_config()
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="hiera_feature_stage"):
        Vica2Config.from_pretrained(tmp_path, hiera_feature_stage=9)
    with pytest.raises(ValueError, match="spatial_projector_input_size"):
        Vica2Config.from_pretrained(tmp_path, hiera_feature_stage=3)
    with pytest.raises(ValueError, match="both"):
        Vica2Config.from_dict(config.to_dict(), video_token_id=FIXTURE_IMAGE_TOKEN_ID)
    # A valid override is applied.
    assert Vica2Config.from_pretrained(tmp_path, generatable_vocab_size=383).generatable_vocab_size == 383


def test_round_trips_and_coupled_updates_still_work(tmp_path):
    config = tiny_config(generatable_vocab_size=383)
    config.save_pretrained(tmp_path)
    loaded = Vica2Config.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert not any(key.startswith("_vica2") for key in json.loads((tmp_path / "config.json").read_text()))
    assert copy.deepcopy(loaded).to_dict() == loaded.to_dict()
    # Valid assignments pass, also the library's own (use_cache, dtype) and a token-ratio pair changed one at a
    # time through an intermediate state (budget 16 over hiera_frames 4, then hiera_frames 8).
    loaded.use_cache = False
    loaded.generatable_vocab_size = None
    loaded.video_frames_budget = 16
    loaded.hiera_frames = 8
    loaded.save_pretrained(tmp_path / "again")
    assert Vica2Config.from_pretrained(tmp_path / "again").hiera_frames == 8
    # A pair left inconsistent is caught when saving (and by every call that uses it).
    loaded.hiera_frames = 5
    with pytest.raises(ValueError, match="multiple of hiera_frames"):
        loaded.save_pretrained(tmp_path / "bad")


def test_generation_config_from_model_config():
    from transformers import GenerationConfig

    generation = GenerationConfig.from_model_config(tiny_config())
    assert generation.eos_token_id == tiny_config().text_config.eos_token_id


def test_default_config_is_valid():
    config = Vica2Config()
    assert (config.image_token_id, config.video_token_id) == (151646, 151647)
    config.validate()
