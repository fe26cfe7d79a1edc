"""DVC stage `params`: validate params.yaml before any other stage runs (and so before DVC removes its outputs),
with every stage's launch (accelerate config files, the training stages' global batch layouts)."""
import sys

from ultraflux.launch import STAGE_SCRIPTS, launch_problems
from ultraflux.stage import check_params_stage


def launches(params: dict) -> list[str]:
    return [p for stage in STAGE_SCRIPTS for p in launch_problems(params, stage)]


if __name__ == "__main__":
    sys.exit(check_params_stage(checks=[launches]))
