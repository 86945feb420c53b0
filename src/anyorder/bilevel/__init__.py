"""Stochastic bilevel optimization: ``min_x F(x, y*(x))``, ``y*(x) = argmin_y G(x, y)``.

Every algorithm is a ``torch.optim.Optimizer`` over the outer variables ``x`` (param groups, LR
schedulers, bit-exact ``state_dict`` round trip) that also updates the inner variables ``y``
given as ``inner=``, and takes the inner and outer losses as closures
(``opt.step(inner_loss, outer_loss)``; the contract is in :mod:`anyorder.bilevel._base`).

* :class:`AID` -- warm-started inner steps and CG on the adjoint system;
* :class:`ITD` -- reverse-mode differentiation through ``T`` inner steps (truncated to ``K``);
* :class:`Penalty` -- the fully first-order penalty method (Kwon et al., ICLR 2024; F2SA);
* :class:`BOREP` -- normalized momentum with periodic inner updates (Hao et al., ICLR 2024);
* :class:`LVHBA` -- constrained lower level, proximal Lagrangian value function (Yao et al.,
  ICLR 2024);
* :class:`BSVRB` -- many lower-level problems, sampled blocks, variance-reduced trackers of the
  Hessian (v1) or of the linear-system residual (v2) (Hu et al., ICML 2023).
"""

from anyorder.bilevel._base import BilevelOptimizer, MixedHessian
from anyorder.bilevel.aid import AID
from anyorder.bilevel.borep import BOREP
from anyorder.bilevel.bsvrb import BSVRB
from anyorder.bilevel.itd import ITD
from anyorder.bilevel.lvhba import LVHBA, LVHBAStepWarning
from anyorder.bilevel.penalty import Penalty

__all__ = [
    "BilevelOptimizer", "MixedHessian", "AID", "ITD", "Penalty", "BOREP", "LVHBA", "LVHBAStepWarning",
    "BSVRB",
]
