# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""Fine-tuning ViCA2 with the library's Trainer: trainable parts, the release's stage recipes, LoRA, data.

Used by `tools/finetune.py` (and importable as `vica2.tools.training`); not part of the hub's remote code.

- Trainable parts: the release's `--mm_tunable_parts` names (`mm_vision_tower`, `mm_mlp_adapter`,
  `mm_language_model`, `sam_tower`, `sam_projector`) select exactly the parameters the release's train.py unfroze,
  mapped to our modules; our own module names (`vision_tower`, `hiera_tower`, `multi_modal_projector`,
  `hiera_projector`, `image_newline`, `language_model`, `lm_head`) select just that module.
- `STAGES`: the release's three training stages (spatial-projector warm-up; full model minus Hiera, twice).
- LoRA: `lora_config()` targets the language model's linear layers only (a regex on `model.language_model`).
- Data: `Vica2SupervisedDataset` reads the release's LLaVA-style JSON / JSONL records (optionally a YAML mixture
  with sampling strategies), applies the chat template (with the release's time instruction for videos) and
  builds labels; `Vica2DataCollator` pads on the right.
- `Vica2Trainer`: `Trainer` with per-part learning rates (the release's `mm_vision_tower_lr`).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from transformers import Trainer, TrainingArguments
from transformers.utils import logging

from ..configuration_vica2 import TOKEN_RATIO_ARGS
from ..processing_vica2 import time_instruction
from .paths import escaping_reason, media_path


try:
    import av
except ImportError:
    av = None

try:
    import peft
except ImportError:
    peft = None


logger = logging.get_logger(__name__)

IGNORE_INDEX = -100

# ----------------------------------------------------------------------------------------------- trainable parts
# Our parts, as parameter-name prefixes of `Vica2ForConditionalGeneration` (without the leading "model." for the
# bare `Vica2Model`).
MODEL_PARTS = {
    "vision_tower": "model.vision_tower",  # SigLIP
    "hiera_tower": "model.hiera_tower",  # SAM2.1 Hiera trunk
    "multi_modal_projector": "model.multi_modal_projector",  # SigLIP -> LLM projector
    "hiera_projector": "model.hiera_projector",  # the spatial projector, Hiera -> LLM
    "image_newline": "model.image_newline",
    "language_model": "model.language_model",  # Qwen2, embeddings included
    "lm_head": "lm_head",
}

# The release's `--mm_tunable_parts` names, mapped to the parameters its train.py unfroze for each of them.
# `mm_language_model` unfroze every parameter whose name has none of "vision_tower", "mm_projector",
# "vision_resampler" in it: that is the LLM and head, but also `image_newline` and the spatial projector
# (`model.sam_projector.*`); the Hiera trunk (`model.sam_tower.vision_tower.*`) stayed frozen.
RELEASE_PARTS = {
    "mm_vision_tower": ("vision_tower",),
    "mm_mlp_adapter": ("multi_modal_projector",),
    "mm_language_model": ("language_model", "lm_head", "image_newline", "hiera_projector"),
    "sam_tower": ("hiera_tower",),
    "sam_projector": ("hiera_projector",),
}

PART_GROUPS = {"all": tuple(MODEL_PARTS), "none": ()}

# What the release trained in stages 2 and 3: everything but the Hiera trunk.
FULL_MINUS_HIERA = "mm_vision_tower,mm_mlp_adapter,mm_language_model,sam_projector"


def resolve_parts(parts: str | list[str] | tuple[str, ...]) -> list[str]:
    """Our part names for a comma-separated list of release names, our names, a stage ("stage1": the spatial
    projector only), "all" or "none"."""
    names = [name.strip() for name in parts.split(",")] if isinstance(parts, str) else list(parts)
    resolved = []
    for name in filter(None, names):
        if name in MODEL_PARTS:
            expansion = (name,)
        elif name in RELEASE_PARTS:
            expansion = RELEASE_PARTS[name]
        elif name in PART_GROUPS:
            expansion = PART_GROUPS[name]
        elif name in STAGES:
            expansion = resolve_parts(STAGES[name].trainable_parts)
        else:
            known = ", ".join([*RELEASE_PARTS, *MODEL_PARTS, *STAGES, *PART_GROUPS])
            raise ValueError(f"Unknown trainable part {name!r}; known: {known}.")
        resolved.extend(part for part in expansion if part not in resolved)
    return resolved


def _part_prefix(model, part: str) -> str:
    prefix = MODEL_PARTS[part]
    # The bare Vica2Model holds the modules directly (and has no head).
    return prefix if hasattr(model, "lm_head") else prefix.removeprefix("model.")


def _in_part(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def set_trainable_parts(model, parts: str | list[str] = FULL_MINUS_HIERA) -> list[str]:
    """Freeze everything, then unfreeze `parts` (release names, our names, a stage, "all" or "none").

    The default is the release's stages 2/3: everything but the Hiera trunk. Returns our names of the trained
    parts. Use it before wrapping the model (LoRA: see `add_lora`).
    """
    resolved = resolve_parts(parts)
    prefixes = [_part_prefix(model, part) for part in resolved]
    for name, param in model.named_parameters():
        param.requires_grad_(any(_in_part(name, prefix) for prefix in prefixes))
    return resolved


def trainable_summary(model) -> str:
    """One line: trainable / total parameters, and which parts train (fully, or through LoRA adapters)."""
    total = sum(_numel(p) for p in model.parameters())
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    full = [name.split(".") for name in names if "lora_" not in name]
    parts = [part for part in MODEL_PARTS if any(part in components for components in full)]
    adapted = sorted({part for name in names if "lora_" in name for part in MODEL_PARTS if part in name.split(".")})
    parts += [f"LoRA adapters in {part}" for part in adapted]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return f"trainable parameters: {trainable:,} of {total:,} ({', '.join(parts) or 'none'}) in {type(base).__name__}"


def _numel(param) -> int:
    return getattr(param, "ds_numel", param.numel())  # DeepSpeed ZeRO-3 leaves an empty placeholder in `param`


# ----------------------------------------------------------------------------------------------- stage recipes
@dataclass(frozen=True)
class StageRecipe:
    """One of the release's training stages (scripts/ViCA2/*/play.sh)."""

    trainable_parts: str
    learning_rate: float
    vision_tower_lr: float | None
    deepspeed: str
    description: str


STAGES = {
    "stage1": StageRecipe(
        "sam_projector", 1e-3, None, "ds_zero2.json",
        "spatial projector warm-up: only the Hiera projector trains (release data: LLaVA-CC3M-Pretrain-595K)",
    ),
    "stage2": StageRecipe(
        FULL_MINUS_HIERA, 1e-5, 2e-6, "ds_zero3.json",
        "full model minus the Hiera trunk on general image/video instruction data",
    ),
    "stage3": StageRecipe(
        FULL_MINUS_HIERA, 1e-5, 2e-6, "ds_zero3.json",
        "full model minus the Hiera trunk on spatial video data (ViCA-322K)",
    ),
}


# ----------------------------------------------------------------------------------------------- checkpointing
def enable_activation_checkpointing(model, use_reentrant: bool = False) -> None:
    """Recompute activations in backward, block by block, in the LLM and both vision towers.

    Every Qwen2 decoder layer, SigLIP encoder layer and Hiera block is a `GradientCheckpointingLayer`; the model's
    switch reaches all of them. transformers 5.2x names it `activation_checkpointing_enable`, 5.17
    `gradient_checkpointing_enable`. Non-reentrant checkpointing also gives gradients when a block's input does not
    require them (frozen embeddings under LoRA).
    """
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# ----------------------------------------------------------------------------------------------- LoRA
# The language model's attention and MLP projections, and nothing in the vision towers (a plain list such as
# ["q_proj", "v_proj"] would also match SigLIP's attention). PEFT full-matches a string against module names.
LANGUAGE_MODEL_LORA_TARGETS = (
    r"(?:model\.)?language_model\.layers\.\d+\.(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)"
)

PEFT_INSTALL_HINT = "LoRA needs PEFT: `pip install peft` (or `pip install 'vica2-hf[train]'`)."


def lora_config(
    r: int = 64,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    target_modules: str | list[str] = LANGUAGE_MODEL_LORA_TARGETS,
    modules_to_save: list[str] | None = None,
    **kwargs,
):
    """A `peft.LoraConfig` for ViCA2: adapters on the language model only (the release's defaults r=64, alpha=16,
    dropout=0.05). `modules_to_save` trains whole modules next to the adapters (see `lora_modules_to_save`)."""
    if peft is None:
        raise ImportError(PEFT_INSTALL_HINT)
    return peft.LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
        bias=kwargs.pop("bias", "none"),
        task_type=kwargs.pop("task_type", "CAUSAL_LM"),
        **kwargs,
    )


def lora_modules_to_save(parts: str | list[str]) -> list[str]:
    """Module names for `LoraConfig(modules_to_save=...)`: the parts to train fully next to the adapters.

    The language model is left to the adapters; `image_newline` is a bare parameter that PEFT cannot wrap, so it
    stays frozen under LoRA.
    """
    modules = []
    for part in resolve_parts(parts):
        if part == "language_model":
            continue
        if part == "image_newline":
            logger.warning("image_newline is a bare parameter that PEFT cannot train next to LoRA adapters; frozen.")
            continue
        modules.append(MODEL_PARTS[part])
    return modules


def add_lora(model, config=None):
    """Wrap `model` with LoRA adapters (default: `lora_config()`); everything else is frozen by PEFT."""
    if peft is None:
        raise ImportError(PEFT_INSTALL_HINT)
    return peft.get_peft_model(model, config if config is not None else lora_config())


# ----------------------------------------------------------------------------------------------- token ratio
def apply_token_ratio(model, processor, **settings) -> dict:
    """Train (and save) with other token-ratio settings: written into the model config and the processor's token
    layout, so the saved checkpoint keeps them as its defaults. Returns the resulting layout."""
    unknown = sorted(set(settings) - set(TOKEN_RATIO_ARGS))
    if unknown:
        raise TypeError(f"Unknown token-ratio setting(s) {', '.join(unknown)}; known: {', '.join(TOKEN_RATIO_ARGS)}.")
    given = {name: value for name, value in settings.items() if value is not None}
    processor.resolve_token_layout(**given)  # checks the values (and the frame ratio) before anything changes
    for name, value in given.items():
        setattr(model.config, name, int(value))
    processor.token_layout = model.config.token_layout()
    return processor.token_layout


# ----------------------------------------------------------------------------------------------- data files
def load_records(path: str | os.PathLike) -> list[dict]:
    """Records of a LLaVA-style JSON list or JSONL file. A file that cannot be read as one is a `ValueError` naming
    the file (and, for JSON Lines, the line, counting every line of the file)."""
    path = Path(path)
    if path.suffix not in (".json", ".jsonl"):
        raise ValueError(f"Unsupported data file {path}: use .json, .jsonl, or a .yaml mixture of them.")
    text = _read_text(path)
    if path.suffix == ".jsonl":
        return [_parse_json(line, f"{path}, line {number}") for number, line in enumerate(text.splitlines(), 1)
                if line.strip()]
    records = _parse_json(text, str(path))
    if not isinstance(records, list):
        raise ValueError(f"{path} must hold a JSON list of records, not a {type(records).__name__}.")
    return records


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ValueError(f"{path}: no such data file.")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}).") from None


def _parse_json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        line = f", line {error.lineno}" if "line" not in where else ""
        raise ValueError(f"{where}{line}: not valid JSON ({error.msg}).") from None
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply to read.") from None


def sample_records(records: list, strategy: str, rng: random.Random) -> list:
    """Apply a release sampling strategy: "all", "first:N", "end:N", "random:N", with N a count or a percentage."""
    strategy = str(strategy).strip()
    if strategy == "all":
        return list(records)
    kind, _, amount = strategy.partition(":")
    if kind not in ("first", "end", "random") or not amount:
        raise ValueError(f"Unknown sampling strategy {strategy!r}: use all, first:N, end:N or random:N (N or N%).")
    try:
        count = math.ceil(float(amount[:-1]) * len(records) / 100) if amount.endswith("%") else int(amount)
    except (ValueError, OverflowError):
        raise ValueError(f"Sampling strategy {strategy!r}: N must be a whole number or a percentage.") from None
    count = max(0, min(count, len(records)))
    if kind == "first":
        return records[:count]
    if kind == "end":
        return records[len(records) - count :]
    return rng.sample(records, count)  # seeded: every rank draws the same subset


def load_data_mixture(data_path: str | os.PathLike, seed: int = 0) -> list[dict]:
    """The records of a .json / .jsonl file, or of a release-style YAML mixture::

        datasets:
          - json_path: a.json
            sampling_strategy: all          # first:1000, end:500, random:10%, ...
          - json_path: b.jsonl
            sampling_strategy: random:5000

    Relative `json_path`s are resolved against the YAML file's folder.
    """
    data_path = Path(data_path)
    if data_path.suffix not in (".yaml", ".yml"):
        return load_records(data_path)
    import yaml

    try:
        mixture = yaml.safe_load(_read_text(data_path)) or {}
    except (yaml.YAMLError, RecursionError) as error:
        raise ValueError(f"{data_path}: not valid YAML ({' '.join(str(error).split())}).") from None
    datasets = mixture.get("datasets") if isinstance(mixture, dict) else None
    if not datasets or not isinstance(datasets, list):
        raise ValueError(f"{data_path} lists no `datasets` (entries with `json_path` and `sampling_strategy`).")
    rng = random.Random(seed)
    records = []
    for number, entry in enumerate(datasets, 1):
        strategy = entry.get("sampling_strategy", "all") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("json_path"), str) or not isinstance(strategy, str):
            raise ValueError(f"{data_path}: dataset {number} must be a mapping with a `json_path` (text) and an "
                             f"optional `sampling_strategy` (text), got {str(entry)[:80]!r}.")
        json_path = data_path.parent / os.path.expanduser(entry["json_path"])
        try:
            chosen = sample_records(load_records(json_path), strategy, rng)
        except ValueError as error:
            raise ValueError(f"{data_path}, dataset {number}: {error}") from None
        logger.info(f"{json_path}: {len(chosen)} records ({strategy})")
        records.extend(chosen)
    return records


# ----------------------------------------------------------------------------------------------- conversations
RELEASE_PLACEHOLDER = "<image>"  # the release marks images and videos alike with <image>
OTHER_PLACEHOLDER = "<video>"  # accepted as a synonym (read as <image>)
ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}

# Exceptions that mean "this media file cannot be used" (missing, not an image / video, truncated, ...).
MEDIA_ERRORS = (OSError, ValueError, EOFError) + ((av.FFmpegError,) if av is not None else ())


def media_files(record: dict) -> tuple[str | None, list[str]]:
    """("video" | "image" | None, the record's media paths as written)."""
    for kind in ("video", "image"):
        if kind in record and record[kind] is not None:
            value = record[kind]
            return kind, list(value) if isinstance(value, (list, tuple)) else [value]
    return None, []


def _turns(record: dict) -> list[tuple[str, str]]:
    turns = []
    for turn in record["conversations"]:
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if role not in ROLES or not isinstance(text, str):
            raise ValueError(f"a turn needs 'from' (human / gpt) and a string 'value', got {turn!r}")
        turns.append((ROLES[role], text.replace(OTHER_PLACEHOLDER, RELEASE_PLACEHOLDER)))
    if turns and turns[0][0] == "assistant":  # as the release: a conversation starts with the user
        turns = turns[1:]
    return turns


def _release_user_text(text: str, time_text: str | None, is_first: bool) -> str:
    """The release's rewrites of a user turn (train.py `_get_item` and `preprocess_multimodal`)."""
    if is_first and time_text is not None:
        return f"{RELEASE_PLACEHOLDER}\n{time_text}\n{text.replace(RELEASE_PLACEHOLDER, '')}"
    if text.count(RELEASE_PLACEHOLDER) == 1 and not text.startswith(RELEASE_PLACEHOLDER):
        # A single placeholder moves to the front, on its own line.
        return (RELEASE_PLACEHOLDER + "\n" + text.replace(RELEASE_PLACEHOLDER, "").strip()).strip()
    return text


def record_messages(record: dict, placeholder: str, num_media: int, time_text: str | None = None) -> list[dict]:
    """Chat messages of a release record, its text exactly as the release's training prompt.

    `placeholder` is what the processor expands (`<video>` for videos, `<image>` for images); `time_text` is the
    video's time instruction, put after the placeholder as the release did. A media record whose text has no
    placeholder gets one per item at the start of its first user turn (LLaVA's convention).
    """
    turns = _turns(record)
    first_user = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
    if num_media:
        turns = [
            (role, _release_user_text(text, time_text, i == first_user) if role == "user" else text)
            for i, (role, text) in enumerate(turns)
        ]
        if first_user is not None and not any(RELEASE_PLACEHOLDER in text for _, text in turns):
            turns[first_user] = ("user", f"{RELEASE_PLACEHOLDER}\n" * num_media + turns[first_user][1])
    return [{"role": role, "content": text.replace(RELEASE_PLACEHOLDER, placeholder)} for role, text in turns]


def check_record(record: dict) -> str | None:
    """Why a record cannot be trained on (None when it can): checked once, before training."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        return "no 'conversations' list"
    try:
        turns = _turns(record)
    except ValueError as error:
        return str(error)
    if not any(role == "assistant" for role, _ in turns):
        return "no answer ('gpt') turn"
    if all(record.get(kind) is not None for kind in ("video", "image")):
        return "both a video and an image (one kind of media per record: split it into two records)"
    _, files = media_files(record)
    if not all(isinstance(name, str) for name in files):
        return "media paths must be text"
    for name in files:
        reason = escaping_reason(name)
        if reason:
            return f"media path {name!r} would be read from outside the media folder: {reason}"
    placeholders = sum(text.count(RELEASE_PLACEHOLDER) for _, text in turns)
    if placeholders not in (len(files), 0) or (placeholders and not files):
        return f"{placeholders} {RELEASE_PLACEHOLDER} placeholder(s) for {len(files)} media file(s)"
    return None


# ----------------------------------------------------------------------------------------------- labels
LABEL_MODES = ("assistant", "release")


def expand_placeholders(ids: list[int], mask: list[int], counts: dict[int, list[int]]):
    """Repeat the k-th placeholder of each kind `counts[id][k]` times (the processor's expansion); mask them 0."""
    remaining = {token: list(lengths) for token, lengths in counts.items()}
    out_ids, out_mask = [], []
    for token, flag in zip(ids, mask):
        if token in remaining:
            length = remaining[token].pop(0)
            out_ids.extend([token] * length)
            out_mask.extend([0] * length)
        else:
            out_ids.append(token)
            out_mask.append(flag)
    return out_ids, out_mask


def build_labels(ids: list[int], assistant_mask: list[int], mode: str, special: dict) -> list[int]:
    """Labels for `ids`: the assistant turns' tokens (content and `<|im_end|>`), -100 elsewhere.

    `mode="release"` reproduces the release's training labels instead: every assistant turn whole, its
    `<|im_start|>assistant\\n` header included, and every "\\n" (id 198 in Qwen2), `<|im_start|>` and `<|im_end|>`
    of the whole conversation, system and user turns included (its preprocess_qwen). Visual placeholders are
    never labels. `special` holds the ids: `newline`, `im_start`, `im_end`, `placeholders` (a set).
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"Unknown label mode {mode!r}; use one of {', '.join(LABEL_MODES)}.")
    labels = [token if flag else IGNORE_INDEX for token, flag in zip(ids, assistant_mask)]
    if mode == "release":
        for start in _run_starts(assistant_mask):
            header = _last_index(ids, special["im_start"], before=start)
            labels[header:start] = ids[header:start]
        always = {special["newline"], special["im_start"], special["im_end"]}
        labels = [token if token in always else label for token, label in zip(ids, labels)]
    return [IGNORE_INDEX if token in special["placeholders"] else label for token, label in zip(ids, labels)]


def _run_starts(mask: list[int]) -> list[int]:
    return [i for i, flag in enumerate(mask) if flag and (i == 0 or not mask[i - 1])]


def _last_index(ids: list[int], token: int, before: int) -> int:
    for index in range(before - 1, -1, -1):
        if ids[index] == token:
            return index
    return before


# ----------------------------------------------------------------------------------------------- dataset
SKIP_REASONS = ("invalid", "missing", "unreadable", "changed", "too_long")


class SkipLedger:
    """Skipped records, counted once each by reason, shared with the DataLoader's worker processes (which read the
    media): a record found unusable by one worker is skipped by all, and counted once."""

    def __init__(self):
        self._counts = multiprocessing.Array("q", len(SKIP_REASONS))
        self._unusable = multiprocessing.Array("b", 0)

    def track(self, num_records: int) -> None:
        self._unusable = multiprocessing.Array("b", num_records)

    def is_unusable(self, position: int) -> bool:
        return bool(self._unusable[position])

    def mark_unusable(self, position: int, reason: str) -> bool:
        """Marks a record unusable and counts it; False when it already was (another worker found it first)."""
        with self._unusable.get_lock():
            if self._unusable[position]:
                return False
            self._unusable[position] = 1
        self.count(reason)
        return True

    def count(self, reason: str) -> None:
        with self._counts.get_lock():
            self._counts[SKIP_REASONS.index(reason)] += 1

    def as_dict(self) -> dict:
        return {reason: count for reason, count in zip(SKIP_REASONS, self._counts[:]) if count}


class Vica2SupervisedDataset(torch.utils.data.Dataset):
    """The release's training records as model inputs: ids, labels and the pixels of each record's media.

    Args:
        records: LLaVA-style records (`load_data_mixture`): `{"video": path, "conversations": [...]}`,
            `{"image": path or [paths], ...}`, or text only.
        processor: the checkpoint's `Vica2Processor`.
        media_root: folder that relative media paths are resolved against; `image_folder` / `video_folder`
            (the release's two options) override it per kind.
        num_frames: frames sampled from each video (default: the processor's frame budget).
        add_time_instruction: put the release's time instruction after each video, as training did.
        label_mode: "assistant" (only the answers and their `<|im_end|>`) or "release" (the release's labels, see
            `build_labels`).
        model_max_length: longer examples are cut at the end, as the release's collator did, unless the cut would
            fall into a visual item; then the record is skipped.
        check_media: look for every media file once, up front, and drop records whose files are missing.

    A record whose media are missing or cannot be read is never trained on without them: it is skipped with a
    warning and counted in `skipped` (by reason, across DataLoader workers), and the next usable record is returned
    in its place, as the release did. Records that are malformed are dropped up front (`skipped["invalid"]`).
    """

    def __init__(
        self,
        records: list[dict],
        processor,
        media_root: str | os.PathLike = ".",
        image_folder: str | os.PathLike | None = None,
        video_folder: str | os.PathLike | None = None,
        num_frames: int | None = None,
        add_time_instruction: bool = True,
        label_mode: str = "assistant",
        model_max_length: int | None = None,
        check_media: bool = True,
    ):
        if label_mode not in LABEL_MODES:
            raise ValueError(f"Unknown label mode {label_mode!r}; use one of {', '.join(LABEL_MODES)}.")
        for name, value in (("num_frames", num_frames), ("model_max_length", model_max_length)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}.")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.folders = {"image": Path(image_folder or media_root), "video": Path(video_folder or media_root)}
        self.num_frames = num_frames
        self.add_time_instruction = add_time_instruction
        self.label_mode = label_mode
        self.model_max_length = model_max_length
        self.special = self._special_ids()
        self._ledger = SkipLedger()
        self.records = [record for index, record in enumerate(records) if self._keep(index, record, check_media)]
        self._ledger.track(len(self.records))
        if not self.records:
            raise ValueError(f"No usable training records (skipped: {self.skipped}).")

    @property
    def skipped(self) -> dict:
        """Records skipped so far, by reason: invalid (also media paths outside the media folder, a record with
        both a video and an image), missing, unreadable, changed (a video rewritten while read), too_long."""
        return self._ledger.as_dict()

    def _special_ids(self) -> dict:
        tokenizer = self.tokenizer
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        return {
            "newline": newline[0] if len(newline) == 1 else None,
            "im_start": tokenizer.convert_tokens_to_ids("<|im_start|>"),
            "im_end": tokenizer.convert_tokens_to_ids("<|im_end|>"),
            "placeholders": {self.processor.image_token_id, self.processor.video_token_id},
        }

    def _keep(self, index: int, record: dict, check_media: bool) -> bool:
        problem = check_record(record)
        if problem is not None:
            self._ledger.count("invalid")
            self._warn("invalid", f"record {index} ({problem})")
            return False
        kind, files = media_files(record)
        if check_media:
            missing = [path for path in self._paths(kind, files) if not path.is_file()]
            if missing:
                self._ledger.count("missing")
                self._warn("missing", f"record {index}: {kind} file not found: {missing[0]}")
                return False
        return True

    def _skip(self, position: int, reason: str, detail: str) -> None:
        if self._ledger.mark_unusable(position, reason):
            self._warn(reason, detail)

    def _warn(self, reason: str, detail: str) -> None:
        logger.warning(f"Skipping a training record ({reason}): {detail}. Skipped so far: {self.skipped}.")

    def _paths(self, kind: str | None, files: list[str]) -> list[Path]:
        # `check_record` refused names that would leave the folder (`vica2.tools.paths`, as the evaluator)
        return [media_path(self.folders[kind], name) for name in files] if kind else []

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        # A record that turns out unusable is replaced by the next usable one (and remembered as unusable).
        for offset in range(len(self.records)):
            position = (index + offset) % len(self.records)
            if self._ledger.is_unusable(position):
                continue
            example = self._try_example(position)
            if example is not None:
                return example
        raise RuntimeError(f"None of the {len(self.records)} training records could be used: {self.skipped}.")

    def _try_example(self, position: int) -> dict | None:
        record = self.records[position]
        kind, files = media_files(record)
        paths = self._paths(kind, files)
        try:
            media = [self._load(kind, path) for path in paths]
        except FileChangedError as error:
            self._skip(position, "changed", f"{kind} {paths} ({error})")
            return None
        except MEDIA_ERRORS as error:
            reason = "missing" if isinstance(error, FileNotFoundError) else "unreadable"
            self._skip(position, reason, f"{kind} {paths} ({type(error).__name__}: {error})")
            return None
        try:
            example = self.build_example(record, kind, media)
        except ValueError as error:  # the processor's checks of the text or the pixels: a problem of this record
            self._skip(position, "invalid", f"record with {kind} {paths} ({error})")
            return None
        if example is None:
            self._skip(position, "too_long", f"{kind} {paths}: its visual tokens run past model_max_length")
        return example

    def _load(self, kind: str, path: Path):
        if kind == "video":
            # The reader opens the file twice (an index pass for the timing, then the decode): a file replaced in
            # between would give its frames with the old file's timing. Same size, time and inode before and after.
            before = _identity(path)
            video = self.processor.load_video(str(path), num_frames=self.num_frames)
            if _identity(path) != before:
                raise FileChangedError(f"{path} changed on disk while it was read; not used")
            return video
        with Image.open(path) as image:
            return image.convert("RGB")  # decodes the whole file: a truncated image fails here, not later

    def build_example(self, record: dict, kind: str | None, media: list) -> dict | None:
        """Model inputs and labels of one record whose media are loaded (`DecodedVideo`s or PIL images); None when
        it does not fit `model_max_length`."""
        ids, assistant_mask, inputs = self._tokenize(self._messages(record, kind, media), kind, media)
        labels = build_labels(ids, assistant_mask, self.label_mode, self.special)
        limit = self.model_max_length
        if limit is not None and len(ids) > limit:
            if any(token in self.special["placeholders"] for token in ids[limit:]):
                return None  # cutting into a visual item would leave its pixels without their placeholders
            ids, labels = ids[:limit], labels[:limit]  # the release's collator cut long examples the same way
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), **_per_item_pixels(inputs)}

    def _messages(self, record: dict, kind: str | None, media: list) -> list[dict]:
        processor = self.processor
        placeholder = processor.video_token if kind == "video" else processor.image_token
        time_text = None
        if kind == "video" and self.add_time_instruction and len(media) == 1:
            time_text = time_instruction(media[0].metadata)  # None when the video's timing is unknown
        return record_messages(record, placeholder, len(media), time_text)

    def _tokenize(self, messages: list[dict], kind: str | None, media: list):
        """(ids, assistant mask, processor outputs): the processor expands the placeholders and prepares the
        pixels; the chat template's own tokenization marks the assistant turns (its `{% generation %}` blocks),
        expanded here the same way and checked against the processor's ids."""
        template = self.processor.chat_template
        rendered = self.tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        text = self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
        inputs = self.processor(
            text=text,
            images=media if kind == "image" else None,
            videos=media if kind == "video" else None,
            add_special_tokens=False,
            return_tensors="pt",
        )
        ids, mask = expand_placeholders(rendered["input_ids"], rendered["assistant_masks"], self._counts(inputs))
        if ids != inputs["input_ids"][0].tolist():
            raise RuntimeError("The chat template's tokens differ from the processor's; cannot align the labels.")
        return ids, mask, inputs

    def _counts(self, inputs) -> dict[int, list[int]]:
        """Placeholder tokens of each item, in order, as the processor expanded them."""
        counts = {}
        if "image_sizes" in inputs:
            sizes = inputs["image_sizes"].tolist()
            counts[self.processor.image_token_id] = self.processor._get_num_multimodal_tokens(
                image_sizes=sizes
            ).num_image_tokens
        if "pixel_values_videos" in inputs:
            frames = [(video.shape[0], 0, 0) for video in inputs["pixel_values_videos"]]
            counts[self.processor.video_token_id] = self.processor._get_num_multimodal_tokens(
                video_sizes=frames
            ).num_video_tokens
        return counts


# The processor's pixel outputs, named as the model's forward takes them.
PIXEL_INPUTS = ("pixel_values", "image_sizes", "hiera_pixel_values", "pixel_values_videos", "hiera_pixel_values_videos")


class FileChangedError(Exception):
    """A media file was replaced or rewritten while it was being read."""


def _identity(path: Path) -> tuple:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev


def _per_item_pixels(inputs) -> dict:
    """The processor's pixel outputs as per-item lists, ready to be batched across records."""
    return {name: list(inputs[name]) for name in PIXEL_INPUTS if name in inputs}


@dataclass
class Vica2DataCollator:
    """Right-pads ids (with `pad_token_id`) and labels (with -100); gathers the batch's visual items in order.

    Position 0 of every row is never a prediction target (the loss shifts labels), so its label is set to -100:
    then the number of supervised tokens Trainer counts for `num_items_in_batch` is exactly the number the loss
    averages over, on every transformers version.
    """

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        length = max(len(example["input_ids"]) for example in examples)
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):
            size = len(example["input_ids"])
            input_ids[row, :size] = example["input_ids"]
            labels[row, :size] = example["labels"]
            attention_mask[row, :size] = 1
        labels[:, 0] = IGNORE_INDEX
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        for name in PIXEL_INPUTS:
            items = [item for example in examples for item in example.get(name, [])]
            if items:
                batch[name] = _stack_if_uniform(items)
        return batch


def _stack_if_uniform(items: list[torch.Tensor]):
    # The model takes a list of per-item tensors when frame / tile counts differ.
    if all(item.shape == items[0].shape for item in items):
        return torch.stack(items)
    return items


# ----------------------------------------------------------------------------------------------- trainer
@dataclass
class Vica2TrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the release's per-part learning rates."""

    vision_tower_lr: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the SigLIP and Hiera towers (the release's mm_vision_tower_lr: 2e-6 in "
                  "stages 2/3). Default: learning_rate."},
    )
    projector_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of both projectors. Default: learning_rate."}
    )


# Attribute names that identify a part in any parameter name (also inside PEFT wrappers).
LR_PART_MODULES = {
    "vision_tower_lr": ("vision_tower", "hiera_tower"),
    "projector_lr": ("multi_modal_projector", "hiera_projector"),
}


def parameter_groups(model, decay_names, weight_decay: float, part_lrs: dict) -> list[dict]:
    """Optimizer groups: (part learning rate or default) x (weight decay or not), trainable parameters only."""
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        components = name.split(".")
        lr_name = next((key for key, modules in LR_PART_MODULES.items() if set(modules) & set(components)), None)
        lr = part_lrs.get(lr_name)
        decay = weight_decay if name in decay_names else 0.0
        group = groups.setdefault((lr, decay), {"params": [], "weight_decay": decay, **({"lr": lr} if lr else {})})
        group["params"].append(param)
    return list(groups.values())


class Vica2Trainer(Trainer):
    """`Trainer` with the release's per-part learning rates (`vision_tower_lr`, `projector_lr`)."""

    def create_optimizer(self, model=None):
        part_lrs = {name: getattr(self.args, name, None) for name in LR_PART_MODULES}
        part_lrs = {name: lr for name, lr in part_lrs.items() if lr is not None}
        if self.optimizer is not None or not part_lrs:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay_names = set(self.get_decay_parameter_names(opt_model))
        groups = parameter_groups(opt_model, decay_names, self.args.weight_decay, part_lrs)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


__all__ = [
    "FULL_MINUS_HIERA",
    "LANGUAGE_MODEL_LORA_TARGETS",
    "MODEL_PARTS",
    "RELEASE_PARTS",
    "STAGES",
    "StageRecipe",
    "Vica2DataCollator",
    "Vica2SupervisedDataset",
    "Vica2Trainer",
    "Vica2TrainingArguments",
    "add_lora",
    "apply_token_ratio",
    "build_labels",
    "enable_activation_checkpointing",
    "load_data_mixture",
    "lora_config",
    "lora_modules_to_save",
    "record_messages",
    "resolve_parts",
    "sample_records",
    "set_trainable_parts",
    "trainable_summary",
]
