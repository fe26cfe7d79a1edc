"""Low-VRAM modes for the transformer (``sample.memory``, ``generate --memory``), from diffusers' hooks:

* ``none``: weights in ``sample.dtype`` where ``place`` put them.
* ``fp8``: layerwise casting (``enable_layerwise_casting``): every layer's weights stored in float8_e4m3fn and upcast
  to the compute dtype for its forward; half the weight memory of bf16. Norms, embedders and the output projection
  stay in the compute dtype (diffusers' default skip patterns). Runs anywhere (on the CPU too), with a quality cost
  (benchmarks/bench_memory_modes.py).
* ``group``: block-level group offload (``enable_group_offload``): the weights live in host memory and each
  transformer block is copied to the accelerator just before it runs (one block per group, CUDA-stream prefetch);
  needs an accelerator. On a CPU-only machine the weights already live in host memory, so it runs without offload
  and says so (as ``sample.offload``).
* ``group_fp8``: both (host copies in fp8: half the transfer).

They combine with the tiled VAE decode (``sample.vae_tiling``); ``group`` replaces ``sample.offload``'s model /
sequential offload for the transformer (the two must not both be set: the schema says so).
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

MEMORY_MODES = ("none", "fp8", "group", "group_fp8")


def apply_memory_mode(transformer, mode: str, device: torch.device, compute_dtype: torch.dtype) -> str:
    """Install ``mode``'s hooks on ``transformer``; returns the mode in effect (``group`` falls back on the CPU)."""
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory mode must be one of {', '.join(MEMORY_MODES)}; got {mode!r}")
    if mode.startswith("group") and device.type == "cpu":
        logger.warning("sample.memory=%s needs an accelerator (it streams blocks from host memory to the device); "
                       "on the CPU the weights already live in host memory, so it runs without group offload", mode)
        mode = "fp8" if mode == "group_fp8" else "none"
    if mode.endswith("fp8"):
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
    if mode.startswith("group"):
        transformer.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                         offload_type="block_level", num_blocks_per_group=1, use_stream=True)
    return mode
