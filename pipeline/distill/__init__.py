"""Distillation methods. Importing this package registers every method in ``METHODS``."""

from pipeline.distill import (  # noqa: F401
    at,
    cc,
    cid,
    compose,
    coss,
    fitnet,
    ipwd,
    kd,
    sp,
    vanilla,
    vid,
    wsld,
)
from pipeline.distill.base import METHODS, Method, MethodContext

__all__ = ["METHODS", "Method", "MethodContext"]
