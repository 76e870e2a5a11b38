"""protoaudit: train, ensemble, prune and audit ProtoPNets ("This Looks Like That", Chen et al. 2019)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_run", "train_ensemble"]

if TYPE_CHECKING:
    from protoaudit.engine.ensemble import train_ensemble
    from protoaudit.engine.run import load_run


def __getattr__(name: str) -> Any:  # heavy imports (torch) only when used
    if name == "load_run":
        from protoaudit.engine.run import load_run

        return load_run
    if name == "train_ensemble":
        from protoaudit.engine.ensemble import train_ensemble

        return train_ensemble
    raise AttributeError(name)
