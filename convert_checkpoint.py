# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""Convert a ViCA2 research-release checkpoint into a hub folder that loads with `trust_remote_code=True`.

This module owns the mapping from the release's names and config to ours: `release_key_to_hub` and
`release_config_to_vica2` are the one place where that correspondence is written down.
"""

from __future__ import annotations

import re

from vica2.configuration_vica2 import Vica2Config


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

# Meta's Hiera module names -> transformers' Sam2HieraDetModel names.
_HIERA_RENAMES = (
    (re.compile(r"^patch_embed\.proj\."), "patch_embed.projection."),
    (re.compile(r"^(blocks\.\d+)\.norm1\."), r"\1.layer_norm1."),
    (re.compile(r"^(blocks\.\d+)\.norm2\."), r"\1.layer_norm2."),
    (re.compile(r"^(blocks\.\d+)\.mlp\.layers\.0\."), r"\1.mlp.proj_in."),
    (re.compile(r"^(blocks\.\d+)\.mlp\.layers\.1\."), r"\1.mlp.proj_out."),
)

# SigLIP weights the release stores but never uses: its features leave the last kept layer directly.
_UNUSED_SIGLIP = re.compile(r"^model\.vision_tower\.(post_layernorm|head)\.")


def hiera_trunk_key(key: str) -> str:
    """Rename a key of Meta's Hiera trunk (relative to the trunk) to `Sam2HieraDetModel`'s name."""
    for pattern, replacement in _HIERA_RENAMES:
        key = pattern.sub(replacement, key)
    return key


def release_key_to_hub(key: str, num_siglip_layers: int | None = None) -> str | None:
    """Our name for a release key, or None for a weight that is deliberately dropped.

    Dropped: SigLIP's `post_layernorm` and attention-pooling `head`, and encoder layers at or beyond
    `num_siglip_layers` (the release deletes SigLIP's last layer; a checkpoint that still has it drops it here).
    Raises KeyError for a key that is neither mapped nor known to be unused.
    """
    for old, new in _PREFIXES:
        if key.startswith(old):
            mapped = new + key[len(old) :]
            break
    else:
        raise KeyError(f"unknown release checkpoint key: {key}")
    if _UNUSED_SIGLIP.match(mapped):
        return None
    if num_siglip_layers is not None:
        layer = re.match(r"^model\.vision_tower\.encoder\.layers\.(\d+)\.", mapped)
        if layer and int(layer.group(1)) >= num_siglip_layers:
            return None
    if mapped.startswith("model.hiera_tower."):
        mapped = "model.hiera_tower." + hiera_trunk_key(mapped[len("model.hiera_tower.") :])
    return mapped


# The release builds its towers from hard-coded hub names; these are those towers' hyper-parameters, in the
# release's own vocabulary (what `tower_configs.json` of a non-standard checkpoint also uses).
RELEASE_TOWERS = {
    "siglip_vision_model": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "image_size": 384,
        "patch_size": 14,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
        "num_channels": 3,
    },
    "hiera": {
        "embed_dim": 112,
        "num_heads": 2,
        "q_pool": 3,
        "q_stride": [2, 2],
        "stages": [2, 3, 16, 3],
        "dim_mul": 2.0,
        "head_mul": 2.0,
        "window_pos_embed_bkg_spatial_size": [14, 14],
        "window_spec": [8, 4, 14, 7],
        "global_att_blocks": [12, 16, 20],
    },
}


def release_siglip_config(siglip: dict) -> dict:
    """SigLIP vision config with the release's last layer removed (the release deletes it after loading)."""
    layers = siglip.get("num_hidden_layers_in_checkpoint", siglip["num_hidden_layers"] - 1)
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": siglip["hidden_size"],
        "intermediate_size": siglip["intermediate_size"],
        "num_hidden_layers": layers,
        "num_attention_heads": siglip["num_attention_heads"],
        "num_channels": siglip.get("num_channels", 3),
        "image_size": siglip["image_size"],
        "patch_size": siglip["patch_size"],
        "hidden_act": siglip.get("hidden_act", "gelu_pytorch_tanh"),
        "layer_norm_eps": siglip.get("layer_norm_eps", 1e-6),
        "vision_use_head": False,
    }


def release_hiera_config(hiera: dict) -> dict:
    """Meta's Hiera constructor arguments -> `Sam2HieraDetConfig` fields (per-stage lists)."""
    stages = list(hiera["stages"])
    dims, heads = [hiera["embed_dim"]], [hiera["num_heads"]]
    for _ in stages[1:]:
        dims.append(int(dims[-1] * hiera.get("dim_mul", 2.0)))
        heads.append(int(heads[-1] * hiera.get("head_mul", 2.0)))
    return {
        "model_type": "sam2_hiera_det_model",
        "hidden_size": hiera["embed_dim"],
        "num_attention_heads": hiera["num_heads"],
        "num_channels": 3,
        "image_size": [1024, 1024],
        "patch_kernel_size": [7, 7],
        "patch_stride": [4, 4],
        "patch_padding": [3, 3],
        "query_stride": list(hiera.get("q_stride", [2, 2])),
        "window_positional_embedding_background_size": list(hiera["window_pos_embed_bkg_spatial_size"]),
        "num_query_pool_stages": hiera.get("q_pool", 3),
        "blocks_per_stage": stages,
        "embed_dim_per_stage": dims,
        "num_attention_heads_per_stage": heads,
        "window_size_per_stage": list(hiera["window_spec"]),
        "global_attention_blocks": list(hiera["global_att_blocks"]),
        "mlp_ratio": 4.0,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
    }


_QWEN2_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "attention_dropout",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
)


def release_config_to_vica2(
    raw: dict, towers: dict | None = None, image_token_id: int | None = None, video_token_id: int | None = None
) -> Vica2Config:
    """Build our `Vica2Config` from a release `config.json` (model_type "vica_qwen").

    `towers` holds the SigLIP / Hiera hyper-parameters in the release's vocabulary (defaults: the towers the release
    hard-codes, SigLIP so400m and SAM2.1 hiera_b+).
    """
    if raw.get("model_type") != "vica_qwen":
        raise ValueError(
            f"Not a ViCA2 release config: model_type is {raw.get('model_type')!r}, expected 'vica_qwen'."
        )
    if raw.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ValueError(f"Unsupported mm_projector_type {raw['mm_projector_type']!r}: ViCA2 uses 'mlp2x_gelu'.")
    towers = {**RELEASE_TOWERS, **(towers or {})}
    text_config = {key: raw[key] for key in _QWEN2_FIELDS if key in raw}
    text_config.update(
        model_type="qwen2",
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        # The release forces rope scaling off.
        rope_parameters={"rope_type": "default", "rope_theta": raw.get("rope_theta", 1000000.0)},
    )
    siglip = release_siglip_config(towers["siglip_vision_model"])
    if raw.get("mm_hidden_size", siglip["hidden_size"]) != siglip["hidden_size"]:
        raise ValueError(
            f"mm_hidden_size={raw['mm_hidden_size']} does not match the SigLIP width {siglip['hidden_size']}."
        )
    pinpoints = raw.get("image_grid_pinpoints")
    return Vica2Config(
        text_config=text_config,
        vision_config=siglip,
        hiera_config=release_hiera_config(towers["hiera"]),
        image_token_id=image_token_id if image_token_id is not None else raw.get("image_token_index", 151646),
        video_token_id=video_token_id if video_token_id is not None else raw.get("image_token_index", 151646) + 1,
        use_image_newline=True,
        # The release lists pinpoints as [width, height]; ours are [height, width].
        image_grid_pinpoints=[[h, w] for w, h in pinpoints] if pinpoints else None,
        vision_aspect_ratio=raw.get("image_aspect_ratio", "anyres_max_9"),
        video_pool_mode=raw.get("mm_spatial_pool_mode", "bilinear"),
        # The release reads neither its pool-stride field nor a Hiera frame count: 2, 2 and 64 / 32 are hard-coded.
        siglip_pool_stride=2,
        hiera_pool_stride=2,
        video_frames_budget=64,
        hiera_frames=32,
        hiera_feature_stage=4,
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
    )
