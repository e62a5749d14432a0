"""Run regla's Metal kernels on the CPU: the same kernel text, compiled by g++.

``mx.fast.metal_kernel`` takes only a kernel *body*; MLX writes the ``[[kernel]]``
signature around it (``write_signature`` in MLX's ``mlx/backend/metal/custom_kernel.cpp``
/ ``mlx/fast.cpp``). :func:`mlx_kernel_source` writes the same text from the same inputs:
input and output buffers in order, ``*_shape`` / ``*_strides`` / ``*_ndim`` buffers when
the body mentions them, template parameters, and the position attributes the body
mentions. The result is compiled against ``metal_emu.h`` (Metal types and built-ins as C++17),
with a small launcher that runs the grid; see that header for the execution model (one
fiber per GPU thread, real barriers and simdgroup exchanges, seeded random interleaving)
and for what it rejects. Before compiling, :func:`strict_source` rewrites the address-space
qualified types of the text into the header's checked types (``device T*`` ->
``emu::ptr<emu::kDevice, T>``, ``threadgroup T x[N];`` -> ``EMU_TG(T, x, N)``), so that
address spaces stay distinct types and every buffer access is bounds-checked; any
qualified form it does not know is left to fail compilation.

The scheduler, fibers and launch loop live in ``runtime.cpp``, compiled once into a shared
library that every kernel library links to, so a kernel's translation unit is only its
text and the light header (about 1 s of g++ each). Builds are cached under
``tests/metal_emu/_build/`` keyed by a hash of the generated source, the emulator sources
and the compiler flags.

:class:`EmulatedMetalKernel` stands in for ``mx.fast.metal_kernel`` (:func:`emulated_metal`
puts it in place), so ``regla_mlx.kernels`` and ``regla_mlx.ops`` run their own launch code
with the emulator under them; :func:`emulated_gla` is that for NumPy inputs.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BUILD_DIR = HERE / "_build"
CXX = os.environ.get("CXX", "g++")
CXXFLAGS = [
    "-std=c++17", "-O2", "-fPIC", "-shared", "-pthread",
    # Metal attributes ([[kernel]], [[buffer(i)]], [[thread_position_in_grid]], ...) are
    # unknown to g++ and ignored, which is what we want.
    "-Wno-attributes", "-Wno-unknown-pragmas",
    # _longjmp between fiber stacks trips glibc's longjmp_chk.
    "-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=0",
    # Metal has no double: an unsuffixed literal such as 0.5 is a float there.
    "-fsingle-precision-constant",
    # A register read before it is written is undefined on a GPU as well.
    "-Werror=uninitialized",
]

# MLX's get_type_string for the dtypes the kernels see.
TYPE_STRING = {
    "float32": "float", "float16": "float16_t", "bfloat16": "bfloat16_t",
    "int32": "int32_t", "uint32": "uint32_t", "int64": "int64_t", "uint64": "uint64_t",
    "bool": "bool",
}
# Order as in MLX's metal_kernel: an attribute is declared when its name occurs
# anywhere in the body (plain substring search).
METAL_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]
# How the launcher supplies each attribute from emu::Attrs.
ATTRIBUTE_VALUE = {
    "dispatch_quadgroups_per_threadgroup": "a.quadgroups_per_threadgroup",
    "dispatch_simdgroups_per_threadgroup": "a.simdgroups_per_threadgroup",
    "dispatch_threads_per_threadgroup": "a.threads_per_threadgroup",
    "grid_origin": "uint3(0, 0, 0)",
    "grid_size": "a.threads_per_grid",
    "thread_execution_width": "32u",
    "threads_per_simdgroup": "32u",
}
MAX_CONSTANT_ARRAY_SIZE = 8  # smaller inputs go to the constant address space


class EmulationError(RuntimeError):
    pass


def _tstr(dtype: str) -> str:
    return TYPE_STRING[dtype]


def _template_value(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    return _tstr(v)


def _template_type(v) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    return "typename"


def mlx_kernel_source(spec: dict, inputs: list, output_dtypes: list[str]):
    """The kernel name and full Metal source MLX generates for this launch.

    ``inputs`` are (dtype name, shape) pairs in ``spec["input_names"]`` order.
    Returns ``(kernel_name, source, attributes, shape_infos)``.
    """
    body, header = spec["source"], spec.get("header", "")
    names, out_names = spec["input_names"], spec["output_names"]
    template = spec.get("template", [])
    shape_infos = [(n + "_shape" in body, n + "_strides" in body, n + "_ndim" in body) for n in names]
    attributes = [(a, t) for a, t in METAL_ATTRIBUTES if a in body]

    kernel_name = "custom_kernel_" + spec["name"]
    template_def = ""
    if template:
        template_def = "<" + ", ".join(_template_value(v) for _, v in template) + ">"
        template_hash = re.sub(r"<|>|(, )", "_", template_def)[:-1]
        kernel_name += "_" + template_hash
    for dt, shape in inputs:
        size = int(np.prod(shape)) if len(shape) else 1
        kernel_name += "_" + _tstr(dt)
        if len(shape) == 0:
            kernel_name += "s"
        elif size < MAX_CONSTANT_ARRAY_SIZE:
            kernel_name += "c"
    for dt in output_dtypes:
        kernel_name += "_" + _tstr(dt)

    src = header
    if template:
        src += "template <" + ", ".join(f"{_template_type(v)} {n}" for n, v in template) + ">\n"
    src += "[[kernel]] void " + kernel_name + "(\n"
    index = 0
    for i, (dt, shape) in enumerate(inputs):
        size = int(np.prod(shape)) if len(shape) else 1
        location = "constant" if size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if len(shape) == 0 else "*"
        src += f"  const {location} {_tstr(dt)}{ref} {names[i]} [[buffer({index})]],\n"
        index += 1
        if len(shape) > 0:
            has_shape, has_strides, has_ndim = shape_infos[i]
            if has_shape:
                src += f"  const constant int* {names[i]}_shape [[buffer({index})]],\n"
                index += 1
            if has_strides:
                src += f"  const constant int64_t* {names[i]}_strides [[buffer({index})]],\n"
                index += 1
            if has_ndim:
                src += f"  const constant int& {names[i]}_ndim [[buffer({index})]],\n"
                index += 1
    for i, dt in enumerate(output_dtypes):
        src += f"  device {_tstr(dt)}* {out_names[i]} [[buffer({index})]]"
        # MLX's own test compares the running buffer index with the number of
        # arguments; reproduced as is.
        if index < len(inputs) + len(out_names) - 1 or attributes:
            src += ",\n"
        else:
            src += ") {\n"
        index += 1
    for j, (a, t) in enumerate(attributes):
        src += f"  {t} {a} [[{a}]]"
        src += ",\n" if j < len(attributes) - 1 else ") {\n"
    src += body
    src += "\n}\n"
    if template:
        full = kernel_name + template_def
        src += f'\ntemplate [[host_name("{kernel_name}")]] [[kernel]] decltype({full}) {full};\n'
    return kernel_name, src, attributes, shape_infos, template_def


# `[const] device|threadgroup|constant [const] T *|&` (T a name, maybe qualified or templated).
_QUALIFIED = re.compile(
    r"\b(?:(const)\s+)?(device|threadgroup|constant|thread)\s+(?:(const)\s+)?"
    r"([A-Za-z_][\w:]*(?:\s*<[^<>;()]*>)?)\s*([*&])")
# `threadgroup T name[N];` (one dimension).
_TG_DECL = re.compile(r"\bthreadgroup\s+([A-Za-z_][\w:]*(?:\s*<[^<>;()]*>)?)\s+([A-Za-z_]\w*)\s*\[([^\[\]]+)\]\s*;")
_SPACE = {"device": "emu::kDevice", "threadgroup": "emu::kThreadgroup", "constant": "emu::kConstant"}


def strict_source(src: str) -> str:
    """Metal text with its address-space qualified types replaced by the emulator's
    checked ones (see metal_emu.h). Forms not matched here keep their qualifier, which
    the header defines to an error, so they fail to compile instead of passing unchecked."""
    src = _TG_DECL.sub(lambda m: f"EMU_TG({m.group(1)}, {m.group(2)}, ({m.group(3)}));", src)

    def qualified(m):
        const = bool(m.group(1) or m.group(3))
        space, typ, kind = m.group(2), m.group(4), m.group(5)
        t = ("const " if const else "") + typ
        if space == "thread":
            return t + kind
        if kind == "&":
            # a read-only scalar argument (`const constant float& scale`): a plain value
            return t + "&" if (space == "constant" and const) else m.group(0)
        return f"emu::ptr<{_SPACE[space]}, {t}>"

    return _QUALIFIED.sub(qualified, src)


def _launcher(kernel_name, template_def, spec, inputs, output_dtypes, attributes, shape_infos):
    args, slot = [], 0

    def buf(space, t, name):
        nonlocal slot
        args.append(f'emu::buffer<{space}, {t}>(bufs[{slot}], sizes[{slot}], "{name}")')
        slot += 1

    for i, (dt, shape) in enumerate(inputs):
        t = _tstr(dt)
        name = spec["input_names"][i]
        size = int(np.prod(shape)) if len(shape) else 1
        if len(shape) == 0:
            args.append(f"*(const {t}*)bufs[{slot}]")
            slot += 1
        else:
            buf("emu::kConstant" if size < MAX_CONSTANT_ARRAY_SIZE else "emu::kDevice", f"const {t}", name)
        if len(shape) > 0:
            has_shape, has_strides, has_ndim = shape_infos[i]
            if has_shape:
                buf("emu::kConstant", "const int", name + "_shape")
            if has_strides:
                buf("emu::kConstant", "const int64_t", name + "_strides")
            if has_ndim:
                args.append(f"*(const int*)bufs[{slot}]")
                slot += 1
    for i, dt in enumerate(output_dtypes):
        buf("emu::kDevice", _tstr(dt), spec["output_names"][i])
    for a, _ in attributes:
        args.append(ATTRIBUTE_VALUE.get(a, "a." + a))
    call = kernel_name + template_def + "(\n        " + ",\n        ".join(args) + ")"
    return f"""
namespace {{
struct LaunchArgs {{
  void** bufs;
  const unsigned long* sizes;
}};
void run_thread(void* ctx, const emu::Attrs& a) {{
  void** bufs = static_cast<LaunchArgs*>(ctx)->bufs;
  const unsigned long* sizes = static_cast<LaunchArgs*>(ctx)->sizes;
  (void)sizes;
  {call};
}}
}}  // namespace

extern "C" int regla_emu_launch(void** bufs, const unsigned long* sizes, const unsigned* grid, const unsigned* tg,
                                unsigned seed, int workers, char* err, int errlen) {{
  LaunchArgs args{{bufs, sizes}};
  return emu::launch(grid, tg, seed, workers, run_thread, &args, err, errlen);
}}
"""


_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL] = {}


def _compile(source: Path, out: Path, extra: list[str]):
    """g++ ``source`` into the shared library ``out`` (written to a temporary name, then
    renamed, so a concurrent or interrupted build never leaves a half-written library)."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=BUILD_DIR)
    os.close(fd)
    cmd = [CXX, *CXXFLAGS, "-I", str(HERE / "include"), "-I", str(HERE), str(source), *extra, "-o", tmp]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        os.unlink(tmp)
        errors = "\n".join(ln for ln in r.stderr.splitlines() if "error" in ln)
        raise EmulationError(f"the kernel does not compile ({source}):\n{errors[:4000]}\n\n{r.stderr[-4000:]}")
    os.replace(tmp, out)


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join([*parts, CXX, *CXXFLAGS]).encode()).hexdigest()[:24]


def _runtime() -> Path:
    """The runtime library (runtime.cpp: fibers, scheduler, launch loop), built once."""
    core = (HERE / "emu_core.h").read_text()
    so = BUILD_DIR / f"runtime_{_key((HERE / 'runtime.cpp').read_text(), core)}.so"
    if not so.exists():
        BUILD_DIR.mkdir(exist_ok=True)
        _compile(HERE / "runtime.cpp", so, [])
    return so


def compile_source(full_source: str) -> ctypes.CDLL:
    """Compile (or reuse) a kernel's translation unit, linked to the runtime; returns the
    loaded library."""
    with _lock:
        runtime = _runtime()
        key = _key(full_source, (HERE / "metal_emu.h").read_text(), runtime.name)
        if key in _libs:
            return _libs[key]
        so = BUILD_DIR / f"k_{key}.so"
        if not so.exists():
            cpp = BUILD_DIR / f"k_{key}.cpp"
            cpp.write_text(full_source)
            _compile(cpp, so, [str(runtime)])
        lib = ctypes.CDLL(str(so))
        lib.regla_emu_launch.restype = ctypes.c_int
        lib.regla_emu_launch.argtypes = [
            ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_ulong),
            ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
            ctypes.c_uint, ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
        ]
        _libs[key] = lib
        return lib


def translation_unit(spec: dict, inputs: list, output_dtypes: list[str]) -> str:
    kernel_name, src, attributes, shape_infos, template_def = mlx_kernel_source(spec, inputs, output_dtypes)
    return (
        '#include "metal_emu.h"\n'
        + strict_source(src)
        + _launcher(kernel_name, template_def, spec, inputs, output_dtypes, attributes, shape_infos)
    )


# ------------------------------------------------------------------ dtypes
def to_bf16_bits(x) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even."""
    x = np.array(x, dtype=np.float32, order="C")
    u = x.view(np.uint32)
    r = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), r).astype(np.uint16)


def from_bf16_bits(b) -> np.ndarray:
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def round_to(x, dtype: str) -> np.ndarray:
    """x as float32 after rounding to ``dtype`` (what the kernel will see)."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return from_bf16_bits(to_bf16_bits(x))
    return x


def _device_array(x, dtype: str) -> np.ndarray:
    # np.array, not ascontiguousarray: the latter turns 0-d inputs into 1-d ones.
    if dtype == "bfloat16":
        return np.array(to_bf16_bits(np.asarray(x, dtype=np.float32)), order="C")
    return np.array(np.asarray(x).astype(dtype), order="C")


def run(spec: dict, arrays: list, dtypes: list[str], output_shapes: list, output_dtypes: list[str],
        seed: int = 0, workers: int | None = None, init_value=None) -> list[np.ndarray]:
    """Launch ``spec`` on the emulator. ``arrays`` in input order (NumPy or Python scalars,
    converted to ``dtypes``); returns the outputs as NumPy (bfloat16 comes back as float32).
    Outputs start as NaN (so unwritten elements show), or ``init_value`` as MLX's does."""
    dev = [_device_array(a, dt) for a, dt in zip(arrays, dtypes)]
    inputs = [(dt, d.shape) for d, dt in zip(dev, dtypes)]
    lib = compile_source(translation_unit(spec, inputs, output_dtypes))
    _, _, _, shape_infos, _ = mlx_kernel_source(spec, inputs, output_dtypes)
    keep, ptrs, sizes = [], [], []

    def add(a):
        keep.append(a)
        ptrs.append(a.ctypes.data)
        sizes.append(a.size)

    for d, (has_shape, has_strides, has_ndim) in zip(dev, shape_infos):
        add(d)
        if d.ndim > 0:
            if has_shape:
                add(np.array(d.shape, dtype=np.int32))
            if has_strides:
                add(np.array([s // d.itemsize for s in d.strides], dtype=np.int64))
            if has_ndim:
                add(np.array(d.ndim, dtype=np.int32))
    outs = []
    for shp, dt in zip(output_shapes, output_dtypes):
        npdt = np.uint16 if dt == "bfloat16" else np.dtype(dt)
        # Garbage, not zeros, so a thread that forgets to write its output is seen.
        fill = np.nan if init_value is None else init_value
        o = np.full(shp, to_bf16_bits(fill) if dt == "bfloat16" else fill, dtype=npdt)
        outs.append(o)
        add(o)
    bufs = (ctypes.c_void_p * len(ptrs))(*ptrs)
    csizes = (ctypes.c_ulong * len(sizes))(*sizes)
    grid = (ctypes.c_uint * 3)(*spec["grid"])
    tg = (ctypes.c_uint * 3)(*spec["threadgroup"])
    err = ctypes.create_string_buffer(1024)
    workers = workers or os.cpu_count() or 1
    rc = lib.regla_emu_launch(bufs, csizes, grid, tg, seed, workers, err, len(err))
    if rc != 0:
        raise EmulationError(err.value.decode())
    return [from_bf16_bits(o) if dt == "bfloat16" else o for o, dt in zip(outs, output_dtypes)]


# ------------------------------------------------------------------ mx.fast.metal_kernel stand-in
class EmulatedMetalKernel:
    """What ``mx.fast.metal_kernel(...)`` returns, run by the emulator: tests put this class
    in place of ``mx.fast.metal_kernel`` (and make ``mx.metal.is_available`` true), so that
    ``regla_mlx.kernels`` and ``regla_mlx.ops`` run their real launch code, on Linux, with
    the kernel text a Mac would compile. Each call converts the MLX inputs to NumPy, runs
    the grid and returns MLX arrays; calls made while MLX traces a function for a transform
    other than ``vjp``/``grad`` cannot be served (the inputs have no values yet)."""

    calls = 0  # launches served, across instances (tests check the kernels really ran)
    seed = 0  # of the interleaving of threads
    transform = {}  # kernel name -> function applied to its source (mutation tests)

    def __init__(self, name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                 atomic_outputs=False):
        if atomic_outputs:
            raise EmulationError("atomic outputs are not emulated")
        source = EmulatedMetalKernel.transform.get(name, lambda s: s)(source)
        self.spec = dict(name=name, input_names=list(input_names), output_names=list(output_names),
                         source=source, header=header)

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                 init_value=None, verbose=False, stream=None):
        import mlx.core as mx

        def name(dt):
            return str(dt).split(".")[-1]

        arrays, dtypes = [], []
        for x in inputs:
            if not isinstance(x, mx.array):
                x = mx.array(x)
            dt = name(x.dtype)
            arrays.append(np.array(x.astype(mx.float32)) if dt == "bfloat16" else np.array(x))
            dtypes.append(dt)
        tmpl = [(n, v if isinstance(v, (bool, int)) else name(v)) for n, v in (template or [])]
        spec = dict(self.spec, template=tmpl, grid=tuple(grid), threadgroup=tuple(threadgroup))
        out_dt = [name(d) for d in output_dtypes]
        outs = run(spec, arrays, dtypes, [tuple(s) for s in output_shapes], out_dt, seed=EmulatedMetalKernel.seed,
                   init_value=init_value)
        EmulatedMetalKernel.calls += 1
        return [mx.array(o).astype(d) for o, d in zip(outs, output_dtypes)]


@contextlib.contextmanager
def emulated_metal(transform=None, seed=0):
    """Inside: ``mx.fast.metal_kernel`` is :class:`EmulatedMetalKernel` and
    ``mx.metal.is_available()`` is true, so ``regla_mlx.kernels`` and ``regla_mlx.ops`` take
    their Metal paths. ``transform`` maps kernel names (``regla_gla_chunk_a``, ...) to
    functions applied to their source; ``seed`` picks the thread interleaving."""
    import mlx.core as mx
    from regla_mlx import kernels

    saved = mx.metal.is_available, mx.fast.metal_kernel, EmulatedMetalKernel.transform, EmulatedMetalKernel.seed
    mx.metal.is_available = lambda: True
    mx.fast.metal_kernel = EmulatedMetalKernel
    EmulatedMetalKernel.transform, EmulatedMetalKernel.seed = dict(transform or {}), seed
    kernels._build.cache_clear()
    try:
        yield
    finally:
        mx.metal.is_available, mx.fast.metal_kernel, EmulatedMetalKernel.transform, EmulatedMetalKernel.seed = saved
        kernels._build.cache_clear()


def emulated_gla(kind, q, k, v, g, scale=None, initial_state=None, *, dtypes=None, cu_seqlens=None,
                 transform=None, seed=0):
    """``regla_mlx.kernels.metal_{kind}_gla`` (kind ``chunk`` or ``recurrent``) on NumPy
    inputs, emulated. ``dtypes`` names the dtypes of q, k, v, g (default: the arrays' own).
    Returns NumPy ``(o as float32, final state)``."""
    import mlx.core as mx
    from regla_mlx import kernels

    xs = (q, k, v, g)
    dtypes = dtypes or [np.asarray(x).dtype.name for x in xs]
    arrays = [mx.array(np.asarray(x, np.float32)).astype(getattr(mx, d)) for x, d in zip(xs, dtypes)]
    K = np.shape(q)[-1]
    scale = K ** -0.5 if scale is None else scale
    h0 = None if initial_state is None else mx.array(initial_state)
    with emulated_metal(transform, seed):
        o, s = getattr(kernels, f"metal_{kind}_gla")(*arrays, scale, h0, True, cu_seqlens)
        return np.array(o.astype(mx.float32)), np.array(s)
