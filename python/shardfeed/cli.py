"""The shardfeed command line (also python -m shardfeed): write, convert, inspect, check and
benchmark datasets of binary shards that training reads at random, larger than RAM.

Exit status: 0 success, 1 a data error, 2 a usage error; a closed output pipe (shardfeed info DS
--shards | head -1) ends the command quietly with 141, as it does standard tools."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import List, Optional

from . import __version__
from . import dataset as _dataset
from ._cli_text import in_option_terms, plain, printable
from ._demo import human_bytes as _human_bytes
from .errors import ShardfeedError

# A command whose reader closed the pipe ends as if SIGPIPE had killed it (what the shell reports
# for `yes | head -1`'s yes), without a message.
CLOSED_PIPE_STATUS = 128 + int(getattr(signal, "SIGPIPE", 13))


def _demo(args: argparse.Namespace) -> int:
    """Writes a synthetic image dataset in a temporary directory and trains a small Keras model on
    it from the shards, with a validation split, printing per-epoch samples/s and peak memory next
    to the dataset's size (needs the tensorflow extra; --read-only reads random batches instead)."""
    from . import _demo as demo

    return demo.run(args)


def _info(args: argparse.Namespace) -> int:
    with _dataset.open(args.path) as ds:
        manifest = ds._manifest
        if args.json:
            print(json.dumps(manifest.to_json(), indent=1))
            return 0
        print(f"{printable(ds.path)}: {len(ds)} samples in {ds.num_shards} shard(s), "
              f"{_human_bytes(sum(s.size + s.heap_size for s in manifest.shards))}")
        sizes = [s.size + s.heap_size for s in manifest.shards]
        if sizes:
            print(f"shards: {len(sizes)}, {_human_bytes(min(sizes))} to {_human_bytes(max(sizes))} each")
        if args.shards:
            for shard in manifest.shards:
                heap = f" + {printable(shard.heap_file)} {_human_bytes(shard.heap_size)}" if shard.heap_file else ""
                print(f"  {printable(shard.file)}: {shard.num_samples} samples, {_human_bytes(shard.size)}{heap}")
        print(f"record: {ds.schema.record_bytes} bytes")
        for field in ds.fields.values():
            shape = ", ".join("*" if d is None else str(d) for d in field.shape)
            print(f"  {printable(field.name)}: {field.dtype}[{shape}]")
        if ds.metadata:  # json.dumps escapes control characters; printable() the rest (U+202E...)
            print(f"metadata: {printable(json.dumps(ds.metadata)[:2000])}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    """Checks every shard's checksum, size, header and records; exit status 0 when the dataset is
    intact, 1 when something is bad (listed with the shards and samples it affects)."""
    from .verification import verify

    report = verify(args.path)
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        print(printable(in_option_terms(str(report)), keep_newlines=True))
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardfeed", description=plain(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"shardfeed {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="write a synthetic dataset and train a small Keras model from it",
                               description=plain(_demo.__doc__))
    from ._demo import add_arguments
    add_arguments(demo)
    demo.set_defaults(run=_demo)

    info = commands.add_parser("info", help="print a dataset's schema, size and metadata")
    info.add_argument("path")
    info.add_argument("--json", action="store_true", help="print the manifest as JSON")
    info.add_argument("--shards", action="store_true", help="list every shard file with its samples and size")
    info.set_defaults(run=_info)

    check = commands.add_parser("verify", help="check every shard's checksum and structure (exit status 0: "
                                "intact, 1: bad, 2: usage)", description=plain(_verify.__doc__))
    check.add_argument("path")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(run=_verify)

    from ._cli_data import add_commands  # convert, head, merge, bench
    add_commands(commands)
    return parser


def _quiet_stdout() -> None:
    """Points stdout at /dev/null, so that what is left in its buffer goes nowhere at exit instead
    of failing again (Python's "Exception ignored ... BrokenPipeError")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        code = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:  # the reader of our output has gone: stop, saying nothing
        _quiet_stdout()
        return CLOSED_PIPE_STATUS
    except (ShardfeedError, OSError) as exc:
        print(f"shardfeed {args.command}: error: {printable(in_option_terms(str(exc)))}", file=sys.stderr)
        return 1
