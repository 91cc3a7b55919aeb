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


# Headers that ATen/cuda/CUDAContext.h includes beyond the CUDA runtime's own.
_CUDA_LIBRARY_HEADERS = ("cublas_v2.h", "cublasLt.h", "cusparse.h", "cusolverDn.h")
_CUDA_LIBRARY_PREFIXES = ("cublas", "cusparse", "cusolver", "cufft", "curand")


def _is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime_api.h"))


def _resolve_cuda_home():
    """The CUDA toolkit root, fixed up before torch.utils.cpp_extension reads ``CUDA_HOME``.

    ``CUDA_HOME=$(dirname $(dirname $(readlink -f $(command -v nvcc))))`` is not the toolkit when ``nvcc`` is a
    wrapper script (e.g. ``/usr/local/bin/nvcc`` exec'ing ``/usr/local/cuda-13.0/bin/nvcc``): it gives
    ``/usr/local``, whose ``include/`` and ``lib64/`` hold no CUDA. Then the toolkit nvcc itself reports
    (``nvcc --dryrun``: ``TOP=...``) is used, so that torch finds its headers and ``libcudart``.
    """
    import shutil
    import subprocess

    given = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if _is_toolkit(given):
        return
    nvcc = os.path.join(given, "bin", "nvcc") if given and os.path.exists(os.path.join(given, "bin", "nvcc")) \
        else shutil.which("nvcc")
    if not nvcc:
        return
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ TOP="):
            top = os.path.realpath(line.split("=", 1)[1].strip())
            if _is_toolkit(top):
                if given:
                    print(f"ddfast: CUDA_HOME={given} is not a CUDA toolkit; using {top} (where {nvcc} runs from)")
                os.environ["CUDA_HOME"] = top
            return


def _cuda_library_header_shim(cuda_home):
    """An include folder with the cuBLAS/cuSPARSE/cuSOLVER headers when the toolkit at ``cuda_home`` lacks them.

    A toolkit that has nvcc and the runtime but not the math libraries (a minimal or pip-installed nvcc) cannot
    compile code that includes ATen's CUDA context header. torch's CUDA wheels ship those headers in
    ``site-packages/nvidia/*/include``. Only math-library headers (cublas*, cusparse*, cusolver*, cufft*, curand*)
    that the toolkit is missing are linked into ``build/cuda_library_headers`` -- never a runtime header, so the
    toolkit's own headers (which must match nvcc) are never shadowed; the headers those files include with quotes
    then resolve to the toolkit's. Returns that folder, or None when nothing is missing.
    """
    toolkit_inc = os.path.join(cuda_home, "include")
    if all(os.path.exists(os.path.join(toolkit_inc, h)) for h in _CUDA_LIBRARY_HEADERS):
        return None
    import glob

    try:
        import nvidia  # namespace package of the nvidia-* wheels torch depends on
        roots = list(nvidia.__path__)
    except ImportError:
        roots = []
    sources = [d for r in roots for d in sorted(glob.glob(os.path.join(r, "*", "include")))
               if all(os.path.exists(os.path.join(d, h)) for h in _CUDA_LIBRARY_HEADERS)]
    if not sources:
        missing = [h for h in _CUDA_LIBRARY_HEADERS if not os.path.exists(os.path.join(toolkit_inc, h))]
        raise SystemExit(f"ddfast: the CUDA toolkit at {cuda_home} lacks {', '.join(missing)} and no nvidia-* wheel "
                         "provides them; install the toolkit's cuBLAS/cuSPARSE/cuSOLVER headers or set DDFAST_BUILD_CUDA=0")
    shim = os.path.join(ROOT, "build", "cuda_library_headers")
    if os.path.isdir(shim):
        for name in os.listdir(shim):  # stale links (another environment, another toolkit)
            os.remove(os.path.join(shim, name))
    os.makedirs(shim, exist_ok=True)
    for name in sorted(os.listdir(sources[0])):
        src = os.path.join(sources[0], name)
        if (name.startswith(_CUDA_LIBRARY_PREFIXES) and name.endswith(".h") and os.path.isfile(src)
                and not os.path.exists(os.path.join(toolkit_inc, name))):
            os.symlink(src, os.path.join(shim, name))
    print(f"ddfast: {toolkit_inc} lacks the CUDA math-library headers; using those of {sources[0]}")
    return shim


def _extensions():
    if _flag("DDFAST_NO_EXTENSION"):
        return [], {}
    import glob

    force_cuda = _flag("DDFAST_BUILD_CUDA")
    if force_cuda is not False:
        _resolve_cuda_home()

    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cuda_possible = torch.version.cuda is not None and CUDA_HOME is not None
    if force_cuda is True and not cuda_possible:
        why = "torch is a CPU-only build" if torch.version.cuda is None else "nvcc not found (set CUDA_HOME)"
        raise SystemExit(f"DDFAST_BUILD_CUDA=1 but the CUDA kernels cannot be built: {why}")
    with_cuda = cuda_possible if force_cuda is None else force_cuda

    debug = bool(_flag("DDFAST_DEBUG"))
    sources = [os.path.join("csrc", "ddfast.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # torch's BuildExtension adds -std=c++20 (torch >= 2.10 needs C++20) and -DPy_LIMITED_API (py_limited_api=True).
    if sys.platform != "win32":
        cxx += ["-fopenmp"] if not debug else []
        # FP exception flags are never read: without this GCC will not if-convert a select whose arm may raise one
        # (x > 20 ? x : log1p(exp(x)) / beta), and the CPU kernels' `omp simd` loops stay scalar. Values unchanged.
        cxx += ["-fno-trapping-math"]
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra = {"cxx": cxx}
    ext_cls = CppExtension
    arch_list = ""
    if with_cuda:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # read by torch's BuildExtension
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("DDFAST_WITH_CUDA", None))
        shim = _cuda_library_header_shim(CUDA_HOME)
        if shim:
            include_dirs.append(shim)
        extra["nvcc"] = (["-O0", "-G", "-g"] if debug else ["-O3"]) + [
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
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"] if (sys.platform != "win32" and not debug) else [],
        py_limited_api=True,
    )
    print(f"ddfast: building ddfast._C with CUDA={'on (' + arch_list + ')' if with_cuda else 'off'}")

    class DdfastBuildExt(BuildExtension):
        """torch's BuildExtension (ninja), keeping its objects in ``build/`` for editable installs as well.

        setuptools builds an editable install in a fresh temporary folder, so every ``pip install -e .`` would
        recompile every kernel (many minutes of nvcc). With a persistent folder ninja recompiles only what changed
        (it tracks each object's command line and header dependencies, so a change of flags or torch rebuilds).
        """

        def run(self):
            if getattr(self, "editable_mode", False):
                self.build_temp = os.path.join(ROOT, "build", "temp-editable")
            super().run()

    return [ext], {"build_ext": DdfastBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
