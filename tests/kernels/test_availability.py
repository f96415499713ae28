"""Backend resolution: ``auto`` picks a kernel only where it runs natively (never on CPU,
interpreter or not), skips kernels that cannot compute the dtype or the configuration, and
an explicit request that cannot be honoured is a ConfigError, never a silent fallback."""

from __future__ import annotations

import pytest
import torch

import seqzoo.kernels as kernels
from seqzoo import mixers
from seqzoo.errors import ConfigError
from seqzoo.kernels import parts, resolve_backend
from seqzoo.mixers.base import ConfigError as ReExported

CUDA = torch.device("cuda")  # a device object only: nothing runs on it here


@pytest.fixture
def all_importable(monkeypatch):
    """Pretend every kernel package imports (resolution logic only; no kernel runs)."""
    monkeypatch.setattr(kernels, "_importable", lambda module: True)


def test_config_error_moved_and_still_importable_from_mixers_base():
    assert ReExported is ConfigError
    assert ConfigError("backend", "x").key == "backend"


def test_parts_of_a_combined_backend():
    assert parts("fla+causal_conv1d") == ("fla", "causal_conv1d")
    assert parts("reference") == ()


def test_auto_never_picks_a_kernel_on_cpu_even_when_interpreting(monkeypatch, all_importable):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for name in mixers.available():
        cls = mixers.get(name)
        non_cpu = [b for b in cls.backends if b != "sdpa"]
        assert resolve_backend("auto", tuple(non_cpu), torch.device("cpu"), dtype=torch.float32) == "reference"
    m = mixers.build("deltanet", d_model=16)
    assert m.backend == "reference"


def test_fla_on_cpu_only_under_the_interpreter(monkeypatch, all_importable):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not kernels.is_available("fla", "cpu")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET"):
        resolve_backend("fla", ("fla",), torch.device("cpu"), dtype=torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.is_available("fla", "cpu") and kernels.interpreted("fla", "cpu")
    assert resolve_backend("fla", ("fla",), torch.device("cpu"), dtype=torch.float32) == "fla"
    assert not kernels.is_available("fla+causal_conv1d", "cpu")  # causal-conv1d has no interpreter
    assert not kernels.is_available("mamba_ssm", "cpu")


def test_auto_on_cuda_takes_the_first_usable_backend(all_importable):
    order = ("mamba_ssm+causal_conv1d", "mamba_ssm", "fla+causal_conv1d", "fla")
    assert resolve_backend("auto", order, CUDA, dtype=torch.bfloat16) == "mamba_ssm+causal_conv1d"
    no_conv = lambda b: "no conv" if "causal_conv1d" in b else None  # noqa: E731
    assert resolve_backend("auto", order, CUDA, dtype=torch.bfloat16, limits=no_conv) == "mamba_ssm"
    # fp64: no kernel computes it, auto falls back to the reference, a request is refused
    assert resolve_backend("auto", order, CUDA, dtype=torch.float64) == "reference"
    with pytest.raises(ConfigError, match="float64"):
        resolve_backend("fla", order, CUDA, dtype=torch.float64)


def test_a_kernel_that_cannot_compute_an_option_is_skipped_and_refused(all_importable):
    mixer = mixers.build("mamba2", d_model=16, headdim=8, d_state=4)
    # issue 12's negative-eigenvalue option (2·exp(ΔA) − 1): no SSD kernel computes it
    mixer.config = mixer.config.model_copy(update={"allow_neg_eigval": True})
    for backend in mixer.backends:
        assert "negative eigenvalues" in mixer.kernel_limits(backend)
    assert resolve_backend("auto", mixer.backends, CUDA, dtype=torch.float32, limits=mixer.kernel_limits) == "reference"
    with pytest.raises(ConfigError, match="negative eigenvalues"):
        resolve_backend("fla", mixer.backends, CUDA, dtype=torch.float32, limits=mixer.kernel_limits)
    mamba = mixers.build("mamba", d_model=16)
    mamba.config = mamba.config.model_copy(update={"allow_neg_eigval": True})
    assert "negative eigenvalues" in mamba.kernel_limits("mamba_ssm")


def test_conv_kernel_limits():
    assert "widths 2-4" in mixers.build("deltanet", d_model=16, conv_size=6).kernel_limits("fla+causal_conv1d")
    assert mixers.build("deltanet", d_model=16, conv_size=6).kernel_limits("fla") is None
    assert "no short convolution" in mixers.build("deltanet", d_model=16, use_short_conv=False).kernel_limits(
        "fla+causal_conv1d")
    assert "K <= 256" in mixers.build("deltanet", d_model=16, n_heads=1, head_dim=512).kernel_limits("fla")


def test_unknown_or_unsupported_backend_is_an_error():
    with pytest.raises(ConfigError, match="expected 'auto', 'reference' or one of"):
        mixers.build("retnet", d_model=16, backend="mamba_ssm").backend
    with pytest.raises(ConfigError, match="not available"):
        mixers.build("mamba", d_model=16, backend="mamba_ssm").backend
