"""The built-in tiny ViCA2 (tools/tiny_vica2/), the offline default: small, servable, right on its demo clip, far
above chance on held-out synthetic clips where a random one is not; and fine-tuning on the synthetic data teaches a
model to read the video, through every part."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vica2.tools import synthetic_bench, tiny_model


pytest.importorskip("av")

from vica2.modeling_vica2 import Vica2ForConditionalGeneration  # noqa: E402
from vica2.tools import finetune  # noqa: E402
from vica2.tools.evaluate_vsibench import main as evaluate  # noqa: E402
from vica2.tools.inference import ask, load_model_and_processor  # noqa: E402
from vica2.tools.training import Vica2DataCollator, Vica2SupervisedDataset  # noqa: E402


HELD_OUT_SCENES = 25  # the first held-out test scenes of `make tiny-model` (seed 0): ~100 questions
LEARNED = ("object_counting", "object_size_estimation")  # what the shipped model learned (benchmarks/RESULTS.md)
SHORT_STEPS, TRAIN_SCENES, HELD_OUT = 120, 400, 32  # the short fine-tune: 120 steps of 16 records
# A learning rate of 3e-3 does not learn this within 120 steps (the visual tokens become alike across clips first).
TRAINING = {"add_time_instruction": "False", "learning_rate": "1e-3", "per_device_train_batch_size": "16",
            "max_steps": str(SHORT_STEPS), "warmup_steps": "20", "lr_scheduler_type": "cosine", "weight_decay": "0.0",
            "seed": "0", "dataloader_num_workers": "0", "use_cpu": "True", "report_to": "none",
            "save_strategy": "no", "disable_tqdm": "True", "trainable_parts": "all"}
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    synthetic_bench.generate(folder, train=0, test=HELD_OUT_SCENES, seed=0)
    return folder


def run_eval(model, held_out, output) -> dict:
    code = evaluate(["--model", str(model), "--data", str(held_out / "test.json"), "--video-root", str(held_out),
                     "--output-dir", str(output), *tiny_model.EVAL_OPTIONS])
    assert code == 0
    return json.loads((output / "summary.json").read_text())


def test_shipped_model_is_small_and_has_a_head_size_vllm_cpu_serves():
    files = list(tiny_model.SHIPPED.iterdir())
    assert sum(path.stat().st_size for path in files) <= 10 * 2**20
    assert not [path for path in files if path.suffix == ".py"]  # the installed classes load it: no code to trust
    text = json.loads((tiny_model.SHIPPED / "config.json").read_text())["text_config"]
    assert text["hidden_size"] // text["num_attention_heads"] in VLLM_CPU_HEAD_SIZES


def test_shipped_model_answers_its_held_out_demo_clip_right():
    model, processor = load_model_and_processor(str(tiny_model.SHIPPED), "float32", "cpu")
    samples = tiny_model.demo_samples()
    assert [sample["question_type"] for sample in samples] == list(LEARNED)  # counting first: the demo's question
    for sample in samples:
        assert Path(sample["video"]).is_file() and sample["video"].startswith(str(tiny_model.SHIPPED))
        answer = ask(model, processor, sample["prompt"], video=sample["video"], max_new_tokens=8)[0]
        assert answer.text.strip() == sample["answer"], sample["question"]


def test_shipped_model_is_far_above_chance_where_it_learned_and_a_random_one_is_not(held_out, tmp_path):
    trained = run_eval(tiny_model.SHIPPED, held_out, tmp_path / "trained")
    random_folder = tmp_path / "random"
    model, processor = load_model_and_processor(str(tiny_model.SHIPPED), "float32", "cpu")
    torch.manual_seed(0)
    Vica2ForConditionalGeneration(model.config).save_pretrained(random_folder)
    processor.save_pretrained(random_folder)
    random = run_eval(random_folder, held_out, tmp_path / "random-eval")
    assert trained["errors"] == 0 and trained["chance"].keys() == trained["tasks"].keys()
    assert len(trained["tasks"]) == 4
    assert tiny_model.learned_tasks(trained) == list(LEARNED), trained["tasks"]
    for task in LEARNED:  # MRA at least 0.8: the bar for a numeric task (chance is about 0.5)
        assert trained["tasks"][task]["score"] >= 80, (task, trained["tasks"][task], trained["chance"][task])
    for task, chance in random["chance"].items():
        assert random["tasks"][task]["score"] <= chance + 10, (task, random["tasks"][task], chance)
    assert tiny_model.learned_tasks(random) == []


def heldout_answer_loss(model, processor, records, folder, shuffled: bool) -> float:
    """Mean loss on the answer tokens of `records`, each with its own clip or (shuffled) the next record's."""
    if shuffled:
        videos = [record["video"] for record in records]
        records = [{**record, "video": videos[(i + 1) % len(videos)]} for i, record in enumerate(records)]
    data = Vica2SupervisedDataset(records, processor, media_root=folder, add_time_instruction=False)
    batch = Vica2DataCollator(processor.tokenizer.pad_token_id)([data[i] for i in range(len(data))])
    with torch.no_grad():
        return model(**batch).loss.item()


def first_colour_records(data, scenes: range, seed: int) -> list[dict]:
    """Records asking for the colour of the cube a clip shows first: its answer is in the video alone (the colour
    names are equally likely a priori), and a tiny model learns to read it within a short fine-tune."""
    records = []
    for index in scenes:
        first = synthetic_bench.make_scene(synthetic_bench.scene_rng(seed, "train", index))[0]
        records.append({"video": f"{synthetic_bench.DATASET}/train_{index:05d}.mp4", "conversations": [
            {"from": "human", "value": "<image>\nWhat is the colour of the cube that appears first?"},
            {"from": "gpt", "value": first.colour}]})
    return records


@pytest.mark.slow
def test_short_fine_tune_learns_to_read_the_video_through_every_part(tmp_path):
    """From the random initialisation, a short finetune.py run. On held-out clips the loss with each clip is then
    well below the loss with another clip: only reading the video gets there (a model that learned the text alone
    scores the same on both; a detached projector, a broken vision path or labels masked wrong cannot). And every
    part moved: a frozen tower or projector is caught too."""
    data, seed = tmp_path / "synthetic", 1
    records = synthetic_bench.generate(data, train=TRAIN_SCENES + HELD_OUT, test=0, seed=seed)["records"]
    train = first_colour_records(data, range(TRAIN_SCENES), seed)
    held_out = first_colour_records(data, range(TRAIN_SCENES, TRAIN_SCENES + HELD_OUT), seed)
    (data / "first_colour.json").write_text(json.dumps(train))
    initial = tiny_model.build_initial_model(tmp_path / "initial", records)
    finetune.main(["--model_name_or_path", str(initial), "--data_path", str(data / "first_colour.json"),
                   "--media_root", str(data), "--output_dir", str(tmp_path / "trained"),
                   *(f"--{name}={value}" for name, value in TRAINING.items())])
    before, _ = load_model_and_processor(str(initial), "float32", "cpu")
    model, processor = load_model_and_processor(str(tmp_path / "trained"), "float32", "cpu")
    own = heldout_answer_loss(model, processor, held_out, data, shuffled=False)
    other = heldout_answer_loss(model, processor, held_out, data, shuffled=True)
    print(f"held-out loss: own clip {own:.3f}, another clip {other:.3f}")
    assert own < 0.5 * other, (own, other)
    trained = dict(model.named_parameters())
    for name, param in before.named_parameters():
        assert not torch.equal(param, trained[name]), f"{name} did not train"


@pytest.mark.slow
def test_the_tiny_model_recipe_runs_end_to_end_at_a_few_steps(tmp_path):
    """`make tiny-model`'s command (data, initial model, finetune.py in two processes, eval-vsibench twice, report
    and loss plot), cut to a few steps and scenes; without --ship nothing in the repository changes."""
    from PIL import Image

    from vica2.tools import train_tiny

    shipped = {path.name: path.stat().st_mtime_ns for path in tiny_model.SHIPPED.iterdir()}
    assert train_tiny.main(["--workdir", str(tmp_path), "--train-scenes", "8", "--test-scenes", "2",
                            "--max-steps", "4"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] == 4 and report["recipe"] == tiny_model.TRAINING
    assert 0 < report["train_runtime_seconds"] <= report["finetune_seconds"] <= report["total_seconds"]
    assert report["chance"].keys() == report["scores"]["trained"].keys()
    for scores in report["scores"].values():  # the trained and the random initial model, every task scored
        assert len(scores) == 4
    assert [entry["step"] for entry in report["loss_history"] if "loss" in entry] == [1, 2, 3, 4]
    assert Image.open(tmp_path / "loss.png").size == (640, 360)
    mix = json.loads((tmp_path / "train_mix.json").read_text())
    assert sum(record["id"].endswith("_description") for record in mix) == 8 * tiny_model.DESCRIPTION_COPIES
    assert {path.name: path.stat().st_mtime_ns for path in tiny_model.SHIPPED.iterdir()} == shipped


def test_a_demo_file_naming_a_video_outside_its_folder_is_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "elsewhere.mp4").write_bytes(b"not the model's")
    (folder / tiny_model.DEMO_FILE).write_text(json.dumps({"video": "../elsewhere.mp4", "questions": []}))
    with pytest.raises(ValueError, match="names a video outside its folder"):
        tiny_model.demo_samples(folder)


def test_the_demo_is_the_first_held_out_scene_right_on_every_learned_task_and_none_is_refused(tmp_path):
    from vica2.tools.train_tiny import pick_demo

    def record(scene, kind, score):
        return {"scene_name": scene, "question_type": kind, "score": score}

    rows = [record("a", "object_counting", 1.0), record("a", "object_size_estimation", 0.5),  # size wrong
            record("b", "object_size_estimation", 1.0), record("b", "object_counting", 1.0),
            record("b", "obj_appearance_order", 0.0)]  # not a learned task: ignored
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    picked = pick_demo(predictions, ["object_counting", "object_size_estimation"])
    assert [(r["scene_name"], r["question_type"]) for r in picked] == [("b", "object_counting"),
                                                                      ("b", "object_size_estimation")]
    with pytest.raises(SystemExit, match="no held-out scene"):
        pick_demo(predictions, ["object_counting", "object_size_estimation", "obj_appearance_order"])
