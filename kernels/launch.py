"""Launching a compiled Triton kernel again without Triton's per-call argument binding.

``kernel[grid](*args, **meta)`` binds and specialises every argument on every call (about 60 µs of
host time for the block-sparse kernel's ~50 arguments on the H200, more than a small kernel's GPU
time). A call whose arguments specialise the same way runs the same compiled kernel, so
:class:`Relauncher` keeps the kernel Triton compiled for a key that is at least as fine as Triton's
own (every integer by value, every tensor by dtype and 16-byte alignment, every tensor descriptor
by all of its fields, the constexprs, the device) and launches it directly. The first call of a
key, calls while a launch hook is active (profilers), Triton versions before 3.3 (whose launcher took
a different argument list) or without ``triton.knobs``, and the interpreter all go through
``kernel[grid]`` unchanged.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

__all__ = ["Relauncher", "supported"]

_MAX_KEYS = 256  # compiled kernels kept per Relauncher; beyond it the oldest is forgotten


def supported() -> bool:
    """Whether this Triton launches a compiled kernel with the bound arguments (3.3 and later) and
    keeps its launch hooks in ``triton.knobs``."""
    import triton

    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 3) and importlib.util.find_spec("triton.knobs") is not None


def _spec(arg: Any) -> Any:
    """What Triton may specialise ``arg`` on, or finer."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return arg if not isinstance(arg, float) else float  # floats: by type (fp32 scalars)
    base = getattr(arg, "base", None)  # a TensorDescriptor: its base tensor and every field
    if isinstance(base, torch.Tensor):
        return (type(arg), _spec(base), tuple(arg.shape), tuple(arg.strides), tuple(arg.block_shape),
                getattr(arg, "padding", None))
    raise TypeError(f"Relauncher: no specialisation rule for {type(arg).__name__}")


class Relauncher:
    """``kernel[grid](*args, **meta)`` with the compiled kernel remembered per specialisation key.
    ``args``: the kernel's parameters before its constexprs, in order; ``meta``: the constexprs and
    launch options (num_warps, num_stages), by name."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self._compiled: dict[tuple, tuple[Any, tuple[str, ...]]] = {}
        self._direct: bool | None = None  # decided at the first launch (imports triton)
        self.relaunched = 0  # launches that skipped Triton's binding

    def __call__(self, grid: tuple[int, int], args: tuple, meta: dict[str, Any], device: torch.device,
                 key: tuple | None = None) -> Any:
        """Launch; returns the compiled kernel (registers, spills, metadata), None when interpreted.
        ``key``: the caller's specialisation key, when it knows one at least as fine as Triton's
        that is cheaper to make than reading every argument (``KernelCall``); the device and
        constexprs are added to it."""
        if self._direct is None:
            self._direct = device.type == "cuda" and supported()
        if not self._direct:
            return self.kernel[grid](*args, **meta)
        enter, leave = _launch_hooks()
        if _active(enter) or _active(leave):
            return self.kernel[grid](*args, **meta)
        key = (device.index, tuple(meta.items()), tuple(map(_spec, args)) if key is None else key)
        entry = self._compiled.get(key)
        if entry is None:
            compiled = self.kernel[grid](*args, **meta)
            if len(self._compiled) >= _MAX_KEYS:
                del self._compiled[next(iter(self._compiled))]
            # Triton launches with every parameter bound: ours, then the constexprs in parameter order.
            self._compiled[key] = compiled, tuple(self.kernel.arg_names[len(args):])
            return compiled
        compiled, constexprs = entry
        stream = _raw_stream(device.index)
        compiled.run(grid[0], grid[1], 1, stream, compiled.function, compiled.packed_metadata, None, enter, leave,
                     *args, *(meta[name] for name in constexprs))
        self.relaunched += 1
        return compiled


def _raw_stream(index: int) -> int:
    """The current CUDA stream's handle on device ``index`` (what inductor's launchers pass)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(index) if raw is not None else torch.cuda.current_stream(index).cuda_stream


def _launch_hooks() -> tuple[Any, Any]:
    """Triton's launch hooks, passed on as its own launch passes them."""
    from triton import knobs

    return knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook


def _active(hook: Any) -> bool:
    """Whether a launch hook would do something (a profiler's): None, or a hook chain without calls
    (Triton 3.5 and later), does nothing."""
    return hook is not None and bool(getattr(hook, "calls", True))
