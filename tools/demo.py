# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""A tiny random ViCA2 in the research release's own layout, and a generated test video: what the tests and
benchmarks run the converter, processor and model on offline. A shared helper (front-ends may import it; it imports
none of them).

Nothing is downloaded. The tiny checkpoint has the release's file layout, key names and config (with the towers at
their real input sizes, 384 for SigLIP and 1024 for Hiera, but a few channels wide), so the real converter, processor
and model take the same path as for ViCA2-7B, only with random weights. (`vica2 demo` and `vica2 app` run the
trained tiny model of `vica2.tools.tiny_model` instead.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from vica2.configuration_vica2 import Vica2Config
from vica2.convert_checkpoint import hub_key_to_release


SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (  # the release tokenizer's own template
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Towers in the release's own vocabulary (what `tower_configs.json` holds): real input sizes, tiny widths.
DEMO_TOWERS = {
    "siglip_vision_model": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
        "image_size": 384, "patch_size": 14, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
        "num_channels": 3, "num_hidden_layers_in_checkpoint": 2,
    },
    "hiera": {
        "embed_dim": 8, "num_heads": 1, "q_pool": 3, "q_stride": [2, 2], "stages": [1, 2, 2, 1], "dim_mul": 2.0,
        "head_mul": 2.0, "window_pos_embed_bkg_spatial_size": [14, 14], "window_spec": [8, 4, 14, 7],
        "global_att_blocks": [4],
    },
}


def build_byte_tokenizer():
    """A Qwen2-style byte-level BPE tokenizer (256 byte symbols, no merges) with the ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet, key=_byte_order))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]), model_max_length=32768,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _byte_order(symbol: str) -> int:
    # GPT-2 / Qwen2 byte order: the printable bytes map to themselves, the others to 256 + n.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    code = ord(symbol)
    return code if code in printable else 1000 + code


def demo_config(vocab_rows: int, image_token_id: int) -> Vica2Config:
    from vica2.convert_checkpoint import release_hiera_config, release_siglip_config

    text = {
        "model_type": "qwen2", "vocab_size": vocab_rows, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32768,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    }
    return Vica2Config(
        text_config=text,
        vision_config=release_siglip_config(DEMO_TOWERS["siglip_vision_model"]),
        hiera_config=release_hiera_config(DEMO_TOWERS["hiera"]),
        image_token_id=image_token_id,
        video_token_id=image_token_id + 1,
    )


def release_config(config: Vica2Config, tokenizer) -> dict:
    """A `config.json` as the release's `VicaQwenForCausalLM.save_pretrained` writes it."""
    text = config.text_config
    return {
        "architectures": ["VicaQwenForCausalLM"], "model_type": "vica_qwen",
        "vocab_size": text.vocab_size, "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers, "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads, "hidden_act": "silu",
        "max_position_embeddings": text.max_position_embeddings, "rope_theta": 1000000.0, "rope_scaling": None,
        "rms_norm_eps": text.rms_norm_eps, "tie_word_embeddings": False, "use_sliding_window": False,
        "sliding_window": 131072, "max_window_layers": text.num_hidden_layers, "attention_dropout": 0.0,
        "initializer_range": 0.02, "torch_dtype": "float32",
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_hidden_size": config.vision_config.hidden_size,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "spatial_unpad", "mm_newline_position": "grid", "mm_spatial_pool_mode": "bilinear",
        "mm_spatial_pool_stride": 2, "image_aspect_ratio": "anyres_max_9",
        "image_grid_pinpoints": [[w, h] for h, w in config.image_grid_pinpoints],  # the release lists [w, h]
        "image_token_index": config.image_token_id, "tokenizer_model_max_length": 32768,
        "tokenizer_padding_side": "right", "add_time_instruction": True, "use_mm_proj": True,
    }


def build_demo_release(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ViCA2 checkpoint in the release's layout (config.json with model_type "vica_qwen",
    release key names, the release's unused SigLIP post-layernorm, a Qwen2-style tokenizer) to `folder`."""
    from vica2.modeling_vica2 import Vica2ForConditionalGeneration

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_byte_tokenizer()
    config = demo_config(vocab_rows=len(tokenizer) + 13, image_token_id=len(tokenizer))  # spare rows, as Qwen2
    torch.manual_seed(seed)
    model = Vica2ForConditionalGeneration(config)
    with torch.no_grad():  # visible structure in the random weights: non-zero biases and a real newline vector
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.05)
    state = {hub_key_to_release(name): tensor.contiguous() for name, tensor in model.state_dict().items()}
    width = config.vision_config.hidden_size
    prefix = "model.vision_tower.vision_tower.vision_model.post_layernorm."
    state.update({prefix + "weight": torch.ones(width), prefix + "bias": torch.zeros(width)})  # stored, unused
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(release_config(config, tokenizer), indent=2))
    (folder / "tower_configs.json").write_text(json.dumps(DEMO_TOWERS, indent=2))
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "max_new_tokens": 32}))
    tokenizer.save_pretrained(folder)
    return folder


def write_demo_video(path: str | Path, num_frames: int = 96, fps: int = 24, size: tuple[int, int] = (240, 320)):
    """An h264 mp4 of a room-like scene: a floor gradient, a static 'table' and a 'ball' rolling across."""
    from vica2 import video_loading_vica2

    av = video_loading_vica2.av
    if av is None:
        raise ImportError(video_loading_vica2.AV_INSTALL_HINT)
    height, width = size
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ys, xs = np.mgrid[0:height, 0:width]
    background = np.stack([40 + 100 * ys / height, 60 + 0 * xs, 90 + 80 * xs / width], axis=-1)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        for index in range(num_frames):
            frame = background.copy()
            frame[height // 2 : height // 2 + 40, 30:120] = (150, 100, 60)  # table
            cx = int(20 + (width - 40) * index / max(num_frames - 1, 1))
            cy = int(height * 0.75)
            frame[(ys - cy) ** 2 + (xs - cx) ** 2 < 15**2] = (230, 40, 40)  # ball
            video_frame = av.VideoFrame.from_ndarray(frame.astype(np.uint8), format="rgb24")
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
