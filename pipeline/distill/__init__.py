"""Distillation methods. Importing this package registers every method in ``METHODS``."""

from pipeline.distill import (  # noqa: F401  (each import registers its methods)
    cid,
    compose,
    coss,
    cskd,
    dist,
    dkd,
    ipwd,
    kd,
    kd_la,
    ofd,
    pskd,
    srrl,
    vanilla,
    wsld,
)
from pipeline.distill.base import METHODS, Method, MethodContext

__all__ = ["METHODS", "Method", "MethodContext"]
