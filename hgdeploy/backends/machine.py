"""What this machine has for the GPU backends: an NVIDIA driver and device, TensorRT.

Asked of the driver and the libraries themselves, never of torch (a CPU build of torch reports no
GPU even when there is one, and the deploy side does not need torch at all).
"""

from __future__ import annotations

import ctypes
import functools

NO_GPU = "no CUDA GPU visible (no NVIDIA driver library libcuda, or it reports no device)"
GPU_INSTALL_HINT = "pip install 'hgdeploy[gpu]'"


@functools.lru_cache(maxsize=1)
def cuda_gpu_name() -> str | None:
    """Name of CUDA device 0 from the NVIDIA driver (libcuda), None when no driver or no device.

    The driver API answers whatever else is installed; polygraphy.cuda wraps the runtime without a
    device-name call.
    """
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
            break
        except OSError:
            continue
    else:
        return None
    count, device = ctypes.c_int(0), ctypes.c_int(0)
    name = ctypes.create_string_buffer(256)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return None
    if cuda.cuDeviceGet(ctypes.byref(device), 0) != 0 or cuda.cuDeviceGetName(name, len(name), device) != 0:
        return None
    return name.value.decode(errors="replace")


def tensorrt_version() -> str | None:
    """trt.__version__, or None when TensorRT is not installed (other import failures propagate)."""
    try:
        import tensorrt as trt
    except ModuleNotFoundError as exc:
        if exc.name == "tensorrt":
            return None
        raise
    return trt.__version__


# TensorRT's runtime library under the sonames TensorRT 10 and 11 ship.
NVINFER = ("libnvinfer.so.10", "libnvinfer.so.11", "nvinfer_10.dll")


def missing_tensorrt_library() -> str | None:
    """The TensorRT library that does not load (ONNX Runtime's TensorRT provider needs it), or None.

    The tensorrt Python package loads its own copy when imported, so that is tried first; then the
    system's library path.
    """
    try:
        import tensorrt  # noqa: F401 - importing it loads libnvinfer into the process
    except (ImportError, OSError):
        pass
    for lib in NVINFER:
        try:
            ctypes.CDLL(lib)
            return None
        except OSError:
            continue
    return NVINFER[0]
