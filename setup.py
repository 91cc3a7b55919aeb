"""Build script for ddfast's C++/CUDA extension ``ddfast._C``.

Build against the torch already installed (no build isolation)::

    pip install --no-build-isolation -e .

Environment switches
--------------------
DDFAST_BUILD_CUDA=1|0   force the CUDA kernels on (fails without nvcc) or off. Unset: build them whenever
                        torch is a CUDA build and nvcc is found (CUDA_HOME, or nvcc on PATH) -- a GPU is
                        *not* needed at build time.
TORCH_CUDA_ARCH_LIST    CUDA architectures, e.g. "8.0;9.0+PTX" (the default: sm_80 and sm_90, PTX for newer).
MAX_JOBS                parallel compile jobs (ninja).
DDFAST_DEBUG=1          -O0 -g host code, -G device code.
DDFAST_NO_EXTENSION=1   install the pure-Python package only (the ops fall back to their references).
"""
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"{name}={value!r}: expected 0 or 1")


def _extensions():
    if _flag("DDFAST_NO_EXTENSION"):
        return [], {}
    import glob

    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    force_cuda = _flag("DDFAST_BUILD_CUDA")
    cuda_possible = torch.version.cuda is not None and CUDA_HOME is not None
    if force_cuda is True and not cuda_possible:
        why = "torch is a CPU-only build" if torch.version.cuda is None else "nvcc not found (set CUDA_HOME)"
        raise SystemExit(f"DDFAST_BUILD_CUDA=1 but the CUDA kernels cannot be built: {why}")
    with_cuda = cuda_possible if force_cuda is None else force_cuda

    debug = bool(_flag("DDFAST_DEBUG"))
    sources = [os.path.join("csrc", "ddfast.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-std=c++17", "-DPy_LIMITED_API=0x03090000"]
    if sys.platform != "win32":
        cxx += ["-fopenmp"] if not debug else []
    define_macros = []
    extra = {"cxx": cxx}
    ext_cls = CppExtension
    arch_list = ""
    if with_cuda:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # read by torch's BuildExtension
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("DDFAST_WITH_CUDA", None))
        extra["nvcc"] = (["-O0", "-G", "-g"] if debug else ["-O3"]) + [
            "-std=c++17",
            "--expt-relaxed-constexpr",
            "-lineinfo",
        ]
        ext_cls = CUDAExtension
    define_macros += [
        ("DDFAST_CUDA_ARCH_LIST", f'"{arch_list}"'),
        ("DDFAST_TORCH_VERSION", f'"{torch.__version__}"'),
    ]
    ext = ext_cls(
        name="ddfast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"] if (sys.platform != "win32" and not debug) else [],
        py_limited_api=True,
    )
    print(f"ddfast: building ddfast._C with CUDA={'on (' + arch_list + ')' if with_cuda else 'off'}")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
