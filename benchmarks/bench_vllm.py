"""vLLM vs transformers as the VSI-Bench evaluator's engine: 4 videos x 8 questions, in one run on this machine.

Both engines answer through the evaluator's own loop (`vica2.tools.evaluate_vsibench.evaluate`: the same video decoding,
prompts and records), greedy, 8 new tokens, on two random-weight models built here: `tiny` (tests_vllm's model)
and `mid` (LLM hidden 512, 4 layers, head size 64). Reported per model:
  - questions/s through transformers (prefix reuse, the evaluator's default) and through vLLM (the evaluator's
    stream: the questions of up to 4 videos queued in one engine, which batches them and prefix-caches each video),
    and their ratio;
  - vLLM's prefix-cache hit rate (its `vllm:prefix_cache_hits / queries` counters) over the run, the ideal one
    (every prompt token a question shares with an earlier question of its video) and the ideal in whole KV blocks
    (what a paged cache can reuse), for the evaluator's stream (a video's questions queued together) and for the
    order issue 23 proposed (a video's first question prefilled before its other questions are queued), with the
    questions/s of both;
  - time to first token: one question on a new video, 1 new token, video decoding included, each engine.
How many answers are the same for both engines is printed too (float32 on CPU; random weights make near-ties).

Needs the vLLM environment (`make test-vllm` builds `.venv-vllm`) and the release fixture's tokenizer:

    .venv-vllm/bin/python benchmarks/bench_vllm.py        # 2 CPU cores: a few minutes
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests_vllm"))
import conftest as vllm_tests  # noqa: E402  (sets the hermetic vLLM settings before vLLM loads; builds models)


VIDEOS, QUESTIONS, FRAMES, NEW_TOKENS = 4, 8, 8, 8


def mid_config():
    config = vllm_tests.vllm_tiny_config()
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = 512, 1024, 4
    text.num_attention_heads, text.num_key_value_heads = 8, 2  # head size 64 (vLLM's CPU attention supports it)
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = text.layer_types[:1] * text.num_hidden_layers
    return config


def write_bench(root: Path):
    from vica2.tools.evaluate_vsibench import QUESTION_TYPES, MULTIPLE_CHOICE_TYPES, Question

    questions = []
    for video in range(VIDEOS):
        (root / "videos" / "scannet").mkdir(parents=True, exist_ok=True)
        vllm_tests.write_video(root / "videos" / "scannet" / f"scene_{video}.mp4", num_frames=24, seed=video)
        for index in range(QUESTIONS):
            kind = QUESTION_TYPES[index % len(QUESTION_TYPES)]
            choice = kind in MULTIPLE_CHOICE_TYPES
            questions.append(Question(id=100 * video + index, dataset="scannet", scene_name=f"scene_{video}",
                                      question_type=kind, question=f"Question {index} about the room?",
                                      options=("A. sofa", "B. lamp", "C. desk", "D. bed") if choice else None,
                                      ground_truth="C" if choice else "2.5"))
    return questions


class Collect:
    def __init__(self):
        self.records = []

    def write(self, records):
        self.records.extend(records)


def run(engine, questions, video_root, new_tokens=NEW_TOKENS):
    from vica2.tools.evaluate_vsibench import RunSettings, evaluate

    writer = Collect()
    engine.max_new_tokens = new_tokens
    started = time.perf_counter()
    evaluate(engine, engine.processor, questions, video_root, RunSettings(frames=FRAMES, max_new_tokens=new_tokens),
             writer)
    return time.perf_counter() - started, {r["id"]: r["output"] for r in writer.records}


def transformers_figures(folder, questions, video_root):
    from vica2.tools.evaluate_vsibench import TransformersEngine
    from vica2.tools.inference import load_model_and_processor

    model, processor = load_model_and_processor(str(folder), "float32", "cpu")
    engine = TransformersEngine(model, processor)
    run(engine, questions[:1], video_root)  # warm-up
    ttft, _ = run(engine, questions[QUESTIONS:QUESTIONS + 1], video_root, new_tokens=1)
    seconds, outputs = run(engine, questions, video_root)
    return {"seconds": seconds, "ttft": ttft, "outputs": outputs}


def vllm_figures(folder, questions, video_root):
    from transformers import AutoProcessor

    from vica2.tools.inference import register_installed_classes
    from vica2.tools.vllm_engine import VsiBenchVllmEngine, prefix_cache_counts

    register_installed_classes()
    processor = AutoProcessor.from_pretrained(str(folder))
    kwargs = vllm_tests.engine_kwargs(folder, block_size=32)
    for name in ("model", "trust_remote_code", "model_impl"):  # VllmEngine's own
        kwargs.pop(name)
    engine = VsiBenchVllmEngine(str(folder), processor, frames=FRAMES, max_new_tokens=NEW_TOKENS, **kwargs)
    run(engine, questions[:1], video_root)  # warm-up (this video is cached from here on)
    ttft, _ = run(engine, questions[QUESTIONS:QUESTIONS + 1], video_root, new_tokens=1)
    figures = {"ttft": ttft}
    for name, runner in (("first_alone", FirstQuestionFirst(engine)), ("stream", engine)):
        engine.engine.llm.reset_prefix_cache()
        before, ideal_before = prefix_cache_counts(engine.engine.llm), engine.engine.ideal_prefix_counts()
        seconds, outputs = run(runner, questions, video_root)
        after, ideal_after = prefix_cache_counts(engine.engine.llm), engine.engine.ideal_prefix_counts()
        queried = after["cache_queried_tokens"] - before["cache_queried_tokens"]
        hits = after["cache_hit_tokens"] - before["cache_hit_tokens"]
        figures[name] = {"seconds": seconds, "outputs": outputs, "hit_rate": hits / queried if queried else 0.0}
    # The ideal, from the stream's prompts (the same prompts both ways)
    prompt_tokens = ideal_after["prompt_tokens"] - ideal_before["prompt_tokens"]
    for key in ("ideal_hit_tokens", "ideal_block_hit_tokens"):
        figures[key] = (ideal_after[key] - ideal_before[key]) / prompt_tokens
    del engine
    return figures


class FirstQuestionFirst:
    """The order issue 23 proposed: a video's first question is prefilled (its first token out) before the video's
    other questions are queued; up to 4 videos at a time, as the evaluator's stream."""

    def __init__(self, engine):
        self.engine, self.processor = engine, engine.processor

    def answer_all(self, jobs):
        import vllm

        vllm_engine, jobs = self.engine.engine, list(jobs)
        params = vllm_engine._sampling_params(self.max_new_tokens)
        first = vllm_engine._sampling_params(self.max_new_tokens)
        first.output_kind = vllm.sampling_params.RequestOutputKind.CUMULATIVE  # an output from the first token on
        for start in range(0, len(jobs), 4):
            waiting, held = {}, {}
            for job in jobs[start:start + 4]:
                requests = vllm_engine._requests(job.prompts, [job.video] * len(job.prompts), {"num_frames": FRAMES})
                rid = vllm_engine.llm.enqueue(requests[:1], first, use_tqdm=False)[0].split("-", 1)[0]
                waiting[rid], held[rid] = (job, 0), requests[1:]
            while waiting:
                for output in vllm_engine.llm.llm_engine.step():
                    if output.request_id in held:  # prefilled: queue the video's other questions
                        job, rest = waiting[output.request_id][0], held.pop(output.request_id)
                        ids = vllm_engine.llm.enqueue(rest, params, use_tqdm=False)
                        waiting.update({r.split("-", 1)[0]: (job, i + 1) for i, r in enumerate(ids)})
                    if output.finished and output.request_id in waiting:
                        job, index = waiting.pop(output.request_id)
                        yield job, index, [output.outputs[0].text]


def _strip_fffd(text: str) -> str:
    return text.replace("\ufffd", "")


def main() -> int:
    import subprocess

    if len(sys.argv) > 1 and sys.argv[1] == "--transformers":  # a fresh process: vLLM patches transformers' classes
        folder, root = Path(sys.argv[2]), Path(sys.argv[3])
        figures = transformers_figures(folder, write_bench(root), root / "videos")
        print(json.dumps({**figures, "outputs": {str(k): v for k, v in figures["outputs"].items()}}))
        return 0
    root = Path(tempfile.mkdtemp(prefix="vica2-bench-vllm-"))
    questions = write_bench(root)
    # Every model is built, and transformers runs (in its own process), before vLLM loads: once it has, vLLM has
    # patched transformers' decoder classes and they no longer run outside it.
    folders = {name: vllm_tests.build_hub_folder(root / name, config=config)
               for name, config in (("tiny", vllm_tests.vllm_tiny_config()), ("mid", mid_config()))}
    transformers_runs = {}
    for name, folder in folders.items():
        result = subprocess.run([sys.executable, __file__, "--transformers", str(folder), str(root)],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            sys.exit(result.stderr[-3000:])
        transformers_runs[name] = json.loads(result.stdout.strip().splitlines()[-1])
    rows = []
    for name, folder in folders.items():
        hf = transformers_runs[name]
        vl = vllm_figures(folder, questions, root / "videos")
        vl_outputs = {str(k): v for k, v in vl["stream"]["outputs"].items()}
        assert vl["first_alone"]["outputs"] == vl["stream"]["outputs"]  # the same answers either way
        same = sum(vl_outputs[key] == text for key, text in hf["outputs"].items())
        differ = [key for key, text in hf["outputs"].items() if vl_outputs[key] != text]
        # vLLM's incremental detokenizer holds back an incomplete UTF-8 byte sequence; transformers' decode writes
        # U+FFFD for it: such answers differ only by those characters.
        only_replacement = sum(_strip_fffd(vl_outputs[key]) == _strip_fffd(hf["outputs"][key]) for key in differ)
        print(f"{name}: {len(differ)} answers differ, {only_replacement} of them only by U+FFFD (incomplete UTF-8)")
        rows.append((name, same, len(questions) / hf["seconds"], len(questions) / vl["stream"]["seconds"],
                     len(questions) / vl["first_alone"]["seconds"], vl["ideal_hit_tokens"],
                     vl["ideal_block_hit_tokens"], vl["stream"]["hit_rate"], vl["first_alone"]["hit_rate"], hf["ttft"],
                     vl["ttft"]))
    print(f"{VIDEOS} videos x {QUESTIONS} questions, {FRAMES} frames, {NEW_TOKENS} new tokens, greedy")
    print(f"{'model':6} {'same answers':>12} {'transformers q/s':>17} {'vLLM q/s':>9} {'ratio':>6} "
          f"{'first-alone q/s':>16} {'ideal hit':>10} {'in blocks':>10} {'vLLM hit':>9} {'of ideal':>9} "
          f"{'first-alone hit':>16} {'TTFT transformers':>18} {'TTFT vLLM':>10}")
    for name, same, hf_rate, vl_rate, alone_rate, ideal, blocks, hit, alone_hit, hf_ttft, vl_ttft in rows:
        print(f"{name:6} {same:>5} of {len(questions):<4} {hf_rate:17.2f} {vl_rate:9.2f} {vl_rate / hf_rate:5.2f}x "
              f"{alone_rate:16.2f} {ideal:10.1%} {blocks:10.1%} {hit:9.1%} {hit / ideal:9.1%} {alone_hit:16.1%} "
              f"{hf_ttft:17.3f}s {vl_ttft:9.3f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
