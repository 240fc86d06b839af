"""The fast mode of a run: channels_last and bf16 autocast where the device computes bf16 fast,
and ``torch.compile`` as an option (``speed.*`` in ``conf/config.yaml``).

* **bf16 autocast** is Lightning's ``precision="bf16-mixed"`` (``torch.autocast`` around every
  training, validation and test step, the SMILE teacher's forward included; the weights, the
  optimiser and the losses stay float32). It pays where the device has bf16 matrix units: a CUDA
  GPU that supports bf16 (Ampere and later) or a CPU with AMX or AVX-512-BF16 (oneDNN's bf16
  kernels). Elsewhere bf16 is emulated and slower, so ``auto`` leaves it off there.
* **channels_last** is the memory layout oneDNN and cuDNN convolve fastest in (NHWC); the
  module's 4-D weights are converted once and every convolution's output follows them.
* **torch.compile** compiles each model of the LightningModule in place (``nn.Module.compile``:
  state-dict keys unchanged, so checkpoints are the same); its cache is kept in
  ``speed.compile_cache_dir`` so the trials of a sweep compile once.

An explicit ``trainer.precision`` always wins: ``speed.fast_mode`` chooses it only while the
trainer config leaves it ``null``. ``benchmarks/step_speed.py`` measures what each part buys and
README's parity table what it costs in accuracy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_stl.checks import flag

__all__ = ["FAST_PRECISION", "bf16_is_fast", "compile_models", "fast_mode_on", "speed_settings"]

FAST_PRECISION = "bf16-mixed"
FLOAT32 = "32-true"


def bf16_is_fast(device: torch.device) -> bool:
    """Whether ``device`` has bf16 matrix units (CUDA bf16; a CPU with AMX or AVX-512-BF16)."""
    if device.type == "cuda":  # bf16 tensor cores from Ampere (compute capability 8.0) on
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        # torch.cpu has no public query for these two instruction sets; its private ones read
        # cpuinfo, the library oneDNN uses to pick its bf16 kernels
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
        return bool(amx() or avx512_bf16())
    return False


def fast_mode_on(setting: Any, device: torch.device) -> bool:
    """``speed.fast_mode`` for ``device``: ``auto`` is on where :func:`bf16_is_fast`; ``true`` is
    on, and refused where the device has no fast bf16 (it would run slower than float32)."""
    if setting != "auto" and not isinstance(setting, bool):
        raise ValueError(
            f"speed.fast_mode={setting!r} is not allowed: it must be auto, true or false"
        )
    if setting == "auto":
        return bf16_is_fast(device)
    if setting and not bf16_is_fast(device):
        raise ValueError(
            f"speed.fast_mode=true on {device}, which has no fast bf16 (a CUDA GPU with bf16, or "
            "a CPU with AMX or AVX-512-BF16): bf16 would be emulated and slower than float32. "
            "Use speed.fast_mode=auto or false"
        )
    return bool(setting)


def speed_settings(cfg: Any, device: torch.device) -> dict[str, Any]:
    """What the run's speed settings decide: ``precision`` (for the Trainer), ``channels_last``
    and ``compile``."""
    speed = cfg.get("speed") or {}
    fast = fast_mode_on(speed.get("fast_mode", False), device)
    precision = cfg.trainer.get("precision")
    if precision is None:
        precision = FAST_PRECISION if fast else FLOAT32
    compiled = flag("speed.compile", speed.get("compile", False))
    return {"precision": str(precision), "channels_last": fast, "compile": compiled}


def to_channels_last(module: nn.Module) -> nn.Module:
    """Every 4-D parameter and buffer of ``module`` in NHWC (``Module.to`` converts only those)."""
    return module.to(memory_format=torch.channels_last)


def compile_models(module: nn.Module, cache_dir: str | Path | None) -> list[str]:
    """Compile each child model of a LightningModule in place; the names compiled.

    ``nn.Module.compile`` wraps a module's call, not its state, so checkpoints keep their keys and
    load into an uncompiled module. Inductor keeps compiled graphs in ``TORCHINDUCTOR_CACHE_DIR``;
    pointing it at ``cache_dir`` (unless the environment sets it) lets the trials of a sweep and
    the seeds of a table reuse them.
    """
    if cache_dir is not None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
    names = []
    for name, child in module.named_children():
        if any(p.numel() for p in child.parameters()):
            child.compile()
            # timm's interface: FineTune's training step calls a backbone's forward_features and
            # forward_head, which Module.compile (it wraps __call__) leaves out
            for method in ("forward_features", "forward_head"):
                if callable(getattr(child, method, None)):
                    setattr(child, method, torch.compile(getattr(child, method)))
            names.append(name)
    return names
