"""Fine-tuning: trainable parts and stage recipes, exact loss normalisation under gradient accumulation, activation
checkpointing, LoRA, the release's data format and labels, skipped media, and finetune.py end to end (CPU)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import FIXTURE_DIR, REPO_ROOT, fixture_sample, load_fixture_config, requires_fixture, tiny_model


av = pytest.importorskip("av")

from transformers import TrainerCallback  # noqa: E402

from vica2.tools.training import (  # noqa: E402
    FULL_MINUS_HIERA,
    STAGES,
    Vica2DataCollator,
    Vica2SupervisedDataset,
    Vica2Trainer,
    Vica2TrainingArguments,
    apply_token_ratio,
    enable_activation_checkpointing,
    load_data_mixture,
    resolve_parts,
    sample_records,
    set_trainable_parts,
)


try:
    import peft
except ImportError:
    peft = None

requires_peft = pytest.mark.skipif(peft is None, reason="peft is not installed")

NUM_FRAMES = 4  # per video; the tiny model's budget is 8 frames, Hiera every 2nd
COLORS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 230, 230)]
QUESTION = "<image>\nHow many objects are there?"


# ----------------------------------------------------------------------------------------------- helpers
def byte_tokenizer():
    from vica2.tools.demo import build_byte_tokenizer

    return build_byte_tokenizer()


def make_tiny(seed: int = 0):
    """A tiny random model and its processor (byte-level tokenizer + <image>, <video>), ids consistent."""
    from vica2.processing_vica2 import Vica2Processor

    tokenizer = byte_tokenizer()
    model = tiny_model(seed=seed, image_token_id=len(tokenizer), video_token_id=len(tokenizer) + 1)
    for config in (model.config.text_config, model.generation_config):
        config.bos_token_id, config.eos_token_id = None, tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    return model, Vica2Processor.from_model_config(model.config, tokenizer)


def write_video(path, color, num_frames: int = 8, fps: int = 4, size: int = 32):
    """A small h264 mp4: a plain `color` with a square of the opposite colour moving down."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "veryfast"})
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for index in range(num_frames):
            frame = np.empty((size, size, 3), np.uint8)
            frame[:] = color
            top = (3 * index) % (size - 6)
            frame[top : top + 6, 4:10] = 255 - np.array(color)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def video_record(name: str, *answers: str, question: str = QUESTION) -> dict:
    turns = []
    for index, answer in enumerate(answers):
        turns.append({"from": "human", "value": question if index == 0 else f"And question {index + 1}?"})
        turns.append({"from": "gpt", "value": answer})
    return {"video": name, "conversations": turns}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Four 8-frame colour videos, an image, a corrupt "video" and a truncated "image"."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("media")
    for index, color in enumerate(COLORS):
        write_video(folder / f"{index}.mp4", color)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 70, 3), dtype=np.uint8)).save(folder / "room.png")
    (folder / "corrupt.mp4").write_bytes(rng.integers(0, 255, 4096, dtype=np.uint8).tobytes())
    (folder / "truncated.png").write_bytes((folder / "room.png").read_bytes()[:200])
    return folder


def dataset(records, processor, folder, **kwargs) -> Vica2SupervisedDataset:
    return Vica2SupervisedDataset(records, processor, media_root=folder, num_frames=NUM_FRAMES, **kwargs)


def training_args(tmp_path, **overrides) -> Vica2TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_steps=3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return Vica2TrainingArguments(**settings)


def trainer_for(model, processor, data, tmp_path, callbacks=None, **overrides) -> Vica2Trainer:
    return Vica2Trainer(
        model=model,
        args=training_args(tmp_path, **overrides),
        train_dataset=data,
        data_collator=Vica2DataCollator(processor.tokenizer.pad_token_id),
        processing_class=processor,
        callbacks=callbacks,
    )


def batch_of(data, indices=None) -> dict:
    indices = range(len(data)) if indices is None else indices
    return Vica2DataCollator(data.processor.tokenizer.pad_token_id)([data[i] for i in indices])


def state(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def grads(model) -> dict[str, torch.Tensor]:
    return {name: param.grad.detach().clone() for name, param in model.named_parameters() if param.grad is not None}


def relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a)
    den = sum(float(b[k].pow(2).sum()) for k in b)
    return (num / den) ** 0.5


def count_calls(modules) -> list[int]:
    """Forward-call counters on `modules`, each the first sub-module of a block, which a recomputation of the block
    calls again in backward. (Hooks on the block itself may sit outside the checkpoint, and torch stops a
    recomputation once the tensors backward needs are regenerated, hence pre-hooks on the block's first step.)"""
    counts = [0] * len(modules)
    for index, module in enumerate(modules):

        def hook(*_, index=index):
            counts[index] += 1

        module.register_forward_pre_hook(hook)
    return counts


def first_steps_of_blocks(model) -> list:
    """The first norm of: a Qwen2 decoder layer, a SigLIP encoder layer, a Hiera block."""
    inner = model.model
    return [
        inner.language_model.layers[0].input_layernorm,
        inner.vision_tower.encoder.layers[0].layer_norm1,
        inner.hiera_tower.blocks[0].layer_norm1,
    ]


class StopBelow(TrainerCallback):
    """Stops training once the logged loss falls below `fraction` of the first logged loss."""

    def __init__(self, fraction: float):
        self.fraction, self.losses = fraction, []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            if self.losses[-1] < self.fraction * self.losses[0]:
                control.should_training_stop = True


class CaptureGradients(TrainerCallback):
    """The accumulated gradients right before the (first) optimizer step."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = grads(model)


# ----------------------------------------------------------------------------------------------- trainable parts
def test_release_part_names_select_what_the_release_trained():
    assert resolve_parts("sam_projector") == ["hiera_projector"]
    assert resolve_parts("mm_vision_tower,mm_mlp_adapter") == ["vision_tower", "multi_modal_projector"]
    # The release's mm_language_model unfroze every name without "vision_tower" / "mm_projector" in it: the spatial
    # projector and image_newline too, never the Hiera trunk (model.sam_tower.vision_tower.*).
    assert set(resolve_parts("mm_language_model")) == {"language_model", "lm_head", "image_newline", "hiera_projector"}
    assert resolve_parts("sam_tower") == ["hiera_tower"]
    assert resolve_parts("stage1") == ["hiera_projector"]  # stage-1 mode: the spatial projector only
    with pytest.raises(ValueError, match="Unknown trainable part 'vision'"):
        resolve_parts("vision")

    model, _ = make_tiny()
    trained = set_trainable_parts(model)  # default: the release's stages 2/3
    assert set(trained) == set(resolve_parts(FULL_MINUS_HIERA)) and "hiera_tower" not in trained
    frozen = {name.split(".")[1] for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"hiera_tower"}  # Hiera frozen by default, as in the release
    assert STAGES["stage1"].trainable_parts == "sam_projector" and STAGES["stage1"].learning_rate == 1e-3
    set_trainable_parts(model, STAGES["stage1"].trainable_parts)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {
        name for name, _ in model.named_parameters() if name.startswith("model.hiera_projector.")
    }
    assert (STAGES["stage3"].learning_rate, STAGES["stage3"].vision_tower_lr) == (1e-5, 2e-6)


@pytest.mark.parametrize("parts", [FULL_MINUS_HIERA, STAGES["stage1"].trainable_parts])
def test_frozen_parts_get_no_grad_and_do_not_change(parts, media, tmp_path):
    model, processor = make_tiny()
    trained = set_trainable_parts(model, parts)
    prefixes = tuple(f"model.{part}" if part != "lm_head" else part for part in trained)
    data = dataset([video_record(f"{i}.mp4", str(i + 1)) for i in range(4)], processor, media)

    model.train()
    model(**batch_of(data)).loss.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == name.startswith(prefixes), name
    model.zero_grad(set_to_none=True)

    before = state(model)
    trainer = trainer_for(model, processor, data, tmp_path)
    trainer.train()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    for name, param in model.named_parameters():
        trainable = name.startswith(prefixes)
        assert (id(param) in optimized) == trainable, name
        assert torch.equal(param, before[name]) != trainable, name  # trained parts move, the rest stay bit-equal


def test_per_part_learning_rates_follow_the_release(media, tmp_path):
    model, processor = make_tiny()
    set_trainable_parts(model, "mm_vision_tower,sam_tower,mm_mlp_adapter,sam_projector,language_model")
    data = dataset([video_record("0.mp4", "1")], processor, media)
    trainer = trainer_for(model, processor, data, tmp_path, learning_rate=1e-5, vision_tower_lr=2e-6, projector_lr=3e-4)
    optimizer = trainer.create_optimizer()
    lr_of = {id(p): group.get("lr") for group in optimizer.param_groups for p in group["params"]}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert id(param) not in lr_of and not name.startswith("model.language_model."), name
        elif name.startswith(("model.vision_tower.", "model.hiera_tower.")):
            assert lr_of[id(param)] == 2e-6, name
        elif name.startswith(("model.multi_modal_projector.", "model.hiera_projector.")):
            assert lr_of[id(param)] == 3e-4, name
        else:
            assert lr_of[id(param)] == 1e-5, name


# ----------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def overfit_run(media, tmp_path_factory):
    """Full fine-tuning (minus Hiera) of a tiny model on 4 videos whose one-character answers differ."""
    model, processor = make_tiny()
    set_trainable_parts(model)
    data = dataset([video_record(f"{i}.mp4", str(i + 1)) for i in range(4)], processor, media)
    stopper = StopBelow(0.1)
    tmp_path = tmp_path_factory.mktemp("overfit")
    trainer = trainer_for(model, processor, data, tmp_path, callbacks=[stopper], max_steps=80)
    trainer.train()
    return trainer, data, stopper


def test_tiny_model_overfits_four_videos(overfit_run):
    trainer, _, stopper = overfit_run
    # Each answer is one character + <|im_end|>: without using the video, the best possible loss is ln(4) / 2 =
    # 0.69, above 10% of the start (~6.1), so reaching it needs the visual path.
    assert stopper.losses[0] > 5.0
    assert stopper.losses[-1] < 0.1 * stopper.losses[0], stopper.losses
    assert trainer.state.global_step <= 80


def test_saved_checkpoint_reloads_with_remote_code_to_the_same_logits(overfit_run, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    trainer, data, _ = overfit_run
    trainer.save_model(str(tmp_path))
    model = trainer.model.eval()
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(reloaded).__module__.startswith("transformers_modules")  # the saved remote code, not our package
    processor = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert processor.token_layout == data.processor.token_layout
    batch = {k: v for k, v in batch_of(data).items() if k != "labels"}
    with torch.no_grad():
        expected, actual = model(**batch).logits, reloaded(**batch).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_gradient_accumulation_matches_one_big_batch(media, tmp_path):
    """4 x 1 with accumulation == 1 x 4: the loss is normalised by the supervised tokens of the whole step."""
    # Ragged label counts (2 vs ~40 supervised tokens): a per-micro-batch mean weighs them differently.
    answers = ["1", "There are four of them, all in a row.", "2", "Three red ones and two very small blue ones."]
    records = [video_record(f"{i}.mp4", answer) for i, answer in enumerate(answers)]

    def accumulated(batch_size: int, accumulation: int, naive: bool = False) -> dict:
        model, processor = make_tiny()
        set_trainable_parts(model, "all")
        if naive:
            model.accepts_loss_kwargs = False  # Trainer then averages each micro-batch and divides by 4
        capture = CaptureGradients()
        trainer = trainer_for(
            model, processor, dataset(records, processor, media), tmp_path, callbacks=[capture],
            per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
            max_steps=1, max_grad_norm=0.0,
        )
        trainer.train()
        return capture.grads

    one_batch = accumulated(4, 1)
    assert relative_difference(accumulated(1, 4), one_batch) < 1e-5
    assert relative_difference(accumulated(1, 4, naive=True), one_batch) > 1e-2  # the test can tell


def test_activation_checkpointing_same_loss_grads_and_recomputes_every_tower(media):
    model, processor = make_tiny()
    set_trainable_parts(model, "all")
    data = dataset([video_record(f"{i}.mp4", str(i + 1)) for i in range(2)], processor, media)
    batch = batch_of(data)

    checkpointed = copy.deepcopy(model)
    enable_activation_checkpointing(checkpointed)
    results = []
    for candidate in (model, checkpointed):
        candidate.train()
        calls = count_calls(first_steps_of_blocks(candidate))
        loss = candidate(**batch).loss
        forward_calls = list(calls)
        loss.backward()
        results.append((loss.detach(), grads(candidate), forward_calls, list(calls)))

    (loss, plain_grads, plain_fwd, plain_total), (ckpt_loss, ckpt_grads, ckpt_fwd, ckpt_total) = results
    torch.testing.assert_close(ckpt_loss, loss, rtol=0, atol=1e-6)
    assert relative_difference(ckpt_grads, plain_grads) < 1e-6
    # Qwen2 layer, SigLIP layer, Hiera block: run once in forward; checkpointed ones again in backward.
    assert plain_total == plain_fwd and ckpt_fwd == plain_fwd
    assert ckpt_total == [2 * count for count in ckpt_fwd]


# ----------------------------------------------------------------------------------------------- LoRA
@requires_peft
def test_lora_trains_saves_reloads_and_merges(media, tmp_path):
    from peft import PeftModel

    from vica2.tools.training import add_lora, lora_config, lora_modules_to_save

    model, processor = make_tiny()
    # Adapters on the LLM; the spatial projector and the head train fully beside them (PEFT modules_to_save).
    to_save = lora_modules_to_save("sam_projector,lm_head")
    lora_model = add_lora(model, lora_config(r=8, lora_alpha=16, lora_dropout=0.0, modules_to_save=to_save))
    lora_modules = [name for name, _ in lora_model.named_modules() if name.endswith("lora_A")]
    assert lora_modules and all(".model.language_model.layers." in name for name in lora_modules)
    assert len(lora_modules) == 7 * model.config.text_config.num_hidden_layers  # q k v o gate up down
    trainable = {name for name, p in lora_model.named_parameters() if p.requires_grad}
    assert all("lora_" in name or ".modules_to_save." in name for name in trainable)
    assert {name.split(".modules_to_save")[0] for name in trainable if "lora_" not in name} == {
        "base_model.model.model.hiera_projector", "base_model.model.lm_head"}

    base_before = model.model.language_model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    data = dataset([video_record(f"{i}.mp4", str(i + 1)) for i in range(4)], processor, media)
    stopper = StopBelow(0.5)
    trainer = trainer_for(lora_model, processor, data, tmp_path, callbacks=[stopper], max_steps=30, learning_rate=1e-2)
    trainer.train()
    assert stopper.losses[-1] < 0.5 * stopper.losses[0], stopper.losses
    assert torch.equal(model.model.language_model.layers[0].self_attn.q_proj.base_layer.weight, base_before)

    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    batch = {k: v for k, v in batch_of(data).items() if k != "labels"}
    lora_model.eval()
    with torch.no_grad():
        expected = lora_model(**batch).logits
        reloaded = PeftModel.from_pretrained(make_tiny()[0], tmp_path / "adapter").eval()
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=0, atol=1e-5)
        merged = reloaded.merge_and_unload().eval()
        assert type(merged).__name__ == "Vica2ForConditionalGeneration"
        assert not any("lora_" in name for name, _ in merged.named_parameters())
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------- data and labels
def test_labels_are_exactly_the_answers_of_every_turn(media):
    _, processor = make_tiny()
    record = video_record("0.mp4", "Two chairs.", "Left of the bed.")
    data = dataset([record], processor, media)
    example = data[0]
    ids, labels = example["input_ids"], example["labels"]
    supervised = labels[labels != -100]
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers = [processor.tokenizer("Two chairs.")["input_ids"] + [im_end],
               processor.tokenizer("Left of the bed.")["input_ids"] + [im_end]]
    assert supervised.tolist() == answers[0] + answers[1]
    assert torch.equal(ids[labels != -100], supervised)  # labels are the inputs themselves, unshifted
    # The video's placeholders are all there, never labels; the time instruction follows the video, as in training.
    video_tokens = ids == processor.video_token_id
    assert int(video_tokens.sum()) == sum(processor._get_num_multimodal_tokens(video_sizes=[(NUM_FRAMES, 0, 0)])
                                          .num_video_tokens)
    assert (labels[video_tokens] == -100).all()
    text = processor.tokenizer.decode(ids[~video_tokens])
    assert "<|im_start|>user\n\nThe video lasts for 2.00 seconds, and 4 frames are uniformly sampled from it. " in text
    assert "Please answer the following questions related to this video.\n\nHow many objects" in text
    assert example["pixel_values_videos"][0].shape[0] == NUM_FRAMES


@requires_fixture
@pytest.mark.parametrize("name", ["video", "image"])
def test_release_label_mode_reproduces_the_release_training_labels(name, tmp_path):
    """The fixture's loss ids/labels come from the release's own preprocess_qwen for prompt.txt + answer."""
    from PIL import Image
    from transformers import AutoTokenizer

    from vica2.processing_vica2 import Vica2Processor

    sample = fixture_sample(name)
    processor = Vica2Processor.from_model_config(load_fixture_config(), AutoTokenizer.from_pretrained(FIXTURE_DIR))
    release_ids, release_labels = sample["loss_input_ids"], sample["loss_labels"]
    answer_start = len(release_ids) - release_ids[::-1].index(processor.tokenizer.convert_tokens_to_ids("<|im_start|>"))
    answer = processor.tokenizer.decode(release_ids[answer_start:]).split("assistant\n", 1)[1].split("<|im_end|>")[0]
    if name == "video":
        write_video(tmp_path / "clip.mp4", COLORS[0], num_frames=4, size=64)
        record = {"video": "clip.mp4"}
    else:
        Image.fromarray(sample["frames_uint8"][0]).save(tmp_path / "picture.png")
        record = {"image": "picture.png"}
    record["conversations"] = [{"from": "human", "value": sample["question"]}, {"from": "gpt", "value": answer}]
    # The fixture's prompt has no time instruction; the label quirk is what is compared here.
    example = Vica2SupervisedDataset(
        [record], processor, media_root=tmp_path, num_frames=4, add_time_instruction=False, label_mode="release"
    )[0]

    token_id = processor.video_token_id if name == "video" else processor.image_token_id
    ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
    start, count = ids.index(token_id), ids.count(token_id)
    assert count == sample["summary"]["num_visual_tokens"]
    assert ids[:start] + [-200] + ids[start + count :] == release_ids
    assert set(labels[start : start + count]) == {-100}
    assert labels[:start] + [-100] + labels[start + count :] == release_labels
    # The default mode supervises only the answer and its <|im_end|>.
    default = Vica2SupervisedDataset([record], processor, media_root=tmp_path, num_frames=4, add_time_instruction=False)
    supervised = [label for label in default[0]["labels"].tolist() if label != -100]
    assert processor.tokenizer.decode(supervised) == answer + "<|im_end|>"


def test_missing_and_corrupt_media_are_skipped_and_counted(media):
    _, processor = make_tiny()
    records = [
        video_record("0.mp4", "1"),
        video_record("absent.mp4", "2"),
        video_record("corrupt.mp4", "3"),
        {"image": "truncated.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                     {"from": "gpt", "value": "4"}]},
        {"image": "room.png", "conversations": [{"from": "human", "value": "Where?"}, {"from": "gpt", "value": "5"}]},
        {"video": "1.mp4", "conversations": [{"from": "human", "value": "<image>\nno answer"}]},
    ]
    data = dataset(records, processor, media)
    assert dict(data.skipped) == {"missing": 1, "invalid": 1} and len(data) == 4  # found before training

    examples = [data[i] for i in range(len(data))]
    assert dict(data.skipped) == {"missing": 1, "invalid": 1, "unreadable": 2}
    answers = [processor.tokenizer.decode([t for t in ex["labels"].tolist() if t != -100]) for ex in examples]
    # The unreadable records were replaced by the next usable one: each example carries its own media.
    assert answers == ["1<|im_end|>", "5<|im_end|>", "5<|im_end|>", "5<|im_end|>"]
    for example in examples:
        visual = (example["input_ids"] == processor.video_token_id) | (example["input_ids"] == processor.image_token_id)
        assert visual.any() and ("pixel_values_videos" in example or "pixel_values" in example)
    assert data[2]["labels"] is not None and data.skipped["unreadable"] == 2  # remembered: not read nor counted again

    lazy = dataset(records[:2], processor, media, check_media=False)
    assert len(lazy) == 2 and lazy[1]["pixel_values_videos"] is not None and lazy.skipped["missing"] == 1

    # DataLoader workers read the media: each unusable record is still skipped and counted once, in this process.
    workers = dataset(records, processor, media)
    loader = torch.utils.data.DataLoader(workers, batch_size=1, num_workers=2, collate_fn=lambda batch: batch[0])
    assert len(list(loader)) == 4
    assert workers.skipped == {"missing": 1, "invalid": 1, "unreadable": 2}


def test_overlong_examples_are_cut_after_the_media_or_skipped(media):
    _, processor = make_tiny()
    record = video_record("0.mp4", "A rather long answer that runs past the limit.")
    full = dataset([record], processor, media)[0]
    last_visual = int((full["input_ids"] == processor.video_token_id).nonzero().max())
    cut = dataset([record], processor, media, model_max_length=last_visual + 6)
    example = cut[0]
    assert torch.equal(example["input_ids"], full["input_ids"][: last_visual + 6])
    assert torch.equal(example["labels"], full["labels"][: last_visual + 6]) and cut.skipped == {}
    text_only = {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}
    too_short = dataset([record, text_only], processor, media, model_max_length=last_visual)
    example = too_short[0]  # the cut would split the video's tokens: the next record comes instead
    assert not (example["input_ids"] == processor.video_token_id).any() and "pixel_values_videos" not in example
    assert too_short.skipped == {"too_long": 1}


def test_collator_pads_right_and_batches_mixed_items(media):
    _, processor = make_tiny()
    records = [
        video_record("0.mp4", "A long answer to pad the others."),
        {"image": "room.png", "conversations": [{"from": "human", "value": "<image>\nWhere?"},
                                                {"from": "gpt", "value": "Here."}]},
        {"conversations": [{"from": "human", "value": "Text only?"}, {"from": "gpt", "value": "Yes."}]},
    ]
    data = dataset(records, processor, media)
    examples = [data[i] for i in range(3)]
    batch = Vica2DataCollator(processor.tokenizer.pad_token_id)(examples)
    lengths = [len(example["input_ids"]) for example in examples]
    for row, length in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (max(lengths) - length)
        assert (batch["input_ids"][row, length:] == processor.tokenizer.pad_token_id).all()
        assert (batch["labels"][row, length:] == -100).all() and batch["labels"][row, 0] == -100
    assert batch["pixel_values_videos"].shape[:2] == (1, NUM_FRAMES) and batch["image_sizes"].tolist() == [[40, 70]]
    model, _ = make_tiny()
    assert torch.isfinite(model(**batch).loss)  # placeholders and pixels line up across the batch


def test_token_ratio_settings_reach_the_model_and_the_processor(media, tmp_path):
    model, processor = make_tiny()
    default_count = sum(processor._get_num_multimodal_tokens(video_sizes=[(NUM_FRAMES, 0, 0)]).num_video_tokens)
    layout = apply_token_ratio(model, processor, hiera_frames=2, hiera_pool_stride=1)
    assert (model.config.hiera_frames, model.config.hiera_pool_stride) == (2, 1)
    assert processor.token_layout == layout == model.config.token_layout()
    data = dataset([video_record("0.mp4", "1")], processor, media)
    example = data[0]
    assert int((example["input_ids"] == processor.video_token_id).sum()) != default_count
    assert torch.isfinite(model(**batch_of(data)).loss)  # the model emits what the processor counted
    with pytest.raises(ValueError, match="multiple of hiera_frames"):
        apply_token_ratio(model, processor, hiera_frames=3)


def test_sampling_strategies_and_yaml_mixture(tmp_path):
    import random

    records = [{"id": i} for i in range(20)]
    rng = random.Random(0)
    assert sample_records(records, "all", rng) == records
    assert sample_records(records, "first:3", rng) == records[:3]
    assert sample_records(records, "end:2", rng) == records[-2:]
    assert sample_records(records, "end:0", rng) == []
    assert sample_records(records, "first:10%", rng) == records[:2]
    picked = sample_records(records, "random:25%", rng)
    assert len(picked) == 5 and len({r["id"] for r in picked}) == 5
    with pytest.raises(ValueError, match="sampling strategy"):
        sample_records(records, "every:2", rng)

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.json").write_text(json.dumps(records))
    (tmp_path / "data" / "b.jsonl").write_text("\n".join(json.dumps({"id": 100 + i}) for i in range(4)) + "\n")
    mixture = {"datasets": [{"json_path": "data/a.json", "sampling_strategy": "end:500"},
                            {"json_path": "data/b.jsonl", "sampling_strategy": "random:50%"},
                            {"json_path": "data/a.json", "sampling_strategy": "first:1"}]}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mixture))
    loaded = load_data_mixture(tmp_path / "mix.yaml", seed=3)
    assert loaded[:20] == records and loaded[-1] == records[0] and len(loaded) == 23
    assert loaded == load_data_mixture(tmp_path / "mix.yaml", seed=3)  # seeded: every rank gets the same data
    assert load_data_mixture(tmp_path / "data" / "b.jsonl")[0] == {"id": 100}


# ----------------------------------------------------------------------------------------------- finetune.py
def write_checkpoint_and_data(folder: Path) -> tuple[Path, Path]:
    model, processor = make_tiny()
    checkpoint = folder / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    records = [video_record(f"{i}.mp4", str(i + 1)) for i in range(len(COLORS))] + [video_record("gone.mp4", "0")]
    for i, color in enumerate(COLORS):
        write_video(folder / f"{i}.mp4", color)
    (folder / "train.json").write_text(json.dumps(records))
    mixture = {"datasets": [{"json_path": "train.json", "sampling_strategy": "all"},
                            {"json_path": "train.json", "sampling_strategy": "first:2"}]}
    (folder / "mix.yaml").write_text(yaml.safe_dump(mixture))
    return checkpoint, folder / "mix.yaml"


@pytest.mark.parametrize("mode", ["stage1", "lora"])
def test_finetune_script_runs_end_to_end(mode, tmp_path):
    if mode == "lora" and peft is None:
        pytest.skip("peft is not installed")
    checkpoint, mixture = write_checkpoint_and_data(tmp_path)
    output = tmp_path / "out"
    command = [
        sys.executable, str(REPO_ROOT / "tools" / "finetune.py"),
        "--model_name_or_path", str(checkpoint), "--data_path", str(mixture), "--media_root", str(tmp_path),
        "--output_dir", str(output), "--num_frames", str(NUM_FRAMES), "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--report_to", "none",
        "--save_strategy", "no", "--use_cpu", "True", "--logging_steps", "1", "--gradient_checkpointing", "True",
    ]
    command += ["--stage", "stage1"] if mode == "stage1" else ["--lora", "--lora_r", "4", "--merge_lora"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Skipped training records: {'missing': 1}" in result.stderr
    assert "6 training records" in result.stderr  # 5 + first:2 of them, less the missing one

    from transformers import AutoModelForImageTextToText

    original = AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True).state_dict()
    if mode == "stage1":
        assert "(hiera_projector)" in result.stderr
        trained = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True).state_dict()
        changed = {name for name in original if not torch.equal(original[name], trained[name])}
        assert changed and all(name.startswith("model.hiera_projector.") for name in changed)
        assert json.loads((output / "processor_config.json").read_text())["auto_map"]["AutoProcessor"]
    else:
        assert (output / "adapter_config.json").is_file() and (output / "adapter_model.safetensors").is_file()
        merged = AutoModelForImageTextToText.from_pretrained(output / "merged", trust_remote_code=True).state_dict()
        changed = {name for name in original if not torch.equal(original[name], merged[name])}
        assert changed and all(".language_model.layers." in name for name in changed)


def test_deepspeed_and_accelerate_configs():
    stages = {}
    for name in ("ds_zero2.json", "ds_zero3.json"):
        config = json.loads((REPO_ROOT / name).read_text())
        stages[name] = config["zero_optimization"]["stage"]
        # No "optimizer" section: Trainer builds the optimizer, so the per-part learning rates apply.
        assert "optimizer" not in config and "scheduler" not in config
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
            assert config[key] == "auto"
        assert config["bf16"]["enabled"] == "auto"
    assert stages == {"ds_zero2.json": 2, "ds_zero3.json": 3}
    assert json.loads((REPO_ROOT / "ds_zero3.json").read_text())["zero_optimization"][
        "stage3_gather_16bit_weights_on_model_save"
    ]
    assert {recipe.deepspeed for recipe in STAGES.values()} <= set(stages)
    accelerate = yaml.safe_load((REPO_ROOT / "accelerate_config.yaml").read_text())
    assert accelerate["distributed_type"] == "DEEPSPEED"
    assert (REPO_ROOT / accelerate["deepspeed_config"]["deepspeed_config_file"]).is_file()


def code_marking_checkpoint(folder: Path, marker: Path) -> Path:
    """A saved tiny checkpoint whose Python files each append their name to `marker` when they run."""
    model, processor = make_tiny()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    for path in folder.glob("*.py"):
        path.write_text(path.read_text() + f"\nopen({str(marker)!r}, 'a').write({path.name!r} + '\\n')\n")
    return folder


def test_finetune_loads_the_installed_classes_and_runs_code_from_the_folder_only_when_asked(tmp_path):
    from vica2.tools.finetune import load, model_option_parser
    from vica2.image_processing_vica2 import Vica2ImageProcessor
    from vica2.modeling_vica2 import Vica2ForConditionalGeneration
    from vica2.processing_vica2 import Vica2Processor

    marker = tmp_path / "ran.txt"
    folder = code_marking_checkpoint(tmp_path / "checkpoint", marker)
    default = model_option_parser().parse_args(["--model_name_or_path", str(folder)])
    model, processor = load(default)
    assert not marker.exists()
    assert type(model) is Vica2ForConditionalGeneration and type(processor) is Vica2Processor
    assert type(processor.image_processor) is Vica2ImageProcessor
    assert model.dtype == torch.float32 and not model.config.use_cache  # float32 master weights, no KV cache

    asked = model_option_parser().parse_args(["--model_name_or_path", str(folder), "--trust_remote_code", "True"])
    model, processor = load(asked)
    assert {"modeling_vica2.py", "processing_vica2.py"} <= set(marker.read_text().split())
    assert type(model).__module__.startswith("transformers_modules")
    assert type(processor).__module__.startswith("transformers_modules")


def test_finetune_refuses_a_tokenizer_that_needs_code_from_the_folder(tmp_path):
    from vica2.tools.finetune import load, model_option_parser

    marker = tmp_path / "ran.txt"
    folder = code_marking_checkpoint(tmp_path / "checkpoint", marker)
    (folder / "evil_tokenizer.py").write_text(f"open({str(marker)!r}, 'a').write('evil_tokenizer.py')\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", None]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load(model_option_parser().parse_args(["--model_name_or_path", str(folder)]))
    assert not marker.exists()


def test_finetune_says_a_bad_model_folder_in_one_line_with_its_flag(tmp_path):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "finetune.py"), "--model_name_or_path",
                             str(tmp_path / "nowhere"), "--data_path", "d.json", "--output_dir", str(tmp_path / "out"),
                             "--use_cpu", "True", "--report_to", "none"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"finetune.py: error: --model_name_or_path '{tmp_path / 'nowhere'}': no such folder" in result.stderr


# ---------------------------------------------------------------------------------------------------- hardening
def test_data_files_that_cannot_be_read_name_the_file_and_line(tmp_path):
    (tmp_path / "a.json").write_text('[\n {"id": 1},\n {"id": 2,,}\n]')
    with pytest.raises(ValueError, match=r"a\.json, line 3: not valid JSON"):
        load_data_mixture(tmp_path / "a.json")
    (tmp_path / "b.jsonl").write_text('{"id": 1}\n\n{"id": 2}\n{"id": \n')  # a blank line 2 still counts
    with pytest.raises(ValueError, match=r"b\.jsonl, line 4: not valid JSON"):
        load_data_mixture(tmp_path / "b.jsonl")
    (tmp_path / "c.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"c\.json: JSON nested too deeply"):
        load_data_mixture(tmp_path / "c.json")
    (tmp_path / "d.json").write_text('{"id": 1}')
    with pytest.raises(ValueError, match=r"d\.json must hold a JSON list of records, not a dict"):
        load_data_mixture(tmp_path / "d.json")
    with pytest.raises(ValueError, match=r"missing\.json: no such data file"):
        load_data_mixture(tmp_path / "missing.json")
    (tmp_path / "ok.json").write_text("[]")
    for name, text, problem in (
        ("e.yaml", "datasets: [unclosed", r"e\.yaml: not valid YAML"),
        ("f.yaml", "- json_path: ok.json", r"f\.yaml lists no `datasets`"),
        ("g.yaml", "datasets: {json_path: ok.json}", r"g\.yaml lists no `datasets`"),
        ("h.yaml", "datasets: [{sampling_strategy: all}]", r"h\.yaml: dataset 1 must be a mapping with a `json_path`"),
        ("i.yaml", "datasets: [{json_path: ok.json, sampling_strategy: 5}]", r"i\.yaml: dataset 1 must be a mapping"),
        ("j.yaml", "datasets: [{json_path: ok.json, sampling_strategy: 'first:abc'}]",
         r"j\.yaml, dataset 1: Sampling strategy 'first:abc': N must be a whole number"),
        ("k.yaml", "datasets: [{json_path: a.json}]", r"k\.yaml, dataset 1: .*a\.json, line 3: not valid JSON"),
    ):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=problem):
            load_data_mixture(tmp_path / name)


@pytest.mark.parametrize("options, message", [
    (["--num_frames", "0"], "--num_frames 0: must be at least 1"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0: must be at least 1"),
    (["--model_max_length", "0"], "--model_max_length 0: must be at least 1"),
    (["--data_path", "bad.json"], "bad.json, line 1: not valid JSON"),
    (["--data_path", "no_answers.json"], "--data_path no_answers.json: none of its 1 records can be trained on (e.g. no answer ('gpt') turn)"),
    (["--model_name_or_path", "nowhere/x/y"], "--model_name_or_path 'nowhere/x/y': no such folder"),
])
def test_finetune_checks_options_and_data_before_loading_the_model(tmp_path, monkeypatch, capsys, options, message):
    from vica2.tools import finetune

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "vica2"}')
    (tmp_path / "good.json").write_text(json.dumps([video_record("0.mp4", "1")]))
    (tmp_path / "bad.json").write_text("[{")
    (tmp_path / "no_answers.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": "Hi"}]}]))
    monkeypatch.setattr(finetune, "load", lambda args: pytest.fail("the model was loaded before the checks"))
    monkeypatch.chdir(tmp_path)
    argv = ["--model_name_or_path", str(tmp_path / "model"), "--data_path", "good.json", "--output_dir", "out",
            "--use_cpu", "True", "--report_to", "none", *options]
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"finetune.py: error: {message}" in error and "Traceback" not in error


@pytest.mark.parametrize("name", ["../0.mp4", "/etc/passwd", "~/0.mp4", "sub/../../0.mp4"])
def test_media_paths_outside_the_media_root_are_refused_by_the_evaluators_rule(media, name):
    from vica2.tools.paths import escaping_reason

    _, processor = make_tiny()
    data = dataset([video_record("0.mp4", "1"), video_record(name, "2")], processor, media / "sub_root_absent",
                   check_media=False)
    assert len(data) == 1 and data.skipped == {"invalid": 1} and escaping_reason(name)
    assert escaping_reason("scannet/scene0.mp4") is None


def test_a_record_with_a_video_and_an_image_is_refused_not_trained_without_its_image(media):
    _, processor = make_tiny()
    both = {"video": "0.mp4", "image": "room.png",
            "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "2"}]}
    data = dataset([video_record("0.mp4", "1"), both], processor, media)
    assert len(data) == 1 and data.skipped == {"invalid": 1}
    assert "both a video and an image" in check_record_problem(both)


def check_record_problem(record):
    from vica2.tools.training import check_record

    return check_record(record)


def test_zero_lengths_are_refused(media):
    _, processor = make_tiny()
    for name in ("model_max_length", "num_frames"):
        with pytest.raises(ValueError, match=f"{name} must be a whole number of at least 1, got 0"):
            Vica2SupervisedDataset([video_record("0.mp4", "1")], processor, media_root=media, **{name: 0})


def test_a_video_replaced_while_it_is_read_is_skipped_not_decoded_with_the_old_timing(media, tmp_path):
    import shutil

    _, processor = make_tiny()
    shutil.copy(media / "0.mp4", tmp_path / "moving.mp4")
    shutil.copy(media / "1.mp4", tmp_path / "1.mp4")
    data = dataset([video_record("moving.mp4", "1"), video_record("1.mp4", "2")], processor, tmp_path)
    read = processor.load_video

    def replaced_between_passes(path, **kwargs):
        video = read(path, **kwargs)
        if path.endswith("moving.mp4"):
            (tmp_path / "moving.mp4").write_bytes((media / "corrupt.mp4").read_bytes())
        return video

    processor.load_video = replaced_between_passes
    example = data[0]  # the replaced video is skipped; the next record comes in its place
    assert data.skipped == {"changed": 1}
    assert processor.tokenizer.decode([t for t in example["labels"].tolist() if t != -100]) == "2<|im_end|>"
