"""Benchmarks measured side by side in one process: recipes to a target accuracy, and inference backends.

Absolute seconds depend on the machine and on whatever else runs on it; the ratios in the same run are
the figures to compare. The test set is used to report when a recipe reaches the target, and, with
`stop_at_target`, to stop it there: its accuracy column is then of a run the test set stopped.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from .config import TrainConfig
from .data import MNIST, as_input
from .errors import DigitrecError

# ---------------------------------------------------------------- memory


def _rss_mb(field_name: str) -> float | None:
    """VmRSS or VmHWM (peak) of this process in MB, from /proc (Linux); None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _release_freed_memory() -> None:
    """Hand back to the system what earlier runs in this process freed and the C allocator kept (glibc's
    malloc_trim), so that a run's peak is not lowered by reusing it (seed 1 of `fast` read 0 MB after seed 0's
    58) nor raised by a bigger recipe's leftovers."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _reset_peak_rss() -> None:
    """Start a new peak-memory measurement (Linux: writing 5 to clear_refs resets VmHWM to the current RSS)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


# ---------------------------------------------------------------- the machine's ceiling


def spread(values: list[float]) -> dict[str, float]:
    """{"min", "median", "max"} of several seeds' figures, as the bench reports print them."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


@dataclass(frozen=True)
class MultiplyAdds:
    """Multiply-adds of a model's convolutions and linear layers for one 28x28 image (elementwise layers,
    pooling and normalization are not counted: they cost memory traffic, not arithmetic)."""

    forward: int
    first_layer: int  # the first layer's share: training needs no gradient for the input image

    @property
    def training(self) -> int:
        """Forward, the weight gradients (as many again) and the input gradients (again, but the first layer's)."""
        return 3 * self.forward - self.first_layer


def multiply_adds(model: nn.Module) -> MultiplyAdds:
    """Count a model's multiply-adds per image by running one image through it with hooks on its Conv2d and
    Linear layers (the counts do not depend on the weights)."""
    counts: list[int] = []

    def hook(layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if isinstance(layer, nn.Conv2d):
            kernel = layer.kernel_size[0] * layer.kernel_size[1]
            counts.append(output.numel() * layer.in_channels // layer.groups * kernel)
        else:
            counts.append(output.numel() * cast(nn.Linear, layer).in_features)

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    training = model.training
    try:
        model.eval()
        parameter = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, 1, 28, 28, dtype=parameter.dtype, device=parameter.device))
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return MultiplyAdds(sum(counts), counts[0] if counts else 0)


def matmul_rate(side: int = 1024, seconds: float = 0.5, rounds: int = 3) -> float:
    """This machine's float32 matrix-multiply rate with torch's current threads, in multiply-adds per second
    (the median of `rounds`): about the most a float32 convolution or linear layer can reach here."""
    a, b = torch.randn(side, side), torch.randn(side, side)
    for _ in range(2):
        torch.mm(a, b)
    rates = []
    for _ in range(rounds):
        calls, start = 0, time.perf_counter()
        while calls < 2 or time.perf_counter() - start < seconds / rounds:
            torch.mm(a, b)
            calls += 1
        rates.append(calls * side**3 / (time.perf_counter() - start))
    return statistics.median(rates)


# ---------------------------------------------------------------- bench train


@dataclass
class SeedRun:
    seed: int
    seconds_to_target: float | None  # training seconds when the test accuracy first reached the target
    test_accuracy: float
    train_seconds: float
    eval_seconds: float
    # the process's peak resident memory during the run (torch, MNIST and the run's own)
    peak_mb: float | None
    checks: list[tuple[float, float]] = field(default_factory=list)  # (training seconds, test accuracy)


@dataclass
class RecipeResult:
    recipe: str
    arch: str
    params: int
    runs: list[SeedRun]
    epoch_multiply_adds: int = 0  # of one training epoch's conv and linear layers (MultiplyAdds.training)

    @property
    def seconds_to_target(self) -> float | None:
        """Median over seeds; None when any seed missed the target (its time is unknown)."""
        times = [r.seconds_to_target for r in self.runs]
        return None if any(t is None for t in times) else statistics.median(cast(list[float], times))

    def to_dict(self) -> dict[str, Any]:
        peaks = [r.peak_mb for r in self.runs if r.peak_mb is not None]
        return {
            "recipe": self.recipe,
            "arch": self.arch,
            "params": self.params,
            "epoch_multiply_adds": self.epoch_multiply_adds,
            "seconds_to_target": self.seconds_to_target,
            "reached_target": sum(r.seconds_to_target is not None for r in self.runs),
            "seeds": len(self.runs),
            "test_accuracy": spread([r.test_accuracy for r in self.runs]),
            "train_plus_eval_seconds": statistics.median(r.train_seconds + r.eval_seconds for r in self.runs),
            "peak_mb": max(peaks) if peaks else None,
            "runs": [asdict(r) for r in self.runs],
        }


def _train_seed(
    name: str, config: TrainConfig, data: MNIST, target: float, stop_at_target: bool
) -> tuple[SeedRun, int]:
    """One training run, with the test accuracy checked after each epoch; (the run, the model's parameters)."""
    from .evaluate import fraction_correct, recipe_logits
    from .training import train

    checks: list[tuple[float, float]] = []
    test_labels = data.test_labels.long()

    def on_epoch(model: nn.Module, row: dict[str, float]) -> bool:
        # The clock is stopped here: this evaluation is the benchmark's, not the recipe's.
        device = next(model.parameters()).device
        logits = recipe_logits(model, data.test_images.to(device), config)
        accuracy = fraction_correct(logits.argmax(1).cpu(), test_labels)
        checks.append((row["seconds"], accuracy))
        return stop_at_target and accuracy >= target

    _release_freed_memory()
    _reset_peak_rss()
    with tempfile.TemporaryDirectory() as out:
        run = train(
            config,
            out,
            recipe=name,
            data=data,
            progress=False,
            report=False,
            log=lambda msg: None,
            on_epoch=on_epoch,
        )
    peak = _rss_mb("VmHWM")
    m = run.metrics
    reached = next((seconds for seconds, accuracy in checks if accuracy >= target), None)
    return SeedRun(
        config.seed, reached, m["test_accuracy"], m["train_seconds"], m["eval_seconds"], peak, checks
    ), m["params"]


def bench_train(
    recipes: dict[str, TrainConfig],
    data: MNIST,
    target: float = 0.99,
    seeds: int = 1,
    stop_at_target: bool = False,
    log: Callable[[str], None] = print,
) -> list[RecipeResult]:
    """Train every recipe for `seeds` seeds (its own seed, +1, +2, ...), noting the test accuracy after each epoch."""
    from .models import create_model

    results = []
    for name, config in recipes.items():
        runs = []
        params = 0
        for offset in range(seeds):
            run, params = _train_seed(
                name, config.override(seed=config.seed + offset), data, target, stop_at_target
            )
            runs.append(run)
            to_target = (
                f"{run.seconds_to_target:.2f} s" if run.seconds_to_target is not None else "not reached"
            )
            log(
                f"{name} seed {run.seed}: test accuracy {run.test_accuracy:.2%}, to {target:.2%} {to_target}, "
                f"train {run.train_seconds:.2f} s + eval {run.eval_seconds:.2f} s"
            )
        per_image = multiply_adds(create_model(config.arch)).training
        epoch_images = len(data.train_images) - config.val_size
        results.append(RecipeResult(name, config.arch, params, runs, per_image * epoch_images))
    return results


def train_table(
    results: Sequence[RecipeResult], target: float, baseline: str = "fast", matmul_per_s: float | None = None
) -> str:
    """A Markdown table of `bench_train` results; times as ratios to `baseline` where it ran. With this
    machine's float32 matrix-multiply rate, each recipe's epoch also shows as the seconds its multiply-adds
    would take at that rate: the least an epoch can take in float32 here, however well the kernels do."""
    base = next((r.seconds_to_target for r in results if r.recipe == baseline), None)
    lines = [
        f"| recipe | params | seconds to {target:.2%} (median) | × {baseline} | test accuracy min / median / max "
        "| train + eval s (median) | seeds | peak RSS MB | G mult-adds per epoch | epoch at the matmul rate, s |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        d = r.to_dict()
        seconds = r.seconds_to_target
        shown = (
            f"{seconds:.2f}"
            if seconds is not None
            else f"missed ({d['reached_target']}/{d['seeds']} reached)"
        )
        ratio = f"{seconds / base:.1f}" if seconds is not None and base else "-"
        acc = d["test_accuracy"]
        peak = f"{d['peak_mb']:.0f}" if d["peak_mb"] is not None else "-"
        work = r.epoch_multiply_adds
        floor = f"{work / matmul_per_s:.2f}" if work and matmul_per_s else "-"
        lines.append(
            f"| {r.recipe} | {r.params:,} | {shown} | {ratio} | {acc['min']:.2%} / {acc['median']:.2%} / "
            f"{acc['max']:.2%} | {d['train_plus_eval_seconds']:.2f} | {d['seeds']} | {peak} | "
            f"{work / 1e9:.1f} | {floor} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- bench infer

INFER_BACKENDS = ("torch-fp32", "torch-bf16", "torch-compiled", "torch-int8", "onnx-fp32", "onnx-int8")


@dataclass
class InferResult:
    backend: str
    batch_size: int
    images_per_s: float
    p50_ms: float  # latency of one call (one batch)
    p99_ms: float
    # export, quantization or compilation before the first call, with their checks on the test set (parity, int8)
    setup_seconds: float
    multiply_adds_per_image: int = 0  # the model's conv and linear multiply-adds for one image (forward)
    multiply_adds_per_s: float = 0.0  # images/s x multiply_adds_per_image
    threads: int = 0  # CPU threads the backend ran on: torch's count, for the ONNX Runtime rows too


def torch_runner(model: nn.Module, bf16: bool = False, compiled: bool = False) -> Callable[[np.ndarray], Any]:
    """A callable on float32 pixels for the PyTorch backends.

    bf16 and compiled run the inference form of the model: BatchNorm folded, channels-last, bfloat16 weights
    (compiled: in float32 on a CPU without native bfloat16, where bfloat16 is emulated and many times slower).
    Compiled adds inductor with freezing, which fuses the elementwise layers and prepacks the oneDNN weights.
    """
    from .export import inference_model
    from .precision import native_bfloat16

    half = bf16 or (compiled and native_bfloat16("cpu"))
    dtype = torch.bfloat16 if half else torch.float32
    if bf16 or compiled:
        model = inference_model(model).to(dtype=dtype, memory_format=torch.channels_last)  # type: ignore[call-overload]  # stub lacks memory_format
    model = model.eval()
    if compiled:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        model = cast(nn.Module, torch.compile(model, dynamic=False))  # one static graph per batch size

    def run(batch: np.ndarray):
        x = torch.from_numpy(batch).to(dtype)  # one channel: the layout is channels-last already
        with torch.inference_mode():
            return model(x)

    return run


def torch_int8_runner(model: nn.Module, calibration: torch.Tensor) -> Callable[[np.ndarray], Any]:
    """A callable on float32 pixels for torch-int8: the inference form of the model in static int8 through PT2E
    quantization (torchao's X86InductorQuantizer: uint8 activations, per-channel int8 weights, ranges observed
    on `calibration`, float32 pixels (N, 1, 28, 28)), compiled by inductor with freezing into oneDNN's int8
    kernels (VNNI where the CPU has it). Needs the int8 extra (torchao)."""
    import logging
    import warnings

    import torch._inductor.config as inductor_config

    # torchao 0.18 on torch 2.13 says, harmlessly, that its CUDA kernels failed to load and that it registers an
    # Enum the deprecated way, and inductor warns about its own int8 weight zero points at each compile
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", "To copy construct from a tensor", UserWarning, "torch._inductor")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    from .export import inference_model

    batch = torch.export.Dim("batch", min=1)
    graph = torch.export.export(
        inference_model(model, flatten_channels_last=True), (calibration[:2],), dynamic_shapes=({0: batch},)
    )
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    observed = prepare_pt2e(graph.module(), quantizer)
    with torch.no_grad():
        for chunk in calibration.split(256):
            observed(chunk)
    inductor_config.freezing = True
    compiled = cast(nn.Module, torch.compile(convert_pt2e(observed), dynamic=False))

    def run(batch: np.ndarray):
        with torch.no_grad():
            return compiled(torch.from_numpy(batch))

    return run


def _onnx_runner(path: Path, threads: int) -> Callable[[np.ndarray], Any]:
    """The exported model as `--backend onnx` runs it (one image through buffers bound once), on `threads`
    threads: torch's count, so that the ONNX Runtime rows and the PyTorch rows are timed on the same cores."""
    from .backends import OnnxBackend

    return OnnxBackend(path, threads=threads, spin=True)


def check_infer_options(
    backends: Sequence[str], batch_sizes: Sequence[int], images: int | None = None
) -> None:
    """Refuse, in one sentence and before any work, an unknown or empty backend name, a name or batch size given
    twice (their rows would repeat one measurement, latencies pooled), a batch size under 1, and one above the
    `images` there are to score (each call would score fewer images than its size, and images/s would count
    the size)."""
    from .errors import refuse_repeats

    unknown = [b for b in backends if b not in INFER_BACKENDS]
    if unknown:
        raise DigitrecError(f"unknown backend {unknown[0]!r}; choose from {', '.join(INFER_BACKENDS)}.")
    if not backends:
        raise DigitrecError(f"--backends names no backend; choose from {', '.join(INFER_BACKENDS)}.")
    refuse_repeats("--backends", list(backends))
    if not batch_sizes or min(batch_sizes) < 1:
        raise DigitrecError("--batch-sizes takes whole numbers of at least 1, such as 1,1024.")
    refuse_repeats("--batch-sizes", [str(size) for size in batch_sizes])
    too_big = [size for size in batch_sizes if images is not None and size > images]
    if too_big:
        raise DigitrecError(
            f"batch size {too_big[0]:,} is larger than the {images:,} test images there are to score; "
            f"give --batch-sizes up to {images:,}."
        )


def available_backends(backends: Sequence[str], log: Callable[[str], None] = print) -> list[str]:
    """`backends` less torch-int8 where torchao is missing (said in one line); a DigitrecError when none is left."""
    from importlib.util import find_spec

    if "torch-int8" in backends and find_spec("torchao") is None:
        log('torch-int8: skipped: it needs the int8 extra (torchao): pip install "digitrec[int8]"')
        backends = [b for b in backends if b != "torch-int8"]
        if not backends:
            raise DigitrecError(
                'no backend is left to time: torch-int8 needs the int8 extra (pip install "digitrec[int8]"); '
                "install it or name other --backends."
            )
    return list(backends)


def _check_int8(
    name: str,
    run: Callable[[np.ndarray], Any],
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    max_drop: float,
    log: Callable[[str], None],
) -> None:
    """Say the test accuracy of an int8 runner beside float32's; refuse one that loses more than `max_drop`."""
    from .evaluate import fraction_correct, predict_logits
    from .export import costs_too_much

    pixels = as_input(images).numpy()
    logits = np.concatenate([np.asarray(run(pixels[i : i + 1024])) for i in range(0, len(pixels), 1024)])
    quantized = fraction_correct(torch.from_numpy(logits.argmax(1)), labels)
    reference = fraction_correct(predict_logits(model, images).argmax(1), labels)
    log(f"{name}: test accuracy {quantized:.2%} (float32 {reference:.2%})")
    if costs_too_much(reference, quantized, len(labels), max_drop):
        raise DigitrecError(
            f"{name} costs {100 * (reference - quantized):.2f} points of test accuracy "
            f"(more than {100 * max_drop:.1f}); leave it out of --backends."
        )


def _time_calls(run: Callable[[np.ndarray], Any], batches: list[np.ndarray], seconds: float) -> list[float]:
    """Call `run` on the batches in turn for about `seconds`; the latency of each call, in seconds."""
    latencies: list[float] = []
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < seconds or len(latencies) < 5:
        batch = batches[i % len(batches)]
        t = time.perf_counter()
        run(batch)
        latencies.append(time.perf_counter() - t)
        i += 1
    return latencies


def bench_infer(
    checkpoint: str | Path,
    images: torch.Tensor,
    backends: Sequence[str] = INFER_BACKENDS,
    batch_sizes: Sequence[int] = (1, 1024),
    rounds: int = 5,
    seconds: float = 0.5,
    calibration: torch.Tensor | None = None,
    test_labels: torch.Tensor | None = None,
    log: Callable[[str], None] = print,
) -> list[InferResult]:
    """Time each backend at each batch size on `images` (uint8 (N, 28, 28), as `digitrec.data` holds them).

    The backends take turns for `rounds` rounds of about `seconds` each, so that load from other processes
    falls on all of them alike; images/s is the median over rounds, latencies are pooled.
    `calibration` (uint8 training images) is needed for the int8 backends, with `test_labels` (of `images`) for
    their accuracy check (at most 0.1 point below float32). torch-int8 needs the int8 extra (torchao): without
    it, its row is left out with a one-line reason. Every backend runs on torch's thread count
    (torch.get_num_threads(), which OMP_NUM_THREADS sets), ONNX Runtime included; each row records it.
    A backend or batch size named twice, or a batch size above len(images), is refused before any work.
    """
    from .checkpoint import load_model
    from .export import INT8_MAX_DROP, calibration_pixels, export_onnx

    check_infer_options(backends, batch_sizes, len(images))
    backends = available_backends(backends, log)
    threads = torch.get_num_threads()
    model, _ = load_model(checkpoint)
    per_image = multiply_adds(model).forward
    pixels = as_input(images).numpy()
    runners: dict[str, Callable[[np.ndarray], Any]] = {}
    setup: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in backends:
            start = time.perf_counter()
            if name == "torch-int8":
                if calibration is None or test_labels is None:
                    raise DigitrecError("torch-int8 needs MNIST for calibration and the accuracy check.")
                runners[name] = torch_int8_runner(model, calibration_pixels(calibration))
                _check_int8(name, runners[name], model, images, test_labels, INT8_MAX_DROP, log)
            elif name.startswith("torch"):
                runners[name] = torch_runner(
                    model, bf16=name == "torch-bf16", compiled=name == "torch-compiled"
                )
            else:
                path = Path(tmp) / f"{name}.onnx"
                exported = export_onnx(
                    checkpoint,
                    path,
                    int8=name == "onnx-int8",
                    test_images=images,
                    test_labels=test_labels,
                    calibration_images=calibration,
                    log=lambda msg: None,
                )
                runners[name] = _onnx_runner(path, threads)
                if (
                    exported.onnx_accuracy is not None
                    and exported.torch_accuracy is not None
                    and name == "onnx-int8"
                ):
                    # measured and checked by the export (export.INT8_MAX_DROP), said as torch-int8's is
                    log(
                        f"{name}: test accuracy {exported.onnx_accuracy:.2%} (float32 {exported.torch_accuracy:.2%})"
                    )
            for size in batch_sizes:  # warm-up, and compilation for torch.compile at each shape
                for _ in range(3):
                    runners[name](pixels[:size])
            setup[name] = time.perf_counter() - start
            log(f"{name}: ready in {setup[name]:.1f} s")

        batches = {
            size: [pixels[i : i + size] for i in range(0, max(1, len(pixels) - size + 1), size)][:64]
            for size in batch_sizes
        }
        rates: dict[tuple[str, int], list[float]] = {}
        latencies: dict[tuple[str, int], list[float]] = {}
        for _ in range(rounds):
            for size in batch_sizes:
                for name in backends:
                    times = _time_calls(runners[name], batches[size], seconds)
                    rates.setdefault((name, size), []).append(size * len(times) / sum(times))
                    latencies.setdefault((name, size), []).extend(times)
    results = []
    for name in backends:
        for size in batch_sizes:
            times_ms = np.array(latencies[(name, size)]) * 1000
            rate = statistics.median(rates[(name, size)])
            results.append(
                InferResult(
                    name,
                    size,
                    rate,
                    float(np.percentile(times_ms, 50)),
                    float(np.percentile(times_ms, 99)),
                    setup[name],
                    per_image,
                    rate * per_image,
                    threads,
                )
            )
    return results


def infer_table(results: Sequence[InferResult]) -> str:
    """One row per backend: images/s, p50 and p99 latency at each batch size, and the multiply-adds per second
    that its largest batch reached (to set beside the machine's matrix-multiply rate)."""
    sizes = sorted({r.batch_size for r in results})
    header = (
        "| backend | "
        + " | ".join(f"batch {s:,}: images/s | p50 ms | p99 ms" for s in sizes)
        + f" | G mult-adds/s at batch {sizes[-1]:,} | setup s |"
    )
    lines = [header, "|---|" + "---:|---:|---:|" * len(sizes) + "---:|---:|"]
    for name in dict.fromkeys(r.backend for r in results):
        row = {r.batch_size: r for r in results if r.backend == name}
        cells = " | ".join(
            f"{row[s].images_per_s:,.0f} | {row[s].p50_ms:.3f} | {row[s].p99_ms:.3f}" for s in sizes
        )
        work = row[sizes[-1]].multiply_adds_per_s / 1e9
        lines.append(f"| {name} | {cells} | {work:.1f} | {row[sizes[0]].setup_seconds:.1f} |")
    return "\n".join(lines)
