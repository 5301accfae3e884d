"""The built-in probes' child functions (listed in ``probes/table.py``, nccl's in ``nccl.py``).

Each runs in a fresh interpreter and really loads and runs its kernel.
"""

from __future__ import annotations

import io
import os
import warnings
from contextlib import redirect_stderr
from typing import Any

from pytest_unsloth.probes import emit, stage


def _cuda_or_fail(torch: Any) -> dict[str, Any] | None:
    """None when torch can use a GPU, else a failed result saying why."""
    stage("torch.cuda")
    if torch.version.cuda is None:
        return emit("failed", f"torch {torch.__version__} is a CPU-only build", reason="cpu-build")
    if not torch.cuda.is_available():
        return emit(
            "failed",
            f"torch {torch.__version__} cannot use the GPU: {_init_error(torch)}",
            reason="cuda-unavailable",
        )
    return None


def _torch_on_gpu(data: dict[str, Any]) -> tuple[Any, dict[str, Any] | None]:
    """Import torch; also a failed result (carrying ``data``) when it cannot use a GPU."""
    stage("import torch")
    import torch

    failed = _cuda_or_fail(torch)
    if failed is not None:
        failed["data"].update(data)
    return torch, failed


def _init_error(torch: Any) -> str:
    try:
        torch.cuda.init()
    except Exception as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return "torch.cuda.is_available() is False"


def _compatible(torch: Any, device_cc: int, arch: str) -> bool:
    """torch's own rule when it has one, else: cubins run within a major, PTX runs newer."""
    rule = getattr(torch.cuda, "_code_compatible_with_device", None)
    code = int(arch.split("_", 1)[1].rstrip("af"))
    if rule is not None and arch.startswith("sm_"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return bool(rule(device_cc, code))
            except Exception:
                pass
    if arch.startswith("compute_"):
        return device_cc >= code
    return device_cc // 10 == code // 10 and device_cc >= code


def probe_torch() -> dict[str, Any]:
    """torch's build, CUDA availability, compiled archs and one tensor op per GPU."""
    stage("import torch")
    import torch

    data: dict[str, Any] = {
        "version": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": None,
        "available": False,
    }
    stage("torch.cuda")
    if torch.version.cuda is None:
        return emit(
            "failed", f"torch {torch.__version__} is a CPU-only build", reason="cpu-build", **data
        )
    available = torch.cuda.is_available()
    data["available"] = available
    if not available:
        data["init_error"] = _init_error(torch)
        return emit(
            "failed",
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use "
            f"the GPU: {data['init_error']}",
            reason="cuda-unavailable",
            **data,
        )
    data["cudnn"] = torch.backends.cudnn.version()  # type: ignore[no-untyped-call]
    arch_list = list(torch.cuda.get_arch_list())
    data["arch_list"] = arch_list
    devices = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        cc = 10 * major + minor
        devices.append(
            {
                "index": i,
                "name": torch.cuda.get_device_name(i),
                "capability": [major, minor],
                "arch_ok": any(_compatible(torch, cc, a) for a in arch_list) if arch_list else True,
                "bf16": bool(torch.cuda.is_bf16_supported()) if i == 0 else major >= 8,
            }
        )
    data["devices"] = devices
    stage("tensor on cuda:0")
    x = torch.arange(8, device="cuda", dtype=torch.float32)
    total = float((x * 2).sum().item())
    if total != 56.0:
        return emit("failed", f"a tensor op on cuda:0 returned {total}, expected 56.0", **data)
    return emit(
        "passed",
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, {len(devices)} GPU(s) usable",
        **data,
    )


def nf4_round_trip(device: str = "cuda") -> dict[str, Any]:
    """Quantize a fixed random bf16 matrix to NF4 and back; report the error."""
    stage("import bitsandbytes")
    err = io.StringIO()
    with redirect_stderr(err):
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    import torch

    data: dict[str, Any] = {"version": getattr(bnb, "__version__", "?")}
    if device == "cuda":
        failed = _cuda_or_fail(torch)
        if failed is not None:
            failed["data"].update(data)
            return failed
    stage(f"nf4 quantize/dequantize on {device}")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 256, generator=gen).to(device=device, dtype=torch.bfloat16)
    q, state = F.quantize_4bit(x, quant_type="nf4")
    y = F.dequantize_4bit(q, state, quant_type="nf4")
    diff = (x.float() - y.float()).abs()
    max_err, mean_err = float(diff.max()), float(diff.mean())
    data.update(
        max_abs_error=round(max_err, 4),
        mean_abs_error=round(mean_err, 4),
        packed_dtype=str(q.dtype),
        device=device,
    )
    # NF4 on N(0, 1) data with 64-element blocks: mean error ~0.07, max ~0.55 (0.53 seen on the
    # H100). A broken kernel returns zeros or garbage: mean error near 0.8 or far larger.
    if not (mean_err < 0.15 and max_err < 1.0) or y.shape != x.shape:
        return emit(
            "failed",
            f"NF4 round trip on {device} is wrong: mean abs error "
            f"{mean_err:.3f}, max {max_err:.3f} (expected below 0.15 and 1.0)",
            **data,
        )
    return emit(
        "passed",
        f"bitsandbytes {data['version']} NF4 round trip on {device}: max abs error {max_err:.2f}",
        **data,
    )


def probe_bitsandbytes() -> dict[str, Any]:
    """bitsandbytes' native library loads and its 4-bit kernels run on the GPU."""
    return nf4_round_trip("cuda")


def probe_triton() -> dict[str, Any]:
    """Compile and run a small Triton kernel on the GPU."""
    stage("import triton")
    import triton

    data = {"version": triton.__version__}
    torch, failed = _torch_on_gpu(data)
    if failed is not None:
        return failed
    stage("compile and run a triton kernel")
    from pytest_unsloth.probes.triton_kernel import add

    x = torch.arange(1000, device="cuda", dtype=torch.float32)
    out = add(x, x)
    torch.cuda.synchronize()
    if not torch.equal(out, x * 2):
        return emit("failed", "a Triton add kernel returned wrong values", **data)
    return emit("passed", f"triton {triton.__version__} compiled and ran a kernel", **data)


def _attention_inputs(torch: Any) -> tuple[Any, Any, Any]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, 16, 2, 64)  # batch, seqlen, heads, head_dim
    return tuple(
        torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3)
    )


def _reference_attention(torch: Any, q: Any, k: Any, v: Any) -> Any:
    t = [x.transpose(1, 2).float() for x in (q, k, v)]
    out = torch.nn.functional.scaled_dot_product_attention(*t)
    return out.transpose(1, 2)


def probe_flash_attn() -> dict[str, Any]:
    """A tiny flash-attention forward pass compared with torch's attention."""
    stage("import flash_attn")
    import flash_attn

    data = {"version": flash_attn.__version__}
    torch, failed = _torch_on_gpu(data)
    if failed is not None:
        return failed
    stage("flash_attn_func forward")
    from flash_attn import flash_attn_func

    q, k, v = _attention_inputs(torch)
    out = flash_attn_func(q, k, v)
    err = float((out.float() - _reference_attention(torch, q, k, v)).abs().max())
    data["max_abs_error"] = round(err, 4)
    if err > 0.05:
        return emit("failed", f"flash-attn forward differs from torch by {err:.3f}", **data)
    return emit(
        "passed", f"flash-attn {flash_attn.__version__} forward ran (error {err:.4f})", **data
    )


def probe_xformers() -> dict[str, Any]:
    """xformers' C++/CUDA extensions load for this torch and memory-efficient attention runs."""
    stage("import xformers.ops")
    err = io.StringIO()
    with redirect_stderr(err), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import xformers
        import xformers.ops as xops
    notes = err.getvalue() + "\n".join(str(w.message) for w in caught)
    data: dict[str, Any] = {"version": xformers.__version__}
    if "built for" in notes or "can't load C++/CUDA extensions" in notes:
        line = next(
            (ln for ln in notes.splitlines() if "built for" in ln or "load C++" in ln),
            notes.strip()[:300],
        )
        return emit(
            "failed",
            f"xformers extensions do not match this torch: {line.strip()}",
            reason="abi",
            **data,
        )
    torch, failed = _torch_on_gpu(data)
    if failed is not None:
        return failed
    stage("memory_efficient_attention forward")
    q, k, v = _attention_inputs(torch)
    out = xops.memory_efficient_attention(q, k, v)
    diff = float((out.float() - _reference_attention(torch, q, k, v)).abs().max())
    data["max_abs_error"] = round(diff, 4)
    if diff > 0.05:
        return emit("failed", f"xformers attention differs from torch by {diff:.3f}", **data)
    return emit("passed", f"xformers {xformers.__version__} attention ran", **data)


def probe_unsloth() -> dict[str, Any]:
    """``import unsloth`` in a clean interpreter (offline), as a training script does first."""
    stage("import unsloth")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import unsloth

    version = getattr(unsloth, "__version__", "?")
    stage("import FastLanguageModel")
    from unsloth import FastLanguageModel

    data = {"version": version, "loader": FastLanguageModel.__name__}
    return emit("passed", f"unsloth {version} imported", **data)


def probe_vllm() -> dict[str, Any]:
    """``import vllm`` and its compiled extension; report its torch."""
    stage("import vllm")
    import vllm

    data: dict[str, Any] = {"version": vllm.__version__}
    stage("import vllm._C")
    import importlib

    importlib.import_module("vllm._C")
    stage("import torch")
    import torch

    data["torch"] = torch.__version__
    return emit(
        "passed", f"vllm {vllm.__version__} imported with torch {torch.__version__}", **data
    )
