import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension whose sources CMake compiles (CMakeLists.txt at the repo root), not setuptools."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt, putting the module where setuptools expects the extension.

    setuptools' build_ext first builds into build_lib (get_ext_fullpath), then for `pip install -e .`
    (editable_mode -> inplace) copies the file into the source package dir, dpag_engine/. Writing the
    module to exactly get_ext_fullpath() is therefore all both install modes need.
    """

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11  # a build requirement (pyproject.toml), so importable only here

        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        suffix = target.name[len(ext.name.rsplit(".", 1)[-1]):]  # e.g. .cpython-311-x86_64-linux-gnu.so
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        config = "Debug" if self.debug else "Release"

        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_temp),
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DDPAG_VERSION={self.distribution.get_version()}",
            # Name and place the module exactly as setuptools will look for it.
            f"-DPYTHON_MODULE_EXTENSION={suffix}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={target.parent}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_{config.upper()}={target.parent}",  # multi-config generators
        ]
        ninja = shutil.which("ninja")
        if ninja and "CMAKE_GENERATOR" not in os.environ:
            # Pin the ninja of this build: under build isolation each pip run has its own, and a
            # build/ cache left by an earlier run would otherwise point at one that no longer exists.
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        # Extra flags from the environment (e.g. -DCMAKE_CXX_COMPILER=clang++), as scikit-build reads them.
        configure += os.environ.get("CMAKE_ARGS", "").split()

        build = ["cmake", "--build", str(build_temp), "--config", config, "--target", "_C",
                 "--parallel", str(self.parallel or os.cpu_count() or 1)]

        subprocess.run(configure, check=True)
        subprocess.run(build, check=True)
        if not target.exists():
            raise RuntimeError(f"CMake finished but {target} was not produced")


setup(
    name="dpag_engine",
    version="0.1.0",
    description="Train and serve Action-Guided Diffusion Policies (DP-AG) on real robot arms",
    python_requires=">=3.11",  # zarr 3
    # The Triton kernels live in the top-level kernels/ folder but install as dpag_engine.kernels.
    packages=["dpag_engine", *(f"dpag_engine.{p}" for p in find_packages("dpag_engine")), "dpag_engine.kernels"],
    package_dir={"dpag_engine": "dpag_engine", "dpag_engine.kernels": "kernels"},
    # The C++ CPU runtime: csrc/ (core) + python/ (pybind11 bindings), built by CMake.
    ext_modules=[CMakeExtension("dpag_engine._C")],
    cmdclass={"build_ext": CMakeBuild},
    # torch is deliberately not pinned here: a bare `torch` requirement would pull a multi-GB CUDA
    # build onto a CPU machine. The Makefile installs the CPU wheel first where torch is missing.
    # Data formats and logging: pyarrow (LeRobot parquet), av (LeRobot video; its wheels bundle
    # FFmpeg with dav1d and SVT-AV1), h5py (robomimic), pillow (LeRobot image features),
    # tensorboard (train's event logs, on by default).
    install_requires=["torch>=2.4", "numpy<2.4", "zarr>=3", "pyyaml", "tqdm", "matplotlib",
                      "pyarrow>=15", "av>=14", "h5py>=3", "pillow", "tensorboard>=2.14"],
    extras_require={
        # ur_rtde is pinned: the emulator's handshake guard test is written against this exact client.
        "robot": ["ur_rtde==1.6.5"],
        "export": ["onnx>=1.16", "onnxruntime>=1.18"],
        "pusht": ["gym-pusht>=0.1.8"],
        "wandb": ["wandb"],  # train.wandb=true (offline runs)
        # Cameras and teleoperation devices: each reached through its own library.
        "cameras": ["opencv-python-headless>=4.8"],
        "realsense": ["pyrealsense2>=2.54"],
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "diffusers", "ur_rtde==1.6.5", "onnx>=1.16",
                 "onnxruntime>=1.18", "gym-pusht>=0.1.8", "opencv-python-headless>=4.8",
                 "scipy",  # an independent oracle for rotations (tests/test_spec.py)
                 "triton==3.6.0; platform_machine=='x86_64'"],
    },
)
