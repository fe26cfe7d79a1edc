"""DVC stage `params`: validate params.yaml before any other stage runs (and so before DVC removes its outputs)."""
import sys

from ultraflux.stage import check_params_stage

if __name__ == "__main__":
    sys.exit(check_params_stage())
