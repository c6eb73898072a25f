"""digitrec: learn to read handwritten digits on MNIST, then read them for real people."""

__version__ = "0.1.0"
