"""Distillation methods. Importing this package registers every method in ``METHODS``."""

from pipeline.distill import (  # noqa: F401  (each import registers its methods)
    ab,
    at,
    cc,
    cid,
    compose,
    coss,
    crd,
    cskd,
    dist,
    dkd,
    fitnet,
    ft,
    hsakd,
    ipwd,
    kd,
    kd_la,
    nst,
    ofd,
    pkt,
    pskd,
    reviewkd,
    rkd,
    sp,
    srrl,
    sskd,
    vanilla,
    vid,
    wsld,
)
from pipeline.distill.base import METHODS, Method, MethodContext

__all__ = ["METHODS", "Method", "MethodContext"]
