"""``fxsight.patching``: patching experiments (:mod:`fxsight.experiments.patching`), by
their short public name."""

from .experiments.patching import (Cell, PatchingResult, activation_patching, attribution,
                                   block_envoys, head_patching, steering_sweep)
from .experiments.plots import plot_attention

__all__ = ["PatchingResult", "Cell", "activation_patching", "head_patching", "steering_sweep",
           "attribution", "block_envoys", "plot_attention"]
