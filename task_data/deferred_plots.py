"""flwr-datasets' partitioners without its plotting helpers at import time.

flwr-datasets 0.6.1's package ``__init__`` imports ``flwr_datasets.visualization``, which
imports seaborn, matplotlib and scipy.stats in every process that imports a partitioner.
Every federation would pay that start-up in its ServerApp and in each of its ClientApp
processes, and nothing here plots with it. Until the package defers that import
itself, ``defer_visualization`` puts a stand-in module in its place that imports the real
one on first use, so ``flwr_datasets.visualization.plot_label_distributions`` still works.
"""

from __future__ import annotations

import importlib
import sys
import types

NAME = "flwr_datasets.visualization"


class _DeferredModule(types.ModuleType):
    """Stands for ``NAME`` until an attribute it lacks is asked for, then becomes the real
    module: in ``sys.modules`` and on the parent package."""

    def __getattr__(self, attribute: str) -> object:
        loaded = sys.modules.get(NAME)
        if loaded is not None and loaded is not self:  # resolved: held copies forward
            return getattr(loaded, attribute)
        if attribute.startswith("__") and attribute not in ("__path__", "__all__"):
            # Not the package's API: ``inspect.getmodule`` (torch calls it while importing
            # torch.distributed) asks every module in sys.modules for ``__file__``, and
            # answering it would load the plotting stack in every training process.
            raise AttributeError(attribute)
        if loaded is self:
            del sys.modules[NAME]
        real = importlib.import_module(NAME)
        parent = sys.modules.get(NAME.rpartition(".")[0])
        if parent is not None:
            parent.visualization = real
        return getattr(real, attribute)


def defer_visualization() -> None:
    """Install the stand-in, unless flwr-datasets is already imported (then it is too late,
    and the real module is there)."""
    if "flwr_datasets" in sys.modules or NAME in sys.modules:
        return
    stand_in = _DeferredModule(NAME, "imported on first use: " + __name__)
    sys.modules[NAME] = stand_in
