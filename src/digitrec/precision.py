"""bfloat16 where the device computes it natively: native_bfloat16() asks the device, autocast() runs a recipe's `amp`.

Shared by training (training.py, graphed.py) and evaluation (evaluate.py), so that both compute alike.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def native_bfloat16(device_type: str) -> bool:
    """Does this device compute in bfloat16 natively, so that autocast speeds it up?

    A CPU needs AVX-512 BF16 or AMX: without them PyTorch emulates bfloat16, and `fast` trained in 63.7 s
    against 6.7 s in float32 on an AVX2-only EPYC (on one with AMX, bfloat16 is 2-3x faster than float32).
    """
    if device_type == "cuda":
        # Ampere and later; a T4, V100 or RTX 20xx only emulates it (torch's default counts emulation as support)
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device_type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    if device_type == "mps":  # Apple GPUs have bfloat16 from macOS 14 on
        return bool(torch.backends.mps.is_macos_or_newer(14, 0))
    return True  # other devices: autocast as the recipe asks


def autocast(device: torch.device, amp: bool, cache: bool = True) -> torch.autocast:
    """bfloat16 autocast when the recipe asks for it (`amp`) and the device has native bfloat16; else float32.

    `cache=False` casts the weights anew on every use: a step captured as a CUDA graph (graphed.py) must not
    keep the bfloat16 copy made at capture.
    """
    enabled = amp and native_bfloat16(device.type)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=cache)
