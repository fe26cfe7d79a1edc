"""``ultraflux ablation`` (transitional: the handler still lives in ultraflux.ablation)."""
from ultraflux.ablation import cli_ablation as main

__all__ = ["main"]
