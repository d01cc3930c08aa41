"""The synthetic spatial benchmark: deterministic, split by seed, answers true to the drawn scene."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vica2.tools import synthetic_bench as sb


pytest.importorskip("av")


def test_same_seed_gives_the_same_benchmark_and_splits_never_share_a_scene(tmp_path):
    first = sb.generate(tmp_path / "a", train=3, test=2, seed=7)
    again = sb.generate(tmp_path / "b", train=3, test=2, seed=7)
    assert first == again
    for name in ("train_00000.mp4", "test_00001.mp4"):
        assert (tmp_path / "a/synthetic" / name).read_bytes() == (tmp_path / "b/synthetic" / name).read_bytes()
    other = sb.generate(tmp_path / "c", train=3, test=2, seed=8)
    assert other["test"] != first["test"]
    scenes = {split: [sb.make_scene(sb.scene_rng(7, split, i)) for i in range(3)] for split in ("train", "test")}
    for train_scene in scenes["train"]:
        for test_scene in scenes["test"]:
            assert [o.name for o in train_scene] != [o.name for o in test_scene] or \
                   [o.size_cm for o in train_scene] != [o.size_cm for o in test_scene]


def _mask(frame: np.ndarray, colour: str) -> np.ndarray:
    return np.abs(frame.astype(int) - sb.COLOURS[colour]).sum(-1) < 30


def _pixels_of(frame: np.ndarray, colour: str) -> int:
    return int(_mask(frame, colour).sum())


@pytest.mark.parametrize("index", range(6))
def test_answers_are_true_to_the_rendered_frames(index):
    rng = sb.scene_rng(0, "test", index)
    objects = sb.make_scene(rng)
    rows = {row["question_type"]: row for row in sb.questions_for(objects, rng)}
    frames = [sb.render(objects, f) for f in range(sb.NUM_FRAMES)]
    # appearance: each object's colour shows first in the frame it appears in, in the answer's order
    first_seen = {o.name: next(f for f, frame in enumerate(frames) if _pixels_of(frame, o.colour)) for o in objects}
    order = rows["obj_appearance_order"]
    answer = dict(option.split(". ", 1) for option in order["options"])[order["ground_truth"]].split(", ")
    assert [first_seen[name] for name in answer] == sorted(first_seen[name] for name in answer)
    # objects never overlap, so every object's full area is visible in the last frame
    last = frames[-1]
    for obj in objects:
        side_px = obj.size_cm * sb.FRAME_PX / sb.ROOM_CM
        area = side_px**2 if obj.shape == "square" else np.pi * side_px**2 / 4
        assert _pixels_of(last, obj.colour) == pytest.approx(area, rel=0.25)
    counting = rows["object_counting"]
    shape = counting["question"].split()[2][:-1]
    assert int(counting["ground_truth"]) == sum(o.shape == shape for o in objects)
    if "object_rel_direction_easy" in rows:
        row = rows["object_rel_direction_easy"]
        words = row["question"].split("is the ")[1].split(" to the left or the right of the ")
        a, b = (next(o for o in objects if o.name == words[i].rstrip("?")) for i in (0, 1))
        xs = [np.nonzero(_mask(last, o.colour))[1].mean() for o in (a, b)]
        side = dict(option.split(". ", 1) for option in row["options"])[row["ground_truth"]]
        assert side == ("left" if xs[0] < xs[1] else "right")


def test_multiple_choice_letters_are_balanced_and_question_types_are_vsibench_ones(tmp_path):
    rows = [row for i in range(60) for row in sb.questions_for(sb.make_scene(sb.scene_rng(1, "train", i)),
                                                                    sb.scene_rng(1, "train", i))]
    types = {row["question_type"] for row in rows}
    assert types == {"object_counting", "object_size_estimation", "object_rel_direction_easy", "obj_appearance_order"}
    letters = [row["ground_truth"] for row in rows if row["options"]]
    assert set(letters) == set("ABCD")  # the correct option is not always "A"
    assert max(letters.count(letter) for letter in "AB") < 0.75 * len(letters)


def test_files_are_vsibench_rows_and_finetuning_records(tmp_path):
    splits = sb.generate(tmp_path, train=2, test=1, seed=0)
    rows = json.loads((tmp_path / "test.json").read_text())
    assert rows == splits["test"]
    assert all(set(row) == {"id", "dataset", "scene_name", "question_type", "question", "options", "ground_truth"}
               for row in rows)
    assert all((tmp_path / row["dataset"] / f"{row['scene_name']}.mp4").is_file() for row in rows)
    records = json.loads((tmp_path / "train_llava.json").read_text())
    assert len(records) == len(splits["train"])
    human, answer = records[0]["conversations"]
    assert human["value"].startswith("<image>\nThese are frames of a video.\n\nQuestion: ")
    assert answer["value"] == splits["train"][0]["ground_truth"]
