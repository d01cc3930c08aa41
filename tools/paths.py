# Copyright 2026 The vica2-hf authors. Licensed under the Apache License, Version 2.0.
"""The one rule for media paths that come from data files (fine-tuning records, VSI-Bench questions).

A data file names its media relative to a root the user chose (`--media_root`, `--video-root`); a name that is
absolute, starts with `~`, or climbs out with `..` would read a file from elsewhere on the machine, so it is refused
by both. Library-side: the fine-tuning data and the evaluator import it; it imports nothing of the project.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath


def escaping_reason(name) -> str | None:
    """Why the media path `name` (as written in a data file) would leave its root, or None when it stays inside."""
    text = str(name)
    if not text or "\0" in text:
        return "an empty name or one holding a NUL byte"
    if text.startswith("~"):
        return "it starts with '~' (a home folder)"
    if PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute() or PureWindowsPath(text).drive:
        return "it is an absolute path"
    if ".." in PurePosixPath(text.replace("\\", "/")).parts:
        return "it climbs out with '..'"
    return None


def media_path(root, name) -> Path:
    """`root / name` for a media path `name` from a data file; `ValueError` naming the rule when it would leave
    `root`."""
    reason = escaping_reason(name)
    if reason is not None:
        raise ValueError(f"media path {str(name)!r} is refused: {reason}; media are read from inside {str(root)!r} "
                         "only (give paths relative to it).")
    return Path(root) / str(name)
