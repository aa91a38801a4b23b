"""tesla_func: dataset distillation by trajectory matching, written with torch.func.

The public entry point is :func:`match_trajectory`; the gradient methods it offers are the keys of
:data:`METHODS` ("unrolled", "tesla", "exact"). See README.md and proofs/ for what each computes.
"""

from tesla_func.matching import METHODS, MatchResult, match_trajectory
from tesla_func.memory import (
    Cost,
    PeakMemory,
    measure_peak_memory,
    predict_cost,
    predict_peak_memory,
)
from tesla_func.models import ConvNet, ConvNetConfig, convnet_d3, convnet_d4

__all__ = [
    "METHODS",
    "ConvNet",
    "ConvNetConfig",
    "Cost",
    "MatchResult",
    "PeakMemory",
    "convnet_d3",
    "convnet_d4",
    "match_trajectory",
    "measure_peak_memory",
    "predict_cost",
    "predict_peak_memory",
]
__version__ = "0.1.0"
