"""The data commands of the ``shardfeed`` command line: ``convert``, ``head``, ``merge`` and
``bench`` (registered by :func:`add_commands` from cli.py). Thin layers over
:mod:`shardfeed.convert` and :func:`shardfeed.merge`; ``bench`` (in _cli_bench.py) measures
random reads.

Exit status: 0 success, 1 a data error (bad source row or file, a dataset that does not open),
2 a usage error (argparse's own, or an option value these commands refuse).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ._cli_text import Formatter, in_option_terms, plain, positive, printable, say
from .errors import ShardfeedError
from .format import STORED_DTYPES

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


def _progress(args: argparse.Namespace) -> bool:
    """A progress bar unless --quiet; tqdm shows it only when stderr is a terminal."""
    return not args.quiet


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


def _convert(args: argparse.Namespace) -> int:
    from . import convert

    parser = args.parser
    named = [_split_named(s) for s in args.sources]
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
    fields = _pairs(parser, args.field, "--field")
    options: Dict[str, Any] = dict(dtypes=_dtypes(parser, args.dtype), shard_size=args.shard_size,
                                   metadata=args.metadata, mode="a" if args.append else "w",
                                   overflow=args.overflow, progress=_progress(args), chunk_bytes=args.chunk_size)
    parallel = dict(workers=args.workers, part=args.part)
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
    classes = None if args.classes is None else ("auto" if args.classes == "auto" else args.classes.split(","))
    if args.on_error != "raise" and kind not in ("csv", "files"):
        parser.error("--on-error applies to csv and files sources")
    sources = [path for _, path in named]
    try:
        if kind == "npy" and args.sample_per_file:
            if fields:
                parser.error("--field does not apply to .npy sources: name the field NAME=FILE")
            names = {name for name, _ in named}
            if len(names) > 1:
                parser.error("--sample-per-file writes one field: give every source the same NAME= or none")
            report = convert.from_npy(args.output, sources, sample_per_file=True, field=names.pop(),
                                      **parallel, **options)
        elif kind == "npy":
            if fields:
                parser.error("--field does not apply to .npy sources: name them NAME=FILE")
            if any(name for name, _ in named):
                if not all(name for name, _ in named):
                    parser.error("name every .npy source (NAME=FILE) or none")
                grouped: Dict[str, List[str]] = {}
                for name, path in named:
                    grouped.setdefault(name, []).append(path)
                report = convert.from_npy(args.output, grouped, **parallel, **options)
            else:
                report = convert.from_npy(args.output, sources, **parallel, **options)
        elif kind == "npz":
            report = convert.from_npz(args.output, sources, fields=fields or None, **parallel, **options)
        elif kind == "hdf5":
            report = convert.from_hdf5(args.output, sources, datasets=fields or None, **parallel, **options)
        elif kind == "csv":
            csv_fields = {name: (spec.rstrip(",").split(",") if "," in spec else spec) for name, spec in fields.items()}
            if csv_fields and args.list_field:  # list fields named by --list-field only: the column of that name
                csv_fields.update({name: name for name in args.list_field if name not in csv_fields})
            lists = {name: args.list_sep for name in args.list_field} or None
            report = convert.from_csv(args.output, sources, fields=csv_fields or None, label=args.label, lists=lists,
                                      classes=classes, delimiter=args.delimiter, header=not args.no_header,
                                      on_error=args.on_error, **parallel, **options)
        else:
            if len(sources) != 1:
                parser.error("a files source is one directory")
            if fields:
                parser.error("--field does not apply to a directory of files: name its field NAME=DIR")
            splits = _pairs(parser, args.split, "--split") if args.split else None
            size = tuple(int(v) for v in args.size.lower().split("x")) if args.size else None
            report = convert.from_files(args.output, sources[0], files=args.files, splits=splits, labels=args.labels,
                                        field=named[0][0],
                                        classes=classes if classes != "auto" else None, image_mode=args.image_mode,
                                        size=size, layout="chw" if args.channels_first else "hwc",
                                        on_error=args.on_error, threads=args.threads, **parallel, **options)
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
    p = commands.add_parser("convert", help="convert .npy/.npz/CSV/HDF5 files or a directory of samples into a dataset",
                            description=_CONVERT_HELP, formatter_class=Formatter)
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="files, directories or glob patterns (NAME=FILE for .npy)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the dataset directory to write")
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
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no report")
    p.set_defaults(run=_convert, parser=p)


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
    from . import dataset as _dataset

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
    p = commands.add_parser("head", help="print the first samples of a dataset", description=plain(_head.__doc__),
                            formatter_class=Formatter)
    p.add_argument("path")
    p.add_argument("-n", type=positive, default=5, metavar="N", help="number of samples (default 5)")
    p.add_argument("--start", type=int, default=0, help="first sample (negative: from the end)")
    p.add_argument("--fields", metavar="A,B", help="fields to show (default: all)")
    p.add_argument("--json", action="store_true", help="one JSON object per sample, full values")
    p.add_argument("-q", "--quiet", action="store_true", help="no heading line")
    p.set_defaults(run=_head, parser=p)


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
        result = merge(args.parts, args.output, move=args.move, metadata=args.metadata)
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
    p = commands.add_parser("merge", help="join datasets written in parts into one, without copying shard data",
                            description=_MERGE_HELP, formatter_class=Formatter)
    p.add_argument("parts", nargs="+", metavar="PART", help="part datasets, in order")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the merged dataset to create")
    p.add_argument("--move", action="store_true", help="move the shard files and remove the parts")
    p.add_argument("--metadata", type=_json_object, metavar="JSON|@FILE", help="the merged dataset's metadata")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(run=_merge, parser=p)


def add_commands(commands: Any) -> None:
    """Adds convert, head, merge and bench to the ``shardfeed`` sub-command parser."""
    _add_convert(commands)
    _add_head(commands)
    _add_merge(commands)
    from ._cli_bench import add_bench
    add_bench(commands)
