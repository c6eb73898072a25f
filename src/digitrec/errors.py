"""The one exception type for mistakes a user can cause: its message is one sentence saying what to do."""

from collections.abc import Sequence
from importlib.util import find_spec

# pyproject.toml's optional extras, by the modules a command imports from them (tests/test_errors.py checks
# them against pyproject.toml; its `docs` and `dev` extras serve no command)
EXTRAS = {
    # fastapi_offline is optional (offline /docs), and uvloop (uvicorn's faster event loop, not on Windows)
    "web": ("fastapi", "uvicorn", "httptools", "python_multipart", "threadpoolctl"),
    "export": ("onnx", "onnxscript", "onnxruntime"),
    "int8": ("torchao",),
    "explore": ("sklearn",),
    "tune": ("optuna",),
    "tensorboard": ("tensorboard",),
}


class DigitrecError(Exception):
    """A user-facing error (missing file, corrupt download, bad image, bad flag): the CLI prints it without a traceback."""


class DataError(DigitrecError):
    """MNIST files are missing, truncated, corrupt or fail verification."""


class CheckpointError(DigitrecError):
    """A checkpoint is missing, truncated, tampered with or not one of ours."""


class TrainingDiverged(DigitrecError):
    """A training run whose loss (or weights) stopped being finite numbers: it stops there, before it writes a
    checkpoint of NaN weights or metrics that claim a result. `quiet` on the ranks other than 0 of a distributed
    run, which stop with it: rank 0 says the sentence, once."""

    def __init__(self, message: str, quiet: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet


class ImageError(DigitrecError):
    """An input image cannot be read or is unusable (empty, too large, not an image)."""


class ImageTooLargeError(ImageError):
    """An input image has more pixels than we agree to decode (the server answers 413 instead of 400)."""


class FeedbackFullError(DigitrecError):
    """A correction the feedback database has no room for: its size limit or its disk is full (the server
    answers 507 instead of 400)."""


def need_extra(extra: str, what: str, modules: tuple[str, ...] | None = None, instead: str = "") -> None:
    """Refuse, in one sentence naming the pip extra, to start `what` without the modules it needs (all of the
    extra's, or the given ones); `instead` adds another way out."""
    missing = [name for name in modules or EXTRAS[extra] if find_spec(name) is None]
    if missing:
        raise DigitrecError(
            f"{what} needs the {extra} extra ({', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
            f'installed): `pip install "digitrec[{extra}]"`, or in a checkout `pip install -e ".[{extra}]"`'
            f"{instead}."
        )


def refuse_repeats(flag: str, names: Sequence[str]) -> None:
    """Refuse, in one sentence, a list flag that names something more than once (its work would run twice)."""
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DigitrecError(f"{flag} names {', '.join(repeated)} more than once; give each once.")


def shortened(text: str, limit: int = 40) -> str:
    """A value quoted in an error sentence, cut to `limit` characters: a 3 MB label made a 3 MB answer."""
    return text if len(text) <= limit else f"{text[: limit - 3]}... ({len(text):,} characters)"
