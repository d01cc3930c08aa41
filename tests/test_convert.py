"""The converter: release folders (and ViCA2-init parts) in, hub folders out; every error path refuses cleanly."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, save_torch_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import (
    FIXTURE_7B_KEYS,
    FIXTURE_DIR,
    FIXTURE_IMAGE_TOKEN_ID,
    FIXTURE_VIDEO_TOKEN_ID,
    REPO_ROOT,
    expand_release_ids,
    fixture_model_inputs,
    fixture_sample,
    requires_fixture,
)
from vica2 import convert_checkpoint as cc
from vica2.configuration_vica2 import Vica2Config


pytestmark = requires_fixture

FIXTURE_TOKENIZER_SIZE = 383
SAM_PREFIX = "model.sam_tower.vision_tower."
# The files of the release folder other than its weights (and the reference outputs).
RELEASE_META_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tower_configs.json",
)


# ------------------------------------------------------------------------------------------------ helpers
def fixture_state() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE_DIR / "model.safetensors")


def make_release(
    folder: Path,
    state: dict[str, torch.Tensor] | None = None,
    *,
    weights: str = "safetensors",
    max_shard_size: str = "5GB",
    config_updates: dict | None = None,
) -> Path:
    """A release-layout folder: the fixture's config/tokenizer files with `state` saved in the given format."""
    folder.mkdir(parents=True)
    for name in RELEASE_META_FILES:
        shutil.copyfile(FIXTURE_DIR / name, folder / name)
    if config_updates:
        config = json.loads((folder / "config.json").read_text())
        config.update(config_updates)
        (folder / "config.json").write_text(json.dumps(config))
    state = fixture_state() if state is None else state
    if weights == "safetensors" and max_shard_size == "5GB":
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        save_torch_state_dict(
            state, folder, max_shard_size=max_shard_size, safe_serialization=weights == "safetensors"
        )
    return folder


def converted_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def expected_hub_tensors(state: dict[str, torch.Tensor], num_siglip_layers: int = 2) -> dict[str, torch.Tensor]:
    """The fixture's tensors under our names (what a conversion must write, before any cast)."""
    mapped = {}
    for key, value in state.items():
        target = cc.release_key_to_hub(key, num_siglip_layers)
        if target is not None:
            mapped[target] = value
    return mapped


def staging_dirs(parent: Path) -> list[Path]:
    return sorted(parent.glob(".vica2-convert-*"))


def convert(input_dir: Path, output_dir: Path, **kwargs) -> cc.ConversionResult:
    return cc.convert_checkpoint(input_dir, output_dir, progress=False, **kwargs)


def video_logits(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(our logits, the release's logits) on the fixture's video sample."""
    sample = fixture_sample("video")
    num_visual = sample["inputs_embeds"].shape[1] - len(sample["input_ids"]) + 1
    input_ids = torch.tensor([expand_release_ids(sample["input_ids"], num_visual, FIXTURE_VIDEO_TOKEN_ID)])
    with torch.no_grad():
        logits = model(input_ids=input_ids, **fixture_model_inputs(sample, "video")).logits
    return logits, sample["logits"]


def load_converted(folder: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """The tiny release fixture converted once, as it ships (float32, one shard)."""
    output = tmp_path_factory.mktemp("converted") / "vica2-tiny"
    convert(FIXTURE_DIR, output)
    return output


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", ["video", "image"])
def test_converted_fixture_reproduces_release_logits(converted, name):
    """AutoModelForImageTextToText + AutoProcessor from the converted folder, fed the raw frames and prompt."""
    from transformers import AutoProcessor

    model = load_converted(converted).eval()
    processor = AutoProcessor.from_pretrained(converted, trust_remote_code=True)
    sample = fixture_sample(name)
    token, token_id = ("<video>", FIXTURE_VIDEO_TOKEN_ID) if name == "video" else ("<image>", FIXTURE_IMAGE_TOKEN_ID)
    media = {"videos": [sample["frames_uint8"]]} if name == "video" else {"images": [sample["frames_uint8"][0]]}
    inputs = processor(text=sample["prompt"].replace("<image>", token), **media)
    num_visual = sample["inputs_embeds"].shape[1] - len(sample["input_ids"]) + 1
    assert inputs["input_ids"][0].tolist() == expand_release_ids(sample["input_ids"], num_visual, token_id)
    with torch.no_grad():
        logits = model(**inputs).logits
    # Over the tokenizer's ids; the rest are masked (never generated), as the release's shrunk embedding did.
    diff = (logits[..., :FIXTURE_TOKENIZER_SIZE] - sample["logits"][..., :FIXTURE_TOKENIZER_SIZE]).abs().max()
    assert diff <= 1e-4
    assert torch.isneginf(logits[..., FIXTURE_TOKENIZER_SIZE:]).all()


def test_converted_weights_equal_the_release_weights(converted):
    written = converted_tensors(converted)
    expected = expected_hub_tensors(fixture_state())
    assert written.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(written[name], value), name


# ------------------------------------------------------------------------------------------------ folder layout
def test_converted_folder_has_full_auto_map_and_generation_config(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "vica2"
    assert config["auto_map"] == {**cc.MODEL_AUTO_MAP, **cc.PROCESSOR_AUTO_MAP}
    assert config["dtype"] == "float32"
    assert config["architectures"] == ["Vica2ForConditionalGeneration"]
    assert (config["image_token_id"], config["video_token_id"]) == (FIXTURE_IMAGE_TOKEN_ID, FIXTURE_VIDEO_TOKEN_ID)
    generation = json.loads((converted / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 382  # <|im_end|>
    assert generation["pad_token_id"] == 380  # <|endoftext|>
    assert generation["bos_token_id"] == 380
    # One shard: transformers' single-file layout, no index.
    assert (converted / "model.safetensors").is_file()
    assert not (converted / "model.safetensors.index.json").exists()


def test_converted_folder_ships_exactly_the_remote_code_it_imports(converted):
    shipped = sorted(path.name for path in converted.glob("*.py"))
    assert shipped == sorted(path.name for path in cc.remote_code_files())
    assert "convert_checkpoint.py" not in shipped
    assert {"configuration_vica2.py", "modeling_vica2.py"} <= set(shipped)
    for path in converted.glob("*.py"):
        assert path.read_text() == (REPO_ROOT / path.name).read_text()


def test_remote_code_files_follow_relative_imports(tmp_path):
    (tmp_path / "configuration_vica2.py").write_text("import math\n")
    (tmp_path / "modeling_vica2.py").write_text("from .configuration_vica2 import X\nfrom .kernels_vica2 import k\n")
    (tmp_path / "kernels_vica2.py").write_text("from .kernel_helpers import h\n")
    (tmp_path / "kernel_helpers.py").write_text("")
    (tmp_path / "processing_vica2.py").write_text("from .image_processing_vica2 import P\n")
    (tmp_path / "image_processing_vica2.py").write_text("")
    (tmp_path / "unrelated.py").write_text("")
    names = [path.name for path in cc.remote_code_files(tmp_path)]
    assert sorted(names) == sorted(
        ["configuration_vica2.py", "modeling_vica2.py", "kernels_vica2.py", "kernel_helpers.py",
         "processing_vica2.py", "image_processing_vica2.py"]
    )
    (tmp_path / "kernel_helpers.py").unlink()
    with pytest.raises(cc.ConversionError, match="kernel_helpers.py"):
        cc.remote_code_files(tmp_path)


def test_model_card_metadata_usage_and_token_ratio(converted):
    card = ModelCard.load(converted / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-text-to-text"
    assert card.data.license == "apache-2.0"
    assert list(card.data.base_model) == list(cc.DEFAULT_BASE_MODELS)
    assert "trust_remote_code=True" in card.text and "AutoProcessor" in card.text
    # The fixture's token layout at the full 64-frame budget: 64*14*15 SigLIP + 32*16*17 Hiera tokens.
    assert "| defaults | 13,440 | 8,704 | 22,144 |" in card.text
    assert "generatable_vocab_size` = 383" in card.text


def test_processor_files_load_through_the_auto_classes(converted):
    from transformers import AutoImageProcessor, AutoProcessor

    for name in ("processor_config.json", "preprocessor_config.json"):
        assert cc.PROCESSOR_AUTO_MAP.items() <= json.loads((converted / name).read_text())["auto_map"].items()
    assert (converted / "chat_template.jinja").is_file()
    processor = AutoProcessor.from_pretrained(converted, trust_remote_code=True)
    assert type(processor).__name__ == "Vica2Processor"
    assert (processor.image_token_id, processor.video_token_id) == (FIXTURE_IMAGE_TOKEN_ID, FIXTURE_VIDEO_TOKEN_ID)
    try:
        image_processor = AutoImageProcessor.from_pretrained(converted, trust_remote_code=True)
    except ImportError as error:  # transformers 5.17's AutoImageProcessor itself demands torchvision
        if "Torchvision" not in str(error):
            raise
        pytest.skip("this transformers version's AutoImageProcessor requires torchvision")
    assert type(image_processor).__name__ == "Vica2ImageProcessor"


def test_tokenizer_gets_placeholders_as_special_tokens(converted):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert tokenizer.convert_tokens_to_ids(["<image>", "<video>"]) == [FIXTURE_IMAGE_TOKEN_ID, FIXTURE_VIDEO_TOKEN_ID]
    assert tokenizer("a<video><video>b")["input_ids"].count(FIXTURE_VIDEO_TOKEN_ID) == 2
    assert tokenizer.decode([FIXTURE_VIDEO_TOKEN_ID, 64], skip_special_tokens=True) == tokenizer.decode([64])


# ------------------------------------------------------------------------------------------------ 7B keys
def release_7b_sources():
    listing = json.loads(FIXTURE_7B_KEYS.read_text())
    infos = [cc.TensorInfo(t["name"], tuple(t["shape"]), torch.bfloat16) for t in listing["tensors"]]
    return listing, [cc.Source("vica2-7b", cc.release_mapper(26), shapes=infos)]


@pytest.mark.skipif(not FIXTURE_7B_KEYS.is_file(), reason="7B key listing not found")
def test_every_7b_release_key_maps_onto_the_default_model():
    listing, sources = release_7b_sources()
    config = Vica2Config()
    vocabulary = cc.Vocabulary(release_rows=152064, tokenizer_size=151646, image_token_id=151646, video_token_id=151647)
    plan = cc.plan_conversion(sources, config, vocabulary, torch.bfloat16)  # raises on any mismatch
    assert len(plan.tensors) == len(cc.expected_tensors(config)) == listing["num_tensors"] - 2
    assert sorted(key for key, _ in plan.dropped) == [
        "model.vision_tower.vision_tower.vision_model.post_layernorm.bias",
        "model.vision_tower.vision_tower.vision_model.post_layernorm.weight",
    ]
    assert vocabulary.added_rows == 0  # Qwen2's spare rows hold <image>/<video>


@pytest.mark.skipif(not FIXTURE_7B_KEYS.is_file(), reason="7B key listing not found")
def test_7b_release_config_describes_the_default_model():
    raw = json.loads((FIXTURE_7B_KEYS.parent / "vica2_7b_raw_config.json").read_text())
    assert cc.expected_tensors(cc.release_config_to_vica2(raw)) == cc.expected_tensors(Vica2Config())


def test_7b_listing_with_a_27th_siglip_layer_drops_it():
    listing, _ = release_7b_sources()
    infos = [cc.TensorInfo(t["name"], tuple(t["shape"]), torch.bfloat16) for t in listing["tensors"]]
    layer_25 = [info for info in infos if ".encoder.layers.25." in info.key]
    infos += [
        cc.TensorInfo(info.key.replace(".layers.25.", ".layers.26."), info.shape, info.dtype) for info in layer_25
    ]
    vocabulary = cc.Vocabulary(152064, 151646, 151646, 151647)
    plan = cc.plan_conversion(
        [cc.Source("7b", cc.release_mapper(26), shapes=infos)], Vica2Config(), vocabulary, torch.bfloat16
    )
    dropped_layers = [key for key, reason in plan.dropped if ".layers.26." in key]
    assert len(dropped_layers) == len(layer_25) > 0


# ------------------------------------------------------------------------------------------------ vocabulary
def test_vocabulary_with_spare_rows_is_not_resized(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == 400
    assert config["generatable_vocab_size"] == FIXTURE_TOKENIZER_SIZE
    written = converted_tensors(converted)
    assert written["model.language_model.embed_tokens.weight"].shape == (400, 64)
    assert written["lm_head.weight"].shape == (400, 64)


def test_vocabulary_without_spare_rows_grows_by_mean_rows(tmp_path):
    state = fixture_state()
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = state[key][:FIXTURE_TOKENIZER_SIZE].clone()
    release = make_release(tmp_path / "raw", state, config_updates={"vocab_size": FIXTURE_TOKENIZER_SIZE})
    result = convert(release, tmp_path / "out")
    assert result.vocabulary.rows == FIXTURE_TOKENIZER_SIZE + 2 and result.vocabulary.added_rows == 2
    written = converted_tensors(tmp_path / "out")
    for ours, theirs in (("model.language_model.embed_tokens.weight", "model.embed_tokens.weight"),
                         ("lm_head.weight", "lm_head.weight")):
        assert written[ours].shape == (FIXTURE_TOKENIZER_SIZE + 2, 64)
        assert torch.equal(written[ours][:FIXTURE_TOKENIZER_SIZE], state[theirs])
        mean = state[theirs].mean(0)
        assert torch.allclose(written[ours][FIXTURE_TOKENIZER_SIZE:], mean.expand(2, -1))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == FIXTURE_TOKENIZER_SIZE + 2
    assert config["generatable_vocab_size"] == FIXTURE_TOKENIZER_SIZE
    # No logit over the tokenizer's ids changes.
    logits, reference = video_logits(load_converted(tmp_path / "out").eval())
    assert (logits[..., :FIXTURE_TOKENIZER_SIZE] - reference[..., :FIXTURE_TOKENIZER_SIZE]).abs().max() <= 1e-4
    assert torch.isneginf(logits[..., FIXTURE_TOKENIZER_SIZE:]).all()


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    state = fixture_state()
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = state[key][:300].clone()
    release = make_release(tmp_path / "raw", state, config_updates={"vocab_size": 300})
    with pytest.raises(cc.ConversionError, match="383 tokens but the checkpoint's embedding only 300 rows"):
        convert(release, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ input formats
@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_sharded_inputs_convert_to_the_same_tensors(tmp_path, weights):
    release = make_release(tmp_path / "raw", weights=weights, max_shard_size="400KB")
    index = "model.safetensors.index.json" if weights == "safetensors" else "pytorch_model.bin.index.json"
    assert len(set(json.loads((release / index).read_text())["weight_map"].values())) > 1
    convert(release, tmp_path / "out")
    written = converted_tensors(tmp_path / "out")
    expected = expected_hub_tensors(fixture_state())
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[name], value) for name, value in expected.items())


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_single_bin_input(tmp_path, zipfile):
    # Legacy (pre-zip) files cannot be memory-mapped; they are read whole, still with weights_only=True.
    release = make_release(tmp_path / "raw")
    (release / "model.safetensors").unlink()
    torch.save(fixture_state(), release / "pytorch_model.bin", _use_new_zipfile_serialization=zipfile)
    result = convert(release, tmp_path / "out")
    assert result.num_tensors == 153
    written, expected = converted_tensors(tmp_path / "out"), expected_hub_tensors(fixture_state())
    assert all(torch.equal(written[name], value) for name, value in expected.items())


def test_bin_with_pickled_objects_is_refused(tmp_path):
    release = make_release(tmp_path / "raw")
    (release / "model.safetensors").unlink()
    torch.save({"model.image_newline": torch.zeros(64), "extra": Path("/etc/passwd")}, release / "pytorch_model.bin")
    with pytest.raises(cc.ConversionError, match="weights_only=True"):
        convert(release, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_is_sharded_and_cast(tmp_path):
    result = convert(FIXTURE_DIR, tmp_path / "out", dtype="bfloat16", max_shard_size="300KB")
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(result.weight_files) > 1 and sorted(set(index["weight_map"].values())) == result.weight_files
    assert index["metadata"]["total_size"] == result.num_bytes
    written = converted_tensors(out)
    expected = expected_hub_tensors(fixture_state())
    assert index["weight_map"].keys() == written.keys() == expected.keys()
    for name, value in expected.items():
        assert written[name].dtype == torch.bfloat16 and torch.equal(written[name], value.to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = load_converted(out)
    assert model.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ strictness
def _mutated(state_change) -> dict[str, torch.Tensor]:
    state = fixture_state()
    state_change(state)
    return state


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.__setitem__("model.some_new_module.weight", torch.zeros(2)), "1 unknown keys.*some_new_module"),
        (lambda s: s.pop("model.image_newline"), "1 model tensors missing.*model.image_newline"),
        (
            lambda s: s.__setitem__("model.mm_projector.0.weight", torch.zeros(64, 31)),
            r"1 mis-shaped.*model.mm_projector.0.weight: checkpoint \[64, 31\], model expects \[64, 32\]",
        ),
        (
            lambda s: s.__setitem__(SAM_PREFIX + "blocks.99.norm1.weight", torch.zeros(8)),
            "1 keys that map onto no model tensor.*blocks.99",
        ),
    ],
    ids=["unknown", "missing", "misshaped", "unexpected"],
)
def test_mismatched_checkpoint_aborts_with_the_offending_names(tmp_path, change, message):
    release = make_release(tmp_path / "raw", _mutated(change))
    with pytest.raises(cc.ConversionError, match=f"(?s)nothing was written.*{message}"):
        convert(release, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not staging_dirs(tmp_path)


def test_several_problems_are_listed_together(tmp_path):
    def change(state):
        state.pop("model.norm.weight")
        state.pop("lm_head.weight")
        state["model.bogus"] = torch.zeros(1)

    release = make_release(tmp_path / "raw", _mutated(change))
    with pytest.raises(cc.ConversionError) as error:
        convert(release, tmp_path / "out")
    message = str(error.value)
    assert "model.bogus" in message and "model.language_model.norm.weight" in message and "lm_head.weight" in message


def test_existing_output_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "out"
    convert(FIXTURE_DIR, out)
    (out / "config.json").write_text("{}")  # a converted folder, even edited, is still ours to replace
    with pytest.raises(cc.ConversionError, match="already exists; pass overwrite=True"):
        convert(FIXTURE_DIR, out)
    assert (out / "config.json").read_text() == "{}"
    convert(FIXTURE_DIR, out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["model_type"] == "vica2"
    assert not staging_dirs(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    convert(FIXTURE_DIR, empty, overwrite=True)  # an empty folder may be replaced too
    assert (empty / "config.json").is_file()


def _user_folder(path: Path) -> dict[str, bytes]:
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    return {"notes.txt": b"mine"}


def _git_checkout(path: Path) -> dict[str, bytes]:
    path.mkdir()
    (path / ".git").mkdir()
    (path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (path / "config.json").write_text("{}")
    return {".git/HEAD": b"ref: refs/heads/main\n", "config.json": b"{}"}


def _converted_plus_user_file(path: Path) -> dict[str, bytes]:
    convert(FIXTURE_DIR, path)
    (path / "my_eval_results.json").write_text("[1]")
    return {"my_eval_results.json": b"[1]"}


def _marker_only_names_other_files(path: Path) -> dict[str, bytes]:
    # A forged or stale marker does not make other files ours: only the files it lists are.
    _user_folder(path)
    (path / cc.OUTPUT_MARKER).write_text(json.dumps({"written_by": cc.WRITTEN_BY, "files": ["config.json"]}))
    return {"notes.txt": b"mine"}


def _a_file(path: Path) -> dict[str, bytes]:
    path.write_text("not a folder")
    return {"": b"not a folder"}


@pytest.mark.parametrize(
    "make", [_user_folder, _git_checkout, _converted_plus_user_file, _marker_only_names_other_files, _a_file],
    ids=["user-files", "git-checkout", "converted-plus-user-file", "marker-lists-other-files", "a-file"],
)
def test_overwrite_replaces_only_what_the_converter_wrote(tmp_path, make):
    out = tmp_path / "out"
    kept = make(out)
    with pytest.raises(cc.ConversionError, match="overwrite=True refuses to replace"):
        convert(FIXTURE_DIR, out, overwrite=True)
    for name, content in kept.items():
        assert (out / name if name else out).read_bytes() == content
    assert not staging_dirs(tmp_path)


def test_overwrite_rechecks_a_folder_that_appears_during_the_conversion(tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = cc.write_processor

    def user_creates_out(folder, *args):
        real(folder, *args)
        _user_folder(out)

    monkeypatch.setattr(cc, "write_processor", user_creates_out)
    with pytest.raises(cc.ConversionError, match="overwrite=True refuses to replace"):
        convert(FIXTURE_DIR, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and not staging_dirs(tmp_path)


def test_converted_folder_is_refused_as_input(converted, tmp_path):
    with pytest.raises(cc.ConversionError, match="already a converted ViCA2 hub folder"):
        convert(converted, tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_output_that_would_replace_the_input_is_refused(tmp_path):
    release = make_release(tmp_path / "raw")
    with pytest.raises(cc.ConversionError, match="would replace the input"):
        convert(release, release, overwrite=True)
    with pytest.raises(cc.ConversionError, match="would replace the input"):
        convert(release, tmp_path, overwrite=True)
    assert (release / "model.safetensors").is_file()


def test_unknown_model_type_and_missing_weights_are_refused(tmp_path):
    qwen = make_release(tmp_path / "qwen", config_updates={"model_type": "qwen2"})
    with pytest.raises(cc.ConversionError, match="model_type 'qwen2'"):
        convert(qwen, tmp_path / "out")
    empty = make_release(tmp_path / "empty")
    (empty / "model.safetensors").unlink()
    with pytest.raises(cc.ConversionError, match="No weights in"):
        convert(empty, tmp_path / "out")
    broken = make_release(tmp_path / "broken", weights="safetensors", max_shard_size="400KB")
    next(broken.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(cc.ConversionError, match="lists shards that are not in"):
        convert(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_release_with_sam2_checkpoint_is_refused(tmp_path):
    with pytest.raises(cc.ConversionError, match="already has its Hiera tower"):
        convert(FIXTURE_DIR, tmp_path / "out", sam2_checkpoint=tmp_path)


# ------------------------------------------------------------------------------------------------ atomic output
def test_error_mid_conversion_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(cc, "write_generation_config", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        convert(FIXTURE_DIR, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not staging_dirs(tmp_path)


def test_killed_conversion_leaves_no_output(tmp_path, caplog):
    """SIGKILL right after the first output shard is written: OUT must not exist (only the hidden staging folder)."""
    script = textwrap.dedent(
        f"""
        import os, signal
        from vica2 import convert_checkpoint as cc
        real_save = cc.save_file
        def save_then_die(*args, **kwargs):
            real_save(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        cc.save_file = save_then_die
        cc.convert_checkpoint({str(FIXTURE_DIR)!r}, {str(tmp_path / "out")!r}, max_shard_size="200KB", progress=False)
        """
    )
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert process.returncode == -9, process.stderr
    assert not (tmp_path / "out").exists()
    staged = staging_dirs(tmp_path)
    assert len(staged) == 1 and len(list((staged[0] / "out").glob("model-*.safetensors"))) == 1  # really mid-way
    # Someone else's folder with a look-alike name, and the staging folder of a conversion still running.
    foreign = tmp_path / (cc.STAGING_PREFIX + "mine")
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"x")
    running = Path(tempfile.mkdtemp(prefix=cc.STAGING_PREFIX, dir=tmp_path))
    lock = cc._hold_staging_lock(running)
    # The next conversion removes the killed run's leftover, and only it.
    try:
        with caplog.at_level("WARNING", logger="vica2.convert"):
            convert(FIXTURE_DIR, tmp_path / "out")
    finally:
        lock.close()
    assert not staged[0].exists() and f"Removed {staged[0]}" in caplog.text
    assert (foreign / "data.bin").read_bytes() == b"x" and str(foreign) in caplog.text
    assert (running / cc.STAGING_LOCK).is_file()
    assert (tmp_path / "out" / "config.json").is_file()


# ------------------------------------------------------------------------------------------------ verify
def test_verify_passes_on_a_good_conversion(tmp_path):
    result = convert(FIXTURE_DIR, tmp_path / "out", dtype="bfloat16", verify=True)
    assert result.verified and (tmp_path / "out" / "config.json").is_file()


def test_verify_catches_a_corrupted_tensor(tmp_path, monkeypatch):
    real_add = cc.ShardWriter.add

    def corrupting_add(self, name, tensor):
        if name == "model.image_newline":
            tensor = tensor + 1
        real_add(self, name, tensor)

    monkeypatch.setattr(cc.ShardWriter, "add", corrupting_add)
    with pytest.raises(cc.ConversionError, match="differ after reloading: model.image_newline"):
        convert(FIXTURE_DIR, tmp_path / "out", verify=True)
    assert not (tmp_path / "out").exists() and not staging_dirs(tmp_path)


def test_verify_catches_non_finite_logits(tmp_path, monkeypatch):
    monkeypatch.setattr(cc, "smoke_forward", lambda model: torch.full((1, 3, 400), float("nan")))
    with pytest.raises(cc.ConversionError, match="not finite"):
        convert(FIXTURE_DIR, tmp_path / "out", verify=True)
    assert not (tmp_path / "out").exists() and not staging_dirs(tmp_path)


# ------------------------------------------------------------------------------------------------ hub
def test_push_to_hub_offline_fails_before_any_work(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(cc, "prepare_conversion", lambda *a, **k: pytest.fail("converted although offline"))
    with pytest.raises(cc.ConversionError, match="offline mode.*nothing was converted"):
        convert(FIXTURE_DIR, tmp_path / "out", push_to_hub="someone/vica2")
    assert not (tmp_path / "out").exists() and not staging_dirs(tmp_path)


def test_push_to_hub_unreachable_fails_before_any_work(tmp_path, monkeypatch):
    from huggingface_hub import HfApi, constants

    def unreachable(self, *args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "whoami", unreachable)
    monkeypatch.setattr(cc, "prepare_conversion", lambda *a, **k: pytest.fail("converted although unreachable"))
    with pytest.raises(cc.ConversionError, match="cannot reach the Hugging Face Hub.*no route to host"):
        convert(FIXTURE_DIR, tmp_path / "out", push_to_hub="someone/vica2")
    with pytest.raises(cc.ConversionError, match="not a valid repo id"):
        convert(FIXTURE_DIR, tmp_path / "out", push_to_hub="not a repo//id")
    assert not (tmp_path / "out").exists()


def test_push_to_hub_creates_the_repo_and_uploads_the_folder(tmp_path, monkeypatch):
    from huggingface_hub import HfApi, constants

    calls = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "whoami", lambda self, *a, **k: {"name": "someone"})
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **k: calls.append(("create", repo_id, k)) or "url")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **k: calls.append(("upload", k["repo_id"], k)))
    result = convert(FIXTURE_DIR, tmp_path / "out", push_to_hub="someone/vica2", private=True)
    assert [(kind, repo) for kind, repo, _ in calls] == [("create", "someone/vica2"), ("upload", "someone/vica2")]
    assert calls[0][2]["exist_ok"] is True and calls[0][2]["private"] is True
    assert calls[1][2]["ignore_patterns"] == [cc.OUTPUT_MARKER]  # the local ownership mark stays local
    assert Path(calls[1][2]["folder_path"]) == tmp_path / "out" and result.hub_url == "url"
    assert 'from_pretrained("someone/vica2"' in (tmp_path / "out" / "README.md").read_text()


# ------------------------------------------------------------------------------------------------ ViCA2-init
def llava_video_folder(tmp_path: Path, model_type: str = "llava_qwen") -> Path:
    """The fixture as a LLaVA-Video-Qwen2 checkpoint: no Hiera tower, no spatial projector."""
    state = {k: v for k, v in fixture_state().items() if not k.startswith(("model.sam_tower.", "model.sam_projector."))}
    return make_release(
        tmp_path / "llava", state,
        config_updates={"model_type": model_type, "architectures": ["LlavaQwenForCausalLM"]},
    )


def hiera_trunk_meta_names() -> dict[str, torch.Tensor]:
    """The fixture's Hiera weights under Meta's trunk names (the release stores the trunk module as is)."""
    return {k[len(SAM_PREFIX):]: v for k, v in fixture_state().items() if k.startswith(SAM_PREFIX)}


def meta_sam2_checkpoint(path: Path) -> Path:
    model = {"image_encoder.trunk." + k: v for k, v in hiera_trunk_meta_names().items()}
    model["image_encoder.neck.convs.0.conv.weight"] = torch.zeros(4, 64, 1, 1)
    model["sam_mask_decoder.iou_token.weight"] = torch.zeros(1, 4)
    model["memory_encoder.out_proj.weight"] = torch.zeros(4, 4, 1, 1)
    torch.save({"model": model}, path)
    return path


def transformers_sam2_folder(path: Path, hiera_config: dict) -> Path:
    from transformers import Sam2Config

    Sam2Config(vision_config={"backbone_config": hiera_config}).save_pretrained(path)
    state = {"vision_encoder.backbone." + cc.hiera_trunk_key(k): v for k, v in hiera_trunk_meta_names().items()}
    state["vision_encoder.neck.convs.0.weight"] = torch.zeros(4, 64, 1, 1)
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 4)
    save_file(state, path / "model.safetensors")
    return path


def fixture_hiera_config() -> dict:
    return cc.release_hiera_config(json.loads((FIXTURE_DIR / "tower_configs.json").read_text())["hiera"])


def test_vica2_init_from_llava_video_and_meta_sam2(tmp_path):
    llava = llava_video_folder(tmp_path)
    sam2 = meta_sam2_checkpoint(tmp_path / "sam2.1_hiera_tiny.pt")
    result = convert(llava, tmp_path / "out", sam2_checkpoint=sam2, verify=True)
    assert result.kind == "vica2-init" and result.verified
    written = converted_tensors(tmp_path / "out")
    expected = expected_hub_tensors(fixture_state())
    projector = {name for name in expected if name.startswith("model.hiera_projector.")}
    assert written.keys() == expected.keys()
    for name in expected.keys() - projector:  # LLaVA-Video and the Hiera trunk, unchanged
        assert torch.equal(written[name], expected[name]), name
    # The fresh spatial projector: seeded N(0, 0.02) weights and zero biases.
    config = Vica2Config.from_pretrained(tmp_path / "out")
    init = cc.spatial_projector_init(config, seed=0)
    assert all(torch.equal(written[name], init[name]) for name in projector)
    assert written["model.hiera_projector.linear_1.bias"].abs().sum() == 0
    assert 0.015 < written["model.hiera_projector.linear_2.weight"].std() < 0.025
    dropped = dict(result.dropped)
    assert {"image_encoder.neck.convs.0.conv.weight", "sam_mask_decoder.iou_token.weight"} <= dropped.keys()
    assert ModelCard.load(tmp_path / "out" / "README.md").text.count("ViCA2-init") >= 1


def test_vica2_init_projector_seed(tmp_path):
    llava = llava_video_folder(tmp_path)
    sam2 = meta_sam2_checkpoint(tmp_path / "sam2.pt")
    convert(llava, tmp_path / "seed1", sam2_checkpoint=sam2, projector_seed=1)
    convert(llava, tmp_path / "seed1-again", sam2_checkpoint=sam2, projector_seed=1)
    a, b = converted_tensors(tmp_path / "seed1"), converted_tensors(tmp_path / "seed1-again")
    name = "model.hiera_projector.linear_2.weight"
    assert torch.equal(a[name], b[name])
    assert not torch.equal(a[name], cc.spatial_projector_init(Vica2Config.from_pretrained(tmp_path / "seed1"), 0)[name])


def test_vica2_init_from_a_transformers_sam2_folder(tmp_path):
    llava = llava_video_folder(tmp_path, model_type="llava")
    sam2 = transformers_sam2_folder(tmp_path / "sam2-hf", fixture_hiera_config())
    result = convert(llava, tmp_path / "out", sam2_checkpoint=sam2)
    written = converted_tensors(tmp_path / "out")
    expected = expected_hub_tensors(fixture_state())
    hiera = [name for name in expected if name.startswith("model.hiera_tower.")]
    assert hiera and all(torch.equal(written[name], expected[name]) for name in hiera)
    assert "mask_decoder.iou_token.weight" in dict(result.dropped)


def test_vica2_init_refuses_a_different_hiera(tmp_path):
    llava = llava_video_folder(tmp_path)
    other = {**fixture_hiera_config(), "window_size_per_stage": [8, 4, 16, 8]}
    sam2 = transformers_sam2_folder(tmp_path / "sam2-hf", other)
    with pytest.raises(cc.ConversionError, match="window_size_per_stage"):
        convert(llava, tmp_path / "out", sam2_checkpoint=sam2)


def test_llava_video_without_sam2_is_refused(tmp_path):
    llava = llava_video_folder(tmp_path)
    with pytest.raises(cc.ConversionError, match="pass the SAM2.1 Hiera weights with sam2_checkpoint="):
        convert(llava, tmp_path / "out")


def test_vica2_init_with_a_sam2_missing_its_trunk_is_refused(tmp_path):
    llava = llava_video_folder(tmp_path)
    torch.save({"model": {"sam_mask_decoder.iou_token.weight": torch.zeros(1, 4)}}, tmp_path / "sam2.pt")
    with pytest.raises(cc.ConversionError, match="missing from the checkpoint: model.hiera_tower"):
        convert(llava, tmp_path / "out", sam2_checkpoint=tmp_path / "sam2.pt")


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_converts_and_reports_errors(tmp_path):
    command = [sys.executable, "convert_checkpoint.py", "--input-dir", str(FIXTURE_DIR)]
    ok = subprocess.run(
        command + ["--output-dir", str(tmp_path / "out"), "--dtype", "float16", "--max-shard-size", "500KB"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert "Wrote" in ok.stdout and "dropped" in ok.stdout
    assert "SigLIP post_layernorm" in ok.stderr  # the dropped tensors are listed
    with safe_open(next((tmp_path / "out").glob("model-00001-*.safetensors")), "pt") as f:
        assert f.get_slice(next(iter(f.keys()))).get_dtype() == "F16"
    again = subprocess.run(
        command + ["--output-dir", str(tmp_path / "out")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 2 and "error:" in again.stderr and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr


# ------------------------------------------------------------------------------------------------ no code from inputs
def _custom_tokenizer(release: Path, sentinel: Path, with_auto_map: bool) -> None:
    settings = json.loads((release / "tokenizer_config.json").read_text())
    settings["tokenizer_class"] = "EvilTokenizer"
    if with_auto_map:
        settings["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (release / "tokenizer_config.json").write_text(json.dumps(settings))
    (release / "tokenization_evil.py").write_text(
        f"open({str(sentinel)!r}, 'w').write('ran')\n"
        "from transformers import Qwen2Tokenizer\n\n\nclass EvilTokenizer(Qwen2Tokenizer):\n    pass\n"
    )


@pytest.mark.parametrize("with_auto_map", [True, False], ids=["auto_map", "unknown-class"])
def test_tokenizer_that_needs_code_is_refused_and_never_runs(tmp_path, with_auto_map, monkeypatch):
    release = make_release(tmp_path / "raw")
    sentinel = tmp_path / "ran.txt"
    _custom_tokenizer(release, sentinel, with_auto_map)
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("asked whether to run the input's code"))
    with pytest.raises(cc.ConversionError, match="tokenizer_config.json: refused: the tokenizer needs code"):
        convert(release, tmp_path / "out")
    assert not sentinel.exists() and not (tmp_path / "out").exists() and not staging_dirs(tmp_path)


def test_output_never_ships_python_files_other_than_the_remote_code(tmp_path, monkeypatch):
    release = make_release(tmp_path / "raw")
    (release / "tokenization_evil.py").write_text("raise SystemExit('ran')\n")  # a stray file is not copied
    convert(release, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.py")) == sorted(p.name for p in cc.remote_code_files())
    # And if a writer ever copied one in (a tokenizer's save_pretrained copies its class's module), it is caught.
    real = cc.write_processor

    def write_processor_and_code(folder, *args):
        real(folder, *args)
        (folder / "tokenization_evil.py").write_text("")

    monkeypatch.setattr(cc, "write_processor", write_processor_and_code)
    with pytest.raises(cc.ConversionError, match="would ship code.*tokenization_evil.py"):
        convert(release, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


# ------------------------------------------------------------------------------------------------ left padding
@pytest.mark.parametrize("padding_side", [None, "right"], ids=["unset", "right"])
def test_converted_processor_pads_left_whatever_the_release_said(tmp_path, padding_side):
    from transformers import AutoProcessor, AutoTokenizer

    release = make_release(tmp_path / "raw")
    settings = json.loads((release / "tokenizer_config.json").read_text())
    settings.pop("padding_side", None)
    if padding_side:
        settings["padding_side"] = padding_side
    (release / "tokenizer_config.json").write_text(json.dumps(settings))
    convert(release, tmp_path / "out")
    processor = AutoProcessor.from_pretrained(tmp_path / "out", trust_remote_code=True)
    batch = processor(text=["a b c d e f", "a"], padding=True, return_tensors="pt")
    pad = processor.tokenizer.pad_token_id
    assert batch["input_ids"][1, 0] == pad and batch["input_ids"][1, -1] != pad  # the short row is padded on the left
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][1, -1] == 1
    assert AutoTokenizer.from_pretrained(tmp_path / "out").padding_side == "left"


# ------------------------------------------------------------------------------------------------ bad weights
@pytest.mark.parametrize("verify", [False, True], ids=["plain", "verify"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_are_refused(tmp_path, value, verify):
    state = fixture_state()
    state["model.mm_projector.2.weight"][3, 5] = value
    release = make_release(tmp_path / "raw", state)
    with pytest.raises(cc.ConversionError, match=r"model.safetensors: tensor model.mm_projector.2.weight holds"):
        convert(release, tmp_path / "out", verify=verify, max_shard_size="200KB")
    assert not (tmp_path / "out").exists() and not staging_dirs(tmp_path)


def test_weights_overflowing_the_output_dtype_are_refused(tmp_path):
    state = fixture_state()
    state["model.image_newline"][0] = 1e6  # finite in float32, inf in float16
    release = make_release(tmp_path / "raw", state)
    with pytest.raises(cc.ConversionError, match="model.image_newline: values up to 1e\\+06 overflow float16"):
        convert(release, tmp_path / "out", dtype="float16")
    assert not (tmp_path / "out").exists()
    convert(release, tmp_path / "out", dtype="bfloat16")  # bfloat16 holds it


def test_non_floating_weights_are_refused(tmp_path):
    state = fixture_state()
    state["model.image_newline"] = state["model.image_newline"].to(torch.int64)
    release = make_release(tmp_path / "raw", state)
    with pytest.raises(cc.ConversionError, match=r"1 non-floating tensors.*model.image_newline \(int64"):
        convert(release, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_verify_names_the_module_whose_output_is_not_finite(converted):
    model = load_converted(converted).eval()
    with torch.no_grad():
        model.model.multi_modal_projector.linear_1.bias.fill_(float("inf"))
    cause = cc.non_finite_cause(model)
    assert "model.multi_modal_projector.linear_1 (Linear)" in cause and "float32" in cause


# ------------------------------------------------------------------------------------------------ one-line errors
def _edit_json(name: str, **changes):
    def edit(release: Path) -> None:
        data = json.loads((release / name).read_text())
        for key, value in changes.items():
            if value is _DROP:
                data.pop(key, None)
            else:
                data[key] = value
        (release / name).write_text(json.dumps(data))

    return edit


_DROP = object()


def _write(name: str, content: bytes):
    return lambda release: (release / name).write_bytes(content)


def _truncate(release: Path) -> None:
    data = (release / "model.safetensors").read_bytes()
    (release / "model.safetensors").write_bytes(data[: len(data) // 2])


def _edit_tower(tower: str, **changes):
    def edit(release: Path) -> None:
        towers = json.loads((release / "tower_configs.json").read_text())
        towers[tower].update(changes)
        towers[tower] = {key: value for key, value in towers[tower].items() if value is not _DROP}
        (release / "tower_configs.json").write_text(json.dumps(towers))

    return edit


BAD_INPUTS = [
    ("missing-vocab_size", _edit_json("config.json", vocab_size=_DROP), [],
     "config.json: field 'vocab_size' is missing"),
    ("vocab_size-string", _edit_json("config.json", vocab_size="400"), [], "field 'vocab_size' must be a positive"),
    ("hidden_size-float", _edit_json("config.json", hidden_size=64.5), [], "field 'hidden_size'"),
    ("pool-mode", _edit_json("config.json", mm_spatial_pool_mode="nearest"), [], "field 'mm_spatial_pool_mode'"),
    ("projector-width", _edit_json("config.json", mm_hidden_size=33), [], "field 'mm_hidden_size' is 33"),
    ("image-token-string", _edit_json("config.json", image_token_index="383"), [], "field 'image_token_index'"),
    ("tower-type", _edit_tower("hiera", stages="1,2,2,1"), [], r"tower_configs.json \[hiera\]: field 'stages'"),
    # Values checked by the configs they map into (Vica2Config, the library's strict sub-configs), named by the
    # release file and the release field they came from.
    ("tie-word-embeddings", _edit_json("config.json", tie_word_embeddings="yes"), [],
     "config.json: field 'tie_word_embeddings'"),
    ("aspect-ratio", _edit_json("config.json", image_aspect_ratio="anyres"), [],
     "config.json: field 'image_aspect_ratio': vision_aspect_ratio='anyres'"),
    ("pinpoints", _edit_json("config.json", image_grid_pinpoints=[[100, 384]]), [],
     "config.json: field 'image_grid_pinpoints'"),
    ("dtype-name", _edit_json("config.json", torch_dtype="int8"), [], "config.json: field 'torch_dtype'"),
    ("projector-type", _edit_json("config.json", mm_projector_type="linear"), [],
     "config.json: field 'mm_projector_type' is 'linear'"),
    ("newline-position", _edit_json("config.json", mm_newline_position="one_token"), [],
     "config.json: field 'mm_newline_position' is 'one_token'; ViCA2 reproduces only 'grid'"),
    ("faster-video", _edit_json("config.json", add_faster_video=True), [], "field 'add_faster_video' is True"),
    ("rope-theta", _edit_json("config.json", rope_theta=-1.0), [], "field 'rope_theta' must be a positive number"),
    ("kv-heads-zero", _edit_json("config.json", num_key_value_heads=0), [], "field 'num_key_value_heads' must be"),
    ("hiera-q-stride", _edit_tower("hiera", q_stride="x"), [], r"tower_configs.json \[hiera\]: field 'q_stride'"),
    ("hiera-dim-mul", _edit_tower("hiera", dim_mul="2"), [], r"tower_configs.json \[hiera\]: field 'dim_mul'"),
    ("hiera-windows", _edit_tower("hiera", window_spec=[8, 4, 14]), [], "field 'window_spec' has 3 entries for 4"),
    ("hiera-missing", _edit_tower("hiera", embed_dim=_DROP), [], r"\[hiera\]: field 'embed_dim' is missing"),
    ("siglip-act", _edit_tower("siglip_vision_model", hidden_act=3), [],
     r"tower_configs.json \[siglip_vision_model\]: field 'hidden_act'"),
    ("config-json", _write("config.json", b"{not json"), [], "config.json is not valid JSON"),
    ("config-list", _write("config.json", b"[1, 2]"), [], "config.json must hold a JSON object"),
    ("tower-json", _write("tower_configs.json", b"{"), [], "tower_configs.json is not valid JSON"),
    ("generation-json", _write("generation_config.json", b"{,}"), [], "generation_config.json is not valid JSON"),
    ("tokenizer-config-json", _write("tokenizer_config.json", b"{"), [], "tokenizer_config.json is not valid JSON"),
    ("tokenizer-json", _write("tokenizer.json", b'{"a": '), [], "tokenizer.json is not valid JSON"),
    ("special-tokens-json", _write("special_tokens_map.json", b"\xff\xfe"), [], "special_tokens_map.json is not valid"),
    ("truncated-safetensors", _truncate, [], "model.safetensors: not a readable safetensors file"),
    ("tiny-safetensors", _write("model.safetensors", b"\x01\x00"), [], "model.safetensors: not a readable"),
    ("shard-size-unit", None, ["--max-shard-size", "5 parsecs"], "--max-shard-size '5 parsecs' is not a size"),
    ("shard-size-zero", None, ["--max-shard-size", "0GB"], "--max-shard-size '0GB' is not a size"),
    ("shard-size-negative", None, ["--max-shard-size=-1MB"], "--max-shard-size '-1MB' is not a size"),
]


@pytest.mark.parametrize(("change", "args", "message"), [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_line_naming_file_and_field_exit_2_nothing_written(tmp_path, capsys, change, args, message):
    release = make_release(tmp_path / "raw")
    if change is not None:
        change(release)
    code = cc.main(["--input-dir", str(release), "--output-dir", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and re.search(message, err[0]), err
    assert not (tmp_path / "out").exists() and not staging_dirs(tmp_path)


def test_index_naming_a_shard_outside_the_folder_is_refused(tmp_path):
    release = make_release(tmp_path / "raw", max_shard_size="400KB")
    index = json.loads((release / "model.safetensors.index.json").read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = "../elsewhere.safetensors"
    (release / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(cc.ConversionError, match="names shards outside the checkpoint folder"):
        convert(release, tmp_path / "out")
