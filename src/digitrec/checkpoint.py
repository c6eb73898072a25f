"""Checkpoints as safetensors with JSON metadata; atomic writes; loading never unpickles anything.

A model file `model.safetensors` carries its own metadata (recipe, config, architecture, metrics, data
checksum, versions) inside the safetensors header, so `load_model(path)` needs nothing else. The header also
holds a SHA-256 of the file's content (`CHECKSUM_KEY`, see `content_sha256`), so a file alone is checked too.
The JSON side file `model.json` repeats that metadata for people and adds the file's SHA-256; loading checks
both when they are present.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import secrets
import struct
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError

if TYPE_CHECKING:  # torch is imported where tensors are made, so `digitrec data` and NumPy inference skip it
    import numpy as np
    import torch
    from torch import nn

# the safetensors __metadata__ entry (and backends' ONNX one) holding the metadata as JSON
META_KEY = "digitrec"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 100 * 1024 * 1024
# a checkpoint is megabytes (a resume checkpoint of `best` 4 MB): a file far larger is none, and is not read whole
MAX_CHECKPOINT_BYTES = 2 * 10**9
CHECKSUM_KEY = "digitrec_sha256"  # in the header's __metadata__, beside META_KEY; absent from older files


def _temporary_name(path: Path) -> Path:
    """A name for the temporary sibling of `path` that no other writer uses: this process's id and 64 random
    bits (`.name.PID-RANDOM.tmp`, matched by remove_stale_temporaries' `.name.*.tmp`)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(8)}.tmp")


def atomic_write_files(files: dict[Path, bytes], durable: bool = True) -> None:
    """Write each file to a temporary sibling and fsync it, then rename them over their paths one after another.

    A crash leaves every path with its old or its new content, never a mix; and since all the slow work
    happens before the first rename, files that describe each other (a checkpoint and its checksum) can
    only disagree if the process dies in the microseconds between two renames. The rename also replaces a
    symbolic link left at a path instead of writing through it. `durable=False` skips the fsyncs, for files
    cheap to write again (an export of many small files, where an fsync each would be slow).
    """
    temporaries: list[tuple[Path, Path]] = []
    renaming = False
    writing: Path | None = None
    try:
        for path, data in files.items():
            writing = path
            path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                # registered before the file exists: an interrupt (Ctrl-C) anywhere from here on is cleaned up
                # below (with mkstemp, one between its return and the registration left a temporary for good)
                tmp = _temporary_name(path)
                temporaries.append((tmp, path))
                # "x": never an existing file; and the mode open() gives, as the path's own would be
                try:
                    f = open(tmp, "xb")
                except FileExistsError:  # not ours (all but impossible, with 64 random bits): left alone
                    temporaries.pop()
                    continue
                break
            with f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
        writing = None
        renaming = True
        for tmp, path in temporaries:
            os.replace(tmp, path)
    except BaseException as exc:
        # Ctrl-C or SIGTERM once a rename is done (told by the files: it may land just after os.replace returns):
        # the files describe each other, so the rest follow the first (removing them left a checkpoint its side
        # file's checksum refuses, for good)
        finish = renaming and any(not tmp.exists() for tmp, _ in temporaries)
        for tmp, path in temporaries:
            if finish:
                with contextlib.suppress(OSError):
                    os.replace(tmp, path)
                    continue
            with contextlib.suppress(OSError):  # gone already, or renamed: the first error is the one to tell
                tmp.unlink()
        if isinstance(exc, OSError) and exc.filename is None and writing is not None:
            # a full disk says "No space left on device" with no file name: the CLI names the file it was writing
            raise OSError(exc.errno, exc.strerror, str(writing)) from exc
        raise
    for folder in {path.parent for path in files} if durable else ():
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync it, then rename it over `path`."""
    atomic_write_files({Path(path): data})


def valid_utf8(text: str) -> str:
    """`text` as valid UTF-8: the bytes of a file name that are not UTF-8 (caf\\xe9, from an old camera), which
    Python holds as lone surrogates, as backslash escapes (caf\\xe9), as `ls` shows them."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def atomic_write_text(path: str | Path, text: str) -> None:
    """UTF-8, with a file name in the text that is not UTF-8 written as backslash escapes (valid_utf8): strictly,
    the report and card of a run in such a folder failed to be written, and a TOML file must be UTF-8."""
    atomic_write_bytes(path, valid_utf8(text).encode("utf-8"))


def atomic_write_json(path: str | Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def model_file(path: str | Path) -> Path:
    """The checkpoint a MODEL argument names: a run folder's model.safetensors, any other path as it is."""
    path = Path(path)
    return path / "model.safetensors" if path.is_dir() else path


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write tensors and metadata as one safetensors file plus its JSON side file (with the file's SHA-256)."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"format_version": FORMAT_VERSION, **meta}
    metadata = {META_KEY: json.dumps(meta)}
    unchecked = save(tensors, metadata=metadata)
    header, start = parse_header(unchecked)
    digest = content_sha256(header, memoryview(unchecked)[start:])
    data = _sorted_header(save(tensors, metadata={**metadata, CHECKSUM_KEY: digest}))
    # the tensors' layout does not depend on the metadata: check that it did not move
    header, start = parse_header(data)
    if content_sha256(header, memoryview(data)[start:]) != digest:
        raise RuntimeError("safetensors laid the tensors out differently with the checksum in the header")
    side = json.dumps({**meta, "sha256": hashlib.sha256(data).hexdigest()}, indent=2) + "\n"
    atomic_write_files({Path(path): data, sidecar_path(path): side.encode("utf-8")})


def _sorted_header(data: bytes) -> bytes:
    """The same safetensors file with its header's keys in sorted order. safetensors writes the metadata in a hash
    map's order, which changes from save to save: the same model saved twice gave two files (two SHA-256s, and an
    ensemble saved again over itself removed its exports as stale). The tensor data and its offsets stay; the
    header is padded with spaces to a multiple of 8 bytes, as safetensors pads it."""
    header, start = parse_header(data)
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[start:]


STALE_SECONDS = 120  # a temporary this old belongs to no live writer: its writer crashed or was killed


def finish_interrupted_save(path: str | Path) -> None:
    """Finish what a crash between the two renames of `save_tensors` left undone.

    The checkpoint is renamed into place first, so such a crash leaves the new checkpoint beside the old side
    file, with the new side file still a temporary (`.last.json.XXXX.tmp`): when the checkpoint does not match
    its side file, the temporary whose checksum matches it becomes the side file. The other temporaries are
    remove_stale_temporaries' to remove.
    """
    path = Path(path)
    if path.exists():
        candidate = _matching_temporary_side(path, hashlib.sha256(path.read_bytes()).hexdigest())
        if candidate is not None:
            with contextlib.suppress(FileNotFoundError):  # another rank of the same run was quicker
                os.replace(candidate, sidecar_path(path))


def remove_stale_temporaries(folder: Path, names: Iterable[str]) -> None:
    """Remove the temporaries (`.NAME.*.tmp`) that writes of `names` in `folder` left when their process was
    killed, once STALE_SECONDS old: a younger one may be a live run's write in progress."""
    now = time.time()
    for name in names:
        for leftover in folder.glob(f".{glob.escape(name)}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                if now - leftover.stat().st_mtime > STALE_SECONDS:
                    leftover.unlink()


def _matching_temporary_side(path: Path, digest: str) -> Path | None:
    """The side file of `path` that a crash between `save_tensors`' two renames left as a temporary: the one whose
    checksum is `digest`, the checkpoint's (None when the side file in place has it, or no temporary does)."""
    side = sidecar_path(path)
    if _side_sha256(side) == digest:
        return None
    for candidate in sorted(path.parent.glob(f".{glob.escape(side.name)}.*.tmp")):
        if _side_sha256(candidate) == digest:
            return candidate
    return None


def _side_sha256(side: Path) -> str | None:
    try:
        return json.loads(side.read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):  # ValueError: bad JSON or UTF-8
        return None


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a digitrec safetensors file, checking it against its side file when one is present."""
    from safetensors.torch import load

    data, meta = read_checkpoint(path)
    return _deserialize(Path(path), data, load), meta


def load_arrays(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """`load_tensors()` as NumPy arrays, without importing torch. KeyError: a dtype NumPy lacks (bfloat16)."""
    from safetensors.numpy import load

    data, meta = read_checkpoint(path)
    return _deserialize(Path(path), data, load), meta


def _deserialize(path: Path, data: bytes, load: Any) -> Any:
    from safetensors import SafetensorError

    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} is damaged ({exc}); retrain or restore it.") from None


def refuse_no_model_file(path: Path, instead: str) -> None:
    """Refuse, before reading it, a model path that no model file can be: a device or a pipe (`/dev/zero` was
    read until memory ran out, a FIFO waited for a writer) or a file larger than MAX_CHECKPOINT_BYTES."""
    if path.exists() and not path.is_dir() and not path.is_file():
        raise CheckpointError(f"{path} is not a file but a device, pipe or socket; pass {instead}.")
    if path.is_file() and (size := path.stat().st_size) > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(
            f"{path} is {size / 1e9:.1f} GB, more than any digitrec model ({MAX_CHECKPOINT_BYTES // 10**9} GB at "
            f"most); pass {instead}."
        )


def read_checkpoint(path: str | Path, side_file: bool = True) -> tuple[bytes, dict[str, Any]]:
    """A checkpoint's bytes and metadata, checked against its side file's SHA-256 when one is present (and
    `side_file`) and against the SHA-256 in its header when it holds one (every file `save_tensors` writes does)."""
    path = Path(path)
    try:
        refuse_no_model_file(path, "a .safetensors file `digitrec train` wrote")
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {path} does not exist; train one with `digitrec train` or pass another path."
        ) from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder; pass the model.safetensors file inside it.") from None
    side = sidecar_path(path)
    try:
        meta, changed = _read_header_metadata(path, data)
    except CheckpointError:  # a header cut short: the side file, if any, says it is a checkpoint cut short
        # only a .safetensors file's own: model.onnx's "side file" model.json is model.safetensors', and so is that
        # of model.json itself or a model.pt beside it, none of them a checkpoint cut short
        ours = side_file and path.suffix == ".safetensors" and side != path and side.is_file()
        if ours and _side_sha256(side) not in (None, hashlib.sha256(data).hexdigest()):
            raise CheckpointError(
                f"checkpoint {path} does not match the checksum in {side.name}: it is truncated or was modified; "
                "retrain or restore it."
            ) from None
        raise
    if side_file and side.exists():
        try:
            expected = json.loads(side.read_text()).get("sha256")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise CheckpointError(
                f"side file {side} is not the JSON object digitrec writes beside a checkpoint; restore it or delete "
                f"it to load {path.name} alone."
            ) from None
        digest = hashlib.sha256(data).hexdigest()
        # a crash between save_tensors' two renames: the new side file is still a temporary beside the old one
        if expected and expected != digest and _matching_temporary_side(path, digest) is None:
            raise CheckpointError(
                f"checkpoint {path} does not match the checksum in {side.name}: it is truncated or was modified; retrain or restore it."
            )
    if changed:  # after the side file's check, whose sentence names the side file
        raise CheckpointError(changed)
    # another format read as if it were ours was loaded, resumed and trained on (True == 1: refused too)
    version = meta.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise CheckpointError(
            f"checkpoint {path} is in format {version!r} of digitrec checkpoints, and this digitrec reads format "
            f"{FORMAT_VERSION}; load it with the digitrec that wrote it (a newer one, most likely)."
        )
    return data, meta


def content_sha256(header: dict[str, Any], tensor_data: bytes | memoryview) -> str:
    """The SHA-256 that `CHECKSUM_KEY` holds: of the header without that key, as canonical JSON (sorted keys, no
    spaces), then of the tensor data (the bytes after the 8-byte length and the header). Canonical JSON makes it
    independent of how the header was laid out; the header part covers the metadata and each tensor's dtype,
    shape and offsets."""
    metadata = {k: v for k, v in header.get("__metadata__", {}).items() if k != CHECKSUM_KEY}
    canonical = json.dumps({**header, "__metadata__": metadata}, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode("utf-8"))
    digest.update(tensor_data)
    return digest.hexdigest()


def parse_header(data: bytes) -> tuple[Any, int]:
    """The safetensors header (8-byte little-endian length, then JSON) and where the tensor data starts.
    ValueError (JSONDecodeError, UnicodeDecodeError) or RecursionError for a header that is not JSON."""
    if len(data) < 8:
        raise ValueError("no header")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(len(data) - 8, MAX_HEADER_BYTES):
        raise ValueError("header longer than the file")
    return json.loads(data[8 : 8 + header_len]), 8 + header_len


def _read_header_metadata(path: Path, data: bytes) -> tuple[dict[str, Any], str | None]:
    """Parse the safetensors header ourselves: its digitrec metadata, and whether the content matches the
    header's `CHECKSUM_KEY` (None: it does or there is none; else the sentence that refuses the file)."""
    from .backends import is_onnx

    not_ours = (
        f"{path} is an ONNX export, which this command does not take; pass the .safetensors checkpoint (or run "
        "folder) it was exported from."
        if is_onnx(path)
        else f"{path} is not a digitrec checkpoint (expected a .safetensors file written by `digitrec train`)."
    )
    try:
        header, start = parse_header(data)
        meta = json.loads(header["__metadata__"][META_KEY])
        expected = header["__metadata__"].get(CHECKSUM_KEY)
        changed = expected is not None and expected != content_sha256(header, memoryview(data)[start:])
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):  # RecursionError: [[[[...
        raise CheckpointError(not_ours) from None
    if not isinstance(meta, dict):
        raise CheckpointError(not_ours)
    if changed:
        return meta, (
            f"checkpoint {path} does not match the checksum in its header: it is truncated or was modified; "
            "retrain or restore it."
        )
    return meta, None


def save_model(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Save weights (and buffers) with metadata that names the architecture, so loading needs nothing else."""
    save_tensors(path, dict(model.state_dict()), meta)


def refuse_resume_checkpoint(path: str | Path, meta: dict[str, Any], tensors: dict[str, Any]) -> None:
    """One sentence for a run's last.safetensors given where a model is expected (it would "not fit" any)."""
    if isinstance(meta.get("state"), dict) and any(key.startswith("model.") for key in tensors):
        raise CheckpointError(
            f"{path} is a run's resume checkpoint (model, optimizer and random state for `digitrec train --resume`), "
            f"not a model; use {Path(path).with_name('model.safetensors')} or the run folder."
        )


def refuse_unusable_weights(path: str | Path, tensors: dict[str, Any]) -> None:
    """One sentence for a model whose weights (torch tensors or NumPy arrays) cannot give probabilities.

    Weights with NaN or infinity (written by a run that diverged), whole-number weights (loading casts them to
    floats without a word), a normalization std that is not positive or a BatchNorm variance under zero answer
    every image with NaN: digit 0 "with confidence NaN", and JSON that is no JSON (a bare NaN). Checked where a
    model is loaded to predict, evaluate or export. BatchNorm's step counter is the one whole-number tensor."""
    import numpy as np

    for name, value in tensors.items():
        if hasattr(value, "is_floating_point"):  # a torch.Tensor (float16 and bfloat16 too)
            floating, array = value.is_floating_point(), value.float().numpy()
        else:
            array = np.asarray(value)
            floating = np.issubdtype(array.dtype, np.inexact)
        if not floating:
            if name.endswith("num_batches_tracked"):
                continue
            raise CheckpointError(
                f"checkpoint {path} holds whole numbers where a model keeps real-valued weights (in {name}, "
                f"{value.dtype}): it was not written by digitrec; train the model again or pass another model."
            )
        if not np.isfinite(array).all():
            raise CheckpointError(
                f"checkpoint {path} holds weights that are not finite numbers (NaN or infinity, in {name}): the "
                "run that wrote it diverged; train it again (with a lower --lr) or pass another model."
            )
        leaf = name.rsplit(".", 1)[-1]
        if (leaf == "std" and (array <= 0).any()) or (leaf == "running_var" and (array < 0).any()):
            what = "a standard deviation that is not positive" if leaf == "std" else "a variance under zero"
            raise CheckpointError(
                f"checkpoint {path} holds {what} (in {name}), which no trained model has: it was edited or "
                "damaged; train the model again or pass another model."
            )


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Build the checkpoint's architecture, load its weights and return (model in eval mode, metadata)."""
    from .models import Ensemble, create_model

    tensors, meta = load_tensors(path)
    refuse_resume_checkpoint(path, meta, tensors)
    refuse_unusable_weights(path, tensors)
    specs = member_specs(path, meta)
    if specs is None:
        arch, normalize = _model_spec(path, meta)
        model: nn.Module = create_model(arch, normalize)
    else:
        arch = "ensemble"
        model = Ensemble([create_model(*spec) for spec in specs])
    try:
        model.load_state_dict(tensors)
    except RuntimeError:
        raise CheckpointError(
            f"checkpoint {path} does not fit architecture {arch!r}; it is damaged or from another version."
        ) from None
    return model.to(device).eval(), meta


def finite_number(value: Any) -> bool:
    """A finite int or float (NumPy's too), not a bool."""
    import numpy as np

    return (
        isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and math.isfinite(value)
    )


def recorded_temperature(meta: dict[str, Any], name: str | Path) -> float:
    """The calibration temperature a model's metadata records (1 where none), checked: metadata anyone can edit
    (an ONNX export's carries no checksum), and a temperature of 0 or "abc" was "nan%" or a traceback."""
    temperature = meta.get("temperature", 1.0)
    if finite_number(temperature) and temperature > 0:
        return float(temperature)
    raise CheckpointError(
        f"the model {name} records a temperature of {temperature!r}, not a positive number (its metadata was "
        "changed by hand or damaged); write it again with `digitrec calibrate`, or export it again from its "
        "checkpoint."
    )


def load_ensemble(paths: list[str | Path]) -> tuple[nn.Module, dict[str, Any]]:
    """The checkpoints at `paths` as one `models.Ensemble`, each softened by its own calibrated temperature,
    with metadata naming each member. The result is not calibrated: run `digitrec calibrate` on it."""
    from .models import Ensemble, count_parameters

    if len(paths) < 2:
        raise CheckpointError("an ensemble needs two or more models.")
    models, metas, members, temperatures = [], [], [], []
    views: dict[str, Any] = {}  # each member's test-time views
    for path in paths:
        model, meta = load_model(path)
        if "members" in meta:
            raise CheckpointError(f"{path} is already an ensemble; pass its members' checkpoints instead.")
        arch, normalize = _model_spec(path, meta)
        config: dict[str, Any] = meta["config"] if isinstance(meta.get("config"), dict) else {}
        models.append(model)
        metas.append(meta)
        views[str(path)] = config.get("tta_views", 1)
        temperatures.append(recorded_temperature(meta, path))
        members.append(
            {
                "path": str(path),
                "recipe": meta.get("recipe"),
                "config": {**config, "arch": arch, "normalize": list(normalize)},
                "temperature": temperatures[-1],
                "test_accuracy": (meta.get("metrics") or {}).get("test_accuracy"),
            }
        )
    if len(set(views.values())) > 1:  # the saved model runs its first member's views for all of them
        counts = ", ".join(f"{path} {count}" for path, count in views.items())
        raise CheckpointError(
            f"the members evaluate on different numbers of test-time views ({counts}), and an ensemble saved as one "
            "model runs one number for all; score them without --out, or train them with the same --tta-views."
        )
    ensemble = Ensemble(models, temperatures).eval()
    recipes = {m.get("recipe") for m in metas}
    meta = {
        "recipe": metas[0].get("recipe") if len(recipes) == 1 else "ensemble",
        "arch": "ensemble",
        "config": members[0]["config"],  # how to evaluate it: the first member's batch size, layout, views
        "members": members,
        "params": count_parameters(ensemble),
    }
    meta |= {key: metas[0][key] for key in ("data_checksum", "versions") if key in metas[0]}
    return ensemble, meta


def member_specs(path: str | Path, meta: dict[str, Any]) -> list[tuple[str, tuple[float, float]]] | None:
    """Each member's architecture and input normalization for an ensemble checkpoint; None for one model."""
    members = meta.get("members")
    if members is None:
        return None
    if not isinstance(members, list) or len(members) < 2 or not all(isinstance(m, dict) for m in members):
        raise CheckpointError(f"checkpoint {path} has an invalid list of ensemble members; it is damaged.")
    return [_model_spec(path, member) for member in members]


def _model_spec(path: str | Path, meta: dict[str, Any]) -> tuple[str, tuple[float, float]]:
    """The architecture name and input (mean, std) from the metadata, checked: it may come from anyone."""
    from .config import MNIST_MEAN_STD

    config = meta.get("config", {})
    config = config if isinstance(config, dict) else {}
    arch = config.get("arch") or meta.get("arch")
    if not isinstance(arch, str) or not arch:
        raise CheckpointError(
            f"checkpoint {path} names no architecture; it was not written by `digitrec train`."
        )
    if arch == "pair_cnn":  # was "unknown architecture 'pair_cnn'; run `digitrec models`"
        raise CheckpointError(
            f"{path} is the pair classifier that `digitrec read` consults (written by `digitrec train-pairs`), "
            "not a digit model; it cannot be exported, evaluated, calibrated or used to predict single digits: pass "
            "a digit model's checkpoint (a run folder or its model.safetensors)."
        )
    normalize = config.get("normalize", MNIST_MEAN_STD)
    if not (
        isinstance(normalize, (list, tuple))
        and len(normalize) == 2
        and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in normalize
        )
        and normalize[1] > 0
    ):
        raise CheckpointError(
            f"checkpoint {path} has an invalid input normalization {normalize!r}; it is damaged."
        )
    return arch, (float(normalize[0]), float(normalize[1]))
