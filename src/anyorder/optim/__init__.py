"""The public optimizer classes. All are ``torch.optim.Optimizer`` subclasses built on
:class:`anyorder.core.AnyOrderOptimizer`."""

from anyorder.optim.adahessian import AdaHessian
from anyorder.optim.cbo import CBO
from anyorder.optim.first_order import DiffGrad, Lion
from anyorder.optim.groups import asam_groups, decay_groups
from anyorder.optim.hybrid import HybridZO
from anyorder.optim.mfac import MFAC
from anyorder.optim.sam import SAM
from anyorder.optim.sophia import Sophia
from anyorder.optim.zo import ZOSGD, ZOAdam, ZOProbeRecord

__all__ = [
    "CBO",
    "ZOSGD",
    "ZOAdam",
    "ZOProbeRecord",
    "HybridZO",
    "AdaHessian",
    "DiffGrad",
    "Lion",
    "MFAC",
    "SAM",
    "Sophia",
    "asam_groups",
    "decay_groups",
]
