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
