"""Foundation shared by every optimizer: the closure contract, the optimizer base class and the one
random-direction sampler."""

from anyorder.core.base import AnyOrderOptimizer, NonFiniteLossError
from anyorder.core.closure import (
    Closure,
    ClosureOutputError,
    ClosureOutputTypeError,
    call_closure,
    check_closure_output,
    make_closure,
)
from anyorder.core.rng import DISTRIBUTIONS, derive_seed, direction, generator_for

__all__ = [
    "AnyOrderOptimizer",
    "NonFiniteLossError",
    "Closure",
    "ClosureOutputError",
    "ClosureOutputTypeError",
    "call_closure",
    "check_closure_output",
    "make_closure",
    "DISTRIBUTIONS",
    "derive_seed",
    "direction",
    "generator_for",
]
