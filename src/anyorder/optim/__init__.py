"""The public optimizer classes. All are ``torch.optim.Optimizer`` subclasses built on
:class:`anyorder.core.AnyOrderOptimizer`."""

from anyorder.optim.zo import ZOSGD, ZOAdam, ZOProbeRecord

__all__ = ["ZOSGD", "ZOAdam", "ZOProbeRecord"]
