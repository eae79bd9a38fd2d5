"""Which llama.cpp CPU build this machine gets, for `make setup` and the llama.cpp tools.

    python scripts/llama_cpu.py variant   # avx512 or avx2: the wheel's folder under build/wheels
    python scripts/llama_cpu.py cmake     # the CMAKE_ARGS of that build
    python scripts/llama_cpu.py check     # exit 0 if the installed llama-cpp-python is that build

avx512: x86-64 with AVX-512 F/BW/VL/VBMI/VNNI/BF16 (Ice Lake, Sapphire Rapids, Zen 4 and
later); there a 0.5B drafter pass over 64-256 prompt tokens ran 1.25-1.3x faster than with
AVX2 on this machine (README, "The llama.cpp build"). avx2: every other x86-64 machine. Never AMX: ggml's AMX kernels
raise SIGILL here (tilezero in tinygemm_kernel_amx on this Firecracker VM, although a plain
ldtilecfg/tilezero program runs), and a wheel with them crashed in ggml_backend_amx_mul_mat.
The build is for the machine it is built on (the wheel stays in build/wheels/<variant>).
"""

from __future__ import annotations

import sys
from pathlib import Path

VERSION = "0.3.36"
# /proc/cpuinfo flag -> the llama.cpp CMake option it enables
AVX512 = {
    "avx512f": "GGML_AVX512",
    "avx512bw": None,
    "avx512vl": None,
    "avx512vbmi": "GGML_AVX512_VBMI",
    "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16",
}
BASE = ["GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C"]
NO_AMX = ["GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"]


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (from /proc/cpuinfo; empty where there is none)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def variant(flags: set[str]) -> str:
    return "avx512" if set(AVX512) <= flags else "avx2"


def cmake_args(name: str) -> str:
    on = BASE + ([opt for opt in AVX512.values() if opt] if name == "avx512" else [])
    off = NO_AMX + ([] if name == "avx512" else ["GGML_AVX512"])
    return " ".join(["-DGGML_NATIVE=OFF"] + [f"-D{o}=ON" for o in on] + [f"-D{o}=OFF" for o in off])


def installed_matches(name: str) -> bool:
    """Is llama-cpp-python VERSION installed, built as this variant, without AMX kernels?"""
    try:
        import llama_cpp
    except ImportError:
        return False
    info = llama_cpp.llama_print_system_info().decode()
    has_avx512 = "AVX512 = 1" in info
    return (
        llama_cpp.__version__ == VERSION and "AMX" not in info and has_avx512 == (name == "avx512")
    )


def main(argv: list[str]) -> int:
    name = variant(cpu_flags())
    if argv == ["variant"]:
        print(name)
    elif argv == ["cmake"]:
        print(cmake_args(name))
    elif argv == ["check"]:
        return 0 if installed_matches(name) else 1
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
