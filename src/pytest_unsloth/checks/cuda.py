"""Checks of the GPU side: driver, torch's CUDA build, compiled archs, bf16, free memory."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pytest_unsloth.checks.base import CheckContext, CheckFailed, CheckSkipped
from pytest_unsloth.checks.registry import builtin_check
from pytest_unsloth.probes.runner import stderr_summary
from pytest_unsloth.util.units import GIB

if TYPE_CHECKING:
    from pytest_unsloth.compat.archs import Gap, LibArchs
    from pytest_unsloth.compat.shadow import Shadow
    from pytest_unsloth.gpu import GpuDevice
    from pytest_unsloth.probes.protocol import ProbeResult

# Root causes (owned by the cuda check, see ROOT_CAUSES) that make the GPU checks meaningless:
# while one holds, a check that depends on it skips with "see unsloth-env::cuda".
GPU = ("gpu-visible",)
GPU_AND_TORCH = ("gpu-visible", "torch-gpu")


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def visible_gpus(ctx: CheckContext) -> tuple[GpuDevice, ...]:
    """The GPUs CUDA will see, or a skip/fail explaining why there are none."""
    nvml = ctx.nvml
    require = ctx.settings.require_gpu
    if not nvml.available or not nvml.devices:
        reason = f"NVML says {nvml.error}" if not nvml.available else "NVML reports 0 devices"
        if require:
            raise CheckFailed(
                f"no usable NVIDIA GPU ({reason})",
                f"{ctx.settings.source('require_gpu')} says this environment must have a GPU",
                "run on a machine with an NVIDIA GPU and driver (in containers: --gpus all / the "
                "NVIDIA container runtime)",
            )
        raise CheckSkipped(f"no NVIDIA GPU: {reason}")
    if not nvml.visible:
        raise CheckFailed(
            f"CUDA_VISIBLE_DEVICES={nvml.cuda_visible_devices!r} hides all {len(nvml.devices)} "
            "GPU(s) NVML sees",
            "CUDA in this process sees no GPU, so torch falls back to the CPU and unsloth refuses "
            "to import",
            "unset CUDA_VISIBLE_DEVICES or list existing GPUs, e.g. CUDA_VISIBLE_DEVICES=0",
        )
    return nvml.visible


def _names(gpus: tuple[GpuDevice, ...]) -> str:
    names: dict[str, int] = {}
    for g in gpus:
        names[g.name] = names.get(g.name, 0) + 1
    return ", ".join(f"{n}x {name}" if n > 1 else name for name, n in names.items())


def _torch_probe(ctx: CheckContext) -> ProbeResult:
    if ctx.dist("torch") is None:
        raise CheckSkipped("torch is not installed")
    return ctx.probe("torch")


def cuda_tag(ctx: CheckContext) -> str | None:
    """``cu130`` for the driver's CUDA 13.0: the newest torch build index it can run."""
    v = ctx.nvml.cuda_driver_version
    if not v:
        return None
    return f"cu{v // 1000}{(v % 1000) // 10}"


def _base_version(version: str) -> str:
    return version.split("+", 1)[0]


@builtin_check(
    "cuda",
    layer="gpu",
    description="NVML sees GPUs and torch can use them",
    needs_gpu=True,
    probes=("torch",),
)
def check_cuda(ctx: CheckContext) -> str:
    """NVML sees the GPUs and torch (in a probe subprocess) can use them."""
    gpus = visible_gpus(ctx)
    nvml = ctx.nvml
    res = _torch_probe(ctx)
    torch_dist = ctx.dist("torch")
    assert torch_dist is not None
    seen = (
        f"NVML sees {len(gpus)} GPU(s) ({_names(gpus)}, driver {nvml.driver_version}, "
        f"CUDA {nvml.cuda_driver_version_str})"
    )
    if res.status == "passed":
        count = len(res.data.get("devices", []))
        if count != len(gpus):
            raise CheckFailed(
                f"{seen} but torch sees {count}",
                "a GPU NVML lists is unusable by CUDA (MIG without a MIG id, a fallen-off-the-bus "
                "GPU, or a device the container cannot open)",
                "run nvidia-smi; restrict CUDA_VISIBLE_DEVICES to the GPUs torch can open",
            )
        return f"{res.message}; {seen}"
    reason = res.data.get("reason")
    tag = cuda_tag(ctx)
    index = f" --index-url https://download.pytorch.org/whl/{tag}" if tag else ""
    reinstall = f"pip install --force-reinstall 'torch=={_base_version(torch_dist.version)}'{index}"
    if reason == "cpu-build":
        raise CheckFailed(
            f"{seen}, but torch {torch_dist.version} is a CPU-only build",
            "every tensor stays on the CPU: training is orders of magnitude slower, bitsandbytes "
            "4-bit kernels are unavailable and `import unsloth` fails ('Unsloth cannot find any "
            "torch accelerator')",
            f"{reinstall} (a CUDA build the driver supports: CUDA {nvml.cuda_driver_version_str} "
            "or older; reinstall torchvision/xformers to match)",
        )
    if reason == "cuda-unavailable":
        runtime = res.data.get("cuda")
        raise CheckFailed(
            f"{seen}, but torch {torch_dist.version} (built for CUDA {runtime}) cannot use "
            f"them: {res.data.get('init_error', res.message)}",
            "torch falls back to the CPU and every GPU kernel (bitsandbytes, triton, unsloth) "
            "fails",
            _unavailable_fix(ctx, str(runtime), reinstall),
        )
    stray = _stray(ctx, "torch")
    if stray is not None:
        raise CheckFailed(
            f"the torch probe {res.message}: {stray.describe()}",
            "a file or folder named torch earlier on the import path replaces the installed "
            "torch in every script started from here",
            stray.fix(),
        )
    raise CheckFailed(
        f"the torch probe {res.message}"
        + (f"; stderr: {stderr_summary(res.stderr_tail)}" if res.stderr_tail else ""),
        "torch could not initialise CUDA in a clean interpreter, so training would fail the same "
        "way",
        "run `python -c 'import torch; torch.cuda.init()'` to see the full error; reinstall "
        f"torch for this driver: {reinstall}",
    )


def _stray(ctx: CheckContext, name: str) -> Shadow | None:
    """A stray module hiding the installed ``name`` (see pytest_unsloth.compat.shadow), or None."""
    from pytest_unsloth.compat.shadow import find_shadow

    dist = ctx.dist(name)
    return find_shadow(dist) if dist is not None else None


def _unavailable_fix(ctx: CheckContext, runtime: str, reinstall: str) -> str:
    drv = ctx.nvml.cuda_driver_version
    rt = parse_cuda_version(runtime)
    if drv and rt and (drv // 1000, (drv % 1000) // 10) < rt:
        return (
            f"the driver supports CUDA {ctx.nvml.cuda_driver_version_str} but torch needs "
            f"{runtime}: upgrade the NVIDIA driver, or {reinstall}"
        )
    return (
        "check that this process can open /dev/nvidia* (containers: --gpus all), that "
        "CUDA_VISIBLE_DEVICES names existing GPUs and that nvidia-smi works; then " + reinstall
    )


def parse_cuda_version(text: str | None) -> tuple[int, int] | None:
    """``"12.8"`` -> (12, 8); ``cu128`` -> (12, 8); None when unknown."""
    if not text:
        return None
    m = re.fullmatch(r"(\d+)\.(\d+)(?:\.\d+)?", text.strip())
    if m:
        return int(m.group(1)), int(m.group(2))
    m = re.fullmatch(r"cu(\d+)(\d)", text.strip())
    if m:
        return int(m.group(1)), int(m.group(2))
    return None


def torch_cuda_runtime(ctx: CheckContext) -> tuple[str | None, str]:
    """torch's CUDA runtime version and where it was read (the wheel tag, else the probe)."""
    dist = ctx.dist("torch")
    if dist is None:
        raise CheckSkipped("torch is not installed")
    local = dist.version.partition("+")[2]
    if parse_cuda_version(local):
        major, minor = parse_cuda_version(local)  # type: ignore[misc]
        return f"{major}.{minor}", f"torch {dist.version}"
    if local == "cpu":
        return None, f"torch {dist.version}"
    res = ctx.probe("torch")
    return res.data.get("cuda"), f"torch {dist.version}"


@builtin_check(
    "driver",
    layer="gpu",
    description="driver CUDA version runs torch's CUDA runtime",
    needs_gpu=True,
    depends_on=GPU_AND_TORCH,
)
def check_driver(ctx: CheckContext) -> str:
    """The driver's CUDA version can run torch's CUDA runtime."""
    visible_gpus(ctx)
    nvml = ctx.nvml
    runtime, what = torch_cuda_runtime(ctx)
    if runtime is None:
        raise CheckSkipped(f"{what} is a CPU-only build (see unsloth-env::cuda)")
    rt = parse_cuda_version(runtime)
    drv = nvml.cuda_driver_version
    if rt is None or not drv:
        raise CheckSkipped(f"cannot read the CUDA versions (torch: {runtime}, driver: {drv})")
    have = (drv // 1000, (drv % 1000) // 10)
    if have[0] < rt[0]:
        raise CheckFailed(
            f"driver {nvml.driver_version} supports CUDA {nvml.cuda_driver_version_str}, "
            f"{what} needs CUDA {runtime}",
            "a driver older than the runtime's major version cannot load its kernels: "
            "torch.cuda.is_available() is False",
            f"upgrade the NVIDIA driver to one supporting CUDA {runtime}, or pip install "
            f"--force-reinstall torch --index-url https://download.pytorch.org/whl/"
            f"{cuda_tag(ctx)}",
        )
    if have < rt:
        return (
            f"driver CUDA {nvml.cuda_driver_version_str} is older than {what}'s CUDA "
            f"{runtime}: runs through CUDA minor-version compatibility (no PTX JIT)"
        )
    return (
        f"driver {nvml.driver_version} (CUDA {nvml.cuda_driver_version_str}) runs {what} "
        f"(CUDA {runtime})"
    )


def _passed_torch(ctx: CheckContext) -> dict[str, Any]:
    res = _torch_probe(ctx)
    if res.status != "passed":
        raise CheckSkipped(f"torch cannot use the GPU here (see unsloth-env::cuda): {res.message}")
    return dict(res.data)


ARCHS_CACHE_KEY = "unsloth/archs"


def stack_archs(ctx: CheckContext) -> dict[str, list[LibArchs]]:
    """CUDA code in every installed stack distribution's shared libraries (cached per fingerprint).

    Reading is header-only and fast; the cache spares walking every RECORD on repeated runs.
    """
    from pytest_unsloth.compat import archs

    names = sorted({d.name for d in ctx.inventory.installed()})
    cache = ctx.probes.cache if ctx.config is not None else None
    if cache is not None and not cache.reprobe:
        entry = cache.cache.get(ARCHS_CACHE_KEY, None)
        if isinstance(entry, dict) and entry.get("fingerprint") == cache.fingerprint:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                return {
                    d: [archs.LibArchs.from_json(x) for x in libs]
                    for d, libs in entry["libs"].items()
                }
    scanned = archs.scan_distributions(names)
    if cache is not None:
        cache.cache.set(
            ARCHS_CACHE_KEY,
            {
                "fingerprint": cache.fingerprint,
                "libs": {
                    d: [{**lib.to_json(), "section": lib.section, "entries": lib.entries}
                        for lib in libs]
                    for d, libs in scanned.items()
                },
            },
        )  # fmt: skip
    return scanned


def _arch_targets(ctx: CheckContext) -> list[tuple[str, tuple[int, int]]]:
    from pytest_unsloth.compat.archs import parse_capability

    where = ctx.settings.source("target_arch")
    return [(f"target {t} ({where})", parse_capability(t)) for t in ctx.settings.target_arch]


def _gap_line(gap: Gap, versions: dict[str, str]) -> str:
    from pytest_unsloth.compat.archs import sm_name

    lib = gap.lib
    carries = f"cubins {' '.join(lib.sm) or 'none'}; PTX {' '.join(lib.ptx) or 'none'}"
    return (
        f"{os.path.basename(lib.path)} ({gap.dist} {versions.get(gap.dist, '?')}) has no code "
        f"for {gap.target}, {sm_name(gap.capability)} (carries {carries})"
    )


def check_extension_archs(ctx: CheckContext, gpus: tuple[GpuDevice, ...]) -> str:
    """Every compiled extension of the stack carries code for each GPU and each target arch."""
    from pytest_unsloth.compat import archs

    targets = [(g.label, g.capability) for g in gpus] + _arch_targets(ctx)
    scanned = stack_archs(ctx)
    cuda = archs.torch_cuda_version()
    gaps = archs.find_gaps(scanned, targets, cuda)
    versions = {d.name: d.version for d in ctx.inventory.installed()}
    if gaps:
        lines = [_gap_line(g, versions) for g in gaps]
        shown = "; ".join(lines[:3]) + (f"; and {len(lines) - 3} more" if len(lines) > 3 else "")
        dists = sorted({g.dist for g in gaps})
        sms = sorted({archs.sm_name(g.capability) for g in gaps})
        bnb = (
            "; bitsandbytes loads the library for torch's CUDA version "
            f"({'.'.join(map(str, cuda)) if cuda else 'unknown'}; BNB_CUDA_VERSION overrides), "
            "so a torch built for a newer CUDA may bring a build that has it"
            if "bitsandbytes" in dists
            else ""
        )
        raise CheckFailed(
            shown,
            "its kernels fail with 'no kernel image is available for execution on the device': "
            "a cubin runs only on its own major architecture at an equal or higher minor, and "
            "no PTX the driver could JIT-compile for this GPU is embedded",
            f"install a build of {', '.join(dists)} that lists {' '.join(sms)} (run `python -m "
            f"pytest_unsloth.archs {' '.join(dists)}` to see what each library carries){bnb}",
        )
    libs = sum(len([x for x in v if x.has_cuda]) for v in scanned.values())
    if not libs:
        return "no installed stack package carries CUDA device code"
    covered = (
        ", ".join(f"{label.split(' (')[0]} {archs.sm_name(cap)}" for label, cap in targets)
        or "no GPU or target arch"
    )
    return f"{libs} CUDA libraries in {', '.join(sorted(scanned))} cover {covered}"


@builtin_check(
    "arch",
    layer="gpu",
    description="every extension has code for each GPU / unsloth_target_arch",
    needs_gpu=True,
    probes=("torch",),
    depends_on=GPU_AND_TORCH,
)
def check_arch(ctx: CheckContext) -> str:
    """Every extension carries code for each visible GPU / target arch; torch's arch list too."""
    has_targets = bool(ctx.settings.target_arch)
    try:
        gpus = visible_gpus(ctx)
    except CheckSkipped:
        if not has_targets:
            raise
        gpus = ()
    libs_detail = check_extension_archs(ctx, gpus)
    if not gpus:
        return libs_detail
    try:
        data = _passed_torch(ctx)
    except CheckSkipped:
        if has_targets:
            return libs_detail
        raise
    archs_list = data.get("arch_list") or []
    bad = [d for d in data.get("devices", []) if not d.get("arch_ok", True)]
    if bad:
        dev = bad[0]
        sm = "sm_{}{}".format(*dev["capability"])
        raise CheckFailed(
            f"{dev['name']} ({sm}) is not among torch {data.get('version')}'s compiled archs "
            f"{' '.join(archs_list)}",
            "kernels for this GPU are missing: CUDA calls fail with 'no kernel image is "
            "available for execution on the device'",
            f"install a torch build that lists {sm} (newer CUDA builds add new GPUs: "
            f"pip install --force-reinstall torch --index-url https://download.pytorch.org/whl/"
            f"{cuda_tag(ctx)})",
        )
    caps = sorted({"sm_{}{}".format(*d["capability"]) for d in data.get("devices", [])})
    return f"{', '.join(caps)} covered by torch's archs {' '.join(archs_list)}; {libs_detail}"


def _wants_fp16(ctx: CheckContext) -> bool:
    cfg = ctx.settings.grpo_config
    return cfg.get("bf16") is False or cfg.get("fp16") is True


@builtin_check(
    "bf16",
    layer="gpu",
    description="bf16 support of each GPU",
    needs_gpu=True,
    depends_on=GPU,
)
def check_bf16(ctx: CheckContext) -> str:
    """Every visible GPU supports bf16 (TRL's configs default to bf16=True)."""
    gpus = visible_gpus(ctx)
    lacking = [g for g in gpus if not g.bf16]
    if not lacking:
        return f"bf16 supported on {len(gpus)} GPU(s) (compute capability >= 8.0)"
    names = ", ".join(f"{g.label} sm_{g.capability[0]}{g.capability[1]}" for g in lacking)
    if _wants_fp16(ctx):
        return f"{names} lack bf16; the configured settings use fp16 (bf16=False)"
    raise CheckFailed(
        f"{names} lack bf16 (needs compute capability 8.0, Ampere or newer)",
        "GRPOConfig/TrainingArguments default to bf16=True and fail at start-up on this GPU; "
        "unsloth loads in float16 instead, and a bf16 config then errors",
        "pass bf16=False, fp16=True to your GRPOConfig (and set "
        "`unsloth_grpo_config = bf16 = False` so this check knows)",
    )


@builtin_check(
    "vram",
    layer="gpu",
    description="free GPU memory against the configured minimum",
    needs_gpu=True,
    depends_on=GPU,
)
def check_vram(ctx: CheckContext) -> str:
    """Free memory on each visible GPU, against ``unsloth_min_free_vram`` when set."""
    gpus = visible_gpus(ctx)
    need = ctx.settings.min_free_vram_gib
    summary = "; ".join(
        f"{g.label}: {_gib(g.free_bytes)} free of {_gib(g.total_bytes)}" for g in gpus
    )
    if need is None:
        return summary + " (no unsloth_min_free_vram set)"
    low = [g for g in gpus if g.free_bytes < need * GIB]
    if not low:
        return summary + f" (need {need:.1f} GiB)"
    found = []
    for g in low:
        procs = ", ".join(
            f"pid {p.pid} {p.name or '?'} ({_gib(p.used_bytes) if p.used_bytes else '?'})"
            for p in g.processes
        )
        holders = f"; held by {procs}" if procs else ""
        found.append(
            f"{g.label} has {_gib(g.free_bytes)} free of {_gib(g.total_bytes)}, "
            f"needs {need:.1f} GiB{holders}"
        )
    raise CheckFailed(
        "; ".join(found),
        f"{ctx.settings.source('min_free_vram_gib')} asks for {need:.1f} GiB free; loading and "
        "the first training step would hit CUDA out of memory",
        "stop the processes holding memory (nvidia-smi), pick another GPU with "
        "CUDA_VISIBLE_DEVICES, or lower max_seq_length / num_generations / "
        "gpu_memory_utilization",
    )


# ----------------------------------------------------------------------------------------------
# Root causes the cuda check owns: the checks that depend on them skip with "see
# unsloth-env::cuda" instead of repeating its message.


def no_visible_gpu(ctx: CheckContext) -> str | None:
    """Why CUDA here sees no GPU at all (what the cuda check fails or skips with), or None."""
    try:
        visible_gpus(ctx)
    except (CheckFailed, CheckSkipped) as exc:
        return exc.found if isinstance(exc, CheckFailed) else str(exc)
    return None


def torch_cannot_use_gpu(ctx: CheckContext) -> str | None:
    """Why torch cannot use the visible GPUs (the cuda check's failure), or None."""
    if no_visible_gpu(ctx) is not None or ctx.dist("torch") is None:
        return None
    if ctx.probe("torch").status != "failed":
        return None
    try:
        check_cuda(ctx)
    except CheckFailed as exc:
        return exc.found
    except CheckSkipped:
        return None
    return None


ROOT_CAUSES: dict[str, tuple[str, Callable[[CheckContext], str | None]]] = {
    "gpu-visible": ("cuda", no_visible_gpu),
    "torch-gpu": ("cuda", torch_cannot_use_gpu),
}
