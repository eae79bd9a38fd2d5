"""Exit 0 if llama-cpp-python 0.3.36 is installed as a portable build (no AMX kernels).

A wheel compiled with -march=native on a machine with Intel AMX crashes (SIGSEGV in
ggml_backend_amx_mul_mat) where the kernel does not grant AMX tile state, as in some
sandboxes; `make setup` then rebuilds it with portable flags.
"""

import sys

try:
    import llama_cpp
except ImportError:
    sys.exit(1)
info = llama_cpp.llama_print_system_info().decode()
sys.exit(0 if llama_cpp.__version__ == "0.3.36" and "AMX" not in info else 1)
