"""The version of istn (one place; the package, checkpoints and --version read it)."""

__version__ = "0.1.0"
