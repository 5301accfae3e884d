"""A tiny Triton kernel; it must live in a file because ``@triton.jit`` reads its source.

The kernel's parameters carry no Python annotations on purpose: Triton evaluates annotations
inside the JIT and rejects globals such as ``typing.Any`` (seen on the H100 with triton 3.6).
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl


@triton.jit  # type: ignore[untyped-decorator]
def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    pid = tl.program_id(axis=0)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    y = tl.load(y_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, x + y, mask=mask)


def add(x: Any, y: Any) -> Any:
    """Launch ``add_kernel`` over two CUDA tensors."""
    import torch

    out = torch.empty_like(x)
    n = x.numel()
    add_kernel[(triton.cdiv(n, 256),)](x, y, out, n, BLOCK=256)
    return out
