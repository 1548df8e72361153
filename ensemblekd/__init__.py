"""ensemblekd: compress an ensemble of teachers into one small student.

Ray actors label a soft-target store once; DeepSpeed students distil from it many times;
MLflow records every run. The public API is what this module exports (README, "Use it from
Python"); everything else may change. docs/architecture.md describes the package.
"""

from ensemblekd.api import (
    DistillResult,
    Evaluation,
    LabelResult,
    ModelRow,
    RunResult,
    distill,
    evaluate,
    export,
    label,
    load_config,
    open_store,
    run,
)
from ensemblekd.config import Config
from ensemblekd.errors import UserError
from ensemblekd.mixing import Strategy
from ensemblekd.plugins import Options
from ensemblekd.store import Store

__version__ = "0.1.0"

__all__ = ["Config", "DistillResult", "Evaluation", "LabelResult", "ModelRow", "Options", "RunResult", "Store", "Strategy",
           "UserError", "distill", "evaluate", "export", "label", "load_config", "open_store", "run"]
