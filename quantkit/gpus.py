"""The GPUs the planner knows: the memory vLLM can see and the compute capability.

``memory_bytes`` is what vLLM budgets from: the *total* of ``torch.cuda.mem_get_info()``
(``cudaMemGetInfo``), which is the board's memory less what the driver reserves. It equals
``nvidia-smi``'s ``memory.total - memory.reserved`` in MiB, and is a little below the
marketing figure: "80 GB" H100 is 79.18 GiB (85.0e9 bytes) to vLLM, not 80 GiB.

Sources, per entry (``GPU.source``):
  - "measured": ``cuMemGetInfo`` on that board here (driver with CUDA 13, 2025).
  - "reported": the total capacity PyTorch prints in its out-of-memory message on that
    board ("GPU 0 has a total capacity of X GiB"), as widely quoted, or a device query's
    ``totalGlobalMem`` (B200: 178.35 GiB, quoted in pytorch/ao#4002); driver versions move
    it by a few MiB. Treat these as good to about 0.1 GiB.
  - "generic": ``--gpu 24GB`` style, nominal GiB times 0.975 (the typical reserve seen
    on the boards above), compute capability unknown, so FP8 is not assumed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import QuantkitError

MiB = 2**20
GiB = 2**30

# Share of nominal memory that cudaMemGetInfo reports on the boards listed below
# (H100: 81079/81920 MiB, RTX 3070: 7977/8192, RTX 4090: 24217/24576).
_GENERIC_USABLE = 0.975


class GPUError(QuantkitError):
    """The ``--gpu`` name is not one the planner knows."""


@dataclass(frozen=True)
class GPU:
    """One accelerator as vLLM sees it."""

    name: str
    memory_bytes: int
    compute_capability: tuple[int, int]
    source: str

    @property
    def fp8(self) -> bool:
        """FP8 tensor cores (W8A8 FP8 runs natively): Ada and Hopper, capability >= 8.9."""
        return self.compute_capability >= (8, 9)

    @property
    def fp4(self) -> bool:
        """FP4 tensor cores (NVFP4/MXFP4 W4A4 run natively): Blackwell, capability >= 10.0."""
        return self.compute_capability >= (10, 0)

    @property
    def int8(self) -> bool:
        """INT8 tensor cores for W8A8 INT8 (cutlass kernels in vLLM): capability >= 7.5."""
        return self.compute_capability >= (7, 5)

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GiB


def _mib(n: int) -> int:
    return n * MiB


def _gib(x: float) -> int:
    return int(round(x * 1024)) * MiB


GPUS: dict[str, GPU] = {
    g.name: g
    for g in (
        # nvidia-smi 81559 MiB total, 480 MiB reserved; cuMemGetInfo total 85,017,493,504.
        GPU("H100-80GB", 85_017_493_504, (9, 0), "measured"),
        # nvidia-smi 143771 MiB total, 616 MiB reserved; cuMemGetInfo total 150,109,880,320.
        GPU("H200", 150_109_880_320, (9, 0), "measured"),
        GPU("B200", _gib(178.35), (10, 0), "reported"),
        GPU("A100-80GB", _gib(79.15), (8, 0), "reported"),
        GPU("A100-40GB", _gib(39.59), (8, 0), "reported"),
        GPU("L40S", _gib(44.52), (8, 9), "reported"),
        GPU("A10G", _gib(22.19), (8, 6), "reported"),
        GPU("RTX4090", _gib(23.65), (8, 9), "reported"),
        GPU("RTX3090", _gib(23.69), (8, 6), "reported"),
        GPU("RTX3070-8GB", _gib(7.79), (8, 6), "reported"),
    )
}

_ALIASES = {
    "H100": "H100-80GB",
    "H10080GB": "H100-80GB",
    "H200141GB": "H200",
    "A100": "A100-80GB",
    "RTX3070": "RTX3070-8GB",
    "3070": "RTX3070-8GB",
    "4090": "RTX4090",
    "3090": "RTX3090",
}


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name).upper()


_BY_KEY = {_key(n): g for n, g in GPUS.items()} | {_key(a): GPUS[n] for a, n in _ALIASES.items()}


def get_gpu(name: str) -> GPU:
    """A known GPU by name (case, spaces and dashes ignored), or ``"24GB"`` for any board.

    >>> get_gpu("h100").memory_bytes
    85017493504
    """
    key = _key(name)
    if key in _BY_KEY:
        return _BY_KEY[key]
    m = re.fullmatch(r"(\d+(?:\.\d+)?)GI?B", key)
    if m:
        nominal = float(m.group(1))
        if nominal <= 0:
            raise GPUError(f"--gpu: memory must be positive, got {name!r}", field="--gpu", value=name)
        return GPU(f"{m.group(1)}GB", int(nominal * GiB * _GENERIC_USABLE), (8, 0), "generic")
    raise GPUError(f"--gpu: unknown GPU {name!r}", field="--gpu", value=name,
                   hint=f"known: {', '.join(GPUS)}, or a size such as 24GB")
