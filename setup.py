"""Builds fastalign._C, the C++ CPU kernels, with torch's cpp_extension and ninja.

The kernels use ATen's `Vectorized<T>`, whose width is fixed at compile time by the
CPU_CAPABILITY macros. The extension is compiled on the machine that runs it (pip install
compiles it), so it targets that machine's instruction set: AVX-512 or AVX2 when the compiler
reports them for `-march=native`, the portable scalar fallback otherwise. Set
FASTALIGN_PORTABLE=1 to build without `-march=native` (for wheels that travel).
"""

import os
import subprocess
import sys

from setuptools import find_packages, setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ModuleNotFoundError as exc:
    # pip's default isolated build has no torch (pyproject.toml leaves it out on purpose): say the
    # fix in one line instead of a traceback.
    if exc.name != "torch":
        raise
    sys.exit("fastalign: building needs the torch you will run it with; install torch first, then "
             "`pip install --no-build-isolation .` (pip's isolated build has no torch)")


def _native_macros() -> set[str]:
    try:
        out = subprocess.run(
            ["c++", "-march=native", "-dM", "-E", "-x", "c++", "/dev/null"],
            capture_output=True, text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return set()
    return {line.split()[1] for line in out.splitlines() if line.startswith("#define ")}


def _cpu_capability_flags() -> list[str]:
    if os.environ.get("FASTALIGN_PORTABLE") == "1":
        return ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]
    macros = _native_macros()
    if {"__AVX512F__", "__AVX512BW__", "__AVX512DQ__", "__AVX512VL__"} <= macros:
        return ["-march=native", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if {"__AVX2__", "__FMA__"} <= macros:
        return ["-march=native", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]


_cpu_dir = os.path.join("csrc", "cpu")
sources = sorted(os.path.join(_cpu_dir, name) for name in os.listdir(_cpu_dir) if name.endswith(".cpp"))
headers = sorted(os.path.join(_cpu_dir, name) for name in os.listdir(_cpu_dir) if name.endswith(".h"))

setup(
    packages=find_packages(include=["fastalign", "fastalign.*"]) + ["fastalign.kernels"],
    package_dir={"fastalign": "fastalign", "fastalign.kernels": "kernels"},
    ext_modules=[
        CppExtension(
            "fastalign._C",
            sources,
            depends=headers,
            extra_compile_args=["-O3", "-fopenmp", "-std=c++17", *_cpu_capability_flags()],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
