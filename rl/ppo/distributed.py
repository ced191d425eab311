"""Averages over processes: gradients before each optimiser step, metrics after each iteration.

The trainer runs its policy and critic passes on different parameter subsets, which DDP's
wrapper cannot follow, so it averages gradients itself: one all-reduce of the flattened
gradients per step (a no-op in one process).
"""

from __future__ import annotations

from typing import Any

import torch


def mean_gradients(accelerator: Any, params: list[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over processes (missing ones count as 0)."""
    if accelerator.num_processes == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), "mean")
    for param, chunk in zip(params, flat.split([p.numel() for p in params]), strict=True):
        param.grad = chunk.view_as(param).clone()


def mean_metrics(
    accelerator: Any, metrics: dict[str, float], device: torch.device
) -> dict[str, float]:
    """The mean of every metric over processes (one collective)."""
    if accelerator.num_processes == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    values = accelerator.reduce(values, "mean")
    return dict(zip(keys, values.tolist(), strict=True))


def add_to(sums: dict[str, float], values: dict[str, float]) -> None:
    """sums[k] += values[k] for every key (missing keys start at 0)."""
    for key, value in values.items():
        sums[key] = sums.get(key, 0.0) + value
