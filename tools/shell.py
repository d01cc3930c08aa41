# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""The one shell every front-end wears (`vica2 ask/chat/demo`, `vica2 eval-vsibench`, `vica2 app`, finetune.py).

- `add_model_options` declares the options they share (the model, `--dtype`, `--device`, `--attn-implementation`,
  `--trust-remote-code`, `--debug`) once, in the front-end's flag style (`--model` or finetune's
  `--model_name_or_path`, `--attn_implementation`).
- `guarded` runs a command: a library error the user can fix becomes one line `PROG: error: ...` and exit code 2
  (`--debug` shows the traceback above it, same exit code), Ctrl-C exits 130, a closed stdout ends quietly.
- `flag_message` is where API wording becomes flag wording: library errors name the API argument
  (`UsageError("model_path 'x': no such folder", argument="model_path")`); a front-end shows the flag that sets it.

A shared helper, not a front-end: it imports the inference API only.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from typing import Callable

from transformers.hf_argparser import string_to_bool

from vica2.tools.inference import DTYPE_NAMES, UsageError


EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# What a user can fix: a missing file, a bad setting, a corrupt video, a missing optional package.
USER_ERRORS = (UsageError, FileNotFoundError, ValueError, OSError, ImportError)
# API argument -> the flag that sets it in the `vica2` commands, the evaluator and the app.
FLAGS = {"model_path": "--model", "device": "--device", "dtype": "--dtype", "video": "--video", "image": "--image",
         "attn_implementation": "--attn-implementation", "question": "--question",
         "max_question_chars": "--max-question-chars"}
TRUST_REMOTE_CODE_HELP = ("run the Python code that comes with the model folder / repo instead of the installed vica2 "
                          "classes (only for a source you trust)")


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: give 1 or more")
    return value


def add_model_options(parser: argparse.ArgumentParser, *, model_flag: str = "--model", model_required: bool = False,
                      model_default=None, dtype_default: str = "auto", device: bool = True, separator: str = "-",
                      debug_default=False) -> argparse.ArgumentParser:
    """Add the shared options to `parser`. `separator` "_" gives HfArgumentParser's style (`--attn_implementation`,
    `--trust_remote_code True`); the Namespace keys are the same either way. `debug_default=argparse.SUPPRESS` lets
    a subcommand leave the main parser's `--debug` alone. Returns `parser`."""

    def flag(name: str) -> str:
        return "--" + name.replace("_", separator)

    parser.add_argument(model_flag, dest="model", required=model_required, default=model_default,
                        help="converted ViCA2 folder or hub repo id")
    parser.add_argument(flag("dtype"), dest="dtype", default=dtype_default, choices=DTYPE_NAMES,
                        help=f"weights dtype at load (default {dtype_default})")
    if device:
        parser.add_argument(flag("device"), dest="device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument(flag("attn_implementation"), dest="attn_implementation",
                        help="eager, sdpa (default), flash_attention_2, vica2_fused, ...")
    if separator == "_":  # HfArgumentParser's boolean style: `--trust_remote_code True`
        parser.add_argument(flag("trust_remote_code"), dest="trust_remote_code", type=string_to_bool, nargs="?",
                            const=True, default=False, help=TRUST_REMOTE_CODE_HELP)
    else:
        parser.add_argument(flag("trust_remote_code"), dest="trust_remote_code", action="store_true",
                            help=TRUST_REMOTE_CODE_HELP)
        parser.add_argument("--debug", action="store_true", default=debug_default, help="show tracebacks")
    return parser


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def flag_message(error: BaseException, flags: dict[str, str] = FLAGS) -> str:
    """`error` as one line in flag wording: the API argument it starts with (its `argument`) becomes the flag, and
    a suggested `name='value'` becomes `--flag value`."""
    message = one_line(error)
    argument = getattr(error, "argument", None)
    if argument in flags and message.startswith(argument):
        message = flags[argument] + message[len(argument):]
    for name, flag in flags.items():
        message = re.sub(rf"\b{name}='([^' ]*)'", rf"{flag} \1", message)
    return message


def guarded(prog: str, run: Callable[[], object], *, debug: bool, flags: dict[str, str] = FLAGS,
            interrupted: str | None = None):
    """`run()`'s result, or for the user's errors a line on stderr and exit code 2 (`debug`: the traceback too, with
    the same exit code). A closed stdout (`| head`) ends the command quietly, exit code 0."""
    try:
        result = run()
        sys.stdout.flush()  # here, where a closed output is handled, not at exit
        return result
    except KeyboardInterrupt:
        if interrupted:
            print(interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # nobody reads the output any more: stop, and let no flush at exit fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"{prog}: the output was closed; stopped.", file=sys.stderr)
        return 0
    except USER_ERRORS as error:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {flag_message(error, flags)}", file=sys.stderr)
        return EXIT_USAGE
