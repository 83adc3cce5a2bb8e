"""mimkit: masked image modeling toolkit (MAE, continual MAE, LocalMIM + FreezeOut, downstream).

Every command is also a function: `mimkit.pretrain(epochs=1, output_dir="runs/x")`, `mimkit.knn(...)`, ...
(see `mimkit.api`); they are imported on first use, so `import mimkit` stays light.
"""

__version__ = "0.1.0"

_API = ("pretrain", "continual", "segment", "incremental", "knn", "rankme", "linprobe", "finetune", "export",
        "visualize", "stats", "shards", "call", "run_command", "RunResult")


def __getattr__(name: str):
    if name in _API:
        from mimkit import api

        return getattr(api, name)
    raise AttributeError(f"module 'mimkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_API))
