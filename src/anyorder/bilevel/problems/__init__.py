"""Bilevel problems users recognise, runnable offline: a quadratic with a closed form,
per-feature L2 regularisation, data hyper-cleaning, multi-task regularisation."""

from anyorder.bilevel.problems.hypercleaning import (
    CleaningBaselines,
    CleaningData,
    HyperCleaning,
    corrupt_labels,
    load_cleaning_data,
)
from anyorder.bilevel.problems.quadratic import QuadraticBilevel
from anyorder.bilevel.problems.regularization import LogisticL2, MultiTaskL2, RidgeL2

__all__ = [
    "QuadraticBilevel",
    "RidgeL2",
    "LogisticL2",
    "MultiTaskL2",
    "HyperCleaning",
    "CleaningData",
    "CleaningBaselines",
    "corrupt_labels",
    "load_cleaning_data",
]
