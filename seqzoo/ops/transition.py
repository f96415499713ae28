"""The state transition of Mamba's S6 and Mamba2's SSD from the log-decay Δ·A (A < 0),
with the negative-eigenvalue option of Grazzi et al. 2024 ("Unlocking State-Tracking in
Linear RNNs Through Negative Eigenvalues", sec. 4): ``allow_neg_eigval`` maps
exp(ΔA) ∈ (0, 1] to 2·exp(ΔA) − 1 ∈ (−1, 1], so that the eigenvalues of the (diagonal)
transition range over [−1, 1] instead of [0, 1]; the input term Δ·B·x is unchanged.

Every form of a scan (step, sequential loop, chunked form) takes its transition from this
one function, so all of them see the same rounded values.
"""

from __future__ import annotations

import torch
from torch import Tensor


def transition(log_decay: Tensor, allow_neg_eigval: bool = False) -> Tensor:
    """exp(ΔA), or 2·exp(ΔA) − 1 with ``allow_neg_eigval``; elementwise, any shape.
    The latter is exactly 0 where exp(ΔA) = 1/2 and negative for ΔA < −log 2."""
    decay = torch.exp(log_decay)
    return 2 * decay - 1 if allow_neg_eigval else decay
