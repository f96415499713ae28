"""ShortConv: the shifted multiply-add form equals torch's causal depthwise conv1d, carries
its state across any split, and its step equals its forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from seqzoo.layers.short_conv import ShortConv
from tests.helpers import assert_close


def reference(conv: ShortConv, x: torch.Tensor) -> torch.Tensor:
    """Zero-padded causal depthwise conv1d of x: (B, T, D), then the activation."""
    xt = F.pad(x.transpose(1, 2), (conv.kernel_size - 1, 0))  # (B, D, k-1+T)
    y = F.conv1d(xt, conv.conv.weight, conv.conv.bias, groups=conv.dim).transpose(1, 2)
    return F.silu(y) if conv.activation == "silu" else y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(t=st.integers(1, 12), k=st.integers(1, 5), bias=st.booleans(), act=st.sampled_from([None, "silu"]),
       cut=st.integers(0, 12), seed=st.integers(0, 2**16))
def test_forward_equals_conv1d_and_chains(dtype, t, k, bias, act, cut, seed):
    torch.manual_seed(seed)
    conv = ShortConv(6, kernel_size=k, activation=act, bias=bias).to(dtype)
    x = torch.randn(2, t, 6, dtype=dtype)
    y, state = conv(x)
    assert_close(y, reference(conv, x), dtype)
    cut = min(cut, t)
    y1, s1 = conv(x[:, :cut])
    y2, s2 = conv(x[:, cut:], s1)
    assert_close(torch.cat([y1, y2], 1), y, dtype)
    assert_close(s2, state, dtype)
    ys, s = [], conv.init_state(2, dtype=dtype)
    for i in range(t):
        yi, s = conv.step(x[:, i], s)
        ys.append(yi)
    assert_close(torch.stack(ys, 1), y, dtype)
