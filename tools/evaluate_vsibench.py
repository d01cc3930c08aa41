# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""Evaluate a converted ViCA2 on VSI-Bench, scored exactly as the benchmark's authors score it.

    vica2 eval-vsibench --model DIR_OR_REPO --data VSI-Bench/test-00000-of-00001.parquet --video-root VSI-Bench \\
        --output-dir results/vica2-7b
    vica2 eval-vsibench ... --shard 0/4          # one of four parallel runs (e.g. one per GPU); then:
    vica2 eval-vsibench --merge --output-dir results/vica2-7b
    vica2 eval-vsibench ... --engine vllm --tensor-parallel-size 2   # answered by vLLM (in its own environment)

Writes `predictions.jsonl` (one line per question: id, type, prompt, raw output, parsed answer, score) and
`summary.json` (per task and overall, x100) to the output folder and prints the paper's table. Re-running resumes:
questions already in `predictions.jsonl` are skipped. A video that cannot be read becomes an error row (score 0,
counted) instead of stopping the run.

Scoring follows vision-x-nyu/thinking-in-space `lmms_eval/tasks/vsibench/utils.py` (commit 51e089c), read for the
rules, not copied: see `parse_answer`, `score_prediction` and `aggregate`. This file is a tool of the repo, not part
of the remote code a converted checkpoint carries, so it may import `vica2.*`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vica2.tools.inference import UsageError, check_device, check_model_path
from vica2.tools.paths import escaping_reason
from vica2.tools.shell import add_model_options, guarded, one_line


# ---------------------------------------------------------------------------------------------------- the benchmark
NUMERICAL_TYPES = ("object_counting", "object_abs_distance", "object_size_estimation", "room_size_estimation")
REL_DIRECTION_TYPES = ("object_rel_direction_easy", "object_rel_direction_medium", "object_rel_direction_hard")
MULTIPLE_CHOICE_TYPES = ("object_rel_distance", *REL_DIRECTION_TYPES, "route_planning", "obj_appearance_order")
QUESTION_TYPES = NUMERICAL_TYPES + MULTIPLE_CHOICE_TYPES
REL_DIRECTION_TASK = "object_rel_direction"
MAX_SHARDS = 4096  # --shard i/n: more parts than this is a typo (the split has ~5k questions)

# The eight tasks in the column order of the papers' tables (VSI-Bench and ViCA2), with their column titles.
TASK_COLUMNS = OrderedDict(
    [
        ("object_counting", "Obj. Count"),
        ("object_abs_distance", "Abs. Dist."),
        ("object_size_estimation", "Obj. Size"),
        ("room_size_estimation", "Room Size"),
        ("object_rel_distance", "Rel. Dist."),
        (REL_DIRECTION_TASK, "Rel. Dir."),
        ("route_planning", "Route Plan"),
        ("obj_appearance_order", "Appr. Order"),
    ]
)
# ViCA2-7B as published (release README, "Overall Performance on VSI-Bench" table), to compare a run with.
PUBLISHED_VICA2_7B = {
    "overall": 56.8,
    "object_counting": 65.7,
    "object_abs_distance": 51.0,
    "object_size_estimation": 75.5,
    "room_size_estimation": 71.4,
    "object_rel_distance": 51.6,
    REL_DIRECTION_TASK: 34.6,
    "route_planning": 38.1,
    "obj_appearance_order": 66.5,
}


def task_of(question_type: str) -> str:
    """The table column a question type counts in: the three relative-direction levels are one task."""
    if question_type not in QUESTION_TYPES:
        raise ValueError(f"Unknown VSI-Bench question type {question_type!r}; known: {', '.join(QUESTION_TYPES)}.")
    return REL_DIRECTION_TASK if question_type in REL_DIRECTION_TYPES else question_type


# ---------------------------------------------------------------------------------------------------- scoring
# Mean Relative Accuracy thresholds. The reference builds them as linspace(.5, .95, int((.95 - .5) / .05 + 2)),
# which is 10 points because int() truncates 10.999...: the same ten values as here.
MRA_THRESHOLDS = np.linspace(0.5, 0.95, 10)


def parse_answer(text: str) -> str:
    """The answer the reference scores: stripped generation, text before the first space, trailing '.' removed.

    Matches the reference's `fuzzy_matching`, applied to the generation as its LLaVA runners return it (stripped of
    surrounding whitespace first): split on the space character only (a tab or newline does not split), then
    rstrip('.'), then strip(). So "B. chair" -> "B", "3 meters" -> "3", "1." -> "1", "(B)" stays "(B)".
    """
    return text.strip().split(" ")[0].rstrip(".").strip()


def score_prediction(prediction: str, ground_truth: str, question_type: str) -> float:
    """Score one generation as the VSI-Bench reference does; `prediction` may be the raw generated text.

    Multiple choice: 1.0 when the parsed answer equals the ground-truth letter ignoring case (the reference's
    `exact_match`: lower() on both, no other normalisation, so "(B)" scores 0), else 0.0.
    Numerical: Mean Relative Accuracy of Python `float(answer)` (unparsable, e.g. "", "three": 0.0, the
    reference's worst case) against `float(ground_truth)` over `MRA_THRESHOLDS`.
    """
    answer = parse_answer(prediction)
    if task_of(question_type) in NUMERICAL_TYPES:
        return _mean_relative_accuracy(_to_float(answer), _to_float(ground_truth))
    return 1.0 if answer.lower() == str(ground_truth).lower() else 0.0


def _to_float(text) -> float | None:
    # Python float, as the reference: accepts "1e3", " 2 ", "1_000", "nan", "inf"; anything else is None.
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _mean_relative_accuracy(prediction: float | None, ground_truth: float | None) -> float:
    """Fraction of thresholds t with |pred - gt| / gt <= 1 - t, computed in the reference's float order.

    The order matters at exact hits: (12 - 10) / 10 = 0.2 but 1 - 0.8 is 0.19999999999999996 in floating point,
    so 12 vs 10 scores 0.6, as in the reference, not 0.7. NaN / inf predictions never pass (0.0).
    A ground truth of 0 (none in VSI-Bench; the reference would raise ZeroDivisionError) scores 1.0 for an exact 0
    and 0.0 otherwise: the relative error of anything else is unbounded.
    """
    if prediction is None or ground_truth is None:
        return 0.0
    if ground_truth == 0:
        return 1.0 if prediction == 0 else 0.0
    relative_error = abs(prediction - ground_truth) / ground_truth
    return float(np.mean(relative_error <= 1 - MRA_THRESHOLDS))


def aggregate(records) -> dict:
    """Per-task and overall scores (x100) of scored records (dicts with "question_type" and "score").

    As the reference's `vsibench_aggregate_results`: each question type's score is the mean over its questions;
    relative direction is the mean of its easy / medium / hard means (a mean of means, not a pooled mean); overall
    is the mean of the task scores. Error rows count as questions scoring 0. Partial runs (--limit,
    --question-types) average what is there: a relative-direction level or a task with no question is left out and
    listed in "missing_tasks" (the reference averages over the tasks present too, and would fail on a missing
    relative-direction level).
    """
    by_type: dict[str, list[dict]] = {}
    for record in records:
        task_of(record["question_type"])  # rejects unknown types
        by_type.setdefault(record["question_type"], []).append(record)
    type_scores = {name: _score_block(rows) for name, rows in by_type.items()}
    tasks = OrderedDict()
    for task in TASK_COLUMNS:
        if task == REL_DIRECTION_TASK:
            levels = {name: type_scores[name] for name in REL_DIRECTION_TYPES if name in type_scores}
            if levels:
                tasks[task] = _combined_levels(levels)
        elif task in type_scores:
            tasks[task] = type_scores[task]
    for task, block in tasks.items():
        block["metric"] = "MRA" if task in NUMERICAL_TYPES else "accuracy"
    task_scores = [block["score"] for block in tasks.values()]
    return {
        "overall": float(np.mean(task_scores)) if task_scores else None,
        "tasks": dict(tasks),
        "questions": sum(block["questions"] for block in tasks.values()),
        "errors": sum(block["errors"] for block in tasks.values()),
        "missing_tasks": [task for task in TASK_COLUMNS if task not in tasks],
    }


def chance_levels(questions: list[Question]) -> dict[str, float]:
    """Each task's score (x100, aggregated as `aggregate` does) of guessing uniformly at random: one of the options
    of a multiple-choice question; for a numerical one, one of the ground truths its question type has in
    `questions` (the answers a blind guesser could know)."""
    answers: dict[str, set[float]] = {}
    for question in questions:
        if task_of(question.question_type) in NUMERICAL_TYPES:
            answers.setdefault(question.question_type, set()).add(_to_float(question.ground_truth))

    def chance(question: Question) -> float:
        if question.options:
            return 1 / len(question.options)
        truth = _to_float(question.ground_truth)
        guesses = answers[question.question_type]
        return float(np.mean([_mean_relative_accuracy(guess, truth) for guess in guesses]))

    records = [{"question_type": question.question_type, "score": chance(question)} for question in questions]
    return {task: block["score"] for task, block in aggregate(records)["tasks"].items()}


def _score_block(rows: list[dict]) -> dict:
    return {
        "score": 100.0 * float(np.mean([float(row["score"]) for row in rows])),
        "questions": len(rows),
        "errors": sum(1 for row in rows if row.get("error")),
    }


def _combined_levels(levels: dict[str, dict]) -> dict:
    return {
        "score": float(np.mean([block["score"] for block in levels.values()])),
        "questions": sum(block["questions"] for block in levels.values()),
        "errors": sum(block["errors"] for block in levels.values()),
        "levels": levels,
    }


# ---------------------------------------------------------------------------------------------------- questions
REQUIRED_FIELDS = ("id", "dataset", "scene_name", "question_type", "question", "ground_truth")


@dataclass(frozen=True)
class Question:
    id: object
    dataset: str
    scene_name: str
    question_type: str
    question: str
    options: tuple[str, ...] | None
    ground_truth: str

    @property
    def key(self) -> str:
        return str(self.id)

    @property
    def video(self) -> str:
        return f"{self.dataset}/{self.scene_name}.mp4"


def load_questions(path: str | Path) -> list[Question]:
    """The test split from a parquet (needs pyarrow), JSON (a list, or JSON Lines) or JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--data {str(path)!r}: no such file (the VSI-Bench test split: parquet, JSON or JSONL).")
    rows = _read_parquet(path) if path.suffix == ".parquet" else _read_json_rows(path)
    if not rows:
        raise UsageError(f"--data {str(path)!r} holds no questions (an empty file?).")
    questions = [_question_from_row(row, index) for index, row in enumerate(rows)]
    duplicates = _duplicates(question.key for question in questions)
    if duplicates:
        raise UsageError(f"{path}: duplicate question ids {duplicates[:5]}: each question needs its own id.")
    return questions


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        try:
            import pandas
        except ImportError:
            raise UsageError(
                "Reading parquet needs pyarrow: `pip install pyarrow` (or give the split as JSON / JSONL)."
            ) from None
        return pandas.read_parquet(path).to_dict("records")
    return parquet.read_table(path).to_pylist()


def _read_json_rows(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); give JSON or JSONL.") from None
    try:
        data = _loads(text, f"{path}")
    except json.JSONDecodeError as whole:
        if text.lstrip().startswith("["):  # one JSON document (a list) that is broken somewhere
            raise UsageError(f"{path}, line {whole.lineno}: not valid JSON ({whole.msg}).") from None
        data = _json_lines(path, text)  # JSON Lines (also what `datasets`' to_json writes to a .json file)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise UsageError(f"{path}: expected a list of question objects or one JSON object per line.")
    return data


def _loads(text: str, where: str):
    """`json.loads`; data nested too deeply for Python's parser (a hostile file) is a one-line `UsageError`."""
    try:
        return json.loads(text)
    except RecursionError:
        raise UsageError(f"{where}: JSON nested too deeply to read; not a VSI-Bench file.") from None


def _json_lines(path: Path, text: str) -> list:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(_loads(line, f"{path}, line {number}"))
        except json.JSONDecodeError as error:
            raise UsageError(f"{path}, line {number}: not a JSON object ({error.msg}); fix or remove the line.") \
                from None
        if not isinstance(rows[-1], dict):
            raise UsageError(f"{path}, line {number}: expected one question object per line.")
    return rows


def _question_from_row(row: dict, index: int) -> Question:
    missing = [name for name in REQUIRED_FIELDS if row.get(name) is None]
    if missing:
        raise UsageError(f"Question {index} (id {row.get('id')!r}) lacks {', '.join(missing)}.")
    question_type = str(row["question_type"])
    if question_type not in QUESTION_TYPES:
        raise UsageError(f"Question {row['id']!r} has an unknown question_type {question_type!r}; known: "
                         f"{', '.join(QUESTION_TYPES)}.")
    options = row.get("options")
    if options is not None and (isinstance(options, (str, bytes, dict)) or not hasattr(options, "__len__")):
        raise UsageError(f"Question {row['id']!r}: options must be a list of strings, got {type(options).__name__} "
                         f"{_short(options)}.")
    options = tuple(str(option) for option in options) if options is not None and len(options) else None
    if question_type in MULTIPLE_CHOICE_TYPES and options is None:
        raise UsageError(f"Question {row['id']!r} is multiple choice ({question_type}) but has no options.")
    for name in ("dataset", "scene_name"):
        _check_path_part(row, name)
    problem = ground_truth_problem(row["ground_truth"], question_type)
    if problem:
        raise UsageError(f"Question {row['id']!r}: {problem}; fix the data (it would be scored wrongly).")
    return Question(
        id=row["id"].item() if hasattr(row["id"], "item") else row["id"],  # numpy ints from pandas
        dataset=str(row["dataset"]),
        scene_name=str(row["scene_name"]),
        question_type=question_type,
        question=str(row["question"]),
        options=options,
        ground_truth=str(row["ground_truth"]),
    )


def ground_truth_problem(ground_truth, question_type: str) -> str | None:
    """Why `ground_truth` cannot be scored for `question_type` (None when it can): a numerical task's must be a
    finite number >= 0 (Mean Relative Accuracy divides by it), a multiple-choice task's must not be empty."""
    text = str(ground_truth).strip()
    if task_of(question_type) in NUMERICAL_TYPES:
        value = _to_float(text)
        if value is None or not math.isfinite(value) or value < 0:
            return f"ground_truth {_short(ground_truth)} of a numerical task ({question_type}) is not a number >= 0"
    elif not text:
        return f"ground_truth of a multiple-choice task ({question_type}) is empty"
    return None


def _check_path_part(row: dict, name: str) -> None:
    """`dataset` and `scene_name` name one folder and one file under --video-root: a separator, or a name that
    `vica2.tools.paths` refuses (the rule fine-tuning's media paths follow too), would read a video from outside it."""
    value = str(row[name])
    if value in (".", "..") or any(char in value for char in "/\\") or escaping_reason(value):
        raise UsageError(
            f"Question {row['id']!r}: {name} {value!r} is not a plain name; videos are read from "
            "<video-root>/<dataset>/<scene_name>.mp4 only, never from outside --video-root."
        )


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _duplicates(keys) -> list[str]:
    seen, repeated = set(), []
    for key in keys:
        if key in seen:
            repeated.append(key)
        seen.add(key)
    return repeated


def parse_question_types(text: str | None) -> set[str] | None:
    """--question-types: comma-separated types; "object_rel_direction" stands for its three levels."""
    if not text:
        return None
    chosen = set()
    for name in (part.strip() for part in text.split(",") if part.strip()):
        if name == REL_DIRECTION_TASK:
            chosen.update(REL_DIRECTION_TYPES)
        elif name in QUESTION_TYPES:
            chosen.add(name)
        else:
            raise UsageError(
                f"--question-types: unknown type {name!r}; known: {', '.join(QUESTION_TYPES)}, {REL_DIRECTION_TASK}."
            )
    return chosen


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """--shard i/n with 0 <= i < n (e.g. 0/4 ... 3/4)."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not int(match[1]) < int(match[2]) <= MAX_SHARDS:
        raise UsageError(f"--shard {_short(text)}: write i/n with 0 <= i < n <= {MAX_SHARDS}, e.g. --shard 0/4 ... "
                         "--shard 3/4.")
    return int(match[1]), int(match[2])


def select_questions(questions: list[Question], question_types=None, limit=None, shard=None) -> list[Question]:
    """Filter by type, keep the first `limit`, then take this shard's share (so shards split the same selection)."""
    selected = [q for q in questions if question_types is None or q.question_type in question_types]
    if limit is not None:
        selected = selected[:limit]
    return shard_questions(selected, *shard) if shard else selected


def shard_questions(questions: list[Question], index: int, count: int) -> list[Question]:
    """Whole videos go to one shard (each video is decoded once), balancing the number of questions per shard."""
    by_video: dict[str, int] = {}
    for question in questions:
        by_video[question.video] = by_video.get(question.video, 0) + 1
    loads, owner = [0] * count, {}
    for video in sorted(by_video, key=lambda v: -by_video[v]):  # stable: deterministic for a given selection
        shard = loads.index(min(loads))
        owner[video] = shard
        loads[shard] += by_video[video]
    return [q for q in questions if owner[q.video] == index]


# ---------------------------------------------------------------------------------------------------- prompts
PROMPT_STYLES = ("vica2", "vsibench")
PRE_PROMPT = "These are frames of a video."
NUMERICAL_POST_PROMPT = "Please answer the question using a single word or phrase."
# The benchmark authors' yaml writes a straight apostrophe; the ViCA2 release's VSI-Bench inference code (README,
# "Inference for ViCA2") a curly one (U+2019). They tokenize differently, so each style keeps its own source's.
VSIBENCH_CHOICE_POST_PROMPT = "Answer with the option's letter from the given choices directly."
VICA2_CHOICE_POST_PROMPT = "Answer with the option\u2019s letter from the given choices directly."


def build_prompt(question: Question, style: str, time_instruction: str | None = None, video_token="<video>") -> str:
    """The user turn for `question`, with one `video_token` where the video goes.

    vica2: the release's inference prompt, verbatim; with time_instruction None its line stays empty, exactly as
        the release's code leaves it (time_instruciton = ""):
        <video>\\n{time instruction}\\n\\nThese are frames of a video.\\n\\nQuestion: {question}\\n
        then "{options one per line}\\nAnswer with the option’s letter ...\\n" or "Please answer ... phrase.\\n".
    vsibench: the benchmark's `vsibench_doc_to_text` after the LLaVA runners' "<image>\\n", no trailing newline:
        <video>\\nThese are frames of a video.\\n{question}\\n[Options:\\n{options}\\n]{post prompt}
        and with a time instruction: <video>\\n{time instruction}\\n\\n{the same text}.
    """
    if style == "vica2":
        return f"{video_token}\n{time_instruction or ''}\n\n{_vica2_text(question)}"
    if style == "vsibench":
        prefix = f"{video_token}\n{time_instruction}\n\n" if time_instruction else f"{video_token}\n"
        return prefix + _vsibench_text(question)
    raise ValueError(f"Unknown prompt style {style!r}; known: {', '.join(PROMPT_STYLES)}.")


def _vica2_text(question: Question) -> str:
    text = f"{PRE_PROMPT}\n\nQuestion: {question.question}\n"
    if question.question_type in MULTIPLE_CHOICE_TYPES:
        return text + "\n".join(question.options) + f"\n{VICA2_CHOICE_POST_PROMPT}\n"
    return text + f"{NUMERICAL_POST_PROMPT}\n"


def _vsibench_text(question: Question) -> str:
    if question.question_type in MULTIPLE_CHOICE_TYPES:
        options = "Options:\n" + "\n".join(question.options)
        return "\n".join([PRE_PROMPT, question.question, options, VSIBENCH_CHOICE_POST_PROMPT])
    return "\n".join([PRE_PROMPT, question.question, NUMERICAL_POST_PROMPT])


def chat_prompt(processor, user_text: str) -> str:
    """The full model input text: the release's "qwen_1_5" conversation (the processor's chat template)."""
    messages = [{"role": "user", "content": user_text}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


# ---------------------------------------------------------------------------------------------------- output files
def output_paths(output_dir: Path, shard: tuple[int, int] | None) -> tuple[Path, Path]:
    """(predictions JSONL, summary JSON) of a run or of one shard."""
    suffix = f".shard{shard[0]}of{shard[1]}" if shard else ""
    return output_dir / f"predictions{suffix}.jsonl", output_dir / f"summary{suffix}.json"


def read_records(path: Path, repair: bool = False) -> list[dict]:
    """The records of a predictions file. A last line without its newline is what a killed run leaves: it is
    ignored (and cut off the file when `repair`, before appending). Any other bad line is an error, not skipped."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete_end = data.rfind(b"\n") + 1
    if complete_end < len(data):
        print(f"{path}: ignoring an incomplete last line (an interrupted write); that question is run again.",
              file=sys.stderr)
        if repair:
            with open(path, "r+b") as handle:
                handle.truncate(complete_end)
    records = []
    for number, line in enumerate(data[:complete_end].decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = _loads(line, f"{path}, line {number}")
        except json.JSONDecodeError as error:
            raise UsageError(f"{path}, line {number}: not a JSON record ({error}); fix or remove the line.") from None
        problem = record_problem(record)
        if problem:
            raise UsageError(f"{path}, line {number}: {problem}; fix or remove the line (it is not scored).")
        records.append(record)
    return records


def record_problem(record) -> str | None:
    """Why a line of a predictions file is not a prediction this evaluator wrote (None when it is one)."""
    if not isinstance(record, dict):
        return f"expected a prediction object, got {type(record).__name__}"
    missing = [name for name in ("id", "question_type", "ground_truth", "score") if name not in record]
    if missing:
        return f"the prediction lacks {', '.join(missing)}"
    if record["question_type"] not in QUESTION_TYPES:
        return f"unknown question_type {_short(record['question_type'])}"
    score = record["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 1:
        return f"score {_short(score)} is not a number in [0, 1]"
    if not isinstance(record.get("output"), (str, type(None))):
        return f"output {_short(record['output'])} is not text"
    return ground_truth_problem(record["ground_truth"], record["question_type"])


class PredictionWriter:
    """Appends records to the predictions file, a whole batch per write and fsync'd, so a crash loses at most the
    batch in flight and never leaves a half line among complete ones (`read_records` cuts off a torn tail)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "ab", buffering=0)

    def write(self, records: list[dict]) -> None:
        if records:
            payload = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
            self.handle.write(payload.encode("utf-8"))
            os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


@contextlib.contextmanager
def locked_outputs(paths: list[Path]):
    """Hold a lock file next to each output file (`<file>.lock`, an `fcntl.flock`) for the run: a second run
    writing the same files would answer everything again and append it, double-counting the summary. The locks go
    with the process (also when it is killed); the `.lock` files stay and are harmless (a folder this run made and
    left otherwise empty is removed). Without `fcntl` (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder = paths[0].parent
    created = not folder.exists()
    with contextlib.ExitStack() as held:
        if created:  # a run that stops before writing anything leaves no folder behind
            held.callback(_remove_if_only_locks, folder)
        folder.mkdir(parents=True, exist_ok=True)
        for path in paths:
            handle = held.enter_context(open(path.with_name(path.name + ".lock"), "a"))
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(f"--output-dir {str(path.parent)!r} is in use by another run (it holds "
                                 f"{handle.name}); wait for it to finish or use another --output-dir.") from None
        yield


def _remove_if_only_locks(folder: Path) -> None:
    with contextlib.suppress(OSError):
        if all(path.suffix == ".lock" for path in folder.iterdir()):
            for path in folder.iterdir():
                path.unlink()
            folder.rmdir()


def write_text_atomically(path: Path, content: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(content, encoding="utf-8")
    os.replace(temporary, path)


def check_same_settings(records: list[dict], settings: dict, path: Path) -> None:
    """Resuming with other settings would mix two evaluations in one file."""
    for record in records:
        if record.get("settings") != settings:
            raise UsageError(
                f"{path} holds predictions made with {record.get('settings')}, not {settings}: use another "
                "--output-dir, or the same settings to resume."
            )


def drop_error_records(path: Path, records: list[dict]) -> list[dict]:
    """--retry-errors: rewrite the file without its error rows, so those questions run again."""
    kept = [record for record in records if not record.get("error")]
    if len(kept) != len(records):
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in kept)
        write_text_atomically(path, lines)
    return kept


# ---------------------------------------------------------------------------------------------------- running
@dataclass(frozen=True)
class RunSettings:
    prompt_style: str = "vica2"
    time_instruction: bool = False
    frames: int = 64
    max_new_tokens: int = 16

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def read_video_or_error(processor, video_root: Path, video: str, frames: int):
    """The `DecodedVideo`, or the exception that reading it raised (missing, corrupt, not a video: error rows, not
    a crash)."""
    try:
        return processor.load_video(str(video_root / video), num_frames=frames, keep_frames=True)  # vLLM takes the frames
    except (ValueError, OSError) as error:
        if isinstance(error, OSError) or _is_video_load_error(error):
            return error
        raise


def _is_video_load_error(error: Exception) -> bool:
    # By name: a checkpoint's processor runs its own copy of video_loading_vica2 (remote code, imported under
    # transformers_modules), whose VideoLoadError is another class than vica2.video_loading_vica2.VideoLoadError.
    return any(cls.__name__ == "VideoLoadError" for cls in type(error).__mro__)


@dataclass
class VideoJob:
    """One readable video's questions, their prompts and the decoded video, as an engine gets them."""

    questions: list[Question]
    prompts: list[str]
    video: object


def evaluate(engine, processor, questions: list[Question], video_root: Path, settings: RunSettings,
             writer: PredictionWriter, progress=None) -> None:
    """Answer `questions` with `engine`, appending one record per question to `writer`.

    The records are made here, the same for any engine: an engine only turns prompts into generated texts.
    `engine.answer_all(jobs)` takes the videos' jobs (read lazily, a video decoded when the engine asks for it) and
    yields `(job, first, texts)` for the questions `first, first + 1, ...` of a job as they are answered (the
    transformers engine batch by batch, video after video; vLLM question by question across the videos it holds),
    so every answer is saved when it is done and an interrupted run resumes where it stopped. A video that cannot
    be read becomes error rows without reaching the engine.
    """

    def save(batch: list[Question], prompts: list[str], outputs, error=None) -> None:
        writer.write([make_record(question, prompt, settings, output=output, error=error)
                      for question, prompt, output in zip(batch, prompts, outputs)])
        if progress is not None:
            progress.update(len(batch))

    def jobs():
        for video_name, group in videos_with_questions(questions):  # each video is read once
            video = read_video_or_error(processor, video_root, video_name, settings.frames)
            prompts = [_prompt_for(question, video, processor, settings) for question in group]
            if isinstance(video, Exception):
                save(group, prompts, [None] * len(group), error=_error_text(video))
            else:
                yield VideoJob(group, prompts, video)

    for job, first, texts in engine.answer_all(jobs()):
        texts = list(texts)
        save(job.questions[first:first + len(texts)], job.prompts[first:first + len(texts)], texts)


def videos_with_questions(questions: list[Question]) -> list[tuple[str, list[Question]]]:
    """(video, its questions) in first-appearance order: each video is read and encoded once."""
    groups: dict[str, list[Question]] = {}
    for question in questions:
        groups.setdefault(question.video, []).append(question)
    return list(groups.items())


class TransformersEngine:
    """Answers a video's prompts with a transformers model, greedily, `batch_size` prompts per generate call.

    With `prefix_reuse` (the default) the video's towers and its prompts' shared prefix run once and every question
    continues from that KV cache (`vica2.tools.inference`); at most `max_cache_bytes` of cache copies are held for a
    batch. Without it every question runs its whole prompt (the plain path). Both give the same texts.
    """

    name = "transformers"

    def __init__(self, model, processor, *, batch_size: int = 1, max_new_tokens: int = 16, prefix_reuse: bool = True,
                 max_cache_bytes: int | None = None):
        from vica2.tools.inference import ReuseStats

        self.model, self.processor = model, processor
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.prefix_reuse, self.max_cache_bytes = prefix_reuse, max_cache_bytes
        self.stats = ReuseStats()

    def answer(self, video, prompts: list[str]):
        """Yields the raw generated texts of `prompts` (each showing `video`, a DecodedVideo) batch by batch."""
        from vica2.tools.inference import iter_answer_prompts, prepare_media

        media = prepare_media(self.model, self.processor, video=video)
        yield from iter_answer_prompts(
            self.model, self.processor, prompts, media, batch_size=self.batch_size, reuse=self.prefix_reuse,
            max_cache_bytes=self.max_cache_bytes, stats=self.stats, max_new_tokens=self.max_new_tokens,
            do_sample=False, skip_special_tokens=True,
        )

    def answer_all(self, jobs):
        """Yields `(job, first, texts)` batch by batch, one video after the other (see `evaluate`)."""
        for job in jobs:
            first = 0
            for texts in self.answer(job.video, job.prompts):
                yield job, first, texts
                first += len(texts)

    def summary(self) -> dict:
        """What this run's engine did, for summary.json."""
        return {"name": self.name, "prefix_reuse": self.prefix_reuse, **self.stats.as_dict()}

    def report(self) -> str:
        stats = self.summary()
        return (f"prefix reuse {'on' if stats['prefix_reuse'] else 'off'}: {stats['prompts']} questions, towers ran "
                f"{stats['tower_runs']} times, {stats['prefills_saved']} prefills saved")


def _prompt_for(question: Question, video, processor, settings: RunSettings) -> str:
    from vica2.processing_vica2 import time_instruction

    timing = None
    if settings.time_instruction and not isinstance(video, Exception):  # an unread video has no timing
        timing = time_instruction(video.metadata)
    return chat_prompt(processor, build_prompt(question, settings.prompt_style, timing, processor.video_token))


def make_record(question: Question, prompt: str, settings: RunSettings, output: str | None = None,
                error: str | None = None) -> dict:
    """One predictions line. An error row (the video could not be read) has output None and scores 0."""
    answer = parse_answer(output) if output is not None else None
    return {
        "id": question.id,
        "question_type": question.question_type,
        "dataset": question.dataset,
        "scene_name": question.scene_name,
        "prompt": prompt,
        "output": output,
        "answer": answer,
        "ground_truth": question.ground_truth,
        "score": score_prediction(output, question.ground_truth, question.question_type) if output is not None
        else 0.0,
        "error": error,
        "settings": settings.as_dict(),
    }


def _error_text(error: Exception) -> str:
    return f"{type(error).__name__}: {one_line(error)}"


def check_videos_exist(questions: list[Question], video_root: Path) -> None:
    """A wrong --video-root would turn every question into an error row: stop early instead. Some missing videos
    are only reported (they become error rows)."""
    videos = sorted({question.video for question in questions})
    missing = [video for video in videos if not (video_root / video).is_file()]
    if videos and len(missing) == len(videos):
        raise UsageError(
            f"None of the {len(videos)} videos is under --video-root {str(video_root)!r} (expected "
            f"<root>/<dataset>/<scene_name>.mp4, e.g. {video_root / videos[0]}). Unzip the benchmark's video "
            "archives into that folder."
        )
    if missing:
        print(f"warning: {len(missing)} of {len(videos)} videos are missing (e.g. {missing[0]}); their questions "
              "become error rows scoring 0.", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- reporting
def format_table(summary: dict) -> str:
    """The scores in the papers' column order, with the published ViCA2-7B row below for comparison."""
    titles = ["Avg", *TASK_COLUMNS.values()]
    this_run = [summary.get("overall")] + [summary["tasks"].get(task, {}).get("score") for task in TASK_COLUMNS]
    published = [PUBLISHED_VICA2_7B["overall"]] + [PUBLISHED_VICA2_7B[task] for task in TASK_COLUMNS]
    label_width = 22
    widths = [max(len(title), 6) for title in titles]
    lines = [" " * label_width + "  ".join(title.rjust(width) for title, width in zip(titles, widths))]
    for label, values in (("this run", this_run), ("ViCA2-7B (published)", published)):
        cells = ["-" if value is None else f"{value:.1f}" for value in values]
        lines.append(label.ljust(label_width) + "  ".join(cell.rjust(width) for cell, width in zip(cells, widths)))
    lines.append(f"{summary['questions']} questions, {summary['errors']} error rows (unreadable videos, scored 0)"
                 + (f"; not in this run: {', '.join(summary['missing_tasks'])}" if summary["missing_tasks"] else ""))
    return "\n".join(lines)


def write_summary(path: Path, records: list[dict], extra: dict) -> dict:
    summary = {**aggregate(records), **extra, "published_vica2_7b": PUBLISHED_VICA2_7B}
    write_text_atomically(path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


# ---------------------------------------------------------------------------------------------------- commands
def run_evaluation(args) -> int:
    settings = RunSettings(args.prompt_style, args.time_instruction, args.frames, args.max_new_tokens)
    shard = parse_shard(args.shard)
    selected = select_questions(load_questions(args.data), parse_question_types(args.question_types), args.limit,
                                shard)
    predictions_path, summary_path = output_paths(Path(args.output_dir), shard)
    with locked_outputs([predictions_path]):  # also creates the folder: the summary can always be written
        return _evaluate_locked(args, settings, selected, predictions_path, summary_path)


def _evaluate_locked(args, settings: RunSettings, selected: list[Question], predictions_path: Path,
                     summary_path: Path) -> int:
    records = read_records(predictions_path, repair=True)
    check_same_settings(records, settings.as_dict(), predictions_path)
    if args.retry_errors:
        records = drop_error_records(predictions_path, records)
    done = {str(record["id"]) for record in records}
    pending = [question for question in selected if question.key not in done]
    video_root = Path(args.video_root)
    check_videos_exist(pending, video_root)
    if pending:  # before the slow model load
        check_device(args.device)
        check_model_path(args.model)
        if args.engine == "vllm":
            if not args.trust_remote_code:
                raise UsageError(
                    "--engine vllm runs the model folder's own Python code (vLLM's Transformers backend builds ViCA2 "
                    "from it): add --trust-remote-code for a folder you trust, or use --engine transformers, which "
                    "runs the installed classes."
                )
            from vica2.tools.vllm_engine import require_vllm

            require_vllm()
    extra = {"model": args.model, "data": str(args.data), "settings": settings.as_dict(),
             "shard": args.shard, "selected": len(selected), "chance": chance_levels(selected)}
    engine = None

    def summarise() -> dict:
        records = read_records(predictions_path)
        remaining = len({q.key for q in selected} - {str(record["id"]) for record in records})
        run = {"engine": engine.summary()} if engine is not None else {}
        return write_summary(summary_path, records, {**extra, "remaining": remaining, **run})

    try:
        if pending:
            engine = build_engine(args)
            _run_pending(engine, settings, pending, len(selected), predictions_path, video_root)
    except BaseException:  # also after Ctrl-C: the summary of what is done so far, never hiding the real error
        with contextlib.suppress(Exception):
            summarise()
        raise
    summary = summarise()
    print(format_table(summary))
    if engine is not None:
        print(engine.report())
    print(f"predictions: {predictions_path}\nsummary: {summary_path}")
    return 0


def build_engine(args):
    """The engine that answers the questions: transformers, or vLLM (imported only here, when chosen)."""
    if args.engine == "vllm":
        from transformers import AutoProcessor

        from vica2.tools.vllm_engine import VsiBenchVllmEngine

        # vLLM runs the folder's code (asked for with --trust-remote-code); the processor is the same code.
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
        return VsiBenchVllmEngine(args.model, processor, frames=args.frames, max_new_tokens=args.max_new_tokens,
                                  videos_in_flight=args.videos_in_flight,
                                  tensor_parallel_size=args.tensor_parallel_size,
                                  data_parallel_size=args.data_parallel_size, dtype=args.dtype)
    from vica2.tools.inference import load_model_and_processor

    model, processor = load_model_and_processor(args.model, args.dtype, args.device,
                                                attn_implementation=args.attn_implementation,
                                                trust_remote_code=args.trust_remote_code)
    budget = None if args.cache_budget_gb is None else int(args.cache_budget_gb * 1e9)
    return TransformersEngine(model, processor, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                              prefix_reuse=args.prefix_reuse, max_cache_bytes=budget)


def _run_pending(engine, settings: RunSettings, pending: list[Question], total: int, predictions_path: Path,
                 video_root: Path) -> None:
    from tqdm.auto import tqdm

    writer = PredictionWriter(predictions_path)
    try:
        with tqdm(total=total, initial=total - len(pending), unit="question", desc="VSI-Bench",
                  file=sys.stderr) as progress:
            evaluate(engine, engine.processor, pending, video_root, settings, writer, progress)
    finally:
        writer.close()


def run_merge(args) -> int:
    """Combine the shard files (and any earlier merged file) of --output-dir, re-score, summarise."""
    output_dir = Path(args.output_dir)
    shard_files = _shard_files(output_dir)
    predictions_path, summary_path = output_paths(output_dir, None)
    with locked_outputs([*shard_files, predictions_path]):  # no shard run may still be writing
        return _merge_locked(output_dir, shard_files, predictions_path, summary_path)


def _merge_locked(output_dir: Path, shard_files: list[Path], predictions_path: Path, summary_path: Path) -> int:
    merged: dict[str, dict] = {}
    for path in [*shard_files, predictions_path]:  # fresh shard results win over an earlier merge
        for record in read_records(path):
            merged.setdefault(str(record["id"]), _rescored(record))
    records = list(merged.values())
    settings = {json.dumps(record.get("settings"), sort_keys=True) for record in records}
    if len(settings) > 1:
        raise UsageError(f"The files in {output_dir} were made with different settings: {sorted(settings)}.")
    write_text_atomically(predictions_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    summary = write_summary(summary_path, records, {
        "merged_from": [path.name for path in shard_files],
        "settings": records[0].get("settings") if records else None,
    })
    print(format_table(summary))
    print(f"merged {len(shard_files)} shard files: {predictions_path}\nsummary: {summary_path}")
    return 0


def _shard_files(output_dir: Path) -> list[Path]:
    found = {}
    for path in output_dir.glob("predictions.shard*of*.jsonl"):
        match = re.fullmatch(r"predictions\.shard(\d+)of(\d+)\.jsonl", path.name)
        if match:
            found[(int(match[1]), int(match[2]))] = path
    counts = {count for _, count in found}
    if not found:
        raise UsageError(f"No shard predictions (predictions.shard<i>of<n>.jsonl) in {str(output_dir)!r}.")
    if len(counts) > 1:
        raise UsageError(f"{output_dir} holds shards of different splits ({sorted(counts)} shards): keep one.")
    count = counts.pop()
    missing = [index for index in range(count) if (index, count) not in found]
    if missing:
        raise UsageError(f"Shards {missing} of {count} have no predictions in {output_dir}: run them first.")
    return [found[(index, count)] for index in range(count)]


def _rescored(record: dict) -> dict:
    """Scores recomputed from the raw output (error rows stay 0), so a merge always reflects this scorer."""
    if record.get("output") is None:
        return {**record, "answer": None, "score": 0.0}
    return {**record, "answer": parse_answer(record["output"]),
            "score": score_prediction(record["output"], record["ground_truth"], record["question_type"])}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vica2 eval-vsibench", description=__doc__.split("\n\n")[0])
    add_model_options(parser)
    parser.add_argument("--data", help="VSI-Bench test split: .parquet (needs pyarrow), .json or .jsonl")
    parser.add_argument("--video-root", help="folder holding <dataset>/<scene_name>.mp4")
    parser.add_argument("--output-dir", default="vsibench-results", help="predictions and summary go here")
    parser.add_argument("--prompt-style", choices=PROMPT_STYLES, default="vica2",
                        help="vica2: the release's inference prompt (default); vsibench: the benchmark authors'")
    parser.add_argument("--time-instruction", action=argparse.BooleanOptionalAction, default=False,
                        help="add the release's time instruction after the video (the release's VSI-Bench "
                             "inference code leaves it out; training used it)")
    parser.add_argument("--frames", type=int, default=64, help="frames sampled per video (default 64)")
    parser.add_argument("--engine", choices=("transformers", "vllm"), default="transformers",
                        help="who answers: transformers (default) or vLLM (needs vLLM installed; one engine gets "
                             "the questions of --videos-in-flight videos at a time and reuses each video's KV blocks; "
                             "--batch-size, --prefix-reuse, --cache-budget-gb, --device and --attn-implementation are "
                             "transformers' only)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM: GPUs per model replica")
    parser.add_argument("--data-parallel-size", type=int, default=1, help="vLLM: model replicas")
    parser.add_argument("--videos-in-flight", type=int, default=4,
                        help="vLLM: videos whose questions are queued in the engine at once (default 4); more keep "
                             "every replica busy, each holds its decoded frames until its questions are answered")
    parser.add_argument("--batch-size", type=int, default=1, help="questions of a video per generate call")
    parser.add_argument("--prefix-reuse", action=argparse.BooleanOptionalAction, default=True,
                        help="encode each video and its prompts' shared prefix once and answer its questions from "
                             "that KV cache (default; same answers): --no-prefix-reuse runs every prompt whole")
    parser.add_argument("--cache-budget-gb", type=float, default=8.0,
                        help="with prefix reuse: at most this many GB of KV-cache copies per batch (fewer rows "
                             "than --batch-size if needed; a 64-frame ViCA2-7B video is ~1.2 GB per row in bf16)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--limit", type=int, help="only the first N (selected) questions")
    parser.add_argument("--question-types", help="comma-separated, e.g. object_counting,object_rel_direction (its "
                        f"three levels); known: {', '.join(QUESTION_TYPES)}, {REL_DIRECTION_TASK}")
    parser.add_argument("--shard", help="i/n: run the i-th of n parts (0-based), e.g. one per GPU; then --merge")
    parser.add_argument("--merge", action="store_true", help="combine the shard outputs of --output-dir")
    parser.add_argument("--retry-errors", action="store_true", help="run the error rows of the output again")
    return parser


def _check_run_args(args, parser) -> None:
    if args.merge:
        return
    missing = [flag for flag, value in (("--model", args.model), ("--data", args.data),
                                        ("--video-root", args.video_root)) if not value]
    if missing:
        parser.error(f"{', '.join(missing)} required (or --merge)")
    for flag, value in (("--frames", args.frames), ("--batch-size", args.batch_size),
                        ("--max-new-tokens", args.max_new_tokens), ("--limit", args.limit),
                        ("--tensor-parallel-size", args.tensor_parallel_size),
                        ("--data-parallel-size", args.data_parallel_size),
                        ("--videos-in-flight", args.videos_in_flight)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1")
    if args.cache_budget_gb is not None and not args.cache_budget_gb > 0:
        parser.error("--cache-budget-gb must be positive")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_run_args(args, parser)
    return guarded("vica2 eval-vsibench", lambda: run_merge(args) if args.merge else run_evaluation(args),
                   debug=args.debug, interrupted="interrupted: run the same command again to resume")


if __name__ == "__main__":
    sys.exit(main())
