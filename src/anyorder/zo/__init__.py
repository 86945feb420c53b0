"""Black-box, value-only minimisation: :func:`minimize` in the shape of
``scipy.optimize.minimize``."""

from anyorder.zo.minimize import METHODS, ZOResult, minimize

__all__ = ["minimize", "ZOResult", "METHODS"]
