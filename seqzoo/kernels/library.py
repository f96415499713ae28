"""Kernel calls as ``torch.library`` custom ops, so that ``torch.compile`` neither traces
into a kernel package's Python and Triton code (where it could break, or re-tune and
silently change what runs) nor graph-breaks around it: the op is one opaque node with a
fake (shape-only) implementation for tracing and a registered backward.

Eager code calls the kernel package directly (its own autograd, full speed); under
``torch.compile`` the bindings route through ``KernelOp``. The backward of a ``KernelOp``
recomputes the forward with the package's autograd and differentiates it (a second
opaque op), so it costs one extra forward: the price of not depending on a package's
private backward functions, whose signatures change between releases.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def state_dtype(x: Tensor) -> torch.dtype:
    """dtype of a state seqzoo's references return for inputs like ``x`` (fp32 under half)."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


class KernelOp:
    """``seqzoo::<name>``: ``impl(*tensors, *scalars) -> tuple of tensors`` made opaque.

    ``tensors``: names of the tensor inputs (all required; pass zeros for an absent
    initial state); ``scalars``: (type, name) pairs in the schema's spelling ("float",
    "bool", "int"); ``fake(*tensors, *scalars)`` returns empty outputs of the right shapes
    and dtypes. ``impl`` must be differentiable through the package's autograd."""

    def __init__(self, name: str, impl: Callable[..., tuple[Tensor, ...]], *, tensors: Sequence[str],
                 scalars: Sequence[tuple[str, str]], n_outputs: int,
                 fake: Callable[..., tuple[Tensor, ...]]) -> None:
        self.impl, self.n_tensors = impl, len(tensors)
        args = ", ".join([f"Tensor {t}" for t in tensors] + [f"{ty} {n}" for ty, n in scalars])
        outs = ", ".join(["Tensor"] * n_outputs)
        self.forward_op = torch.library.custom_op(
            f"seqzoo::{name}", self._forward, mutates_args=(), schema=f"({args}) -> ({outs})")
        self.forward_op.register_fake(fake)
        bwd_scalars = "".join(f", {ty} {n}" for ty, n in scalars)
        self.backward_op = torch.library.custom_op(
            f"seqzoo::{name}_backward", self._backward, mutates_args=(),
            schema=f"(Tensor[] inputs, Tensor[] grads{bwd_scalars}) -> Tensor[]")
        self.backward_op.register_fake(lambda inputs, grads, *scalars: [torch.empty_like(t) for t in inputs])
        self.forward_op.register_autograd(self._grad, setup_context=self._setup)

    def __call__(self, *args: object) -> tuple[Tensor, ...]:
        """The kernel: called directly in eager code, as the opaque op under torch.compile."""
        if torch.compiler.is_compiling():
            return self.forward_op(*args)
        return self.impl(*args)

    def _forward(self, *args: object) -> tuple[Tensor, ...]:
        with torch.no_grad():
            outs = self.impl(*args)
        # A custom op's outputs may not alias its inputs (e.g. a state passed through at T = 0).
        storages = {a.untyped_storage().data_ptr() for a in args[:self.n_tensors] if isinstance(a, Tensor)}
        return tuple(o.clone() if o.untyped_storage().data_ptr() in storages else o for o in outs)

    def _backward(self, inputs: list[Tensor], grads: list[Tensor], *scalars: object) -> list[Tensor]:
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
            outs = self.impl(*leaves, *scalars)
            pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
            wrt = [t for t in leaves if t.requires_grad]
            if not pairs or not wrt:
                return [torch.zeros_like(t) for t in leaves]
            found = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True))
        spread = [next(found) if t.requires_grad else None for t in leaves]
        return [g if g is not None else torch.zeros_like(t) for g, t in zip(spread, leaves)]

    def _setup(self, ctx, inputs: tuple[object, ...], output: tuple[Tensor, ...]) -> None:
        ctx.save_for_backward(*inputs[:self.n_tensors])
        ctx.scalars = inputs[self.n_tensors:]
        ctx.outputs = [(o.shape, o.dtype, o.device) for o in output]

    def _grad(self, ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        grads_in = [g if g is not None else torch.zeros(shape, dtype=dtype, device=device)
                    for g, (shape, dtype, device) in zip(grads, ctx.outputs)]
        found = self.backward_op(list(ctx.saved_tensors), grads_in, *ctx.scalars)
        return (*found, *([None] * len(ctx.scalars)))
