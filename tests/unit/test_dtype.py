"""The engine's dtype follows the processor: bfloat16 only where it is native (worker/engine/dtype.py)."""

from pathlib import Path

import pytest

from worker.engine.dtype import CpuFeatures, choose_dtype, detect_cpu_features, parse_cpuinfo_flags

# Flags as /proc/cpuinfo prints them, trimmed to what matters, for processors of this machine kind.
AMD_EPYC_AVX2 = CpuFeatures("AVX2", frozenset(["fpu", "sse2", "avx", "avx2", "fma"]))
AMD_EPYC_ZEN4 = CpuFeatures("AVX512", frozenset(["avx2", "avx512f", "avx512_bf16", "avx512_vnni"]))
INTEL_SAPPHIRE_RAPIDS = CpuFeatures(
    "AVX512", frozenset(["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"])
)
INTEL_AMX_ONLY = CpuFeatures("AVX512", frozenset(["avx2", "avx512f", "amx_bf16", "amx_tile"]))
INTEL_SKYLAKE = CpuFeatures("AVX512", frozenset(["avx2", "avx512f", "avx512bw", "avx512_vnni"]))
ARM_WITH_BF16 = CpuFeatures("SVE256", frozenset(["fp", "asimd", "sve", "bf16", "i8mm"]))
ARM_WITHOUT_BF16 = CpuFeatures("DEFAULT", frozenset(["fp", "asimd"]))


@pytest.mark.parametrize(
    ("cpu", "expected"),
    [
        (AMD_EPYC_AVX2, "float32"),
        (INTEL_SKYLAKE, "float32"),  # AVX-512 but no BF16 instructions
        (ARM_WITHOUT_BF16, "float32"),
        (AMD_EPYC_ZEN4, "bfloat16"),
        (INTEL_SAPPHIRE_RAPIDS, "bfloat16"),
        (INTEL_AMX_ONLY, "bfloat16"),
        (ARM_WITH_BF16, "bfloat16"),
        # Flags unreadable (a container hiding /proc), torch's own check still sees AVX512_BF16.
        (CpuFeatures("AVX512", frozenset(), torch_avx512_bf16=True), "bfloat16"),
        (CpuFeatures("AVX2", frozenset()), "float32"),
    ],
)
def test_auto_on_a_cpu_is_bfloat16_only_where_it_is_native(cpu: CpuFeatures, expected: str) -> None:
    choice = choose_dtype("auto", "cpu", cpu)
    assert choice.dtype == expected
    assert choice.reason


def test_the_reason_says_why_float32() -> None:
    reason = choose_dtype("auto", "cpu", AMD_EPYC_AVX2).reason
    assert "AVX2" in reason and "no native bfloat16" in reason


def test_the_reason_names_the_native_feature() -> None:
    assert "amx_bf16" in choose_dtype("auto", "cpu", INTEL_SAPPHIRE_RAPIDS).reason


@pytest.mark.parametrize("requested", ["bfloat16", "float32", "float16"])
@pytest.mark.parametrize("cpu", [AMD_EPYC_AVX2, INTEL_SAPPHIRE_RAPIDS])
def test_an_explicit_dtype_always_wins(requested: str, cpu: CpuFeatures) -> None:
    choice = choose_dtype(requested, "cpu", cpu)
    assert choice.dtype == requested and "explicitly" in choice.reason


@pytest.mark.parametrize("device", ["cuda", "rocm", "tpu"])
def test_on_accelerators_vllm_chooses(device: str) -> None:
    assert choose_dtype("auto", device, None).dtype == "auto"
    assert choose_dtype("float16", device, None).dtype == "float16"


def test_parse_cpuinfo_reads_the_first_processors_flags() -> None:
    x86 = (
        "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\nflags\t: other\n"
    )
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16\nCPU implementer\t: 0x41\n"
    assert parse_cpuinfo_flags(x86) == {"fpu", "avx2", "fma"}
    assert parse_cpuinfo_flags(arm) == {"fp", "asimd", "bf16"}
    assert parse_cpuinfo_flags("") == frozenset()


def test_detect_reads_this_machine(tmp_path: Path) -> None:
    features = detect_cpu_features()
    assert features.capability  # torch always names one
    missing = detect_cpu_features(tmp_path / "no-cpuinfo")
    assert missing.flags == frozenset()
    print(f"\nthis machine: {features.capability}, native bf16: {features.native_bf16 or 'none'}")
