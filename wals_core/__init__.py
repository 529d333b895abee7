"""Pure numpy WALS math (no Beam): the objectives, weights, block solves, init, RMSE,
fixed-order sums, the top-K kernel, ranking metrics and an in-memory trainer. The Beam pipeline and
the in-memory trainer share these kernels."""
from wals_core.params import WalsParams

__all__ = ['WalsParams']
