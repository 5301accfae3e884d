"""Checks of the machine around the GPU: launcher, shared memory, disk, C compiler, platform.

Everything is read from the environment and the file system through ``HOST``, a small table of
paths and readers that tests replace with temporary folders and fakes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pytest_unsloth.checks.base import CheckContext, CheckFailed, CheckSkipped
from pytest_unsloth.checks.nccl import launcher_vars
from pytest_unsloth.checks.registry import builtin_check
from pytest_unsloth.util.units import GIB


def _ldconfig() -> str:
    """``ldconfig -p`` output ("" when it cannot run): where the loader finds libraries."""
    for exe in ("/sbin/ldconfig", "/usr/sbin/ldconfig", shutil.which("ldconfig")):
        if exe and os.path.exists(exe):
            try:
                return subprocess.run(
                    [exe, "-p"], capture_output=True, text=True, timeout=10, check=False
                ).stdout
            except (OSError, subprocess.SubprocessError):
                return ""
    return ""


@dataclasses.dataclass
class Host:
    """Where the machine's facts are read from (tests point these at fakes)."""

    proc_version: Path = Path("/proc/version")
    dockerenv: Path = Path("/.dockerenv")
    containerenv: Path = Path("/run/.containerenv")
    cgroup: Path = Path("/proc/1/cgroup")
    shm: Path = Path("/dev/shm")
    wsl_lib: Path = Path("/usr/lib/wsl/lib")
    environ: Mapping[str, str] | None = None  # None: os.environ
    statvfs: Callable[[str], Any] = os.statvfs
    ldconfig: Callable[[], str] = _ldconfig
    which: Callable[[str], str | None] = shutil.which
    system: Callable[[], str] = platform.system
    python_include: Callable[[], str] = lambda: sysconfig.get_paths()["include"]

    @property
    def env(self) -> Mapping[str, str]:
        """The environment variables to read."""
        return os.environ if self.environ is None else self.environ


HOST = Host()


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


# ----------------------------------------------------------------------------------------------
# launcher


def _launcher_name(env: Mapping[str, str]) -> str:
    if env.get("ACCELERATE_MIXED_PRECISION") or env.get("ACCELERATE_DYNAMO_BACKEND"):
        return "accelerate launch"
    if env.get("TORCHELASTIC_RUN_ID"):
        return "torchrun"
    if env.get("OMPI_COMM_WORLD_LOCAL_RANK") or env.get("PMI_RANK"):
        return "an MPI launcher"
    return "a launcher (deepspeed or torchrun-style variables)"


@builtin_check(
    "launcher",
    layer="gpu",
    description="several GPUs only under a launcher; mixed models in PCI order",
    needs_gpu=True,
)
def check_launcher(ctx: CheckContext) -> str:
    """Several visible GPUs only under a launcher; mixed models only in PCI bus order."""
    from pytest_unsloth.checks.cuda import visible_gpus

    gpus = visible_gpus(ctx)
    env = HOST.env
    found = launcher_vars(env)
    names = {g.name for g in gpus}
    order = env.get("CUDA_DEVICE_ORDER", "")
    if len(names) > 1 and order != "PCI_BUS_ID":
        listing = ", ".join(g.label for g in gpus)
        raise CheckFailed(
            f"mixed GPU models are visible ({listing}) and CUDA_DEVICE_ORDER is {order or 'unset'}",
            "CUDA's default order puts the fastest GPU first, so cuda:N differs from nvidia-smi's "
            "GPU N: CUDA_VISIBLE_DEVICES and per-rank device choices pick the wrong card",
            "export CUDA_DEVICE_ORDER=PCI_BUS_ID (before Python starts)",
        )
    if found:
        world = found.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_WORLD_SIZE")
        local_world = int(world) if world and world.isdigit() else None
        if local_world is not None and local_world > len(gpus) and len(gpus) > 0:
            raise CheckFailed(
                f"{local_world} ranks on this machine (LOCAL_WORLD_SIZE) but {len(gpus)} GPU(s) "
                "visible",
                "two ranks on one GPU make NCCL fail ('Duplicate GPU detected') or run out of "
                "memory",
                f"start at most {len(gpus)} processes per node (--nproc-per-node {len(gpus)})",
            )
        where = ", ".join(f"{k}={v}" for k, v in found.items())
        return f"under {_launcher_name(env)} ({where}); {len(gpus)} GPU(s) visible"
    if len(gpus) == 1:
        return f"one GPU visible ({gpus[0].label}), no launcher needed"
    single = [name for name in ("unsloth", "trl", "transformers") if ctx.dist(name) is not None]
    if not single:
        return f"{len(gpus)} GPUs visible to a plain process; no single-process trainer installed"
    n = len(gpus)
    raise CheckFailed(
        f"{n} GPUs visible ({', '.join(g.label for g in gpus)}) to a plain process (no torchrun/"
        f"accelerate/deepspeed variables) with {', '.join(single)} installed",
        "a single-process trainer then spreads the model or batch over every visible GPU "
        "(transformers' Trainer wraps it in DataParallel, device_map='auto' splits layers): "
        "'Expected all tensors to be on the same device, but found at least two devices, "
        "cuda:0 and cuda:1', or a slow, unbalanced run",
        f"for one GPU: CUDA_VISIBLE_DEVICES=0 python train.py; for all {n}: torchrun "
        f"--nproc-per-node {n} train.py (or accelerate launch --num_processes {n} train.py)",
    )


# ----------------------------------------------------------------------------------------------
# shm


def container_evidence(host: Host | None = None) -> str | None:
    """Why we think this process runs in a container, or None."""
    h = host or HOST
    if h.dockerenv.exists():
        return str(h.dockerenv)
    if h.containerenv.exists():
        return str(h.containerenv)
    if h.env.get("KUBERNETES_SERVICE_HOST"):
        return "KUBERNETES_SERVICE_HOST"
    if h.env.get("container"):
        return f"container={h.env['container']}"
    try:
        text = h.cgroup.read_text(errors="replace")
    except OSError:
        return None
    for word in ("docker", "kubepods", "containerd", "libpod", "lxc"):
        if word in text:
            return f"{h.cgroup} mentions {word}"
    return None


@builtin_check("shm", layer="machine", description="/dev/shm size inside a container")
def check_shm(ctx: CheckContext) -> str:
    """/dev/shm big enough for dataloader workers and NCCL inside a container."""
    need = ctx.settings.min_shm_gib * GIB
    where = container_evidence()
    try:
        st = HOST.statvfs(str(HOST.shm))
    except OSError as exc:
        if where is None:
            raise CheckSkipped(f"{HOST.shm} is not available here ({exc.strerror})") from None
        raise CheckFailed(
            f"no usable {HOST.shm} in this container ({where}): {exc.strerror}",
            "PyTorch dataloader workers and NCCL's shared-memory transport need it",
            "start the container with --ipc=host or --shm-size=16g",
        ) from None
    total = st.f_blocks * st.f_frsize
    free = st.f_bavail * st.f_frsize
    seen = f"{HOST.shm} is {_gib(total)} ({_gib(free)} free)"
    if total >= need:
        return seen + (f", in a container ({where})" if where else "")
    if where is None:
        return seen + f", below {_gib(need)} but not in a container"
    raise CheckFailed(
        f"{seen} in a container ({where}); needs {_gib(need)}",
        "Docker gives 64 MiB by default: dataloader workers die with 'bus error' / 'DataLoader "
        "worker (pid N) is killed by signal: Bus error', and NCCL's shared-memory transport "
        "fails or hangs",
        "start the container with --ipc=host or --shm-size=16g (Kubernetes: an emptyDir with "
        "medium: Memory mounted at /dev/shm); or set num_workers=0 "
        f"(threshold: {ctx.settings.source('min_shm_gib')})",
    )


# ----------------------------------------------------------------------------------------------
# disk


def hub_cache(env: Mapping[str, str]) -> Path:
    """Where huggingface_hub stores downloads (HF_HUB_CACHE, else HF_HOME/hub)."""
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _existing(path: Path) -> Path:
    """The path, or its nearest existing parent (what a write there would fill)."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _model_folder(model: str, cache: Path) -> Path | None:
    """A local model folder, or its newest snapshot in the Hub cache."""
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    snaps = cache / ("models--" + model.replace("/", "--")) / "snapshots"
    if snaps.is_dir():
        found = sorted(snaps.iterdir(), key=lambda s: s.stat().st_mtime, reverse=True)
        return found[0] if found else None
    return None


def model_size(folder: Path) -> tuple[int, str] | None:
    """(bytes of weights, how they were counted) from the safetensors index or files."""
    index = folder / "model.safetensors.index.json"
    try:
        total = int(json.loads(index.read_text())["metadata"]["total_size"])
        return total, f"{index.name} total_size"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    files = list(folder.glob("*.safetensors"))
    if files:
        return sum(f.stat().st_size for f in files), f"{len(files)} safetensors file(s)"
    return None


def merged_16bit(folder: Path, size: int) -> tuple[int, str]:
    """What a merged 16-bit save of this model takes, from its stored size and dtype."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    quant = cfg.get("quantization_config") or {}
    if quant.get("load_in_4bit") or quant.get("bnb_4bit_quant_type") or quant.get("bits") == 4:
        return size * 4, "4-bit weights x 4"
    if quant.get("load_in_8bit") or quant.get("bits") == 8:
        return size * 2, "8-bit weights x 2"
    if str(cfg.get("torch_dtype") or cfg.get("dtype")) == "float32":
        return size // 2, "float32 weights / 2"
    return size, "16-bit weights"


@builtin_check("disk", layer="machine", description="free disk for the Hub cache and the outputs")
def check_disk(ctx: CheckContext) -> str:
    """Free space where the Hub cache and the output directory live."""
    env = HOST.env
    cache = hub_cache(env)
    out = Path(str(ctx.settings.grpo_config.get("output_dir") or ctx.rootpath))
    if not out.is_absolute():
        out = ctx.rootpath / out
    floor = ctx.settings.min_free_disk_gib * GIB
    needs = {"cache": floor, "output": floor}
    basis = f"{ctx.settings.min_free_disk_gib:g} GiB ({ctx.settings.source('min_free_disk_gib')})"
    model = ctx.settings.model
    by_model = False
    if model:
        folder = _model_folder(model, cache)
        sized = model_size(folder) if folder else None
        if sized is not None and folder is not None:
            by_model = True
            size, how = sized
            merged, rule = merged_16bit(folder, size)
            local = Path(model).expanduser().is_dir() or cache in folder.parents
            needs = {"cache": 0 if local else size, "output": merged}
            basis = (
                f"{model}: {_gib(size)} ({how}); a merged 16-bit save needs {_gib(merged)} ({rule})"
            )
    # Two places on one file system share its free space: add their needs.
    by_dev: dict[int, list[tuple[str, Path]]] = {}
    for what, path in (("Hub cache", cache), ("output directory", out)):
        real = _existing(path)
        by_dev.setdefault(os.stat(real).st_dev, []).append((what, path))
    seen, short = [], []
    for places in by_dev.values():
        real = _existing(places[0][1])
        st = HOST.statvfs(str(real))
        free = st.f_bavail * st.f_frsize
        # A floor applies per file system; model-based needs add up where they share one.
        need = (
            sum(needs["cache" if w == "Hub cache" else "output"] for w, _ in places)
            if by_model
            else floor
        )
        names = " and ".join(f"{w} {p}" for w, p in places)
        seen.append(f"{names}: {_gib(free)} free")
        if free < need:
            short.append(f"{names}: {_gib(free)} free, needs {_gib(need)}")
    if short:
        raise CheckFailed(
            "; ".join(short) + f" (basis: {basis})",
            "downloads and checkpoint/merged saves then stop with 'No space left on device', "
            "often after hours of training, and leave a truncated model behind",
            "free space (huggingface-cli delete-cache; old checkpoints), point HF_HOME or "
            "HF_HUB_CACHE at a bigger disk, or set output_dir on one; lower "
            "unsloth_min_free_disk only if you save small adapters",
        )
    return "; ".join(seen) + f" (need: {basis})"


# ----------------------------------------------------------------------------------------------
# compiler


def _libcuda(env: Mapping[str, str]) -> str | None:
    """Where triton would find libcuda.so, or None (its own search order)."""
    override = env.get("TRITON_LIBCUDA_PATH")
    if override:
        return override if Path(override).exists() else None
    for line in HOST.ldconfig().splitlines():
        if "libcuda.so.1" in line and "=>" in line:
            return line.split("=>", 1)[1].strip()
    for d in env.get("LD_LIBRARY_PATH", "").split(os.pathsep):
        if d and (Path(d) / "libcuda.so.1").exists():
            return str(Path(d) / "libcuda.so.1")
    return None


# Packages that compile CUDA code with nvcc at run time (JIT op builders).
NVCC_USERS = ("deepspeed", "flashinfer-python", "flashinfer")


@dataclasses.dataclass(frozen=True)
class _Tool:
    """One thing kernels are compiled with: ``seen`` when found, else ``problem`` and ``fix``."""

    seen: str = ""
    problem: str = ""
    fix: str = ""


@builtin_check(
    "compiler",
    layer="machine",
    description="C compiler, Python.h, libcuda, nvcc for JIT",
)
def check_compiler(ctx: CheckContext) -> str:
    """A C compiler and Python headers for triton's JIT, libcuda.so findable, nvcc for JIT
    extension builders."""
    if ctx.dist("triton") is None and ctx.dist("triton-windows") is None:
        raise CheckSkipped("triton is not installed (nothing compiles kernels at run time)")
    env = HOST.env
    tools = [_c_compiler(env), _python_headers(), _libcuda_tool(ctx, env), _nvcc(ctx, env)]
    found = [t for t in tools if t is not None]
    missing = [t for t in found if t.problem]
    if missing:
        raise CheckFailed(
            "; ".join(t.problem for t in missing),
            "triton compiles every kernel (unsloth's, torch.compile's) with a C compiler at the "
            "first training step: 'Failed to find C compiler', 'Python.h: No such file', "
            "'libcuda.so cannot found!'",
            "; ".join(t.fix for t in missing),
        )
    return ", ".join(t.seen for t in found)


def _c_compiler(env: Mapping[str, str]) -> _Tool:
    """CC when set (and real), else gcc, clang or cc on PATH."""
    cc = env.get("CC") or HOST.which("gcc") or HOST.which("clang") or HOST.which("cc")
    if env.get("CC") and not (HOST.which(env["CC"]) or Path(env["CC"]).exists()):
        return _Tool(
            problem=f"CC={env['CC']} does not exist",
            fix="point CC at an installed compiler (CC=gcc)",
        )
    if cc is None:
        return _Tool(
            problem="no C compiler (CC unset; gcc, clang, cc not on PATH)",
            fix="apt-get install build-essential (or set CC to a compiler)",
        )
    return _Tool(seen=f"C compiler {cc}")


def _python_headers() -> _Tool:
    """Python.h, which triton compiles its launcher against."""
    include = Path(HOST.python_include())
    if (include / "Python.h").exists():
        return _Tool(seen="Python.h")
    v = f"{sys.version_info.major}.{sys.version_info.minor}"
    return _Tool(
        problem=f"no Python.h in {include}",
        fix=f"apt-get install python{v}-dev (triton compiles a launcher against it)",
    )


def _libcuda_tool(ctx: CheckContext, env: Mapping[str, str]) -> _Tool | None:
    """libcuda.so.1 where triton looks for it (only asked when NVML sees a GPU)."""
    nvml = ctx.nvml
    if not (nvml.available and nvml.devices):
        return None
    lib = _libcuda(env)
    if lib is not None:
        return _Tool(seen=f"libcuda {lib}")
    where = env.get("TRITON_LIBCUDA_PATH")
    return _Tool(
        problem=f"libcuda.so.1 not found (TRITON_LIBCUDA_PATH={where!r})"
        if where
        else "libcuda.so.1 is not in ldconfig's cache or LD_LIBRARY_PATH",
        fix="run ldconfig (as root) after installing the driver, or export "
        "TRITON_LIBCUDA_PATH=<folder with libcuda.so.1> (WSL: /usr/lib/wsl/lib)",
    )


def _nvcc(ctx: CheckContext, env: Mapping[str, str]) -> _Tool | None:
    """nvcc, when an installed package builds CUDA extensions at run time."""
    builders = [n for n in NVCC_USERS if ctx.dist(n) is not None]
    if not builders:
        return None
    home = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    nvcc = (
        str(Path(home) / "bin" / "nvcc")
        if home and (Path(home) / "bin" / "nvcc").exists()
        else HOST.which("nvcc")
    )
    if nvcc is not None:
        return _Tool(seen=f"nvcc {nvcc}")
    return _Tool(
        problem=f"{', '.join(builders)} build CUDA extensions at run time, but no nvcc "
        f"(CUDA_HOME={home!r}, none on PATH)",
        fix="install the CUDA toolkit matching torch's CUDA (or pip install "
        "nvidia-cuda-nvcc-cu12) and export CUDA_HOME",
    )


# ----------------------------------------------------------------------------------------------
# platform


@builtin_check("platform", layer="machine", description="WSL and Windows specific causes")
def check_platform(ctx: CheckContext) -> str:
    """WSL's own failure causes; native Windows needs triton-windows."""
    system = HOST.system()
    if system == "Windows":
        if ctx.dist("unsloth") is not None and ctx.dist("triton-windows") is None:
            raise CheckFailed(
                "native Windows with unsloth installed and no triton-windows",
                "unsloth's kernels are Triton kernels; the triton package has no Windows build",
                "pip install triton-windows (matching your torch), or use WSL 2",
            )
        return f"Windows {platform.release()}"
    if system != "Linux":
        return f"{system}: no NVIDIA CUDA training here" if system == "Darwin" else system
    try:
        version = HOST.proc_version.read_text(errors="replace")
    except OSError:
        return "Linux"
    kernel = version.split()[2] if len(version.split()) > 2 else "?"
    if "microsoft" not in version.lower() and "wsl" not in version.lower():
        return f"Linux {kernel}"
    problems, fixes = [], []
    libs = HOST.ldconfig()
    libcuda = [
        line.split("=>", 1)[1].strip()
        for line in libs.splitlines()
        if "libcuda.so" in line and "=>" in line
    ]
    wsl = str(HOST.wsl_lib)
    if not HOST.wsl_lib.is_dir():
        problems.append(f"{wsl} is missing (the Windows driver's CUDA passthrough)")
        fixes.append("install/update the NVIDIA driver on Windows and run `wsl --update`")
    elif not any(p.startswith(wsl) for p in libcuda) and wsl not in HOST.env.get(
        "LD_LIBRARY_PATH", ""
    ):
        problems.append(f"{wsl} is not on the loader path (ldconfig, LD_LIBRARY_PATH)")
        fixes.append(f"export LD_LIBRARY_PATH={wsl}:$LD_LIBRARY_PATH (or run sudo ldconfig)")
    linux_driver = [p for p in libcuda if not p.startswith(wsl)]
    if linux_driver:
        problems.append(
            f"a Linux NVIDIA driver's libcuda is installed inside WSL ({linux_driver[0]})"
        )
        fixes.append(
            "remove the Linux driver inside WSL (sudo apt-get remove --purge 'nvidia-driver-*' "
            "'libnvidia-compute-*'); WSL uses the Windows driver only"
        )
    if problems:
        raise CheckFailed(
            f"WSL 2 (kernel {kernel}): " + "; ".join(problems),
            "CUDA in WSL reaches the GPU only through the Windows driver's libraries in "
            f"{wsl}; a Linux driver's libcuda shadows them and CUDA then finds no device",
            "; ".join(fixes),
        )
    return f"WSL 2 (kernel {kernel}), CUDA through {wsl}"
