"""Exponential moving average of the trained weights (``dit_stage*.ema``), through diffusers' ``EMAModel``.

``ema: {decay, every, start, use_for_validation}`` (null = off). The EMA tracks the trainable parameters (all of them
in a full fine-tune, the adapter in a LoRA run). The first update, after training step ``start``, copies the weights;
every ``every`` steps after that

    ema <- decay * ema + (1 - decay) * weights

with a constant ``decay`` (``EMAModel(min_decay=decay)``: diffusers' (1+n)/(10+n) warm-up is capped at ``decay`` and
floored at ``min_decay``, so it is constant from the second update on). The EMA is registered with accelerate, so it
is checkpointed and resumed with the model, optimizer and RNG states. ``swapped_in(ema, model)`` puts the EMA weights
into the model for validation or saving and restores the trained ones afterwards. The average is kept in float32
whatever the model's dtype (bf16 under DeepSpeed): 4 bytes per trained parameter on each process.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_ema(cfg: dict | None, model: torch.nn.Module):
    """An ``EMAModel`` over ``model``'s trainable parameters, or None when ``cfg`` is null (EMA off)."""
    if not cfg:
        return None
    from diffusers.training_utils import EMAModel

    decay = float(cfg["decay"])
    ema = EMAModel(trainable(model), decay=decay, min_decay=decay, update_after_step=0)
    ema.to(dtype=torch.float32)  # a bf16 average (ZeRO-2's model dtype) would round every (1 - decay) step away
    return ema


def ema_update(ema, cfg: dict | None, step: int, model: torch.nn.Module) -> bool:
    """After training step ``step`` (1-based): update when ``step >= start`` and ``(step - start) % every == 0``."""
    if ema is None or step < int(cfg["start"]) or (step - int(cfg["start"])) % int(cfg["every"]):
        return False
    ema.step(trainable(model))
    return True


@contextmanager
def swapped_in(ema, model: torch.nn.Module, enabled: bool = True):
    """The EMA weights in ``model`` inside the block (no-op when ``ema`` is None or not ``enabled``)."""
    if ema is None or not enabled:
        yield model
        return
    params = trainable(model)
    ema.store(params)
    ema.copy_to(params)
    try:
        yield model
    finally:
        ema.restore(params)
