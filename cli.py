# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""`vica2`: ask ViCA2 about a video or an image from the command line.

    vica2 ask --model DIR_OR_REPO --video room.mp4 --question "How many chairs are in the room?"
    vica2 demo                      # the whole path offline, on a tiny random model and a generated video
    vica2 convert --input-dir RAW --output-dir OUT ...   # = python convert_checkpoint.py
    vica2 eval-vsibench --model M --data test.parquet --video-root DIR ...   # = python evaluate_vsibench.py

Errors a user can fix (a missing file, a corrupt video, a bad setting) are printed as one line, exit code 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


EXIT_USAGE = 2


class UsageError(Exception):
    """An error in what the user asked for: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------------- loading
def load_model_and_processor(model_path: str, dtype: str = "auto", device: str = "auto", load_in_4bit=False,
                             load_in_8bit=False, attn_implementation: str | None = None):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if not Path(model_path).exists() and "/" not in model_path:
        raise UsageError(f"--model {model_path!r} is neither a local folder nor a hub repo id (owner/name).")
    kwargs = {"trust_remote_code": True, "dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    if load_in_4bit or load_in_8bit:
        from transformers import BitsAndBytesConfig

        _require("bitsandbytes", "pip install bitsandbytes (or pip install 'vica2-hf[quant]')")
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
            if load_in_4bit else BitsAndBytesConfig(load_in_8bit=True)
        )
    if device == "auto":
        kwargs["device_map"] = "auto" if torch.cuda.is_available() or load_in_4bit or load_in_8bit else None
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(model_path, **kwargs).eval()
    if device not in ("auto",) and not (load_in_4bit or load_in_8bit):
        model = model.to(device)
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
    return model, processor


def _require(module: str, hint: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise UsageError(f"{module} is not installed: {hint}") from error


# ---------------------------------------------------------------------------------------------------- ask
@dataclass
class Answer:
    text: str
    prompt_tokens: int
    new_tokens: int
    visual_tokens: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


class _TimingStreamer:
    """Records when the first new token arrives (time to first token), optionally printing the text as it comes."""

    def __init__(self, text_streamer=None):
        self.text_streamer, self.first_token_at, self._seen_prompt = text_streamer, None, False

    def put(self, value):
        if self._seen_prompt and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self._seen_prompt = True
        if self.text_streamer is not None:
            self.text_streamer.put(value)

    def end(self):
        if self.text_streamer is not None:
            self.text_streamer.end()


def ask(model, processor, question: str, video: str | None = None, image: str | None = None, *, frames=None,
        max_new_tokens: int = 64, stream: bool = False, add_time_instruction: bool | None = None,
        fast_decode: bool = False, **overrides) -> Answer:
    """Answer `question` about one video or image, greedily (as the release evaluates)."""
    import torch
    from transformers import TextStreamer

    if (video is None) == (image is None):
        raise UsageError("Give exactly one of --video or --image.")
    media = video if video is not None else image
    if not Path(media).is_file():
        raise UsageError(f"{'--video' if video else '--image'} {media!r}: no such file.")
    overrides = {name: value for name, value in overrides.items() if value is not None}
    item = {"type": "video", "path": str(video)} if video is not None else {"type": "image", "path": str(image)}
    messages = [{"role": "user", "content": [item, {"type": "text", "text": question}]}]
    start = time.perf_counter()
    video_kwargs = {"num_frames": frames, "fast_decode": fast_decode} if video is not None else {}
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        add_time_instruction=add_time_instruction, **{k: v for k, v in video_kwargs.items() if v is not None},
        **overrides,
    )
    preprocessed = time.perf_counter()
    inputs = inputs_to_model(inputs, model)
    visual = _visual_token_counts(model.config, inputs, overrides)
    timing = _TimingStreamer(TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
                             if stream else None)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=timing)
    done = time.perf_counter()
    prompt_length = inputs["input_ids"].shape[1]
    new_ids = output[0, prompt_length:]
    first = timing.first_token_at or done
    return Answer(
        text=processor.decode(new_ids, skip_special_tokens=True).strip(),
        prompt_tokens=prompt_length,
        new_tokens=len(new_ids),
        visual_tokens=visual,
        timings={"preprocess_s": preprocessed - start, "time_to_first_token_s": first - preprocessed,
                 "decode_tokens_per_s": (len(new_ids) - 1) / (done - first) if done > first else float("nan")},
    )


def inputs_to_model(inputs, model):
    """Move the processor's output onto the model's device; pixels in the model's dtype, ids unchanged."""
    import torch

    device, dtype = model.device, model.dtype
    moved = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            moved[name] = value.to(device, dtype) if value.is_floating_point() else value.to(device)
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            moved[name] = [v.to(device, dtype) if v.is_floating_point() else v.to(device) for v in value]
        else:
            moved[name] = value
    return moved


def _visual_token_counts(config, inputs, overrides) -> dict[str, int]:
    counts = {"siglip": 0, "hiera": 0}
    videos = inputs.get("pixel_values_videos")
    for video in (list(videos) if videos is not None else []):
        siglip, hiera = config.num_video_tokens(video.shape[0], **overrides)
        counts["siglip"] += siglip
        counts["hiera"] += hiera
    for height, width in (inputs["image_sizes"].tolist() if inputs.get("image_sizes") is not None else []):
        siglip, hiera = config.num_image_tokens(int(height), int(width))
        counts["siglip"] += siglip
        counts["hiera"] += hiera
    return counts


def _print_answer(answer: Answer, verbose: bool, streamed: bool):
    if not streamed:
        print(answer.text)
    if verbose:
        t = answer.timings
        print(f"[tokens] prompt {answer.prompt_tokens} (SigLIP {answer.visual_tokens['siglip']}, Hiera "
              f"{answer.visual_tokens['hiera']}), generated {answer.new_tokens}", file=sys.stderr)
        print(f"[time] preprocessing {t['preprocess_s']:.2f}s, time to first token {t['time_to_first_token_s']:.2f}s,"
              f" decode {t['decode_tokens_per_s']:.1f} tokens/s", file=sys.stderr)


def run_ask(args) -> int:
    from vica2.configuration_vica2 import TOKEN_RATIO_ARGS

    load_start = time.perf_counter()
    model, processor = load_model_and_processor(args.model, args.dtype, args.device, args.load_in_4bit,
                                                args.load_in_8bit, args.attn_implementation)
    if args.verbose:
        print(f"[load] {args.model} in {time.perf_counter() - load_start:.1f}s ({model.dtype}, {model.device})",
              file=sys.stderr)
    answer = ask(model, processor, args.question, video=args.video, image=args.image, frames=args.frames,
                 max_new_tokens=args.max_new_tokens, stream=args.stream, fast_decode=args.fast_decode,
                 add_time_instruction=False if args.no_time_instruction else None,
                 **{name: getattr(args, name) for name in TOKEN_RATIO_ARGS})
    _print_answer(answer, args.verbose, args.stream)
    return 0


# ---------------------------------------------------------------------------------------------------- demo
def run_demo(args) -> int:
    from vica2.convert_checkpoint import convert_checkpoint
    from vica2.demo import build_demo_release, write_demo_video

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vica2-demo-"))
    print(f"vica2 demo: working in {workdir}")
    release = build_demo_release(workdir / "release")
    print(f"1. wrote a tiny random ViCA2 in the research release's layout: {release}")
    hub = workdir / "hub"
    result = convert_checkpoint(release, hub, overwrite=True, verify=True, progress=False)
    print(f"2. converted it with convert_checkpoint.py (verified): {hub} ({result.num_tensors} tensors, "
          f"{len(result.dropped)} unused release tensors dropped, remote code: {', '.join(result.remote_code)})")
    video = write_demo_video(workdir / "room.mp4")
    print(f"3. generated a 4 s, 24 fps test video: {video}")
    print(f"4. asking the converted model about it ({args.frames} frames; answers are random: the weights are):")
    model, processor = load_model_and_processor(str(hub), "float32", "cpu")
    answer = ask(model, processor, "How many chairs are in the room?", video=str(video), frames=args.frames,
                 max_new_tokens=args.max_new_tokens)
    print(f"   answer: {answer.text!r}")
    _print_answer(answer, verbose=True, streamed=True)
    print(f"Run it yourself: vica2 ask --model {hub} --video {video} --question \"...\" --verbose")
    return 0


# ---------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vica2", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    ask_parser = commands.add_parser("ask", help="answer a question about a video or an image")
    ask_parser.add_argument("--model", required=True, help="converted ViCA2 folder or hub repo id")
    media = ask_parser.add_mutually_exclusive_group(required=True)
    media.add_argument("--video", help="video file (any format PyAV reads)")
    media.add_argument("--image", help="image file")
    ask_parser.add_argument("--question", required=True)
    ask_parser.add_argument("--frames", type=int, help="frames to sample (default: the model's frame budget, 64)")
    ask_parser.add_argument("--hiera-frames", dest="hiera_frames", type=int, help="N_hiera at the frame budget")
    ask_parser.add_argument("--video-frames-budget", dest="video_frames_budget", type=int)
    ask_parser.add_argument("--siglip-pool-stride", dest="siglip_pool_stride", type=int)
    ask_parser.add_argument("--hiera-pool-stride", dest="hiera_pool_stride", type=int)
    ask_parser.add_argument("--no-time-instruction", action="store_true",
                            help="leave out the release's time instruction after the video")
    ask_parser.add_argument("--fast-decode", action="store_true", help="resize while decoding (faster, not exact)")
    ask_parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    ask_parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    quant = ask_parser.add_mutually_exclusive_group()
    quant.add_argument("--load-in-4bit", action="store_true", help="quantize the language model to 4-bit (nf4)")
    quant.add_argument("--load-in-8bit", action="store_true", help="quantize the language model to 8-bit")
    ask_parser.add_argument("--attn-implementation", help="eager, sdpa, flash_attention_2, vica2_fused, ...")
    ask_parser.add_argument("--max-new-tokens", type=int, default=64)
    ask_parser.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    ask_parser.add_argument("--verbose", action="store_true", help="token counts per stream and timings")
    ask_parser.set_defaults(run=run_ask)

    demo_parser = commands.add_parser("demo", help="the whole path offline on a tiny random model")
    demo_parser.add_argument("--workdir", help="where to write the demo files (default: a new temp folder)")
    demo_parser.add_argument("--frames", type=int, default=16)
    demo_parser.add_argument("--max-new-tokens", type=int, default=8)
    demo_parser.set_defaults(run=run_demo)

    convert_parser = commands.add_parser("convert", help="convert a release checkpoint (see convert_checkpoint.py)",
                                         add_help=False)
    convert_parser.set_defaults(run=None)

    eval_parser = commands.add_parser("eval-vsibench", help="evaluate on VSI-Bench (see evaluate_vsibench.py)",
                                      add_help=False)
    eval_parser.set_defaults(run=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert"]:
        from vica2.convert_checkpoint import main as convert_main

        return convert_main(argv[1:])
    if argv[:1] == ["eval-vsibench"]:  # its own parser and options live in evaluate_vsibench.py
        from vica2.evaluate_vsibench import main as eval_vsibench_main

        return eval_vsibench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except (UsageError, FileNotFoundError, ValueError, OSError, ImportError) as error:
        if args.debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"vica2 {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
