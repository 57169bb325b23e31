"""Distillation methods. Importing this package registers every method in ``METHODS``."""

from pipeline.distill import cid, compose, coss, crd, ipwd, kd, reviewkd, vanilla, wsld  # noqa: F401
from pipeline.distill.base import METHODS, Method, MethodContext

__all__ = ["METHODS", "Method", "MethodContext"]
