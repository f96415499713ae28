"""Two gaps in Triton's CPU interpreter (``TRITON_INTERPRET=1``), closed so that fla's real
kernels run on CPU and can be proven equal to seqzoo's references without a GPU.

Both patches change how the *interpreter* runs a kernel, never what the kernel computes,
and are applied only while interpreting (``ensure_patched`` is a no-op otherwise):

1. The autotuner times every candidate config through the GPU driver, which the
   interpreter does not have ("0 active drivers"). Interpreted, every config computes the
   same result (configs differ in tiling / warps only), so the first one is kept.
2. Compiled Triton makes the variable of a ``for i in range(n)`` loop a tensor (an scf.for
   induction variable); the interpreter leaves it a Python int, so kernels that call
   ``i.to(tl.int64)`` (fla's ``chunk_delta_h``) fail. Each such loop variable is converted
   to a tensor at the top of the loop body, as compiled Triton has it. ``tl.static_range``
   loops keep their ints (compile-time constants in compiled Triton too).
"""

from __future__ import annotations

import ast

from seqzoo.kernels import triton_interpreting

_PATCHED = False


def _dynamic_range(node: ast.For) -> bool:
    """``for i in range(...)`` or ``for i in tl.range(...)`` with a plain name as target."""
    call = node.iter
    if not isinstance(node.target, ast.Name) or not isinstance(call, ast.Call):
        return False
    fn = call.func
    return (isinstance(fn, ast.Name) and fn.id == "range") or (isinstance(fn, ast.Attribute) and fn.attr == "range")


def _visit_for(self, node: ast.For) -> ast.For:
    node = self.generic_visit(node)
    if _dynamic_range(node):
        name = node.target.id
        to_tensor = ast.Attribute(value=ast.Name(id="interpreter_semantic", ctx=ast.Load()), attr="to_tensor",
                                  ctx=ast.Load())
        assign = ast.Assign(targets=[ast.Name(id=name, ctx=ast.Store())],
                            value=ast.Call(func=to_tensor, args=[ast.Name(id=name, ctx=ast.Load()),
                                                                 ast.Constant(value=False)], keywords=[]))
        node.body.insert(0, ast.fix_missing_locations(ast.copy_location(assign, node.body[0])))
    return node


def ensure_patched() -> None:
    """Apply both patches once, when Triton runs interpreted."""
    global _PATCHED
    if _PATCHED or not triton_interpreting():
        return
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import ASTTransformer

    prune = Autotuner.prune_configs

    def first_config(self, kwargs):
        return prune(self, kwargs)[:1]

    Autotuner.prune_configs = first_config
    ASTTransformer.visit_For = _visit_for
    _PATCHED = True
