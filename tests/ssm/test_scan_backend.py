"""Backend selection when the kernels cannot run: said once, with the reason; explicit requests never fall back.

There is no GPU here, so the kernel packages are replaced by stand-ins on ``sys.path`` (a module
that raises the import error a broken build raises, plus its dist-info), and "CUDA tensors" are CPU
tensors whose ``is_cuda`` says True: the dispatch reads only that flag, and with a kernel missing the
PyTorch path it picks runs on the CPU. Works the same on a machine with the real kernels installed.
"""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest
import torch

from nnunetv2_mobilevim.cli.check import format_report, run_checks
from nnunetv2_mobilevim.ssm import backend as scan
from nnunetv2_mobilevim.ssm import mamba_ssm_kernels as mamba_ssm_scan
from nnunetv2_mobilevim.ssm.backend import (
    ScanBackendError,
    ScanFallbackWarning,
    causal_conv1d,
    causal_conv1d_torch,
    conv_backend,
    describe_backend,
    resolve_backend,
    selective_scan,
)

KERNEL_MODULES = ("selective_scan_cuda", "causal_conv1d")
SCAN_ABI_ERROR = "selective_scan_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEab"
CONV_ABI_ERROR = "causal_conv1d_cuda.so: undefined symbol: _ZNK3c1010TensorImpl4sizeEl"


class CudaFlagged(torch.Tensor):
    """A CPU tensor that the backend selection takes for a CUDA tensor."""

    @property
    def is_cuda(self):
        return True


class Site:
    """A folder on sys.path where a test installs stand-ins of the kernel packages."""

    def __init__(self, root):
        self.root = root

    def install(self, dist: str, version: str, module: str, source: str) -> None:
        (self.root / f"{module}.py").write_text(source)
        info = self.root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        importlib.invalidate_caches()

    def broken_scan(self) -> None:
        self.install("mamba-ssm", "2.3.2", "selective_scan_cuda", f"raise ImportError({SCAN_ABI_ERROR!r})\n")

    def working_scan(self) -> None:  # importable; the tests below never call it
        self.install("mamba-ssm", "2.3.2", "selective_scan_cuda", "")

    def broken_conv(self) -> None:
        self.install("causal-conv1d", "1.7.0", "causal_conv1d", f"raise ImportError({CONV_ABI_ERROR!r})\n")

    def working_conv(self) -> None:
        self.install("causal-conv1d", "1.7.0", "causal_conv1d",
                     "def causal_conv1d_fn(x, weight, bias=None, activation=None):\n"
                     "    raise AssertionError('the stand-in kernel must not run')\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    for name in KERNEL_MODULES:  # real kernels imported by earlier tests would shadow the stand-ins
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(scan.ENV_VAR, raising=False)
    scan.reset_backend_state()
    yield Site(tmp_path)
    for name in KERNEL_MODULES:
        if (getattr(sys.modules.get(name), "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]
    scan.reset_backend_state()  # later tests import the real packages again


def fallback_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, ScanFallbackWarning)]


def scan_inputs(cls=torch.Tensor):
    """u, delta, z: (2, 8, 10); A: (8, 4); B, C: (2, 1, 4, 10); D: (8,)."""
    g = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(2, 8, 10, generator=g) for _ in range(3))
    A = -torch.rand(8, 4, generator=g) - 0.1
    B, C = (torch.randn(2, 1, 4, 10, generator=g) for _ in range(2))
    return u.as_subclass(cls), delta, A, B, C, torch.randn(8, generator=g), z


@pytest.mark.parametrize("kind", ["broken", "missing"])
def test_silent_fallback_auto_on_cuda_warns_once_with_the_reason(site, monkeypatch, kind):
    if kind == "broken":
        site.broken_scan()
        expected = ["mamba-ssm 2.3.2 is installed but selective_scan_cuda failed to import",
                    f"ImportError: {SCAN_ABI_ERROR}", "rebuild it against this torch", "MAMBA_FORCE_BUILD=TRUE"]
    else:  # not installed at all: say so and how to install (no rebuild advice)
        monkeypatch.setitem(sys.modules, "selective_scan_cuda", None)
        monkeypatch.setattr(mamba_ssm_scan, "_installed_version", lambda dist: None)
        expected = ["mamba-ssm is not installed", mamba_ssm_scan.INSTALL_HINT]
    u, delta, A, B, C, D, z = scan_inputs()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        # CPU tensors: the kernels are CUDA-only, PyTorch is the expected path and nothing is said
        selective_scan(u, delta, A, B, C, D=D, z=z, delta_softplus=True)
        causal_conv1d(u, torch.ones(8, 4), None)
        assert fallback_warnings(record) == []
        # CUDA tensors without the kernel: PyTorch, said once for any number of calls
        for _ in range(2):
            y = selective_scan(*scan_inputs(CudaFlagged)[:5], D=D, z=z, delta_softplus=True)
        assert resolve_backend(is_cuda=True) == "torch"
    messages = fallback_warnings(record)
    assert len(messages) == 1, messages
    for text in expected + [f"{scan.ENV_VAR}=torch"]:
        assert text in messages[0]
    if kind == "missing":
        assert "rebuild" not in messages[0]
    torch.testing.assert_close(y.as_subclass(torch.Tensor),
                               scan.selective_scan_loop(u, delta, A, B, C, D=D, z=z, delta_softplus=True))


@pytest.mark.parametrize("explicit", ["environment", "layer argument"])
def test_silent_fallback_explicit_mamba_ssm_refuses_a_broken_causal_conv1d(site, monkeypatch, explicit):
    site.working_scan()
    site.broken_conv()
    backend = None
    if explicit == "environment":
        monkeypatch.setenv(scan.ENV_VAR, "mamba_ssm")
    else:
        backend = "mamba_ssm"
    x = torch.randn(2, 8, 10).as_subclass(CudaFlagged)
    with pytest.raises(ScanBackendError) as info:
        causal_conv1d(x, torch.ones(8, 4), None, backend=backend)
    message = str(info.value)
    for text in ("mamba_ssm", "causal-conv1d 1.7.0 is installed but causal_conv1d failed to import",
                 CONV_ABI_ERROR, "CAUSAL_CONV1D_FORCE_BUILD=TRUE"):
        assert text in message


def test_silent_fallback_auto_runs_the_conv_in_pytorch_and_says_so_once(site):
    site.working_scan()
    site.broken_conv()
    x, w, b = torch.randn(2, 8, 10), torch.randn(8, 4), torch.randn(8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            y = causal_conv1d(x.as_subclass(CudaFlagged), w, b)
    messages = fallback_warnings(record)
    assert len(messages) == 1, messages
    assert "causal conv1d runs in PyTorch" in messages[0] and CONV_ABI_ERROR in messages[0]
    assert "rebuild it against this torch" in messages[0]
    torch.testing.assert_close(y.as_subclass(torch.Tensor), causal_conv1d_torch(x, w, b, activation="silu"),
                               rtol=0, atol=0)


def test_silent_fallback_unsupported_conv_width(site, monkeypatch):
    site.working_scan()
    site.working_conv()
    x, w = torch.randn(2, 8, 10).as_subclass(CudaFlagged), torch.randn(8, 5)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        causal_conv1d(x, w, None)
        causal_conv1d(x, w, None)
    messages = fallback_warnings(record)
    assert len(messages) == 1 and "d_conv is 5" in messages[0], messages
    with pytest.raises(ScanBackendError, match="d_conv is 5"):
        causal_conv1d(x, w, None, backend="mamba_ssm")
    assert conv_backend(is_cuda=True, width=4) == "causal_conv1d"  # the widths it is built for


def test_silent_fallback_environment_variable_is_read_once(site, monkeypatch):
    monkeypatch.setenv(scan.ENV_VAR, "torch")
    assert resolve_backend(is_cuda=True) == "torch"
    monkeypatch.setenv(scan.ENV_VAR, "bogus")
    assert resolve_backend(is_cuda=True) == "torch"  # still the value read at first use
    scan.reset_backend_state()
    with pytest.raises(ScanBackendError, match="'bogus' is not one of"):
        resolve_backend(is_cuda=True)


def test_silent_fallback_describe_backend_for_the_trainer_log(site, monkeypatch):
    site.broken_scan()
    line = describe_backend(is_cuda=True)
    assert line.startswith("selective scan: PyTorch (mamba-ssm kernels not importable: ")
    assert SCAN_ABI_ERROR in line and "rebuild it against this torch" in line
    assert describe_backend(is_cuda=False) == \
        "selective scan: PyTorch (CPU tensors; the mamba-ssm kernels run on CUDA only)"
    assert describe_backend(is_cuda=True, requested="torch") == "selective scan: PyTorch (scan_backend='torch')"

    (site.root / "selective_scan_cuda.py").write_text("")  # the same mamba-ssm, now importable
    site.working_conv()
    scan.reset_backend_state()
    assert describe_backend(is_cuda=True) == \
        "selective scan: mamba_ssm kernels (mamba-ssm 2.3.2, causal-conv1d 1.7.0)"


def test_silent_fallback_check_prints_both_import_errors(site):
    site.broken_scan()
    site.broken_conv()
    report = format_report(run_checks())
    lines = {line[7:].split()[0]: line for line in report.splitlines() if line.startswith("[")}
    assert f"ImportError: {CONV_ABI_ERROR}" in lines["causal-conv1d"]
    assert f"ImportError: {SCAN_ABI_ERROR}" in lines["mamba-ssm"]
    assert f"mamba-ssm 2.3.2 is installed but selective_scan_cuda failed to import (ImportError: {SCAN_ABI_ERROR})" \
        in lines["mamba-ssm"]
    assert f"causal-conv1d 1.7.0 is installed but causal_conv1d failed to import (ImportError: {CONV_ABI_ERROR})" \
        in lines["causal-conv1d"]


def test_eager_under_compile_keeps_the_function_out_of_the_graph_and_dynamo_out_of_the_import():
    """``eager_under_compile``: outside torch.compile the function itself runs and nothing imports
    torch._dynamo; under torch.compile the function's operations are in none of the captured graphs (a
    graph break around it), the result is the same, and a second call compiles nothing new."""
    import subprocess

    code = ("import sys, torch; from nnunetv2_mobilevim.ssm.backend import eager_under_compile\n"
            "f = eager_under_compile(lambda x: torch.sin(x) * 2)\n"
            "assert torch.equal(f(torch.ones(3)), torch.sin(torch.ones(3)) * 2)\n"
            "print('torch._dynamo' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"

    class Inner(torch.nn.Module):
        @scan.eager_under_compile
        def forward(self, x):
            return torch.sin(x) * 2

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            return torch.cos(self.inner(x + 1)) - 3

    graphs = []

    def backend(gm, example_inputs):
        graphs.append({n.target for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    torch._dynamo.reset()
    outer, x = Outer(), torch.randn(5, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(outer, backend=backend)
    assert torch.equal(compiled(x), outer(x))
    inside = set().union(*graphs)
    assert torch.cos in inside and torch.sin not in inside, graphs
    captured = len(graphs)
    assert torch.equal(compiled(x), outer(x)) and len(graphs) == captured
