"""Build llama.cpp's `llama-bench` and `llama-quantize` from the llama.cpp sources bundled in the llama-cpp-python
sdist on PyPI, cached outside the repository, and print the folder that holds the two programs.

    python benchmarks/build_llama_cpp.py [--cache ~/.cache/phi3v/llama.cpp] [--version 0.3.36] [--jobs 2]

Steps (each skipped when its result is already in the cache): `pip download --no-deps --no-binary :all:
llama-cpp-python[==VERSION]` into CACHE/sdist, unpack its vendor/llama.cpp, configure with CMake (Release,
GGML_NATIVE=ON so the build uses this CPU's instruction set, no CURL, static libraries) and build the two targets.
The last line printed is the bin folder; benchmarks/llama_bench.py finds the programs there by itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

DEFAULT_CACHE = Path.home() / ".cache" / "phi3v" / "llama.cpp"
TARGETS = ("llama-bench", "llama-quantize")


def bin_dir(cache: Path = DEFAULT_CACHE) -> Path:
    return cache / "build" / "bin"


def find_tools(cache: Path = DEFAULT_CACHE) -> dict[str, str] | None:
    """{target: path} for the two programs, from the cache or else PATH; None when either is missing."""
    found = {}
    for t in TARGETS:
        p = bin_dir(cache) / t
        found[t] = str(p) if p.exists() else shutil.which(t)
    return found if all(found.values()) else None


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def download(cache: Path, version: str | None) -> Path:
    sdists = sorted((cache / "sdist").glob("llama_cpp_python-*.tar.gz"))
    if version:
        sdists = [s for s in sdists if s.name == f"llama_cpp_python-{version}.tar.gz"]
    if not sdists:
        spec = f"llama-cpp-python=={version}" if version else "llama-cpp-python"
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec,
             "-d", str(cache / "sdist")])
        return download(cache, version)
    return sdists[-1]


def unpack(sdist: Path, cache: Path) -> Path:
    src = cache / "src" / sdist.name.removesuffix(".tar.gz")
    llama = src / "vendor" / "llama.cpp"
    if not (llama / "CMakeLists.txt").exists():
        with tarfile.open(sdist) as tf:
            members = [m for m in tf.getmembers() if "/vendor/llama.cpp/" in m.name]
            tf.extractall(cache / "src", members=members, filter="data")
    return llama


def build(llama: Path, cache: Path, jobs: int) -> Path:
    out = cache / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    if not (out / "CMakeCache.txt").exists():
        run(["cmake", "-S", str(llama), "-B", str(out), *gen, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
             "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
             "-DGGML_OPENMP=ON"])
    run(["cmake", "--build", str(out), "--config", "Release", "-j", str(jobs), "--target", *TARGETS])
    return bin_dir(cache)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--version", default=None, help="llama-cpp-python version (default: the newest on PyPI)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args(argv)
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: install CMake and a C++ compiler to build llama.cpp")
    args.cache.mkdir(parents=True, exist_ok=True)
    sdist = download(args.cache, args.version)
    bins = build(unpack(sdist, args.cache), args.cache, args.jobs)
    for t in TARGETS:
        if not (bins / t).exists():
            raise SystemExit(f"the build finished without {bins / t}")
    print(f"llama.cpp from {sdist.name}: {', '.join(TARGETS)} in")
    print(bins)
    return 0


if __name__ == "__main__":
    sys.exit(main())
