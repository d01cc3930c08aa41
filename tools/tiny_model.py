# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""A tiny ViCA2 to train from scratch on the synthetic benchmark (`vica2.tools.synthetic_bench`).

It has ViCA2's whole architecture (SigLIP and Hiera towers, both projectors, token ratio control, a Qwen2 language
model) at small sizes: SigLIP at 112 px (a 4 x 4 grid of pooled tokens per frame, one per cell of the synthetic
room), Hiera at 128 px, a 4-frame budget, and an LLM head size of 32, which vLLM's CPU build serves. Its tokenizer is
a byte-level BPE learned from the training text, so the synthetic prompts are about a third as long as with bytes.
`tests/test_tiny_model.py` fine-tunes it with `finetune.py` to check that training teaches a model to read videos.
"""

from __future__ import annotations

from pathlib import Path

import torch


FRAMES = 4  # the frame budget: 4 of the synthetic benchmark's 16-frame clips, one per appearance
SIGLIP_SIZE, HIERA_SIZE = 112, 128
SYSTEM_PROMPT = "You are a helpful assistant."


def train_tokenizer(texts: list[str], vocab_size: int = 640):
    """A Qwen2-style byte-level BPE tokenizer (ChatML special tokens, the release's chat template) whose merges are
    learned from `texts`: the synthetic prompts become about a third as long as with bytes alone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .demo import CHAT_TEMPLATE, SPECIAL_TOKENS

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        model_max_length=4096)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(tokenizer):
    """The tiny ViCA2's config for `tokenizer` (`<image>` / `<video>` right after its vocabulary)."""
    from vica2.configuration_vica2 import Vica2Config

    vocab = len(tokenizer)
    text = {
        "model_type": "qwen2", "vocab_size": vocab + 2, "hidden_size": 128, "intermediate_size": 384,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"), "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": SIGLIP_SIZE, "patch_size": 14,
              "vision_use_head": False}
    hiera = {  # the 7B trunk's layout (four stages, q-pool, windows, one global block) at 16 channels
        "model_type": "sam2_hiera_det_model", "hidden_size": 16, "num_attention_heads": 1,
        "image_size": [HIERA_SIZE, HIERA_SIZE], "blocks_per_stage": [1, 2, 2, 1],
        "embed_dim_per_stage": [16, 32, 64, 128],
        "num_attention_heads_per_stage": [1, 2, 4, 8], "window_size_per_stage": [8, 4, 14, 7],
        "global_attention_blocks": [4], "window_positional_embedding_background_size": [14, 14],
    }
    side = SIGLIP_SIZE
    return Vica2Config(
        text_config=text, vision_config=vision, hiera_config=hiera, image_token_id=vocab, video_token_id=vocab + 1,
        image_grid_pinpoints=[[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side]],
        video_frames_budget=FRAMES, hiera_frames=FRAMES // 2, generatable_vocab_size=vocab,
    )


def training_texts(records: list[dict]) -> list[str]:
    """What the tokenizer learns from: every turn of the fine-tuning records, and the system prompt as often."""
    return [text for record in records
            for text in (SYSTEM_PROMPT, *(turn["value"].replace("<image>", "") for turn in record["conversations"]))]


def build_initial_model(folder: str | Path, records: list[dict], seed: int = 0) -> Path:
    """Write the random initial tiny ViCA2 (model, processor, generation config) that training starts from."""
    from vica2.modeling_vica2 import Vica2ForConditionalGeneration
    from vica2.processing_vica2 import Vica2Processor

    folder = Path(folder)
    tokenizer = train_tokenizer(training_texts(records))
    config = tiny_config(tokenizer)
    torch.manual_seed(seed)
    model = Vica2ForConditionalGeneration(config)
    model.generation_config.max_new_tokens = 16
    model.save_pretrained(folder)
    # trained and asked without the release's time instruction: the clips all last 4 s, and the prompt is shorter
    Vica2Processor.from_model_config(config, tokenizer, add_time_instruction=False).save_pretrained(folder)
    return folder
