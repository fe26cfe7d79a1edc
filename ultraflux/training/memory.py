"""Training memory: the gradient-checkpointing setting, peak-memory readings, and the ZeRO-2 per-GPU accounting.

ZeRO-2 (seed Sec. 2.2: 8 GPUs, DeepSpeed ZeRO-2 without CPU offload) keeps the bf16 parameters replicated on every
GPU and shards gradients and optimizer states over the N data-parallel GPUs. Per GPU, for P parameters (the ZeRO paper,
Rajbhandari et al. 2020, Sec. 5: 2P + (2 + K) P / N bytes with K = 12 for mixed-precision Adam):

    bf16 parameters (replicated)                     2 P
    bf16 gradient partition                          2 P / N      (DeepSpeed's default grad_accum_dtype = model dtype)
    fp32 master weights                              4 P / N
    fp32 AdamW moments m, v                          8 P / N
    fp32 copy of the gradient partition, in step()   4 P / N      (transient: stage_1_and_2.py casts it for the update)
    gradient-reduction buckets                       reduce_bucket_size x 2 bytes, x 2 with overlap_comm (two buffers)

plus activations (bounded by gradient checkpointing). :func:`zero2_memory` evaluates this; bench_training.py --full
prints it for N = 8 next to what one emulated rank measures.
"""
from __future__ import annotations

GIB = 2**30


def gradient_checkpointing(value, key: str = "gradient_checkpointing") -> bool:
    """``auto`` -> on when CUDA is present (activations dominate at 4K, not on the CPU profile); else the bool."""
    import torch

    if value == "auto":
        return torch.cuda.is_available()
    if isinstance(value, bool):
        return value
    raise ValueError(f"{key} must be auto, true or false (got {value!r})")


def peak_memory() -> dict[str, float]:
    """Peak memory figures, clearly named: CUDA allocator peak on GPU, this process's peak RSS (host) always."""
    import resource

    import torch

    out = {"peak_host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}   # ru_maxrss: KiB on Linux
    if torch.cuda.is_available():
        out["peak_cuda_allocated_gb"] = torch.cuda.max_memory_allocated() / GIB
    return out


def zero2_memory(num_params: int, world: int, reduce_bucket_size: float = 5e8, overlap_comm: bool = True) -> dict:
    """Bytes per GPU of a bf16 ZeRO-2 AdamW run over ``world`` GPUs (module docstring); activations not included."""
    p, n = float(num_params), int(world)
    if n < 1 or p < 0:
        raise ValueError(f"need world >= 1 and num_params >= 0, got {world}, {num_params}")
    parts = {
        "params_bf16_replicated": 2 * p,
        "grads_bf16_partition": 2 * p / n,
        "master_fp32_partition": 4 * p / n,
        "adam_moments_fp32_partition": 8 * p / n,
        "reduce_buckets": reduce_bucket_size * 2 * (2 if overlap_comm else 1),
    }
    parts["static_total"] = sum(parts.values())
    parts["step_grad_fp32_partition"] = 4 * p / n
    parts["peak_total"] = parts["static_total"] + parts["step_grad_fp32_partition"]
    parts["zero_paper_model"] = 2 * p + (2 + 12) * p / n      # Rajbhandari et al.: 2P + (2 + K) P / N, K = 12
    return parts
