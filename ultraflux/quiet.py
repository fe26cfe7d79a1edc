"""Quiet by default: third-party libraries' start-up chatter off, so a run prints progress bars and our messages.

Called first by every stage and command. Each line below silences one message a default run printed (and only
sets a default: an environment variable the user set wins):

* transformers / diffusers: "`CLIPImageProcessor` requires torchvision (not installed); falling back ..." on import
  of the Flux pipeline (the image processors are never used here);
* MLflow: "INFO mlflow.store.db.utils: Creating initial MLflow database tables..." when a store is created;
* DeepSpeed (imported by accelerate): "Setting accelerator to CPU. If you have GPU ..." on machines without CUDA,
  where CPU is the intended accelerator.
"""
from __future__ import annotations

import os


def quiet_third_party() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
