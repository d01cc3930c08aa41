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
            assert [(o.name, o.size_cm) for o in train_scene] != [(o.name, o.size_cm) for o in test_scene]


def _mask(frame: np.ndarray, colour: str) -> np.ndarray:
    return np.abs(frame.astype(int) - sb.COLOURS[colour]).sum(-1) < 30


def _pixels_of(frame: np.ndarray, colour: str) -> int:
    return int(_mask(frame, colour).sum())


@pytest.mark.parametrize("index", range(8))
def test_answers_are_true_to_the_rendered_frames(index):
    rng = sb.scene_rng(0, "test", index)
    objects = sb.make_scene(rng)
    rows = {row["question_type"]: row for row in sb.questions_for(objects, rng)}
    frames = [sb.render(objects, f) for f in range(sb.NUM_FRAMES)]
    # appearance: each cube's colour shows first in its own frame, in the answer's order, and in its own frame of a
    # 4-frame sample (the tiny model's budget) too
    first_seen = {o.name: next(f for f, frame in enumerate(frames) if _pixels_of(frame, o.colour)) for o in objects}
    order = rows["obj_appearance_order"]
    options = dict(option.split(". ", 1) for option in order["options"])
    answer = options[order["ground_truth"]].split(", ")
    assert [first_seen[name] for name in answer] == sorted(first_seen[name] for name in answer)
    assert len({option.split(", ")[0] for option in options.values()}) == len(options)  # each led by another cube
    sample = np.linspace(0, sb.NUM_FRAMES - 1, 4).astype(int)
    assert len({int(np.searchsorted(sample, first_seen[o.name])) for o in objects}) == len(objects)
    # cubes never overlap: every cube's full area is visible in the last frame, and it covers its cell's centre
    last = frames[-1]
    for obj in objects:
        side_px = obj.size_cm * sb.FRAME_PX / sb.ROOM_CM
        assert _pixels_of(last, obj.colour) == pytest.approx(side_px**2, rel=0.15)
    assert int(rows["object_counting"]["ground_truth"]) == len(objects) == \
        sum(_pixels_of(last, colour) > 0 for colour in sb.COLOURS)
    size = rows["object_size_estimation"]
    named = next(o for o in objects if f"of the {o.name}," in size["question"])
    side_px = np.sqrt(_pixels_of(last, named.colour))
    nearest = min(sb.SIZES_CM, key=lambda cm: abs(cm * sb.FRAME_PX / sb.ROOM_CM - side_px))
    assert int(size["ground_truth"]) == named.size_cm == nearest
    if "object_rel_direction_easy" in rows:
        row = rows["object_rel_direction_easy"]
        words = row["question"].split("is the ")[1].split(" to the left or the right of the ")
        a, b = (next(o for o in objects if o.name == words[i].rstrip("?")) for i in (0, 1))
        xs = [np.nonzero(_mask(last, o.colour))[1].mean() for o in (a, b)]
        assert row["options"] == ["A. left", "B. right"]
        assert row["ground_truth"] == ("A" if xs[0] < xs[1] else "B")
    # the training description: colour, side and column of every cube, in order of appearance
    entries = [entry.split(" ") for entry in sb.describe(objects).rstrip(".").split(", ")]
    assert [first_seen[f"{colour} {sb.SHAPE}"] for colour, _, _ in entries] == sorted(first_seen.values())
    for colour, size_text, column in entries:
        obj = next(o for o in objects if o.colour == colour)
        assert size_text == str(obj.size_cm)
        x = np.nonzero(_mask(last, obj.colour))[1].mean()
        assert column == str(int(x // (sb.FRAME_PX / sb.GRID)) + 1)


def test_multiple_choice_letters_are_balanced_and_question_types_are_vsibench_ones(tmp_path):
    rows = [row for i in range(60) for row in sb.questions_for(sb.make_scene(sb.scene_rng(1, "train", i)),
                                                                    sb.scene_rng(1, "train", i))]
    types = {row["question_type"] for row in rows}
    assert types == {"object_counting", "object_size_estimation", "object_rel_direction_easy", "obj_appearance_order"}
    letters = [row["ground_truth"] for row in rows if row["question_type"] == "obj_appearance_order"]
    assert set(letters) == set("ABCD")  # the correct option is not always "A"
    assert max(letters.count(letter) for letter in "ABCD") < 0.5 * len(letters)
    sides = [row["ground_truth"] for row in rows if row["question_type"] == "object_rel_direction_easy"]
    assert 0.3 < sides.count("A") / len(sides) < 0.7


def test_files_are_vsibench_rows_and_finetuning_records(tmp_path):
    splits = sb.generate(tmp_path, train=2, test=1, seed=0)
    rows = json.loads((tmp_path / "test.json").read_text())
    assert rows == splits["test"]
    assert all(set(row) == {"id", "dataset", "scene_name", "question_type", "question", "options", "ground_truth"}
               for row in rows)
    assert all((tmp_path / row["dataset"] / f"{row['scene_name']}.mp4").is_file() for row in rows)
    records = json.loads((tmp_path / "train_llava.json").read_text())
    assert records == splits["records"]
    # per training scene: its description, then one record per question (as the benchmark asks it)
    assert [record["id"] for record in records] == [
        name for scene in ("train_00000", "train_00001")
        for name in [f"{scene}_description"] + [row["id"] for row in splits["train"] if row["scene_name"] == scene]]
    by_id = {row["id"]: row for row in splits["train"]}
    for record in records:
        (question, answer) = record["conversations"]
        assert question["value"].startswith("<image>\nThese are frames of a video.\n\n") and "train" in record["video"]
        if record["id"].endswith("_description"):
            assert answer["value"] == sb.describe(sb.make_scene(sb.scene_rng(0, "train", int(record["id"][6:11]))))
        else:
            row = by_id[record["id"]]
            assert answer["value"] == row["ground_truth"] and f"Question: {row['question']}\n" in question["value"]
            assert record["video"] == f"synthetic/{row['scene_name']}.mp4"
