"""ensemblekd: compress an ensemble of teachers into one small student.

Ray actors label a soft-target store once; DeepSpeed students distil from it many times;
MLflow records every run. See README.md and DESIGN.md.
"""

__version__ = "0.1.0"
