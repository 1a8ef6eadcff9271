"""Joining datasets written in parts (by parallel processes or cluster tasks) into one, without
copying shard data: the parts' shard files are hard-linked (or, with ``move=True``, moved) into the
target under new names, and one manifest listing them all is written.

Shard files do not know their position in a dataset (their header holds the format version, the
record size and the schema's fingerprint, and a variable-length field's descriptors point into
their own shard's heap file), so a part's shards are valid shards of the merged dataset as they are.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .errors import SchemaError, SourceError
from .format import MANIFEST_NAME, Manifest, ShardEntry, read_manifest, write_manifest

__all__ = ["MergeResult", "merge"]

# Hard links that fail with these mean "this file system has none" (not a per-file problem).
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}


@dataclass(frozen=True)
class MergeResult:
    path: str
    num_samples: int
    num_shards: int
    parts: int
    moved: bool


def merge(parts: Sequence["os.PathLike[str] | str"], path: "os.PathLike[str] | str", *, move: bool = False,
          metadata: Optional[Mapping[str, Any]] = None) -> MergeResult:
    """Joins the datasets ``parts`` (in this order) into a new dataset at ``path``.

    No shard data is copied: every shard file is hard-linked into ``path`` as ``shard-NNNNNN.rec``
    (and ``.var``), so the parts must be on the same file system as ``path``. The parts stay valid
    datasets sharing those files (shards are never modified once written, so that is safe) unless
    ``move=True``, which removes the parts once the merged manifest is committed (moving the files
    instead of linking them where the file system has no hard links).

    The parts must have the same fields (dtypes and shapes). Their metadata must be equal, unless
    ``metadata`` is given: then it is the merged dataset's metadata. Raises :class:`SchemaError` or
    :class:`SourceError` naming the part that does not match; ``FileExistsError`` if ``path`` holds
    a dataset already. The merged manifest is written last (atomically), so an interrupted merge
    leaves no dataset at ``path``, and with ``move=True`` the parts untouched until then.
    """
    part_paths = [os.fspath(p) for p in parts]
    target = os.fspath(path)
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

    if os.path.exists(os.path.join(target, MANIFEST_NAME)):
        raise FileExistsError(errno.EEXIST, "a dataset already exists here", target)
    os.makedirs(target, exist_ok=True)
    # Check every part's files before touching anything: a missing or resized shard fails the merge.
    for part, manifest in zip(part_paths, manifests):
        for shard in manifest.shards:
            for name, size in ((shard.file, shard.size), (shard.heap_file, shard.heap_size),
                               (shard.checksums_file, shard.checksums_size)):
                if name is None:
                    continue
                actual = os.stat(os.path.join(part, name)).st_size
                if actual != size:
                    raise SourceError(f"{os.path.join(part, name)}: {actual} bytes, its manifest says {size}")

    entries: List[ShardEntry] = []
    moved_any = False
    for part, manifest in zip(part_paths, manifests):
        for shard in manifest.shards:
            stem = f"shard-{len(entries):06d}"
            new = dict(shard.__dict__, file=stem + ".rec")
            moved_any |= _place(os.path.join(part, shard.file), os.path.join(target, new["file"]), move)
            if shard.heap_file is not None:
                new["heap_file"] = stem + ".var"
                moved_any |= _place(os.path.join(part, shard.heap_file), os.path.join(target, new["heap_file"]), move)
            if shard.checksums_file is not None:  # the per-record checksums go with their shard
                new["checksums_file"] = stem + ".crc"
                moved_any |= _place(os.path.join(part, shard.checksums_file),
                                    os.path.join(target, new["checksums_file"]), move)
            entries.append(ShardEntry(**new))
    write_manifest(target, Manifest(first.schema, entries, merged_metadata))
    if move:
        for part, manifest in zip(part_paths, manifests):
            _remove_part(part, manifest)
    return MergeResult(target, sum(e.num_samples for e in entries), len(entries), len(part_paths), move)


def _place(source: str, destination: str, move: bool) -> bool:
    """Hard-links ``source`` to ``destination`` (replacing a leftover file of that name: there is no
    manifest at the target, so nothing lists it); with ``move``, renames where links are not
    supported. Returns True when the file was renamed."""
    try:
        os.unlink(destination)
    except FileNotFoundError:
        pass
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
                              "(shardfeed merge --move) to move them into the target instead", source) from None
            raise
    os.rename(source, destination)
    return True


def _remove_part(part: str, manifest: Manifest) -> None:
    """Removes a merged part: its manifest first (so it is no longer a dataset), then its files."""
    for name in [MANIFEST_NAME] + [n for s in manifest.shards for n in (s.file, s.heap_file, s.checksums_file) if n]:
        try:
            os.unlink(os.path.join(part, name))
        except FileNotFoundError:
            pass
    try:
        os.rmdir(part)
    except OSError:
        pass  # other files are there: leave the directory
