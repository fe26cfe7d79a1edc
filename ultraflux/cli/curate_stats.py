"""``ultraflux curate-stats`` (transitional: the handler still lives in ultraflux.data.curate)."""
from ultraflux.data.curate import cli_curate_stats as main

__all__ = ["main"]
