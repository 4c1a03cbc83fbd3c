"""istn: Image-and-Spatial Transformer Networks for structure-guided image registration.

Lee, Oktay, Schuh, Schaap, Glocker. MICCAI 2019, arXiv:1907.09200.
"""

__version__ = "0.1.0"
