"""Every architecture digitrec knows, and a registry name -> constructor.

All models take float pixels in [0, 1] shaped (N, 1, 28, 28), white ink on black as in MNIST, and return
logits (N, 10). Normalization is the model's first layer, so a checkpoint carries it and callers never
have to know a recipe's mean and std.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .config import MNIST_MEAN_STD
from .errors import DigitrecError


class CenterCrop(nn.Module):
    """Drop `border` pixels on each side: MNIST centres each digit's 20x20 box by its centre of mass in 28x28, so the
    outer 2 pixels hold 0.23% of the training set's ink (a view, no copy)."""

    def __init__(self, border: int):
        super().__init__()
        self.border = border

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.border
        return x[..., b : x.shape[-2] - b, b : x.shape[-1] - b]

    def extra_repr(self) -> str:
        return f"border={self.border}"


class Normalize(nn.Module):
    """(x - mean) / std with the recipe's constants stored as buffers, so they travel with the weights."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class _FlattenKeepingLayout(torch.autograd.Function):
    """flatten(1) whose gradient comes back in the input's memory format.

    nn.Flatten's gradient is a contiguous (NCHW) tensor. Under channels_last the layers before it (ReLU,
    BatchNorm, max-pool) then run their backward on mixed layouts, which PyTorch's CPU kernels do 4-16x
    slower than on matching ones (measured for 192x32x6x6 bfloat16: ReLU 1296 vs 79 us).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.shape = x.shape
        ctx.channels_last = (
            x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        )
        return x.flatten(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.reshape(ctx.shape)
        return grad.contiguous(memory_format=torch.channels_last) if ctx.channels_last else grad


class Flatten(nn.Flatten):
    """nn.Flatten (same result, same state dict) whose backward keeps a channels_last layout; see above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return _FlattenKeepingLayout.apply(x)
        return x.flatten(1)


def mlp_500_256() -> nn.Module:
    """Seed 004: 784-500-256-10 with ReLU."""
    return nn.Sequential(
        Flatten(), nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def mlp_bn_300_100() -> nn.Module:
    """Seed 001: 784-300-100-10, each hidden layer Linear -> BatchNorm -> ReLU."""
    return nn.Sequential(
        Flatten(),
        nn.Linear(784, 300),
        nn.BatchNorm1d(300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.BatchNorm1d(100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


def mlp_dropout_512_256() -> nn.Module:
    """Seed 003 plan one: 784-512-256-10 with ReLU and dropout 0.2."""
    return nn.Sequential(
        Flatten(),
        nn.Linear(784, 512),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(256, 10),
    )


def lenet() -> nn.Module:
    """Seed 002: conv 1->10 5x5, ReLU, pool; conv 10->20 5x5, ReLU, pool; fc 320-50-10.

    The document's fully connected block has no activation between its two layers; we keep that quirk.
    """
    return nn.Sequential(
        nn.Conv2d(1, 10, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(10, 20, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        Flatten(),
        nn.Linear(320, 50),
        nn.Linear(50, 10),
    )


def plain_cnn() -> nn.Module:
    """Seed 000's 'plain CNN' (its document names no layers): conv16-5 pool, conv32-5 pool, fc 1568-10."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]


def bn_cnn() -> nn.Module:
    """Seed 003 plan two: (conv32 x2, pool, dropout) (conv64 x2, pool, dropout), fc 3136-512-10, BatchNorm throughout."""
    return nn.Sequential(
        *_conv_bn(1, 32),
        *_conv_bn(32, 32),
        nn.MaxPool2d(2),
        nn.Dropout(0.25),
        *_conv_bn(32, 64),
        *_conv_bn(64, 64),
        nn.MaxPool2d(2),
        nn.Dropout(0.25),
        Flatten(),
        nn.Linear(64 * 7 * 7, 512),
        nn.BatchNorm1d(512),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(512, 10),
    )


def _fast_cnn(width: int, hidden: int, crop: int = 0) -> nn.Module:
    """A strided 5x5 conv, a second 5x5 conv, one pool and a small head: few memory-bound layers, so it is fast.

    conv 1->w 5x5 stride 2 (14x14) -> ReLU; conv w->2w 5x5 (14x14) -> max-pool 2 (7x7) -> BatchNorm -> ReLU;
    linear 2w*49 -> hidden -> BatchNorm -> ReLU -> linear hidden -> 10. With `crop`, a CenterCrop(crop) first
    and maps of (28 - 2 crop) / 2 pixels a side, half that after the pool.
    """
    side = (28 - 2 * crop) // 4
    return nn.Sequential(
        *([CenterCrop(crop)] if crop else []),
        nn.Conv2d(1, width, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 5, padding=2),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        Flatten(),
        nn.Linear(2 * width * side * side, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def fast_cnn() -> nn.Module:
    """digitrec `default` until 2026-12-06: the 216k-parameter CNN (width 16, hidden 128) of the known fast ground."""
    return _fast_cnn(16, 128)


def fast_cnn_24() -> nn.Module:
    """digitrec `default`: fast_cnn on the centre 24x24 of the image, 0.73x its multiply-adds (162k parameters).

    crop 2 px (24x24) -> conv 1->16 5x5 stride 2 (12x12) -> ReLU; conv 16->32 5x5 (12x12) -> max-pool 2 (6x6)
    -> BatchNorm -> ReLU; linear 1152 -> 128 -> BatchNorm -> ReLU -> linear 128 -> 10.
    """
    return _fast_cnn(16, 128, crop=2)


def fast_cnn_wide() -> nn.Module:
    """The fast CNN at width 32 and hidden 256 (about 0.86M parameters): `robust`'s model before deep_cnn."""
    return _fast_cnn(32, 256)


def _lite_layers(side: int) -> list[nn.Module]:
    """fast_cnn_lite's layers for an input whose first conv output is side*2 pixels wide (pooled to side)."""
    return [
        nn.Conv2d(1, 16, 5, stride=2),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        Flatten(),
        nn.Linear(32 * side * side, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Linear(128, 10),
    ]


def fast_cnn_lite() -> nn.Module:
    """digitrec `fast` until 2026-12-04: a third of fast_cnn's multiply-adds (154k parameters), for training and inference speed.

    conv 1->16 5x5 stride 2 without padding (12x12) -> ReLU; conv 16->32 3x3 -> max-pool 2 (6x6) -> BatchNorm
    -> ReLU; linear 1152 -> 128 -> BatchNorm -> ReLU -> linear 128 -> 10. With no padding on the first conv,
    inference folds the input normalization into it, and both BatchNorms fold into the layers before them.
    """
    return nn.Sequential(*_lite_layers(6))


def fast_cnn_crop() -> nn.Module:
    """digitrec `fast`: fast_cnn_lite on the centre 24x24 of the image, 0.69x its multiply-adds (109k parameters).

    crop 2 px (24x24) -> conv 1->16 5x5 stride 2 (10x10) -> ReLU; conv 16->32 3x3 -> max-pool 2 (5x5) -> BatchNorm
    -> ReLU; linear 800 -> 128 -> BatchNorm -> ReLU -> linear 128 -> 10.
    """
    return nn.Sequential(CenterCrop(2), *_lite_layers(5))


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]


def deep_cnn(dropout: float = 0.4) -> nn.Module:
    """digitrec `robust` (the bundled model): seven conv layers with BatchNorm and dropout 0.4, the single model
    of top Kaggle MNIST ensembles.

    conv32 3x3, conv32 3x3, conv32 5x5 stride 2 (12x12), dropout; conv64 3x3, conv64 3x3, conv64 5x5 stride 2
    (4x4), dropout; conv128 4x4 (1x1), dropout, linear 128 -> 10. About 15M multiply-adds per image.
    """
    return nn.Sequential(
        *_conv_bn_relu(1, 32, 3),
        *_conv_bn_relu(32, 32, 3),
        *_conv_bn_relu(32, 32, 5, 2, 2),
        nn.Dropout(dropout),
        *_conv_bn_relu(32, 64, 3),
        *_conv_bn_relu(64, 64, 3),
        *_conv_bn_relu(64, 64, 5, 2, 2),
        nn.Dropout(dropout),
        *_conv_bn_relu(64, 128, 4),
        Flatten(),
        nn.Dropout(dropout),
        nn.Linear(128, 10),
    )


def deep_cnn_d2() -> nn.Module:
    """digitrec `best`: deep_cnn with dropout 0.2 instead of 0.4 (chosen on the validation split, 2026-12-04).

    The same layers and state dict as deep_cnn; only training differs.
    """
    return deep_cnn(dropout=0.2)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp_500_256": mlp_500_256,
    "mlp_bn_300_100": mlp_bn_300_100,
    "mlp_dropout_512_256": mlp_dropout_512_256,
    "lenet": lenet,
    "plain_cnn": plain_cnn,
    "bn_cnn": bn_cnn,
    "fast_cnn": fast_cnn,
    "fast_cnn_24": fast_cnn_24,
    "fast_cnn_wide": fast_cnn_wide,
    "fast_cnn_lite": fast_cnn_lite,
    "fast_cnn_crop": fast_cnn_crop,
    "deep_cnn": deep_cnn,
    "deep_cnn_d2": deep_cnn_d2,
}


def create_model(arch: str, normalize: tuple[float, float] = MNIST_MEAN_STD) -> nn.Sequential:
    """Build `arch` with its input normalization as the first layer (index 0)."""
    try:
        body = MODELS[arch]()
    except KeyError:
        raise DigitrecError(f"unknown architecture {arch!r}; run `digitrec models` to list them.") from None
    return nn.Sequential(Normalize(*normalize), body)


class Ensemble(nn.Module):
    """Several trained models voting: the mean of their calibrated probabilities, as `digitrec ensemble` scores.

    Each member's logits are divided by its own temperature (from its `digitrec calibrate`; 1 if it has none)
    and turned into probabilities; the output is the log of their mean, which stands where logits stand (its
    softmax is that mean), so the ensemble is calibrated on top like any model. `digitrec ensemble A B --out
    FILE` writes one.
    """

    temperatures: torch.Tensor

    def __init__(self, members: Sequence[nn.Module], temperatures: Sequence[float] | None = None):
        super().__init__()
        self.members = nn.ModuleList(members)
        temperatures = [1.0] * len(self.members) if temperatures is None else [float(t) for t in temperatures]
        self.register_buffer("temperatures", torch.tensor(temperatures))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        votes = [
            torch.log_softmax(member(x).float() / self.temperatures[i], dim=1)
            for i, member in enumerate(self.members)
        ]
        return log_mean_probabilities(votes)


def log_mean_probabilities(log_probabilities: Sequence[torch.Tensor]) -> torch.Tensor:
    """K log probabilities (N, C) -> (N, C) the log of their mean: an ensemble's vote, test-time views' mean
    (tta.mean_log_probabilities is the NumPy side). It stands where logits stand: its softmax is that mean.
    K is counted in Python, so an ONNX trace keeps it a constant."""
    return torch.logsumexp(torch.stack(list(log_probabilities)), dim=0) - math.log(len(log_probabilities))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
