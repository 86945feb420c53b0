"""Estimators: which gradient (DESIGN.md, principle 2). Each produces a direction that any update
rule in :mod:`anyorder.functional` can consume."""

from anyorder.estimators.coordinate import CoordinateWise, zo_pruning_mask
from anyorder.estimators.spsa import SPSA, SPSASample

__all__ = ["SPSA", "SPSASample", "CoordinateWise", "zo_pruning_mask"]
