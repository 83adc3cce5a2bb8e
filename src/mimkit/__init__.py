"""mimkit: masked image modeling toolkit (MAE, continual MAE, LocalMIM + FreezeOut, downstream)."""

__version__ = "0.1.0"
