"""How `dvc repro` starts the heavy stages: ``python -m ultraflux.launch <stage>`` is their dvc.yaml ``cmd``.

The command text in dvc.yaml never changes; this module reads params.yaml's ``launch`` section when the stage runs
and starts the stage's script on ``launch.processes`` x ``launch.num_machines`` processes:

* one process in all: ``python stages/<script>`` exactly as before (no launcher, no process group);
* more: ``accelerate launch --config_file <config> --num_processes <world> ... stages/<script>`` on this machine
  (DiT stages with ``launch.config``, DeepSpeed ZeRO-2 in the paper profile; vae, sample and evaluate with
  ``launch.data_parallel_config``);
* with ``launch.prefix`` (e.g. ``srun --nodes=2 --ntasks-per-node=1``): the prefix runs
  ``python -m ultraflux.launch --on-machine <stage>`` once per machine, and each machine starts its own
  ``accelerate launch`` with its rank from ``launch.machine_rank_env`` (static rendezvous) or a c10d rendezvous at
  ``launch.main_process_ip:port``.

Before anything starts, the whole params file is validated and each training section's global batch is laid out over
the world size (``training/layout.py``): a mismatch is refused here, naming the three numbers. ``ultraflux plan``
prints the same commands (``stage_commands``).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

STAGE_SCRIPTS = {"vae": ["stages/vae.py"], "dit_stage1": ["stages/dit.py", "dit_stage1"],
                 "dit_stage2": ["stages/dit.py", "dit_stage2"], "sample": ["stages/sample.py"],
                 "evaluate": ["stages/evaluate.py"]}
# Which accelerate config a stage launches with (a launch key): ZeRO-2 shards the DiT's optimizer state; the VAE
# decoder and the inference stages are data parallel.
STAGE_CONFIG_KEY = {"vae": "data_parallel_config", "dit_stage1": "config", "dit_stage2": "config",
                    "sample": "data_parallel_config", "evaluate": "data_parallel_config"}
TRAINING_SECTION = {"vae": "vae_train", "dit_stage1": "dit_stage1", "dit_stage2": "dit_stage2"}
ACCELERATE = ["-m", "accelerate.commands.launch"]


def world_size(launch: dict) -> int:
    return int(launch["processes"]) * int(launch["num_machines"])


def is_deepspeed(config_file: str | os.PathLike) -> bool:
    from ultraflux.config import parse_yaml

    return str(parse_yaml(Path(config_file).read_text()).get("distributed_type", "")).upper() == "DEEPSPEED"


def machine_command(stage: str, launch: dict, env: dict | None = None, python: str = sys.executable) -> list[str]:
    """What one machine runs for ``stage``. ``env`` = this machine's environment (None: show variables as $NAME)."""
    script = STAGE_SCRIPTS[stage]
    world, machines = world_size(launch), int(launch["num_machines"])
    if world == 1:
        return [python, *script]
    config = launch[STAGE_CONFIG_KEY[stage]]
    cmd = [python, *ACCELERATE, "--config_file", config, "--num_processes", str(world),
           "--num_machines", str(machines), "--main_process_port", str(launch["main_process_port"])]
    if machines > 1:
        rank_var = launch["machine_rank_env"]
        rank = (env.get(rank_var, "") if env is not None else f"${rank_var}") if rank_var else "0"
        ip = os.path.expandvars(launch["main_process_ip"]) if env is not None else launch["main_process_ip"]
        cmd += ["--machine_rank", rank, "--main_process_ip", ip, "--rdzv_backend", launch["rdzv_backend"],
                "--same_network"]
        if Path(config).is_file() and is_deepspeed(config):
            cmd += ["--deepspeed_multinode_launcher", "standard"]   # one launcher per machine (no pdsh)
    return cmd + script


def head_command(stage: str, launch: dict, env: dict | None = None, python: str = sys.executable) -> list[str]:
    """What `dvc repro` runs on the machine it was started on (with a prefix: the prefix, which reruns this module
    on every machine)."""
    if launch["prefix"].strip():
        prefix = os.path.expandvars(launch["prefix"]) if env is not None else launch["prefix"]
        return [*shlex.split(prefix), python, "-m", "ultraflux.launch", "--on-machine", stage]
    return machine_command(stage, launch, env, python)


def launch_problems(params: dict, stage: str) -> list[str]:
    """What stops ``stage`` from starting with these params (config files, global batch layouts)."""
    from ultraflux.training.layout import BatchLayoutError, stage_layout

    launch, problems = params["launch"], []
    if world_size(launch) > 1:
        config = launch[STAGE_CONFIG_KEY[stage]]
        if not Path(config).is_file():
            problems.append(f"'launch.{STAGE_CONFIG_KEY[stage]}': no accelerate config file at {config}")
    if stage in TRAINING_SECTION:
        try:
            stage_layout(params[TRAINING_SECTION[stage]], TRAINING_SECTION[stage], world_size(launch))
        except BatchLayoutError as e:
            problems.append(str(e))
    return problems


def every_launch_problem(params: dict) -> list[str]:
    """:func:`launch_problems` of every stage the launcher starts (the ``params`` stage checks them before any work)."""
    return list(dict.fromkeys(p for stage in STAGE_SCRIPTS for p in launch_problems(params, stage)))


def cuda_gpus() -> int:
    """CUDA devices this process sees (0 without a GPU or without a CUDA build of torch)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def machine_problems(params: dict, gpus: int | None = None) -> list[str]:
    """Does this machine have what the params ask for? Checked by ``ultraflux params check`` and before a stage
    starts: real weights (``model.pretrained``, e.g. the paper profile's 12B FLUX.1) on a machine without a CUDA GPU,
    or more processes per machine than it has GPUs. The embedded CPU profile (tiny models, CPU processes) passes."""
    launch, pretrained = params["launch"], params["model"]["pretrained"]
    per_machine = int(launch["processes"])
    if not pretrained and per_machine == 1:
        return []
    gpus = cuda_gpus() if gpus is None else gpus
    hint = (f"`ultraflux plan --gpus {max(1, per_machine)}` prints what this profile needs per GPU; on this machine "
            "keep the embedded profile (model.pretrained: \"\", launch.processes: 1)")
    if pretrained and gpus == 0:
        return [f"model.pretrained = {pretrained!r} is a full-size transformer and this machine has no CUDA GPU "
                f"(launch.processes = {per_machine} asks for {per_machine}): {hint}"]
    if gpus and per_machine > gpus:
        return [f"launch.processes = {per_machine} processes per machine but this machine has {gpus} CUDA GPU(s): "
                f"set launch.processes to at most {gpus}, or run where there are {per_machine}; {hint}"]
    return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ultraflux.launch",
                                 description="start a stage on launch.processes x launch.num_machines processes")
    ap.add_argument("stage", choices=sorted(STAGE_SCRIPTS))
    ap.add_argument("--on-machine", action="store_true", help="(run by launch.prefix on each machine)")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    from ultraflux.config import ParamsError, load_validated

    try:
        params = load_validated(args.params)
        if problems := launch_problems(params, args.stage) + machine_problems(params):
            raise ParamsError(problems, args.params)
    except ParamsError as e:
        print(f"[{args.stage}] {e}", file=sys.stderr)
        return 2
    launch = params["launch"]
    make = machine_command if args.on_machine else head_command
    cmd = make(args.stage, launch, dict(os.environ))
    if world_size(launch) > 1:
        print(f"[{args.stage}] {shlex.join(cmd)}", file=sys.stderr, flush=True)
    os.execvp(cmd[0], cmd)   # the stage's exit status is the command's


if __name__ == "__main__":
    sys.exit(main())
