"""AdamW in one fused kernel call (or a handful of multi-tensor operations), for the recipes where time counts.

Every `torch.optim` optimizer imports TorchDynamo, the compiler stack, when it is built (1.4 s on a 2-core
CPU, a third of the `fast` recipe's whole run); this one does not, and it keeps `torch.optim`'s interface
and state format, so checkpoints and resuming treat both alike. The update is `torch.optim.AdamW`'s, made by the
kernel `torch.optim.AdamW(fused=True)` calls where torch has it:

    p  <- p * (1 - lr * weight_decay)
    m  <- beta1 * m + (1 - beta1) * g            v <- beta2 * v + (1 - beta2) * g^2
    p  <- p - lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

# torch's fused AdamW kernel (CPU, CUDA and MPS), an operator: calling it imports nothing from torch.optim.
_FUSED = hasattr(torch, "_fused_adamw_")


class AdamW:
    """Decoupled weight decay Adam (Loshchilov and Hutter, 2019); param groups may set lr and weight_decay."""

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ):
        defaults: dict[str, Any] = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        self.param_groups: list[dict[str, Any]] = [
            defaults | dict(group, params=list(group["params"])) for group in params
        ]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p not in self.state:  # moments share the parameter's memory layout (channels_last kernels)
                    self.state[p] = {
                        "step": torch.zeros((), dtype=torch.float32, device=p.device),
                        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                    }
            states = [self.state[p] for p in params]
            grads = [p.grad for p in params]
            exp_avgs = [s["exp_avg"] for s in states]
            exp_avg_sqs = [s["exp_avg_sq"] for s in states]
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1)
            (beta1, beta2), lr = group["betas"], group["lr"]
            # one kernel for every tensor's whole update, a quarter of the time of the multi-tensor operations
            # below, which say the same update step by step (and run where a torch lacks the kernel)
            if _FUSED:
                decay, eps = group["weight_decay"], group["eps"]
                torch._fused_adamw_(
                    params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                    weight_decay=decay, eps=eps, amsgrad=False, maximize=False,
                )  # fmt: skip
                continue
            t = float(steps[0])  # every parameter of a group steps together
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
            denominators = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denominators, math.sqrt(1 - beta2**t))
            torch._foreach_add_(denominators, group["eps"])
            torch._foreach_addcdiv_(params, exp_avgs, denominators, -lr / (1 - beta1**t))

    # -- torch.optim's state-dict format: parameters are numbered across groups in order
    def state_dict(self) -> dict[str, Any]:
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        groups = [
            {k: v for k, v in g.items() if k != "params"} | {"params": [index[p] for p in g["params"]]}
            for g in self.param_groups
        ]
        return {"state": {index[p]: dict(s) for p, s in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("the saved optimizer state does not match this model's parameters")
        by_index = [p for g in self.param_groups for p in g["params"]]
        for group, saved in zip(self.param_groups, groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
            group["betas"] = tuple(group["betas"])
        self.state = {}
        for i, values in state_dict["state"].items():
            p = by_index[int(i)]
            self.state[p] = {
                k: v.to(p.device) if k == "step" else torch.empty_like(p).copy_(v) for k, v in values.items()
            }


# what training.make_optimizer returns: torch.optim's SGD or Adam, or the AdamW above
Optimizer = torch.optim.Optimizer | AdamW


class WeightAverage:
    """An exponential moving average of a model's weights and buffers (Polyak averaging), used in its place.

    `model` is a copy of `source`. After every optimizer step each of its float tensors (weights and BatchNorm
    statistics) moves a (1 - decay) share toward the trained model's; integer buffers (BatchNorm's batch count)
    are copied. The decay starts low and ramps up as (1 + step) / (10 + step), as TensorFlow's
    ExponentialMovingAverage does, so the first steps' random weights fade at once. It depends on the step
    only: a resumed run continues the average exactly, given the averaged tensors (`average.model.state_dict()`)
    from its checkpoint.
    """

    def __init__(self, source: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(source).requires_grad_(False)
        pairs = zip(
            source.state_dict(keep_vars=True).values(),
            self.model.state_dict(keep_vars=True).values(),
            strict=True,
        )
        self._averaged: list[torch.Tensor] = []  # the float tensors, in the same order in both lists
        self._trained: list[torch.Tensor] = []
        self._others: list[tuple[torch.Tensor, torch.Tensor]] = []
        for trained, averaged in pairs:
            if trained.is_floating_point():
                self._averaged.append(averaged)
                self._trained.append(trained)
            else:
                self._others.append((averaged, trained))

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the trained model as it is after `step` (0-based)."""
        torch._foreach_lerp_(self._averaged, self._trained, 1 - self.decay_at(step))
        for averaged, trained in self._others:
            averaged.copy_(trained)
