"""Which dtype the engine computes in: the one the processor computes natively.

vLLM's `auto` takes the model config's dtype and, on every x86 CPU, turns float32 into
bfloat16. Where the processor has no bfloat16 instructions (no AVX512_BF16, no AMX), torch
emulates them: a bfloat16 matmul is about 10x slower than float32 there (measured on an
AVX2-only AMD EPYC: 9.9 ms against 0.98 ms), and batching gains almost nothing. So with
WORKER_VLLM_DTYPE=auto on a CPU we pick bfloat16 only where it is native and float32 elsewhere;
on GPUs vLLM's own choice stands. An explicit WORKER_VLLM_DTYPE always wins.

The decision is a pure function of what the processor reports (`choose_dtype`), so it is
unit-tested over processors this service does not run on.
"""

from dataclasses import dataclass
from pathlib import Path

# /proc/cpuinfo flags that mean bfloat16 matmuls run in hardware: x86's AVX-512 BF16 and AMX
# (Sapphire Rapids and later, Zen 4 and later for AVX512_BF16), aarch64's BF16 extension.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@dataclass(frozen=True)
class CpuFeatures:
    """What the processor says about itself."""

    capability: str  # torch.backends.cpu.get_cpu_capability(): AVX2, AVX512, ...
    flags: frozenset[str]  # /proc/cpuinfo flags (x86) or Features (aarch64)
    torch_avx512_bf16: bool = False  # torch's own cpuinfo check, where the flags are unreadable

    @property
    def native_bf16(self) -> list[str]:
        """The features that make bfloat16 native here (empty: it would be emulated)."""
        found = sorted(self.flags & NATIVE_BF16_FLAGS)
        if self.torch_avx512_bf16 and "avx512_bf16" not in found:
            found.append("avx512_bf16")
        return found


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str  # what vLLM is given: "auto" leaves the choice to vLLM (GPUs)
    reason: str  # one sentence for the start-up log


def choose_dtype(requested: str, device_type: str, cpu: CpuFeatures | None) -> DtypeChoice:
    """The dtype to give vLLM for WORKER_VLLM_DTYPE=`requested` on `device_type` ("cpu", "cuda")."""
    if requested != "auto":
        return DtypeChoice(requested, f"WORKER_VLLM_DTYPE={requested} set explicitly")
    if device_type != "cpu" or cpu is None:
        return DtypeChoice("auto", f"vLLM's own choice on {device_type}")
    if native := cpu.native_bf16:
        return DtypeChoice("bfloat16", f"the CPU computes bfloat16 natively ({', '.join(native)})")
    return DtypeChoice(
        "float32",
        f"the CPU ({cpu.capability}) has no native bfloat16 (no AVX512_BF16 or AMX): torch would "
        "emulate it about 10x slower than float32",
    )


def parse_cpuinfo_flags(text: str) -> frozenset[str]:
    """The first processor's flags (x86 `flags`, aarch64 `Features`) from /proc/cpuinfo text."""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def detect_cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuFeatures:
    """Reads this machine's processor features (torch is imported by vLLM anyway)."""
    import torch

    try:
        flags = parse_cpuinfo_flags(cpuinfo.read_text())
    except OSError:
        flags = frozenset()
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return CpuFeatures(
        capability=torch.backends.cpu.get_cpu_capability(),
        flags=flags,
        torch_avx512_bf16=bool(check()) if check is not None else False,
    )
