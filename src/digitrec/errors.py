"""The one exception type for mistakes a user can cause: its message is one sentence saying what to do."""


class DigitrecError(Exception):
    """A user-facing error (missing file, corrupt download, bad image, bad flag): the CLI prints it without a traceback."""


class DataError(DigitrecError):
    """MNIST files are missing, truncated, corrupt or fail verification."""


class CheckpointError(DigitrecError):
    """A checkpoint is missing, truncated, tampered with or not one of ours."""


class ImageError(DigitrecError):
    """An input image cannot be read or is unusable (empty, too large, not an image)."""


class ImageTooLargeError(ImageError):
    """An input image has more pixels than we agree to decode (the server answers 413 instead of 400)."""
