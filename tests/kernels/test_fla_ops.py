"""Each flash-linear-attention binding equals seqzoo's readable recurrence: outputs, final
state and the gradients of every input (initial state included), on a ragged length (one
full fla chunk of 64 and a tail), and continuing from its own state across a split.
On CPU the real Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from seqzoo.ops.delta_rule import delta_rule_recurrent
from seqzoo.ops.gated_delta_rule import gated_delta_rule_recurrent
from seqzoo.ops.gla import gla_recurrent, simple_gla_recurrent
from seqzoo.ops.retention import retention_recurrent
from seqzoo.ops.ssd import ssd_sequential
from tests.helpers import assert_close
from tests.kernels.kernel_device import device_for

B, T, H, K, V = 1, 70, 2, 16, 32  # T = one fla chunk (64) + a ragged tail


def _inputs(device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "q": F.normalize(rnd(B, T, H, K), dim=-1), "k": F.normalize(rnd(B, T, H, K), dim=-1), "v": rnd(B, T, H, V),
        "g_head": F.logsigmoid(rnd(B, T, H)) * 0.5, "g_key": F.logsigmoid(rnd(B, T, H, K)) / 4,
        "beta": torch.rand(B, T, H, generator=g), "h0": rnd(B, H, K, V),
        "x": rnd(B, T, H, K), "dt": F.softplus(rnd(B, T, H) - 1), "A": -torch.rand(H, generator=g) * 2,
        "Bm": rnd(B, T, 1, K) * 0.3, "Cm": rnd(B, T, 1, K) * 0.3, "D": rnd(H), "s0": rnd(B, H, K, K),
    }


def _kernels():
    from seqzoo.kernels.fla_delta import fla_delta_rule
    from seqzoo.kernels.fla_linear import fla_gla, fla_retention, fla_simple_gla
    from seqzoo.kernels.fla_ssd import fla_ssd

    return {  # name: (kernel, reference, argument names, state argument name)
        "gated_delta_rule": (
            lambda q, k, v, g_head, beta, h0, **kw: fla_delta_rule(q, k, v, beta, g_head, initial_state=h0, **kw),
            lambda q, k, v, g_head, beta, h0, **kw: gated_delta_rule_recurrent(q, k, v, g_head, beta,
                                                                               initial_state=h0, **kw),
            ["q", "k", "v", "g_head", "beta", "h0"]),
        "delta_rule": (
            lambda q, k, v, beta, h0, **kw: fla_delta_rule(q, k, v, beta, initial_state=h0, **kw),
            lambda q, k, v, beta, h0, **kw: delta_rule_recurrent(q, k, v, beta, initial_state=h0, **kw),
            ["q", "k", "v", "beta", "h0"]),
        "gla": (
            lambda q, k, v, g_key, h0, **kw: fla_gla(q, k, v, g_key, initial_state=h0, **kw),
            lambda q, k, v, g_key, h0, **kw: gla_recurrent(q, k, v, g_key, initial_state=h0, **kw),
            ["q", "k", "v", "g_key", "h0"]),
        "simple_gla": (
            lambda q, k, v, g_head, h0, **kw: fla_simple_gla(q, k, v, g_head, initial_state=h0, **kw),
            lambda q, k, v, g_head, h0, **kw: simple_gla_recurrent(q, k, v, g_head, initial_state=h0, **kw),
            ["q", "k", "v", "g_head", "h0"]),
        "retention": (
            lambda q, k, v, h0, **kw: fla_retention(q, k, v, initial_state=h0, **kw),
            lambda q, k, v, h0, **kw: retention_recurrent(q, k, v, initial_state=h0, **kw),
            ["q", "k", "v", "h0"]),
        "ssd": (
            lambda x, dt, A, Bm, Cm, D, s0, **kw: fla_ssd(x, dt, A, Bm, Cm, D=D, initial_state=s0, **kw),
            lambda x, dt, A, Bm, Cm, D, s0, **kw: ssd_sequential(x, dt, A, Bm, Cm, D=D, initial_state=s0, **kw),
            ["x", "dt", "A", "Bm", "Cm", "D", "s0"]),
    }


NAMES = ["gated_delta_rule", "delta_rule", "gla", "simple_gla", "retention", "ssd"]


def _run(fn: Callable, args: dict[str, torch.Tensor], names: list[str], weights: tuple[torch.Tensor, torch.Tensor]):
    leaves = {n: args[n].clone().requires_grad_() for n in names}
    o, final = fn(**leaves, output_final_state=True)
    ((o * weights[0]).sum() + (final * weights[1]).sum()).backward()
    return o.detach(), final.detach(), {n: leaves[n].grad for n in names}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_forward_state_and_gradients_equal_the_recurrence(name):
    device = device_for("fla")
    kernel, reference, names = _kernels()[name]
    args = {n: t.to(device) for n, t in _inputs(device).items()}
    o_ref, s_ref = reference(**{n: args[n] for n in names}, output_final_state=True)
    weights = (torch.randn_like(o_ref), torch.randn_like(s_ref))
    o, s, grads = _run(kernel, args, names, weights)
    o_r, s_r, grads_ref = _run(reference, args, names, weights)
    assert_close(o, o_r, torch.float32, f"{name}: output")
    assert_close(s, s_r, torch.float32, f"{name}: final state")
    for n in names:
        assert grads[n] is not None and grads[n].abs().sum() > 0, f"{name}: no gradient reaches {n}"
        assert_close(grads[n], grads_ref[n], torch.float32, f"{name}: gradient of {n}")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_chaining_through_the_kernel_state(name):
    """Two kernel calls, the second from the first's final state, equal one call."""
    device = device_for("fla")
    kernel, _, names = _kernels()[name]
    args = {n: t.to(device) for n, t in _inputs(device, seed=1).items()}
    state = names[-1]
    split = 37
    timed = [n for n in names if n not in ("A", "D", state)]
    with torch.no_grad():
        o_full, s_full = kernel(**{n: args[n] for n in names}, output_final_state=True)
        first = {**{n: args[n][:, :split] for n in timed}, **{n: args[n] for n in names if n not in timed}}
        o1, s1 = kernel(**first, output_final_state=True)
        second = {**{n: args[n][:, split:] for n in timed}, **{n: args[n] for n in names if n not in timed},
                  state: s1}
        o2, s2 = kernel(**second, output_final_state=True)
    assert_close(torch.cat([o1, o2], 1), o_full, torch.float32, f"{name}: chained output")
    assert_close(s2, s_full, torch.float32, f"{name}: chained final state")
