# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""The trained tiny ViCA2: the offline default of `vica2 demo`, `vica2 app` and the README's quick start.

A toy, not ViCA2-7B: 1.5 M parameters trained from a random initialisation on the synthetic benchmark's clips of
coloured cubes (`vica2.tools.synthetic_bench`) by `make tiny-model` (`vica2.tools.train_tiny`, the project's own
`finetune.py`). It has ViCA2's whole architecture (SigLIP and Hiera towers, both projectors, token ratio control,
a Qwen2 language model) at small sizes: SigLIP at 112 px, Hiera at 128 px, a 4-frame budget, and an LLM head size
of 32, which vLLM's CPU build serves. Its tokenizer is a byte-level BPE learned from the training text.

The shipped folder (`tools/tiny_vica2/`) holds the weights, configs, tokenizer and a held-out clip with its
question (`demo.json`), but no Python: the installed `vica2` classes load it. `servable_copy` adds the remote code
for engines that need it (vLLM).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


SHIPPED = Path(__file__).with_name("tiny_vica2")
DEMO_FILE = "demo.json"  # the held-out clip's file name, its questions (as trained on) and their right answers
FRAMES = 4  # the frame budget: 4 of the synthetic benchmark's 16-frame clips (one per appearance)
SIGLIP_SIZE, HIERA_SIZE = 112, 128
SYSTEM_PROMPT = "You are a helpful assistant."
# The recipe: finetune.py's options (30 minutes of training on 2 CPU cores), and how eval-vsibench asks it.
MAX_STEPS = 2200  # at 2,000 steps size reaches only 65 MRA (benchmarks/RESULTS.md)
DESCRIPTION_COPIES = 2  # each training scene's description, this many times in the mix: it drives the lookup
# The towers learn at a tenth of the rest's rate (as the release's recipe runs them slower): at 1e-3 throughout,
# the whole model stayed at chance through 1,250 steps. Two processes of 8 records: a batch of 16.
TRAINING = {"add_time_instruction": "False", "learning_rate": "1e-3", "vision_tower_lr": "1e-4",
            "per_device_train_batch_size": "8", "warmup_steps": "50", "lr_scheduler_type": "cosine",
            "weight_decay": "0.0", "max_grad_norm": "1.0", "logging_steps": "25", "seed": "0", "dataloader_num_workers": "0"}
LEARNED_MARGIN = 0.5  # a task is learned when its held-out score closes at least half the gap from chance to 100
EVAL_OPTIONS = ("--frames", str(FRAMES), "--max-new-tokens", "8", "--dtype", "float32")
TOY_NOTICE = ("the built-in tiny ViCA2: a toy (1.5 M parameters) trained on synthetic clips of coloured cubes, not "
              "ViCA2-7B. Asked in the words it was trained on, it counts the cubes in such a clip and tells their "
              "size; its multiple-choice answers are at chance, and it knows nothing else.")


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


def training_options(max_steps: int = MAX_STEPS) -> list[str]:
    """finetune.py's options of the recipe (the model, data and output folders aside); a short run logs its loss
    often enough to draw a curve."""
    options = {**TRAINING, "max_steps": max_steps, "logging_steps": max(1, min(int(TRAINING["logging_steps"]),
                                                                               max_steps // 10))}
    return [f"--{name}={value}" for name, value in options.items()]


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


def learned_tasks(summary: dict) -> list[str]:
    """The tasks of an `eval-vsibench` summary whose score is at least `LEARNED_MARGIN` of the way from the task's
    chance level to 100."""
    return [task for task, block in summary["tasks"].items()
            if block["score"] >= summary["chance"][task] + LEARNED_MARGIN * (100 - summary["chance"][task])]


def demo_samples(folder: str | Path = SHIPPED) -> list[dict]:
    """The shipped held-out clip's questions, the first a counting one: each with the clip's absolute path
    ("video"), the question, the prompt the model was trained on ("prompt") and the right answer ("answer")."""
    folder = Path(folder)
    demo = json.loads((folder / DEMO_FILE).read_text())
    video = (folder / demo["video"]).resolve()
    if folder.resolve() not in video.parents:  # a path from a data file stays inside its folder
        raise ValueError(f"{folder / DEMO_FILE} names a video outside its folder ({demo['video']!r}): give its file "
                         "name in that folder.")
    return [{**question, "video": str(folder / demo["video"])} for question in demo["questions"]]


def servable_copy(destination: str | Path, folder: str | Path = SHIPPED) -> Path:
    """A copy of the tiny model with the remote code beside it (what `trust_remote_code` engines, vLLM's
    Transformers backend among them, load). `destination` must not exist yet."""
    from vica2.convert_checkpoint import copy_remote_code

    destination = Path(destination)
    shutil.copytree(folder, destination)
    copy_remote_code(destination)
    return destination
