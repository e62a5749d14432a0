import importlib.util
import os

import numpy as np
import pytest

# The backends are extras: a test that needs one that is not installed is skipped, saying which
# install brings it, whether it imports it at the top of its module or inside the test.
OPTIONAL = {"torch": "[torch]", "triton": "[dev] on Linux", "mlx": "[mlx]", "mlx_lm": "[mlx]",
            "transformers": "[torch] or [mlx]"}


def _not_installed(exc):
    """The optional package whose absence raised ``exc``, or None."""
    while exc is not None:
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            top = exc.name.split(".")[0]
            if top in OPTIONAL and importlib.util.find_spec(top) is None:
                return top
        exc = exc.__cause__ or exc.__context__
    return None


def _reason(top):
    return f"needs {top}, which is not installed (pip install -e '.{OPTIONAL[top]}')"


class _Module(pytest.Module):
    def _getobj(self):
        try:
            return super()._getobj()
        except self.CollectError as e:
            top = _not_installed(e.__cause__)
            if top is None:
                raise
            raise pytest.skip.Exception(_reason(top), allow_module_level=True) from None


def pytest_pycollect_makemodule(module_path, parent):
    return _Module.from_parent(parent, path=module_path)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if call.excinfo is not None and report.failed:
        top = _not_installed(call.excinfo.value)
        if top is not None:
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {_reason(top)}")
    return report


if importlib.util.find_spec("torch") is not None:
    import torch

    if not torch.cuda.is_available():
        # Triton decides at import time (when its @jit decorators run) whether to interpret: set
        # this before any test module can import a kernel, so the kernels run on CPU tensors.
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_bf16():
    """Two bf16 faults of Triton's interpreter (3.9), mended so the kernels' bf16 code can run
    here as on a GPU: it stores bf16 as uint16 and its ``tl.dot`` multiplies that raw storage
    (bf16 operands are widened to fp32 first, exact: the GPU's tensor-core dot also sums the
    products in fp32), and it rounds fp32 -> bf16 toward zero where a GPU rounds to nearest
    even (twice the error: bf16 outputs missed their 5e-3 bound)."""
    if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        return
    import triton.language as tl
    from triton.runtime import interpreter

    dot, cast = interpreter.InterpreterBuilder.create_dot, interpreter.InterpreterBuilder.cast_impl

    def widen(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, *args):
        return dot(self, widen(a), widen(b), d, *args)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return cast(self, src, dst_type)
        u = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
        r = ((u + np.uint32(0x7FFF) + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        return interpreter.TensorHandle(np.where(np.isnan(src.data), np.uint16(0x7FC0), r), tl.bfloat16)

    interpreter.InterpreterBuilder.create_dot = create_dot
    interpreter.InterpreterBuilder.cast_impl = cast_impl


_interpreter_bf16()


def rel_rms(a, b):
    """fla's measure: ||a - b||_rms / ||b||_rms, in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)) / max(np.sqrt(np.mean(b ** 2)), 1e-30))


GATE_KINDS = ("weak", "strong", "mixed")


def make_inputs(B, T, H, K, V, gates="mixed", seed=0, with_state=True):
    """Random q, k, v, log gates and an initial state (float32 NumPy).

    weak: log gates near 0 (-1e-3..0); strong: -10 down to -1e4; mixed: channels of each kind.
    """
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, K)).astype(np.float32)
    k = rng.standard_normal((B, T, H, K)).astype(np.float32)
    v = rng.standard_normal((B, T, H, V)).astype(np.float32)
    weak = -1e-3 * rng.random((B, T, H, K))
    strong = -np.exp(rng.uniform(np.log(10.0), np.log(1e4), (B, T, H, K)))
    if gates == "weak":
        g = weak
    elif gates == "strong":
        g = strong
    else:
        g = np.where(rng.random(K) < 0.5, weak, strong)
        g = np.where(rng.random(K) < 0.3, np.log(rng.uniform(0.5, 1.0, (B, T, H, K))), g)
    h0 = rng.standard_normal((B, H, K, V)).astype(np.float32) if with_state else None
    return q, k, v, g.astype(np.float32), h0


@pytest.fixture
def rel():
    return rel_rms
