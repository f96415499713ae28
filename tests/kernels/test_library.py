"""Kernel calls as torch.library custom ops: the opaque op (what torch.compile sees) returns
what the direct call returns, its registered backward (recompute + the package's autograd)
gives the same gradients, and its fake implementation predicts shapes and dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from tests.helpers import assert_close
from tests.kernels.kernel_device import device_for


def _args(device):
    g = torch.Generator().manual_seed(0)
    b, t, h, k, v = 1, 20, 2, 16, 16
    q = F.normalize(torch.randn(b, t, h, k, generator=g), dim=-1)
    kk = F.normalize(torch.randn(b, t, h, k, generator=g), dim=-1)
    vv = torch.randn(b, t, h, v, generator=g)
    gate = F.logsigmoid(torch.randn(b, t, h, generator=g))
    beta = torch.rand(b, t, h, generator=g)
    h0 = torch.randn(b, h, k, v, generator=g)
    return [z.to(device) for z in (q, kk, vv, gate, beta, h0)]


@pytest.mark.slow
def test_opaque_op_equals_the_direct_call_with_gradients():
    from seqzoo.kernels.fla_delta import GATED_DELTA_RULE

    device = device_for("fla")
    args = _args(device)
    results = []
    for call in (GATED_DELTA_RULE.impl, GATED_DELTA_RULE.forward_op):
        leaves = [a.clone().requires_grad_() for a in args]
        o, final = call(*leaves, 0.25)
        (o.sin().sum() + final.cos().sum()).backward()
        results.append((o.detach(), final.detach(), [x.grad for x in leaves]))
    (o1, s1, g1), (o2, s2, g2) = results
    assert torch.equal(o1, o2) and torch.equal(s1, s2)
    for a, b in zip(g1, g2):
        assert_close(b, a, torch.float32)


def test_fake_implementation_predicts_shapes_and_dtypes():
    from seqzoo.kernels.fla_linear import GLA

    with FakeTensorMode():
        q = torch.empty(2, 9, 3, 8)
        v = torch.empty(2, 9, 3, 5)
        o, final = GLA.forward_op(q, q, v, q, torch.empty(2, 3, 8, 5), 0.5)
    assert o.shape == (2, 9, 3, 5) and final.shape == (2, 3, 8, 5) and final.dtype == torch.float32
