"""The code around the CUDA-only kernels (mamba-ssm, causal-conv1d), proven on CPU with
stand-ins of the kernels' signatures built from seqzoo's references: layouts, dtypes, and
for mamba-ssm's selective scan the initial-state correction (the kernel starts from h = 0;
the binding adds what h0 contributes, so chaining and decode continue a kernel forward)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqzoo.kernels.causal_conv1d import _impl as conv_impl
from seqzoo.kernels.mamba_ssm import selective_scan_mamba_ssm, ssd_mamba_ssm
from seqzoo.layers.short_conv import ShortConv
from seqzoo.ops.selective_scan import selective_scan_sequential
from seqzoo.ops.ssd import ssd_sequential
from tests.helpers import assert_close


def zero_state_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """mamba-ssm's ``selective_scan_fn`` contract: always from h = 0."""
    assert return_last_state and A.dtype == D.dtype == delta_bias.dtype == torch.float32
    return selective_scan_sequential(u, delta, A, B, C, D, z, delta_bias, delta_softplus, None, True)


def test_selective_scan_initial_state_correction():
    g = torch.Generator().manual_seed(0)
    b, d, n, t, groups = 2, 6, 4, 150, 2  # T > the correction's slice of 64 tokens
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    u, delta, z = rnd(b, d, t), rnd(b, d, t) - 1, rnd(b, d, t)
    A = -torch.rand(d, n, generator=g) * 3
    for Bm, Cm in ((rnd(b, n, t), rnd(b, n, t)), (rnd(b, groups, n, t), rnd(b, groups, n, t))):
        D, bias, h0 = rnd(d), rnd(d), rnd(b, d, n)
        y, h = selective_scan_mamba_ssm(u, delta, A, Bm, Cm, D, z, bias, True, initial_state=h0,
                                        return_final_state=True, scan_fn=zero_state_scan)
        y_ref, h_ref = selective_scan_sequential(u, delta, A, Bm, Cm, D, z, bias, True, h0, True)
        assert_close(y, y_ref, torch.float32, "output from h0")
        assert_close(h, h_ref, torch.float32, "final state from h0")


def test_ssd_arguments_reach_mamba_chunk_scan_combined_in_its_layout():
    def combined(x, dt, A, B, C, chunk_size, *, D, initial_states, return_final_states):
        assert chunk_size == 256 and return_final_states and x.shape[:3] == dt.shape and A.dim() == 1
        return ssd_sequential(x, dt, A, B, C, D=D, initial_state=initial_states, output_final_state=True)

    g = torch.Generator().manual_seed(1)
    x, dt = torch.randn(1, 9, 4, 3, generator=g), F.softplus(torch.randn(1, 9, 4, generator=g))
    A, Bm, Cm = -torch.rand(4, generator=g), torch.randn(1, 9, 2, 5, generator=g), torch.randn(1, 9, 2, 5, generator=g)
    D, h0 = torch.randn(4, 3, generator=g), torch.randn(1, 4, 3, 5, generator=g)
    y, h = ssd_mamba_ssm(x, dt, A, Bm, Cm, D=D, initial_state=h0, output_final_state=True, ssd_fn=combined)
    y_ref, h_ref = ssd_sequential(x, dt, A, Bm, Cm, D=D, initial_state=h0, output_final_state=True)
    assert_close(y, y_ref, torch.float32)
    assert_close(h, h_ref, torch.float32)


def causal_conv1d_fn(x, weight, bias, *, initial_states, return_final_states, activation):
    """causal-conv1d's contract with states: x (B, D, T) channel-last, weight (D, W),
    initial_states (B, D, W - 1) channel-last; returns y (B, D, T) and the last W - 1 inputs."""
    assert x.stride(1) == 1 and initial_states.stride(1) == 1, "the kernel needs channel-last x and states"
    assert return_final_states and activation in (None, "silu")
    padded = torch.cat([initial_states, x], -1)  # (B, D, W - 1 + T)
    y = F.conv1d(padded, weight[:, None], bias, groups=x.shape[1])
    y = F.silu(y) if activation == "silu" else y
    return y, padded[..., padded.shape[-1] - (weight.shape[1] - 1):]


def test_causal_conv1d_glue_equals_short_conv():
    torch.manual_seed(0)
    for activation in ("silu", None):
        conv = ShortConv(6, kernel_size=4, activation=activation, bias=True)
        x, state = torch.randn(2, 11, 6), torch.randn(2, 6, 3)
        with torch.no_grad():
            y_ref, s_ref = conv(x, state)
            w = conv.conv.weight[:, 0]
            y, s = conv_impl(x, w, conv.conv.bias, state, activation == "silu", fn=causal_conv1d_fn)
        assert_close(y, y_ref, torch.float32)
        assert_close(s, s_ref, torch.float32)
