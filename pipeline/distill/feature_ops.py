"""Pieces shared by the feature-map baselines: spatial matching and RepDistiller's ConvReg.

``match_spatial`` pools the larger of two maps to the other's size, as AT, VID, NST and FT do
before comparing maps (RepDistiller ``distiller_zoo/{AT,VID,NST,FT}.py``: adaptive average
pooling of the map with the larger height). ``ConvReg`` is RepDistiller's regressor
(``models/util.py`` ``ConvReg``, used by FitNet with a ReLU and by AB without one): a conv
whose form depends on the spatial ratio of the two maps, then BN(C_t) (and ReLU):

- student height = 2 × teacher height: 3×3 conv, stride 2, padding 1;
- 2 × student height = teacher height: 4×4 transposed conv, stride 2, padding 1;
- student height ≥ teacher height: a conv of kernel (1 + H_s − H_t, 1 + W_s − W_t);
- otherwise: an error (RepDistiller raises too).

All convs have a bias; PyTorch's default initialisation (as in RepDistiller).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.types import StageInfo


def match_spatial(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``(a, b)`` with the map of larger height average-pooled to the other's (H, W)."""
    if a.shape[2] > b.shape[2]:
        a = F.adaptive_avg_pool2d(a, b.shape[2:])
    elif b.shape[2] > a.shape[2]:
        b = F.adaptive_avg_pool2d(b, a.shape[2:])
    return a, b


class ConvReg(nn.Module):
    """Map a student stage map onto a teacher's shape (module docstring)."""

    def __init__(self, student: StageInfo, teacher: StageInfo, relu: bool = True) -> None:
        super().__init__()
        s_c, s_h, s_w = student.shape
        t_c, t_h, t_w = teacher.shape
        if s_h == 2 * t_h:
            self.conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ValueError(
                f"ConvReg: student map {student.shape} cannot be regressed onto teacher map "
                f"{teacher.shape} (student height {s_h} < teacher height {t_h} and not half)")
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x

