# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""`vica2`: ask ViCA2 about a video or an image from the command line.

    vica2 ask --model DIR_OR_REPO --video room.mp4 --question "How many chairs are in the room?"
    vica2 ask --model M --video room.mp4 --question "How many chairs?" --question "Where is the lamp?"
    vica2 chat --model M --video room.mp4          # a conversation; the video is encoded once
    vica2 demo                      # the whole path offline: the built-in tiny model (a toy) on a held-out clip
    vica2 convert --input-dir RAW --output-dir OUT ...   # = python convert_checkpoint.py
    vica2 eval-vsibench --model M --data test.parquet --video-root DIR ...   # = python -m vica2.tools.evaluate_vsibench
    vica2 app --model DIR_OR_REPO   # a web demo in the browser (= python app.py; needs the `app` extra)
    vica2 serve DIR_OR_REPO --trust-remote-code [vLLM options]   # vLLM's OpenAI server, set up for ViCA2

Errors a user can fix (a missing file, a corrupt video, a bad setting) are printed as one line, exit code 2;
`--debug` (before or after the command) shows the traceback above it, with the same exit code. The model's own
classes are used; no code that comes with a model folder or hub repo runs unless `--trust-remote-code` is given.
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
    DEFAULT_MAX_QUESTION_CHARS,
    UsageError,
    ask,
    check_device,
    check_model_path,
    check_question,
    load_model_and_processor,
)
from vica2.tools.shell import USER_ERRORS, add_model_options, flag_message, guarded, one_line, positive_int


# ---------------------------------------------------------------------------------------------------- shared
MAX_IMAGE_DOWNLOAD_BYTES = 64 << 20
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".heic", ".avif"}
VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".wmv", ".mpg", ".mpeg", ".ts", ".3gp"}
URL_PREFIXES = ("http://", "https://")


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _load(args):
    start = time.perf_counter()
    # A folder that does not load (truncated weights, sizes that do not fit, bad JSON) is the library's UsageError.
    model, processor = load_model_and_processor(
        args.model, args.dtype, args.device, load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit,
        attn_implementation=args.attn_implementation, trust_remote_code=args.trust_remote_code)
    if args.verbose:
        print(f"[load] {args.model} in {time.perf_counter() - start:.1f}s ({model.dtype}, {model.device})",
              file=sys.stderr)
    return model, processor


def _check_before_loading(args, questions=()) -> dict:
    """What can be checked without the model (questions, media, device, model path), before the slow load.
    Returns the media as `ask` takes it ({"video": path} or {"image": path or a fetched PIL image}), or {}."""
    for question in questions:
        check_question(question, args.max_question_chars)
    media = {kind: resolve_media(kind, getattr(args, kind), args.allow_remote_media)
             for kind in ("video", "image") if getattr(args, kind, None) is not None}
    check_device(args.device)
    check_model_path(args.model)
    return media


def resolve_media(kind: str, value: str, allow_remote: bool):
    """`value` of --video / --image checked in the command's terms: a local file of the right kind (an image given
    as --video points to --image and back), or with `allow_remote` an image URL, fetched now."""
    flag = f"--{kind}"
    if value.startswith(URL_PREFIXES):
        if kind == "image" and allow_remote:
            return _fetch_image(value)
        fix = "add --allow-remote-media to fetch it" if kind == "image" else "download the video and give the file"
        raise UsageError(f"{flag} {value!r} is a URL; {fix}.")
    if not Path(value).is_file():
        raise UsageError(f"{flag} {value!r}: no such file.")
    suffix, problem = Path(value).suffix.lower(), _image_problem(value)
    if kind == "video" and (suffix in IMAGE_SUFFIXES or problem is None and suffix != ".gif"):  # a GIF may be either
        raise UsageError(f"--video {value!r} is an image: use --image {value}")
    if kind == "image" and suffix in VIDEO_SUFFIXES:
        raise UsageError(f"--image {value!r} is a video: use --video {value}")
    if kind == "image" and problem:
        raise UsageError(f"--image {value!r}: {problem}")
    return value


def _image_problem(source) -> str | None:
    """Why PIL cannot read `source` (a path or a file object) as an image, from its header alone; None if it can."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source):
            return None
    except Image.DecompressionBombError as error:
        return f"refused, too many pixels to decode ({error})"
    except UnidentifiedImageError:
        return "not an image PIL can read (a video goes to --video)"
    except (OSError, ValueError, SyntaxError) as error:  # PIL reports some corrupt headers as SyntaxError
        return f"not a readable image ({type(error).__name__}: {one_line(error)})"


def _fetch_image(url: str):
    """An image URL, downloaded (at most MAX_IMAGE_DOWNLOAD_BYTES, 30 s between bytes) and decoded."""
    import io

    import httpx
    from PIL import Image

    data = bytearray()
    try:
        with httpx.stream("GET", url, timeout=30, follow_redirects=True) as response:
            if response.status_code >= 400:
                raise UsageError(f"--image {url!r}: the server answered HTTP {response.status_code} "
                                 f"{response.reason_phrase}.")
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > MAX_IMAGE_DOWNLOAD_BYTES:
                    raise UsageError(f"--image {url!r}: over {MAX_IMAGE_DOWNLOAD_BYTES >> 20} MB; refused.")
    except httpx.HTTPError as error:
        raise UsageError(f"--image {url!r}: could not fetch it ({type(error).__name__}: {one_line(error)}).") from None
    problem = _image_problem(io.BytesIO(data))
    if problem:
        raise UsageError(f"--image {url!r}: {problem}")
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def _overrides(args) -> dict:
    """The token-ratio flags, for the processor (the inference API hands them to it, never to the model)."""
    return {name: getattr(args, name) for name in TOKEN_RATIO_ARGS}


def print_answer(answer: Answer, verbose: bool, streamed: bool, shared_prefix: bool = False) -> None:
    """`answer` (unless it was streamed) and, `verbose`, its token counts and timings. `shared_prefix`: its cached
    tokens were encoded once for several questions (for one question they are its own prompt: nothing to report)."""
    if not streamed:
        print(answer.text)
    if verbose:
        t = answer.timings
        cached = (f"; {answer.cached_tokens} prompt tokens shared with the other questions (encoded once)"
                  if shared_prefix else "")
        print(f"[tokens] prompt {answer.prompt_tokens} (SigLIP {answer.visual_tokens['siglip']}, Hiera "
              f"{answer.visual_tokens['hiera']}), generated {answer.new_tokens}{cached}", file=sys.stderr)
        print(f"[time] preprocessing {t['preprocess_s']:.2f}s, time to first token {t['time_to_first_token_s']:.2f}s,"
              f" decode {t['decode_tokens_per_s']:.1f} tokens/s", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- ask
def run_ask(args) -> int:
    media = _check_before_loading(args, args.question)
    model, processor = _load(args)
    several = len(args.question) > 1
    labels = iter(args.question)
    stream = (lambda: print(f"Q: {next(labels)}\nA: ", end="", flush=True)) if args.stream and several else None
    answers = ask(model, processor, args.question, **media, frames=args.frames, max_new_tokens=args.max_new_tokens,
                  stream=args.stream, fast_decode=args.fast_decode, on_answer_start=stream,
                  add_time_instruction=False if args.no_time_instruction else None, **_overrides(args))
    for question, answer in zip(args.question, answers):
        if several and not args.stream:  # one question stays a bare answer: scripts read it as it is
            print(f"Q: {question}\nA: ", end="")
        print_answer(answer, args.verbose, args.stream, shared_prefix=several)
    if args.verbose and several:
        print(f"[reuse] {len(answers)} questions from one encoded prefix: the towers ran once, "
              f"{plural(len(answers) - 1, 'prefill')} saved", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------- chat
CHAT_HELP = "Commands: /video PATH, /image PATH (a new conversation about it), /reset (forget the conversation), /quit"


def run_chat(args) -> int:
    if sys.stdin is None:  # started with stdin closed (`<&-`): nothing could ever be asked
        raise UsageError("standard input is closed: pipe the questions in, or run vica2 chat in a terminal.")
    media = _check_before_loading(args)
    model, processor = _load(args)
    session = ChatSession(model, processor, num_frames=args.frames, fast_decode=args.fast_decode,
                          add_time_instruction=False if args.no_time_instruction else None,
                          max_new_tokens=args.max_new_tokens, max_question_chars=args.max_question_chars,
                          **_overrides(args))
    for kind, value in media.items():
        _set_media(session, kind, value, getattr(args, kind), args.verbose)
    interactive = sys.stdin.isatty()
    if interactive:
        print(CHAT_HELP)
    for line in input_lines(sys.stdin.buffer, args.max_question_chars, prompt="you> " if interactive else None):
        try:
            if isinstance(line, UsageError):  # a line that could not be read: say so, then read the next one
                raise line
            if line.strip() and not _chat_command(session, line.strip(), args):
                return 0
        except BrokenPipeError:  # the output is gone: nobody reads the answers (the shell ends cleanly)
            raise
        except USER_ERRORS as error:  # one bad turn (a missing file) does not end the conversation
            if args.debug:
                raise
            print(f"vica2 chat: error: {flag_message(error)}", file=sys.stderr)
    return 0


def input_lines(stream, max_chars: int, prompt: str | None = None):
    """Lines of `stream` (bytes) as text, each read with bounded memory; a line that is not UTF-8 or is longer
    than `max_chars` characters comes as a `UsageError` instead (the rest of a too-long line is skipped)."""
    limit = 4 * max_chars + 2  # bytes: UTF-8 spends at most 4 a character, and the line may end in \r\n
    while True:
        if prompt:
            print(prompt, end="", flush=True)
        try:
            raw = stream.readline(limit)
        except OSError as error:  # stdin is a folder, a closed descriptor ...: nothing more can be read
            raise UsageError(f"cannot read standard input ({one_line(error)}).") from None
        if not raw:  # end of input
            return
        if len(raw) == limit and not raw.endswith(b"\n"):
            while (rest := stream.readline(1 << 16)) and not rest.endswith(b"\n"):
                pass
            yield UsageError(f"the line is over {limit:,} bytes, longer than --max-question-chars {max_chars:,}; "
                             "not asked.")
            continue
        try:
            text = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as error:
            yield UsageError(f"the line is not UTF-8 text (byte {error.start + 1} of it); not asked.")
            continue
        if len(text) > max_chars:
            yield UsageError(f"the line is {len(text):,} characters, longer than --max-question-chars {max_chars:,}; "
                             "not asked.")
            continue
        yield text


def _chat_command(session: ChatSession, line: str, args) -> bool:
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
        kind, source = command[1:], rest.strip()
        _set_media(session, kind, resolve_media(kind, source, args.allow_remote_media), source, args.verbose)
    elif command.startswith("/"):
        raise UsageError(f"unknown command {command!r}. {CHAT_HELP}")
    else:
        answer = session.ask(line, stream=True)
        print()
        print_answer(answer, args.verbose, streamed=True)
        if args.verbose:
            stats = session.stats
            print(f"[session] towers ran {stats.tower_runs}x; {plural(stats.turns, 'turn')}, "
                  f"{stats.prefill_tokens} tokens prefilled, {stats.cached_tokens} read from the conversation's "
                  "cache", file=sys.stderr)
    return True


def _set_media(session: ChatSession, kind: str, value, source: str, verbose: bool) -> None:
    """Start a conversation about `value` (a path, or an image fetched from the URL `source`)."""
    media = session.set_video(value) if kind == "video" else session.set_image(value)
    print(f"({kind} {source}: {media.num_tokens} visual tokens, encoded in {session.encode_s:.1f}s)")
    if verbose:
        print(f"[encode] SigLIP {media.visual_tokens['siglip']}, Hiera {media.visual_tokens['hiera']} tokens; "
              f"towers + prefix prefill {session.encode_s:.2f}s", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- demo
DEMO_MARKER = ".vica2-demo"  # in a --workdir the demo made (or found empty): it may write there again


def demo_workdir(workdir: str) -> Path:
    """`workdir` made ready for the demo's files, never at the cost of the user's: a new folder or an empty one is
    claimed with DEMO_MARKER; one holding that marker is the demo's own; anything else is refused."""
    path = Path(workdir).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--workdir {workdir!r} is a file; give a new or empty folder.")
    if path.is_dir() and not (path / DEMO_MARKER).is_file() and any(path.iterdir()):
        raise UsageError(f"--workdir {workdir!r} already holds files that are not the demo's; give a new or empty "
                         "folder (the demo never writes over your files).")
    path.mkdir(parents=True, exist_ok=True)
    (path / DEMO_MARKER).write_text("written by `vica2 demo`: it may replace the files in this folder\n")
    return path


def run_demo(args) -> int:
    import shlex

    from vica2.tools.tiny_model import TOY_NOTICE, demo_samples, servable_copy

    created = args.workdir is None  # a folder of our own is removed at the end; a --workdir is kept
    workdir = Path(tempfile.mkdtemp(prefix="vica2-demo-")) if created else demo_workdir(args.workdir)
    try:
        print(f"vica2 demo: working in {workdir}" + (" (removed at the end; --workdir DIR keeps the files)"
                                                      if created else ""))
        print(f"The model is {TOY_NOTICE}")
        sample = demo_samples()[0]  # a counting question
        hub = workdir / "hub"
        if hub.exists():  # a --workdir of the demo's own, used before
            shutil.rmtree(hub)
        servable_copy(hub)
        print(f"1. the trained tiny ViCA2, with its remote code: {hub} (vLLM serves it: `vica2 serve {hub} "
              "--trust-remote-code`)")
        video = Path(shutil.copyfile(sample["video"], workdir / "clip.mp4"))
        print(f"2. a held-out clip it never saw in training: {video}")
        print(f"3. asking: {sample['question']}")
        model, processor = load_model_and_processor(str(hub), "float32", "cpu")
        answer = ask(model, processor, sample["prompt"], video=str(video), frames=args.frames,
                     max_new_tokens=args.max_new_tokens)[0]
        verdict = "right" if answer.text.strip() == sample["answer"] else "wrong"
        print(f"   answer: {answer.text.strip()!r} (the right answer is {sample['answer']!r}: {verdict})")
        print_answer(answer, verbose=True, streamed=True)
        frames = f" --frames {args.frames}" if args.frames else ""
        command = (f"vica2 ask --model {hub} --video {video}{frames} --max-new-tokens {args.max_new_tokens} "
                   f"--question {shlex.quote(sample['prompt'])} --verbose")
        if created:
            print("Run it yourself: vica2 demo --workdir DIR keeps the files, then: "
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
    options.add_argument("--frames", type=positive_int,
                         help="frames to sample from a video (default: the model's frame budget, 64 for ViCA2-7B)")
    ratio = options.add_argument_group("token ratio (default: the model's own settings)")
    ratio.add_argument("--hiera-frames", dest="hiera_frames", type=positive_int,
                       help="frames the Hiera tower sees at the frame budget (N_hiera, 32 for ViCA2-7B)")
    ratio.add_argument("--video-frames-budget", dest="video_frames_budget", type=positive_int,
                       help="the frame count the token ratio is defined at (64 for ViCA2-7B)")
    ratio.add_argument("--siglip-pool-stride", dest="siglip_pool_stride", type=positive_int,
                       help="spatial pooling of SigLIP's tokens per frame (2 for ViCA2-7B; 1 keeps all)")
    ratio.add_argument("--hiera-pool-stride", dest="hiera_pool_stride", type=positive_int,
                       help="spatial pooling of Hiera's tokens per frame (2 for ViCA2-7B; 1 keeps all)")
    options.add_argument("--no-time-instruction", action="store_true",
                         help="leave out the release's time instruction after the video")
    options.add_argument("--fast-decode", action="store_true", help="resize while decoding (faster, not exact)")
    quant = options.add_mutually_exclusive_group()
    quant.add_argument("--load-in-4bit", action="store_true", help="quantize the language model to 4-bit (nf4)")
    quant.add_argument("--load-in-8bit", action="store_true", help="quantize the language model to 8-bit")
    options.add_argument("--max-new-tokens", type=positive_int, default=64,
                         help="most tokens an answer may have (default: 64 for ask, 256 for chat)")
    options.add_argument("--max-question-chars", type=positive_int, default=DEFAULT_MAX_QUESTION_CHARS,
                         help=f"longest question accepted, in characters (default {DEFAULT_MAX_QUESTION_CHARS:,}); a longer "
                              "one is refused with one line")
    options.add_argument("--allow-remote-media", action="store_true",
                         help="fetch an --image given as an http(s) URL (default: local files only)")
    options.add_argument("--verbose", action="store_true", help="token counts per stream and timings, on stderr")
    return options


ASK_DESCRIPTION = """Answer questions about one video or image and exit. One --question prints its answer alone (for
scripts); several print each as "Q: question" and "A: answer", all answered from one encoding of the media."""
CHAT_DESCRIPTION = f"""A conversation about a video or an image: one question per input line (a terminal or a pipe),
each answered with the conversation so far; the media is encoded once. {CHAT_HELP}."""
DEMO_DESCRIPTION = """The whole path offline, nothing downloaded: the built-in tiny ViCA2 (a toy trained on synthetic
clips of coloured shapes, not ViCA2-7B) answers a question about a held-out clip."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vica2", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    model_options = _model_options()

    ask_parser = commands.add_parser("ask", parents=[model_options], description=ASK_DESCRIPTION,
                                     help="answer questions about a video or an image")
    media = ask_parser.add_mutually_exclusive_group(required=True)
    media.add_argument("--video", help="video file (any format PyAV reads)")
    media.add_argument("--image", help="image file (or an http(s) URL with --allow-remote-media)")
    ask_parser.add_argument("--question", required=True, action="append",
                            help="repeat to ask several: all are answered from one encoding of the video, each "
                                 "printed after its question")
    ask_parser.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    ask_parser.set_defaults(run=run_ask)

    chat_parser = commands.add_parser("chat", parents=[model_options], description=CHAT_DESCRIPTION,
                                      help="a conversation about a video or an image (read from stdin)")
    media = chat_parser.add_mutually_exclusive_group()
    media.add_argument("--video", help="video file to talk about (or /video PATH later)")
    media.add_argument("--image", help="image file to talk about (or /image PATH later)")
    chat_parser.set_defaults(run=run_chat, max_new_tokens=256)

    demo_parser = commands.add_parser("demo", description=DEMO_DESCRIPTION,
                                      help="the whole path offline on the built-in tiny model")
    demo_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    demo_parser.add_argument("--workdir", help="a new or empty folder to keep the demo's files in (default: a "
                                               "temporary folder, removed at the end); a folder holding other files "
                                               "is refused")
    demo_parser.add_argument("--frames", type=positive_int, default=None,
                             help="frames to sample from the clip (default: the model's frame budget)")
    demo_parser.add_argument("--max-new-tokens", type=positive_int, default=8,
                             help="tokens in the demo's answer (default 8)")
    demo_parser.set_defaults(run=run_demo)

    commands.add_parser("convert", help="convert a release checkpoint (see convert_checkpoint.py)", add_help=False)
    commands.add_parser("eval-vsibench", help="evaluate on VSI-Bench (see tools/evaluate_vsibench.py)", add_help=False)
    commands.add_parser("app", help="a web demo: chat about a video in the browser (see app.py)", add_help=False)
    commands.add_parser("serve", help="vLLM's OpenAI-compatible server for a ViCA2 folder (see tools/serve.py)",
                        add_help=False)
    return parser


# Commands with parsers of their own: the module whose `main(argv)` runs each, imported only when it is chosen.
DELEGATED = {"convert": "vica2.convert_checkpoint", "eval-vsibench": "vica2.tools.evaluate_vsibench",
             "app": "vica2.app", "serve": "vica2.tools.serve"}


def _delegated(argv: list[str]) -> int | None:
    """`convert`, `eval-vsibench`, `app` and `serve`; a --debug before the command goes along to them."""
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
