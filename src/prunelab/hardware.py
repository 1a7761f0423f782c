"""Which device a study runs on, what that hardware is, how much memory there is
(the machine's, or its container's limit), and how many trials it runs side by
side. Never imports mlflow."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch

from prunelab.errors import ConfigError

AUTO = "auto"
KINDS = ("cpu", "cuda", "mps")  # a device setting is auto, one of these, or cuda:N


def available() -> list[str]:
    """The devices this machine offers, in the order `auto` prefers them last to first."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def check_setting(value: str, where: str = "device") -> None:
    """The spelling of a device setting (availability is checked by `resolve`)."""
    kind, _, index = value.partition(":")
    if value != AUTO and (kind not in KINDS or (index and not (kind == "cuda" and index.isdigit()))):
        raise ConfigError(f"{where} must be auto, cpu, cuda, cuda:N or mps, got {value!r}")


def resolve(value: str) -> torch.device:
    """`auto`: the first CUDA GPU, else Apple's MPS, else the CPU. An explicit device that
    this machine lacks is refused in one line naming what it has."""
    check_setting(value)
    have = available()
    if value == AUTO:
        return torch.device(next((d for d in have if d.startswith("cuda")), "mps" if "mps" in have else "cpu"))
    wanted = "cuda:0" if value == "cuda" else value
    if wanted not in have:
        raise ConfigError(f"device {value!r} is not available on this machine (it has {', '.join(have)}): "
                          "set device=auto or one of those")
    return torch.device(wanted)


@functools.lru_cache(maxsize=8)
def name(device: torch.device) -> str:
    """The hardware behind a device, e.g. 'NVIDIA H100 80GB HBM3' or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


@functools.lru_cache(maxsize=8)
def supports_bf16(device: torch.device) -> bool:
    """Whether the hardware computes bfloat16 natively (CPUs with AVX-512 BF16 or AMX, recent GPUs)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
        except (OSError, StopIteration):
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def default_parallel_trials(device_setting: str) -> int:
    """Trials side by side when the setting says 0: two on a GPU (they share it), one per
    four cores on a CPU (so 1 on machines with 4 cores or fewer)."""
    if resolve(device_setting).type == "cuda":
        return 2
    return max(1, (os.cpu_count() or 1) // 4)


def memory_bytes() -> int:
    """Memory this process may use: the machine's, or its container's limit when lower (0: unknown)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 0
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = int(Path(limit_file).read_text().strip())
        except (OSError, ValueError):  # absent, or "max": no limit
            continue
        total = min(total, limit) if total else limit
    return total


def check_memory(nbytes: float, what: str, hint: str) -> None:
    """One-line error when `what` would need more than all the memory there is,
    before anything allocates it (a MemoryError, or the OOM killer, otherwise)."""
    total = memory_bytes()
    if total and nbytes > total:
        raise ConfigError(f"{what} would need {nbytes / 2**30:,.1f} GiB of memory, more than the "
                          f"{total / 2**30:,.1f} GiB here: {hint}")
