"""Checkpoint files: naming, atomic writes, discovery of the newest intact one, retention.

Torch-free on purpose. A ``torch.save`` file is a zip archive whose members carry CRC32s, so
``zipfile`` can prove a file complete and unmodified without unpickling it (about 1.7 GB/s;
torch's own loader does not check the CRCs). Beyond the CRCs, its ``data.pkl`` must be one
complete pickle stream whose every tensor storage is in the archive at its recorded size: the
stream is parsed with every global it names replaced by an inert stand-in, so nothing in it runs.
A final name only ever names a complete file:
writers go through :func:`atomic_write`, which writes a hidden temporary, fsyncs it, renames
it over the final name and fsyncs the directory.
"""

from __future__ import annotations

import os
import pickle
import re
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .errors import CheckpointError

PREFIX = "checkpoint_step_"
SUFFIX = ".pt"
TEMP_MARKER = ".tmp-"
# A checkpoint that a group could not resume from is renamed aside with this suffix, never
# deleted: no longer a candidate, still there for a person to look at (or to rename back).
BAD_SUFFIX = ".bad"
_NAME = re.compile(rf"^{PREFIX}(\d+){re.escape(SUFFIX)}$")
_MAX_STEP_DIGITS = 18  # fits an int64; anything longer is not a step count we wrote
# A look for what an attempt wrote (a job's own checkpoints in subfolders, as Lightning's
# ``version_0/checkpoints``) stops at this many entries and this depth: beyond them it cannot
# tell, and the attempt is taken to have progressed.
MAX_LISTED = 10_000
MAX_DEPTH = 3


@dataclass(frozen=True, order=True)
class Checkpoint:
    step: int
    path: Path


@dataclass(frozen=True)
class Rejected:
    path: Path
    reason: str


@dataclass(frozen=True)
class Discovery:
    """What a scan found. ``newest`` is the highest-step file that passed verification."""

    newest: Checkpoint | None
    rejected: list[Rejected] = field(default_factory=list)


def checkpoint_path(directory: Path | str, step: int) -> Path:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return Path(directory) / f"{PREFIX}{step}{SUFFIX}"


def parse_step(name: str) -> int | None:
    """The step a file name claims, or None when the name is not a checkpoint name."""
    m = _NAME.match(name)
    if m is None or len(m.group(1)) > _MAX_STEP_DIGITS:
        return None
    return int(m.group(1))


def verify(path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a complete, uncorrupted torch.save file."""
    try:
        if path.is_symlink():
            raise CheckpointError("is a symlink (only regular files are trusted)")
        if not path.is_file():
            raise CheckpointError("is not a regular file")
        if path.stat().st_size == 0:
            raise CheckpointError("is empty (zero bytes)")
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not pickles:
                raise CheckpointError("is a zip archive but not a torch.save file (no data.pkl)")
            bad = archive.testzip()
            if bad is not None:
                raise CheckpointError(f"member {bad!r} fails its CRC check (corrupted)")
            _check_storages(archive, pickles[0])
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"is not a complete zip archive (truncated or garbage): {exc}") from None
    except (zlib.error, EOFError, ValueError, NotImplementedError) as exc:
        raise CheckpointError(f"cannot be read as an archive: {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot be read: {exc.strerror or exc}") from None


# Bytes per element of the storage classes torch.save names, to check each storage's size.
_ITEM_SIZE = {"DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
              "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1,
              "ByteStorage": 1, "BoolStorage": 1, "ComplexFloatStorage": 8,
              "ComplexDoubleStorage": 16, "UntypedStorage": 1}


class _Inert:
    """Stands in for every global a checkpoint's pickle names: built and filled, never run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _StorageLister(pickle.Unpickler):
    """Parses a torch ``data.pkl`` without importing or calling anything, listing its storages."""

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file)
        self.storages: list[tuple[str, str, int]] = []  # (key, storage class name, elements)

    def find_class(self, module: str, name: str) -> type:
        return type(name, (_Inert,), {})

    def persistent_load(self, pid: Any) -> _Inert:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
        _, kind, key, _location, numel = pid
        self.storages.append((str(key), getattr(kind, "__name__", ""), int(numel)))
        return _Inert()


def _check_storages(archive: zipfile.ZipFile, pickle_name: str) -> None:
    prefix = pickle_name[: -len("data.pkl")]
    try:
        with archive.open(pickle_name) as fh:
            lister = _StorageLister(fh)
            lister.load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, RecursionError, MemoryError) as exc:
        raise CheckpointError(f"data.pkl is not a complete torch pickle: {exc!r:.200}") from None
    for key, kind, numel in lister.storages:
        try:
            info = archive.getinfo(f"{prefix}data/{key}")
        except KeyError:
            raise CheckpointError(f"tensor storage {key!r} is missing from the archive") from None
        size = _ITEM_SIZE.get(kind)
        if size is not None and info.file_size != numel * size:
            raise CheckpointError(f"tensor storage {key!r} holds {info.file_size} bytes, "
                                  f"its {kind} of {numel} elements needs {numel * size}")


def _candidates(directory: Path) -> tuple[list[Checkpoint], list[Rejected]]:
    found: list[Checkpoint] = []
    rejected: list[Rejected] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return [], []
    except OSError as exc:  # starting fresh here could overwrite the progress we cannot see
        raise CheckpointError(f"cannot list {directory}: {exc.strerror}") from None
    for entry in entries:
        name = entry.name
        if TEMP_MARKER in name or name.endswith(BAD_SUFFIX):
            continue  # a write in progress, a stale temporary or one set aside: never a candidate
        step = parse_step(name)
        if step is not None:
            found.append(Checkpoint(step, Path(entry.path)))
        elif name.startswith(PREFIX):
            rejected.append(Rejected(Path(entry.path), "name is not checkpoint_step_<N>.pt"))
    found.sort(reverse=True)
    return found, rejected


def steps(directory: Path | str) -> list[int]:
    """The steps of every checkpoint name in ``directory``, newest first, verified or not."""
    return [cp.step for cp in _candidates(Path(directory))[0]]


def discover(directory: Path | str) -> Discovery:
    """Find the newest intact checkpoint, newest first; every skipped file comes with a reason.

    Older files below the first intact one are not read: they cannot be selected. Raises
    :class:`CheckpointError` when the directory exists but cannot be listed.
    """
    found, rejected = _candidates(Path(directory))
    for cp in found:
        try:
            verify(cp.path)
        except CheckpointError as exc:
            rejected.append(Rejected(cp.path, str(exc)))
            continue
        return Discovery(cp, rejected)
    return Discovery(None, rejected)


@dataclass(frozen=True)
class Listing:
    """What a checkpoint directory holds, to tell whether an attempt wrote a checkpoint: the
    newest step of our own names, and every other file (a job's own naming: Lightning's
    ``epoch=0-step=40.ckpt``) with its mtime. ``complete`` is False when it could not all be seen."""

    newest_step: int | None
    others: dict[str, int]
    complete: bool = True

    @property
    def empty(self) -> bool:
        return self.newest_step is None and not self.others

    def wrote_since(self, before: Listing) -> bool | None:
        """True for a newer checkpoint of ours or a file new or rewritten since ``before``; None
        when that cannot be told (a listing was cut short)."""
        if self.newest_step is not None and (before.newest_step is None or self.newest_step > before.newest_step):
            return True
        if any(before.others.get(name) != mtime for name, mtime in self.others.items()):
            return True
        return None if not (self.complete and before.complete) else False


def listing(directory: Path | str, most: int = MAX_LISTED) -> Listing:
    """The directory as :class:`Listing` sees it, walked to depth ``MAX_DEPTH`` and at most
    ``most`` entries; temporaries and files set aside are not checkpoints. Never raises."""
    newest: int | None = None
    others: dict[str, int] = {}
    seen = 0
    stack = [(Path(directory), 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue  # missing or unreadable: what is there cannot be progress we saw
        for entry in entries:
            seen += 1
            if seen > most:
                return Listing(newest, others, complete=False)
            name = entry.name
            if TEMP_MARKER in name or name.endswith(BAD_SUFFIX) or name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    if depth < MAX_DEPTH:
                        stack.append((Path(entry.path), depth + 1))
                    continue
                if depth == 0 and (step := parse_step(name)) is not None:
                    newest = step if newest is None else max(newest, step)
                else:
                    others[os.path.relpath(entry.path, directory)] = entry.stat(follow_symlinks=False).st_mtime_ns
            except OSError:
                continue  # vanished between the listing and the look
    return Listing(newest, others)


def set_aside(checkpoint: Checkpoint) -> Path:
    """Rename a checkpoint that a group could not resume from out of the candidates; never delete."""
    aside = checkpoint.path.with_name(checkpoint.path.name + BAD_SUFFIX)
    os.replace(checkpoint.path, aside)
    return aside


def put_back(checkpoint: Checkpoint, aside: Path) -> None:
    """Undo :func:`set_aside` (the file was not the cause after all), unless its name is taken."""
    if not checkpoint.path.exists():
        os.replace(aside, checkpoint.path)


def mtime(path: Path) -> float | None:
    """When ``path`` was last written (Unix seconds), or None if it cannot be read."""
    try:
        return round(path.stat().st_mtime, 3)
    except OSError:
        return None


def atomic_write(path: Path | str, write: Callable[[BinaryIO], None], *, exclusive: bool = False) -> Path:
    """Write ``path`` so that its name appears only once the content is complete and durable.

    ``write`` receives an open binary file. On any error the temporary is removed and the
    exception propagates; an existing file at ``path`` is left untouched. Each writer (process
    and thread) has its own temporary, so concurrent writers never clash. With ``exclusive`` the first writer
    to finish wins (``os.link`` refuses an existing name) and the others drop their temporary:
    for ranks that save the same step at once (their contents are equal).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return path
            finally:
                tmp.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (the entry lives in the directory, not the file)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(directory: Path | str, keep: int, protect: Iterable[Path] = (),
          written: Path | None = None) -> list[Path]:
    """Delete all but the ``keep`` newest intact checkpoints; never a file in ``protect``.

    Only files older than the ``keep``-th newest intact one are removed, so a checkpoint is
    deleted only after newer complete ones exist. Returns the removed paths. ``written``: the
    file :func:`atomic_write` has just named for this caller, counted as intact unread: read back
    at once it comes from the page cache, not the disk, so the read would check nothing that the
    write did not, and it cost a background save a full CRC pass of CPU that training needs.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if written is not None and (identity := _identity(written)) is not None:
        _pruned_ok[written] = identity
    found, _ = _candidates(Path(directory))
    if len(found) <= keep:
        return []  # nothing could go: no file is read
    protected = {Path(p).resolve() for p in protect}
    intact = 0
    removed: list[Path] = []
    for cp in found:
        if intact < keep:
            if not _verified_before(cp.path):
                continue  # a bad newer file does not count towards the ones kept
            intact += 1
            continue
        if cp.path.resolve() in protected:
            continue
        cp.path.unlink(missing_ok=True)
        _pruned_ok.pop(cp.path, None)
        removed.append(cp.path)
    return removed


# Files prune() has verified, by identity. A writer prunes after every save; re-reading every kept
# file each time cost 0.7 s per save of a 100M-parameter model (bench/checkpoint_stall). Loads
# never use this: discover() and load paths always verify the bytes.
_pruned_ok: dict[Path, tuple[int, int, int]] = {}


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _verified_before(path: Path) -> bool:
    if (identity := _identity(path)) is None:
        return False
    if _pruned_ok.get(path) == identity:
        return True
    try:
        verify(path)
    except CheckpointError:
        return False
    _pruned_ok[path] = identity
    return True


def remove_stale_temporaries(directory: Path | str) -> list[Path]:
    """Remove temporaries left by writers that died mid-write. Call only while no writer runs."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        if TEMP_MARKER in entry.name and entry.name.startswith(f".{PREFIX}") and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed
