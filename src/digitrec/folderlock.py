"""One run per run folder: the lock a run holds on its folder, the folder a run gets when none is named, and the
checks that a folder can be written before any work goes into it.

Light on purpose (no torch): `train`, `train --nproc`'s launcher, `finetune` and `sweep` all take their folders here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import DigitrecError

try:
    import fcntl
except ImportError:  # Windows: no flock, so runs there are not guarded against a second run in their folder
    fcntl = None  # type: ignore[assignment]


def nearest_existing(path: Path) -> Path | None:
    """`path` itself if it exists, else its nearest parent that does (None: not even the root, a relative path's
    first part missing)."""
    return next((parent for parent in (path, *path.parents) if parent.exists()), None)


def file_in_the_way(path: Path) -> Path | None:
    """The file that keeps `path` from being a folder: the path itself or its nearest existing parent, when that
    is not a folder."""
    existing = nearest_existing(path)
    return existing if existing is not None and not existing.is_dir() else None


def dangling_link_on(path: Path) -> Path | None:
    """The link to nothing on the way to `path` (the path itself or a parent), where a folder cannot be made."""
    return next((part for part in (path, *path.parents) if part.is_symlink() and not part.exists()), None)


def make_writable_folder(path: Path) -> None:
    """Create `path` (and its parents) and write and remove a file there: the OSError of a folder that cannot be
    made or written (below a file, under /proc, read-only, full) comes now, before the work that would fill it."""
    path.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check.", suffix=".tmp")
    os.close(fd)
    os.unlink(probe)


def refuse_a_file_in_the_way(out_dir: Path) -> None:
    """A run folder that is a file, or lies below one, is one sentence before anything is read or written there."""
    blocking = file_in_the_way(out_dir)
    if blocking is not None:
        raise DigitrecError(f"{blocking} is a file, not a folder; choose another folder for the run.")
    dangling = dangling_link_on(out_dir)
    if dangling is not None:  # was "cannot write into the run folder ... (File exists)"
        raise DigitrecError(
            f"{dangling} is a link to {os.readlink(dangling)}, which does not exist; make that folder, or choose "
            "another folder for the run."
        )


def default_out_dir(name: str) -> Path:
    """Where a run goes when no folder is named, made now: runs/<name>-<local time, YYYYmmdd-HHMMSS>, or with -2,
    -3, ... added when that folder exists (runs started in the same second). Making it is what keeps a run
    started at the same moment, which sees it, from choosing it too (the folder lock refuses the second of two
    runs that still chose one folder)."""
    stem = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    for number in range(1, 10_000):
        candidate = stem if number == 1 else stem.with_name(f"{stem.name}-{number}")
        candidate.parent.mkdir(parents=True, exist_ok=True)
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise DigitrecError(f"runs/ holds 9,999 folders named {stem.name}-N; name one with --out.")


@contextlib.contextmanager
def reserved_out_dir(name: str) -> Iterator[Path]:
    """default_out_dir(name), made now, for the body to run in; removed again if the body left it empty (a run
    refused before it wrote anything)."""
    folder = default_out_dir(name)
    try:
        yield folder
    finally:
        remove_if_empty([folder])


# The lock a run holds on its folder from its first look at it to its end: a hidden file inside the folder, which no
# check counts as a run's or a user's file. flock() dies with its process, so a file left by a killed run locks
# nothing; the lock, not the file, is what a second run checks.
LOCK_FILE = ".digitrec.lock"


class RunFolderInUse(DigitrecError):
    """Another process holds the run folder's lock: a run is training there now."""


def _in_use(out_dir: Path, fd: int) -> RunFolderInUse:
    try:
        pid = int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        pid = 0
    holder = f" (pid {pid})" if pid > 0 else ""
    return RunFolderInUse(
        f"{out_dir} is in use by another digitrec run{holder}; wait for it to finish or choose another --out."
    )


def _missing_folders(out_dir: Path) -> list[Path]:
    """`out_dir` and the parents of it that do not exist yet, innermost first."""
    missing = []
    for folder in (out_dir, *out_dir.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def remove_if_empty(folders: list[Path]) -> None:
    """Remove each folder of `folders` (innermost first) while it is empty; one that holds anything stays, and so
    do its parents."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _take_lock(out_dir: Path) -> int:
    """Create `out_dir` if need be and hold the lock of its LOCK_FILE: the open file's descriptor, or
    RunFolderInUse at once when another process holds it."""
    assert fcntl is not None
    path = out_dir / LOCK_FILE
    for _ in range(100):
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            # not through a symbolic link left at its name: the pid written below replaced the target's contents
            flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:
            continue  # the folder went as this looked (a refused run removing the folder it made)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise DigitrecError(
                f"{path} is a symbolic link where digitrec keeps the folder's lock; remove it and run again."
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = _in_use(out_dir, fd)
            os.close(fd)
            raise error from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder removes the file as it ends: a lock on a removed file guards nothing, so open anew
            held = os.stat(path)
            mine = os.fstat(fd)
            if (held.st_dev, held.st_ino) == (mine.st_dev, mine.st_ino):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise RunFolderInUse(
        f"{out_dir} is in use by other digitrec runs; wait for them to finish or choose another --out."
    )


@contextlib.contextmanager
def locked_run_folder(out_dir: Path, take: bool = True) -> Iterator[None]:
    """Hold `out_dir`'s lock while the body runs (a run, from its first look at its folder to its end), released
    on errors and Ctrl-C too. A second run into the folder meanwhile is refused with RunFolderInUse, before it
    reads, removes or writes anything there. `take` is False on the ranks of a torchrun that do not write.

    A folder this creates and nothing else is written into (a run refused by a later check) is removed again.
    Where the lock cannot be had (no flock on Windows; a folder that cannot be created or written, which
    make_run_folder refuses later in a sentence of its own) the body runs without it."""
    created = _missing_folders(out_dir)
    fd = None
    if take and fcntl is not None:
        try:
            fd = _take_lock(out_dir)
        except OSError:
            remove_if_empty(created)
        except BaseException:
            remove_if_empty(created)
            raise
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):  # before the lock goes: no one locks a removed file then
                (out_dir / LOCK_FILE).unlink()
            os.close(fd)
            remove_if_empty(created)


def refuse_a_folder_in_use(out_dir: Path) -> None:
    """RunFolderInUse if a run holds `out_dir`'s lock now; creates nothing (`train --nproc`'s check before
    it starts torchrun)."""
    if fcntl is None:
        return
    try:
        fd = os.open(out_dir / LOCK_FILE, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return  # no lock file, no run
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(out_dir, fd) from None
    except OSError:
        pass
    finally:
        os.close(fd)
