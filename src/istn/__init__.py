"""istn: Image-and-Spatial Transformer Networks for structure-guided image registration.

Lee, Oktay, Schuh, Schaap, Glocker. MICCAI 2019, arXiv:1907.09200.

The Python API (:mod:`istn.api`)::

    import istn
    model = istn.load_model("runs/brain/train/model")
    result = istn.register(model, source=moving, target=fixed)   # sitk.Image, path or array
    result.warped, result.transform, result.inverse, result.metrics
"""

from ._version import __version__

__all__ = ["__version__", "Model", "Registration", "load_model", "register", "register_many",
           "train"]


def __getattr__(name: str):
    # The API is imported on first use, so that ``import istn`` (and the command line's
    # start) does not load PyTorch and SimpleITK until they are needed.
    if name in __all__[1:]:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'istn' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
