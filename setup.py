"""Build of alphagrpo_serve and its native extension alphagrpo_serve._C.

Environment switches (all optional):
  ALPHAGRPO_SKIP_CUDA=1     build only the C++ CPU kernels even when torch has CUDA and nvcc exists.
  ALPHAGRPO_CUDA_ARCHS=...  semicolon list of CUDA archs, e.g. "80;90a" (default: chosen from the
                            nvcc version: 80 and 90a from CUDA 12.0 on, plus 100a from 12.8 on).
  MAX_JOBS=N                parallel compile jobs (read by torch's BuildExtension; default: all cores).
  ALPHAGRPO_DEBUG=1         -O0 -g, no optimisation (for debuggers and sanitizers).
  ALPHAGRPO_PTXAS_VERBOSE=1 print ptxas register/spill reports for every CUDA kernel.
  ALPHAGRPO_SKIP_EXTENSION=1 no native extension at all: the kernels run their PyTorch reference
                            implementations (packaging checks, machines without a compiler).

A CPU-only torch builds the CPU kernels only; a CUDA torch plus nvcc adds csrc/cuda/.

Every way of installing (editable, wheel, sdist) generates the gRPC stubs alphagrpo_serve/_proto
from protos/ first, with grpcio-tools from the build environment (a build requirement).
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


def link_args(platform=sys.platform):
    """The extension must share the process's libstdc++ with torch. A g++ that links libstdc++
    statically (seen on the GPU machine: CXX=/opt/gcc/bin/g++, GCC 13.3) gives the extension a second
    copy of iostreams whose locale nothing set up, and every error message that formatted an integer
    segfaulted. Naming the shared library by file comes before the compiler's own libraries, and the
    driver does not recognise it as the one to make static (a plain -lstdc++ did not survive that
    g++). check_shared_libstdcxx fails the build loudly if a compiler still gets round it."""
    return ["-l:libstdc++.so.6"] if platform.startswith("linux") else []


def check_shared_libstdcxx(path):
    """None if the built library `path` uses the shared libstdc++ (or this cannot be checked here:
    not Linux, no readelf/nm); else the reason, for the build to fail with."""
    if not sys.platform.startswith("linux") or not (shutil.which("readelf") and shutil.which("nm")):
        return None
    needed = subprocess.run(["readelf", "-d", path], capture_output=True, text=True).stdout
    defined = subprocess.run(["nm", "-C", "--defined-only", path], capture_output=True, text=True).stdout
    if "[libstdc++.so" in needed and "_M_insert<long>" not in defined:
        return None
    return (
        f"{path} carries its own static copy of libstdc++ (the C++ compiler, CXX={os.environ.get('CXX', 'c++')}, "
        "links it statically): loaded beside torch, its error messages crash the process. Build with a "
        "compiler that links libstdc++ dynamically, e.g. CC=gcc CXX=g++ (the system GCC)"
    )


def _nvcc_version(cuda_home):
    try:
        out = subprocess.check_output([os.path.join(cuda_home, "bin", "nvcc"), "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def cuda_archs(version):
    """The CUDA archs to build for, from ALPHAGRPO_CUDA_ARCHS or the nvcc version."""
    env = os.environ.get("ALPHAGRPO_CUDA_ARCHS")
    if env:
        return [a.strip() for a in env.replace(",", ";").split(";") if a.strip()]
    archs = ["80"]
    if version >= (12, 0):
        archs.append("90a")
    elif version >= (11, 8):
        archs.append("90")
    if version >= (12, 8):
        archs.append("100a")
    return archs


def _extensions():
    if _env_flag("ALPHAGRPO_SKIP_EXTENSION"):
        return []
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    debug = _env_flag("ALPHAGRPO_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # no-trapping-math and no-math-errno let GCC vectorise the kernels' compare-and-select loops and
    # math calls; neither reorders arithmetic, so results stay bit-for-bit those of the plain loops.
    cxx = opt + ["-fvisibility=hidden", "-fno-trapping-math", "-fno-math-errno"]
    link = link_args()
    with_cuda = (
        not _env_flag("ALPHAGRPO_SKIP_CUDA")
        and torch.version.cuda is not None
        and CUDA_HOME is not None
        and _nvcc_version(CUDA_HOME) is not None
    )
    if not with_cuda:
        return [
            CppExtension(
                "alphagrpo_serve._C",
                sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx},
                extra_link_args=link,
            )
        ]
    archs = cuda_archs(_nvcc_version(CUDA_HOME))
    gencode = []
    for arch in archs:
        gencode += [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    defines = ["-DALPHAGRPO_WITH_CUDA", f'-DALPHAGRPO_CUDA_ARCHS="{";".join(archs)}"']
    nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
    if _env_flag("ALPHAGRPO_PTXAS_VERBOSE"):
        nvcc.append("-Xptxas=-v")
    return [
        CUDAExtension(
            "alphagrpo_serve._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc + gencode + defines},
            extra_link_args=link,
        )
    ]


PROTO_PACKAGES = ["alphagrpo_serve._proto", "alphagrpo_serve._proto.alphagrpo", "alphagrpo_serve._proto.alphagrpo.v1"]


def generate_stubs():
    """alphagrpo_serve/_proto from protos/ (tools/gen_protos.py); fails loudly, naming what is missing."""
    import importlib.util

    if importlib.util.find_spec("grpc_tools") is None:
        raise RuntimeError(
            "alphagrpo-serve generates its gRPC stubs at build time with grpcio-tools, which the build "
            "environment lacks: `pip install 'grpcio-tools>=1.60'` first (with --no-build-isolation), "
            "or build with isolation (pyproject.toml lists it as a build requirement)"
        )
    subprocess.check_call([sys.executable, os.path.join(ROOT, "tools", "gen_protos.py")], stdout=subprocess.DEVNULL)


def _cmdclass():
    from setuptools.command.build_py import build_py
    from setuptools.command.develop import develop

    class BuildPyWithProtos(build_py):
        """Wheels (and sdists, when built): the stubs are generated, then packaged with the rest. The
        package list was found before they existed, so their packages are added here."""

        def run(self):
            generate_stubs()
            for pkg in PROTO_PACKAGES:
                if pkg not in self.packages:
                    self.packages.append(pkg)
            super().run()

    class DevelopWithProtos(develop):
        """Legacy editable installs (`setup.py develop`), which never run build_py."""

        def run(self):
            generate_stubs()
            super().run()

    cmds = {"build_py": BuildPyWithProtos, "develop": DevelopWithProtos}
    try:  # PEP 660 editable installs run build_py but ignore its failures: generate here, where they count
        from setuptools.command.editable_wheel import editable_wheel

        class EditableWheelWithProtos(editable_wheel):
            def run(self):
                generate_stubs()
                super().run()

        cmds["editable_wheel"] = EditableWheelWithProtos
    except ImportError:  # setuptools < 64: editable installs go through develop
        pass
    if not _env_flag("ALPHAGRPO_SKIP_EXTENSION"):
        from torch.utils.cpp_extension import BuildExtension

        class BuildExtensionChecked(BuildExtension.with_options(use_ninja=True)):
            def build_extension(self, ext):
                super().build_extension(ext)
                why = check_shared_libstdcxx(self.get_ext_fullpath(ext.name))
                if why:
                    raise RuntimeError(why)

        cmds["build_ext"] = BuildExtensionChecked
    return cmds


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it for cuda_archs
    setup(ext_modules=_extensions(), cmdclass=_cmdclass())
