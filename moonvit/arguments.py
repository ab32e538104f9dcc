"""What the command line and the benchmarks' command lines share: argparse with one-line errors, the
argument types, and the dtype names. Both import it; neither imports the other for it."""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEBUG_ENV = "FUSED_MOONVIT_DEBUG"


class UsageError(Exception):
    """A mistake in the command's arguments, reported as one line with exit status 2."""


def debug_requested() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `PROG: error: MESSAGE`, with exit status 2 (the usage is in
    --help). Every parser takes --debug, which shows tracebacks instead."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help=f"show tracebacks instead of one-line errors (or set {DEBUG_ENV}=1)")

    def error(self, message: str):
        if debug_requested():
            raise UsageError(f"{self.prog}: {message}")
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def cannot_write_into(directory: str, make_dir: bool = False) -> str | None:
    """Why nothing can be created in `directory` (an existing one), or None. Tried by creating, then
    removing, a file there (a folder with `make_dir`): permission bits say nothing for root, nor about
    file systems such as /proc that refuse new files whatever the bits."""
    try:
        if make_dir:
            os.rmdir(tempfile.mkdtemp(prefix=".fused-moonvit-probe-", dir=directory))
        else:
            with tempfile.NamedTemporaryFile(prefix=".fused-moonvit-probe-", dir=directory):
                pass
    except OSError as err:
        return err.strerror or str(err)
    return None


def output_dir(text: str) -> str:
    """argparse type: a directory that exists or can be created, and can be written into."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    existing = os.path.abspath(text)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise argparse.ArgumentTypeError(f"cannot create {text}: {existing} is a file")
    why = cannot_write_into(existing, make_dir=existing != os.path.abspath(text))
    if why:
        raise argparse.ArgumentTypeError(f"cannot write into {existing} ({why})")
    return text
