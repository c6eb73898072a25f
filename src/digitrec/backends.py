"""Inference beside PyTorch: ONNX Runtime sessions, a NumPy forward pass of the fast CNNs, and models the
Predictor calls like the PyTorch one.

Nothing here imports torch, so a command that runs an exported model (or the bundled one) starts without it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DigitrecError

INPUT_NAME, OUTPUT_NAME = "pixels", "logits"
META_KEY = "digitrec"  # the ONNX metadata entry holding the source checkpoint's metadata as JSON


def onnx_session(source: str | Path | bytes, threads: int = 0, spin: bool = True):
    """An ONNX Runtime CPU session with every graph optimization on; `threads` 0 = one per core."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise DigitrecError(
            "ONNX Runtime is not installed; install it with `pip install digitrec[export]`."
        ) from None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or (os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    # Spinning threads answer back-to-back calls sooner but keep a core busy while idle.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if isinstance(source, Path):
        source = str(source)
    if isinstance(source, str) and not Path(source).exists():
        raise DigitrecError(f"ONNX model {source} does not exist; export one with `digitrec export MODEL`.")
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for unreadable or invalid files
        name = source if isinstance(source, str) else "the exported model"
        raise DigitrecError(
            f"ONNX Runtime cannot load {name}; it is not a valid ONNX model ({type(exc).__name__})."
        ) from None


def session_metadata(session) -> dict[str, Any]:
    """The digitrec metadata an exported model carries: its source checkpoint's, plus an `export` entry."""
    text = session.get_modelmeta().custom_metadata_map.get(META_KEY)
    if text is None:
        raise DigitrecError(
            "this ONNX model was not exported by `digitrec export`; export the checkpoint with it."
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise DigitrecError("the ONNX model's digitrec metadata is damaged; export it again.") from None


def onnx_metadata(path: str | Path) -> dict[str, Any]:
    return session_metadata(onnx_session(path, threads=1, spin=False))


class OnnxBackend:
    """An exported digitrec model on ONNX Runtime: float32 (N, 1, 28, 28) in [0, 1] -> logits (N, 10), as NumPy.

    `meta` is the source checkpoint's metadata (recipe, temperature, rejection threshold, ...) that
    `digitrec export` stored in the file, so predictions match the checkpoint's.
    """

    def __init__(self, path: str | Path, threads: int = 1, spin: bool = False):
        self.path = Path(path)
        # One thread, not spinning: the Predictor's batches are small and preprocessing dominates, and a server
        # makes one model call at a time beside request workers that need the other cores.
        self.session = onnx_session(self.path, threads=threads, spin=spin)
        self.meta: dict[str, Any] = session_metadata(self.session)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(batch, dtype=np.float32).reshape(-1, 1, 28, 28)
        return self.session.run(None, {INPUT_NAME: pixels})[0]


# The architectures NumpyBackend runs: models.py's fast CNN family, as (first conv's stride and padding,
# second conv's padding); kernel sizes and widths come from the weights. test_backends checks each against torch.
NUMPY_ARCHS = {"fast_cnn": (2, 2, 2), "fast_cnn_wide": (2, 2, 2), "fast_cnn_lite": (2, 0, 1)}
_BN_EPS = 1e-5  # nn.BatchNorm's default
_AFFINE, _NORM = ("weight", "bias"), ("weight", "bias", "running_mean", "running_var")
_NUMPY_KEYS = {"0.mean", "0.std"} | {
    f"1.{i}.{name}"
    for i, names in ((0, _AFFINE), (2, _AFFINE), (4, _NORM), (7, _AFFINE), (8, _NORM), (10, _AFFINE))
    for name in names
}


def _conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int, padding: int) -> np.ndarray:
    """nn.Conv2d on (N, C, H, W) with a square kernel, as one matrix product over the input's windows."""
    k = weight.shape[-1]
    if padding:
        x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    n, c, h, w = windows.shape[:4]
    columns = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * w, c * k * k)
    out = columns @ weight.reshape(len(weight), -1).T + bias
    return np.ascontiguousarray(out.reshape(n, h, w, -1).transpose(0, 3, 1, 2))


def _batch_norm(x: np.ndarray, t: dict[str, np.ndarray], name: str) -> np.ndarray:
    shape = (1, -1) + (1,) * (x.ndim - 2)
    scale = t[f"{name}.weight"] / np.sqrt(t[f"{name}.running_var"] + np.float32(_BN_EPS))
    return (x - t[f"{name}.running_mean"].reshape(shape)) * scale.reshape(shape) + t[f"{name}.bias"].reshape(
        shape
    )


class NumpyBackend:
    """A fast CNN checkpoint (NUMPY_ARCHS) run by NumPy in float32: the PyTorch model's logits (to ~1e-6)
    without importing torch, which takes longer to import than `digitrec predict` takes for one image."""

    def __init__(self, tensors: dict[str, np.ndarray], arch: str):
        self.stride, self.padding1, self.padding2 = NUMPY_ARCHS[arch]
        self.t = {
            k: v.astype(np.float32) for k, v in tensors.items() if not k.endswith(".num_batches_tracked")
        }
        if set(self.t) != _NUMPY_KEYS:  # what load_state_dict(strict=True) checks
            raise KeyError(sorted(set(self.t) ^ _NUMPY_KEYS))
        self(np.zeros((1, 1, 28, 28), np.float32))  # wrong names or shapes fail here, at load time

    @classmethod
    def load(cls, path: str | Path) -> tuple[NumpyBackend, dict[str, Any]] | None:
        """(backend, metadata) for a checkpoint NumPy can run; None for another architecture or bfloat16 weights."""
        from .checkpoint import _model_spec, load_arrays
        from .errors import CheckpointError

        try:
            tensors, meta = load_arrays(path)
        except KeyError:  # a tensor type NumPy does not have
            return None
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
        t = self.t
        x = np.asarray(batch, dtype=np.float32).reshape(-1, 1, 28, 28)
        x = (x - t["0.mean"]) / t["0.std"]
        x = np.maximum(_conv2d(x, t["1.0.weight"], t["1.0.bias"], self.stride, self.padding1), 0)
        x = _conv2d(x, t["1.2.weight"], t["1.2.bias"], 1, self.padding2)
        n, c, h, w = x.shape
        x = x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))  # MaxPool2d(2)
        x = np.maximum(_batch_norm(x, t, "1.4"), 0).reshape(n, -1)
        x = np.maximum(_batch_norm(x @ t["1.7.weight"].T + t["1.7.bias"], t, "1.8"), 0)
        return x @ t["1.10.weight"].T + t["1.10.bias"]
