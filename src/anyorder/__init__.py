"""anyorder: zeroth-, first- and second-order optimization for PyTorch.

The package is organised as DESIGN.md describes: ``core`` (optimizer base, closure contract, the one
random-direction sampler), ``optim`` (public optimizer classes) and ``bench`` (tasks, registry,
runner, measurement and report behind ``anyorder bench``).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
