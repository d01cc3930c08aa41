"""VSI-Bench evaluation: the authors' metric, aggregation, prompts, input files, and the CLI end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HOSTILE_DAMAGES, damaged_model_copy
from vica2.tools.evaluate_vsibench import (
    MULTIPLE_CHOICE_TYPES,
    NUMERICAL_TYPES,
    QUESTION_TYPES,
    Question,
    UsageError,
    aggregate,
    build_prompt,
    chance_levels,
    format_table,
    load_questions,
    parse_answer,
    parse_question_types,
    parse_shard,
    read_records,
    score_prediction,
    select_questions,
    shard_questions,
)


REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- metric
@pytest.mark.parametrize(
    "text, answer",
    [
        ("B", "B"),
        ("B. chair", "B"),
        ("1.", "1"),
        ("3 meters", "3"),
        ("(B)", "(B)"),
        ("", ""),
        ("  2.5.  ", "2.5"),  # surrounding whitespace stripped first, then every trailing period
        ("4\nchairs", "4\nchairs"),  # only the space character separates
        ("...", ""),
    ],
)
def test_parse_answer_is_the_first_space_separated_word_without_trailing_periods(text, answer):
    assert parse_answer(text) == answer


@pytest.mark.parametrize(
    "prediction, ground_truth, expected",
    [
        ("B", "B", 1.0),
        ("b", "B", 1.0),  # case is ignored
        ("B.", "B", 1.0),
        ("B. The sofa", "B", 1.0),
        (" B \n", "B", 1.0),
        ("(B)", "B", 0.0),  # no other normalisation: the reference scores this 0
        ("B)", "B", 0.0),
        ("", "A", 0.0),
        ("The answer is B", "B", 0.0),
    ],
)
def test_multiple_choice_is_exact_letter_match(prediction, ground_truth, expected):
    for question_type in MULTIPLE_CHOICE_TYPES:
        assert score_prediction(prediction, ground_truth, question_type) == expected


@pytest.mark.parametrize(
    "prediction, ground_truth, expected",
    [
        ("10", "10", 1.0),
        ("10.5", "10", 1.0),  # relative error 0.05 <= 1 - 0.95 (exact hit of the strictest threshold)
        ("9.5", "10", 1.0),
        ("11", "10", 0.9),  # 0.1: passes t = 0.5 ... 0.9
        ("9", "10", 0.9),
        ("12", "10", 0.6),  # 0.2 hits t = 0.8 on paper, but 1 - 0.8 = 0.19999999999999996: as the reference
        ("13", "10", 0.5),  # 0.3 <= 1 - 0.7 = 0.30000000000000004: t = 0.5 ... 0.7
        ("14", "10", 0.3),
        ("15", "10", 0.1),  # 0.5: only t = 0.5 (exact hit)
        ("5", "10", 0.1),
        ("4", "10", 0.0),
        ("16", "10", 0.0),
        ("1.", "1", 1.0),  # "1." parses after the trailing period goes
        ("3 meters", "3", 1.0),
        ("3", "3.0", 1.0),
        ("1e1", "10", 1.0),  # Python float syntax, as the reference
        ("", "3", 0.0),  # unparsable: the reference's worst case
        ("three", "3", 0.0),
        ("3m", "3", 0.0),
        ("(3)", "3", 0.0),
        ("nan", "3", 0.0),
        ("inf", "3", 0.0),
        ("-3", "3", 0.0),
        ("3", "not a number", 0.0),
    ],
)
def test_numerical_is_mean_relative_accuracy(prediction, ground_truth, expected):
    for question_type in NUMERICAL_TYPES:
        assert score_prediction(prediction, ground_truth, question_type) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("prediction, expected", [("0", 1.0), ("0.0", 1.0), ("0.", 1.0), ("1", 0.0), ("-0.1", 0.0),
                                                  ("", 0.0)])
def test_ground_truth_zero_scores_only_an_exact_zero(prediction, expected):
    assert score_prediction(prediction, "0", "object_counting") == expected


def test_unknown_question_type_is_an_error():
    with pytest.raises(ValueError, match="Unknown VSI-Bench question type"):
        score_prediction("1", "1", "object_colour")


# ---------------------------------------------------------------------------------------------------- aggregate
def _record(question_type, score, error=None):
    return {"question_type": question_type, "score": score, "error": error}


def test_aggregate_averages_tasks_and_relative_direction_levels():
    records = [
        _record("object_counting", 1.0), _record("object_counting", 0.5),  # 75
        _record("object_abs_distance", 0.2),  # 20
        _record("object_size_estimation", 0.0, error="VideoLoadError: broken"),  # 0, an error row
        _record("room_size_estimation", 0.9),  # 90
        _record("object_rel_distance", 1.0), _record("object_rel_distance", 0.0),  # 50
        _record("object_rel_direction_easy", 1.0),  # 100
        _record("object_rel_direction_medium", 0.0), _record("object_rel_direction_medium", 0.0),  # 0
        _record("object_rel_direction_hard", 1.0), _record("object_rel_direction_hard", 0.0),  # 50
        _record("route_planning", 1.0),  # 100
        _record("obj_appearance_order", 0.0),  # 0
    ]
    summary = aggregate(records)
    scores = {task: block["score"] for task, block in summary["tasks"].items()}
    # relative direction: mean of the level means (100 + 0 + 50) / 3, not the pooled 2 / 5 = 40
    expected = {"object_counting": 75.0, "object_abs_distance": 20.0, "object_size_estimation": 0.0,
                "room_size_estimation": 90.0, "object_rel_distance": 50.0, "object_rel_direction": 50.0,
                "route_planning": 100.0, "obj_appearance_order": 0.0}
    assert scores == pytest.approx(expected)
    assert list(scores) == list(expected)  # the paper's column order
    assert summary["overall"] == pytest.approx(sum(expected.values()) / 8)
    assert summary["questions"] == len(records) and summary["errors"] == 1
    assert summary["missing_tasks"] == []
    levels = summary["tasks"]["object_rel_direction"]["levels"]
    assert {name: block["questions"] for name, block in levels.items()} == {
        "object_rel_direction_easy": 1, "object_rel_direction_medium": 2, "object_rel_direction_hard": 2}
    assert summary["tasks"]["object_counting"]["metric"] == "MRA"
    assert summary["tasks"]["route_planning"]["metric"] == "accuracy"


def test_chance_is_a_uniform_guess_among_the_options_or_the_files_answers():
    def question(number, question_type, ground_truth, options=None):
        return Question(number, "arkitscenes", "s", question_type, "q", options, ground_truth)

    questions = [question(1, "object_counting", "2"), question(2, "object_counting", "4"),
                 question(3, "obj_appearance_order", "A", ("A. x", "B. y", "C. z", "D. w")),
                 question(4, "obj_appearance_order", "B", ("A. x", "B. y")),
                 question(5, "object_rel_direction_easy", "A", ("A. left", "B. right")),
                 question(6, "object_rel_direction_hard", "C", ("A. a", "B. b", "C. c", "D. d"))]
    chance = chance_levels(questions)
    # a blind guess of 2 or 4 (the file's counts): right half the time; 4 for 2 scores 0 MRA, 2 for 4 scores 0.1
    # (a relative error of 0.5 passes the lowest threshold only)
    assert chance["object_counting"] == pytest.approx(100 * (1 + 0 + 0.1 + 1) / 4)
    assert chance["obj_appearance_order"] == pytest.approx(100 * (1 / 4 + 1 / 2) / 2)
    assert chance["object_rel_direction"] == pytest.approx(100 * (1 / 2 + 1 / 4) / 2)  # a mean of level means
    assert set(chance) == {"object_counting", "obj_appearance_order", "object_rel_direction"}


def test_aggregate_of_a_partial_run_averages_what_is_there():
    summary = aggregate([_record("object_counting", 0.4), _record("object_rel_direction_hard", 1.0)])
    assert summary["tasks"]["object_rel_direction"]["score"] == pytest.approx(100.0)
    assert summary["overall"] == pytest.approx(70.0)
    assert "route_planning" in summary["missing_tasks"] and "object_counting" not in summary["missing_tasks"]
    assert aggregate([])["overall"] is None


def test_aggregate_rejects_unknown_types():
    with pytest.raises(ValueError):
        aggregate([_record("object_colour", 1.0)])


def test_table_has_the_papers_columns_in_order():
    table = format_table(aggregate([_record("object_counting", 0.5)]))
    header = table.splitlines()[0].split()
    assert " ".join(header) == (
        "Avg Obj. Count Abs. Dist. Obj. Size Room Size Rel. Dist. Rel. Dir. Route Plan Appr. Order"
    )
    this_run, published = table.splitlines()[1:3]
    assert this_run.split()[2:4] == ["50.0", "50.0"] and this_run.split()[-1] == "-"
    assert published.split()[-9:] == ["56.8", "65.7", "51.0", "75.5", "71.4", "51.6", "34.6", "38.1", "66.5"]


# ---------------------------------------------------------------------------------------------------- prompts
CHOICE = Question(7, "scannet", "scene0", "object_rel_distance", "Which is closest to the bed?",
                  ("A. sofa", "B. lamp", "C. desk"), "B")
NUMBER = Question(8, "scannet", "scene0", "object_counting", "How many chair(s) are in this room?", None, "4")
TIMING = "The video lasts for 9.00 seconds, and 4 frames are uniformly sampled from it. These frames are located at " \
         "0.00s,3.00s,6.00s,9.00s.Please answer the following questions related to this video."


def test_vica2_prompt_is_the_release_inference_prompt():
    assert build_prompt(CHOICE, "vica2") == (
        "<video>\n\n\nThese are frames of a video.\n\nQuestion: Which is closest to the bed?\n"
        "A. sofa\nB. lamp\nC. desk\nAnswer with the option\u2019s letter from the given choices directly.\n"
    )
    assert build_prompt(NUMBER, "vica2") == (
        "<video>\n\n\nThese are frames of a video.\n\nQuestion: How many chair(s) are in this room?\n"
        "Please answer the question using a single word or phrase.\n"
    )
    assert build_prompt(NUMBER, "vica2", TIMING) == (
        f"<video>\n{TIMING}\n\nThese are frames of a video.\n\nQuestion: How many chair(s) are in this room?\n"
        "Please answer the question using a single word or phrase.\n"
    )


def test_vsibench_prompt_is_the_benchmark_authors_prompt():
    assert build_prompt(CHOICE, "vsibench") == (
        "<video>\nThese are frames of a video.\nWhich is closest to the bed?\nOptions:\nA. sofa\nB. lamp\nC. desk\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert build_prompt(NUMBER, "vsibench") == (
        "<video>\nThese are frames of a video.\nHow many chair(s) are in this room?\n"
        "Please answer the question using a single word or phrase."
    )
    assert build_prompt(NUMBER, "vsibench", TIMING).startswith(f"<video>\n{TIMING}\n\nThese are frames of a video.\n")


def test_unknown_prompt_style_is_an_error():
    with pytest.raises(ValueError, match="prompt style"):
        build_prompt(NUMBER, "gpt4v")


# ---------------------------------------------------------------------------------------------------- inputs
def _rows(count=3):
    return [{"id": i, "dataset": "scannet", "scene_name": f"scene{i % 2}", "question_type": "object_counting",
             "question": f"How many? {i}", "options": None, "ground_truth": str(i + 1)} for i in range(count)]


def test_questions_load_from_json_list_jsonl_and_json_lines(tmp_path):
    rows = _rows()
    rows[0]["options"] = []  # an empty list is "no options" too
    (tmp_path / "list.json").write_text(json.dumps(rows))
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    (tmp_path / "lines.jsonl").write_text(lines)
    (tmp_path / "lines.json").write_text(lines)  # what `datasets`' to_json writes
    loaded = [load_questions(tmp_path / name) for name in ("list.json", "lines.jsonl", "lines.json")]
    assert loaded[0] == loaded[1] == loaded[2]
    assert loaded[0][2] == Question(2, "scannet", "scene0", "object_counting", "How many? 2", None, "3")
    assert loaded[0][0].video == "scannet/scene0.mp4"


def test_bad_question_files_are_explained(tmp_path):
    rows = _rows()
    rows[1]["question_type"] = "object_colour"
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(UsageError, match="unknown question_type"):
        load_questions(tmp_path / "a.jsonl")
    rows = _rows()
    rows[2]["id"] = 0
    (tmp_path / "b.json").write_text(json.dumps(rows))
    with pytest.raises(UsageError, match="duplicate question ids"):
        load_questions(tmp_path / "b.json")
    rows = _rows()
    rows[0].update(question_type="route_planning", options=None)
    (tmp_path / "c.json").write_text(json.dumps(rows))
    with pytest.raises(UsageError, match="no options"):
        load_questions(tmp_path / "c.json")
    with pytest.raises(UsageError, match="no such file"):
        load_questions(tmp_path / "missing.parquet")


def _write_rows(path, rows, lines=True):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) if lines else json.dumps(rows, indent=1))
    return path


def test_broken_json_names_the_file_and_line(tmp_path):
    text = "".join(json.dumps(row) + "\n" for row in _rows())
    broken = text.splitlines()
    broken[1] = broken[1][:-3]  # a truncated object on line 2
    (tmp_path / "a.jsonl").write_text("\n".join(broken) + "\n")
    with pytest.raises(UsageError, match=r"a\.jsonl, line 2: not a JSON object"):
        load_questions(tmp_path / "a.jsonl")
    (tmp_path / "b.json").write_text('[\n {"id": 1},\n {"id": 2,,}\n]')  # one JSON list, broken on line 3
    with pytest.raises(UsageError, match=r"b\.json, line 3: not valid JSON"):
        load_questions(tmp_path / "b.json")
    (tmp_path / "c.jsonl").write_bytes(b"\xff\xfe{}")
    with pytest.raises(UsageError, match="not UTF-8"):
        load_questions(tmp_path / "c.jsonl")


@pytest.mark.parametrize("options", ["A. sofa B. lamp", {"A": "sofa"}, 3])
def test_options_that_are_not_a_list_are_refused(tmp_path, options):
    rows = _rows()
    rows[1].update(question_type="route_planning", options=options, ground_truth="A")
    with pytest.raises(UsageError, match="options must be a list"):
        load_questions(_write_rows(tmp_path / "q.jsonl", rows))


@pytest.mark.parametrize("content", ["", "\n\n", "[]"])
def test_an_empty_data_file_is_refused(tmp_path, content):
    (tmp_path / "q.json").write_text(content)
    with pytest.raises(UsageError, match="no questions"):
        load_questions(tmp_path / "q.json")


@pytest.mark.parametrize("field, value", [("dataset", ".."), ("dataset", "../outside"), ("scene_name", "../../etc"),
                                          ("scene_name", "/etc/passwd"), ("dataset", "a\\b"), ("scene_name", "")])
def test_videos_outside_the_video_root_are_refused(tmp_path, field, value):
    rows = _rows()
    rows[2][field] = value
    with pytest.raises(UsageError, match="not a plain name"):
        load_questions(_write_rows(tmp_path / "q.jsonl", rows))


def test_parquet_needs_pyarrow_or_reads_like_json(tmp_path):
    rows = _rows()
    rows[1].update(question_type="route_planning", options=["A. left", "B. right"], ground_truth="A")
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        (tmp_path / "test.parquet").write_bytes(b"PAR1")
        with pytest.raises(UsageError, match="pip install pyarrow"):
            load_questions(tmp_path / "test.parquet")
        return
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "test.parquet")
    (tmp_path / "test.json").write_text(json.dumps(rows))
    assert load_questions(tmp_path / "test.parquet") == load_questions(tmp_path / "test.json")


def test_selection_filters_limits_then_shards():
    questions = [Question(i, "d", f"s{i % 4}", QUESTION_TYPES[i % len(QUESTION_TYPES)], "q",
                          ("A. a",) if QUESTION_TYPES[i % len(QUESTION_TYPES)] in MULTIPLE_CHOICE_TYPES else None, "1")
                 for i in range(40)]
    directions = parse_question_types("object_rel_direction,route_planning")
    assert directions == {"object_rel_direction_easy", "object_rel_direction_medium", "object_rel_direction_hard",
                          "route_planning"}
    chosen = select_questions(questions, directions, limit=5)
    assert [q.id for q in chosen] == [5, 6, 7, 8, 15]
    shards = [shard_questions(questions, index, 3) for index in range(3)]
    assert sorted(q.id for shard in shards for q in shard) == list(range(40))  # a partition
    videos = [{q.video for q in shard} for shard in shards]
    assert not (videos[0] & videos[1] or videos[0] & videos[2] or videos[1] & videos[2])  # a video in one shard
    assert max(map(len, shards)) - min(map(len, shards)) <= 10  # balanced by questions (10 per video here)
    with pytest.raises(UsageError):
        parse_question_types("object_colour")


@pytest.mark.parametrize("text, expected", [("0/4", (0, 4)), ("3/4", (3, 4)), (" 1 / 2 ", (1, 2))])
def test_shard_syntax(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["4/4", "1", "-1/2", "a/b", "1/0", "0/99999999999999999999", "0/4097"])
def test_bad_shards_are_refused(text):
    with pytest.raises(UsageError):
        parse_shard(text)


@pytest.mark.parametrize("flag", ["--videos-in-flight", "--tensor-parallel-size", "--data-parallel-size",
                                  "--batch-size", "--frames"])
def test_counts_below_one_are_refused_before_anything_runs(flag, capsys):
    from vica2.tools.evaluate_vsibench import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "m", "--data", "d.jsonl", "--video-root", "v", flag, "0"])
    assert exit_info.value.code == 2 and f"{flag} must be at least 1" in capsys.readouterr().err


def _prediction(id_, **changes):
    return json.dumps({"id": id_, "question_type": "object_counting", "ground_truth": "2", "output": "2",
                       "score": 1.0, **changes})


def test_torn_last_line_is_cut_off_and_other_bad_lines_are_errors(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text(f'{_prediction(1)}\n{_prediction(2)}\n{{"id": 3, "ques')
    assert [r["id"] for r in read_records(path)] == [1, 2]
    assert path.read_text().endswith('"ques')  # reading alone does not modify
    assert [r["id"] for r in read_records(path, repair=True)] == [1, 2]
    assert path.read_text() == f'{_prediction(1)}\n{_prediction(2)}\n'
    path.write_text(f'{_prediction(1)}\nnot json\n{_prediction(2)}\n')
    with pytest.raises(UsageError, match="line 2"):
        read_records(path)


# ---------------------------------------------------------------------------------------------------- end to end
def _question_rows():
    """Every question type; three videos, the last one unreadable."""
    videos = [("arkitscenes", "scene_a"), ("scannet", "scene_b")]
    rows = []
    for index, question_type in enumerate(QUESTION_TYPES):
        dataset, scene = videos[index % 2]
        choice = question_type in MULTIPLE_CHOICE_TYPES
        rows.append({
            "id": 100 + index, "dataset": dataset, "scene_name": scene, "question_type": question_type,
            "question": f"Question {index} about the room?",
            "options": ["A. sofa", "B. lamp", "C. desk", "D. bed"] if choice else None,
            "ground_truth": "C" if choice else "2.5",
        })
    for index, question_type in enumerate(("object_counting", "route_planning")):
        rows.append({"id": 200 + index, "dataset": "scannetpp", "scene_name": "broken", "question_type": question_type,
                     "question": "Anything?", "options": ["A. left", "B. right"] if index else None,
                     "ground_truth": "A" if index else "3"})
    return rows


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A tiny converted ViCA2, a mini benchmark (JSONL) and its videos."""
    from vica2.convert_checkpoint import convert_checkpoint
    from vica2.tools.demo import build_demo_release, write_demo_video

    root = tmp_path_factory.mktemp("vsibench")
    convert_checkpoint(build_demo_release(root / "release"), root / "model", overwrite=True, progress=False)
    videos = root / "videos"
    for dataset, scene in (("arkitscenes", "scene_a"), ("scannet", "scene_b")):
        write_demo_video(videos / dataset / f"{scene}.mp4", num_frames=8, size=(48, 64))
    (videos / "scannetpp").mkdir()
    (videos / "scannetpp" / "broken.mp4").write_bytes(b"this is not a video")
    rows = _question_rows()
    data = root / "test.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"root": root, "model": root / "model", "videos": videos, "data": data, "rows": rows}


def _cli(bench, output_dir, *extra, check=True):
    command = [sys.executable, "-m", "vica2.tools.cli", "eval-vsibench", "--model", str(bench["model"]), "--data",
               str(bench["data"]), "--video-root", str(bench["videos"]), "--output-dir", str(output_dir),
               "--frames", "4", "--dtype", "float32", "--device", "cpu", *extra]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _check_records(records, rows, prompt_style="vica2", time_instruction=False):
    by_id = {row["id"]: row for row in rows}
    assert sorted(r["id"] for r in records) == sorted(by_id)
    for record in records:
        row = by_id[record["id"]]
        assert record["question_type"] == row["question_type"] and record["ground_truth"] == row["ground_truth"]
        assert record["settings"] == {"prompt_style": prompt_style, "time_instruction": time_instruction,
                                      "frames": 4, "max_new_tokens": 16}
        assert record["prompt"].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
        assert record["prompt"].endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert record["prompt"].count("<video>") == 1 and row["question"] in record["prompt"]
        if row["dataset"] == "scannetpp":  # the unreadable video
            assert record["error"].startswith("VideoLoadError") and "broken.mp4" in record["error"]
            assert record["output"] is None and record["answer"] is None and record["score"] == 0.0
        else:
            assert record["error"] is None and isinstance(record["output"], str)
            assert record["answer"] == parse_answer(record["output"])
            assert record["score"] == score_prediction(record["output"], row["ground_truth"], row["question_type"])


def _check_summary(summary_path, records):
    summary = json.loads(Path(summary_path).read_text())
    expected = aggregate(records)
    for key in ("overall", "tasks", "questions", "errors", "missing_tasks"):
        assert summary[key] == expected[key], key
    assert summary["errors"] == 2 and summary["questions"] == len(records) and summary["missing_tasks"] == []
    return summary


@pytest.fixture(scope="module")
def finished_run(bench):
    """A run interrupted after --limit 5, with a torn line as a killed writer leaves, then resumed to the end."""
    out = bench["root"] / "run"
    first = _cli(bench, out, "--limit", "5", "--batch-size", "2")
    predictions = out / "predictions.jsonl"
    early = predictions.read_text(encoding="utf-8")
    with open(predictions, "a", encoding="utf-8") as handle:
        handle.write('{"id": 105, "question_type": "object_rel_di')
    resumed = _cli(bench, out, "--batch-size", "3")
    return {"out": out, "first": first, "early": early, "resumed": resumed}


def test_cli_runs_resumes_and_summarises(bench, finished_run):
    out = finished_run["out"]
    early = [json.loads(line) for line in finished_run["early"].splitlines()]
    assert sorted(r["id"] for r in early) == [row["id"] for row in bench["rows"][:5]]
    text = (out / "predictions.jsonl").read_text(encoding="utf-8")
    assert text.startswith(finished_run["early"])  # resuming kept the first lines as they were, cut the torn one
    records = _lines(out / "predictions.jsonl")
    _check_records(records, bench["rows"])  # every question exactly once
    summary = _check_summary(out / "summary.json", records)
    assert summary["remaining"] == 0 and summary["selected"] == len(bench["rows"])
    assert summary["chance"] == chance_levels(load_questions(bench["data"]))
    assert "Obj. Count  Abs. Dist.  Obj. Size  Room Size  Rel. Dist.  Rel. Dir.  Route Plan  Appr. Order" in \
        finished_run["resumed"].stdout
    assert "12 questions, 2 error rows" in finished_run["resumed"].stdout
    assert "incomplete last line" in finished_run["resumed"].stderr
    # Resumed mid-video: ids 105..109 were pending, 2 of scene_a and 3 of scene_b: one prefix per video, the other
    # questions of each video saved their prefill; the unreadable video's two questions never reach the engine.
    assert summary["engine"] == {"name": "transformers", "prefix_reuse": True, "prompts": 5, "prefixes_encoded": 2,
                                 "tower_runs": 2, "prefills_saved": 3, "prefill_tokens": summary["engine"][
                                     "prefill_tokens"], "cached_tokens": summary["engine"]["cached_tokens"]}
    assert "towers ran 2 times, 3 prefills saved" in finished_run["resumed"].stdout


def test_records_are_the_same_without_prefix_reuse(bench, finished_run):
    out = bench["root"] / "plain"
    result = _cli(bench, out, "--no-prefix-reuse", "--batch-size", "2")
    plain = {r["id"]: r for r in _lines(out / "predictions.jsonl")}
    reused = {r["id"]: r for r in _lines(finished_run["out"] / "predictions.jsonl")}
    assert plain == reused
    engine = json.loads((out / "summary.json").read_text())["engine"]
    assert (engine["prefix_reuse"], engine["prefills_saved"], engine["tower_runs"]) == (False, 0, 10)
    assert "prefix reuse off" in result.stdout


def test_finished_run_is_not_rerun_and_other_settings_are_refused(bench, finished_run):
    out = finished_run["out"]
    before = (out / "predictions.jsonl").read_bytes()
    again = _cli(bench, out)
    assert (out / "predictions.jsonl").read_bytes() == before
    assert "VSI-Bench" not in again.stderr  # no progress bar: nothing to do
    other = _cli(bench, out, "--prompt-style", "vsibench", check=False)
    assert other.returncode == 2 and "holds predictions made with" in other.stderr
    assert (out / "predictions.jsonl").read_bytes() == before


def test_retry_errors_reruns_only_the_error_rows(bench, finished_run, tmp_path):
    from vica2.tools.demo import write_demo_video

    out, videos = tmp_path / "run", tmp_path / "videos"
    shutil.copytree(finished_run["out"], out)
    shutil.copytree(bench["videos"], videos)
    write_demo_video(videos / "scannetpp" / "broken.mp4", num_frames=8, size=(48, 64))  # the video is fixed
    _cli({**bench, "videos": videos}, out, "--retry-errors")
    records = _lines(out / "predictions.jsonl")
    assert sorted(r["id"] for r in records) == sorted(row["id"] for row in bench["rows"])
    assert not any(r["error"] for r in records)
    kept = {r["id"]: r for r in _lines(finished_run["out"] / "predictions.jsonl") if not r["error"]}
    assert all(r == kept[r["id"]] for r in records if r["id"] in kept)


def test_shards_merge_into_the_whole_benchmark(bench):
    out = bench["root"] / "sharded"
    style = ("--prompt-style", "vsibench", "--time-instruction")
    for shard in ("0/2", "1/2"):
        _cli(bench, out, "--shard", shard, *style)
    parts = [_lines(out / f"predictions.shard{i}of2.jsonl") for i in range(2)]
    assert parts[0] and parts[1] and not {r["id"] for r in parts[0]} & {r["id"] for r in parts[1]}
    assert not {r["scene_name"] for r in parts[0]} & {r["scene_name"] for r in parts[1]}  # videos are not split
    for record in parts[0] + parts[1]:
        if not record["error"]:
            assert "Options:" in record["prompt"] or record["question_type"] in NUMERICAL_TYPES
            assert "\nThe video lasts for " in record["prompt"] and "frames are uniformly sampled" in record["prompt"]

    # the merge re-scores from the raw outputs: make one stored ground truth match its output to see it
    shard_file = out / "predictions.shard0of2.jsonl"
    edited = _lines(shard_file)
    target = next(r for r in edited if not r["error"] and r["question_type"] in MULTIPLE_CHOICE_TYPES)
    target["ground_truth"] = parse_answer(target["output"])
    shard_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in edited), encoding="utf-8")

    merge = subprocess.run([sys.executable, "-m", "vica2.tools.cli", "eval-vsibench", "--merge", "--output-dir", str(out)],
                           capture_output=True, text=True, cwd=REPO_ROOT)
    assert merge.returncode == 0, merge.stderr
    merged = _lines(out / "predictions.jsonl")
    rows = [dict(row, ground_truth=target["ground_truth"]) if row["id"] == target["id"] else row
            for row in bench["rows"]]
    _check_records(merged, rows, prompt_style="vsibench", time_instruction=True)
    assert next(r for r in merged if r["id"] == target["id"])["score"] == 1.0
    summary = _check_summary(out / "summary.json", merged)
    assert summary["merged_from"] == ["predictions.shard0of2.jsonl", "predictions.shard1of2.jsonl"]
    assert summary["overall"] > 0
    assert "Rel. Dir." in merge.stdout


def test_merge_refuses_missing_shards(tmp_path):
    (tmp_path / "predictions.shard1of3.jsonl").write_text("")
    result = subprocess.run([sys.executable, "-m", "vica2.tools.cli", "eval-vsibench", "--merge", "--output-dir",
                             str(tmp_path)], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 2 and "Shards [0, 2] of 3" in result.stderr


def test_wrong_video_root_stops_before_loading_the_model(bench, tmp_path):
    result = _cli({**bench, "videos": tmp_path / "empty"}, tmp_path / "out", check=False)
    assert result.returncode == 2 and "None of the 3 videos" in result.stderr
    assert not (tmp_path / "out" / "predictions.jsonl").exists()


def test_vllm_engine_without_vllm_is_a_one_line_install_hint(bench, tmp_path, monkeypatch, capsys):
    """--engine vllm imports vLLM only then; where it is missing (hidden here) the run stops before writing."""
    from vica2.tools.evaluate_vsibench import main

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    monkeypatch.delitem(sys.modules, "vica2.tools.vllm_engine", raising=False)
    out = tmp_path / "out"
    code = main(["--model", str(bench["model"]), "--data", str(bench["data"]), "--video-root", str(bench["videos"]),
                 "--output-dir", str(out), "--engine", "vllm", "--frames", "4", "--trust-remote-code"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error
    assert error.startswith("vica2 eval-vsibench: error: The vLLM engine needs vLLM: `pip install vllm`")
    assert not out.exists()


def test_vllm_engine_runs_folder_code_only_when_asked(bench, tmp_path, capsys):
    """vLLM's Transformers backend executes the model folder's code: --engine vllm needs --trust-remote-code."""
    from vica2.tools.evaluate_vsibench import main

    out = tmp_path / "out"
    code = main(["--model", str(bench["model"]), "--data", str(bench["data"]), "--video-root", str(bench["videos"]),
                 "--output-dir", str(out), "--engine", "vllm", "--frames", "4"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error
    assert "--engine vllm runs the model folder's own Python code" in error and "--trust-remote-code" in error
    assert not out.exists()


def test_the_transformers_engine_does_not_import_vllm(bench, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from vica2.tools.evaluate_vsibench import main; "
         f"main(['--model', {str(bench['model'])!r}, '--data', {str(bench['data'])!r}, '--video-root', "
         f"{str(bench['videos'])!r}, '--output-dir', {str(tmp_path / 'out')!r}, '--frames', '4', '--limit', "
         "'2', '--dtype', 'float32', '--device', 'cpu']); assert 'vllm' not in sys.modules and "
         "'vica2.tools.vllm_engine' not in sys.modules"],
        capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(_lines(tmp_path / "out" / "predictions.jsonl")) == 2  # the engine really ran


class _OutOfOrderEngine:
    """An engine that, like vLLM's stream, takes several videos' jobs before answering and answers their questions
    one at a time in another order (last job first, last question first); its answer names the prompt it got."""

    def __init__(self, processor, jobs_held: int):
        self.processor, self.jobs_held, self.taken = processor, jobs_held, []

    def answer_all(self, jobs):
        jobs = iter(jobs)
        while held := [job for _, job in zip(range(self.jobs_held), jobs)]:
            self.taken.append(len(held))
            for job in reversed(held):
                for index in reversed(range(len(job.prompts))):
                    yield job, index, [f"{len(job.prompts[index])} B"]


def test_evaluate_saves_answers_given_in_any_order_across_videos(bench, tmp_path):
    """The evaluator's engine contract: answers may come question by question, across the videos an engine holds,
    in any order; each is saved to its own question, and an unreadable video's rows never reach the engine."""
    from transformers import AutoProcessor

    from vica2.tools.evaluate_vsibench import PredictionWriter, RunSettings, evaluate, load_questions, read_records
    from vica2.tools.inference import register_installed_classes

    register_installed_classes()  # the folder's processor, no code from the folder
    processor = AutoProcessor.from_pretrained(bench["model"])
    questions = load_questions(bench["data"])
    settings = RunSettings(frames=4)
    engine = _OutOfOrderEngine(processor, jobs_held=2)
    writer = PredictionWriter(tmp_path / "predictions.jsonl")
    evaluate(engine, processor, questions, bench["videos"], settings, writer)
    writer.close()
    records = {str(record["id"]): record for record in read_records(tmp_path / "predictions.jsonl")}
    assert engine.taken == [2]  # both readable videos were held at once; the broken one never came
    assert sorted(records) == sorted(question.key for question in questions)
    for question in questions:
        record = records[question.key]
        if record["error"] is None:
            assert record["output"] == f"{len(record['prompt'])} B"  # the answer to this very prompt
        else:
            assert question.scene_name == "broken" and record["output"] is None


# ---------------------------------------------------------------------------------------------------- hardening
@pytest.mark.parametrize("question_type, ground_truth, problem", [
    ("object_counting", "-3", "not a number >= 0"), ("object_abs_distance", "three", "not a number >= 0"),
    ("room_size_estimation", "nan", "not a number >= 0"), ("route_planning", "  ", "is empty"),
])
def test_ground_truths_that_cannot_be_scored_are_refused(tmp_path, question_type, ground_truth, problem):
    rows = _rows()
    rows[1].update(question_type=question_type, ground_truth=ground_truth, options=["A. x", "B. y"])
    with pytest.raises(UsageError, match=f"Question 1: .*{problem}"):
        load_questions(_write_rows(tmp_path / "q.jsonl", rows))


@pytest.mark.parametrize("line, problem", [
    (_prediction(2, score=1.5), r"score 1\.5 is not a number in \[0, 1\]"),
    (_prediction(2, score=-0.1), "not a number in"), (_prediction(2, score="1"), "not a number in"),
    ("5", "expected a prediction object, got int"), ('{"id": 2}', "lacks question_type, ground_truth, score"),
    (_prediction(2, ground_truth="-4"), "not a number >= 0"), ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_corrupted_prediction_lines_are_one_line_errors_on_resume_and_merge(tmp_path, capsys, line, problem):
    from vica2.tools.evaluate_vsibench import main

    path = tmp_path / "predictions.shard0of1.jsonl"
    path.write_text(f"{_prediction(1)}\n{line}\n")
    with pytest.raises(UsageError, match=f"line 2: .*{problem}"):
        read_records(path)
    assert main(["--merge", "--output-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "line 2" in error and not (tmp_path / "summary.json").exists()


def test_deeply_nested_data_files_are_one_line_errors(tmp_path):
    for name, text in (("a.json", "[" * 100_000 + "]" * 100_000), ("b.jsonl", json.dumps(_rows()[0]) + "\n"
                                                                    + "{\"a\": " * 100_000 + "1" + "}" * 100_000)):
        (tmp_path / name).write_text(text)
        with pytest.raises(UsageError, match="nested too deeply"):
            load_questions(tmp_path / name)


def _runnable(tmp_path):
    """A data file, a video root holding its videos (never read here) and a model folder that passes the checks."""
    data = _write_rows(tmp_path / "q.jsonl", _rows())
    for scene in ("scene0", "scene1"):
        (tmp_path / "videos" / "scannet").mkdir(parents=True, exist_ok=True)
        (tmp_path / "videos" / "scannet" / f"{scene}.mp4").write_bytes(b"")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "vica2"}')
    return ["--model", str(tmp_path / "model"), "--data", str(data), "--video-root", str(tmp_path / "videos"),
            "--device", "cpu"]


def test_two_runs_into_one_output_dir_are_refused_and_the_lock_goes_with_the_run(tmp_path, capsys, monkeypatch):
    from vica2.tools import evaluate_vsibench
    from vica2.tools.evaluate_vsibench import locked_outputs, main

    out = tmp_path / "out"
    args = [*_runnable(tmp_path), "--output-dir", str(out)]
    monkeypatch.setattr(evaluate_vsibench, "build_engine", lambda args: (_ for _ in ()).throw(ValueError("no model")))
    with locked_outputs([out / "predictions.jsonl"]):  # another run holds the folder
        assert main(args) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and f"--output-dir {str(out)!r} is in use by another run" in error
    assert main(args) == 2 and "no model" in capsys.readouterr().err  # released: this run got in (and failed)
    with locked_outputs([out / "predictions.jsonl"]):  # and released again on its way out
        pass


def test_a_run_failing_before_its_folder_existed_shows_the_real_error(tmp_path, capsys, monkeypatch):
    from vica2.tools import evaluate_vsibench
    from vica2.tools.evaluate_vsibench import main

    def broken_engine(args):
        raise OSError("the model's weights are truncated")

    monkeypatch.setattr(evaluate_vsibench, "build_engine", broken_engine)
    out = tmp_path / "new" / "out"
    assert main([*_runnable(tmp_path), "--output-dir", str(out)]) == 2
    error = capsys.readouterr().err
    assert "the model's weights are truncated" in error and ".tmp" not in error
    assert json.loads((out / "summary.json").read_text())["remaining"] == 3


@pytest.mark.parametrize("damage", HOSTILE_DAMAGES)
def test_a_hostile_model_folder_is_one_line(bench, tmp_path, capsys, damage):
    """The loading library turns a folder that does not load into one UsageError naming the folder; the evaluator
    shows it as one line, exit code 2."""
    from vica2.tools.evaluate_vsibench import main

    folder = damaged_model_copy(bench["model"], tmp_path / "model", damage)
    code = main(["--model", str(folder), "--data", str(bench["data"]), "--video-root", str(bench["videos"]),
                 "--output-dir", str(tmp_path / "out"), "--frames", "4", "--device", "cpu"])
    stderr = capsys.readouterr().err
    error = stderr.strip().splitlines()[-1]  # after transformers' loading progress bar, if any
    expected = {"truncated weights": "SafetensorError", "mismatched sizes": "a tensor's shape does not fit config.json",
                "deep config": "config.json is nested too deeply"}[damage]
    assert code == 2 and "Traceback" not in stderr and "vica2 eval-vsibench" not in stderr.replace(error, "")
    assert error.startswith(f"vica2 eval-vsibench: error: --model '{folder}'") and expected in error
