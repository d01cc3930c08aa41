"""Encode once, ask many: a mini VSI-Bench with and without prefix reuse, and the compute ratio at ViCA2-7B's shapes.

1. Wall time, in one run on this machine: 2 generated videos x 16 questions (VSI-Bench's prompt, greedy, 4 new
   tokens) on the `mid` model of bench_generate.py (random weights), answered
   - without reuse: every question runs its whole prompt (towers + prefill), as the evaluator did before;
   - with reuse: per video the towers and the shared prefix run once, each question continues from the KV cache
     (`vica2.tools.inference.answer_prompts`, what `vica2 eval-vsibench` now does by default), batch 1 and 4.
   The answers must be identical; the script fails otherwise.
2. FLOPs at ViCA2-7B's real shapes (counted with `torch.utils.flop_counter` on meta tensors: no weights needed):
   the SigLIP and Hiera towers per frame, the LM prefill of the shared prefix, a question's continuation over the
   cached prefix, and its decode steps; the ratio for a video with VSI-Bench's 5,130 / 288 = 17.8 questions.

    python benchmarks/bench_reuse.py                      # both parts (CPU: a few minutes)
    python benchmarks/bench_reuse.py --skip-wall          # only the FLOP ratio (seconds)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


sys.path.insert(0, str(Path(__file__).resolve().parent))

QUESTION_TEMPLATES = [
    ("How many chairs are in this room?", None),
    ("What is the length of the longest dimension (length, width, or height) of the table, measured in centimeters?",
     None),
    ("What is the size of this room (in square meters)? If multiple rooms are shown, estimate the size of the "
     "combined space.", None),
    ("Measuring from the closest point of each object, what is the direct distance between the sofa and the lamp "
     "(in meters)?", None),
    ("Measuring from the closest point of each object, which of these objects (bed, desk, door, window) is the "
     "closest to the chair?", ["A. bed", "B. desk", "C. door", "D. window"]),
    ("If I am standing by the sofa and facing the table, is the lamp to my left, right, or back?",
     ["A. left", "B. right", "C. back"]),
    ("You are a robot beginning at the door facing the bed. You want to navigate to the window. Which turns?",
     ["A. Turn Left, Turn Right", "B. Turn Right, Go Forward", "C. Turn Back", "D. Go Forward"]),
    ("What will be the first-time appearance order of the following categories in the video: chair, lamp, sofa, "
     "table?", ["A. chair, lamp, sofa, table", "B. lamp, chair, table, sofa", "C. sofa, table, chair, lamp",
                "D. table, sofa, lamp, chair"]),
]


def vsibench_questions(count: int) -> list[str]:
    """`count` user texts in the release's VSI-Bench prompt (after the video placeholder)."""
    texts = []
    for index in range(count):
        question, options = QUESTION_TEMPLATES[index % len(QUESTION_TEMPLATES)]
        question = f"{question} (variant {index // len(QUESTION_TEMPLATES) + 1})"
        text = f"\n\nThese are frames of a video.\n\nQuestion: {question}\n"
        if options:
            text += "\n".join(options) + "\nAnswer with the option\u2019s letter from the given choices directly.\n"
        else:
            text += "Please answer the question using a single word or phrase.\n"
        texts.append(text)
    return texts


# ---------------------------------------------------------------------------------------------------- wall time
def mid_model_and_processor():
    from bench_generate import build_model

    from vica2.tools.demo import build_byte_tokenizer
    from vica2.processing_vica2 import Vica2Processor

    tokenizer = build_byte_tokenizer()
    model = build_model("mid", "cpu", torch.float32)
    model.config.image_token_id, model.config.video_token_id = len(tokenizer), len(tokenizer) + 1
    model.generation_config.eos_token_id = None  # random weights: every answer is max_new_tokens long
    return model, Vica2Processor.from_model_config(model.config, tokenizer)


def wall_times(videos: int, questions: int, frames: int, new_tokens: int) -> dict:
    from vica2.tools.demo import write_demo_video
    from vica2.tools.inference import ReuseStats, answer_prompts, prepare_media, render_chat

    model, processor = mid_model_and_processor()
    texts = vsibench_questions(questions)
    with tempfile.TemporaryDirectory(prefix="bench-reuse-") as folder:
        paths = [write_demo_video(Path(folder) / f"room{i}.mp4", num_frames=48 + 24 * i) for i in range(videos)]
        decoded = [processor.load_video(str(path), num_frames=frames) for path in paths]
    prompts_of = lambda video: [render_chat(processor, [{"role": "user", "content": [
        {"type": "video", "video": video}, {"type": "text", "text": text}]}], add_time_instruction=False)
        for text in texts]
    generate = dict(max_new_tokens=new_tokens, do_sample=False)
    runs = {}
    for name, reuse, batch in (("without reuse", False, 1), ("with reuse, batch 1", True, 1),
                               ("with reuse, batch 4", True, 4)):
        stats, answers = ReuseStats(), []
        start = time.perf_counter()
        for video in decoded:  # as the evaluator: the pixels once per video, then its questions
            media = prepare_media(model, processor, video=video)
            answers += answer_prompts(model, processor, prompts_of(video), media, batch_size=batch, reuse=reuse,
                                      stats=stats, **generate)
        runs[name] = {"seconds": time.perf_counter() - start, "answers": answers, "stats": stats}
        print(f"  {name}: {runs[name]['seconds']:.1f} s, towers ran {stats.tower_runs}x, "
              f"{stats.prefill_tokens} tokens prefilled", flush=True)
    reference = runs["without reuse"]["answers"]
    for name, run in runs.items():
        if run["answers"] != reference:
            raise SystemExit(f"{name}: the answers differ from the plain path")
    media = prepare_media(model, processor, video=decoded[0])
    prompt_tokens = [len(ids) for ids in media.tokenize(processor, prompts_of(decoded[0]))]
    return {"runs": runs, "prompt_tokens": prompt_tokens, "visual_tokens": media.num_tokens,
            "params": sum(p.numel() for p in model.parameters())}


# ---------------------------------------------------------------------------------------------------- FLOPs
def _flops(function) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        function()
    return counter.get_total_flops()


def flops_at_7b(frames: int, prefix_text_tokens: int, question_tokens: int, new_tokens: int) -> dict:
    """FLOPs of one question without reuse and of the shared / per-question parts with reuse, ViCA2-7B shapes."""
    from transformers import AutoModel, DynamicCache, SiglipVisionModel
    from transformers.models.sam2.modeling_sam2 import Sam2HieraDetModel

    from vica2.configuration_vica2 import Vica2Config
    from vica2.modeling_vica2 import CACHE_NAME

    config = Vica2Config()
    text = config.text_config
    hidden = text.hidden_size
    with torch.device("meta"):
        siglip = SiglipVisionModel(config.vision_config)
        hiera = Sam2HieraDetModel(config.hiera_config)
        language_model = AutoModel.from_config(text)
    side, hiera_side = config.vision_config.image_size, config.hiera_config.image_size[0]
    siglip_tokens, hiera_tokens = config.num_video_tokens(frames)
    hiera_frames = -(-frames // (config.video_frames_budget // config.hiera_frames))
    towers = frames * _flops(lambda: siglip(pixel_values=torch.empty(1, 3, side, side, device="meta")))
    towers += hiera_frames * _flops(lambda: hiera(torch.empty(1, 3, hiera_side, hiera_side, device="meta")))
    # the two projectors (Linear-GELU-Linear) over every visual token before pooling: 2 x (in x H + H x H) each
    siglip_width, hiera_width = config.vision_config.hidden_size, config.hiera_config.embed_dim_per_stage[-1]
    grid = config.hiera_grid
    towers += 2 * frames * (side // config.vision_config.patch_size) ** 2 * (siglip_width * hidden + hidden * hidden)
    towers += 2 * hiera_frames * grid * grid * (hiera_width * hidden + hidden * hidden)
    prefix = prefix_text_tokens + siglip_tokens + hiera_tokens

    def run(new: int, cache):
        embeds = torch.empty(1, new, hidden, device="meta")
        return lambda: language_model(inputs_embeds=embeds, use_cache=True, **{CACHE_NAME: cache})

    def lm_head(tokens: int) -> int:
        return 2 * tokens * hidden * text.vocab_size

    def decode(cache) -> int:
        total = 0
        for _ in range(new_tokens - 1):  # the first new token comes from the prefill's last position
            total += _flops(run(1, cache)) + lm_head(1)
        return total

    cache = DynamicCache()
    whole_prompt = _flops(run(prefix + question_tokens, cache)) + lm_head(1)
    plain_decode = decode(cache)
    cache = DynamicCache()
    prefix_prefill = _flops(run(prefix, cache))
    continuation = _flops(run(question_tokens, cache)) + lm_head(1)
    return {"towers": towers, "prefix_tokens": prefix, "whole_prompt": whole_prompt, "prefix_prefill": prefix_prefill,
            "continuation": continuation, "decode": plain_decode}


def reuse_ratio(flops: dict, questions: float) -> tuple[float, float]:
    """(FLOPs per video without reuse, with reuse) for `questions` questions about it."""
    without = questions * (flops["towers"] + flops["whole_prompt"] + flops["decode"])
    with_reuse = flops["towers"] + flops["prefix_prefill"] + questions * (flops["continuation"] + flops["decode"])
    return without, with_reuse


# ---------------------------------------------------------------------------------------------------- main
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=2)
    parser.add_argument("--questions", type=int, default=16, help="questions per video")
    parser.add_argument("--frames", type=int, default=8, help="frames per video in the wall-time part")
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--skip-wall", action="store_true", help="only the FLOP ratio")
    args = parser.parse_args()

    if not args.skip_wall:
        print(f"1. wall time: {args.videos} videos x {args.questions} questions, mid model, {args.frames} frames, "
              f"{args.new_tokens} new tokens, CPU ({torch.get_num_threads()} threads), float32")
        result = wall_times(args.videos, args.questions, args.frames, args.new_tokens)
        tokens = result["prompt_tokens"]
        print(f"   model {result['params'] / 1e6:.0f}M parameters; prompts {min(tokens)}-{max(tokens)} tokens, "
              f"{result['visual_tokens']} of them visual; the answers of all three runs are identical")
        plain = result["runs"]["without reuse"]["seconds"]
        for name, run in result["runs"].items():
            print(f"   {name:<22} {run['seconds']:7.1f} s  {plain / run['seconds']:5.2f}x  "
                  f"({run['stats'].prefills_saved} prefills saved)")

    print("2. FLOPs at ViCA2-7B's shapes (64 frames: 22,144 visual tokens)")
    flops = flops_at_7b(frames=64, prefix_text_tokens=40, question_tokens=60, new_tokens=4)
    print(f"   towers {flops['towers'] / 1e12:.1f} TFLOP, prefix prefill ({flops['prefix_tokens']} tokens) "
          f"{flops['prefix_prefill'] / 1e12:.1f} TFLOP, whole prompt {flops['whole_prompt'] / 1e12:.1f} TFLOP; per "
          f"question with reuse: continuation (60 tokens) {flops['continuation'] / 1e12:.2f} TFLOP + decode (4 tokens) "
          f"{flops['decode'] / 1e12:.2f} TFLOP")
    for questions in (1, 5130 / 288, 32):
        without, with_reuse = reuse_ratio(flops, questions)
        print(f"   {questions:5.1f} questions per video: {without / 1e12:8.1f} vs {with_reuse / 1e12:7.1f} TFLOP  "
              f"{without / with_reuse:5.2f}x less compute with reuse")


if __name__ == "__main__":
    main()
