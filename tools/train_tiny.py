# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""Train the tiny ViCA2 that `vica2 demo` and `vica2 app` ship with, from a random initialisation, in one command:

    make tiny-model        # = python -m vica2.tools.train_tiny --workdir build/tiny-model --ship

1. the synthetic benchmark: `python -m vica2.tools.synthetic_bench` (2,000 training scenes, 100 held-out ones);
   the training mix is its records with each scene's description twice (`tiny_model.DESCRIPTION_COPIES`);
2. the random initial model (`vica2.tools.tiny_model.build_initial_model`, tokenizer learned from the training text);
3. `tools/finetune.py` on the training records: every part trains (towers, projectors, language model);
4. `vica2 eval-vsibench` on the held-out test split, for the trained and for the random initial model (the chance
   line), with the prompt the model was trained on (no time instruction, 4 frames);
5. with `--ship`: the trained folder (no Python: the installed classes load it), a held-out clip the model answers
   right and its question go to `tools/tiny_vica2/`.

Every step is one of the project's own commands, run as a subprocess (this front-end imports none of the others).
Writes `report.json` (the per-task scores, the training time, the loss history) and `loss.png` to the workdir.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

from vica2.tools import tiny_model


REPO_ROOT = Path(__file__).resolve().parents[1]
PROCESSES = 2  # data-parallel processes of one thread each: on 2 cores, faster than one process of two threads
SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "processor_config.json", "preprocessor_config.json",
                 "video_preprocessor_config.json")


def run(command: list[str], log: Path | None = None) -> float:
    """Run one step; its output goes to `log` (or through). Returns the wall time in seconds."""
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    with open(log, "w") if log else contextlib.nullcontext() as sink:
        result = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT if log else None)
    if result.returncode:
        raise SystemExit(f"step failed (exit {result.returncode})" + (f"; its log: {log}" if log else ""))
    return time.perf_counter() - started


def training_mix(records: list[dict]) -> list[dict]:
    """The benchmark's fine-tuning records with each description repeated (`tiny_model.DESCRIPTION_COPIES` in all)."""
    descriptions = [record for record in records if record["id"].endswith("_description")]
    return records + descriptions * (tiny_model.DESCRIPTION_COPIES - 1)


def evaluate(model: Path, synth: Path, output: Path) -> dict:
    output.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "vica2.tools.cli", "eval-vsibench", "--model", str(model), "--data",
         str(synth / "test.json"), "--video-root", str(synth), "--output-dir", str(output),
         *tiny_model.EVAL_OPTIONS], output / "eval.log")
    return json.loads((output / "summary.json").read_text())


def pick_demo(predictions: Path, tasks: list[str]) -> list[dict]:
    """The questions of `tasks` (those the trained model learned) about the first held-out scene where the trained
    model answers all of them right, its counting question first: the demo shows right answers, and only to
    questions the model answers right far more often than chance."""
    scenes = {}
    for line in predictions.read_text().splitlines():
        record = json.loads(line)
        # (the evaluator's relative-direction task counts the question types "object_rel_direction_easy" etc.)
        if any(record["question_type"].startswith(task) for task in tasks):
            scenes.setdefault(record["scene_name"], []).append(record)
    for records in scenes.values():
        if len(records) == len(tasks) and all(record["score"] == 1.0 for record in records):
            return sorted(records, key=lambda record: record["question_type"] != "object_counting")
    raise SystemExit(f"no held-out scene has every question of {tasks} answered right: nothing to ship as the demo")


def demo_question(record: dict) -> dict:
    """A question as the demo and the app ask it: the evaluator's text after the video, as the model was trained on."""
    user_turn = record["prompt"].split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    # the evaluator's "<video>\n{time instruction, or nothing}\n\n{text}": the processor puts the first part back
    text = user_turn.split("<video>\n", 1)[1].split("\n\n", 1)[1]
    return {"question_type": record["question_type"], "question": text.split("Question: ", 1)[1].split("\n")[0],
            "prompt": text, "answer": record["ground_truth"]}


def ship(trained: Path, synth: Path, demo: list[dict], destination: Path = tiny_model.SHIPPED) -> None:
    destination.mkdir(exist_ok=True)
    for name in SHIPPED_FILES:
        shutil.copyfile(trained / name, destination / name)
    shutil.copyfile(synth / demo[0]["dataset"] / f"{demo[0]['scene_name']}.mp4", destination / "demo.mp4")
    sample = {"video": "demo.mp4", "scene": demo[0]["scene_name"], "questions": [demo_question(r) for r in demo]}
    (destination / tiny_model.DEMO_FILE).write_text(json.dumps(sample, indent=2, ensure_ascii=False) + "\n")


def loss_plot(history: list[dict], path: Path, size=(640, 360)) -> None:
    """The training loss against the step on a log scale (the first steps fall by 10x, the rest matters), drawn
    with PIL (a plot is all this needs; no plotting dependency)."""
    from PIL import Image, ImageDraw

    points = [(entry["step"], math.log(entry["loss"])) for entry in history if "loss" in entry]
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 60, 20, size[0] - 20, size[1] - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    low, high = min(y for _, y in points), max(y for _, y in points)
    span, last_step = (high - low) or 1.0, points[-1][0]
    xy = [(left + (right - left) * step / last_step, bottom - (bottom - top) * (y - low) / span) for step, y in points]
    draw.line(xy, fill=(30, 90, 200), width=2)
    for fraction in (0, 0.5, 1):
        draw.text((5, bottom - (bottom - top) * fraction - 6), f"{math.exp(low + span * fraction):.2f}", fill="black")
        draw.text((left + (right - left) * fraction - 10, bottom + 8), f"{int(last_step * fraction)}", fill="black")
    draw.text((left + 10, top + 8), "tiny ViCA2: training loss (answer tokens, log scale) per optimizer step",
              fill="black")
    image.save(path)


def task_table(trained: dict, random: dict) -> str:
    rows = ["| task | trained tiny ViCA2 | random initial model | chance |", "|---|---|---|---|"]
    for task, scores in trained["tasks"].items():
        rows.append(f"| {task} | {scores['score']:.1f} | {random['tasks'][task]['score']:.1f} | "
                    f"{trained['chance'][task]:.1f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vica2.tools.train_tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="a folder for the data, runs and report")
    parser.add_argument("--train-scenes", type=int, default=2000, help="synthetic training scenes (default 2000)")
    parser.add_argument("--test-scenes", type=int, default=100, help="held-out test scenes (default 100)")
    parser.add_argument("--max-steps", type=int, default=tiny_model.MAX_STEPS, help="optimizer steps")
    parser.add_argument("--ship", action="store_true", help="copy the result into tools/tiny_vica2/")
    args = parser.parse_args(argv)
    work, synth = args.workdir, args.workdir / "synth"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    run([sys.executable, "-m", "vica2.tools.synthetic_bench", "--output-dir", str(synth), "--train",
         str(args.train_scenes), "--test", str(args.test_scenes), "--seed", "0"])
    records = json.loads((synth / "train_llava.json").read_text())
    mix = work / "train_mix.json"
    mix.write_text(json.dumps(training_mix(records)))
    initial = tiny_model.build_initial_model(work / "initial", records)
    trained = work / "trained"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={PROCESSES}"]
    seconds = run([*launcher, str(REPO_ROOT / "tools" / "finetune.py"), "--model_name_or_path", str(initial),
                   "--data_path", str(mix), "--media_root", str(synth), "--output_dir",
                   str(trained), "--trainable_parts", "all", "--use_cpu", "True", "--report_to", "none",
                   "--save_strategy", "no", "--disable_tqdm", "True", *tiny_model.training_options(args.max_steps)],
                  work / "finetune.log")
    history = json.loads((trained / "trainer_state.json").read_text())["log_history"]
    loss_plot(history, work / "loss.png")
    scores = {"trained": evaluate(trained, synth, work / "eval-trained"),
              "random": evaluate(initial, synth, work / "eval-random")}
    report = {"train_runtime_seconds": round(history[-1]["train_runtime"]), "finetune_seconds": round(seconds),
              "total_seconds": round(time.perf_counter() - started), "steps": args.max_steps,
              "recipe": tiny_model.TRAINING, "chance": scores["trained"]["chance"],
              "scores": {name: {task: s["score"] for task, s in summary["tasks"].items()} for name, summary in
                         scores.items()}, "loss_history": history}
    (work / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"training: {history[-1]['train_runtime'] / 60:.1f} min for {args.max_steps} steps (finetune.py "
          f"{seconds / 60:.1f} min with its start; {report['total_seconds'] / 60:.1f} min so far)\n"
          + task_table(*scores.values()))
    if args.ship:
        learned = tiny_model.learned_tasks(scores["trained"])
        if not learned:
            raise SystemExit("the trained model is near chance on every task: nothing to ship")
        ship(trained, synth, pick_demo(work / "eval-trained" / "predictions.jsonl", learned))
        print(f"shipped to {tiny_model.SHIPPED}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
