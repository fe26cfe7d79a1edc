"""ultraflux: an experiment-tracked implementation of the UltraFlux recipe (native-4K, multi-AR text-to-image)."""

__version__ = "0.1.0"
