"""Weights of real flash-linear-attention layers and models, loaded into seqzoo, give fla's
outputs: each fla layer (run with its Triton kernels, on CPU in Triton's interpreter) equals
seqzoo's *reference* mixer holding its weights, output and input gradient, and a whole fla
causal LM saved with ``save_pretrained`` equals the seqzoo LanguageModel loaded from that
directory (logits). Unsupported fla options are refused by name."""

from __future__ import annotations

import warnings

import pytest
import torch

from seqzoo.errors import CheckpointError
from seqzoo.interop.fla import load_fla_layer, load_fla_model
from seqzoo.kernels.triton_interpret import ensure_patched
from tests.helpers import assert_close
from tests.kernels.kernel_device import device_for

LAYERS = {  # seqzoo kind: (fla layer class name, its kwargs)
    "gated_deltanet": ("GatedDeltaNet", dict(hidden_size=32, head_dim=16, num_heads=2, allow_neg_eigval=True)),
    # fla's chunked DeltaNet kernel refuses fp32; its recurrent one (same maths) does not
    "deltanet": ("DeltaNet", dict(hidden_size=32, num_heads=2, use_gate=True, mode="fused_recurrent")),
    "gla": ("GatedLinearAttention", dict(hidden_size=32, num_heads=2, gate_logit_normalizer=8)),
    "retnet": ("MultiScaleRetention", dict(hidden_size=32, num_heads=2)),
}


def _fla(module: str):
    device_for("fla")  # fla runs here (CUDA, or the interpreter on CPU), else skip
    ensure_patched()  # fla's own layers call its kernels: the interpreter needs the same two patches
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip(module)


def _perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random non-trivial weights (fla initialises norms to 1, some biases to 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_fla_layer_equals_seqzoo_reference(kind):
    layers = _fla("fla.layers")
    cls, kwargs = LAYERS[kind]
    torch.manual_seed(0)
    theirs = _perturbed(getattr(layers, cls)(**kwargs), seed=1)
    ours = load_fla_layer(kind, theirs.state_dict(), config=kwargs, backend="reference")
    assert ours.backend == "reference"
    x = torch.randn(1, 70, 32)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_theirs = theirs(x1)[0]
    y_ours, _ = ours(x2)
    w = torch.randn_like(y_ours)
    (y_theirs * w).sum().backward()
    (y_ours * w).sum().backward()
    assert_close(y_ours, y_theirs.detach(), torch.float32, f"{kind}: output")
    assert_close(x2.grad, x1.grad, torch.float32, f"{kind}: input gradient")


MODELS = {  # seqzoo kind: (fla config class, model class, kwargs)
    "gated_deltanet": ("GatedDeltaNetConfig", "GatedDeltaNetForCausalLM", dict(head_dim=16, num_heads=2)),
    "gla": ("GLAConfig", "GLAForCausalLM", dict(num_heads=2)),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_fla_model_directory_loads_to_the_same_logits(kind, tmp_path):
    models = _fla("fla.models")
    cfg_cls, model_cls, kwargs = MODELS[kind]
    config = getattr(models, cfg_cls)(hidden_size=32, num_hidden_layers=2, vocab_size=260, **kwargs)
    torch.manual_seed(0)
    theirs = _perturbed(getattr(models, model_cls)(config), seed=2).eval()
    theirs.save_pretrained(tmp_path)  # config.json + model.safetensors
    ours = load_fla_model(tmp_path, backend="reference").eval()
    tokens = torch.randint(0, 260, (1, 70))
    with torch.no_grad():
        logits_theirs = theirs(tokens).logits
        logits_ours, _ = ours(tokens)
    assert_close(logits_ours, logits_theirs, torch.float32, f"{kind}: logits")


def test_unsupported_options_and_bad_files_are_named(tmp_path):
    sd = {"q_proj.weight": torch.zeros(32, 32), "k_proj.weight": torch.zeros(32, 32),
          "v_proj.weight": torch.zeros(64, 32), "g_proj.weight": torch.zeros(64, 32),
          "o_proj.weight": torch.zeros(32, 64), "g_norm_swish_gate.weight": torch.ones(32)}
    assert load_fla_layer("retnet", sd, backend="reference").n_heads == 2
    with pytest.raises(CheckpointError, match="feature_map"):
        load_fla_layer("retnet", sd, config={"feature_map": "relu"})
    with pytest.raises(CheckpointError, match="q_conv1d.weight"):
        load_fla_layer("retnet", {**sd, "q_conv1d.weight": torch.zeros(32, 1, 4)})
    with pytest.raises(CheckpointError, match="extra.weight"):
        load_fla_layer("retnet", {**sd, "extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="g_norm.weight"):
        load_fla_layer("retnet", {k: v for k, v in sd.items() if k != "g_norm_swish_gate.weight"})
    with pytest.raises(CheckpointError, match="kind"):
        load_fla_layer("mamba", sd)
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="w.safetensors"):
        load_fla_layer("retnet", bad)
    with pytest.raises(CheckpointError, match="holds no weights"):
        load_fla_model(tmp_path / "..")
