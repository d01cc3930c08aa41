# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""`vica2`: ask ViCA2 about a video or an image from the command line.

    vica2 ask --model DIR_OR_REPO --video room.mp4 --question "How many chairs are in the room?"
    vica2 ask --model M --video room.mp4 --question "How many chairs?" --question "Where is the lamp?"
    vica2 chat --model M --video room.mp4          # a conversation; the video is encoded once
    vica2 demo                      # the whole path offline, on a tiny random model and a generated video
    vica2 convert --input-dir RAW --output-dir OUT ...   # = python convert_checkpoint.py
    vica2 eval-vsibench --model M --data test.parquet --video-root DIR ...   # = python -m vica2.tools.evaluate_vsibench
    vica2 app --model DIR_OR_REPO   # a web demo in the browser (= python app.py; needs the `app` extra)

Errors a user can fix (a missing file, a corrupt video, a bad setting) are printed as one line, exit code 2;
`--debug` (before or after the command) shows the traceback instead. The model's own classes are used; no code that
comes with a model folder or hub repo runs unless `--trust-remote-code` is given.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

from vica2.configuration_vica2 import TOKEN_RATIO_ARGS
from vica2.tools.inference import (
    Answer,
    ChatSession,
    UsageError,
    ask,
    check_device,
    check_model_path,
    load_model_and_processor,
)
from vica2.tools.shell import USER_ERRORS, add_model_options, flag_message, guarded


# ---------------------------------------------------------------------------------------------------- shared
def _load(args):
    start = time.perf_counter()
    model, processor = load_model_and_processor(args.model, args.dtype, args.device, load_in_4bit=args.load_in_4bit,
                                                load_in_8bit=args.load_in_8bit,
                                                attn_implementation=args.attn_implementation,
                                                trust_remote_code=args.trust_remote_code)
    if args.verbose:
        print(f"[load] {args.model} in {time.perf_counter() - start:.1f}s ({model.dtype}, {model.device})",
              file=sys.stderr)
    return model, processor


def _check_before_loading(args) -> None:
    """What can be checked without the model (files, device, model path): before the slow load."""
    for flag, value in (("--video", args.video), ("--image", args.image)):
        if value is not None and not Path(value).is_file():
            raise UsageError(f"{flag} {value!r}: no such file.")
    check_device(args.device)
    check_model_path(args.model)


def _overrides(args) -> dict:
    """The token-ratio flags, for the processor (the inference API hands them to it, never to the model)."""
    return {name: getattr(args, name) for name in TOKEN_RATIO_ARGS}


def print_answer(answer: Answer, verbose: bool, streamed: bool) -> None:
    if not streamed:
        print(answer.text)
    if verbose:
        t = answer.timings
        print(f"[tokens] prompt {answer.prompt_tokens} (SigLIP {answer.visual_tokens['siglip']}, Hiera "
              f"{answer.visual_tokens['hiera']}), generated {answer.new_tokens}; {answer.cached_tokens} prompt tokens "
              "read from the cache", file=sys.stderr)
        print(f"[time] preprocessing {t['preprocess_s']:.2f}s, time to first token {t['time_to_first_token_s']:.2f}s,"
              f" decode {t['decode_tokens_per_s']:.1f} tokens/s", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- ask
def run_ask(args) -> int:
    _check_before_loading(args)
    model, processor = _load(args)
    answers = ask(model, processor, args.question, video=args.video, image=args.image, frames=args.frames,
                  max_new_tokens=args.max_new_tokens, stream=args.stream, fast_decode=args.fast_decode,
                  add_time_instruction=False if args.no_time_instruction else None, **_overrides(args))
    for answer in answers:
        print_answer(answer, args.verbose, args.stream)
    if args.verbose and len(answers) > 1:
        print(f"[reuse] {len(answers)} questions from one encoded prefix: the towers ran once, "
              f"{len(answers) - 1} prefills saved", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------- chat
CHAT_HELP = "Commands: /video PATH, /image PATH (a new conversation about it), /reset (forget the conversation), /quit"


def run_chat(args) -> int:
    _check_before_loading(args)
    model, processor = _load(args)
    session = ChatSession(model, processor, num_frames=args.frames, fast_decode=args.fast_decode,
                          add_time_instruction=False if args.no_time_instruction else None,
                          max_new_tokens=args.max_new_tokens, **_overrides(args))
    if args.video or args.image:
        _set_media(session, "video" if args.video else "image", args.video or args.image, args.verbose)
    interactive = sys.stdin.isatty()
    if interactive:
        print(CHAT_HELP)
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            return 0
        line = line.strip()
        if not line:
            continue
        try:
            if not _chat_command(session, line, args.verbose):
                return 0
        except USER_ERRORS as error:  # one bad turn (a missing file) does not end the conversation
            if args.debug:
                raise
            print(f"vica2 chat: error: {flag_message(error)}", file=sys.stderr)


def _chat_command(session: ChatSession, line: str, verbose: bool) -> bool:
    """Run one input line; False to end the conversation."""
    command, _, rest = line.partition(" ")
    if command in ("/quit", "/exit"):
        return False
    if command == "/reset":
        session.reset()
        print("(conversation reset; the media stays encoded)")
    elif command in ("/video", "/image"):
        if not rest.strip():
            raise UsageError(f"{command} needs a path: {command} PATH")
        _set_media(session, command[1:], rest.strip(), verbose)
    elif command.startswith("/"):
        raise UsageError(f"unknown command {command!r}. {CHAT_HELP}")
    else:
        answer = session.ask(line, stream=True)
        print()
        print_answer(answer, verbose, streamed=True)
        if verbose:
            stats = session.stats
            print(f"[session] towers ran {stats.tower_runs}x; {stats.turns} turns, {stats.prefill_tokens} tokens "
                  f"prefilled, {stats.cached_tokens} read from the cache", file=sys.stderr)
    return True


def _set_media(session: ChatSession, kind: str, path: str, verbose: bool) -> None:
    media = session.set_video(path) if kind == "video" else session.set_image(path)
    print(f"({kind} {path}: {media.num_tokens} visual tokens, encoded in {session.encode_s:.1f}s)")
    if verbose:
        print(f"[encode] SigLIP {media.visual_tokens['siglip']}, Hiera {media.visual_tokens['hiera']} tokens; "
              f"towers + prefix prefill {session.encode_s:.2f}s", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- demo
def run_demo(args) -> int:
    from vica2.tools.demo import build_demo_checkpoint

    created = args.workdir is None  # a folder of our own is removed at the end; a --workdir is the user's
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vica2-demo-"))
    try:
        print(f"vica2 demo: working in {workdir}" + (" (removed at the end; --workdir DIR keeps the files)"
                                                      if created else ""))
        demo = build_demo_checkpoint(workdir, report=print)
        print(f"4. asking the converted model about it ({args.frames} frames; answers are random: the weights are):")
        model, processor = load_model_and_processor(str(demo.hub), "float32", "cpu")
        question = "How many chairs are in the room?"
        answer = ask(model, processor, question, video=str(demo.video), frames=args.frames,
                     max_new_tokens=args.max_new_tokens)[0]
        print(f"   answer: {answer.text!r}")
        print_answer(answer, verbose=True, streamed=True)
        command = (f"vica2 ask --model {demo.hub} --video {demo.video} --frames {args.frames} --max-new-tokens "
                   f"{args.max_new_tokens} --question \"{question}\" --verbose")
        if created:
            print(f"Run it yourself: vica2 demo --workdir DIR --frames {args.frames} keeps the files, then: "
                  + command.replace(str(workdir), "DIR"))
        else:
            print(f"Run it yourself: {command}")
    finally:
        if created:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


# ---------------------------------------------------------------------------------------------------- main
def _model_options() -> argparse.ArgumentParser:
    options = add_model_options(argparse.ArgumentParser(add_help=False), model_required=True,
                                debug_default=argparse.SUPPRESS)  # `vica2 --debug ask ...` keeps the main value
    options.add_argument("--frames", type=int, help="frames to sample (default: the model's frame budget, 64)")
    options.add_argument("--hiera-frames", dest="hiera_frames", type=int, help="N_hiera at the frame budget")
    options.add_argument("--video-frames-budget", dest="video_frames_budget", type=int)
    options.add_argument("--siglip-pool-stride", dest="siglip_pool_stride", type=int)
    options.add_argument("--hiera-pool-stride", dest="hiera_pool_stride", type=int)
    options.add_argument("--no-time-instruction", action="store_true",
                         help="leave out the release's time instruction after the video")
    options.add_argument("--fast-decode", action="store_true", help="resize while decoding (faster, not exact)")
    quant = options.add_mutually_exclusive_group()
    quant.add_argument("--load-in-4bit", action="store_true", help="quantize the language model to 4-bit (nf4)")
    quant.add_argument("--load-in-8bit", action="store_true", help="quantize the language model to 8-bit")
    options.add_argument("--max-new-tokens", type=int, default=64)
    options.add_argument("--verbose", action="store_true", help="token counts per stream and timings")
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vica2", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    model_options = _model_options()

    ask_parser = commands.add_parser("ask", parents=[model_options],
                                     help="answer questions about a video or an image")
    media = ask_parser.add_mutually_exclusive_group(required=True)
    media.add_argument("--video", help="video file (any format PyAV reads)")
    media.add_argument("--image", help="image file")
    ask_parser.add_argument("--question", required=True, action="append",
                            help="repeat to ask several: all are answered from one encoding of the video")
    ask_parser.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    ask_parser.set_defaults(run=run_ask)

    chat_parser = commands.add_parser("chat", parents=[model_options],
                                      help="a conversation about a video or an image (read from stdin)")
    media = chat_parser.add_mutually_exclusive_group()
    media.add_argument("--video", help="video file to talk about (or /video PATH later)")
    media.add_argument("--image", help="image file to talk about (or /image PATH later)")
    chat_parser.set_defaults(run=run_chat, max_new_tokens=256)

    demo_parser = commands.add_parser("demo", help="the whole path offline on a tiny random model")
    demo_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    demo_parser.add_argument("--workdir", help="where to write the demo files, kept (default: a temporary folder, "
                                               "removed at the end)")
    demo_parser.add_argument("--frames", type=int, default=16)
    demo_parser.add_argument("--max-new-tokens", type=int, default=8)
    demo_parser.set_defaults(run=run_demo)

    commands.add_parser("convert", help="convert a release checkpoint (see convert_checkpoint.py)", add_help=False)
    commands.add_parser("eval-vsibench", help="evaluate on VSI-Bench (see tools/evaluate_vsibench.py)", add_help=False)
    commands.add_parser("app", help="a web demo: chat about a video in the browser (see app.py)", add_help=False)
    return parser


# Commands with parsers of their own: the module whose `main(argv)` runs each, imported only when it is chosen.
DELEGATED = {"convert": "vica2.convert_checkpoint", "eval-vsibench": "vica2.tools.evaluate_vsibench",
             "app": "vica2.app"}


def _delegated(argv: list[str]) -> int | None:
    """`convert`, `eval-vsibench` and `app`; a --debug before the command goes along to them."""
    debug = argv[:1] == ["--debug"]
    command, rest = (argv[1:2], argv[2:]) if debug else (argv[:1], argv[1:])
    if not command or command[0] not in DELEGATED:
        return None
    main = importlib.import_module(DELEGATED[command[0]]).main
    if command == ["convert"]:  # the converter prints its own one-line errors; `prog` makes its usage say so
        return main([arg for arg in rest if arg != "--debug"], prog="vica2 convert")
    return main(rest + (["--debug"] if debug and "--debug" not in rest else []))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    delegated = _delegated(argv)
    if delegated is not None:
        return delegated
    args = build_parser().parse_args(argv)
    return guarded(f"vica2 {args.command}", lambda: args.run(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
