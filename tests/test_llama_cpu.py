"""The llama.cpp build `make setup` picks for a CPU (scripts/llama_cpu.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "llama_cpu.py"
spec = importlib.util.spec_from_file_location("llama_cpu", SCRIPT)
llama_cpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(llama_cpu)

HASWELL = "processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma f16c bmi2\n"
SAPPHIRE = (
    "flags\t\t: fpu avx avx2 fma f16c avx512f avx512dq avx512bw avx512vl avx512vbmi "
    "avx512_vnni avx512_bf16 amx_tile amx_int8 amx_bf16\n"
)
SKYLAKE_X = "flags\t\t: fpu avx avx2 fma f16c avx512f avx512dq avx512bw avx512vl\n"


def test_avx512_only_where_every_kernel_it_enables_has_its_instructions() -> None:
    assert llama_cpu.variant(llama_cpu.cpu_flags(SAPPHIRE)) == "avx512"
    assert llama_cpu.variant(llama_cpu.cpu_flags(SKYLAKE_X)) == "avx2"  # no VNNI / BF16
    assert llama_cpu.variant(llama_cpu.cpu_flags(HASWELL)) == "avx2"
    assert llama_cpu.variant(llama_cpu.cpu_flags("")) == "avx2"


def test_no_build_enables_amx_or_a_native_march() -> None:
    for name in ("avx512", "avx2"):
        args = llama_cpu.cmake_args(name).split()
        assert "-DGGML_NATIVE=OFF" in args
        assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(args)
        assert not any(a.startswith("-DGGML_AMX") and a.endswith("=ON") for a in args)
    assert "-DGGML_AVX512=ON" in llama_cpu.cmake_args("avx512").split()
    assert "-DGGML_AVX512=OFF" in llama_cpu.cmake_args("avx2").split()
