# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""A synthetic spatial benchmark: short top-down clips of coloured shapes entering a room, with questions in
VSI-Bench's own data format, deterministic from a seed.

    python -m vica2.tools.synthetic_bench --output-dir synth --train 400 --test 100 --seed 0

writes `synthetic/{train,test}_NNNNN.mp4`, `train.json` / `test.json` (VSI-Bench rows: id, dataset, scene_name,
question_type, question, options, ground_truth; `vica2 eval-vsibench --data synth/test.json --video-root synth`
reads them unchanged) and `train_llava.json` (the same questions as fine-tuning records for finetune.py).

Every scene is drawn from its own seed sequence (seed, split, index), so the splits never share a scene and any one
scene can be regenerated alone. Four VSI-Bench tasks fit a flat scene:
- object_counting: how many squares / circles (numeric, scored with mean relative accuracy);
- object_size_estimation: an object's longest side in centimetres (numeric, MRA);
- object_rel_direction_easy: at the end of the clip, is A left or right of B (multiple choice);
- obj_appearance_order: the order in which the named objects first appear (multiple choice).
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


DATASET = "synthetic"
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
    "white": (240, 240, 240),
    "purple": (150, 60, 200),
}
SHAPES = ("square", "circle")
SIZES_CM = (40, 80, 120, 160)  # an object's longest side
ROOM_CM = 600  # the frame's side, in centimetres
FRAME_PX = 128
NUM_FRAMES = 16
FPS = 4
BACKGROUND = (90, 90, 90)
MIN_SEPARATION_CM = 60  # left / right questions only for pairs at least this far apart sideways

# The release's inference text (what `vica2 eval-vsibench --prompt-style vica2` sends after the time instruction).
PRE_PROMPT = "These are frames of a video."
CHOICE_POST_PROMPT = "Answer with the option\u2019s letter from the given choices directly."
NUMERIC_POST_PROMPT = "Please answer the question using a single word or phrase."
LETTERS = "ABCD"


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size_cm: int
    start: np.ndarray  # (x, y) centre in cm when it appears
    velocity: np.ndarray  # cm per frame
    appears_at: int  # frame index of its first appearance

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def centre(self, frame: int) -> np.ndarray:
        half = self.size_cm / 2
        return np.clip(self.start + self.velocity * max(frame - self.appears_at, 0), half, ROOM_CM - half)


def make_scene(rng: np.random.Generator) -> list[SceneObject]:
    """3 to 5 objects of distinct colours that never overlap; the first appears at frame 0, the others at distinct
    frames 3 apart (two objects seen first in one sampled frame would make the appearance order ambiguous)."""
    count = int(rng.integers(3, 6))
    colours = rng.choice(list(COLOURS), size=count, replace=False)
    appears = np.sort(np.concatenate([[0], 3 * rng.choice(np.arange(1, 5), count - 1, replace=False)]))
    objects = []
    for colour, appears_at in zip(colours, appears):
        size = int(rng.choice(SIZES_CM))
        while True:  # rejection sampling: a few draws at most in a 6 m room
            candidate = SceneObject(str(colour), str(rng.choice(SHAPES)), size,
                                    rng.uniform(size / 2, ROOM_CM - size / 2, size=2), rng.uniform(-3, 3, 2),
                                    int(appears_at))
            if not any(_overlap(candidate, other) for other in objects):
                break
        objects.append(candidate)
    return objects


def _overlap(a: SceneObject, b: SceneObject) -> bool:
    """Whether the two objects' squares (a circle's bounding box), plus a margin, meet in any frame."""
    reach = (a.size_cm + b.size_cm) / 2 + 10
    return any(np.all(np.abs(a.centre(f) - b.centre(f)) < reach) for f in range(NUM_FRAMES))


def render(objects: list[SceneObject], frame: int) -> np.ndarray:
    """One (FRAME_PX, FRAME_PX, 3) uint8 frame, objects drawn in order of appearance."""
    image = np.empty((FRAME_PX, FRAME_PX, 3), np.uint8)
    image[:] = BACKGROUND
    ys, xs = (np.mgrid[0:FRAME_PX, 0:FRAME_PX] + 0.5) * (ROOM_CM / FRAME_PX)
    for obj in objects:
        if frame < obj.appears_at:
            continue
        cx, cy = obj.centre(frame)
        half = obj.size_cm / 2
        if obj.shape == "square":
            inside = (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
        else:
            inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= half**2
        image[inside] = COLOURS[obj.colour]
    return image


def write_clip(objects: list[SceneObject], path: Path) -> None:
    try:
        import av
    except ImportError:
        raise ImportError("Writing the synthetic clips needs PyAV: `pip install av`.") from None
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width = stream.height = FRAME_PX
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12", "threads": "1"}  # near-lossless colours; one thread: the same bytes each run
        for frame in range(NUM_FRAMES):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(render(objects, frame), format="rgb24")))
        container.mux(stream.encode())


def _shuffled(rng, options: list[str]) -> tuple[list[str], str]:
    """Options in a random order, lettered; the ground truth is the letter of the first (correct) text."""
    order = rng.permutation(len(options))
    texts = [options[i] for i in order]
    return [f"{LETTERS[i]}. {text}" for i, text in enumerate(texts)], LETTERS[int(np.argmax(order == 0))]


def questions_for(objects: list[SceneObject], rng: np.random.Generator) -> list[dict]:
    """One question of each task the scene supports, as (question_type, question, options, ground_truth) dicts."""
    rows = []
    shape = str(rng.choice([s for s in SHAPES if any(o.shape == s for o in objects)]))
    rows.append({"question_type": "object_counting", "question": f"How many {shape}s are in this room?",
                 "options": None, "ground_truth": str(sum(o.shape == shape for o in objects))})
    target = objects[int(rng.integers(len(objects)))]
    rows.append({"question_type": "object_size_estimation",
                 "question": f"What is the length of the longest dimension (length, width, or height) of the "
                             f"{target.name}, measured in centimeters?",
                 "options": None, "ground_truth": str(target.size_cm)})
    last = NUM_FRAMES - 1
    pairs = [(a, b) for a, b in itertools.permutations(objects, 2)
             if abs(a.centre(last)[0] - b.centre(last)[0]) >= MIN_SEPARATION_CM]
    if pairs:
        a, b = pairs[int(rng.integers(len(pairs)))]
        side = "left" if a.centre(last)[0] < b.centre(last)[0] else "right"
        options, truth = _shuffled(rng, [side, "right" if side == "left" else "left"])
        rows.append({"question_type": "object_rel_direction_easy",
                     "question": f"At the end of the video, is the {a.name} to the left or the right of the {b.name}?",
                     "options": options, "ground_truth": truth})
    named = objects[:4] if len(objects) >= 4 else objects
    named = [named[i] for i in rng.permutation(len(named))]  # ask in a random order, not the answer's
    correct = sorted(named, key=lambda o: o.appears_at)
    wrong = []
    while len(wrong) < 3:
        candidate = [named[i] for i in rng.permutation(len(named))]
        if candidate != correct and candidate not in wrong:
            wrong.append(candidate)
    options, truth = _shuffled(rng, [", ".join(o.name for o in order) for order in [correct, *wrong]])
    rows.append({"question_type": "obj_appearance_order",
                 "question": "What will be the first-time appearance order of the following categories in the "
                             f"video: {', '.join(o.name for o in named)}?",
                 "options": options, "ground_truth": truth})
    return rows


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, ("train", "test").index(split), index])


def generate_split(output_dir: Path, split: str, count: int, seed: int) -> list[dict]:
    """Write `count` clips of one split and return their VSI-Bench rows."""
    (output_dir / DATASET).mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        rng = scene_rng(seed, split, index)
        objects = make_scene(rng)
        scene = f"{split}_{index:05d}"
        write_clip(objects, output_dir / DATASET / f"{scene}.mp4")
        for number, row in enumerate(questions_for(objects, rng)):
            rows.append({"id": f"{scene}_{number}", "dataset": DATASET, "scene_name": scene, **row})
    return rows


def llava_record(row: dict) -> dict:
    """A VSI-Bench row as a fine-tuning record with the release's inference text (finetune adds the time line)."""
    text = f"{PRE_PROMPT}\n\nQuestion: {row['question']}\n"
    if row["options"]:
        text += "\n".join(row["options"]) + f"\n{CHOICE_POST_PROMPT}\n"
    else:
        text += f"{NUMERIC_POST_PROMPT}\n"
    return {"id": row["id"], "video": f"{row['dataset']}/{row['scene_name']}.mp4",
            "conversations": [{"from": "human", "value": "<image>\n" + text}, {"from": "gpt", "value": row["ground_truth"]}]}


def generate(output_dir: Path, train: int, test: int, seed: int = 0) -> dict[str, list[dict]]:
    output_dir = Path(output_dir)
    splits = {"train": generate_split(output_dir, "train", train, seed),
              "test": generate_split(output_dir, "test", test, seed)}
    for split, rows in splits.items():
        (output_dir / f"{split}.json").write_text(json.dumps(rows, indent=1))
    (output_dir / "train_llava.json").write_text(json.dumps([llava_record(row) for row in splits["train"]], indent=1))
    return splits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True, help="folder to write the clips and question files to")
    parser.add_argument("--train", type=int, default=400, help="number of training scenes (default 400)")
    parser.add_argument("--test", type=int, default=100, help="number of held-out test scenes (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="the benchmark's seed (default 0)")
    args = parser.parse_args(argv)
    for name in ("train", "test"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be 0 or more")
    splits = generate(args.output_dir, args.train, args.test, args.seed)
    print(f"{len(splits['train'])} training and {len(splits['test'])} test questions in {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
