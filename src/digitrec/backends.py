"""Inference beside PyTorch: ONNX Runtime sessions, a NumPy forward pass of the fast CNNs and deep_cnn, and
models the Predictor calls like the PyTorch one.

Nothing here imports torch, so a command that runs an exported model (or the bundled one) starts without it.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

# META_KEY is also the ONNX metadata entry that holds the source checkpoint's metadata as JSON
from .checkpoint import META_KEY, parse_header, refuse_no_model_file
from .errors import DigitrecError, need_extra

INPUT_NAME, OUTPUT_NAME = "pixels", "logits"


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities from logits (N, 10), at a calibration temperature; stable for any logit scale."""
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def is_onnx(model: str | Path | None) -> bool:
    """Whether `model` names an `.onnx` file from `digitrec export`, which runs on the onnx backend only."""
    return model is not None and str(model).endswith(".onnx")


def read_onnx(path: str | Path) -> bytes:
    """The bytes of an exported model's file; a one-sentence DigitrecError when it cannot be read."""
    refuse_no_model_file(Path(path), "the .onnx file that `digitrec export` wrote")
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DigitrecError(
            f"ONNX model {path} does not exist; export one with `digitrec export MODEL`."
        ) from None
    except OSError as exc:  # a folder, no permission
        reason = exc.strerror or type(exc).__name__
        raise DigitrecError(
            f"cannot read ONNX model {path} ({reason}); pass the .onnx file that `digitrec export` wrote."
        ) from None


def onnx_session(source: str | Path | bytes, threads: int = 0, spin: bool = True, name: str | None = None):
    """An ONNX Runtime CPU session with every graph optimization on; `threads` 0 = one per core.

    `source` is a file or its bytes; `name` names the bytes in errors (default "the exported model")."""
    need_extra("export", "running a model on ONNX Runtime", modules=("onnxruntime",))
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or (os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    # Spinning threads answer back-to-back calls sooner but keep a core busy while idle.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if not isinstance(source, bytes):
        source, name = read_onnx(source), str(source)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for unreadable or invalid files
        raise DigitrecError(
            f"ONNX Runtime cannot load {name or 'the exported model'}; it is not a valid ONNX model "
            f"({type(exc).__name__})."
        ) from None


def session_metadata(session) -> dict[str, Any]:
    """The digitrec metadata an exported model carries: its source checkpoint's, plus an `export` entry."""
    text = session.get_modelmeta().custom_metadata_map.get(META_KEY)
    if text is None:
        raise DigitrecError(
            "this ONNX model was not exported by `digitrec export`; export the checkpoint with it."
        )
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        meta = None
    # valid JSON that is no object (null, [], 5) was an AttributeError traceback
    if not isinstance(meta, dict):
        raise DigitrecError("the ONNX model's digitrec metadata is damaged; export it again.")
    return meta


def onnx_metadata(path: str | Path) -> dict[str, Any]:
    return session_metadata(onnx_session(path, threads=1, spin=False))


def export_source_sha256(path: str | Path) -> str | None:
    """The SHA-256 of the checkpoint an ONNX file was exported from, as its metadata records it; None for a file
    that is no digitrec export, or without ONNX Runtime, which reads the metadata."""
    from importlib.util import find_spec

    if find_spec("onnxruntime") is None:
        return None
    try:
        export = onnx_metadata(path).get("export")
    except DigitrecError:
        return None
    digest = export.get("source_sha256") if isinstance(export, dict) else None
    return digest if isinstance(digest, str) else None


def refuse_stale_export(path: Path, meta: dict[str, Any]) -> None:
    """Refuse, in one sentence, an export that still lies beside the checkpoint it was exported from (the one its
    metadata names) when that checkpoint has changed since: `digitrec calibrate` or a new run rewrote it, and the
    export would answer with the old weights, temperature and reject threshold, unlike the checkpoint. The
    checkpoint beside it is its source where it is the file recorded, or holds the recorded weights (the folder
    renamed or copied, then calibrated); an export kept elsewhere, or beside another model's checkpoint of the same
    name, is not compared."""
    import hashlib

    export = meta.get("export")
    if not isinstance(export, dict):
        return
    source, digest = export.get("source_checkpoint"), export.get("source_sha256")
    if not isinstance(source, str) or not source or not isinstance(digest, str):
        return
    checkpoint = path.parent / Path(source).name
    # The path as given (perhaps relative, to the folder export ran in) and, in exports since 2026-12-06, the
    # absolute one: the checkpoint beside the export is its source if it is either (the absolute one from any
    # folder; the relative one where the folder was moved or renamed, with the export in it).
    resolved = export.get("source_checkpoint_resolved")
    recorded = [source] + ([resolved] if isinstance(resolved, str) and resolved else [])
    recorded_file = any(_same_file(checkpoint, other) for other in recorded)
    weights = export.get("source_weights_sha256")  # exports since 2026-12-07
    if not recorded_file and not isinstance(weights, str):
        return  # none beside it, or another folder's beside a copied export, or the recorded one is gone
    try:
        data = checkpoint.read_bytes()
    except OSError:  # none there, or a folder
        return
    if not recorded_file:
        # Another model's (other weights, another run) beside a copied export is not compared. The same weights,
        # or the same run (begun the same second; `calibrate --half` rewrote its weights), are its source wherever
        # it is now: a run folder renamed or copied, then calibrated again.
        beside_weights, beside_created = checkpoint_identity(data)
        created = export.get("source_created")
        if beside_weights != weights and not (isinstance(created, str) and beside_created == created):
            return
    if hashlib.sha256(data).hexdigest() != digest:
        # where the export was written under another name than export's own, the command writes it there again
        own_names = (checkpoint.with_suffix(".onnx").name, checkpoint.with_suffix(".int8.onnx").name)
        out = "" if path.name in own_names else f" --out {path}"
        raise DigitrecError(
            f"ONNX model {path} was exported from {checkpoint} before that checkpoint changed (its SHA-256 differs: "
            "calibrated or trained again), so it would answer with the old model's confidences and threshold; "
            f"export it again with `digitrec export {checkpoint}{out}` (--int8 for an int8 one)."
        )


def checkpoint_identity(data: bytes) -> tuple[str | None, str | None]:
    """(the SHA-256 of its tensor data, the header left out; when its run began) of a safetensors checkpoint's
    bytes: both stay when `digitrec calibrate` gives it another temperature or threshold (the first not with
    `--half`, which rewrites the weights). None for what the bytes do not hold."""
    import hashlib

    try:
        header, start = parse_header(data)
    except (ValueError, RecursionError):
        return None, None
    try:
        meta = json.loads(header["__metadata__"][META_KEY])
    except (ValueError, KeyError, TypeError, RecursionError):
        meta = None
    created = meta.get("created") if isinstance(meta, dict) else None
    return hashlib.sha256(data[start:]).hexdigest(), created if isinstance(created, str) else None


def _same_file(a: Path, b: str) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


class OnnxBackend:
    """An exported digitrec model on ONNX Runtime: float32 (N, 1, 28, 28) in [0, 1] -> logits (N, 10), as NumPy.

    `meta` is the source checkpoint's metadata (recipe, temperature, rejection threshold, ...) that
    `digitrec export` stored in the file, so predictions match the checkpoint's.
    """

    def __init__(self, path: str | Path, threads: int = 1, spin: bool = False):
        self.path, self.threads, self.spin = Path(path), threads, spin
        # One thread, not spinning: the Predictor's batches are small and preprocessing dominates, and a server
        # makes one model call at a time beside request workers that need the other cores.
        # read once: the session and a pickle for the workers share these bytes
        self._open(read_onnx(self.path))
        refuse_stale_export(self.path, self.meta)
        # an export of a checkpoint whose weights are NaN or infinite (`digitrec export` refuses those now, and
        # its parity check let them pass before) answers digit 0 "with confidence NaN": one blank image tells
        if not np.isfinite(self(np.zeros((1, 1, 28, 28), np.float32))).all():
            raise DigitrecError(
                f"ONNX model {self.path} holds weights that are not finite numbers (NaN or infinity): the run "
                "that wrote its checkpoint diverged; train it again (with a lower --lr) and export that."
            )

    def _open(self, model: bytes) -> None:
        self.session = onnx_session(model, threads=self.threads, spin=self.spin, name=str(self.path))
        self.model = model  # what a pickle carries: this model, whatever the file holds by then
        self.meta: dict[str, Any] = session_metadata(self.session)
        self._refuse_another_signature()
        self._one = self._bind_one()

    def _refuse_another_signature(self) -> None:
        """Refuse, in one sentence, a graph that does not take and give what `digitrec export` writes: its metadata
        copied onto another model, or an export changed since (its batch fixed to 1 for a phone: a folder then
        stopped with ONNX Runtime's traceback; 784 outputs were read as 784 digits)."""
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = list(inputs[0].shape) if len(inputs) == 1 else []
        takes = (
            len(inputs) == 1
            and inputs[0].name == INPUT_NAME
            and inputs[0].type == "tensor(float)"
            and len(shape) == 4
            and not isinstance(shape[0], int)  # any batch size
            and shape[1:] == [1, 28, 28]
        )
        gives = len(outputs) == 1 and len(outputs[0].shape) == 2 and outputs[0].shape[-1] == 10
        if not (takes and gives):
            found = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
            made = ", ".join(f"{o.name} {o.shape}" for o in outputs)
            raise DigitrecError(
                f"ONNX model {self.path} takes {found} and gives {made}, not what a digitrec export does "
                f"({INPUT_NAME} float32 [N, 1, 28, 28] for any N, logits [N, 10]); export the model again with "
                "`digitrec export`."
            )

    def _bind_one(self) -> tuple[Any, np.ndarray, np.ndarray, threading.Lock]:
        """For one image, an I/O binding to buffers allocated once: ONNX Runtime then reads the pixels and
        writes the logits in place, without the per-call allocations of session.run (about a fifth of a
        batch-1 call here)."""
        classes = 10  # _refuse_another_signature made sure
        pixels, logits = np.zeros((1, 1, 28, 28), np.float32), np.zeros((1, classes), np.float32)
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT_NAME, pixels)
        binding.bind_output(
            self.session.get_outputs()[0].name, "cpu", 0, np.float32, [1, classes], logits.ctypes.data
        )
        return binding, pixels, logits, threading.Lock()  # the buffers are shared: one call at a time

    def __getstate__(self) -> dict[str, Any]:
        """Pickled as the model's bytes and the settings (a session does not pickle), not as the file's path: a
        server's workers must run the model the server loaded, even if the file was replaced since."""
        return {"path": self.path, "model": self.model, "threads": self.threads, "spin": self.spin}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self.threads, self.spin = state["path"], state["threads"], state["spin"]
        self._open(state["model"])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(batch, dtype=np.float32).reshape(-1, 1, 28, 28)
        if len(pixels) == 1:
            binding, bound_pixels, bound_logits, lock = self._one
            with lock:
                bound_pixels[...] = pixels
                self.session.run_with_iobinding(binding)
                return bound_logits.copy()
        return self.session.run(None, {INPUT_NAME: pixels})[0]


# The architectures NumpyBackend runs, as the layers of models.py's nn.Sequential (its state-dict prefix "1.";
# "0." is the input Normalize): ("conv", index, stride, padding, has_bias), ("bn", index), ("linear", index),
# ("relu",), ("pool",) for MaxPool2d(2), ("flatten",), ("crop", border) for CenterCrop. Dropout is the identity at
# inference and is left out.
# Kernel sizes and widths come from the weights; test_numpy_backend checks each architecture against torch.
Layer = tuple[Any, ...]


def _fast_cnn_layers(padding1: int, padding2: int, crop: int = 0) -> tuple[Layer, ...]:
    i = 1 if crop else 0  # a CenterCrop first shifts every index by one
    return (
        *((("crop", crop),) if crop else ()),
        ("conv", i, 2, padding1, True),
        ("relu",),
        ("conv", i + 2, 1, padding2, True),
        ("pool",),
        ("bn", i + 4),
        ("relu",),
        ("flatten",),
        ("linear", i + 7),
        ("bn", i + 8),
        ("relu",),
        ("linear", i + 10),
    )


def _deep_cnn_layers() -> tuple[Layer, ...]:
    convs = ((0, 1, 0), (3, 1, 0), (6, 2, 2), (10, 1, 0), (13, 1, 0), (16, 2, 2), (20, 1, 0))
    blocks = [layer for i, s, p in convs for layer in (("conv", i, s, p, False), ("bn", i + 1), ("relu",))]
    return (*blocks, ("flatten",), ("linear", 25))


NUMPY_ARCHS: dict[str, tuple[Layer, ...]] = {
    "fast_cnn": _fast_cnn_layers(2, 2),
    "fast_cnn_24": _fast_cnn_layers(2, 2, crop=2),
    "fast_cnn_wide": _fast_cnn_layers(2, 2),
    "fast_cnn_lite": _fast_cnn_layers(0, 1),
    "fast_cnn_crop": _fast_cnn_layers(0, 1, crop=2),
    "deep_cnn": _deep_cnn_layers(),
    "deep_cnn_d2": _deep_cnn_layers(),
}
_BN_EPS = 1e-5  # nn.BatchNorm's default
# Images per forward pass: as many as keep the largest im2col matrix (_conv2d's windows) near this many floats
# (8 MB): 12 images of the bundled deep_cnn, about 100-150 of the fast CNNs. More spill out of the caches (64 of
# deep_cnn's make 42 MB and run 1.3-1.4x slower per image), fewer pay the per-call overhead more often.
WINDOW_FLOATS = 2 * 2**20
_AFFINE, _NORM = ("weight", "bias"), ("weight", "bias", "running_mean", "running_var")


def _state_keys(layers: tuple[Layer, ...]) -> set[str]:
    """The state dict a model with these layers has (what load_state_dict(strict=True) checks)."""
    keys = {"0.mean", "0.std"}
    for layer in layers:
        op = layer[0]
        if op == "conv":
            keys |= {f"1.{layer[1]}.weight"} | ({f"1.{layer[1]}.bias"} if layer[4] else set())
        elif op in ("bn", "linear"):
            keys |= {f"1.{layer[1]}.{name}" for name in (_NORM if op == "bn" else _AFFINE)}
    return keys


def _conv2d(
    x: np.ndarray, columns_weight: np.ndarray, bias: np.ndarray, k: int, stride: int, padding: int
) -> np.ndarray:
    """nn.Conv2d on channels-last (N, H, W, C) input with a square k x k kernel, as one matrix product over the
    input's windows; `columns_weight` is the torch weight arranged as (k * k * C, C_out)."""
    if padding:  # zeros around the image (np.pad costs more than the copy itself at these sizes)
        n, h, w, c = x.shape
        padded = np.zeros((n, h + 2 * padding, w + 2 * padding, c), dtype=x.dtype)
        padded[:, padding:-padding, padding:-padding] = x
        x = padded
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))[:, ::stride, ::stride]
    n, h, w = windows.shape[:3]
    # (N, H, W, C, k, k) -> (N, H, W, k, k, C): the copy then gathers runs of C contiguous floats.
    columns = windows.transpose(0, 1, 2, 4, 5, 3).reshape(n * h * w, -1)
    return (columns @ columns_weight + bias).reshape(n, h, w, -1)


def _bn_affine(t: dict[str, np.ndarray], name: str) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm at inference as y = x * scale + shift, per channel."""
    scale = t[f"{name}.weight"] / np.sqrt(t[f"{name}.running_var"] + np.float32(_BN_EPS))
    return scale, t[f"{name}.bias"] - t[f"{name}.running_mean"] * scale


class NumpyBackend:
    """A checkpoint of an architecture in NUMPY_ARCHS run by NumPy in float32: the PyTorch model's logits (to
    ~1e-5) without importing torch, which takes longer to import than `digitrec predict` takes for one image.

    It works channels-last, and folds a BatchNorm that directly follows a convolution into that convolution.
    """

    def __init__(self, tensors: dict[str, np.ndarray], arch: str, layers: tuple[Layer, ...] | None = None):
        t = {k: v.astype(np.float32) for k, v in tensors.items() if not k.endswith(".num_batches_tracked")}
        layers = layers or NUMPY_ARCHS[arch]  # another network in the same notation (pairs.PAIR_LAYERS)
        expected = _state_keys(layers)
        if set(t) != expected:  # what load_state_dict(strict=True) checks
            raise KeyError(sorted(set(t) ^ expected))
        self.mean, self.std = t["0.mean"], t["0.std"]
        self.ops: list[tuple[Any, ...]] = []
        i = 0
        while i < len(layers):
            op, *args = layers[i]
            name = f"1.{args[0]}" if args else ""
            if op == "conv":
                weight = t[f"{name}.weight"]  # (C_out, C_in, k, k)
                bias = t[f"{name}.bias"] if args[3] else np.zeros(len(weight), np.float32)
                if i + 1 < len(layers) and layers[i + 1][0] == "bn":  # conv then BN: one conv, scaled weights
                    scale, shift = _bn_affine(t, f"1.{layers[i + 1][1]}")
                    weight, bias = weight * scale[:, None, None, None], bias * scale + shift
                    i += 1
                # (C_out, C_in, k, k) -> (k * k * C_in, C_out), the order of _conv2d's columns
                columns = np.ascontiguousarray(weight.transpose(2, 3, 1, 0).reshape(-1, len(weight)))
                self.ops.append(("conv", columns, bias, weight.shape[-1], *args[1:3]))
            elif op == "bn":
                self.ops.append(("affine", *_bn_affine(t, name)))
            elif op == "linear":
                self.ops.append(("linear", np.ascontiguousarray(t[f"{name}.weight"].T), t[f"{name}.bias"]))
            else:  # relu, pool, flatten; crop keeps its border
                self.ops.append((op, *args))
            i += 1
        self.chunk = max(1, WINDOW_FLOATS // self._largest_windows())
        self(np.zeros((1, 1, 28, 28), np.float32))  # wrong names or shapes fail here, at load time

    def _largest_windows(self) -> int:
        """Floats in the largest im2col matrix one image makes (_conv2d's columns), from the layers' shapes."""
        height = width = 28
        largest = 1
        for op, *args in self.ops:
            if op == "conv":
                columns, _, k, stride, padding = args
                height = (height + 2 * padding - k) // stride + 1
                width = (width + 2 * padding - k) // stride + 1
                largest = max(largest, height * width * len(columns))
            elif op == "pool":
                height, width = height // 2, width // 2
            elif op == "crop":
                height, width = height - 2 * args[0], width - 2 * args[0]
        return largest

    @classmethod
    def load(cls, path: str | Path) -> tuple[NumpyBackend | NumpyEnsemble, dict[str, Any]] | None:
        """(backend, metadata) for a checkpoint NumPy can run (an ensemble of such models too); None for another
        architecture or bfloat16 weights."""
        from .checkpoint import (
            _model_spec,
            load_arrays,
            member_specs,
            refuse_resume_checkpoint,
            refuse_unusable_weights,
        )
        from .errors import CheckpointError

        try:
            tensors, meta = load_arrays(path)
        except KeyError:  # a tensor type NumPy does not have
            return None
        refuse_resume_checkpoint(path, meta, tensors)
        refuse_unusable_weights(path, tensors)
        specs = member_specs(path, meta)
        if specs is not None:
            ensemble = NumpyEnsemble.build(path, tensors, [arch for arch, _ in specs])
            return None if ensemble is None else (ensemble, meta)
        arch, _ = _model_spec(path, meta)
        if arch not in NUMPY_ARCHS:
            return None
        try:
            return cls(tensors, arch), meta
        except (KeyError, ValueError):
            raise CheckpointError(
                f"checkpoint {path} does not fit architecture {arch!r}; it is damaged or from another version."
            ) from None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x: np.ndarray = np.asarray(batch, dtype=np.float32).reshape(-1, 28, 28, 1)  # 1 channel: NCHW = NHWC
        # A deep model's windows for 1,000 images fill hundreds of MB; chunks that fit the caches run faster.
        if len(x) > self.chunk:
            return np.concatenate([self(x[i : i + self.chunk]) for i in range(0, len(x), self.chunk)])
        x = (x - self.mean) / self.std
        for op, *args in self.ops:
            if op == "conv":
                x = _conv2d(x, *args)
            elif op == "affine":
                x = x * args[0] + args[1]
            elif op == "linear":
                x = x @ args[0] + args[1]
            elif op == "relu":
                x = np.maximum(x, 0)
            elif op == "pool":  # MaxPool2d(2)
                n, h, w, c = x.shape
                x = x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
            elif op == "crop":  # CenterCrop
                b = args[0]
                x = x[:, b : x.shape[1] - b, b : x.shape[2] - b]
            elif op == "flatten":  # in torch's (C, H, W) order
                x = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
        return x


class NumpyEnsemble:
    """`models.Ensemble` in NumPy: the log of its members' mean probabilities, each at its own temperature."""

    def __init__(self, members: list[NumpyBackend], temperatures: np.ndarray):
        self.members, self.temperatures = members, [float(t) for t in temperatures]

    @classmethod
    def build(
        cls, path: str | Path, tensors: dict[str, np.ndarray], archs: list[str]
    ) -> NumpyEnsemble | None:
        from .errors import CheckpointError

        if any(arch not in NUMPY_ARCHS for arch in archs):
            return None
        parts: list[dict[str, np.ndarray]] = [{} for _ in archs]
        for key, value in tensors.items():
            head, index, name = (key.split(".", 2) + ["", ""])[:3]  # members.<i>.<the member's own key>
            if head == "members" and index.isdigit() and int(index) < len(parts):
                parts[int(index)][name] = value
            elif key != "temperatures":
                raise CheckpointError(
                    f"checkpoint {path} holds {key!r}, which is no member's; it is damaged."
                )
        try:
            members = [NumpyBackend(part, arch) for part, arch in zip(parts, archs)]
            temperatures = tensors["temperatures"].astype(np.float32).reshape(len(archs))
        except (KeyError, ValueError):
            raise CheckpointError(
                f"checkpoint {path} does not fit its members' architectures; it is damaged or from another version."
            ) from None
        return cls(members, temperatures)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        from .tta import mean_log_probabilities  # the same mean over copies, here one copy per member

        logits = [member(batch) / t for member, t in zip(self.members, self.temperatures)]
        return mean_log_probabilities(np.concatenate(logits), len(logits))
