"""The shardfeed command line (also python -m shardfeed): write, convert, inspect, check and
benchmark datasets of binary shards that training reads at random, larger than RAM.

Exit status: 0 success, 1 a data error, 2 a usage error; a closed output pipe (shardfeed info DS
--shards | head -1) ends the command quietly with 141, as it does standard tools."""

# This module parses the arguments and dispatches to the library: convert (shardfeed.convert),
# merge, verify, info and head; bench is a module of its own (_bench.py: its options and its
# measurements), and so is the demo (_demo.py). The library's messages name Python arguments (mode='a', metadata=); the command line
# translates them into its options (--append, --metadata) in one table, _OPTION_TERMS, so that a
# message that changes wording in the library is caught by the command-line tests that look for
# the option's name.

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import __version__
from . import dataset as _dataset
from ._text import human_bytes, plain, printable
from .errors import ShardfeedError
from .format import STORED_DTYPES

# A command whose reader closed the pipe ends as if SIGPIPE had killed it (what the shell reports
# for `yes | head -1`'s yes), without a message.
CLOSED_PIPE_STATUS = 128 + int(getattr(signal, "SIGPIPE", 13))


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks."""


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def new_command(commands: Any, name: str, run: Any, help: str, description: str) -> argparse.ArgumentParser:
    """Adds sub-command ``name`` (its description keeps its line breaks): ``run(args)`` runs it,
    with ``args.parser`` its parser, for usage errors."""
    p = commands.add_parser(name, help=help, description=description, formatter_class=Formatter)
    p.set_defaults(run=run, parser=p)
    return p


def _inputs_and_output(p: argparse.ArgumentParser, inputs: str, metavar: str, help: str, output_help: str) -> None:
    """The inputs (one or more) and the ``-o/--output`` dataset of a command that writes one."""
    p.add_argument(inputs, nargs="+", metavar=metavar, help=help)
    p.add_argument("-o", "--output", required=True, metavar="OUT", help=output_help)


def say(args: argparse.Namespace, *text: Any) -> None:
    """print() unless --quiet."""
    if not args.quiet:
        print(*text)


# Python arguments -> command-line options, in the library's messages. Longest first where one
# pattern contains another.
_OPTION_TERMS: List[Tuple[str, str]] = [
    (r"use mode='a' to append", "use --append to add to it"),
    (r"create the dataset with mode='w'", "create the dataset first (without --append)"),
    (r"the next Writer\(path, mode='a'\)", "the next conversion with --append"),
    (r"with Writer\(path, mode='a'\)", "with --append"),
    (r"mode='a'", "--append"),
    (r"pass metadata=", "pass --metadata"),
    (r"as compression asks", "as --compress asks"),
    (r"in compression;", "in --compress;"),
    (r"compression names field", "--compress names field"),
    (r"pass size=\(width, height\)", "pass --size WxH"),
    (r"size=\(width, height\)", "--size WxH"),
    (r"overflow='saturate'", "--overflow saturate"),
    (r"on_error='skip'", "--on-error skip"),
    (r"name them with datasets=", "name them with --field NAME=/DATASET"),
    (r"sample_per_file=True", "--sample-per-file"),
    (r"image_mode='(\w+)'", r"--image-mode \1"),
    (r"dtypes=\{'(\w+)': '(\w+)'\}", r"--dtype \1=\2"),
    (r"chunk_bytes", "--chunk-size"),
]
_COMPILED = [(re.compile(pattern), replacement) for pattern, replacement in _OPTION_TERMS]


def in_option_terms(message: str) -> str:
    """A library message with its Python arguments replaced by the command line's options."""
    for pattern, replacement in _COMPILED:
        message = pattern.sub(replacement, message)
    return message


_SOURCE_KINDS = ("npy", "npz", "csv", "hdf5", "files")
_SUFFIX_KINDS = [((".npy",), "npy"), ((".npz",), "npz"), ((".h5", ".hdf5", ".he5", ".hdf"), "hdf5"),
                 ((".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".csv.bz2", ".csv.xz"), "csv")]
_NAMED_SOURCE = re.compile(r"([A-Za-z_][\w.-]*)=(.+)")


def _size(text: str) -> int:
    """'256M', '1G', '64k', '4096' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 4096, 64K, 256M, 1G)")
    return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2).upper() or " "))


def _part(text: str) -> Tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not int(match.group(1)) < int(match.group(2)):
        raise argparse.ArgumentTypeError(f"expected K/N with 0 <= K < N (e.g. 0/4), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def _json_object(text: str) -> Dict[str, Any]:
    try:
        if text.startswith("@"):
            with open(text[1:], encoding="utf-8") as f:
                value = json.load(f)
        else:
            value = json.loads(text)
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"not a JSON object or @file: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("metadata must be a JSON object")
    return value


# ---- convert -----------------------------------------------------------------------------------

_CONVERT_HELP = """\
Converts data into a shardfeed dataset at OUT, reading it a chunk at a time (memory stays bounded
whatever the size), and prints a report: samples, MB/s, and for fields stored in a narrower float
how many values kept full precision, became subnormal or 0, or overflowed.

Sources (the type is guessed from the first one; --from sets it):
  npy    .npy files, memory-mapped. Several files are chunks of rows, concatenated into field "x"
         (a structured array gives one field per member); NAME=FILE puts a file in field NAME:
           shardfeed convert image=images.npy label=labels.npy -o data/train
         --sample-per-file: each file is one sample (12,000 files of shape (32, 256) -> 12,000
         samples of (32, 256), not 384,000 rows):
           shardfeed convert wave='waves/*.npy' --sample-per-file -o data/waves
  npz    .npz archives; --field NAME=MEMBER picks members (default: all, named as in the archive)
  csv    one or many CSV files (a glob such as 'data/*.csv' is sorted naturally: 2 before 10);
         --field NAME=COL (scalar), NAME=COL1,COL2 or NAME='pix*' (vector); --label COL;
         --list-field NAME: cells holding lists of numbers ("607 2214 9") -> a variable-length field
           shardfeed convert 'data/*.csv' --field x='f*' --label target --dtype x=float16 -o out
           shardfeed convert 'logs/*.csv' --list-field history --dtype history=int32 -o out
  hdf5   HDF5 files (needs shardfeed[hdf5]); --field NAME=/path/to/dataset (default: all top-level)
  files  a directory with one .npy or image file per sample (images need shardfeed[images]);
         NAME=DIR names its field (default image, or x for .npy); --labels folders (class =
         first sub-folder) or --labels LIST (lines of "file label", spaces or commas; or JSON);
         --files train.txt (the index: one name per line); --split train=train.txt --split
         val=val.txt (one dataset, splits recorded in its metadata)
           shardfeed convert photos/ --labels folders --size 64x64 --files photos/train.txt -o train

OUT must be a new or empty directory (or a dataset, with --append). Values that overflow the
stored dtype are refused unless --overflow saturate. A bad CSV row or unreadable file stops the
conversion with its file and line (exit status 1) unless --on-error skip; a failed conversion
leaves no dataset behind. --workers N converts with N processes, each writing a part, then merges
the parts (no data copied); --part K/N converts only part K of N (for cluster tasks: merge the
parts with `shardfeed merge`).

Exit status: 0 success, 1 data error, 2 usage error."""


def _guess_kind(source: str) -> Optional[str]:
    name = source.lower()
    if os.path.isdir(source):
        entries = [e for e in os.listdir(source) if not e.startswith(".")]
        files = [e.lower() for e in entries if os.path.isfile(os.path.join(source, e))]
        if files and all(f.endswith(_SUFFIX_KINDS[3][0]) for f in files) and len(files) == len(entries):
            return "csv"
        return "files"
    for suffixes, kind in _SUFFIX_KINDS:
        if name.endswith(suffixes):
            return kind
    return None


def _split_named(source: str) -> Tuple[Optional[str], str]:
    match = _NAMED_SOURCE.fullmatch(source)
    if match and not os.path.exists(source):
        return match.group(1), match.group(2)
    return None, source


def _pairs(parser: argparse.ArgumentParser, items: List[str], option: str) -> Dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            parser.error(f"{option} expects NAME=VALUE, got {item!r}")
        out[name] = value
    return out


def _dtypes(parser: argparse.ArgumentParser, items: List[str]) -> Any:
    every = [d for d in items if "=" not in d]
    named = _pairs(parser, [d for d in items if "=" in d], "--dtype")
    for dtype in every + list(named.values()):
        if dtype not in STORED_DTYPES:
            parser.error(f"--dtype: unknown dtype {dtype!r}; choose from {', '.join(STORED_DTYPES)}")
    if len(every) > 1:
        parser.error("--dtype DTYPE (for every float field) given more than once")
    if every and named:
        parser.error("use either --dtype DTYPE (every float field) or --dtype NAME=DTYPE, not both")
    return named or (every[0] if every else None)


def _source_kind(args: argparse.Namespace, named: List[Tuple[Optional[str], str]]) -> str:
    """The kind of the sources (--from, or guessed from the first); a usage error for an option
    that does not apply to it."""
    parser = args.parser
    kind = args.source_kind or _guess_kind(named[0][1])
    if kind is None:
        parser.error(f"cannot tell what kind of source {named[0][1]!r} is; pass --from {{{','.join(_SOURCE_KINDS)}}}")
    if args.sample_per_file:
        if kind not in ("npy", "files"):
            parser.error(f"--sample-per-file applies to .npy files and directories of samples, not {kind}")
        if kind == "npy" and len(named) == 1 and os.path.isdir(named[0][1]):
            kind = "files"  # a directory of per-sample files, with everything --from files offers
    if any(name for name, _ in named) and kind not in ("npy", "files"):
        parser.error("NAME=FILE sources are for .npy files and directories of samples; use --field for other sources")
    if args.list_field and kind != "csv":
        parser.error(f"--list-field applies to csv sources, not {kind}")
    if args.size is not None:
        match = re.fullmatch(r"(\d+)[xX](\d+)", args.size)
        if not match or min(int(match.group(1)), int(match.group(2))) < 1:
            parser.error(f"--size expects WIDTHxHEIGHT, both at least 1 (e.g. 64x64), got {args.size!r}")
    if args.workers > 1 and args.part is not None:
        parser.error("--workers and --part do not go together")
    if args.workers > 1 and args.append:
        parser.error("--workers writes a new dataset; it cannot --append")
    for option, allowed in (("label", "csv"), ("labels", "files"), ("files", "files"), ("split", "files"),
                            ("image_mode", "files"), ("size", "files"), ("channels_first", "files"),
                            ("delimiter", "csv"), ("no_header", "csv"), ("threads", "files"),
                            ("list_sep", "csv")):
        if getattr(args, option) not in (None, False, []) and kind != allowed:
            parser.error(f"--{option.replace('_', '-')} applies to {allowed} sources, not {kind}")
    if args.classes is not None and kind not in ("csv", "files"):
        parser.error("--classes applies to csv and files sources")
    if args.on_error != "raise" and kind not in ("csv", "files"):
        parser.error("--on-error applies to csv and files sources")
    return kind


def _classes(args: argparse.Namespace) -> Any:
    return None if args.classes is None else ("auto" if args.classes == "auto" else args.classes.split(","))


def _from_npy(args: argparse.Namespace, named: List[Tuple[Optional[str], str]], fields: Dict[str, str],
              options: Dict[str, Any]) -> Any:
    from . import convert

    parser, sources = args.parser, [path for _, path in named]
    if fields:
        parser.error("--field does not apply to .npy sources: name " + ("the field NAME=FILE" if args.sample_per_file
                                                                           else "them NAME=FILE"))
    if args.sample_per_file:
        names = {name for name, _ in named}
        if len(names) > 1:
            parser.error("--sample-per-file writes one field: give every source the same NAME= or none")
        return convert.from_npy(args.output, sources, sample_per_file=True, field=names.pop(), **options)
    if any(name for name, _ in named):
        if not all(name for name, _ in named):
            parser.error("name every .npy source (NAME=FILE) or none")
        grouped: Dict[str, List[str]] = {}
        for name, path in named:
            grouped.setdefault(name, []).append(path)
        return convert.from_npy(args.output, grouped, **options)
    return convert.from_npy(args.output, sources, **options)


def _from_npz(args: argparse.Namespace, named: List[Tuple[Optional[str], str]], fields: Dict[str, str],
              options: Dict[str, Any]) -> Any:
    from . import convert

    return convert.from_npz(args.output, [path for _, path in named], fields=fields or None, **options)


def _from_hdf5(args: argparse.Namespace, named: List[Tuple[Optional[str], str]], fields: Dict[str, str],
               options: Dict[str, Any]) -> Any:
    from . import convert

    return convert.from_hdf5(args.output, [path for _, path in named], datasets=fields or None, **options)


def _from_csv(args: argparse.Namespace, named: List[Tuple[Optional[str], str]], fields: Dict[str, str],
              options: Dict[str, Any]) -> Any:
    from . import convert

    csv_fields = {name: (spec.rstrip(",").split(",") if "," in spec else spec) for name, spec in fields.items()}
    if csv_fields and args.list_field:  # list fields named by --list-field only: the column of that name
        csv_fields.update({name: name for name in args.list_field if name not in csv_fields})
    lists = {name: args.list_sep for name in args.list_field} or None
    return convert.from_csv(args.output, [path for _, path in named], fields=csv_fields or None, label=args.label,
                            lists=lists, classes=_classes(args), delimiter=args.delimiter, header=not args.no_header,
                            on_error=args.on_error, **options)


def _from_files(args: argparse.Namespace, named: List[Tuple[Optional[str], str]], fields: Dict[str, str],
                options: Dict[str, Any]) -> Any:
    from . import convert

    if len(named) != 1:
        args.parser.error("a files source is one directory")
    if fields:
        args.parser.error("--field does not apply to a directory of files: name its field NAME=DIR")
    splits = _pairs(args.parser, args.split, "--split") if args.split else None
    size = tuple(int(v) for v in args.size.lower().split("x")) if args.size else None
    classes = _classes(args)
    return convert.from_files(args.output, named[0][1], files=args.files, splits=splits, labels=args.labels,
                              field=named[0][0], classes=classes if classes != "auto" else None,
                              image_mode=args.image_mode, size=size, layout="chw" if args.channels_first else "hwc",
                              on_error=args.on_error, threads=args.threads, **options)


_CONVERTERS = {"npy": _from_npy, "npz": _from_npz, "hdf5": _from_hdf5, "csv": _from_csv, "files": _from_files}


def _compression(args: argparse.Namespace) -> Any:
    """The ``compression`` option of ``--compress FIELD=CODEC[:LEVEL][:dict[=BYTES]]`` items (None
    without any)."""
    from .compression import parse_compress_arguments

    try:
        return parse_compress_arguments(args.compress) or None
    except ValueError as exc:
        args.parser.error(printable(str(exc)))


def _add_compress(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--compress", action="append", default=[], metavar="FIELD=CODEC[:LEVEL][:dict[=BYTES]]",
                   help=help)


def _convert(args: argparse.Namespace) -> int:
    parser = args.parser
    named = [_split_named(s) for s in args.sources]
    kind = _source_kind(args, named)
    options: Dict[str, Any] = dict(dtypes=_dtypes(parser, args.dtype), shard_size=args.shard_size,
                                   metadata=args.metadata, mode="a" if args.append else "w",
                                   overflow=args.overflow, progress=not args.quiet, chunk_bytes=args.chunk_size,
                                   workers=args.workers, part=args.part, compression=_compression(args))
    try:
        report = _CONVERTERS[kind](args, named, _pairs(parser, args.field, "--field"), options)
    except ShardfeedError as exc:
        if getattr(exc, "argument", None) == "dtypes":  # --dtype NAME= for a field the source lacks
            parser.error(f"--dtype given for {', '.join(printable(n) for n in exc.unknown)}, which the source "
                         f"does not have; its fields are: {', '.join(printable(n) for n in exc.fields)}")
        raise
    except ImportError as exc:
        print(f"shardfeed convert: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as exc:  # an option value the converter refuses
        parser.error(printable(in_option_terms(str(exc))))
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        say(args, printable(in_option_terms(str(report)), keep_newlines=True))
    return 0


def _add_convert(commands: Any) -> None:
    p = new_command(commands, "convert", _convert, description=_CONVERT_HELP,
                    help="convert .npy/.npz/CSV/HDF5 files or a directory of samples into a dataset")
    _inputs_and_output(p, "sources", "SOURCE", "files, directories or glob patterns (NAME=FILE for .npy)",
                       "the dataset directory to write")
    p.add_argument("--from", dest="source_kind", choices=_SOURCE_KINDS, help="source type (default: guessed)")
    p.add_argument("--field", action="append", default=[], metavar="NAME=SPEC",
                   help="csv: NAME=COL, NAME=COL1,COL2,... or NAME=PATTERN; npz: NAME=MEMBER; hdf5: NAME=/DATASET")
    p.add_argument("--dtype", action="append", default=[], metavar="[NAME=]DTYPE",
                   help="stored dtype of field NAME, or without NAME= of every float field "
                        f"({', '.join(STORED_DTYPES)})")
    p.add_argument("--label", metavar="COL", help="csv: the label column, stored as int64 field 'label' (integers, or names "
                   "with --classes)")
    p.add_argument("--classes", metavar="auto|A,B,...", help="label names -> class indexes: 'auto' (sorted names "
                   "found in the data) or the list; stored in metadata['classes']")
    p.add_argument("--sample-per-file", action="store_true", help="npy: each file is one sample (default: "
                   "files are chunks of rows, concatenated); a directory then takes every --from files option")
    p.add_argument("--labels", metavar="folders|FILE", help="files: labels from sub-folder names, or a list of "
                   "'file label' lines (spaces, tabs or commas; quote names that have spaces) or JSON")
    p.add_argument("--files", metavar="LIST", help="files: text file listing the samples, one name per line")
    p.add_argument("--split", action="append", default=[], metavar="NAME=LIST",
                   help="files: one listing per split, written one after another into one dataset")
    p.add_argument("--image-mode", metavar="MODE", help="files: Pillow mode, e.g. RGB, RGBA or L (default: the "
                   "images' own, or RGB when some have colour and some not)")
    p.add_argument("--size", metavar="WxH", help="files: resize images to WIDTHxHEIGHT")
    p.add_argument("--channels-first", action="store_true", help="files: store images as (C, H, W), not (H, W, C)")
    p.add_argument("--threads", type=positive, metavar="N", help="files: decoding threads (default: up to 8)")
    p.add_argument("--list-field", action="append", default=[], metavar="NAME",
                   help="csv: a variable-length field whose cells hold lists of numbers (\"607 2214 9\"), from "
                   "column NAME or the column --field NAME=COL gives it; its dtype from --dtype (default float32)")
    p.add_argument("--list-sep", metavar="SEP", help="csv: the separator of the numbers in --list-field cells "
                   "(default: whitespace)")
    p.add_argument("--delimiter", metavar="CHAR", help="csv: column delimiter (default: tab for .tsv, else comma)")
    p.add_argument("--no-header", action="store_true", help="csv: files have no header row (columns are 0, 1, ...)")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="csv/files: stop at a bad row or file, naming it (default), or skip and count it")
    p.add_argument("--overflow", choices=("error", "saturate"), default="error",
                   help="values that do not fit the stored dtype: refuse them (default), or store the largest "
                   "finite value of the same sign")
    p.add_argument("--shard-size", type=_size, default=256 << 20, metavar="SIZE", help="bytes per shard, e.g. 64M (default 256M)")
    p.add_argument("--chunk-size", type=_size, default=8 << 20, metavar="SIZE", help="source bytes read at a time (default 8M)")
    p.add_argument("--metadata", type=_json_object, metavar="JSON|@FILE", help="metadata to store (a JSON object)")
    p.add_argument("--append", action="store_true", help="append to the dataset at OUT instead of creating it")
    p.add_argument("--workers", type=positive, default=1, metavar="N", help="processes, each writing a part; "
                   "the parts are then merged without copying")
    p.add_argument("--part", type=_part, metavar="K/N", help="convert only part K (0-based) of N, e.g. one "
                   "cluster task's share; join the parts with `shardfeed merge`")
    _add_compress(p, "store field FIELD compressed (codec zstd; default level 3), each sample one frame decoded "
                     "by the readers' native threads; ':dict' trains a dictionary on the first samples (110 KiB, "
                     "or dict=BYTES), for small records; repeat for several fields")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no report")


# ---- head --------------------------------------------------------------------------------------


def _format_value(value: np.ndarray, classes: Optional[List[str]]) -> str:
    if value.ndim == 0:
        text = repr(value.item())
        if classes is not None and value.dtype.kind in "iu" and 0 <= int(value) < len(classes):
            text += f" ({classes[int(value)]})"
        return text
    with np.printoptions(threshold=12, edgeitems=3, precision=4, linewidth=10_000):
        if value.size <= 12:
            return np.array2string(value, separator=", ").replace("\n", "")
        flat = np.array2string(value.reshape(-1), separator=", ")
    stats = ""
    if value.dtype.kind in "biuf":
        finite = value[np.isfinite(value)] if value.dtype.kind == "f" else value
        if finite.size:
            stats = f"  (min {finite.min():.4g}, max {finite.max():.4g}, mean {finite.mean():.4g})"
    return f"{flat}{stats}"


def _head(args: argparse.Namespace) -> int:
    """Prints the first samples of a dataset readably: each field's dtype, shape and values (long
    arrays abbreviated, with min/max/mean), labels with their class names from metadata['classes']."""
    with _dataset.open(args.path) as ds:
        names = args.fields.split(",") if args.fields else list(ds.fields)
        for name in names:
            if name not in ds.fields:
                args.parser.error(f"--fields: no field '{printable(name)}'; the dataset has "
                                  f"{', '.join(printable(n) for n in ds.fields)}")
        start = args.start if args.start >= 0 else len(ds) + args.start
        if not 0 <= start < len(ds) and not (start == 0 == len(ds)):
            args.parser.error(f"--start {args.start} is outside the dataset's {len(ds)} samples "
                              f"(0 to {len(ds) - 1}, or -{len(ds)} to -1 from the end)")
        stop = min(len(ds), start + args.n)
        classes = ds.metadata.get("classes") if isinstance(ds.metadata.get("classes"), list) else None
        if not args.json and not args.quiet:
            shown = f"showing {start}..{stop - 1}" if stop > start else "nothing to show"
            print(f"{printable(ds.path)}: {len(ds)} samples; {shown}")
        width = max(map(len, names)) if names else 0
        for index in range(start, stop):
            sample = ds[index]
            if args.json:
                print(json.dumps({"index": index, **{n: sample[n].tolist() for n in names}}))
                continue
            print(f"[{index}]")
            for name in names:
                value = sample[name]
                field = ds.fields[name]
                shape = ", ".join(map(str, value.shape))
                kind = f"{field.dtype}[{shape}]" + (" (variable)" if field.variable else "")
                labels = classes if name in ("label", "y") else None
                print(f"  {printable(name):<{width}}  {kind}  {printable(_format_value(value, labels))}")
    return 0


def _add_head(commands: Any) -> None:
    p = new_command(commands, "head", _head, help="print the first samples of a dataset", description=plain(_head.__doc__))
    p.add_argument("path")
    p.add_argument("-n", type=positive, default=5, metavar="N", help="number of samples (default 5)")
    p.add_argument("--start", type=int, default=0, help="first sample (negative: from the end)")
    p.add_argument("--fields", metavar="A,B", help="fields to show (default: all)")
    p.add_argument("--json", action="store_true", help="one JSON object per sample, full values")
    p.add_argument("-q", "--quiet", action="store_true", help="no heading line")


# ---- merge -------------------------------------------------------------------------------------

_MERGE_HELP = """\
Joins datasets written in parts (by `shardfeed convert --part K/N`, parallel processes or cluster
tasks) into one dataset at OUT, in the order given, without copying shard data: shard files are
hard-linked into OUT (so the parts must be on the same file system), or moved with --move, which
also removes the parts once OUT is complete (where the file system has no hard links, --move
copies the files, and OUT needs room for them until then). The parts must have the same fields and the same metadata (or pass
--metadata). Name parts with zero-padded numbers (part-000, part-001, ...) so that a shell glob
lists them in order.

Exit status: 0 success, 1 parts that do not match or cannot be read, 2 usage error."""


def _merge(args: argparse.Namespace) -> int:
    from .merge import merge

    try:
        result = merge(args.parts, args.output, move=args.move, metadata=args.metadata, compression=_compression(args))
    except ValueError as exc:
        if isinstance(exc, ShardfeedError):
            raise
        args.parser.error(printable(in_option_terms(str(exc))))
    how = (f"moved ({result.copied} file(s) copied: this file system has no hard links)" if result.copied
           else f"{'moved' if result.moved else 'linked'} without copying")
    say(args, f"{result.path}: {result.num_samples} samples in {result.num_shards} shard(s) from "
               f"{result.parts} part(s), {how}")
    return 0


def _add_merge(commands: Any) -> None:
    p = new_command(commands, "merge", _merge, description=_MERGE_HELP,
                    help="join datasets written in parts into one, without copying shard data")
    _inputs_and_output(p, "parts", "PART", "part datasets, in order", "the merged dataset to create")
    p.add_argument("--move", action="store_true", help="move the shard files and remove the parts")
    p.add_argument("--metadata", type=_json_object, metavar="JSON|@FILE", help="the merged dataset's metadata")
    _add_compress(p, "require field FIELD to be stored with CODEC in every part (and with ':dict', with trained "
                     "dictionaries; merge links the parts' files: it keeps their compression and dictionaries and "
                     "cannot change them)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")


# ---- info, verify, demo; the parser ----------------------------------------------------------


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
        total = sum(s.size + s.heap_size for s in manifest.shards) + sum(d.size for d in manifest.dictionaries.values())
        print(f"{printable(ds.path)}: {len(ds)} samples in {ds.num_shards} shard(s), {human_bytes(total)}"
              + (" (dictionaries included)" if manifest.dictionaries else ""))
        sizes = [s.size + s.heap_size for s in manifest.shards]
        if sizes:
            print(f"shards: {len(sizes)}, {human_bytes(min(sizes))} to {human_bytes(max(sizes))} each")
        if args.shards:
            for shard in manifest.shards:
                heap = f" + {printable(shard.heap_file)} {human_bytes(shard.heap_size)}" if shard.heap_file else ""
                heap += "".join(f", field {printable(name)!r} with dictionary {file}" for name, file in shard.dictionaries)
                print(f"  {printable(shard.file)}: {shard.num_samples} samples, {human_bytes(shard.size)}{heap}")
        print(f"record: {ds.schema.record_bytes} bytes")
        for field in ds.fields.values():
            shape = ", ".join("*" if d is None else str(d) for d in field.shape)
            print(f"  {printable(field.name)}: {field.dtype}[{shape}]" + (f" {field.codec}" if field.codec else ""))
        for size in ds.compression().values():
            print(f"  {size}")
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

    _add_convert(commands)
    _add_head(commands)
    _add_merge(commands)
    from ._bench import add_command as add_bench  # the bench command: its options and measurements
    add_bench(commands)
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
