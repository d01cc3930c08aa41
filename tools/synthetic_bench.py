# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""A synthetic spatial benchmark: short top-down clips of coloured cubes appearing one by one in a room, with
questions in VSI-Bench's own data format, deterministic from a seed.

    python -m vica2.tools.synthetic_bench --output-dir synth --train 400 --test 100 --seed 0

writes `synthetic/{train,test}_NNNNN.mp4`, `train.json` / `test.json` (VSI-Bench rows: id, dataset, scene_name,
question_type, question, options, ground_truth; `vica2 eval-vsibench --data synth/test.json --video-root synth`
reads them unchanged) and `train_llava.json` (fine-tuning records for finetune.py: per training scene, one record
per question and a dense description of the scene, the caption that teaches a model what is where).

Every scene is drawn from its own seed sequence (seed, split, index), so the splits never share a scene and any one
scene can be regenerated alone. The room is a 4 x 4 grid of cells, one cube per cell, so a 112 px SigLIP view gives
each cell one pooled token. Four VSI-Bench tasks fit it:
- object_counting: how many cubes (numeric, scored with mean relative accuracy);
- object_size_estimation: a named cube's side in centimetres (numeric, MRA);
- object_rel_direction_easy: at the end of the clip, is A left or right of B (multiple choice, VSI-Bench's fixed
  options "A. left", "B. right");
- obj_appearance_order: the order in which the named cubes first appear (multiple choice, one option led by each).
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
SHAPE = "cube"  # every object is a cube seen from above; its colour names it
SIZES_CM = (50, 90, 130)  # a cube's side
ROOM_CM = 600  # the frame's side, in centimetres
GRID = 4  # the room is GRID x GRID cells; each object rests in its own cell (150 cm: no two ever touch)
FRAME_PX = 128
NUM_FRAMES = 16
FPS = 4
BACKGROUND = (90, 90, 90)
APPEARANCE_FRAMES = (0, 5, 10, 15)  # each first seen in its own frame of any 4-, 8- or 16-frame sample
DRIFT_CM = 0.25  # at most this many cm per frame, in each direction

# The release's inference text (what `vica2 eval-vsibench --prompt-style vica2` sends after the time instruction).
PRE_PROMPT = "These are frames of a video."
CHOICE_POST_PROMPT = "Answer with the option\u2019s letter from the given choices directly."
NUMERIC_POST_PROMPT = "Please answer the question using a single word or phrase."
LETTERS = "ABCD"
DESCRIPTION_PROMPT = ("Describe the cubes in the order they appear: colour, side in centimeters, and column "
                      "from the left.")


@dataclass(frozen=True)
class SceneObject:
    colour: str
    size_cm: int
    start: np.ndarray  # (x, y) centre in cm when it appears
    velocity: np.ndarray  # cm per frame
    appears_at: int  # frame index of its first appearance

    @property
    def name(self) -> str:
        return f"{self.colour} {SHAPE}"

    def centre(self, frame: int) -> np.ndarray:
        return self.start + self.velocity * max(frame - self.appears_at, 0)


def make_scene(rng: np.random.Generator) -> list[SceneObject]:
    """2 to 4 cubes of distinct colours in distinct cells of the room, each drifting slowly inside its cell; the
    first appears at frame 0, the others one by one at `APPEARANCE_FRAMES`."""
    count = int(rng.integers(2, len(APPEARANCE_FRAMES) + 1))
    colours = rng.choice(list(COLOURS), size=count, replace=False)
    cells = rng.choice(GRID * GRID, size=count, replace=False)
    cell_cm = ROOM_CM / GRID
    objects = []
    for colour, cell, appears_at in zip(colours, cells, APPEARANCE_FRAMES):
        size = int(rng.choice(SIZES_CM))
        centre = (np.array([cell % GRID, cell // GRID]) + 0.5) * cell_cm
        # placed within 2 cm of the cell's centre and drifting at most 4 cm: even two 130 cm cubes in neighbouring
        # cells stay apart (65 + 6 < 75 cm, half a cell)
        objects.append(SceneObject(str(colour), size, centre + rng.uniform(-2, 2, 2),
                                   rng.uniform(-DRIFT_CM, DRIFT_CM, 2), int(appears_at)))
    return objects


def render(objects: list[SceneObject], frame: int) -> np.ndarray:
    """One (FRAME_PX, FRAME_PX, 3) uint8 frame: the cubes that have appeared, on the floor's grey."""
    image = np.empty((FRAME_PX, FRAME_PX, 3), np.uint8)
    image[:] = BACKGROUND
    ys, xs = (np.mgrid[0:FRAME_PX, 0:FRAME_PX] + 0.5) * (ROOM_CM / FRAME_PX)
    for obj in objects:
        if frame >= obj.appears_at:
            cx, cy = obj.centre(frame)
            image[(np.abs(xs - cx) <= obj.size_cm / 2) & (np.abs(ys - cy) <= obj.size_cm / 2)] = COLOURS[obj.colour]
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
    """One question of each task, as (question_type, question, options, ground_truth) dicts."""
    rows = [{"question_type": "object_counting", "question": f"How many {SHAPE}s are in this room?",
             "options": None, "ground_truth": str(len(objects))}]
    target = objects[int(rng.integers(len(objects)))]
    rows.append({"question_type": "object_size_estimation",
                 "question": f"What is the length of the longest dimension (length, width, or height) of the "
                             f"{target.name}, measured in centimeters?",
                 "options": None, "ground_truth": str(target.size_cm)})
    last = NUM_FRAMES - 1
    # cubes in different columns of cells are at least a cell minus the drift apart sideways
    pairs = [(a, b) for a, b in itertools.permutations(objects, 2)
             if abs(a.centre(last)[0] - b.centre(last)[0]) > ROOM_CM / GRID / 2]
    if pairs:
        a, b = pairs[int(rng.integers(len(pairs)))]
        side = "left" if a.centre(last)[0] < b.centre(last)[0] else "right"
        rows.append({"question_type": "object_rel_direction_easy",  # VSI-Bench's fixed options for this type
                     "question": f"At the end of the video, is the {a.name} to the left or the right of the {b.name}?",
                     "options": ["A. left", "B. right"], "ground_truth": "A" if side == "left" else "B"})
    # up to four objects, named in a random order; one option per named object, led by it (the rest in a random
    # order): the options tell apart which object the video shows first
    named = [objects[i] for i in rng.permutation(len(objects))[:len(LETTERS)]]
    correct = sorted(named, key=lambda o: o.appears_at)
    orders = [correct]
    for leader in correct[1:]:
        rest = [o for o in named if o is not leader]
        orders.append([leader] + [rest[i] for i in rng.permutation(len(rest))])
    options, truth = _shuffled(rng, [", ".join(o.name for o in order) for order in orders])
    rows.append({"question_type": "obj_appearance_order",
                 "question": "What will be the first-time appearance order of the following categories in the "
                             f"video: {', '.join(o.name for o in named)}?",
                 "options": options, "ground_truth": truth})
    return rows


def describe(objects: list[SceneObject]) -> str:
    """A dense description of the scene, for training only (the way captioning stages teach perception before
    questions): each cube as "colour side column" (side in cm, column of cells from 1 = leftmost), in order of
    appearance, e.g. "red 90 2, blue 50 3.". Its side comes right after its colour word, so the model learns to find
    a named cube in the video from the word alone, which every question about a named cube needs (the README gives
    what that does for a tiny language model)."""
    cell_cm, last = ROOM_CM / GRID, NUM_FRAMES - 1
    return ", ".join(f"{o.colour} {o.size_cm} {int(o.centre(last)[0] // cell_cm) + 1}"
                     for o in sorted(objects, key=lambda o: o.appears_at)) + "."


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, ("train", "test").index(split), index])


def generate_split(output_dir: Path, split: str, count: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Write `count` clips of one split; return their VSI-Bench rows and their fine-tuning records."""
    (output_dir / DATASET).mkdir(parents=True, exist_ok=True)
    rows, records = [], []
    for index in range(count):
        rng = scene_rng(seed, split, index)
        objects = make_scene(rng)
        scene = f"{split}_{index:05d}"
        write_clip(objects, output_dir / DATASET / f"{scene}.mp4")
        questions = [{"id": f"{scene}_{number}", "dataset": DATASET, "scene_name": scene, **row}
                     for number, row in enumerate(questions_for(objects, rng))]
        rows += questions
        records += [description_record(scene, describe(objects)), *map(question_record, questions)]
    return rows, records


def question_record(row: dict) -> dict:
    """A VSI-Bench row as a fine-tuning record with the release's inference text (finetune adds the time line)."""
    text = f"{PRE_PROMPT}\n\nQuestion: {row['question']}\n"
    if row["options"]:
        text += "\n".join(row["options"]) + f"\n{CHOICE_POST_PROMPT}\n"
    else:
        text += f"{NUMERIC_POST_PROMPT}\n"
    return {"id": row["id"], "video": f"{row['dataset']}/{row['scene_name']}.mp4",
            "conversations": [{"from": "human", "value": "<image>\n" + text},
                              {"from": "gpt", "value": row["ground_truth"]}]}


def description_record(scene: str, description: str) -> dict:
    """A training scene's description request and its answer, as a fine-tuning record."""
    return {"id": f"{scene}_description", "video": f"{DATASET}/{scene}.mp4",
            "conversations": [{"from": "human", "value": f"<image>\n{PRE_PROMPT}\n\n{DESCRIPTION_PROMPT}\n"},
                              {"from": "gpt", "value": description}]}


def generate(output_dir: Path, train: int, test: int, seed: int = 0) -> dict[str, list[dict]]:
    """Write both splits (clips, `train.json`, `test.json`) and `train_llava.json`; return the rows by split
    ("train", "test") and the fine-tuning records ("records")."""
    output_dir = Path(output_dir)
    (train_rows, records), (test_rows, _) = (generate_split(output_dir, "train", train, seed),
                                              generate_split(output_dir, "test", test, seed))
    splits = {"train": train_rows, "test": test_rows}
    for split, rows in splits.items():
        (output_dir / f"{split}.json").write_text(json.dumps(rows, indent=1))
    (output_dir / "train_llava.json").write_text(json.dumps(records, indent=1))
    return {**splits, "records": records}


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
