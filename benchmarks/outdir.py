"""Where a benchmark writes: `--out DIR`, by default `benchmarks/results` for a measured run and a new
temporary directory for `--smoke`. A smoke run's figures mean nothing, so it never writes into the
committed results folder, even when that folder is named: run from the repository root, a smoke run
with the measured run's default would overwrite the committed GPU results."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from fused_moonvit.moonvit.arguments import output_dir

RESULTS = "benchmarks/results"
# The committed folder as installed (an editable install points into the repository) and as seen from
# the repository root, whichever the command runs in.
_COMMITTED = (os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), RESULTS)


def add_out_argument(parser: argparse.ArgumentParser, files: str, smoke: bool = True) -> None:
    where = (f"default: {RESULTS}; with --smoke a new temporary directory, never {RESULTS}" if smoke
             else f"default: {RESULTS}")
    parser.add_argument("--out", type=output_dir, metavar="DIR", help=f"directory for {files} ({where})")


def is_committed_results(path: str) -> bool:
    return any(os.path.realpath(path) == os.path.realpath(c) for c in _COMMITTED)


def check_out(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuses, before any work, a smoke run told to write into the committed results."""
    if getattr(args, "smoke", False) and args.out is not None and is_committed_results(args.out):
        parser.error(f"--out {args.out} is the committed results folder, which a --smoke run (its figures "
                     f"mean nothing) never writes into; leave --out out for a temporary directory, or give another")


def parse_benchmark_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The arguments of a benchmark with --smoke and --out, and the argv they came from (for the command a
    result file records): --out checked, and a run without --smoke refused where there is no CUDA device."""
    import torch

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    check_out(args, parser)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA device; --smoke checks the script on the CPU")
    return args, argv


def out_dir(args: argparse.Namespace) -> str:
    """The directory to write into, created if need be, as an absolute path for the closing 'wrote' line."""
    if args.out is not None:
        path = args.out
    elif getattr(args, "smoke", False):
        return tempfile.mkdtemp(prefix="fused-moonvit-smoke-")
    else:
        path = RESULTS
    os.makedirs(path, exist_ok=True)
    return os.path.abspath(path)
