"""Compatibility shim for Triton's CPU interpreter (TRITON_INTERPRET=1), used by tests and benchmarks.

Triton 3.6's interpreter turns a scalar tensor into a Python int with `int(ndarray)`, which NumPy
>= 2.4 rejects for the shape-(1,) arrays the interpreter uses for scalars, so any `range(a, b)`
with a loaded bound fails ("only 0-dimensional arrays can be converted to Python scalars",
triton-lang/triton#9171). `patch()` swaps in a conversion that takes the single element. It touches
only the interpreter's tensor patching; compiled GPU kernels are unaffected. Idempotent.
"""
from __future__ import annotations

_PATCHED = False


def patch() -> None:
    global _PATCHED
    if _PATCHED:
        return
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = _patch_lang_tensor
    _PATCHED = True
