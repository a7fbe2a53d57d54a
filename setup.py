"""Build fastres and its compiled extension ``fastres._C``.

Install (CI and README) against the torch already installed::

    CUDA_HOME=/usr/local/cuda pip install -e . --no-build-isolation

``fastres._C`` is built from ``csrc/``:

* a ``CUDAExtension`` (``csrc/**/*.cpp`` and ``csrc/**/*.cu``) when nvcc is
  found (``$CUDA_HOME``, else ``/usr/local/cuda``, else ``nvcc`` on ``PATH``),
  torch is a CUDA build (``torch.version.cuda``) and ``FASTRES_BUILD_CUDA`` is
  not ``0``. Whether *this* machine has a GPU does not matter: GPU-less build
  machines build the CUDA kernels too.
* otherwise a ``CppExtension`` of the ``.cpp`` files outside ``csrc/cuda/``:
  the op schemas without kernels (the torch and triton backends still work).

The build prints one line saying which it built and why.

Environment:

``FASTRES_BUILD_CUDA=0``
    build the C++-only extension even where CUDA is available.
``TORCH_CUDA_ARCH_LIST``
    the GPU architectures to compile for, e.g. ``"9.0"`` or ``"8.0;9.0+PTX"``.
    Default ``"8.0;8.6;8.9;9.0"`` (Ampere A100, Ampere consumer, Ada, Hopper).
    A plain ``9.0`` entry is built as ``9.0a`` (``hopper_arch_list``): the
    Hopper conv kernels need sm_90a's WGMMA and TMA, and sm_90a machine code
    runs on every 9.0 GPU (H100, H200, GH200). ``9.0+PTX`` is kept as written
    (sm_90a PTX would not run on later GPUs), and so builds no Hopper kernels.
    ``torch.ops.fastres._cuda_arch_list()`` reports the list used.
``CUDA_HOME``
    the CUDA toolkit (its ``bin/nvcc``).
``MAX_JOBS``
    parallel compile jobs (torch's ``BuildExtension``).
``FASTRES_DEBUG=1``
    ``-O0 -g`` (and ``-G`` for device code) instead of ``-O3``.
``FASTRES_CUTLASS_INCLUDE`` / ``CUTLASS_PATH``
    where CUTLASS's headers are (see ``find_cutlass``); by default those of
    the ``nvidia-cutlass`` pip package, a build requirement.

CUTLASS: the fused convolution ``conv_bn_act_cuda`` (``csrc/cuda/conv_*``) is
built from CUTLASS's header-only templates; its Hopper kernels
(``csrc/cuda/conv_bn_act_sm90*``) only when the list has ``9.0a``
(``FASTRES_WITH_SM90``). Without CUTLASS headers the build
still succeeds, says why, and leaves those sources and the op's schema out, so
``fastres.backends.implemented_backends("conv_bn_act")`` has no ``"cuda"``.

Layout of ``csrc/`` the build relies on: ``csrc/bindings.cpp`` declares every
schema; ``csrc/cpu/`` holds CPU kernels, built in both extensions;
``csrc/cuda/`` holds CUDA-only sources (``.cu``, and ``.cpp`` host code that
needs CUDA), compiled only in the CUDA build; ``csrc/cuda/conv_*`` need
CUTLASS too. New sources are picked up by glob; new include directories go in
``cuda_include_dirs``.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
from typing import List, Optional, Tuple

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
CUDA_SUBDIR = os.path.join(CSRC, "cuda")
# The sources that need CUTLASS (the fused convolution), left out without it.
CUTLASS_SOURCES = os.path.join(CUDA_SUBDIR, "conv_")
# The Hopper (sm_90a) conv kernels, left out without a 9.0a architecture.
SM90_SOURCES = os.path.join(CUDA_SUBDIR, "conv_bn_act_sm90")

# Ampere (A100: 8.0, consumer: 8.6), Ada (8.9) and Hopper (9.0), as SASS.
DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;8.9;9.0"

DEBUG = os.environ.get("FASTRES_DEBUG", "0") == "1"


def _log(msg: str) -> None:
    print(f"fastres setup.py: {msg}", flush=True)


# ----------------------------------------------------------------------------
# Decide what to build (before torch.utils.cpp_extension reads CUDA_HOME).
# ----------------------------------------------------------------------------


def find_cuda_home() -> Tuple[Optional[str], str]:
    """(the toolkit holding bin/nvcc, or None; where it was looked for)."""
    env = os.environ.get("CUDA_HOME")
    candidates = ([env] if env else []) + ["/usr/local/cuda"]
    for home in candidates:
        if os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home, ""
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), ""
    looked = ", ".join(f"{c}/bin/nvcc" for c in candidates) + " and PATH"
    return None, looked


def cuda_build_decision() -> Tuple[bool, str, Optional[str]]:
    """(build the CUDA kernels?, why, CUDA home)."""
    import torch

    if os.environ.get("FASTRES_BUILD_CUDA", "1") == "0":
        return False, "FASTRES_BUILD_CUDA=0", None
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build (torch.version.cuda is None)", None
    home, looked = find_cuda_home()
    if home is None:
        return False, f"nvcc not found (looked at {looked}); set CUDA_HOME", None
    return True, f"nvcc at {home}/bin/nvcc, torch {torch.__version__} built with CUDA {torch.version.cuda}", home


WITH_CUDA, WHY, CUDA_HOME = cuda_build_decision()


# Headers the conv kernels include, checked to exist before CUTLASS is used:
# an older CUTLASS without the 2.x conv visitor epilogue is reported, not used.
CUTLASS_REQUIRED_HEADERS = (
    "cutlass/cutlass.h",
    "cutlass/conv/kernel/default_conv2d_fprop.h",
    "cutlass/epilogue/threadblock/epilogue_with_visitor.h",
)


def find_cutlass() -> Tuple[Optional[List[str]], str]:
    """(CUTLASS include dirs, or None; where they were found, or why not).

    Header-only: nothing is linked. Looked for in this order, the first set
    variable winning (an override that lacks the headers is reported, and the
    build goes on without the conv kernels rather than use another CUTLASS):

    1. ``$FASTRES_CUTLASS_INCLUDE``: an include dir holding ``cutlass/cutlass.h``;
    2. ``$CUTLASS_PATH``: a CUTLASS checkout (``include/`` and ``tools/util/include/``);
    3. the ``nvidia-cutlass`` pip package (``cutlass_library/source/include``),
       found without importing it.
    """

    def complete(include: str) -> bool:
        return all(os.path.isfile(os.path.join(include, h)) for h in CUTLASS_REQUIRED_HEADERS)

    def with_util(root: str, include: str) -> List[str]:
        util = os.path.join(root, "tools", "util", "include")
        return [include] + ([util] if os.path.isdir(util) else [])

    missing = ", ".join(CUTLASS_REQUIRED_HEADERS)
    include = os.environ.get("FASTRES_CUTLASS_INCLUDE", "").strip()
    if include:
        if complete(include):
            return [include], f"FASTRES_CUTLASS_INCLUDE={include}"
        return None, f"FASTRES_CUTLASS_INCLUDE={include} lacks one of {missing}"
    root = os.environ.get("CUTLASS_PATH", "").strip()
    if root:
        if complete(os.path.join(root, "include")):
            return with_util(root, os.path.join(root, "include")), f"CUTLASS_PATH={root}"
        return None, f"CUTLASS_PATH={root} lacks include/ with {missing}"
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None, (
            "CUTLASS not found: pip install nvidia-cutlass (a build requirement), or set "
            "CUTLASS_PATH / FASTRES_CUTLASS_INCLUDE"
        )
    for base in spec.submodule_search_locations:
        root = os.path.join(base, "source")
        if complete(os.path.join(root, "include")):
            return with_util(root, os.path.join(root, "include")), f"the nvidia-cutlass package at {root}"
    return None, f"the nvidia-cutlass package at {list(spec.submodule_search_locations)} lacks {missing}"


CUTLASS_INCLUDE_DIRS, CUTLASS_WHY = find_cutlass() if WITH_CUDA else (None, "no CUDA build")
WITH_CUTLASS = CUTLASS_INCLUDE_DIRS is not None


def hopper_arch_list(arch_list: str) -> str:
    """TORCH_CUDA_ARCH_LIST with each plain ``9.0`` entry as ``9.0a``, ';'-separated.

    ``9.0a`` (sm_90a: WGMMA, setmaxnreg) is what the Hopper conv kernels need;
    its machine code runs on compute capability 9.0 exactly, which is every
    Hopper GPU, so nothing that ran with ``9.0`` is lost. ``9.0+PTX`` stays.
    """
    entries = [e for e in re.split(r"[;\s]+", arch_list.strip()) if e]
    return ";".join("9.0a" if e == "9.0" else e for e in entries)


if WITH_CUDA:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = CUDA_HOME
    # Without a list, torch compiles for the GPUs it sees, and fails with none.
    os.environ["TORCH_CUDA_ARCH_LIST"] = hopper_arch_list(
        os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_CUDA_ARCH_LIST
    )
WITH_SM90 = WITH_CUTLASS and "9.0a" in (os.environ.get("TORCH_CUDA_ARCH_LIST") or "").split(";")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# ----------------------------------------------------------------------------
# Sources, include directories, flags.
# ----------------------------------------------------------------------------


def collect_sources(with_cuda: bool, with_cutlass: bool, with_sm90: bool) -> List[str]:
    """csrc/**/*.cpp (+ csrc/**/*.cu with CUDA), relative to setup.py, sorted.

    Without CUDA, everything under csrc/cuda/ is left out; without CUTLASS,
    csrc/cuda/conv_* (the fused convolution); without a 9.0a architecture,
    csrc/cuda/conv_bn_act_sm90* (its Hopper kernels).
    """

    def rel_glob(pattern: str) -> List[str]:
        return [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)]

    sources = rel_glob(os.path.join(CSRC, "**", "*.cpp"))
    if with_cuda:
        sources += rel_glob(os.path.join(CSRC, "**", "*.cu"))
    else:
        sources = [s for s in sources if not s.startswith(CUDA_SUBDIR + os.sep)]
    if not with_cutlass:
        sources = [s for s in sources if not s.startswith(CUTLASS_SOURCES)]
    if not with_sm90:
        sources = [s for s in sources if not s.startswith(SM90_SOURCES)]
    return sorted(sources)


def nvidia_wheel_include_dirs() -> List[str]:
    """Header dirs of the nvidia-* pip wheels torch depends on (cuBLAS, cuSPARSE...).

    ATen/cuda/CUDAContext.h includes cublas_v2.h and cusparse.h, which a bare
    toolkit may lack. cu13 wheels ship site-packages/nvidia/cu13/include (cu12:
    nvidia/cu12/include, older: one dir per library).
    """
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    major = (torch.version.cuda or "").split(".")[0]
    dirs: List[str] = []
    for base in spec.submodule_search_locations:
        preferred = [f"cu{major}"] if major else []
        others = ["cu13", "cu12"]
        for sub in preferred + [o for o in others if o not in preferred]:
            d = os.path.join(base, sub, "include")
            if os.path.isdir(d):
                dirs.append(d)
                break
        for lib in ("cublas", "cusparse", "cusolver", "curand", "cufft"):
            d = os.path.join(base, lib, "include")
            if os.path.isdir(d):
                dirs.append(d)
    return dirs


def cuda_include_dirs(cuda_home: str) -> List[str]:
    """Include dirs of the CUDA build, in search order.

    The toolkit's own include dir comes first, so that its headers win over the
    copies in the nvidia wheels, which only fill in what the toolkit lacks.
    Third-party header libraries come last: CUTLASS (``find_cutlass``) when found.
    """
    return [os.path.join(cuda_home, "include"), *nvidia_wheel_include_dirs(), *(CUTLASS_INCLUDE_DIRS or [])]


def arch_list_token(arch_list: str) -> str:
    """TORCH_CUDA_ARCH_LIST as one preprocessor token: "8.0;8.6+PTX" -> "8.0_8.6+PTX".

    bindings.cpp stringizes it and turns '_' back into ' '. A token needs no
    quoting, so it passes unchanged through ninja, the shell, gcc and nvcc.
    """
    entries = [e for e in re.split(r"[;\s]+", arch_list.strip()) if e]
    safe = [re.sub(r"[^A-Za-z0-9.+]", "", e) for e in entries]
    return "_".join(e for e in safe if e) or "unknown"


def limited_api_tag() -> Optional[str]:
    """The CPython stable-ABI tag matching the Py_LIMITED_API torch compiles with.

    torch >= 2.6 supports py_limited_api (bindings.cpp uses only the limited C
    API and no pybind11), so one wheel serves every CPython it supports.
    """
    if tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2]) < (2, 6):
        return None
    from torch.utils import cpp_extension

    hexversion = getattr(cpp_extension, "min_supported_cpython", "0x03090000")
    value = int(hexversion, 16)
    return f"cp{value >> 24}{(value >> 16) & 0xFF}"


def get_extension():
    py_limited = limited_api_tag()
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    # No -std flag: BuildExtension adds the standard this torch's headers need
    # (c++17 for older torch; c++20 for recent torch, whose c10 headers use
    # operator<=>). The fastres sources themselves need only C++17.
    # -fopenmp: the CPU kernels (csrc/cpu/) run at::parallel_for, whose OpenMP
    # region is compiled into them; libgomp.so.1 resolves to the one torch loaded.
    # -ffp-contract=off: their fp32 math rounds each operation, as the reference.
    cxx_flags = [*opt, "-fopenmp", "-ffp-contract=off"]
    define_macros = []
    include_dirs = [os.path.join(ROOT, CSRC)]
    if WITH_CUDA:
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        # No --use_fast_math: exp, division and rounding must match PyTorch's kernels.
        nvcc_flags = [*opt, "--expt-relaxed-constexpr", "-lineinfo"]
        if DEBUG:
            nvcc_flags.append("-G")
        define_macros += [("FASTRES_WITH_CUDA", "1"), ("FASTRES_CUDA_ARCH_LIST", arch_list_token(arch_list))]
        if WITH_CUTLASS:
            define_macros.append(("FASTRES_WITH_CUTLASS", "1"))
        if WITH_SM90:
            define_macros.append(("FASTRES_WITH_SM90", "1"))
        include_dirs += cuda_include_dirs(CUDA_HOME)
        _log(f"building fastres._C as a CUDAExtension with CUDA kernels ({WHY}; "
             f"TORCH_CUDA_ARCH_LIST={arch_list})")
        if WITH_CUTLASS:
            _log(f"building the CUTLASS conv kernels (conv_bn_act_cuda) with CUTLASS from {CUTLASS_WHY}")
            _log("building the Hopper (sm_90a) conv kernels" if WITH_SM90 else
                 "building WITHOUT the Hopper conv kernels: TORCH_CUDA_ARCH_LIST has no 9.0/9.0a entry")
        else:
            _log(f"building WITHOUT the conv kernels (conv_bn_act_cuda): {CUTLASS_WHY}")
        extension, extra_compile_args = CUDAExtension, {"cxx": cxx_flags, "nvcc": nvcc_flags}
    else:
        _log(f"building fastres._C as a C++-only CppExtension, without CUDA kernels ({WHY})")
        extension, extra_compile_args = CppExtension, {"cxx": cxx_flags}
    return (
        extension(
            "fastres._C",
            collect_sources(WITH_CUDA, WITH_CUTLASS, WITH_SM90),
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
            py_limited_api=py_limited is not None,
        ),
        py_limited,
    )


EXTENSION, PY_LIMITED_TAG = get_extension()

setup(
    packages=find_packages(include=["fastres", "fastres.*"]),
    ext_modules=[EXTENSION],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": PY_LIMITED_TAG}} if PY_LIMITED_TAG else {},
)
