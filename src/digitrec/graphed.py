"""A recipe's training as one CUDA graph per step, with the data set resident on the GPU (`digitrec bench gpu`).

On a GPU the `fast` recipe's step is a few dozen tiny kernels: launching them from Python costs more than
running them. Here one whole step (gather the batch, forward in bfloat16, backward, AdamW) is captured once as a
CUDA graph and replayed; the batch indices and the learning rate of every step already lie on the GPU, and a
step counter inside the graph picks them, so the host only calls `replay()`. Everything else is the training
loop's (training.py) and evaluation's (evaluate.py): the same initialization, data order, schedule, loss,
optimizer and evaluation, so a run with `graph=False` (the same step, launched eagerly; the only way on a CPU)
follows `training.train`. Before the first seed, every kind of work runs once (a few steps, the capture and a
first replay, a partial batch, an evaluation), so that kernel choices and lazy set-up happen off the clock; that
warm-up is reported apart, as a compile time would be.

Only recipes whose step is the same every time qualify: no augmentation, no outlier exposure, no weight
averaging and no validation split (`fast`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .bench import spread
from .config import TrainConfig
from .data import MNIST, as_input
from .errors import DigitrecError
from .evaluate import fraction_correct, recipe_logits
from .models import create_model
from .optim import _FUSED, AdamW
from .precision import autocast
from .training import epoch_order, lr_at, make_optimizer, steps_in_epoch

WARMUP_STEPS = 3  # eager steps on a side stream before the capture (cuDNN picks its kernels there)


@dataclass
class GraphedRun:
    seed: int
    test_accuracy: float
    train_seconds: float  # every step, from the first to the last, GPU work included (synchronized)
    eval_seconds: float  # the test set through the recipe's evaluation
    train_loss: float


def check_recipe(config: TrainConfig) -> None:
    """One sentence if `config` cannot run as a replayed graph."""
    reasons = [
        (config.augment != "none", f"augmentation ({config.augment})"),
        (bool(config.negatives), "outlier exposure (negatives)"),
        (bool(config.ema_decay), "weight averaging (ema_decay)"),
        (bool(config.val_size), "a validation split (val_size)"),
        (config.optimizer != "adamw", f"the {config.optimizer} optimizer"),
    ]
    found = [reason for present, reason in reasons if present]
    if found:
        raise DigitrecError(
            f"bench gpu times one fixed step (replayed as a graph, or launched eagerly), and this recipe has "
            f"{', '.join(found)}; use a recipe like fast, or time this one with `digitrec bench train`."
        )


class GraphedTrainer:
    """One model, optimizer and captured step, reused for every seed (weights and state are reset in place)."""

    def __init__(self, config: TrainConfig, images: torch.Tensor, labels: torch.Tensor, graph: bool = True):
        check_recipe(config)
        if not _FUSED:
            raise DigitrecError("a graphed run needs torch's fused AdamW kernel (torch 2.1 or later).")
        self.config, self.images, self.labels, self.graph = config, images, labels, graph
        self.device = images.device
        if graph and self.device.type != "cuda":
            raise DigitrecError("CUDA graphs need a CUDA GPU; run with graph=False on other devices.")
        n = len(images)
        self.steps_per_epoch = steps_in_epoch(n, config.batch_size)
        self.total_steps = max(1, round(config.epochs * self.steps_per_epoch))
        self.model = create_model(config.arch, config.normalize).to(self.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.optimizer = make_optimizer(self.model, config)
        assert isinstance(self.optimizer, AdamW)
        self.lr = torch.zeros((), device=self.device)  # the optimizer reads its learning rate from here
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        b = config.batch_size
        sizes = [stop - start for start, stop in map(self._batch, range(self.total_steps))]
        self.full = [s for s, size in enumerate(sizes) if size == b]  # replayed as the graph
        self.partial = [s for s, size in enumerate(sizes) if size != b]  # an epoch's last batch, run eagerly
        self.images_per_run = sum(sizes)
        if not self.full:
            raise DigitrecError(
                f"a graphed run needs at least one full batch of {b} images; lower --batch-size."
            )
        self.counter = torch.zeros((), dtype=torch.long, device=self.device)  # which full step is next
        self.loss_sum = torch.zeros((), device=self.device)
        self.index = torch.zeros(b, dtype=torch.long, device=self.device)
        self.epoch_orders: list[torch.Tensor] = []  # each epoch's permutation of the training images
        self.orders: torch.Tensor | None = None  # the indices of every full step, row by row
        self.lrs: torch.Tensor | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self.warmup_seconds: float | None = None  # the capture and first runs of everything, before the clock

    def _batch(self, step: int) -> tuple[int, int]:
        i = step % self.steps_per_epoch
        b = self.config.batch_size
        return i * b, min((i + 1) * b, len(self.images))

    def _step(self, index: torch.Tensor, count: int) -> None:
        """One training step on images[index]; the loss joins loss_sum."""
        x = as_input(self.images[index], self.config.channels_last)
        y = self.labels[index].long()
        with autocast(self.device, self.config.amp, cache=False):
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.config.label_smoothing)
        loss.backward()
        self.optimizer.step()
        self.loss_sum.add_(loss.detach() * count)

    def _graphed_step(self) -> None:
        """The captured step: pick this step's indices and learning rate by the counter, train, count."""
        assert self.orders is not None and self.lrs is not None
        self.index.copy_(self.orders.index_select(0, self.counter.view(1)).view(-1))
        self.lr.copy_(self.lrs.index_select(0, self.counter.view(1)).view(()))
        self._step(self.index, self.config.batch_size)
        self.counter.add_(1)

    def _reset(self, seed: int) -> None:
        """Fresh weights for `seed` (as training.train draws them), zero optimizer moments, the seed's data order."""
        torch.manual_seed(seed)
        fresh = create_model(self.config.arch, self.config.normalize).state_dict()
        self.model.load_state_dict(fresh)  # copies in place: the graph keeps pointing at the same memory
        self.model.train()
        for state in self.optimizer.state.values():
            for tensor in state.values():
                tensor.zero_()
        self.counter.zero_()
        self.loss_sum.zero_()
        n = len(self.images)
        epochs = self.total_steps // self.steps_per_epoch + 1
        self.epoch_orders = [epoch_order(n, seed, epoch, self.device) for epoch in range(epochs)]
        full = [self.epoch_orders[s // self.steps_per_epoch][slice(*self._batch(s))] for s in self.full]
        rows = torch.stack(full)  # (full steps, batch size): __init__ made sure there is at least one
        lrs = torch.tensor(
            [lr_at(self.config, s, self.steps_per_epoch, self.total_steps) for s in self.full],
            dtype=torch.float32,
        ).to(self.device)
        if self.orders is None:
            self.orders, self.lrs = rows, lrs
        else:
            assert self.lrs is not None
            self.orders.copy_(rows)
            self.lrs.copy_(lrs)

    def _partial_step(self, step: int) -> None:
        """A partial batch at an epoch's end runs eagerly, into the gradient buffers a captured step writes."""
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.zero_()
        index = self.epoch_orders[step // self.steps_per_epoch][slice(*self._batch(step))]
        self.lr.fill_(lr_at(self.config, step, self.steps_per_epoch, self.total_steps))
        self._step(index, len(index))

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _warm_up(self, test_images: torch.Tensor) -> None:
        """Run every kind of work once before the clock (kernel choices, lazy set-up), capturing the graph if
        asked; the caller then resets what this trained."""
        self._synchronize()
        start = time.perf_counter()
        if self.graph:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(WARMUP_STEPS):
                    self.counter.zero_()  # the counter must stay below the number of full steps
                    self.optimizer.zero_grad(set_to_none=True)
                    self._graphed_step()
            torch.cuda.current_stream().wait_stream(stream)
            self.counter.zero_()
            # the captured backward allocates the gradients it writes
            self.optimizer.zero_grad(set_to_none=True)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._graphed_step()
            self._graph.replay()  # the first replay uploads the graph
        else:
            for _ in range(WARMUP_STEPS):
                self.counter.zero_()
                self.optimizer.zero_grad(set_to_none=True)
                self._graphed_step()
        if self.partial:
            self._partial_step(self.partial[0])
        recipe_logits(self.model, test_images, self.config)
        self._synchronize()
        self.warmup_seconds = time.perf_counter() - start

    def run(self, seed: int, test_images: torch.Tensor, test_labels: torch.Tensor) -> GraphedRun:
        """Train from scratch with `seed`, then evaluate on the test set (on the trainer's device) as the recipe does."""
        if self.warmup_seconds is None:
            self._reset(seed)
            self._warm_up(test_images)
        self._reset(seed)
        self._synchronize()
        start = time.perf_counter()
        partial = set(self.partial)
        for step in range(self.total_steps):
            if step in partial:
                self._partial_step(step)
            elif self._graph is not None:
                self._graph.replay()
            else:
                self.optimizer.zero_grad(set_to_none=True)
                self._graphed_step()
        train_loss = self.loss_sum.item() / self.images_per_run
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        logits = recipe_logits(self.model, test_images, self.config)
        accuracy = fraction_correct(logits.argmax(1), test_labels)
        eval_seconds = time.perf_counter() - start
        return GraphedRun(seed, accuracy, train_seconds, eval_seconds, train_loss)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}


def graphed_runs(
    config: TrainConfig, data: MNIST, seeds: list[int], device: torch.device, graph: bool = True
) -> tuple[GraphedTrainer, list[GraphedRun]]:
    """Train `config` once per seed on `device` with the data set resident there; (the trainer, the runs)."""
    images, labels = data.train_images.to(device), data.train_labels.to(device)
    test_images, test_labels = data.test_images.to(device), data.test_labels.to(device).long()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    trainer = GraphedTrainer(config, images, labels, graph=graph)
    return trainer, [trainer.run(seed, test_images, test_labels) for seed in seeds]


def bench_gpu(
    config: TrainConfig,
    data: MNIST,
    seeds: int,
    device: torch.device,
    graphed: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """`digitrec bench gpu`: `seeds` runs graphed (when asked) and the same steps eagerly, side by side."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type.upper()  # CPU, MPS
    report: dict[str, Any] = {"device": name, "torch": torch.__version__, "modes": {}}
    for mode in ["graphed", "eager"] if graphed else ["eager"]:
        trainer, runs = graphed_runs(
            config, data, [config.seed + i for i in range(seeds)], device, graph=mode == "graphed"
        )
        for run in runs:
            log(
                f"{mode} seed {run.seed}: {run.test_accuracy:.2%} in {run.train_seconds:.3f} s + {run.eval_seconds:.3f} s"
            )
        totals = [r.train_seconds + r.eval_seconds for r in runs]
        accuracies = [r.test_accuracy for r in runs]
        report["modes"][mode] = {
            "warmup_seconds": trainer.warmup_seconds,
            "steps": trainer.total_steps,
            "test_accuracy": spread(accuracies),
            "train_plus_eval_seconds": spread(totals),
            "runs": [asdict(r) for r in runs],
        }
    if graphed:
        medians = [report["modes"][m]["train_plus_eval_seconds"]["median"] for m in ("eager", "graphed")]
        report["eager_over_graphed"] = medians[0] / medians[1]
    return report


def gpu_table(report: dict[str, Any]) -> str:
    """bench_gpu's report as the lines `digitrec bench gpu` prints: one per run, one per mode, the ratio."""
    lines = [
        f"{report.get('recipe', 'recipe')} on {report['device']} (torch {report['torch']}), "
        "data set resident on the device",
        "mode       seed  test acc   train s   eval s   train+eval s",
    ]
    for mode, result in report["modes"].items():
        for run in result["runs"]:
            total = run["train_seconds"] + run["eval_seconds"]
            lines.append(
                f"{mode:<9} {run['seed']:>5}  {run['test_accuracy']:>7.2%}  {run['train_seconds']:>8.3f}  "
                f"{run['eval_seconds']:>7.3f}  {total:>12.3f}"
            )
        accuracy, seconds = result["test_accuracy"], result["train_plus_eval_seconds"]
        warmup = "warm-up and capture" if mode == "graphed" else "warm-up"
        lines.append(
            f"{mode:<9} {'all':>5}  {accuracy['min']:.2%} / {accuracy['median']:.2%} / {accuracy['max']:.2%} "
            f"(min / median / max), train+eval median {seconds['median']:.3f} s, "
            f"{warmup} {result['warmup_seconds']:.2f} s (once, not counted)"
        )
    if "eager_over_graphed" in report:
        lines.append(
            f"eager / graphed train+eval time: {report['eager_over_graphed']:.1f}x (medians, same run)"
        )
    return "\n".join(lines)
