"""The extension's build: ops registered, CUDA sources compile with plain nvcc for sm_90a, the
torch glue of the CUDA path type-checks, and the arch selection of setup.py."""

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from alphagrpo_serve import kernels as K

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_HOME = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
NVCC = (
    os.path.join(CUDA_HOME, "bin", "nvcc")
    if os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    else shutil.which("nvcc")
)
DOUBLE_KERNEL = re.compile(r"Id(Li\d+E|Lb[01]E)*E")  # Itanium mangling of a <double, ...> instantiation
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
OPS = [
    "flow_sde_step",
    "flow_sde_logprob",
    "flow_sde_logprob_backward",
    "grpo_advantages",
    "grpo_token_loss",
    "grpo_linear_token_loss",
    "flow_grpo_loss",
]


def test_extension_loads_and_registers_every_op():
    info = K.build_info()
    assert info["loaded"], f"alphagrpo_serve._C failed to load: {info['error']}"
    for op in OPS:
        assert hasattr(torch.ops.alphagrpo, op), f"torch.ops.alphagrpo.{op} is not registered"
    if info["with_cuda"]:
        assert info["cuda_archs"], "a CUDA build records its archs"


def test_there_are_cuda_sources():
    assert len(CU_FILES) >= 2, CU_FILES


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("cu", CU_FILES, ids=os.path.basename)
def test_cu_compiles_with_plain_nvcc_for_sm90a(cu, tmp_path):
    cmd = [
        NVCC,
        "-c",
        "-std=c++17",
        "--expt-relaxed-constexpr",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-I",
        os.path.join(ROOT, "csrc", "include"),
        cu,
        "-o",
        str(tmp_path / "k.o"),
        "-Xptxas",
        "-v",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed:\n{proc.stderr[-4000:]}"
    # The float32 and 16-bit instantiations must not spill to local memory (float64 ones, used for
    # gradcheck-grade checks rather than speed, may).
    spilled = []
    for block in proc.stderr.split("Compiling entry function")[1:]:
        name = block.split("'")[1]
        if " 0 bytes spill stores" not in block and not DOUBLE_KERNEL.search(name):
            spilled.append(name)
    assert not spilled, f"kernels spill registers: {spilled}"


@pytest.mark.skipif(NVCC is None, reason="CUDA headers not installed")
def test_cuda_glue_type_checks(tmp_path):
    """csrc/cuda/*.cpp (torch glue) against torch's headers and the CUDA headers. A CPU-only torch
    wheel lacks one generated header (c10/cuda/impl/cuda_cmake_macros.h); the test writes it."""
    shim = tmp_path / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    tinc = os.path.join(os.path.dirname(torch.__file__), "include")
    cuda_inc = os.path.join(CUDA_HOME, "include")
    for src in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))) + [
        os.path.join(ROOT, "csrc", "bindings.cpp")
    ]:
        cmd = [
            "g++",
            "-std=c++20",
            "-fsyntax-only",
            "-DALPHAGRPO_WITH_CUDA",
            '-DALPHAGRPO_CUDA_ARCHS="90a"',
            "-I",
            os.path.join(ROOT, "csrc", "include"),
            "-I",
            str(tmp_path),
            "-I",
            tinc,
            "-I",
            os.path.join(tinc, "torch", "csrc", "api", "include"),
            "-I",
            cuda_inc,
            "-I",
            __import__("sysconfig").get_paths()["include"],
            src,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{os.path.basename(src)} does not compile:\n{proc.stderr[-4000:]}"


def _load_setup():
    spec = importlib.util.spec_from_file_location("agrpo_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not all(shutil.which(t) for t in ("g++", "readelf", "nm")),
    reason="needs Linux with g++, readelf and nm",
)
def test_extension_shares_the_process_libstdcxx(tmp_path):
    """A g++ that links libstdc++ statically (the GPU machine's) gave the extension its own copy of
    iostreams and every integer in an error message segfaulted there. A library linked with
    `-static-libstdc++` is caught by the build's check (the control); with setup.py's link
    arguments added it needs the shared libstdc++ and passes; so does the built extension."""
    setup = _load_setup()
    src = tmp_path / "fmt.cpp"
    src.write_text(
        "#include <sstream>\n#include <string>\nstd::string f(long v) { std::ostringstream s; s << v; return s.str(); }\n"
    )
    static = ["g++", "-shared", "-fPIC", "-static-libstdc++", str(src)]
    subprocess.run(static + ["-o", str(tmp_path / "control.so")], check=True)
    subprocess.run(static + setup.link_args("linux") + ["-o", str(tmp_path / "fixed.so")], check=True)
    why = setup.check_shared_libstdcxx(str(tmp_path / "control.so"))
    assert why and "static copy of libstdc++" in why and "CXX=g++" in why
    assert setup.check_shared_libstdcxx(str(tmp_path / "fixed.so")) is None
    needed = subprocess.run(["readelf", "-d", str(tmp_path / "fixed.so")], capture_output=True, text=True).stdout
    assert "Shared library: [libstdc++.so.6]" in needed
    assert setup.check_shared_libstdcxx(importlib.util.find_spec("alphagrpo_serve._C").origin) is None


def test_cuda_arch_selection(monkeypatch):
    setup = _load_setup()
    monkeypatch.delenv("ALPHAGRPO_CUDA_ARCHS", raising=False)
    assert setup.cuda_archs((11, 8)) == ["80", "90"]
    assert setup.cuda_archs((12, 4)) == ["80", "90a"]
    assert setup.cuda_archs((13, 0)) == ["80", "90a", "100a"]
    monkeypatch.setenv("ALPHAGRPO_CUDA_ARCHS", "90a; 80")
    assert setup.cuda_archs((13, 0)) == ["90a", "80"]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_build_produces_a_working_module(tmp_path):
    """The alternative CMake build compiles the same sources into a module whose ops work."""
    build = tmp_path / "build"
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    cfg = subprocess.run(
        ["cmake", "-S", ROOT, "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}", "-DALPHAGRPO_WITH_CUDA=OFF"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert cfg.returncode == 0, cfg.stdout[-3000:] + cfg.stderr[-3000:]
    bld = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True, timeout=900, env=env)
    assert bld.returncode == 0, bld.stdout[-3000:] + bld.stderr[-3000:]
    (so,) = glob.glob(str(build / "_C*.so"))
    # a fresh interpreter that loads only the CMake-built module (two registrations would clash)
    code = (
        "import importlib.util, torch\n"
        f"spec = importlib.util.spec_from_file_location('alphagrpo_serve._C', {so!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "r = torch.tensor([[1.0, 2.0, 3.0]])\n"
        "a = torch.ops.alphagrpo.grpo_advantages(r, 'none', 1e-4, None)\n"
        "assert a.tolist() == [[-1.0, 0.0, 1.0]], a\n"
        "print('ok', mod.with_cuda)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ok False" in run.stdout, run.stdout + run.stderr
