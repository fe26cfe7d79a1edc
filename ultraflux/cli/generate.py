"""``ultraflux generate`` (transitional: the handler still lives in ultraflux.sampling)."""
from ultraflux.sampling import cli_generate as main

__all__ = ["main"]
