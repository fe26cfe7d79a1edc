"""``ultraflux plan``: what `dvc repro` will run on a given number of GPUs, before anything runs.

For the current params.yaml with ``launch.processes`` / ``launch.num_machines`` set from ``--gpus`` / ``--nodes``,
per stage: the exact command each machine runs (``ultraflux/launch.py``), the global batch layout
(micro-batch x processes x accumulation, ``training/layout.py``), the per-GPU memory of the model states and the wall
time = steps x seconds per step (given with ``--step-time``, or measured: the median ``step_time_s`` of the stage's
last ``loss.csv``, valid for the layout it was measured on).

Memory: the DiT stages run ZeRO-2 (the UltraFlux paper's supplement, Sec. 2.2) and are estimated with DeepSpeed's
own estimator (``estimate_zero2_model_states_mem_needs``: parameters, gradients and optimizer states, no
activations), beside the accounting of ``training/memory.py`` (bf16 parameters replicated, gradients and fp32 Adam
states sharded, reduce buckets). The VAE decoder is plain data parallel in fp32: 16 bytes per trainable parameter
(weights, gradient, AdamW m and v) plus 4 per frozen one, per GPU. Parameter counts come from the model's config
(tiny profile, or the pretrained directory's config.json), built on the meta device: no weights are read.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
import statistics
from pathlib import Path

from ultraflux.launch import STAGE_SCRIPTS, TRAINING_SECTION, head_command, machine_command, world_size
from ultraflux.training.layout import BatchLayoutError, stage_layout
from ultraflux.training.memory import GIB, zero2_memory

# FLUX.1-dev's transformer (its config.json): the parameter count when model.pretrained is not readable here.
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
# The SLURM script's multi-machine settings (scripts/slurm_ultraflux.sbatch), used when --nodes asks for machines that
# params.yaml does not describe yet.
SLURM_LAUNCH = {"prefix": "srun --overlap --nodes=$SLURM_NNODES --ntasks-per-node=1",
                "machine_rank_env": "SLURM_NODEID",
                "main_process_ip": "$MASTER_ADDR", "rdzv_backend": "static"}


def with_gpus(params: dict, gpus: int, nodes: int = 1) -> tuple[dict, list[str]]:
    """params with launch set for ``gpus`` GPUs over ``nodes`` machines, and notes on what was filled in."""
    if gpus < 1 or nodes < 1 or gpus % nodes:
        raise ValueError(f"--gpus {gpus} must be a positive multiple of --nodes {nodes} (GPUs per node x nodes)")
    p, notes = copy.deepcopy(params), []
    launch = p["launch"]
    launch.update(processes=gpus // nodes, num_machines=nodes)
    if nodes > 1 and not launch["prefix"].strip():
        launch.update(SLURM_LAUNCH)
        notes.append("launch.prefix, machine_rank_env, main_process_ip: the SLURM script's values "
                     "(scripts/slurm_ultraflux.sbatch), params.yaml sets none")
    return p, notes


def transformer_params(params: dict) -> tuple[int, str]:
    """(parameter count of the DiT, where the config came from)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from ultraflux.models.transformer import build_transformer

    pretrained = params["model"]["pretrained"]
    config_file = Path(pretrained) / "transformer" / "config.json" if pretrained else None
    with torch.device("meta"):
        if not pretrained:
            model, source = build_transformer(params["model"], params["rope"]), "model.tiny"
        else:
            readable = config_file.is_file()
            cfg = json.loads(config_file.read_text()) if readable else dict(FLUX_DEV)
            model = FluxTransformer2DModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
            source = str(config_file) if readable else f"FLUX.1-dev config ({pretrained} not readable here)"
    return sum(p.numel() for p in model.parameters()), source


def vae_params(params: dict) -> tuple[int, int, str]:
    """(trainable decoder parameters, frozen ones, where the config came from) of the VAE post-training."""
    import torch

    from ultraflux.models.vae import build_vae

    if params["model"]["vae_pretrained"] and not Path(params["model"]["vae_pretrained"]).is_dir():
        return 0, 0, f"{params['model']['vae_pretrained']} not readable here"
    with torch.device("meta"):
        vae = build_vae(params["model"])
    decoder = {id(p) for m in (vae.decoder, getattr(vae, "post_quant_conv", None)) if m is not None
               for p in m.parameters()}
    total = list(vae.parameters())
    trainable = sum(p.numel() for p in total if id(p) in decoder)
    return trainable, sum(p.numel() for p in total) - trainable, params["model"]["vae_pretrained"] or "model.tiny"


def deepspeed_zero2(num_params: int, gpus_per_node: int, nodes: int) -> float | None:
    """GiB per GPU of the model states by DeepSpeed's estimator (None when DeepSpeed is not installed)."""
    try:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    except Exception:   # noqa: BLE001 - DeepSpeed is optional (an extra); its import can fail on CPU-only builds
        return None
    _, gpu_bytes = estimate_zero2_model_states_mem_needs(num_params, gpus_per_node, nodes, cpu_offload=False)
    return gpu_bytes / GIB


def measured_step_time(stage: str, outputs: Path = Path("outputs")) -> float | None:
    """Median seconds per optimizer step of the stage's last run (its loss.csv), if there is one."""
    loss = outputs / ("vae" if stage == "vae" else stage) / "loss.csv"
    if not loss.is_file():
        return None
    import pandas as pd

    df = pd.read_csv(loss)
    if "step_time_s" in df:
        return float(statistics.median(df["step_time_s"]))
    return None


def show(cmd: list[str]) -> str:
    """A command as a shell line; ``$VARIABLES`` stay unquoted (each machine's shell or launcher expands them)."""
    return " ".join(a if re.fullmatch(r"[\w$./=:,-]+", a) else shlex.quote(a) for a in cmd)


def stage_plan(params: dict, stage: str, step_times: dict[str, float]) -> dict:
    launch = params["launch"]
    head = head_command(stage, launch, python="python")
    plan = {"stage": stage, "command": show(head)}
    if launch["prefix"].strip():
        plan["machine_command"] = show(machine_command(stage, launch, python="python"))
    if stage in TRAINING_SECTION:
        key = TRAINING_SECTION[stage]
        section = params[key]
        try:
            micro, accum = stage_layout(section, key, world_size(launch))
            plan["layout"] = (f"global batch {section['global_batch']} = micro-batch {micro} x "
                              f"{world_size(launch)} processes x {accum} accumulation")
        except BatchLayoutError as e:
            plan["layout"] = f"REFUSED: {e}"
        seconds = step_times.get(stage, step_times.get("*"))
        source = "given"
        if seconds is None and (seconds := measured_step_time(stage)) is not None:
            source = "measured (last run's loss.csv, at its layout)"
        steps = int(section["steps"])
        plan["wall"] = (f"{steps} steps x {seconds:.3g} s ({source}) = {steps * seconds / 3600:.2f} h"
                        if seconds is not None else f"{steps} steps x (no step time: --step-time {stage}=S)")
    return plan


def memory_lines(params: dict) -> list[str]:
    launch = params["launch"]
    n, per_node, nodes = world_size(launch), int(launch["processes"]), int(launch["num_machines"])
    p, source = transformer_params(params)
    acc = zero2_memory(p, n)
    ds = deepspeed_zero2(p, per_node, nodes)
    dit_cfg = "ZeRO-2" if "zero2" in launch["config"] else f"{launch['config']} (estimate assumes ZeRO-2)"
    lines = [f"DiT ({p / 1e9:.3f}B params, {source}), {dit_cfg} over {n} GPUs, model states per GPU:",
             f"  DeepSpeed estimate_zero2_model_states_mem_needs: "
             + (f"{ds:.2f} GiB" if ds is not None else "DeepSpeed not installed"),
             f"  training/memory.py accounting: {acc['static_total'] / GIB:.2f} GiB static, "
             f"{acc['peak_total'] / GIB:.2f} GiB peak in step() (incl. reduce buckets) + activations "
             f"(gradient checkpointing: {params['dit_stage1']['gradient_checkpointing']})"]
    trainable, frozen, vsource = vae_params(params)
    if trainable:
        lines.append(f"VAE ({trainable / 1e6:.1f}M trainable decoder + {frozen / 1e6:.1f}M frozen params, {vsource}), "
                     f"data parallel fp32: {(16 * trainable + 4 * frozen) / GIB:.2f} GiB per GPU + activations")
    else:
        lines.append(f"VAE: {vsource}")
    return lines


def plan(params: dict, gpus: int, nodes: int = 1, step_times: dict[str, float] | None = None) -> str:
    """The plan as text (module doc)."""
    params, notes = with_gpus(params, gpus, nodes)
    out = [f"ultraflux plan: {gpus} GPUs = {nodes} machine(s) x {gpus // nodes} processes "
           f"(launch.processes={gpus // nodes}, launch.num_machines={nodes})"]
    out += [f"note: {n}" for n in notes]
    for stage in STAGE_SCRIPTS:
        sp = stage_plan(params, stage, step_times or {})
        out.append(f"\n{stage}:\n  run:     {sp['command']}")
        if "machine_command" in sp:
            out.append(f"  machine: {sp['machine_command']}")
        for key in ("layout", "wall"):
            if key in sp:
                out.append(f"  {key + ':':<8} {sp[key]}")
    out.append("")
    out += memory_lines(params)
    return "\n".join(out)


def parse_step_times(values: list[str]) -> dict[str, float]:
    """``["4.2", "vae=0.8"]`` -> {"*": 4.2, "vae": 0.8}."""
    out = {}
    for v in values:
        stage, _, seconds = v.rpartition("=")
        if stage and stage not in TRAINING_SECTION:
            raise ValueError(f"--step-time {v}: {stage!r} is not a training stage ({', '.join(TRAINING_SECTION)})")
        try:
            out[stage or "*"] = float(seconds)
        except ValueError:
            raise ValueError(f"--step-time {v}: seconds must be a number") from None
    return out

