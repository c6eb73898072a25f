"""Inference beside PyTorch: ONNX Runtime sessions, and a model the Predictor calls like the PyTorch one.

Nothing here imports torch, so a command that runs an exported model starts without it.
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
