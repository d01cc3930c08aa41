"""`vica2 eval-vsibench --engine vllm` vs `--engine transformers`: the same records, resumable, sharded.

The vLLM runs go through the evaluator's `main()` in this process, with `vllm.LLM` answered by the session's one
engine (an engine start is most of the time here); the transformers run is the CLI in a fresh process (once vLLM
has loaded, transformers' decoder classes no longer run outside it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, write_video


FRAMES, MAX_NEW_TOKENS = 4, 8  # 4 of the tiny model's 8-frame budget: vLLM must take exactly the frames decoded


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """Two videos (one shorter than the frames sampled) with three questions each, and an unreadable one."""
    root = tmp_path_factory.mktemp("vsibench")
    videos = root / "videos"
    for dataset, scene, frames, seed in (("arkitscenes", "scene_a", 30, 0), ("scannet", "scene_b", 3, 2)):
        (videos / dataset).mkdir(parents=True)
        write_video(videos / dataset / f"{scene}.mp4", num_frames=frames, seed=seed)
    (videos / "scannetpp").mkdir()
    (videos / "scannetpp" / "broken.mp4").write_bytes(b"this is not a video")
    kinds = [("object_counting", "How many chairs?", None, "3"),
             ("route_planning", "Go where?", ["A. left", "B. right", "C. back"], "B"),
             ("object_abs_distance", "Sofa to lamp, in metres, measured from their centres?", None, "2.5")]
    rows = [
        {"id": 10 * video + index, "dataset": dataset, "scene_name": scene, "question_type": kind,
         "question": question, "options": options, "ground_truth": truth}
        for video, (dataset, scene) in enumerate((("arkitscenes", "scene_a"), ("scannet", "scene_b")))
        for index, (kind, question, options, truth) in enumerate(kinds)
    ]
    rows.append({"id": 99, "dataset": "scannetpp", "scene_name": "broken", "question_type": "object_counting",
                 "question": "Anything?", "options": None, "ground_truth": "1"})
    data = root / "test.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"root": root, "videos": videos, "data": data, "rows": rows}


def _args(bench, model, output_dir, *extra) -> list[str]:
    return ["eval-vsibench", "--model", str(model), "--data", str(bench["data"]), "--video-root",
            str(bench["videos"]), "--output-dir", str(output_dir), "--frames", str(FRAMES), "--max-new-tokens",
            str(MAX_NEW_TOKENS), "--dtype", "float32", *extra]


def _records(path: Path) -> dict:
    return {record["id"]: record for record in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


@pytest.fixture(scope="module")
def transformers_records(bench, hub_folder):
    out = bench["root"] / "transformers"
    result = subprocess.run([sys.executable, "-m", "vica2.tools.cli", *_args(bench, hub_folder, out, "--device", "cpu")],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return _records(out / "predictions.jsonl")


@pytest.fixture
def vllm_main(llm, monkeypatch):
    """The evaluator's main(), its `vllm.LLM(...)` answered by the session's engine; the arguments are kept."""
    import vica2.tools.vllm_engine as engine_module
    from vica2.tools.evaluate_vsibench import main

    started = []
    monkeypatch.setattr(engine_module.vllm, "LLM", lambda **kwargs: started.append(kwargs) or llm)

    def run(argv):
        assert main(argv[1:]) == 0
        return started

    return run


def test_vllm_records_equal_transformers_and_resume(bench, hub_folder, transformers_records, vllm_main, capsys):
    out = bench["root"] / "vllm"
    started = vllm_main(_args(bench, hub_folder, out, "--engine", "vllm", "--trust-remote-code", "--limit", "2",
                              "--tensor-parallel-size", "2", "--data-parallel-size", "3"))
    assert sorted(_records(out / "predictions.jsonl")) == [0, 1]
    assert started[0]["tensor_parallel_size"] == 2 and started[0]["data_parallel_size"] == 3
    assert started[0]["trust_remote_code"] is True and started[0]["enable_prefix_caching"] is True
    assert [cls.__name__ for cls in started[0]["logits_processors"]] == ["GeneratableVocabLimit"]
    capsys.readouterr()
    vllm_main(_args(bench, hub_folder, out, "--engine", "vllm", "--trust-remote-code"))  # resumes: the other 5 questions
    assert "vLLM: 4 questions, prefix-cache hit rate" in capsys.readouterr().out
    records = _records(out / "predictions.jsonl")
    assert records == transformers_records  # prompts, outputs, answers, scores, error rows: all equal
    assert records[99]["error"].startswith("VideoLoadError") and records[99]["score"] == 0.0
    # The tiny random model answers these long prompts alike (test_offline shows the frames steer its answers on
    # short ones); what this run adds is the evaluator's path: its decoded 4 frames reach vLLM as those 4 (without
    # num_frames vLLM would sample the budget's 8 and refuse frames that were not decoded), prompts and scoring.
    summary = json.loads((out / "summary.json").read_text())
    engine = summary["engine"]
    assert (engine["name"], engine["prompts"], summary["remaining"], summary["questions"]) == ("vllm", 4, 0, 7)
    assert 0 < engine["cache_hit_tokens"] <= engine["cache_queried_tokens"]  # a video's later questions hit


def test_vllm_shards_split_the_same_records(bench, hub_folder, transformers_records, vllm_main):
    shards = {}
    for index in range(2):
        vllm_main(_args(bench, hub_folder, bench["root"] / "shards", "--engine", "vllm", "--trust-remote-code", "--shard", f"{index}/2"))
        shards[index] = _records(bench["root"] / "shards" / f"predictions.shard{index}of2.jsonl")
    assert not set(shards[0]) & set(shards[1]) and shards[0] and shards[1]
    assert {**shards[0], **shards[1]} == transformers_records
