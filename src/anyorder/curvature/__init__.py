"""Curvature estimators that differentiate the closure's loss themselves (DESIGN.md, principle 4).

* :class:`HVPEngine`: gradient and Hessian-vector products by double backward, falling back to
  finite differences of two gradients (with one warning) where double backward is unavailable;
* :class:`HutchinsonDiagonal`: Hutchinson's diagonal estimate (AdaHessian, Sophia-H);
* :class:`GaussNewtonBartlett`: Sophia's Gauss-Newton-Bartlett estimate for cross-entropy.
"""

from anyorder.curvature.gauss_newton import GaussNewtonBartlett, split_loss_logits
from anyorder.curvature.hutchinson import CurvatureEstimate, HutchinsonDiagonal
from anyorder.curvature.hvp import (
    HVP_METHODS,
    CurvatureFallbackWarning,
    HVPEngine,
    double_backward_unavailable,
    is_double_backward_error,
)

__all__ = [
    "HVP_METHODS",
    "CurvatureEstimate",
    "CurvatureFallbackWarning",
    "GaussNewtonBartlett",
    "HVPEngine",
    "HutchinsonDiagonal",
    "double_backward_unavailable",
    "is_double_backward_error",
    "split_loss_logits",
]
