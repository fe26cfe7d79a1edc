"""``ultraflux judge`` (transitional: the handler still lives in ultraflux.evaluation.judge)."""
from ultraflux.evaluation.judge import cli_judge as main

__all__ = ["main"]
