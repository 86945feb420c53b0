"""Built-in bench tasks, one module each; importing this package registers them."""

from anyorder.bench.tasks import (
    breast_cancer_logreg,
    char_lm,
    digits_mlp,
    functions,
    text_finetune,
)
from anyorder.bench.tasks.base import FunctionTask, MissingDataError, ModelTask, Task

__all__ = [
    "Task",
    "ModelTask",
    "FunctionTask",
    "MissingDataError",
    "breast_cancer_logreg",
    "char_lm",
    "digits_mlp",
    "functions",
    "text_finetune",
]
