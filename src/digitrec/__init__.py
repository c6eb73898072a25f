"""digitrec: learn to read handwritten digits on MNIST, then read them for real people.

The public API, imported lazily so that `import digitrec` (and `digitrec predict`) start fast:

>>> import digitrec
>>> run = digitrec.train("fast", "runs/api", epochs=1)            # or a TrainConfig, or a TOML file
>>> predictor = digitrec.Predictor.load(run.model_path)          # a run folder, .safetensors or .onnx
>>> image = digitrec.load_mnist().test_images[0].numpy()         # paths, bytes, PIL images, arrays, tensors
>>> [result] = predictor.predict(image)
>>> isinstance(result, digitrec.Prediction), len(result.probabilities)
(True, 10)
>>> result.rejected == (result.digit is None)
True
>>> import numpy as np
>>> predictor.predict(np.zeros((28, 28), np.uint8))[0].rejected  # a blank page is not a digit
True

`digitrec.Predictor.pretrained()` loads the model bundled with the package, and `predictor.read(image)`
reads the handwritten numbers in a photo, one per line of writing.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import DigitrecError

__version__ = "0.1.0"

# name -> module that defines it; each is imported on first use (PEP 562)
_LAZY = {
    "Predictor": "predict",
    "Prediction": "predict",
    "ReadResult": "predict",
    "DigitBox": "predict",
    "Run": "training",
    "TrainConfig": "config",
    "RECIPES": "config",
    "MNIST": "data",
    "load_mnist": "data",
}
__all__ = ["DigitrecError", "train", "__version__", *_LAZY]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ below provides them
    from .api import train as train
    from .config import RECIPES as RECIPES
    from .config import TrainConfig as TrainConfig
    from .data import MNIST as MNIST
    from .data import load_mnist as load_mnist
    from .predict import DigitBox as DigitBox
    from .predict import Prediction as Prediction
    from .predict import Predictor as Predictor
    from .predict import ReadResult as ReadResult
    from .training import Run as Run


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name == "train":  # the friendly function; the training loop itself lives in digitrec.training
        from .api import train

        globals()["train"] = train
        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names and the submodules loaded so far; not this file's own imports (Any, import_module)."""
    own = {"annotations", "import_module", "TYPE_CHECKING", "Any"}
    return sorted({name for name in globals() if not name.startswith("_") and name not in own} | set(__all__))
