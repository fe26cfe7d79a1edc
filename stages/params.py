"""DVC stage `params`: validate params.yaml before any other stage runs (and so before DVC removes its outputs)."""
from ultraflux.stage import check_params_stage

if __name__ == "__main__":
    check_params_stage()
