"""Kernel paths under torch.compile: the whole mixer is one graph (fullgraph, no break at
the backend check or the kernel call), the kernel is the opaque ``seqzoo::`` op in it, and
outputs and parameter gradients equal eager. AOTAutograd (``aot_eager``) is the part that
exercises the op's fake implementation and registered backward; inductor would only
generate code around the opaque node (tests/train/test_compile.py runs inductor)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_close, build_mixer
from tests.kernels.kernel_device import device_for

CASES = {"deltanet": ({"n_heads": 2}, "fla_gated_delta_rule"), "mamba2": ({"headdim": 8, "d_state": 16}, "fla_simple_gla")}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_fla_mixer_compiles_to_one_graph_with_the_kernel_op(name):
    device = device_for("fla")
    params, op = CASES[name]
    mixer = build_mixer(name, {**params, "backend": "fla"}, d_model=32, dtype=torch.float32).to(device)
    x = torch.randn(1, 20, 32, device=device)
    y, _ = mixer(x)
    y.square().sum().backward()
    eager = [p.grad.clone() for p in mixer.parameters()]
    mixer.zero_grad()
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm.code)
        from torch._dynamo.backends.common import aot_autograd

        return aot_autograd(fw_compiler=lambda g, _: g.forward)(gm, inputs)

    compiled = torch.compile(mixer, backend=backend, fullgraph=True)
    y_c, _ = compiled(x)
    y_c.square().sum().backward()
    assert len(graphs) == 1 and f"seqzoo.{op}" in graphs[0]
    assert_close(y_c, y, torch.float32, f"{name}: compiled output")
    for (pname, p), g in zip(mixer.named_parameters(), eager):
        assert_close(p.grad, g, torch.float32, f"{name}: compiled gradient of {pname}")
