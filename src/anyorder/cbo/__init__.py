"""Consensus-based optimization (CBO): global, derivative-free optimization with particles.

* :func:`minimize`: minimise a function of a batch of points (``anyorder.cbo.minimize``);
* :mod:`~anyorder.cbo.dynamics`: the consensus point and the CBO step, shared with
  :class:`anyorder.optim.CBO`, which trains a model's parameters with particles;
* :mod:`~anyorder.cbo.functions`: standard test functions with their known minimisers.

Papers: Pinnau, Totzeck, Tse & Martin (2017); Carrillo, Jin, Li & Zhu (2021, anisotropic noise and
random batches); Riedl, Klock, Geldhauser & Fornasier, "Gradient is All You Need?" (2023).
"""

from anyorder.cbo import dynamics, functions
from anyorder.cbo.divergence import SwarmDivergedError
from anyorder.cbo.minimize import CBOResult, minimize

__all__ = ["minimize", "CBOResult", "SwarmDivergedError", "dynamics", "functions"]
