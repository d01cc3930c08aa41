# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""Convert a ViCA2 research-release checkpoint into a hub folder that loads with `trust_remote_code=True`.

    python convert_checkpoint.py --input-dir RAW --output-dir OUT [--sam2-checkpoint PATH] [--dtype bfloat16]
        [--max-shard-size 5GB] [--verify] [--overwrite] [--push-to-hub REPO_ID [--private]]

or, from Python, `convert_checkpoint(input_dir, output_dir, ...)`.

Inputs: a ViCA2 release folder (config.json with model_type "vica_qwen"), or a LLaVA-Video-Qwen2 folder plus a
SAM2.1 checkpoint (`--sam2-checkpoint`), which assembles a fresh "ViCA2-init" whose spatial projector is newly
initialised. The output folder holds sharded safetensors, config.json (full `auto_map`), generation_config.json,
the processor and tokenizer (with `<image>`/`<video>` added), the remote-code files and a model card.

This module also owns the mapping from the release's names and config to ours: `release_key_to_hub` and
`release_config_to_vica2` are the one place where that correspondence is written down. Values are validated by the
configs they map into (`Vica2Config` and the library's sub-configs); errors name the release file and field.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData, split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from vica2.configuration_vica2 import AUTO_MAP, Vica2Config


try:  # POSIX: a lock held for the life of a conversion tells a killed run's staging folder from a running one's
    import fcntl
except ImportError:  # Windows: leftovers are reported, never removed
    fcntl = None


logger = logging.getLogger("vica2.convert")

# The remote-code files live next to this script (the repository root is the `vica2` package).
REPO_ROOT = Path(__file__).resolve().parent
# Release prefixes -> ours (first match wins).
_PREFIXES = (
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.sam_tower.vision_tower.", "model.hiera_tower."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.sam_projector.0.", "model.hiera_projector.linear_1."),
    ("model.sam_projector.2.", "model.hiera_projector.linear_2."),
    ("model.image_newline", "model.image_newline"),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)
# Meta's Hiera module names -> transformers' Sam2HieraDetModel names, inside `blocks.N.` or at the trunk's top.
_HIERA_RENAMES = (
    ("patch_embed.proj.", "patch_embed.projection."),
    ("norm1.", "layer_norm1."),
    ("norm2.", "layer_norm2."),
    ("mlp.layers.0.", "mlp.proj_in."),
    ("mlp.layers.1.", "mlp.proj_out."),
)
# SigLIP weights the release stores but never uses: its features leave the last kept layer directly.
_UNUSED_SIGLIP = re.compile(r"^model\.vision_tower\.(post_layernorm|head)\.")


def hiera_trunk_key(key: str, inverse: bool = False) -> str:
    """Rename a key of Meta's Hiera trunk (relative to the trunk) to `Sam2HieraDetModel`'s name, or back."""
    block, rest = re.match(r"^(blocks\.\d+\.)?(.*)$", key).groups()
    for meta, ours in _HIERA_RENAMES:
        old, new = (ours, meta) if inverse else (meta, ours)
        if rest.startswith(old):
            return (block or "") + new + rest[len(old) :]
    return key


def hub_key_to_release(key: str) -> str:
    """The release's name for one of our parameters (the inverse of `release_key_to_hub`)."""
    if key.startswith("model.hiera_tower."):
        key = "model.hiera_tower." + hiera_trunk_key(key[len("model.hiera_tower.") :], inverse=True)
    for old, new in _PREFIXES:
        if key.startswith(new):
            return old + key[len(new) :]
    raise KeyError(f"no release name for {key}")


def release_key_to_hub(key: str, num_siglip_layers: int | None = None) -> str | None:
    """Our name for a release key, or None for a weight that is deliberately dropped.

    Dropped: SigLIP's `post_layernorm` and attention-pooling `head`, and encoder layers at or beyond
    `num_siglip_layers` (the release deletes SigLIP's last layer; a checkpoint that still has it drops it here).
    Raises KeyError for a key that is neither mapped nor known to be unused.
    """
    old, new = next(((old, new) for old, new in _PREFIXES if key.startswith(old)), (None, None))
    if old is None:
        raise KeyError(f"unknown release checkpoint key: {key}")
    mapped = new + key[len(old) :]
    layer = re.match(r"^model\.vision_tower\.encoder\.layers\.(\d+)\.", mapped)
    if _UNUSED_SIGLIP.match(mapped) or (layer and num_siglip_layers is not None and int(layer[1]) >= num_siglip_layers):
        return None
    if mapped.startswith("model.hiera_tower."):
        mapped = "model.hiera_tower." + hiera_trunk_key(mapped[len("model.hiera_tower.") :])
    return mapped


# ===================================================================================================== config
# The release builds its towers from hard-coded hub names; these are those towers' hyper-parameters, in the
# release's own vocabulary (what `tower_configs.json` of a non-standard checkpoint also uses).
RELEASE_TOWERS = {
    "siglip_vision_model": {
        "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
        "image_size": 384, "patch_size": 14, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
        "num_channels": 3,
    },
    "hiera": {
        "embed_dim": 112, "num_heads": 2, "q_pool": 3, "q_stride": [2, 2], "stages": [2, 3, 16, 3], "dim_mul": 2.0,
        "head_mul": 2.0, "window_pos_embed_bkg_spatial_size": [14, 14], "window_spec": [8, 4, 14, 7],
        "global_att_blocks": [12, 16, 20],
    },
}
# The release fields the converter computes with itself (sizes, multipliers) or must find stated: checked before any
# arithmetic runs on them. Every other value is checked by the config it maps into.
_REQUIRED = {
    "config.json": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
    "siglip_vision_model": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                            "image_size", "patch_size"),
    "hiera": ("embed_dim", "num_heads", "stages", "window_spec", "global_att_blocks",
              "window_pos_embed_bkg_spatial_size"),
}
_POSITIVE_INTS = set(_REQUIRED["config.json"] + _REQUIRED["siglip_vision_model"]) | {
    "embed_dim", "num_heads", "num_key_value_heads", "num_hidden_layers_in_checkpoint"}
_POSITIVE_NUMBERS = {"dim_mul", "head_mul", "rope_theta"}
# Our field -> the release field its value comes from, where the names differ (for error messages).
_RELEASE_NAMES = {
    "config.json": {
        "image_token_id": "image_token_index", "video_token_id": "image_token_index", "rope_parameters": "rope_theta",
        "video_pool_mode": "mm_spatial_pool_mode", "vision_aspect_ratio": "image_aspect_ratio",
        "image_grid_pinpoints": "image_grid_pinpoints",
    },
    "siglip_vision_model": {},
    "hiera": {
        "hidden_size": "embed_dim", "num_attention_heads": "num_heads", "query_stride": "q_stride",
        "num_query_pool_stages": "q_pool", "window_positional_embedding_background_size":
        "window_pos_embed_bkg_spatial_size", "blocks_per_stage": "stages", "embed_dim_per_stage": "dim_mul",
        "num_attention_heads_per_stage": "head_mul", "window_size_per_stage": "window_spec",
        "global_attention_blocks": "global_att_blocks",
    },
}
# Release fields our config has no setting for, because the model computes them one way (checked when present):
# the projector, a newline after every feature row of a video, anyres unpadding of images, no "faster" video tokens.
_FIXED_RELEASE_FIELDS = {"mm_projector_type": "mlp2x_gelu", "mm_newline_position": "grid",
                         "mm_patch_merge_type": "spatial_unpad", "add_faster_video": False}
_QWEN2_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "use_sliding_window",
    "sliding_window", "max_window_layers", "attention_dropout", "initializer_range", "bos_token_id", "eos_token_id",
)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_sizes(data, source: str, section: str) -> dict:
    """`data` (one release JSON object) with its required fields present and its sizes positive numbers."""
    if not isinstance(data, dict):
        raise ConversionError(f"{source}: expected a JSON object, got {type(data).__name__}.")
    for name in _REQUIRED[section]:
        if name not in data:
            raise ConversionError(f"{source}: field '{name}' is missing.")
    for name in sorted((_POSITIVE_INTS | _POSITIVE_NUMBERS) & data.keys(), key=list(data).index):
        integer, value = name in _POSITIVE_INTS, data[name]
        if not (_is_int(value) or (not integer and isinstance(value, float))) or value <= 0:
            kind = "integer" if integer else "number"
            raise ConversionError(f"{source}: field '{name}' must be a positive {kind}, got {_short(value)}.")
    return data


@contextlib.contextmanager
def release_fields(source: str, names: dict[str, str]):
    """Re-raise a config's validation error (Vica2ConfigError, the library's strict field checks) as one line naming
    the release file and the release field the offending value came from (the first of `names` the message names)."""
    try:
        yield
    except ConversionError:
        raise
    except Exception as error:  # noqa: BLE001 - ValueError, TypeError, StrictDataclassFieldValidationError
        message = _one_line(error)
        named = [word for word in re.findall(r"\w+", message) if word in names]
        raise ConversionError(f"{source}: field '{names[named[0]]}': {message}" if named else f"{source}: {message}")


def _sub_config(fields: dict, source: str, section: str):
    from transformers import AutoConfig

    fields = dict(fields)
    with release_fields(source, {**{name: name for name in fields}, **_RELEASE_NAMES[section]}):
        return AutoConfig.for_model(fields.pop("model_type"), **fields)


def release_siglip_config(siglip: dict) -> dict:
    """SigLIP vision config with the release's last layer removed (the release deletes it after loading)."""
    return {
        "model_type": "siglip_vision_model", **{name: siglip[name] for name in _REQUIRED["siglip_vision_model"]},
        "num_hidden_layers": siglip.get("num_hidden_layers_in_checkpoint", siglip["num_hidden_layers"] - 1),
        "num_channels": siglip.get("num_channels", 3), "hidden_act": siglip.get("hidden_act", "gelu_pytorch_tanh"),
        "layer_norm_eps": siglip.get("layer_norm_eps", 1e-6), "vision_use_head": False,
    }


def release_hiera_config(hiera: dict) -> dict:
    """Meta's Hiera constructor arguments -> `Sam2HieraDetConfig` fields (per-stage lists)."""
    hiera = {key: list(value) if isinstance(value, list) else value for key, value in hiera.items()}  # own copies
    stages = hiera["stages"]
    dims, heads = [hiera["embed_dim"]], [hiera["num_heads"]]
    for _ in range(len(stages) - 1 if isinstance(stages, list) else 0):  # a non-list is refused by the config
        dims.append(int(dims[-1] * hiera.get("dim_mul", 2.0)))
        heads.append(int(heads[-1] * hiera.get("head_mul", 2.0)))
    return {
        "model_type": "sam2_hiera_det_model", "hidden_size": hiera["embed_dim"], "num_attention_heads": heads[0],
        "num_channels": 3, "image_size": [1024, 1024], "patch_kernel_size": [7, 7], "patch_stride": [4, 4],
        "patch_padding": [3, 3], "query_stride": hiera.get("q_stride", [2, 2]),
        "window_positional_embedding_background_size": hiera["window_pos_embed_bkg_spatial_size"],
        "num_query_pool_stages": hiera.get("q_pool", 3), "blocks_per_stage": stages, "embed_dim_per_stage": dims,
        "num_attention_heads_per_stage": heads, "window_size_per_stage": hiera["window_spec"],
        "global_attention_blocks": hiera["global_att_blocks"], "mlp_ratio": 4.0, "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
    }


def release_config_to_vica2(
    raw: dict, towers: dict | None = None, image_token_id: int | None = None, video_token_id: int | None = None,
    source: str = "config.json", towers_source: str = "tower_configs.json",
) -> Vica2Config:
    """Build our `Vica2Config` from a release `config.json` (model_type "vica_qwen"); `source` and `towers_source`
    name the files in errors. `towers` holds the SigLIP / Hiera hyper-parameters in the release's vocabulary
    (defaults: the towers the release hard-codes, SigLIP so400m and SAM2.1 hiera_b+)."""
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type != RELEASE_MODEL_TYPE:
        raise ConversionError(f"{source}: not a ViCA2 release config: model_type is {model_type!r}, expected "
                              "'vica_qwen'.")
    check_sizes(raw, source, "config.json")
    where = {name: f"{towers_source} [{name}]" for name in RELEASE_TOWERS}
    towers = {name: check_sizes({**RELEASE_TOWERS, **(towers or {})}[name], where[name], name) for name in where}
    for name, value in _FIXED_RELEASE_FIELDS.items():  # no setting of ours: the model reproduces only this value
        if raw.get(name, value) != value:
            raise ConversionError(f"{source}: field '{name}' is {raw[name]!r}; ViCA2 reproduces only {value!r}.")
    siglip = _sub_config(release_siglip_config(towers["siglip_vision_model"]), where["siglip_vision_model"],
                         "siglip_vision_model")
    if raw.get("mm_hidden_size", siglip.hidden_size) != siglip.hidden_size:
        raise ConversionError(
            f"{source}: field 'mm_hidden_size' is {raw['mm_hidden_size']}, but the SigLIP tower is "
            f"{siglip.hidden_size} wide (tower_configs.json, or the release's so400m): the projector was built for "
            "another vision tower."
        )
    hiera = _sub_config(release_hiera_config(towers["hiera"]), where["hiera"], "hiera")
    if len(hiera.window_size_per_stage) != len(hiera.blocks_per_stage):
        raise ConversionError(f"{where['hiera']}: field 'window_spec' has {len(hiera.window_size_per_stage)} entries "
                              f"for {len(hiera.blocks_per_stage)} stages.")
    index = raw.get("image_token_index", 151646)  # the release's placeholder id; the tokenizer's ids replace it
    if not _is_int(index) or index < 0:
        raise ConversionError(f"{source}: field 'image_token_index' must be a token id, got {_short(index)}.")
    text = {key: raw[key] for key in _QWEN2_FIELDS if key in raw}  # the release forces rope scaling off:
    rope = {"rope_type": "default", "rope_theta": raw.get("rope_theta", 1000000.0)}
    text = _sub_config({**text, "model_type": "qwen2", "rope_parameters": rope,
                        "tie_word_embeddings": raw.get("tie_word_embeddings", False)}, source, "config.json")
    pinpoints = raw.get("image_grid_pinpoints")  # the release lists [width, height]; ours are [height, width]
    if isinstance(pinpoints, list):
        pinpoints = [pair[::-1] if isinstance(pair, list) else pair for pair in pinpoints]
    with release_fields(source, _RELEASE_NAMES["config.json"]):
        return Vica2Config(
            text_config=text, vision_config=siglip, hiera_config=hiera,
            image_token_id=index if image_token_id is None else image_token_id,
            video_token_id=index + 1 if video_token_id is None else video_token_id,
            use_image_newline=True, image_grid_pinpoints=pinpoints or None,
            vision_aspect_ratio=raw.get("image_aspect_ratio", "anyres_max_9"),
            video_pool_mode=raw.get("mm_spatial_pool_mode", "bilinear"),
            # The release reads neither its pool-stride field nor a Hiera frame count: 2, 2 and 64 / 32 are hard-coded.
            siglip_pool_stride=2, hiera_pool_stride=2, video_frames_budget=64, hiera_frames=32, hiera_feature_stage=4,
            tie_word_embeddings=text.tie_word_embeddings,
        )


# ===================================================================================================== converter
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_MAX_SHARD_SIZE = "5GB"
DEFAULT_LICENSE = "apache-2.0"
# What ViCA2 is built from: LLaVA-Video-7B-Qwen2 (SigLIP, projector, Qwen2) and the SAM2.1 base-plus Hiera trunk.
DEFAULT_BASE_MODELS = ("lmms-lab/LLaVA-Video-7B-Qwen2", "facebook/sam2.1-hiera-base-plus")
RELEASE_MODEL_TYPE, LLAVA_MODEL_TYPES, HUB_MODEL_TYPE = "vica_qwen", ("llava_qwen", "llava"), "vica2"
IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
VOCAB_TENSORS = ("model.language_model.embed_tokens.weight", "lm_head.weight")
# Entry points of the remote code; the files they import relatively are found by following the imports.
REMOTE_CODE_ENTRY_FILES = ("configuration_vica2.py", "modeling_vica2.py", "processing_vica2.py",
                           "image_processing_vica2.py")
MODEL_AUTO_MAP = AUTO_MAP  # the config already carries it; named here next to the processor's
PROCESSOR_AUTO_MAP = {
    "AutoProcessor": "processing_vica2.Vica2Processor",
    "AutoImageProcessor": "image_processing_vica2.Vica2ImageProcessor",
}
PROCESSOR_CONFIG_FILES = ("processor_config.json", "preprocessor_config.json")
# The tokenizer files of a release; the JSON ones are checked before the tokenizer reads them (to name the file).
TOKENIZER_JSON_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json",
                        "vocab.json")
# Ownership marks. Every folder this converter writes holds OUTPUT_MARKER, listing its files: `overwrite` replaces
# only such a folder (holding nothing else) or an empty one. Every staging folder holds STAGING_LOCK, locked while its
# conversion runs: an unlocked one was left by a killed run and is removed.
WRITTEN_BY = "vica2 convert_checkpoint.py"
OUTPUT_MARKER, STAGING_PREFIX, STAGING_LOCK = ".vica2-converted.json", ".vica2-convert-", ".vica2-convert.lock"
_MAX_LISTED = 25  # names an error message lists per category before summarising


class ConversionError(ValueError):
    """The input cannot be converted as asked; the message says what is wrong and what to do."""


def _one_line(error) -> str:
    return " ".join(str(error).split())


def _short(value) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str, int, float, bool, type(None))) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _listing(names: list[str]) -> str:
    more = f", ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def _raise_problems(header: str, *categories: tuple[str, list[str]]) -> None:
    """One ConversionError, on one line, listing every non-empty category of offending names."""
    parts = [f"{len(names)} {title}: {_listing(names)}" for title, names in categories if names]
    if parts:
        raise ConversionError(" ".join([header, "; ".join(parts)]))


def _read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`, or a one-line ConversionError naming the file."""
    if not path.is_file():
        raise ConversionError(f"{what}: {path} not found.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{what}: {path} is not valid JSON ({_one_line(error)}).") from error
    except OSError as error:
        raise ConversionError(f"{what}: cannot read {path} ({_one_line(error)}).") from error
    if not isinstance(data, dict):
        raise ConversionError(f"{what}: {path} must hold a JSON object, not a {type(data).__name__}.")
    return data


# ------------------------------------------------------------------------------------------------ weight sources
@dataclass(frozen=True)
class Dropped:
    """An input tensor that is deliberately not converted, and why."""

    reason: str


KeyMapper = Callable[[str], "str | Dropped"]


def release_mapper(num_siglip_layers: int) -> KeyMapper:
    """Release (and LLaVA-Video) keys -> our names; the unused SigLIP weights are dropped with their reason."""

    def mapper(key: str) -> str | Dropped:
        target = release_key_to_hub(key, num_siglip_layers)
        if target is not None:
            return target
        if ".post_layernorm." in key:
            return Dropped("SigLIP post_layernorm: ViCA2 takes the features before it")
        if ".head." in key:
            return Dropped("SigLIP attention-pooling head: unused by ViCA2")
        return Dropped(f"SigLIP encoder layer beyond the {num_siglip_layers} kept (the release deletes the last one)")

    return mapper


def sam2_mapper(prefix: str, rename: Callable[[str], str]) -> KeyMapper:
    """SAM2 keys: the Hiera trunk under `prefix` is kept (Meta's `.pt`: `image_encoder.trunk.`, Meta's names; a
    transformers folder: `vision_encoder.backbone.`), every other SAM2 part is dropped."""

    def mapper(key: str) -> str | Dropped:
        if key.startswith(prefix):
            return "model.hiera_tower." + rename(key[len(prefix) :])
        return Dropped(f"SAM2 part outside the Hiera trunk ({key.split('.')[0]}.*): not used by ViCA2")

    return mapper


def identity_mapper(key: str) -> str:
    return key


@dataclass(frozen=True)
class TensorInfo:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Source:
    """Named tensors and how their keys become ours: a safetensors or `torch.save` file (`path`; `subkey` names the
    entry holding the tensors, "model" in Meta's SAM2 files), tensors made here (`data`: the fresh projector of
    ViCA2-init) or names and shapes only (`shapes`: e.g. the 7B key listing, enough to plan). `infos()` reads no
    tensor data where the format allows; `tensors()` yields one tensor at a time in the same order, so a conversion
    holds at most one input file in memory."""

    name: str
    mapper: KeyMapper
    path: Path | None = None
    subkey: str | None = None
    data: dict[str, torch.Tensor] | None = None
    shapes: list[TensorInfo] | None = None

    def infos(self) -> list[TensorInfo]:
        if self.shapes is not None:
            return list(self.shapes)
        if self.path is not None and self.path.suffix == ".safetensors":
            with self._safetensors() as f:  # from the header; an empty slice gives the dtype without the data
                slices = {key: f.get_slice(key) for key in f.keys()}
                return [TensorInfo(key, tuple(s.get_shape()), s[:0].dtype if s.get_shape() else f.get_tensor(key).dtype)
                        for key, s in slices.items()]
        return [TensorInfo(key, tuple(value.shape), value.dtype) for key, value in self.tensors()]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self.shapes is not None:
            raise ConversionError(f"{self.name} lists shapes only; it has no tensor data to convert.")
        if self.data is not None:
            yield from self.data.items()
        elif self.path.suffix == ".safetensors":
            with self._safetensors() as f:
                yield from ((key, f.get_tensor(key)) for key in f.keys())
        else:
            yield from self._torch_load().items()

    @contextlib.contextmanager
    def _safetensors(self):
        try:
            with safe_open(self.path, framework="pt", device="cpu") as f:
                yield f
        except ConversionError:
            raise
        except Exception as error:  # noqa: BLE001 - SafetensorError (header too small, incomplete buffer, ...)
            raise ConversionError(f"{self.path}: not a readable safetensors file (truncated or corrupt?): "
                                  f"{_one_line(error)}") from error

    def _torch_load(self) -> dict:
        """Loaded with `weights_only=True` (plain tensors, never arbitrary pickled objects), memory-mapped where the
        file format allows it (legacy non-zip files cannot be)."""
        try:
            try:
                state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - truncated files, UnpicklingError, ...: say which file and why
            raise ConversionError(
                f"Cannot read {self.path} as plain tensors (loaded with weights_only=True, which refuses arbitrary "
                f"pickled objects; a truncated file fails too): {_one_line(error)}"
            ) from error
        if self.subkey is not None:
            if not isinstance(state, dict) or self.subkey not in state:
                raise ConversionError(f"{self.path} has no '{self.subkey}' entry; expected Meta's SAM2.1 checkpoint.")
            state = state[self.subkey]
        if not isinstance(state, dict):
            raise ConversionError(f"{self.path} holds a {type(state).__name__}, not a dict of named tensors.")
        bad = [str(key) for key, value in state.items() if not isinstance(value, torch.Tensor)]
        if bad:
            raise ConversionError(f"{self.path} holds non-tensor entries: {_listing(bad)}")
        return state


def find_weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder: safetensors (single or indexed shards) first, else `.bin`. An index
    may name only plain file names next to it (a path from a data file never leaves its folder)."""
    for single in ("model.safetensors", "pytorch_model.bin"):
        index = folder / f"{single}.index.json"
        if index.is_file():
            weight_map = _read_json(index, "Weight index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
                raise ConversionError(f"{index}: field 'weight_map' must map tensor names to shard file names.")
            names = sorted(set(weight_map.values()))
            outside = [name for name in names if Path(name).name != name or name in ("", ".", "..")]
            if outside:
                raise ConversionError(f"{index}: field 'weight_map' names shards outside the checkpoint folder: "
                                      f"{_listing(outside)}")
            missing = [name for name in names if not (folder / name).is_file()]
            if missing:
                raise ConversionError(f"{index} lists shards that are not in {folder}: {_listing(missing)}")
            return [folder / name for name in names]
        if (folder / single).is_file():
            return [folder / single]
    raise ConversionError(f"No weights in {folder}: expected model.safetensors, model.safetensors.index.json + "
                          "shards, pytorch_model.bin or pytorch_model.bin.index.json + shards.")


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class ReleaseInputs:
    """What was found on disk: the release config and towers (in the release's vocabulary), generation settings."""

    kind: str  # "release" (a ViCA2 checkpoint) or "vica2-init" (LLaVA-Video + SAM2.1 assembled here)
    raw_config: dict
    towers: dict
    generation_config: dict | None
    input_dir: Path = Path(".")
    sam2_checkpoint: Path | None = None


def read_inputs(input_dir: Path, sam2_checkpoint: Path | None) -> ReleaseInputs:
    """Recognise the input folder and read its JSON files; refuse anything that is not a release we know."""
    raw = _read_json(input_dir / "config.json", "Input config")
    model_type = raw.get("model_type")
    if model_type == HUB_MODEL_TYPE or "Vica2ForConditionalGeneration" in (raw.get("architectures") or []):
        raise ConversionError(
            f"{input_dir} is already a converted ViCA2 hub folder (model_type '{HUB_MODEL_TYPE}'): there is nothing "
            "to convert. Load it with `from_pretrained(..., trust_remote_code=True)`, or pass the original release "
            "folder (model_type 'vica_qwen') to convert again."
        )
    if model_type == RELEASE_MODEL_TYPE and sam2_checkpoint is not None:
        raise ConversionError(f"{input_dir} is a ViCA2 release, which already has its Hiera tower; sam2_checkpoint "
                              "is only for assembling ViCA2-init from a LLaVA-Video-Qwen2 folder.")
    if model_type in LLAVA_MODEL_TYPES and sam2_checkpoint is None:
        raise ConversionError(
            f"{input_dir} is a LLaVA-Video-Qwen2 checkpoint (model_type '{model_type}') without a spatial tower. To "
            "assemble ViCA2-init, pass the SAM2.1 Hiera weights with sam2_checkpoint= (Meta's .pt or a transformers "
            "SAM2 folder)."
        )
    if model_type != RELEASE_MODEL_TYPE and model_type not in LLAVA_MODEL_TYPES:
        raise ConversionError(
            f"{input_dir}/config.json has model_type {model_type!r}; expected a ViCA2 release ('vica_qwen') or, with "
            f"sam2_checkpoint, a LLaVA-Video-Qwen2 folder ({' or '.join(map(repr, LLAVA_MODEL_TYPES))})."
        )
    raw = check_sizes({**raw, "model_type": RELEASE_MODEL_TYPE}, str(input_dir / "config.json"), "config.json")
    towers, generation = input_dir / "tower_configs.json", input_dir / "generation_config.json"
    towers = _read_json(towers, "Tower config") if towers.is_file() else {}
    generation = _read_json(generation, "Generation config") if generation.is_file() else None
    kind = "release" if model_type == RELEASE_MODEL_TYPE else "vica2-init"
    return ReleaseInputs(kind, raw, towers, generation, input_dir, sam2_checkpoint)


def weight_sources(inputs: ReleaseInputs, config: Vica2Config, projector_seed: int) -> list[Source]:
    """Every weight file of the inputs with its key mapper (and, for ViCA2-init, the fresh spatial projector)."""
    mapper = release_mapper(config.vision_config.num_hidden_layers)
    sources = [Source(path.name, mapper, path) for path in find_weight_files(inputs.input_dir)]
    if inputs.kind == "vica2-init":
        sources += sam2_sources(Path(inputs.sam2_checkpoint), config.hiera_config)
        projector = spatial_projector_init(config, projector_seed)
        sources.append(Source(f"spatial projector (seed {projector_seed})", identity_mapper, data=projector))
    return sources


# The Sam2HieraDetConfig fields that decide shapes or the computation; a SAM2 folder must agree with our Hiera.
_HIERA_CONFIG_FIELDS = (
    "hidden_size", "num_attention_heads", "query_stride", "window_positional_embedding_background_size",
    "num_query_pool_stages", "blocks_per_stage", "embed_dim_per_stage", "num_attention_heads_per_stage",
    "window_size_per_stage", "global_attention_blocks",
)


def sam2_sources(path: Path, hiera) -> list[Source]:
    """The Hiera trunk of a SAM2.1 checkpoint: Meta's `.pt` file (no config: its trunk shapes are checked against
    ours, its window sizes cannot be), or a transformers SAM2 folder (its Hiera config must equal ours)."""
    if path.is_file():
        return [Source(path.name, sam2_mapper("image_encoder.trunk.", hiera_trunk_key), path, subkey="model")]
    if not path.is_dir():
        raise ConversionError(f"sam2_checkpoint {path} does not exist.")
    config = _read_json(path / "config.json", "SAM2 config")
    backbone = config.get("vision_config")
    backbone = backbone.get("backbone_config") if isinstance(backbone, dict) else None
    if not str(config.get("model_type")).startswith("sam2") or not isinstance(backbone, dict):
        raise ConversionError(
            f"{path} is not a transformers SAM2 folder (config.json needs model_type 'sam2' and "
            "vision_config.backbone_config); pass Meta's sam2.1_hiera_*.pt file or a transformers SAM2 folder."
        )
    listed = lambda value: list(value) if isinstance(value, (list, tuple)) else value  # noqa: E731
    different = [f"{name}: {backbone[name]!r} (SAM2) vs {getattr(hiera, name)!r} (ViCA2)" for name in
                 _HIERA_CONFIG_FIELDS if name in backbone and listed(backbone[name]) != listed(getattr(hiera, name))]
    if different:
        raise ConversionError(f"The SAM2 checkpoint's Hiera is not the one ViCA2 uses: {'; '.join(different)}")
    mapper = sam2_mapper("vision_encoder.backbone.", identity_mapper)
    return [Source(file.name, mapper, file) for file in find_weight_files(path)]


def spatial_projector_init(config: Vica2Config, seed: int) -> dict[str, torch.Tensor]:
    """Fresh weights for the spatial (Hiera) projector of ViCA2-init: N(0, text_config.initializer_range) weights and
    zero biases, what `from_pretrained` gives a Linear missing from a Qwen2-based checkpoint (what the release got
    when it added its `sam_projector` to LLaVA-Video), drawn from a generator seeded with `seed` (reproducible)."""
    generator = torch.Generator().manual_seed(seed)
    hidden, width = config.text_config.hidden_size, config.spatial_projector_input_size
    std = getattr(config.text_config, "initializer_range", 0.02)
    return {
        "model.hiera_projector.linear_1.weight": torch.randn(hidden, width, generator=generator) * std,
        "model.hiera_projector.linear_1.bias": torch.zeros(hidden),
        "model.hiera_projector.linear_2.weight": torch.randn(hidden, hidden, generator=generator) * std,
        "model.hiera_projector.linear_2.bias": torch.zeros(hidden),
    }


# ------------------------------------------------------------------------------------------------ vocabulary
@dataclass(frozen=True)
class Vocabulary:
    """How the release's vocabulary becomes ours (README, "The vocabulary rule"): every row is kept,
    `generatable_vocab_size` is the tokenizer's original length, `<image>`/`<video>` take spare rows where the matrix
    has them, else the matrices grow by the missing rows (the mean of the tokenizer's rows; never read nor
    generated)."""

    release_rows: int
    tokenizer_size: int
    image_token_id: int
    video_token_id: int

    @property
    def rows(self) -> int:
        return max(self.release_rows, self.image_token_id + 1, self.video_token_id + 1)

    @property
    def added_rows(self) -> int:
        return self.rows - self.release_rows


def add_placeholder_tokens(tokenizer, release_rows: int) -> Vocabulary:
    """Add `<image>` and `<video>` to the tokenizer as special tokens (kept when already there)."""
    from transformers import AddedToken

    tokenizer_size = len(tokenizer)
    if tokenizer_size > release_rows:
        raise ConversionError(f"The tokenizer has {tokenizer_size} tokens but the checkpoint's embedding only "
                              f"{release_rows} rows: they do not belong together.")
    missing = [token for token in (IMAGE_TOKEN, VIDEO_TOKEN) if token not in tokenizer.get_vocab()]
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in missing], special_tokens=True)
    image_id, video_id = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, VIDEO_TOKEN])
    # Placeholders already in the tokenizer sit at its end; they are not generatable either.
    return Vocabulary(release_rows, min(tokenizer_size, image_id, video_id), image_id, video_id)


def load_tokenizer(folder: Path):
    """The release's tokenizer, as one of transformers' own classes, padding on the left (generation batches).

    Nothing from the folder runs: a tokenizer whose files name code (`auto_map`, or a `tokenizer_class` that is not
    a transformers class) is refused, the load itself passes `trust_remote_code=False`, and the output ships no `.py`
    file but our own (`copy_remote_code` checks).
    """
    from transformers import AutoTokenizer, PretrainedConfig
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    source = folder / "tokenizer_config.json"
    for name in TOKENIZER_JSON_FILES:  # name a malformed file here, not deep inside the tokenizer
        if (folder / name).is_file():
            _read_json(folder / name, "Tokenizer file")
    settings = _read_json(source, "Tokenizer file") if source.is_file() else {}
    tokenizer_class = settings.get("tokenizer_class")
    if settings.get("auto_map"):
        names = _short(settings["auto_map"])
        raise _tokenizer_needs_code(source, f"its field 'auto_map' names tokenizer code ({names})")
    if tokenizer_class is not None and not isinstance(tokenizer_class, str):
        raise ConversionError(f"{source}: field 'tokenizer_class' must be a string, got {_short(tokenizer_class)}.")
    if tokenizer_class is not None and tokenizer_class_from_name(tokenizer_class) is None:
        raise _tokenizer_needs_code(source, f"its field 'tokenizer_class' is {tokenizer_class!r}, which is not a "
                                    "transformers tokenizer")
    try:  # a bare config keeps AutoTokenizer from parsing the release config; padding_side is saved with it
        tokenizer = AutoTokenizer.from_pretrained(folder, config=PretrainedConfig(), trust_remote_code=False,
                                                  padding_side="left")
    except Exception as error:  # noqa: BLE001 - any failure here means the folder's tokenizer is unusable
        if "trust_remote_code" in str(error):
            raise _tokenizer_needs_code(source, "transformers says it needs custom code") from error
        raise ConversionError(f"Cannot load the tokenizer from {folder}: {_one_line(error)}") from error
    if not type(tokenizer).__module__.startswith("transformers.") or getattr(tokenizer, "_auto_class", None):
        raise _tokenizer_needs_code(source, f"it loads as {type(tokenizer).__module__}.{type(tokenizer).__name__}")
    return tokenizer


def _tokenizer_needs_code(source: Path, why: str) -> ConversionError:
    return ConversionError(
        f"{source}: refused: the tokenizer needs code that comes with the checkpoint ({why}); the converter never "
        "runs or ships code from its input. Use the release's standard Qwen2 tokenizer files (tokenizer_class "
        "'Qwen2Tokenizer', no auto_map)."
    )


def build_hub_config(inputs: ReleaseInputs, vocabulary: Vocabulary, dtype: torch.dtype) -> Vica2Config:
    """Our config for the output: the release's, plus the vocabulary rule, the dtype and the full auto_map."""
    config = release_config_to_vica2(
        {**inputs.raw_config, "vocab_size": vocabulary.rows},  # with the rows added for <image>/<video>, if any
        inputs.towers, vocabulary.image_token_id, vocabulary.video_token_id,
        str(inputs.input_dir / "config.json"), str(inputs.input_dir / "tower_configs.json"),
    )
    config.generatable_vocab_size = vocabulary.tokenizer_size
    config.architectures = ["Vica2ForConditionalGeneration"]
    config.auto_map = {**(getattr(config, "auto_map", None) or {}), **MODEL_AUTO_MAP, **PROCESSOR_AUTO_MAP}
    config.dtype = config.text_config.dtype = config.vision_config.dtype = config.hiera_config.dtype = dtype
    return config


def default_dtype(inputs: ReleaseInputs) -> torch.dtype:
    """The dtype the release was saved in (bfloat16 for ViCA2-7B)."""
    name = next((key for key in ("torch_dtype", "dtype") if inputs.raw_config.get(key) is not None), None)
    value = inputs.raw_config[name] if name else "float32"
    if not isinstance(value, str) or value.replace("torch.", "") not in DTYPES:
        raise ConversionError(f"{inputs.input_dir / 'config.json'}: field '{name}' must be null or one of "
                              f"{', '.join(DTYPES)}, got {_short(value)}.")
    return DTYPES[value.replace("torch.", "")]


# ------------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class PlannedTensor:
    source_index: int
    key: str
    target: str
    shape: tuple[int, ...]  # output shape (the vocabulary matrices may grow)


@dataclass
class ConversionPlan:
    """Every input tensor's fate, checked against the model before anything is written."""

    config: Vica2Config
    vocabulary: Vocabulary
    dtype: torch.dtype
    sources: list[Source]
    tensors: list[PlannedTensor]
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (input key, reason)

    def output_bytes(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return sum(torch.Size(t.shape).numel() for t in self.tensors) * itemsize


def expected_tensors(config: Vica2Config) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor the model loads, from a meta-device model (no memory, no init cost)."""
    from vica2.modeling_vica2 import Vica2ForConditionalGeneration

    with torch.device("meta"):
        model = Vica2ForConditionalGeneration(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _input_shape(target: str, shape: tuple[int, ...], vocabulary: Vocabulary) -> tuple[int, ...]:
    """The shape the input must have for `target`: the vocabulary matrices have the release's row count."""
    return (vocabulary.release_rows, *shape[1:]) if target in VOCAB_TENSORS else shape


def plan_conversion(sources: list[Source], config: Vica2Config, vocabulary: Vocabulary, dtype) -> ConversionPlan:
    """Map every input key, and abort listing every unknown, unexpected, duplicate, mis-shaped or missing tensor."""
    expected = expected_tensors(config)
    plan = ConversionPlan(config, vocabulary, dtype, sources, [])
    unknown, unexpected, duplicate, misshaped, not_float, seen = [], [], [], [], [], {}
    for index, source in enumerate(sources):
        for info in source.infos():
            try:
                target = source.mapper(info.key)
            except KeyError:
                unknown.append(f"{info.key} ({source.name})")
                continue
            if isinstance(target, Dropped):
                plan.dropped.append((info.key, target.reason))
            elif target not in expected:
                unexpected.append(f"{info.key} -> {target}")
            elif target in seen:
                duplicate.append(f"{target} (from {seen[target]} and {info.key})")
            else:
                seen[target] = info.key
                wanted = _input_shape(target, expected[target], vocabulary)
                if info.shape != wanted:
                    misshaped.append(f"{info.key}: checkpoint {list(info.shape)}, model expects {list(wanted)} "
                                     f"({source.name})")
                if not info.dtype.is_floating_point:  # ids or flags stored as weights: a cast would hide the damage
                    not_float.append(f"{info.key} ({str(info.dtype).replace('torch.', '')}, {source.name})")
                plan.tensors.append(PlannedTensor(index, info.key, target, expected[target]))
    _raise_problems(
        "The checkpoint does not match the ViCA2 model; nothing was written.",
        ("unknown keys (not a release weight we know)", unknown),
        ("keys that map onto no model tensor", unexpected),
        ("model tensors given twice", duplicate),
        ("mis-shaped tensors", misshaped),
        ("non-floating tensors (ViCA2 weights are floating point)", not_float),
        ("model tensors missing from the checkpoint", [name for name in expected if name not in seen]),
    )
    return plan


# ------------------------------------------------------------------------------------------------ weights out
def convert_tensor(tensor: torch.Tensor, planned: PlannedTensor, plan: ConversionPlan) -> torch.Tensor:
    """The output tensor for one input tensor: vocabulary rows appended where needed (the mean of the tokenizer's
    rows), cast, contiguous and owning its memory (memory-mapped `.bin` tensors may be views into a shared storage,
    which safetensors refuses), and finite."""
    if tensor.shape != _input_shape(planned.target, planned.shape, plan.vocabulary):
        raise ConversionError(f"{planned.key} changed shape while converting: {list(tensor.shape)}")
    added = plan.vocabulary.added_rows if planned.target in VOCAB_TENSORS else 0
    if added:
        mean = tensor[: plan.vocabulary.tokenizer_size].float().mean(0, keepdim=True).to(tensor.dtype)
        tensor = torch.cat([tensor, mean.expand(added, -1)])
    converted = tensor.to(plan.dtype).contiguous()
    if converted.untyped_storage().nbytes() != converted.nbytes:
        converted = converted.clone()
    check_finite(tensor, converted, f"{plan.sources[planned.source_index].name}: tensor {planned.key}")
    return converted


def check_finite(tensor: torch.Tensor, converted: torch.Tensor, where: str) -> None:
    """Refuse a weight with NaN or inf values, whether the input holds them or the cast to the output dtype makes
    them (a float32 value beyond float16's range). Checked in chunks: no full-size temporary for the embedding."""
    if _all_finite(converted):
        return
    if _all_finite(tensor):
        raise ConversionError(
            f"{where}: values up to {tensor.detach().abs().max().item():.3g} overflow "
            f"{str(converted.dtype).replace('torch.', '')} when cast; convert with dtype=bfloat16 or float32. Nothing "
            "was written."
        )
    flat = tensor.detach().reshape(-1)
    raise ConversionError(f"{where} holds {int(torch.isnan(flat).sum())} NaN and {int(torch.isinf(flat).sum())} inf "
                          f"value(s) out of {flat.numel()}: the input is corrupt (re-download or re-export it). "
                          "Nothing was written.")


def _all_finite(tensor: torch.Tensor, chunk: int = 1 << 24) -> bool:
    return all(bool(torch.isfinite(part).all()) for part in tensor.detach().reshape(-1).split(chunk))


def stream_converted(plan: ConversionPlan, progress: bool = False) -> Iterator[tuple[PlannedTensor, torch.Tensor]]:
    """Yield (planned tensor, converted tensor) reading one input file at a time."""
    by_source_key = {(t.source_index, t.key): t for t in plan.tensors}
    with tqdm(total=len(plan.tensors), unit="tensor", desc="Converting", disable=not progress) as bar:
        for index, source in enumerate(plan.sources):
            bar.set_postfix_str(source.name)
            for key, tensor in source.tensors():
                planned = by_source_key.get((index, key))
                if planned is not None:  # else dropped (listed in the plan)
                    yield planned, convert_tensor(tensor, planned, plan)
                    bar.update()


class ShardWriter:
    """Writes output shards as they fill. The shard layout is planned up front (huggingface_hub's splitter, in
    streaming order), so every file gets its final name at once and only the shard being filled is held in memory."""

    def __init__(self, folder: Path, plan: ConversionPlan, max_shard_size: int | str):
        meta = {t.target: torch.empty(t.shape, dtype=plan.dtype, device="meta") for t in plan.tensors}
        self.split = split_torch_state_dict_into_shards(meta, filename_pattern="model{suffix}.safetensors",
                                                        max_shard_size=max_shard_size)
        self.folder, self.buffers = folder, {}
        self.pending = {name: set(tensors) for name, tensors in self.split.filename_to_tensors.items()}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        filename = self.split.tensor_to_filename[name]
        self.buffers.setdefault(filename, {})[name] = tensor
        self.pending[filename].discard(name)
        if not self.pending[filename]:
            save_file(self.buffers.pop(filename), self.folder / filename, metadata={"format": "pt"})
            umask = os.umask(0)  # safetensors writes a private temporary file (0600): give the shard the usual mode
            os.umask(umask)
            os.chmod(self.folder / filename, 0o666 & ~umask)

    def finish(self) -> list[str]:
        unwritten = sorted(name for names in self.pending.values() for name in names)
        if unwritten:
            raise ConversionError(f"Tensors were planned but never read from the input: {_listing(unwritten)}")
        if self.split.is_sharded:
            index = {"metadata": self.split.metadata, "weight_map": self.split.tensor_to_filename}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        return sorted(self.split.filename_to_tensors)


def write_weights(plan: ConversionPlan, folder: Path, max_shard_size: int | str, progress: bool) -> list[str]:
    writer = ShardWriter(folder, plan, max_shard_size)
    for planned, tensor in stream_converted(plan, progress):
        writer.add(planned.target, tensor)
    return writer.finish()


# ------------------------------------------------------------------------------------------------ other files
def build_generation_config(inputs: ReleaseInputs, tokenizer):
    """The release's generation settings, with `<|im_end|>` (the tokenizer's eos) as end of turn and a pad id; built
    and validated before anything is written."""
    from transformers import GenerationConfig

    source = inputs.input_dir / "generation_config.json"
    settings = {key: value for key, value in (inputs.generation_config or {}).items()
                if not key.startswith("_") and key != "transformers_version"}
    eos = settings.get("eos_token_id", inputs.raw_config.get("eos_token_id"))
    eos = [eos] if _is_int(eos) else [] if eos is None else eos
    if not isinstance(eos, list) or not all(_is_int(token) and token >= 0 for token in eos):
        raise ConversionError(f"{source}: field 'eos_token_id' must be a token id, a list of token ids or null, got "
                              f"{_short(eos)}.")
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.insert(0, tokenizer.eos_token_id)
    settings["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    settings.setdefault("bos_token_id", inputs.raw_config.get("bos_token_id"))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else settings.get("pad_token_id")
    settings["pad_token_id"] = pad if pad is not None else eos[0]
    try:
        generation = GenerationConfig(**settings)
        generation.validate(strict=True)  # what save_pretrained would raise, raised now
    except Exception as error:  # noqa: BLE001 - ValueError / TypeError from the library's checks
        raise ConversionError(f"{source}: not a valid generation config: {_one_line(error)}") from error
    return generation


def write_generation_config(folder: Path, generation) -> None:
    generation.save_pretrained(folder)


def write_processor(folder: Path, config: Vica2Config, tokenizer) -> None:
    """The processor files (processor/preprocessor config, chat template) and the tokenizer, with the full
    processor auto_map so `AutoProcessor`/`AutoImageProcessor` load them with `trust_remote_code=True`."""
    from vica2.processing_vica2 import Vica2Processor

    processor = Vica2Processor.from_model_config(config, tokenizer)
    processor.save_pretrained(folder)
    for name in PROCESSOR_CONFIG_FILES:
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            data["auto_map"] = {**data.get("auto_map", {}), **PROCESSOR_AUTO_MAP}
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def remote_code_files(root: Path = REPO_ROOT) -> list[Path]:
    """The entry files and, recursively, every file they import with `from .x import` (as transformers does)."""
    from transformers.dynamic_module_utils import get_relative_import_files

    files = set()
    for entry in (root / name for name in REMOTE_CODE_ENTRY_FILES):
        if not entry.is_file():
            raise ConversionError(f"Remote-code file {entry} is missing from this checkout.")
        try:
            files.update([entry, *map(Path, get_relative_import_files(entry))])
        except FileNotFoundError as error:
            raise ConversionError(f"{entry.name} imports {Path(error.filename).name} (relatively), which is missing "
                                  f"from {root}.") from error
    return sorted(files)


def copy_remote_code(folder: Path, root: Path = REPO_ROOT) -> list[str]:
    """Copy our remote code into `folder`, then check that its Python files are exactly that code: nothing from the
    input (a tokenizer's `save_pretrained` copies its class's module when it has one) rides along."""
    files = remote_code_files(root)
    for path in files:
        shutil.copyfile(path, folder / path.name)
    names = [path.name for path in files]
    foreign = sorted(path.name for path in folder.iterdir() if path.suffix == ".py" and path.name not in names)
    if foreign:
        raise ConversionError(f"The output would ship code that is not ViCA2's remote code ({_listing(foreign)}); "
                              "nothing was written.")
    return names


def token_ratio_rows(config: Vica2Config) -> list[tuple[str, int, int, int]]:
    """(setting, SigLIP tokens, Hiera tokens, total) for a full-budget video at the default and a few overrides."""
    settings = {"defaults": {}}
    if config.hiera_frames % 2 == 0:
        settings[f"hiera_frames={config.hiera_frames // 2}"] = {"hiera_frames": config.hiera_frames // 2}
    settings[f"hiera_pool_stride={config.hiera_pool_stride * 2}"] = {"hiera_pool_stride": config.hiera_pool_stride * 2}
    counts = {name: config.num_video_tokens(config.video_frames_budget, **kw) for name, kw in settings.items()}
    return [(name, siglip, hiera, siglip + hiera) for name, (siglip, hiera) in counts.items()]


def build_model_card(config: Vica2Config, inputs: ReleaseInputs, base_models: list[str], license: str,
                     repo_id: str | None) -> ModelCard:
    data = ModelCardData(library_name="transformers", pipeline_tag="image-text-to-text", base_model=list(base_models),
                         license=license, tags=["video-text-to-text", "multimodal", "spatial-reasoning", "vica2",
                                                "custom_code"])
    name = repo_id or "path/to/this/folder"
    what = ("ViCA2, converted from the research release" if inputs.kind == "release" else
            "ViCA2-init: LLaVA-Video-Qwen2 + the SAM2.1 Hiera trunk, with a freshly initialised spatial projector "
            "(a starting point for training, not a trained model)")
    ratio_table = "\n".join(f"| {setting} | {siglip:,} | {hiera:,} | {total:,} |"
                            for setting, siglip, hiera, total in token_ratio_rows(config))
    return ModelCard(f"""---\n{data.to_yaml()}\n---
# ViCA2 (transformers remote code)

{what}. ViCA2 puts two vision encoders in front of Qwen2: SigLIP for semantics and the SAM2.1 Hiera trunk for
spatial structure; each visual item becomes [SigLIP tokens ; Hiera tokens].

## Usage

```python
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{name}", trust_remote_code=True, dtype="auto", device_map="auto")
processor = AutoProcessor.from_pretrained("{name}", trust_remote_code=True)

messages = [{{"role": "user", "content": [
    {{"type": "video", "path": "room.mp4"}},
    {{"type": "text", "text": "How many chairs are in the room?"}},
]}}]
inputs = processor.apply_chat_template(
    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
).to(model.device)
output = model.generate(**inputs, max_new_tokens=32)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

## Token-ratio settings

A video is sampled to `video_frames_budget` = {config.video_frames_budget} frames. SigLIP encodes every frame
(pool stride `siglip_pool_stride` = {config.siglip_pool_stride}); Hiera encodes every k-th frame with
k = `video_frames_budget` / `hiera_frames` = {config.video_frames_budget} / {config.hiera_frames}, takes stage
`hiera_feature_stage` = {config.hiera_feature_stage} and pools it with `hiera_pool_stride` = {config.hiera_pool_stride}.
The first four can be overridden per call where the processor is called (`processor(...)`,
`apply_chat_template(...)`): it emits the placeholders and the `video_token_ratio` the model follows, so the two
always agree. `hiera_feature_stage` is fixed by the trained spatial projector.

| setting | SigLIP tokens | Hiera tokens | total ({config.video_frames_budget} frames) |
|---|---|---|---|
{ratio_table}

## Vocabulary

`<image>` (id {config.image_token_id}) and `<video>` (id {config.video_token_id}) are special tokens of the tokenizer.
Ids at or above `generatable_vocab_size` = {config.generatable_vocab_size} (the release tokenizer's size) are never
generated: the model sets their logits to -inf, as the release did by shrinking its embeddings to the tokenizer.
""")


# ------------------------------------------------------------------------------------------------ output folder
def check_output_dir(output_dir: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Refuse an existing output without `overwrite`, any output that would replace an input, and, with
    `overwrite`, any existing folder that is neither empty nor one this converter wrote."""
    for path in (path.resolve() for path in inputs):
        if output_dir.resolve() in (path, *path.parents):
            raise ConversionError(f"output_dir={output_dir} would replace the input {path}; choose another folder.")
    if (output_dir.exists() or output_dir.is_symlink()) and not overwrite:
        raise ConversionError(f"{output_dir} already exists; pass overwrite=True to replace it, or choose another "
                              "folder.")
    if output_dir.exists() or output_dir.is_symlink():
        check_replaceable(output_dir)


def check_replaceable(output_dir: Path) -> None:
    """`overwrite` deletes only what this converter made: an empty folder, or a converted folder (it holds
    OUTPUT_MARKER) with nothing in it but the files the marker lists."""
    refuse = f"overwrite=True refuses to replace {output_dir}:"
    if output_dir.is_symlink() or not output_dir.is_dir():
        raise ConversionError(f"{refuse} it is not a folder (a file or a link). Choose another output_dir.")
    entries = sorted(path.name for path in output_dir.iterdir())
    written = _marked(output_dir / OUTPUT_MARKER).get("files")
    if entries and not isinstance(written, list):
        raise ConversionError(f"{refuse} it is not empty and this converter did not write it (no {OUTPUT_MARKER}); "
                              "it would delete files that are not its own. Remove it yourself or choose another "
                              "output_dir.")
    foreign = [name for name in entries
               if name != OUTPUT_MARKER and (name not in written or not (output_dir / name).is_file())]
    if foreign:
        raise ConversionError(f"{refuse} it holds entries this converter did not write ({_listing(foreign)}). Move "
                              "them out or choose another output_dir.")


def _marked(path: Path) -> dict:
    """The contents of one of our marks (output marker or staging lock), or {} when `path` is not a valid one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() and not path.is_symlink() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("written_by") == WRITTEN_BY else {}


def write_output_marker(folder: Path) -> None:
    """Mark `folder` as written by this converter, listing its files (what a later `overwrite` may replace)."""
    files = sorted(path.name for path in folder.iterdir() if path.name != OUTPUT_MARKER)
    (folder / OUTPUT_MARKER).write_text(json.dumps({"written_by": WRITTEN_BY, "files": files}, indent=1) + "\n")


def remove_stale_staging(parent: Path) -> None:
    """Remove the staging folders that killed conversions left next to the output (each up to the output's size):
    only provably ours, a `.vica2-convert-*` folder holding our lock file, which no running conversion holds. One
    without it (or without file locks, on Windows) is named and left alone."""
    for folder in sorted(parent.glob(STAGING_PREFIX + "*")) if parent.is_dir() else ():
        if folder.is_symlink() or not folder.is_dir():
            continue
        if fcntl is None or not _marked(folder / STAGING_LOCK):
            logger.warning("Left alone (not provably a staging folder of this converter): %s", folder)
            continue
        try:
            with open(folder / STAGING_LOCK, "rb") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # a running conversion holds it
                files = [path for path in folder.rglob("*") if path.is_file() and not path.is_symlink()]
                size = sum(path.stat().st_size for path in files)
                shutil.rmtree(folder)
        except FileNotFoundError:
            continue  # another conversion removed it first
        except OSError as error:
            logger.warning("Could not remove %s, left by an interrupted conversion: %s", folder, error)
            continue
        logger.warning("Removed %s, left by an interrupted conversion (%.2f GB).", folder, size / 1e9)


def _hold_staging_lock(staging_root: Path):
    """Create STAGING_LOCK in `staging_root`, locked for as long as the returned handle stays open. The file is
    locked under a temporary name and then renamed, so no other run ever sees it unlocked while this one lives."""
    if fcntl is None:
        return None
    descriptor, temporary = tempfile.mkstemp(dir=staging_root, prefix=".lock-")
    handle = os.fdopen(descriptor, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a file system without locks: convert anyway; a leftover is then only reported
        handle.close()
        os.unlink(temporary)
        return None
    handle.write(json.dumps({"written_by": WRITTEN_BY, "pid": os.getpid()}))
    handle.flush()
    os.replace(temporary, staging_root / STAGING_LOCK)
    return handle


@contextlib.contextmanager
def staged_output(output_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a folder to write into, next to `output_dir` (same file system), and move it into place only when the
    block succeeds. On an error nothing is left behind; a hard kill leaves a hidden `.vica2-convert-*` folder, which
    the next conversion next to it removes. The staged folder has the output's own name, so remote-code module names
    are the same before and after."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(output_dir.parent)
    staging_root = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=output_dir.parent))
    lock = None
    try:
        lock = _hold_staging_lock(staging_root)
        staged, previous = staging_root / output_dir.name, staging_root / (output_dir.name + ".previous")
        staged.mkdir()
        yield staged
        write_output_marker(staged)
        if output_dir.exists() or output_dir.is_symlink():
            if not overwrite:
                raise ConversionError(f"{output_dir} appeared during the conversion; it was left untouched.")
            check_replaceable(output_dir)  # again: it may have changed since the start
            os.replace(output_dir, previous)  # kept until the new folder is in place
        try:
            os.replace(staged, output_dir)
        except OSError:
            if previous.exists():
                os.replace(previous, output_dir)
            raise
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
        if lock is not None:
            lock.close()


# ------------------------------------------------------------------------------------------------ verification
def verify_conversion(folder: Path, plan: ConversionPlan) -> None:
    """Reload `folder` as the hub would, compare every tensor with its converted input (exactly), and run one short
    forward on a synthetic video; raise ConversionError on any mismatch or non-finite logit."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    state = model.state_dict()
    mismatched, compared = [], set()
    for planned, expected in stream_converted(plan):
        loaded = state.get(planned.target)
        if loaded is None or loaded.dtype != expected.dtype or not torch.equal(loaded, expected):
            mismatched.append(planned.target)
        compared.add(planned.target)
    _raise_problems(
        "Verification failed; the output was not moved into place.",
        ("tensors that differ after reloading", mismatched),
        ("tensors never compared", [name for name in expected_tensors(plan.config) if name not in compared]),
    )
    logits = smoke_forward(model)
    if not torch.isfinite(logits[..., : model.config.generatable_vocab_size or logits.shape[-1]]).all():
        raise ConversionError(
            "Verification failed; the output was not moved into place: the reloaded model's logits on a synthetic "
            f"video are not finite, although every weight is (checked while converting). {non_finite_cause(model)}"
        )
    logger.info("Verified %d tensors and a forward pass (%d positions).", len(compared), logits.shape[1])


def non_finite_cause(model) -> str:
    """Name the first module (in execution order) whose output is not finite on the smoke input, and what to do."""
    names, first = {module: name for name, module in model.named_modules() if name}, []

    def record(module, args, output):
        tensors = output if isinstance(output, (tuple, list)) else (getattr(output, "last_hidden_state", output),)
        if not first and any(isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all()
                             for t in tensors):
            first.append(f"{names[module]} ({type(module).__name__})")

    handles = [module.register_forward_hook(record) for module in names]
    try:
        smoke_forward(model)
    finally:
        for handle in handles:
            handle.remove()
    dtype = str(model.dtype).replace("torch.", "")
    if not first:
        return f"No module's output is non-finite when run again ({dtype}): the logits themselves overflow."
    advice = "convert with dtype=bfloat16 or float32" if model.dtype == torch.float16 else "check the checkpoint"
    return (f"The first module with a non-finite output is {first[0]}, computing in {dtype}: its activations "
            f"overflow; {advice}.")


@torch.no_grad()
def smoke_forward(model) -> torch.Tensor:
    """Logits of the model on a tiny random video (enough frames for one Hiera frame) inside a short prompt."""
    config, generator = model.config, torch.Generator().manual_seed(0)
    num_frames = config.video_frames_budget // config.hiera_frames
    sizes = [config.vision_config.image_size, config.hiera_config.image_size]
    sizes = [size[0] if isinstance(size, (list, tuple)) else size for size in sizes]
    siglip, hiera = (torch.randn(1, num_frames, 3, size, size, generator=generator).to(model.dtype) for size in sizes)
    text = list(range(1, 5))
    input_ids = torch.tensor([text + [config.video_token_id] * sum(config.num_video_tokens(num_frames)) + text])
    model.eval()
    return model(input_ids=input_ids, pixel_values_videos=siglip, hiera_pixel_values_videos=hiera).logits.float()


# ------------------------------------------------------------------------------------------------ hub
def check_hub_access(repo_id: str) -> None:
    """Fail before any conversion work when the upload could not happen (offline, no network, not logged in)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except Exception as error:  # noqa: BLE001 - HFValidationError: say it in our words
        raise ConversionError(f"push_to_hub={repo_id!r} is not a valid repo id: {error}") from error
    if constants.is_offline_mode():
        raise ConversionError(f"push_to_hub={repo_id}: the Hugging Face Hub is in offline mode (HF_HUB_OFFLINE is "
                              "set); nothing was converted. Unset it, or convert without push_to_hub and upload the "
                              "folder later.")
    try:
        HfApi().whoami()
    except Exception as error:  # noqa: BLE001 - network errors, missing token, ...: all mean "cannot upload"
        raise ConversionError(
            f"push_to_hub={repo_id}: cannot reach the Hugging Face Hub as a logged-in user ({type(error).__name__}: "
            f"{error}); nothing was converted. Log in (`hf auth login` or HF_TOKEN) and check the network, or convert "
            "without push_to_hub."
        ) from error


def push_folder(folder: Path, repo_id: str, private: bool) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", commit_message="Upload converted ViCA2",
                      ignore_patterns=[OUTPUT_MARKER])  # a local ownership mark, not part of the model
    return str(url)


# ------------------------------------------------------------------------------------------------ entry points
@dataclass
class ConversionResult:
    output_dir: Path
    kind: str
    dtype: torch.dtype
    num_tensors: int
    num_bytes: int
    weight_files: list[str]
    dropped: list[tuple[str, str]]
    vocabulary: Vocabulary
    remote_code: list[str]
    verified: bool
    hub_url: str | None = None


def prepare_conversion(input_dir: Path, sam2_checkpoint: Path | None = None, dtype=None, projector_seed: int = 0):
    """Read and check everything, write nothing: (inputs, tokenizer with placeholders, plan)."""
    inputs = read_inputs(input_dir, sam2_checkpoint)
    tokenizer = load_tokenizer(input_dir)
    vocabulary = add_placeholder_tokens(tokenizer, inputs.raw_config["vocab_size"])
    dtype = default_dtype(inputs) if dtype is None else DTYPES.get(dtype, dtype)
    if dtype not in DTYPES.values():
        raise ConversionError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    config = build_hub_config(inputs, vocabulary, dtype)
    return inputs, tokenizer, plan_conversion(weight_sources(inputs, config, projector_seed), config, vocabulary, dtype)


def convert_checkpoint(
    input_dir: str | os.PathLike, output_dir: str | os.PathLike, *, sam2_checkpoint: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, verify: bool = False,
    overwrite: bool = False, push_to_hub: str | None = None, private: bool = False, projector_seed: int = 0,
    base_models: list[str] | tuple[str, ...] = DEFAULT_BASE_MODELS, license: str = DEFAULT_LICENSE,
    progress: bool = True,
) -> ConversionResult:
    """Convert a ViCA2 release folder (or assemble ViCA2-init from LLaVA-Video + SAM2.1) into a hub folder.

    Everything is checked before anything is written; the output is built in a hidden folder next to `output_dir`
    and moved into place only when complete (and verified, with `verify=True`). `dtype` defaults to the release's.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    sam2_checkpoint = Path(sam2_checkpoint) if sam2_checkpoint is not None else None
    check_output_dir(output_dir, overwrite, [input_dir] + ([sam2_checkpoint] if sam2_checkpoint else []))
    check_max_shard_size(max_shard_size)
    if push_to_hub:
        check_hub_access(push_to_hub)
    inputs, tokenizer, plan = prepare_conversion(input_dir, sam2_checkpoint, dtype, projector_seed)
    generation = build_generation_config(inputs, tokenizer)
    by_reason: dict[str, list[str]] = {}
    for key, reason in plan.dropped:
        by_reason.setdefault(reason, []).append(key)
    for reason, keys in by_reason.items():
        logger.info("Dropped %s: %d tensor(s): %s%s", reason, len(keys), ", ".join(keys[:4]), " ..." * (len(keys) > 4))
    if plan.vocabulary.added_rows:
        logger.warning("The embedding has no spare rows for <image>/<video>: %d mean-initialised row(s) added (never "
                       "generated).", plan.vocabulary.added_rows)
    with staged_output(output_dir, overwrite) as staged:
        weight_files = write_weights(plan, staged, max_shard_size, progress)
        plan.config.save_pretrained(staged)
        write_generation_config(staged, generation)
        write_processor(staged, plan.config, tokenizer)
        remote_code = copy_remote_code(staged)
        build_model_card(plan.config, inputs, list(base_models), license, push_to_hub).save(staged / "README.md")
        if verify:
            verify_conversion(staged, plan)
    result = ConversionResult(output_dir, inputs.kind, plan.dtype, len(plan.tensors), plan.output_bytes(),
                              weight_files, plan.dropped, plan.vocabulary, remote_code, verify)
    result.hub_url = push_folder(output_dir, push_to_hub, private) if push_to_hub else None
    return result


def check_max_shard_size(value: int | str) -> int:
    """The shard size in bytes, or a one-line ConversionError. Parsed by huggingface_hub's own parser, the one its
    shard splitter uses, so what passes here is what the writer accepts."""
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"a {type(value).__name__}")
        size = value if isinstance(value, int) else parse_size_to_int(value)
        if size <= 0:
            raise ValueError("not a positive size")
    except ValueError as error:
        raise ConversionError(f"max_shard_size={value!r} is not a size ({_one_line(error)}); give a positive number "
                              "with a unit, e.g. 5GB or 500MB.") from error
    return size


# The library's messages name arguments (`overwrite=True`, `max_shard_size=...`); the command line names its flags.
_ARGUMENT_WORDS = re.compile(r"\b(overwrite|max_shard_size|sam2_checkpoint|push_to_hub|output_dir|dtype)=(True\b)?")


def as_flags(message: str) -> str:
    return _ARGUMENT_WORDS.sub(lambda m: "--" + m[1].replace("_", "-") + ("" if m[2] else " "), message)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The command line; exit status 0, 2 for input that cannot be converted (one `error:` line), 1 when writing
    fails (disk full, permissions)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--input-dir", required=True, type=Path, help="ViCA2 release (or LLaVA-Video-Qwen2) folder")
    add("--output-dir", required=True, type=Path, help="hub folder to write (must not exist)")
    add("--sam2-checkpoint", type=Path, help="SAM2.1 .pt or transformers SAM2 folder: assemble ViCA2-init")
    add("--dtype", choices=list(DTYPES), help="output dtype (default: the release's)")
    add("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="e.g. 5GB (default), 500MB")
    add("--verify", action="store_true", help="reload the output and compare every tensor")
    add("--overwrite", action="store_true", help="replace an existing --output-dir")
    add("--push-to-hub", metavar="REPO_ID", help="upload the folder to this hub repo")
    add("--private", action="store_true", help="with --push-to-hub: create the repo private")
    add("--projector-seed", type=int, default=0, help="ViCA2-init: seed of the spatial projector")
    add("--base-model", action="append", dest="base_models", help="model card base_model (repeatable)")
    add("--license", default=DEFAULT_LICENSE, help="model card license (default: apache-2.0)")
    args = vars(parser.parse_args(argv))
    if args["private"] and not args["push_to_hub"]:
        parser.error("--private needs --push-to-hub")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args["base_models"] = args["base_models"] or DEFAULT_BASE_MODELS
    try:
        result = convert_checkpoint(args.pop("input_dir"), args.pop("output_dir"), **args)
    except (ConversionError, OSError) as error:
        print(f"error: {as_flags(_one_line(error))}", file=sys.stderr)
        return 2 if isinstance(error, ConversionError) else 1
    print(f"Wrote {result.output_dir}: {result.num_tensors} tensors ({result.num_bytes / 1e9:.2f} GB, "
          f"{str(result.dtype).replace('torch.', '')}) in {len(result.weight_files)} file(s); {len(result.dropped)} "
          f"input tensor(s) dropped; vocabulary {result.vocabulary.rows} rows, generatable ids < "
          f"{result.vocabulary.tokenizer_size}" + ("; verified" if result.verified else "")
          + (f"; uploaded to {result.hub_url}" if result.hub_url else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
