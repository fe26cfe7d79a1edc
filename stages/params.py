"""DVC stage `params`: validate params.yaml before any other stage runs (and so before DVC removes its outputs),
with every stage's launch (accelerate config files, the training stages' global batch layouts)."""
import sys

from ultraflux.launch import every_launch_problem
from ultraflux.stage import check_params_stage

if __name__ == "__main__":
    sys.exit(check_params_stage(checks=[every_launch_problem]))
