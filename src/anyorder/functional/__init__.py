"""In-place update rules over lists of tensors (DESIGN.md, principle 5).

Each rule is written once, vectorised with ``torch._foreach_*``, and fed by any estimator:
backprop gradients, SPSA estimates or coordinate-wise estimates.
"""

from anyorder.functional.adam import adam_
from anyorder.functional.sgd import sgd_

__all__ = ["adam_", "sgd_"]
