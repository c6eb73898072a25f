"""Export a checkpoint to ONNX (float32 or static int8), check it against PyTorch, and record where it came from.

The exported model takes what every digitrec model takes: float32 pixels (N, 1, 28, 28) in [0, 1], white
ink on black, any batch size N; it returns logits (N, 10), and the digit probabilities are
softmax(logits / temperature). Its metadata names the source checkpoint (path and SHA-256), states that
formula with the temperature and the rejection threshold (reject_below), and carries the checkpoint's own
metadata, so a Predictor built on it answers exactly as one built on the checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from . import tta
from .backends import (
    INPUT_NAME,
    OUTPUT_NAME,
    checkpoint_identity,
    export_source_sha256,
    onnx_session,
    softmax,
)
from .checkpoint import (
    META_KEY,
    atomic_write_bytes,
    model_file,
    read_checkpoint,
    valid_utf8,
)
from .errors import DigitrecError

OPSET = 18
FLOAT_TOLERANCE = 1e-4  # largest |probability difference| allowed between PyTorch and ONNX Runtime
INT8_MAX_DROP = 0.001  # largest test-accuracy drop allowed for int8 (0.1 point)
CALIBRATION_IMAGES = 2048  # training images that set the int8 activation ranges


@dataclass
class ExportResult:
    """What `export_onnx` wrote and measured."""

    path: Path
    precision: str  # "float32" or "int8"
    max_prob_diff: float  # against the PyTorch float32 model, on the parity images
    parity_images: int
    torch_accuracy: float | None = None  # test accuracy of the checkpoint in PyTorch (float32)
    onnx_accuracy: float | None = None  # test accuracy of the exported model in ONNX Runtime
    tta_views: int = 1  # the recipe's test-time augmentation, which the Predictor runs on top of the graph


def costs_too_much(reference: float, quantized: float, images: int, max_drop: float) -> bool:
    """Does the quantized model get more than `max_drop` of `images` fewer right? Counted in whole images: the
    fractions' difference said 10 of 10,000 was 0.0010000000000000009, more than 0.001."""
    lost = round(reference * images) - round(quantized * images)
    return lost > max_drop * images * (1 + 1e-9)  # the allowance's own rounding (0.001 x 10,000) allowed for


# ---------------------------------------------------------------- inference-only rewrites


def _fold_into(layer: nn.Conv2d | nn.Linear, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> None:
    """Scale `layer`'s output channels so that layer -> bn becomes one layer (bn in eval mode)."""
    assert bn.running_var is not None and bn.running_mean is not None  # callers check track_running_stats
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    shape = (-1,) + (1,) * (layer.weight.ndim - 1)
    layer.weight = nn.Parameter(layer.weight * scale.reshape(shape))
    layer.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)


class FlattenChannelsLast(nn.Module):
    """Flatten (N, C, H, W) in (H, W, C) order: on channels-last memory, as oneDNN's and ONNX Runtime's int8
    convolutions leave it, a view instead of a copy. The linear layer after it takes its columns in that order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).flatten(1)


def inference_model(model: nn.Module, flatten_channels_last: bool = False) -> nn.Module:
    """A copy of `model` in eval mode with the work that inference does not need folded away.

    Every BatchNorm folds into the conv or linear layer before it; one after a max-pool folds into the conv
    before the pool only where its scale is positive on every channel, because a positive per-channel affine
    map commutes with max (otherwise it stays). A ReLU right after a max-pool moves before it (ReLU keeps
    order, so the two commute): the conv before then ends in its ReLU, which ONNX Runtime and oneDNN fuse into it,
    and int8 models pool uint8 values (ONNX Runtime's int8 export lost the ReLU after the pool in its QOperator
    format: 2% of the answers changed). The input normalization folds into a first conv that has no
    padding (with padding, the zeros would be added after normalizing, which the raw pixels cannot express).

    `flatten_channels_last` (for the int8 models) flattens conv features in (H, W, C) order, the linear layer's
    columns permuted to match: inductor copied the int8 features into (C, H, W) order with a scalar loop, and
    ONNX Runtime transposed them back from its channels-last int8 layout. It made torch-int8 9% faster on one
    thread, and bfloat16 no faster (Zen 4 machine, 2026-12-06).
    """
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        _fold_sequentials(model, flatten_channels_last)
        _fold_normalize(model)
    return model


def _fold_normalize(model: nn.Module) -> None:
    from .models import CenterCrop, Normalize

    if not (isinstance(model, nn.Sequential) and len(model) == 2 and isinstance(model[0], Normalize)):
        return
    body = model[1]
    layers = list(body) if isinstance(body, nn.Sequential) else [body]
    first = next((layer for layer in layers if not isinstance(layer, CenterCrop)), None)  # a crop commutes
    if not isinstance(first, nn.Conv2d) or first.padding not in ((0, 0), "valid") or first.groups != 1:
        return
    normalize = model[0]
    assert isinstance(normalize, Normalize)
    mean, std = normalize.mean, normalize.std
    bias = first.bias if first.bias is not None else torch.zeros(first.out_channels)
    # conv((x - mean) / std) = conv_{W / std}(x) - (mean / std) * sum(W) per output channel
    first.bias = nn.Parameter(bias - (mean / std) * first.weight.sum(dim=(1, 2, 3)))
    first.weight = nn.Parameter(first.weight / std)
    model[0] = nn.Identity()


def _fold_sequentials(module: nn.Module, flatten_channels_last: bool = False) -> None:
    for child in module.children():
        _fold_sequentials(child, flatten_channels_last)
    if not isinstance(module, nn.Sequential):
        return
    layers = list(module)
    kept: list[nn.Module] = []
    for layer in layers:
        if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)) and layer.track_running_stats and kept:
            before = kept[-1]
            if isinstance(before, (nn.Conv2d, nn.Linear)):
                _fold_into(before, layer)
                continue
            through_pool = (
                isinstance(before, nn.MaxPool2d) and len(kept) > 1 and isinstance(kept[-2], nn.Conv2d)
            )
            if through_pool and bool((layer.weight > 0).all()):
                _fold_into(cast(nn.Conv2d, kept[-2]), layer)
                continue
        kept.append(layer)
    for i in range(len(kept) - 1):  # max-pool then ReLU = ReLU then max-pool (both keep order)
        if isinstance(kept[i], nn.MaxPool2d) and isinstance(kept[i + 1], nn.ReLU):
            kept[i], kept[i + 1] = kept[i + 1], kept[i]
    if flatten_channels_last:
        _flatten_channels_last(kept)
    if kept != layers:
        for name in list(module._modules):
            del module._modules[name]
        for index, layer in enumerate(kept):
            module.add_module(str(index), layer)


def _flatten_channels_last(layers: list[nn.Module]) -> None:
    """Each Flatten of conv features into a linear layer becomes FlattenChannelsLast, the linear layer's columns
    permuted from (C, H, W) to (H, W, C) order (the layers between the conv and the Flatten keep its channels)."""
    channels = 0
    for i, (layer, after) in enumerate(zip(layers, layers[1:])):
        if isinstance(layer, nn.Conv2d):
            channels = layer.out_channels
        if (
            channels
            and isinstance(layer, nn.Flatten)
            and layer.start_dim == 1
            and isinstance(after, nn.Linear)
        ):
            weight = after.weight.reshape(after.out_features, channels, -1).transpose(1, 2)
            after.weight = nn.Parameter(weight.reshape(after.out_features, -1).contiguous())
            layers[i] = FlattenChannelsLast()


# ---------------------------------------------------------------- ONNX Runtime


def run_session(session, pixels: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Logits for float32 pixels (N, 1, 28, 28), in batches."""
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    outputs = [
        session.run(None, {INPUT_NAME: pixels[i : i + batch_size]})[0]
        for i in range(0, len(pixels), batch_size)
    ]
    return np.concatenate(outputs) if outputs else np.zeros((0, 10), np.float32)


# ---------------------------------------------------------------- export


def _to_onnx_bytes(model: nn.Module) -> bytes:
    """Trace `model` (float32, eval) to ONNX with a dynamic batch dimension.

    The TorchScript exporter handles these plain feed-forward models in under a second, where the
    torch.export-based one takes ten or more on two cores; we fall back to the latter where the former is gone.
    """
    import warnings

    example = torch.rand(2, 1, 28, 28)
    buffer = io.BytesIO()
    names: dict[str, Any] = {
        "input_names": [INPUT_NAME],
        "output_names": [OUTPUT_NAME],
        "opset_version": OPSET,
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (example,),
                buffer,  # type: ignore[arg-type]  # torch accepts a file-like object here; its stub says path only
                dynamo=False,
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                **names,
            )
        return buffer.getvalue()
    except (TypeError, ValueError, RuntimeError, ImportError):  # no TorchScript exporter in this torch
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                external_data=False,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                **names,
            )
            return path.read_bytes()


def _with_metadata(onnx_bytes: bytes, meta: dict[str, Any]) -> bytes:
    import onnx

    proto = onnx.load_from_string(onnx_bytes)
    del proto.metadata_props[:]
    readable = {
        "source_checkpoint": meta["export"]["source_checkpoint"],
        "source_sha256": meta["export"]["source_sha256"],
        "precision": meta["export"]["precision"],
        "input": meta["export"]["input"],
        "output": meta["export"]["output"],
        "temperature": meta["export"]["temperature"],
        "reject_below": meta["export"]["reject_below"],
        META_KEY: json.dumps(meta),
    }
    for key, value in readable.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, valid_utf8(str(value))
    proto.producer_name = "digitrec"
    proto.doc_string = valid_utf8(
        f"digitrec {meta.get('recipe', '')} model exported from {meta['export']['source_checkpoint']}"
    )
    return proto.SerializeToString()


def _quantize_int8(float_bytes: bytes, calibration: np.ndarray) -> bytes:
    """Static int8 (QDQ, per-channel int8 weights, uint8 activations) calibrated on `calibration` images.

    The first convolution stays in float32: on one input channel ONNX Runtime's int8 kernel (QLinearConv) has
    too little work per output to use VNNI well, and took 3.4 ms per 1,024 images on the Zen 4 machine against
    1.0 ms for the float one (one thread, 2026-12-06), a third of the int8 model's time.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(np.array_split(calibration, max(1, len(calibration) // 256)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    with tempfile.TemporaryDirectory() as tmp:
        raw, prepared, quantized = (Path(tmp) / name for name in ("float.onnx", "prepared.onnx", "int8.onnx"))
        raw.write_bytes(float_bytes)
        quant_pre_process(str(raw), str(prepared), skip_symbolic_shape=True)
        convs = [node.name for node in onnx.load(str(prepared)).graph.node if node.op_type == "Conv"]
        quantize_static(
            str(prepared),
            str(quantized),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=convs[:1],
        )
        return quantized.read_bytes()


def calibration_pixels(images: torch.Tensor) -> torch.Tensor:
    """The pixels that set int8 activation ranges: CALIBRATION_IMAGES of `images` (uint8 training images,
    (N, 28, 28)) picked at random with seed 0, as float32 (n, 1, 28, 28) in [0, 1]."""
    from .data import as_input

    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:CALIBRATION_IMAGES]
    return as_input(images[pick])


def export_onnx(
    checkpoint: str | Path,
    out: str | Path | None = None,
    int8: bool = False,
    test_images: torch.Tensor | None = None,
    test_labels: torch.Tensor | None = None,
    calibration_images: torch.Tensor | None = None,
    parity_images: int = 2000,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Export `checkpoint` to ONNX, check it, and write it to `out` only if it passes.

    float32: max |Δprobability| against PyTorch over the test images (or `parity_images` random ones when
    none are given) must be <= 1e-4.
    int8: needs calibration images (uint8, from the training set) and the labelled test set; the test
    accuracy may drop by at most 0.1 point. Inputs are uint8 (N, 28, 28) as `digitrec.data` holds them.
    """
    from .checkpoint import load_model
    from .data import as_input
    from .evaluate import fraction_correct, predict_logits

    checkpoint = model_file(checkpoint)
    out = Path(out) if out else checkpoint.with_suffix(".int8.onnx" if int8 else ".onnx")
    if out.is_dir():
        raise DigitrecError(f"--out {out} is a folder; name the file to write in it, ending in .onnx.")
    if out.suffix != ".onnx":  # never over the checkpoint or its metadata
        raise DigitrecError(
            f"--out {out} is not an .onnx file name; name the file to write, ending in .onnx."
        )
    model, meta = load_model(checkpoint)
    if test_images is None:
        generator = torch.Generator().manual_seed(0)
        test_images = (torch.rand(parity_images, 28, 28, generator=generator) * 255).to(torch.uint8)
    if int8 and (calibration_images is None or test_labels is None):
        raise DigitrecError(
            "int8 export needs MNIST for calibration and the accuracy check; run `digitrec data` first."
        )

    onnx_bytes = _to_onnx_bytes(inference_model(model, flatten_channels_last=int8))
    precision = "float32"
    if int8:
        assert calibration_images is not None  # checked above
        onnx_bytes = _quantize_int8(onnx_bytes, calibration_pixels(calibration_images).numpy())
        precision = "int8"

    session = onnx_session(onnx_bytes)
    pixels = as_input(test_images)
    reference = predict_logits(model, test_images).numpy()
    exported = run_session(session, pixels.numpy())
    diff = float(np.abs(softmax(reference) - softmax(exported)).max())
    result = ExportResult(out, precision, diff, len(pixels), tta_views=tta.views_in(meta, str(checkpoint)))
    if test_labels is not None:
        result.torch_accuracy = fraction_correct(torch.from_numpy(reference.argmax(1)), test_labels)
        result.onnx_accuracy = fraction_correct(torch.from_numpy(exported.argmax(1)), test_labels)

    if not int8 and not diff <= FLOAT_TOLERANCE:  # NaN compares false with everything: it passed
        raise DigitrecError(
            f"the exported model disagrees with PyTorch (max |Δprob| {diff:.2e} > {FLOAT_TOLERANCE:g}); nothing was written."
        )
    if int8:
        # int8 requires test_labels (checked above), so both accuracies are set
        assert result.torch_accuracy is not None and result.onnx_accuracy is not None
        if costs_too_much(result.torch_accuracy, result.onnx_accuracy, result.parity_images, INT8_MAX_DROP):
            raise DigitrecError(
                f"int8 quantization costs {100 * (result.torch_accuracy - result.onnx_accuracy):.2f} points of test accuracy "
                f"(more than {100 * INT8_MAX_DROP:.1f}); nothing was written; use the float export."
            )

    from .predict import recorded_calibration

    # checked: a sentence, not a traceback (the checkpoint is what gets calibrated again)
    temperature, reject_below = recorded_calibration(
        meta, str(checkpoint), f"`digitrec calibrate {checkpoint}`"
    )
    source_bytes = checkpoint.read_bytes()
    export_meta = {
        "source_checkpoint": str(checkpoint),
        # where it lies, whatever folder a later command runs from (the path above is as given, perhaps relative)
        "source_checkpoint_resolved": str(checkpoint.resolve()),
        # the same for the checkpoint calibrated again (another temperature or threshold): see refuse_stale_export
        "source_weights_sha256": checkpoint_identity(source_bytes)[0],
        # kept by `calibrate` (whose --half changes the weights' bytes), new with every run: see refuse_stale_export
        "source_created": meta.get("created"),
        "source_sha256": hashlib.sha256(source_bytes).hexdigest(),
        "precision": precision,
        "input": f"{INPUT_NAME}: float32 (N, 1, 28, 28), pixels in [0, 1], white ink on black (MNIST), any N",
        "output": (
            (
                f"{OUTPUT_NAME}: float32 (N, 10); the digit probabilities are softmax({OUTPUT_NAME} / temperature)"
                if result.tta_views == 1
                else f"{OUTPUT_NAME}: float32 (N, 10), for one view; digitrec scores each image in "
                f"{result.tta_views} views (the image and its 1-pixel shifts, zeros moved in): z = the log of "
                f"the mean of softmax({OUTPUT_NAME}) over the views, and the digit probabilities are "
                "softmax(z / temperature)"
            )
            + f", temperature {temperature:g}; digitrec answers 'not a digit' when the highest is below reject_below "
            f"{reject_below:g}"
        ),
        "temperature": temperature,
        "reject_below": reject_below,
        "opset": OPSET,
        "max_prob_diff": diff,
        "torch_accuracy": result.torch_accuracy,
        "onnx_accuracy": result.onnx_accuracy,
        "torch": torch.__version__,
    }
    atomic_write_bytes(out, _with_metadata(onnx_bytes, {**meta, "export": export_meta}))
    return result


def cached_onnx(checkpoint: str | Path, log: Callable[[str], None] = lambda msg: None) -> Path:
    """The float32 ONNX export of `checkpoint`, made once and kept in the user cache by the checkpoint's SHA-256."""
    checkpoint = model_file(checkpoint)
    # read and checked first: a file that is no checkpoint is refused before "exporting ... once" is said
    data, _ = read_checkpoint(checkpoint)
    digest = hashlib.sha256(data).hexdigest()
    from .data import cache_root

    path = cache_root() / "onnx" / f"{digest[:32]}.onnx"
    try:
        if path.exists() and not _exported_from(path, digest):
            # a damaged cache entry (or another file put there) was loaded, and refused, on every later start:
            # --backend onnx stopped, and serve's auto fell back to PyTorch, until someone deleted it by hand
            log(f"the cached ONNX export {path} is damaged or not {checkpoint}'s; exporting it again")
            path.unlink(missing_ok=True)
        if not path.exists():
            log(f"exporting {checkpoint} to ONNX once (cached in {path})")
            path.parent.mkdir(parents=True, exist_ok=True)
            export_onnx(checkpoint, path, log=log)
    except OSError as exc:  # was "cannot use /dev/null/onnx: Not a directory", not saying what the folder is
        raise DigitrecError(
            f"digitrec's cache folder {path.parent} cannot hold the ONNX export of {checkpoint} "
            f"({exc.strerror or exc}); set DIGITREC_CACHE to a folder you can write, or export it once with "
            f"`digitrec export {checkpoint} --out FILE.onnx` and pass that file."
        ) from None
    return path


def _exported_from(path: Path, digest: str) -> bool:
    """Whether ONNX Runtime loads `path` and its metadata names the checkpoint whose SHA-256 is `digest` (a
    few milliseconds for our models). Without ONNX Runtime it cannot tell, and keeps the file: loading it then
    says which extra to install."""
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is None or export_source_sha256(path) == digest
