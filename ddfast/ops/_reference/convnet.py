"""Reference of the ConvNet block (instance norm + activation + 2x2 average pooling): the composite of
torch.nn.functional ops that ``ddfast.models.ConvNet``'s plain modules compute (GroupNorm(C, C) with affine,
ReLU or softplus, AvgPool2d(2, 2)). Autograd differentiates it to any order."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["norm_act_pool"]


def norm_act_pool(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], act: str = "relu",
                  softplus_beta: float = 60.0, pool: bool = True, eps: float = 1e-5) -> torch.Tensor:
    """``avg_pool2d(act(group_norm(x, C, weight, bias, eps)), 2)``; no normalisation when ``weight`` is None, no
    pooling when ``pool`` is False. Softplus uses PyTorch's threshold 20."""
    y = F.group_norm(x, x.shape[1], weight, bias, eps) if weight is not None else x
    y = F.relu(y) if act == "relu" else F.softplus(y, beta=softplus_beta)
    return F.avg_pool2d(y, 2) if pool else y
