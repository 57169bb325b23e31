"""Distillation methods. Importing this package registers every method in ``METHODS``."""

from pipeline.distill import kd, vanilla  # noqa: F401  (registers the methods)
from pipeline.distill.base import METHODS, Method, MethodContext

__all__ = ["METHODS", "Method", "MethodContext"]
