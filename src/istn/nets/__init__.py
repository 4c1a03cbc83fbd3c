"""The ITN and STN networks (one implementation for 2D and 3D)."""

from .itn import ITN
from .stn import STN, build_stn, min_stn_size

__all__ = ["ITN", "STN", "build_stn", "min_stn_size"]
