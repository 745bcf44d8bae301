"""Local snapshots of a partition's state: a partition that comes back to this host is
restored from a file plus the changelog's tail instead of the whole changelog, as Kafka
Streams restores a state store from its local checkpoint.

Why: a restore from the changelog pays confluent-kafka's work per record (a Message object,
its key and value copied into bytes) and the broker's, about 80,000 full-history records a
second on the 2-core machine (`streamscore state bench`). A snapshot holds the same values
in one file, which the restore kernel reads in one pass.

When one is written: as a partition is given up cleanly (a revocation, or the stop), after
its last batches were committed, so that every changelog record of it is acknowledged, and
only if the table holds no changelog record of it still to write. It names the
changelog's end offset at that moment, so it equals the changelog's records before that
offset, applied. A process that is assigned the partition on this host (any member of the
group that shares `features.snapshot_dir`) loads it and reads the changelog from that
offset on: what later owners wrote is applied over it.

A snapshot is read once: it is deleted once the restore has used or refused it (a restore
that fails before, say because the broker does not answer, leaves it for the next). It is
refused when:
- its checksum or format do not hold (files are written under a temporary name and renamed,
  but not synced: a host crash may leave a torn one);
- it names another cluster, topic or partition;
- its offset is past the changelog's end (the topic was recreated) or before its start
  (records were deleted);
- its values are not user states, or the table already holds users of its partition
  (`UserTable.load`);
- it is older than `features.snapshot_max_age_s`. Compaction drops a tombstone once it is
  older than the changelog's delete.retention.ms (24 h by default), so the tail read after
  an older snapshot could miss an eviction or an erasure; the setting is capped at 24 h.

Privacy: a snapshot holds what the changelog holds, user ids and pseudonymised state, in a
file only its user may read. Snapshots past the age limit are deleted whenever a restore
runs here (each assignment, so at every start), whichever partition they hold.

Room: a partition revoked here leaves its file even when its next owner is elsewhere and
never reads it, so after each write the oldest snapshots go until the directory holds at
most `features.snapshot_max_bytes` (a Kubernetes emptyDir past its sizeLimit evicts the
pod).

The file: MAGIC; a uint32 length and a JSON header (cluster, topic, partition, offset,
written_ms, users, the parts' sizes, their CRC-32, the control records in hex); then the
key offsets (int64, users + 1), the keys, the value offsets (int64, users + 1) and the
values (changelog values, `UserState.to_bytes`), least recently updated user first.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pipeline.logging import get_logger
from pipeline.serve.state.byteform import PartitionState
from schemas.errors import StreamscoreError

log = get_logger()

MAGIC = b"streamscore partition state\n"
VERSION = 1
_LENGTH = struct.Struct("<I")
SUFFIX = ".snapshot"


class SnapshotRefused(StreamscoreError, ValueError):
    """A snapshot file that must not be loaded; the message says why."""


@dataclass(frozen=True, slots=True)
class Source:
    """The changelog partition a snapshot belongs to."""

    cluster: str
    topic: str
    partition: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A snapshot read and checked: the changelog is read from `offset` on after it."""

    offset: int
    state: PartitionState
    source: Source  # as its header names it


def path_of(directory: Path, source: Source) -> Path:
    """The snapshot file of `source` in `directory`."""
    return directory / f"{source.topic}.{source.partition}{SUFFIX}"


def save(directory: Path, source: Source, offset: int, state: PartitionState) -> Path:
    """Write `state`, which equals `source`'s changelog before `offset`; replaces any older
    snapshot of it.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    parts: list[bytes | memoryview] = [
        state.key_starts.data,
        state.key_bytes.data,
        state.starts.data,
        state.values.data,
    ]
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    header = json.dumps(
        {
            "version": VERSION,
            "cluster": source.cluster,
            "topic": source.topic,
            "partition": source.partition,
            "offset": offset,
            "written_ms": int(time.time() * 1000),
            "users": state.users,
            "sizes": [memoryview(part).nbytes for part in parts],
            "crc32": crc,
            "controls": {key.hex(): value.hex() for key, value in state.controls.items()},
        }
    ).encode()
    path = path_of(directory, source)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        # Readable by this user only: it holds user ids, as the changelog does.
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as out:
            out.write(MAGIC + _LENGTH.pack(len(header)) + header)
            for part in parts:
                out.write(part)
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)  # e.g. a full disk: leave no partial file
        raise
    return path


def read(directory: Path, source: Source, low: int, high: int, max_age_s: float) -> Snapshot | None:
    """`source`'s snapshot, if there is one and it is valid for a changelog spanning
    offsets [low, high]; the file is deleted either way. Its arrays map the file (the
    restore kernel reads the values from the page cache in place) for as long as they live.
    """
    try:
        found = take(directory, source.topic, source.partition, max_age_s)
        return found if found is not None and fits(found, source, low, high) else None
    finally:
        path_of(directory, source).unlink(missing_ok=True)


def take(directory: Path, topic: str, partition: int, max_age_s: float) -> Snapshot | None:
    """`read` up to what needs the broker: the file of `topic`'s `partition`, its format,
    parts, checksum and age checked, whatever cluster and offset it names (`fits` checks
    those). A file refused here is deleted; one returned stays until its reader deletes
    it, so that a restore which fails before it uses the file (the broker does not answer)
    leaves it for the next try. A restore reads the files on a thread while it asks the
    broker for the changelog's offsets.
    """
    source = Source("", topic, partition)  # the cluster is not known yet
    path = path_of(directory, source)
    if not path.exists():
        return None
    try:
        with path.open("rb") as file:
            header, at = _header(file)
        data = np.asarray(np.memmap(path, dtype=np.uint8, mode="r"))  # a plain array
        return _parse(data, header, at, source, max_age_s)
    except (SnapshotRefused, ValueError, OSError) as refused:
        refuse(source, str(refused))
        path.unlink(missing_ok=True)
        return None


def fits(found: Snapshot, source: Source, low: int, high: int) -> bool:
    """Whether a snapshot `take` read belongs to `source`'s cluster and names an offset
    within the changelog's [low, high]; logs why not.
    """
    if found.source != source:
        refuse(source, f"written for {found.source}")
    elif not low <= found.offset <= high:
        refuse(source, f"offset {found.offset} is outside the changelog's [{low}, {high}]")
    else:
        return True
    return False


def users_in(directory: Path, source: Source) -> int:
    """The users `source`'s snapshot holds by its header (0 when there is none, or no
    readable header: `read` refuses that file).
    """
    try:
        with path_of(directory, source).open("rb") as file:
            header, _ = _header(file)
        return max(0, int(header["users"]))
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def refuse(source: Source, reason: str) -> None:
    """Log why `source`'s snapshot is not used (its restore reads the whole changelog)."""
    log.warning("snapshot_refused", topic=source.topic, partition=source.partition, reason=reason)


def _header(file: BinaryIO) -> tuple[dict[str, Any], int]:
    """The JSON header at the start of `file`, and where the parts begin."""
    head = file.read(len(MAGIC) + _LENGTH.size)
    if len(head) != len(MAGIC) + _LENGTH.size or not head.startswith(MAGIC):
        raise SnapshotRefused("not a snapshot file")
    (size,) = _LENGTH.unpack(head[len(MAGIC) :])
    try:
        header = json.loads(file.read(size))
    except ValueError as bad:
        raise SnapshotRefused(f"unreadable header: {bad!r}") from bad
    if not isinstance(header, dict):
        raise SnapshotRefused("unreadable header: not an object")
    return header, len(head) + size


def _parse(
    data: np.ndarray,
    header: dict[str, Any],
    at: int,
    source: Source,
    max_age_s: float,
) -> Snapshot:
    try:
        if header["version"] != VERSION:
            raise SnapshotRefused(f"format version {header['version']}, not {VERSION}")
        named = Source(header["cluster"], header["topic"], header["partition"])
        if (named.topic, named.partition) != (source.topic, source.partition):
            raise SnapshotRefused(f"written for {named}")
        offset, users = int(header["offset"]), int(header["users"])
        age_s = time.time() - header["written_ms"] / 1000
        if age_s > max_age_s:
            raise SnapshotRefused(f"{age_s:.0f} s old, past features.snapshot_max_age_s")
        sizes = [int(size) for size in header["sizes"]]
        if len(sizes) != 4 or at + sum(sizes) != len(data) or sizes[0] != sizes[2]:
            raise SnapshotRefused("its parts do not fill the file")
        parts = []
        for size in sizes:
            parts.append(data[at : at + size])
            at += size
        crc = 0
        for part in parts:
            crc = zlib.crc32(part.data, crc)
        if crc != header["crc32"]:
            raise SnapshotRefused("checksum mismatch")
        controls = {bytes.fromhex(k): bytes.fromhex(v) for k, v in header["controls"].items()}
    except (KeyError, TypeError, ValueError) as bad:
        if isinstance(bad, SnapshotRefused):
            raise
        raise SnapshotRefused(f"unreadable header: {bad!r}") from bad
    # Copied: the kernels are compiled for aligned arrays, and the file aligns nothing.
    key_starts, starts = parts[0].view(np.int64).copy(), parts[2].view(np.int64).copy()
    if len(starts) != users + 1 or key_starts[-1] != len(parts[1]) or starts[-1] != len(parts[3]):
        raise SnapshotRefused("its offsets do not match its parts")
    if (np.diff(key_starts) < 0).any() or key_starts[0] != 0:
        raise SnapshotRefused("its key offsets are not in order")
    return Snapshot(offset, PartitionState(parts[1], key_starts, parts[3], starts, controls), named)


def prune(directory: Path, max_age_s: float, max_bytes: int | None = None) -> int:
    """Delete snapshots (and temporary files left by a crash) older than `max_age_s`, then,
    with `max_bytes`, the oldest snapshots until the rest fit in it; return how many.
    """
    if not directory.is_dir():
        return 0
    horizon = time.time() - max_age_s
    kept: list[tuple[float, int, Path]] = []  # (written, bytes, path) of the files left
    removed = 0
    for path in directory.iterdir():
        name = path.name  # only this module's files: the directory may be shared
        ours = name.endswith(SUFFIX) or (f"{SUFFIX}." in name and name.endswith(".tmp"))
        if not ours:
            continue
        try:
            status = path.stat()
        except FileNotFoundError:  # read (and deleted) by another process meanwhile
            continue
        if status.st_mtime < horizon:
            path.unlink(missing_ok=True)
            removed += 1
        else:
            kept.append((status.st_mtime, status.st_size, path))
    if max_bytes is not None:
        total = sum(size for _, size, _ in kept)
        for _, size, path in sorted(kept):
            if total <= max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            removed += 1
    return removed
