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
reads a whole number from one line of digits.
"""

from __future__ import annotations

import sys
import types
from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import DigitrecError

__version__ = "0.1.0"

# name -> module that defines it; each is imported on first use (PEP 562)
_LAZY = {
    "Predictor": "predict", "Prediction": "predict", "ReadResult": "predict", "DigitBox": "predict",
    "Run": "train", "TrainConfig": "config", "RECIPES": "config", "MNIST": "data", "load_mnist": "data",
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
    from .train import Run as Run


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name == "train":
        return import_module(".train", __name__)  # callable: see _Package below
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _TrainModule(types.ModuleType):
    """The `digitrec.train` submodule, callable as the friendly `digitrec.api.train()`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .api import train

        return train(*args, **kwargs)


class _Package(types.ModuleType):
    """`digitrec.train` is both the training-loop module and the function `digitrec.train(config)`.

    Importing a submodule sets it as an attribute of its package, which would hide any function of the same
    name; instead, the moment the submodule is set here it becomes callable, so both uses keep working.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "train" and isinstance(value, types.ModuleType):
            value.__class__ = _TrainModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
