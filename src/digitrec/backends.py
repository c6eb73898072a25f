"""Inference backends beside PyTorch: an ONNX Runtime model that the Predictor calls like the PyTorch one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

BACKENDS = ("torch", "onnx")


class OnnxBackend:
    """An exported digitrec model on ONNX Runtime: float32 (N, 1, 28, 28) in [0, 1] -> logits (N, 10), as NumPy.

    `meta` is the source checkpoint's metadata (recipe, temperature, rejection threshold, ...) that
    `digitrec export` stored in the file, so predictions match the checkpoint's.
    """

    def __init__(self, path: str | Path, threads: int = 0, spin: bool = False):
        from .export import onnx_metadata, onnx_session

        self.path = Path(path)
        self.meta: dict[str, Any] = onnx_metadata(self.path)
        # No spinning by default: a CLI or server mostly waits, and a spinning pool would hold a core busy.
        self.session = onnx_session(self.path, threads=threads, spin=spin)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        from .export import INPUT_NAME

        pixels = np.ascontiguousarray(batch, dtype=np.float32).reshape(-1, 1, 28, 28)
        return self.session.run(None, {INPUT_NAME: pixels})[0]
