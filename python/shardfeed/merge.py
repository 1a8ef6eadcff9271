"""Joining datasets written in parts (by parallel processes or cluster tasks) into one, without
copying shard data: the parts' shard files are hard-linked into the target under new names (with
``move=True`` on a file system without hard links, copied), and one manifest listing them all is
written.

Shard files do not know their position in a dataset (their header holds the format version, the
record size and the schema's fingerprint, and a variable-length field's descriptors point into
their own shard's heap file), so a part's shards are valid shards of the merged dataset as they are.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .compression import parse_compression
from .errors import SchemaError, ShardFormatError, ShardReadError, ShardWriteError, SourceError
from .format import (
    CHECKSUMS_SUFFIX, DICTIONARY_FILE_PATTERN, HEAP_SUFFIX, MANIFEST_NAME, MERGE_JOURNAL_NAME, RECORDS_SUFFIX,
    SHARD_FILE_PATTERN, TEMPORARY_DICTIONARY_PATTERN, TEMPORARY_JOURNAL_PATTERN, TEMPORARY_MANIFEST_PATTERN,
    is_data_file_name, shard_stem, temporary_journal_name,
)
from .manifest import (
    DictionaryEntry, Manifest, ShardEntry, parse_manifest, read_dictionary, read_manifest, write_manifest,
)
from .fileio import create_new, file_system_path, fsync_directory, open_regular, read_bounded, replace_atomically
from .lock import WriterLock

__all__ = ["MergeResult", "merge"]

# Hard links that fail with these mean "this file system has none" (not a per-file problem).
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}
_MAX_JOURNAL_BYTES = 1 << 30
_COPY_PIECE_BYTES = 1 << 20  # a copy's pieces where copy_file_range is not available


@dataclass(frozen=True)
class MergeResult:
    path: str
    num_samples: int
    num_shards: int
    parts: int
    moved: bool
    copied: int = 0  # files this call copied (move=True where the file system has no hard links)


def merge(parts: Sequence["os.PathLike[str] | str"], path: "os.PathLike[str] | str", *, move: bool = False,
          metadata: Optional[Mapping[str, Any]] = None, compression: Any = None) -> MergeResult:
    """Joins the datasets ``parts`` (in this order) into a new dataset at ``path``.

    No shard data is copied: every shard file is hard-linked into ``path`` as ``shard-NNNNNN.rec``
    (and ``.var``), so the parts must be on the same file system as ``path``. The parts stay valid
    datasets sharing those files (shards are never modified once written, so that is safe) unless
    ``move=True``, which removes the parts once the merged manifest is committed (moving the files
    instead of linking them where the file system has no hard links).

    The parts must have the same fields (dtypes and shapes). Their metadata must be equal, unless
    ``metadata`` is given: then it is the merged dataset's metadata. Raises :class:`SchemaError` or
    :class:`SourceError` naming the part that does not match; ``FileExistsError`` if ``path`` holds
    a dataset already. The merge holds the target's writer lock, and with ``move=True`` the parts'
    (a part being written is refused, :class:`WriterLockedError`).

    Where the file system has no hard links, ``move=True`` copies the files into the target instead
    (the target then needs room for them until the parts are removed); without ``move`` that is an
    error naming the option.

    The merged manifest is written last (atomically), and no part loses a file before it is: an
    interrupted merge leaves the parts as they were (openable, the same samples) or the target
    complete. With ``move=True`` the merge writes its plan to ``path``/merge.journal once every file
    is in the target, before the manifest; a merge interrupted after that is finished by running
    the same merge again, which finds the journal and removes the parts, the journal last.

    The merged dataset keeps the parts' compressed fields (their codecs are part of the fields).
    ``compression`` (as for :class:`Writer`) states the codecs it must have: a part stored otherwise
    is refused with a :class:`SchemaError` naming it and the field (linking cannot recompress;
    write the parts with that ``compression``, as the converters' workers do).
    """
    part_paths = [file_system_path(p, ShardReadError) for p in parts]
    target = file_system_path(path, ShardWriteError)
    if not part_paths:
        raise ValueError("no parts to merge")
    target_real = os.path.realpath(target)
    seen: Dict[str, str] = {}
    for part in part_paths:
        real = os.path.realpath(part)
        if real == target_real:
            raise ValueError(f"{part}: a part cannot be the merge target")
        if real in seen:
            raise ValueError(f"{part}: listed twice (also as {seen[real]})")
        seen[real] = part
    os.makedirs(target, exist_ok=True)
    lock = WriterLock(target)
    part_locks: Dict[str, WriterLock] = {}
    copied = 0
    try:
        plan = _read_journal(target)
        if plan is None:
            if os.path.lexists(os.path.join(target, MANIFEST_NAME)):
                raise FileExistsError(errno.EEXIST, "a dataset already exists here", target)
            if move:
                for part in part_paths:
                    part_locks[part] = WriterLock(part)
            plan = _plan(part_paths, target, metadata, compression)
            _remove_leftovers(target, shards=True)
            copied = _place_all(plan, target, move)  # links or copies: the parts keep every file
            if move:  # the parts go once the manifest is committed: record which, for a re-run
                replace_atomically(target, MERGE_JOURNAL_NAME, temporary_journal_name(os.getpid()),
                                   json.dumps(plan.to_json()).encode())
        else:
            plan.check_same(part_paths, move, target)
            _remove_leftovers(target, shards=False)  # the journal's shards are the merge's own
            for part in part_paths:
                if os.path.isdir(part):  # (an earlier run may have removed it)
                    part_locks[part] = WriterLock(part)
        copied += _carry_out(plan, target, move, part_locks)
    finally:
        for part_lock in part_locks.values():
            part_lock.release()
        lock.release()
    return MergeResult(target, plan.manifest.num_samples, len(plan.manifest.shards), len(part_paths), move, copied)


@dataclass
class _Plan:
    """What a merge does: ``files`` lists (part number, name in the part, name in the target)."""

    parts: List[str]
    files: List[Tuple[int, str, str]]
    manifest: Manifest

    def to_json(self) -> Dict[str, Any]:
        return {"parts": [os.path.realpath(p) for p in self.parts], "move": True,
                "files": [list(f) for f in self.files], "manifest": self.manifest.to_json()}

    def check_same(self, parts: List[str], move: bool, target: str) -> None:
        if [os.path.realpath(p) for p in parts] != self.parts or not move:
            raise SourceError(f"{os.path.join(target, MERGE_JOURNAL_NAME)}: a merge with move=True of the parts "
                              f"{self.parts} into {target} did not finish; run that merge again to complete it")


def _plan(part_paths: List[str], target: str, metadata: Optional[Mapping[str, Any]], compression: Any) -> _Plan:
    """Reads and checks the parts; every file must be as its manifest says before anything moves."""
    manifests = []
    for part in part_paths:
        try:
            manifests.append(read_manifest(part))
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "not a shardfeed dataset (no manifest.json)", part) from None
    first = manifests[0]
    for part, manifest in zip(part_paths[1:], manifests[1:]):
        if manifest.schema != first.schema:
            raise SchemaError(f"{part}: fields {manifest.schema!r} differ from those of {part_paths[0]} "
                              f"{first.schema!r}")
    for name, codec in parse_compression(compression, first.schema).items():
        stored = first.schema.fields[name].codec
        if (codec.codec if codec else None) != stored:
            raise SchemaError(f"{part_paths[0]}: field {name!r} is stored {'with ' + stored if stored else 'uncompressed'}"
                              f", not {'with ' + codec.codec if codec else 'uncompressed'} as compression asks; merge "
                              "links the parts' shard files and cannot recompress them: write the parts with that "
                              "compression")
        if codec is not None and codec.dictionary is not None:  # the option says whether the frames use one
            for part, manifest in zip(part_paths, manifests):
                if any(bool(shard.dictionary(name)) != bool(codec.dictionary) for shard in manifest.shards):
                    raise SchemaError(f"{part}: field {name!r} has shards {'without' if codec.dictionary else 'with'} a "
                                      "trained dictionary, not as compression asks; merge cannot recompress them")
    if metadata is None:
        for part, manifest in zip(part_paths[1:], manifests[1:]):
            if manifest.metadata != first.metadata:
                keys = sorted(k for k in set(manifest.metadata) | set(first.metadata)
                              if manifest.metadata.get(k) != first.metadata.get(k))
                raise SourceError(f"{part}: metadata differs from that of {part_paths[0]} (keys {keys}); pass "
                                  "metadata= to choose the merged dataset's")
        merged_metadata: Dict[str, Any] = dict(first.metadata)
    else:
        merged_metadata = dict(metadata)
    files: List[Tuple[int, str, str]] = []
    entries: List[ShardEntry] = []
    dictionaries: Dict[str, DictionaryEntry] = {}
    for number, (part, manifest) in enumerate(zip(part_paths, manifests)):
        for entry in manifest.dictionaries.values():  # (named after their bytes: the same name in the target)
            read_dictionary(part, entry)  # checked: size and checksum
            if dictionaries.setdefault(entry.file, entry) != entry:
                raise SourceError(f"{os.path.join(part, entry.file)}: the manifest gives it {entry.size} bytes and "
                                  f"checksum {entry.checksum}, another part's file of that name differs")
            files.append((number, entry.file, entry.file))  # (placed once; listed per part for its removal)
        for shard in manifest.shards:
            stem = shard_stem(len(entries))
            new = dict(shard.__dict__, file=stem + RECORDS_SUFFIX)
            files.append((number, shard.file, new["file"]))
            if shard.heap_file is not None:
                new["heap_file"] = stem + HEAP_SUFFIX
                files.append((number, shard.heap_file, new["heap_file"]))
            if shard.checksums_file is not None:  # the per-record checksums go with their shard
                new["checksums_file"] = stem + CHECKSUMS_SUFFIX
                files.append((number, shard.checksums_file, new["checksums_file"]))
            for name, size in ((shard.file, shard.size), (shard.heap_file, shard.heap_size),
                               (shard.checksums_file, shard.checksums_size)):
                if name is not None:
                    _check_size(os.path.join(part, name), size)
            entries.append(ShardEntry(**new))
    return _Plan(part_paths, files, Manifest(first.schema, entries, merged_metadata, dictionaries))


def _check_size(file: str, size: int) -> None:
    """A part's file must be a regular file (no link) of the size its manifest gives."""
    fd = open_regular(file)
    try:
        actual = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if actual != size:
        raise SourceError(f"{file}: {actual} bytes, its manifest says {size}")


def _remove_leftovers(target: str, shards: bool) -> None:
    """With the target's lock held: removes the temporary files a killed merge or writer left, and
    with ``shards`` (no manifest and no journal there: nothing lists them) its shard files; they
    are never reused."""
    for name in os.listdir(target):
        if ((shards and is_data_file_name(name)) or TEMPORARY_MANIFEST_PATTERN.fullmatch(name)
                or TEMPORARY_JOURNAL_PATTERN.fullmatch(name) or TEMPORARY_DICTIONARY_PATTERN.fullmatch(name)):
            os.unlink(os.path.join(target, name))


def _carry_out(plan: _Plan, target: str, move: bool, part_locks: Dict[str, WriterLock]) -> int:
    """Places every file (each step can be repeated: a file already in place is left), commits the
    target's manifest, then with ``move`` removes the parts (their files, their locks, their
    directories if nothing else is there) and last the journal. Returns the number of files copied."""
    copied = 0
    if not os.path.lexists(os.path.join(target, MANIFEST_NAME)):
        copied = _place_all(plan, target, move)
        write_manifest(target, plan.manifest)
    if move:
        for number, part in enumerate(plan.parts):
            _remove_part(part, [name for n, name, _ in plan.files if n == number])
            if part in part_locks:
                part_locks.pop(part).release()
            try:
                os.rmdir(part)
            except OSError:
                pass  # other files are there (or it is gone): leave the directory
        os.unlink(os.path.join(target, MERGE_JOURNAL_NAME))
    return copied


def _place_all(plan: _Plan, target: str, move: bool) -> int:
    """Places every file of the plan in the target (a file already there is left, see _place);
    returns the number of files copied."""
    sizes: Dict[str, int] = {}  # each file's size, as the merged manifest lists it
    for shard in plan.manifest.shards:
        for name, size in ((shard.file, shard.size), (shard.heap_file, shard.heap_size),
                           (shard.checksums_file, shard.checksums_size)):
            if name is not None and size is not None:
                sizes[name] = size
    sizes.update((entry.file, entry.size) for entry in plan.manifest.dictionaries.values())
    copied = 0
    placed = set()
    for number, name, new_name in plan.files:
        if new_name in placed:  # a dictionary two parts have (the same bytes): placed once
            continue
        placed.add(new_name)
        copied += _place(os.path.join(plan.parts[number], name), os.path.join(target, new_name), move,
                         sizes[new_name])
    if copied:
        fsync_directory(target)
    return copied


def _place(source: str, destination: str, move: bool, size: int) -> bool:
    """Hard-links ``source`` to ``destination``; with ``move``, copies it where links are not
    supported (the part keeps its file until the merged manifest is committed). A destination
    that is already the source's file (linked by an earlier, interrupted run of the same merge),
    that the source's file was renamed to (by a merge of an earlier version, whose journal lists
    it), or a regular file of ``size`` bytes where the source remains (copied by an earlier run,
    whose journal was written after its copies) is left as it is. Returns whether it copied."""
    try:
        placed = os.lstat(destination)
    except FileNotFoundError:
        placed = None
    if placed is not None:
        try:
            if os.path.samestat(placed, os.lstat(source)) or (move and stat.S_ISREG(placed.st_mode)
                                                              and placed.st_size == size):
                return False  # linked or copied before
        except FileNotFoundError:
            return False  # moved before (the journal says the source's file went here)
        raise SourceError(f"{destination}: exists and is not {source}; the merge will not replace it")
    try:
        os.link(source, destination)
        return False
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise OSError(errno.EXDEV, "the part and the merge target are on different file systems; merging "
                          "links shard files and never copies them: put the parts next to the target",
                          source) from None
        if exc.errno not in _NO_LINKS or not move:
            if exc.errno in _NO_LINKS:
                raise OSError(exc.errno, f"cannot hard-link shard files here ({exc.strerror}); pass move=True "
                              "(shardfeed merge --move) to copy them into the target instead", source) from None
            raise
    _copy(source, destination, size)
    return True


def _copy(source: str, destination: str, size: int) -> None:
    """Copies the regular file ``source`` (``size`` bytes, as its manifest says) into the new file
    ``destination`` and fsyncs it (copy_file_range where the system has it: on file systems with
    reflinks no data is copied)."""
    fd_in = open_regular(source)
    try:
        fd_out = create_new(destination)
        try:
            done = 0
            ranges = hasattr(os, "copy_file_range")
            while done < size:
                piece = 0
                if ranges:
                    try:
                        piece = os.copy_file_range(fd_in, fd_out, size - done, done, done)
                    except OSError as exc:
                        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP,
                                             errno.ENOTSUP):
                            raise
                        ranges = False
                        continue
                else:
                    data = os.pread(fd_in, min(size - done, _COPY_PIECE_BYTES), done)
                    view = memoryview(data)
                    while view:
                        view = view[os.pwrite(fd_out, view, done + len(data) - len(view)):]
                    piece = len(data)
                if piece == 0:
                    raise SourceError(f"{source}: ended after {done} bytes while copied, its manifest says {size}")
                done += piece
            os.fsync(fd_out)
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)


def _remove_part(part: str, names: List[str]) -> None:
    """Removes a merged part: its manifest first (so it is no longer a dataset), then its files."""
    for name in [MANIFEST_NAME] + names:
        try:
            os.unlink(os.path.join(part, name))
        except FileNotFoundError:
            pass


def _read_journal(target: str) -> Optional[_Plan]:
    """The plan of an unfinished merge into ``target``, or None."""
    journal = os.path.join(target, MERGE_JOURNAL_NAME)
    try:
        fd = open_regular(journal)
    except ShardReadError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    try:
        data = read_bounded(fd, os.fstat(fd).st_size, _MAX_JOURNAL_BYTES)
    finally:
        os.close(fd)
    try:
        if data is None:
            raise ValueError(f"larger than {_MAX_JOURNAL_BYTES} bytes")
        doc = json.loads(data)
        parts = [str(p) for p in doc["parts"]]
        files = [(int(n), str(a), str(b)) for n, a, b in doc["files"]]
        if not all(0 <= n < len(parts) and (SHARD_FILE_PATTERN.fullmatch(b) or DICTIONARY_FILE_PATTERN.fullmatch(b))
                   and a not in ("", ".", "..")
                   and not any(c in a for c in "/\\\0") for n, a, b in files):
            raise ValueError("bad file entry")
        manifest = parse_manifest(journal, json.dumps(doc["manifest"]).encode())
    except ShardFormatError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise ShardFormatError(f"{journal}: not a merge journal shardfeed wrote ({exc})") from None
    return _Plan(parts, files, manifest)
