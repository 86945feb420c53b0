"""In-place update rules over lists of tensors (DESIGN.md, principle 5).

Each rule is written once, vectorised with ``torch._foreach_*``, and fed by any estimator:
backprop gradients, SPSA estimates or coordinate-wise estimates.
"""

from anyorder.functional.adahessian import adahessian_, spatial_average_
from anyorder.functional.adam import adam_
from anyorder.functional.diffgrad import diffgrad_
from anyorder.functional.lion import lion_
from anyorder.functional.sgd import sgd_
from anyorder.functional.sophia import ema_, sophia_, sophia_clip_count

__all__ = [
    "adahessian_",
    "adam_",
    "diffgrad_",
    "ema_",
    "lion_",
    "sgd_",
    "sophia_",
    "sophia_clip_count",
    "spatial_average_",
]
