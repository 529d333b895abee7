"""Pure numpy/scipy WALS math (no Beam): weights, block solves, init, RMSE and an
in-memory trainer. The Beam pipeline and the in-memory trainer share these kernels."""
from wals_core.params import WalsParams

__all__ = ['WalsParams']
