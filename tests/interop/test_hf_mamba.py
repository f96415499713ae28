"""Real transformers Mamba / Mamba2 causal LMs (their pure-PyTorch CPU path), saved with
``save_pretrained`` and loaded by ``seqzoo.interop.hf_mamba``, give the same logits in fp32,
and a seqzoo decode after a prefill continues them. Config gaps are clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from seqzoo.errors import CheckpointError
from seqzoo.interop.hf_mamba import load_hf_mamba
from tests.helpers import assert_close

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "mamba": lambda: transformers.MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=260, state_size=8,
                                              use_bias=True),
    "mamba2": lambda: transformers.Mamba2Config(hidden_size=32, num_hidden_layers=2, vocab_size=260, state_size=8,
                                                num_heads=4, head_dim=16, n_groups=2, chunk_size=16,
                                                time_step_limit=(0.0, 2.0)),
}
MODELS = {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM"}


def _saved(kind: str, path):
    torch.manual_seed(0)
    model = getattr(transformers, MODELS[kind])(CONFIGS[kind]()).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial weights everywhere (norms start at 1, D at 1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_hf_model_loads_to_the_same_logits(kind, tmp_path):
    theirs = _saved(kind, tmp_path)
    ours = load_hf_mamba(tmp_path, backend="reference").eval()
    tokens = torch.randint(0, 260, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits_theirs = theirs(tokens).logits
        logits_ours, state = ours(tokens[:, :33])
        steps = []
        for t in range(33, 40):  # seqzoo's decode continues from its prefill state
            step, state = ours.step(tokens[:, t], state)
            steps.append(step)
    assert_close(logits_ours, logits_theirs[:, :33], torch.float32, f"{kind}: prefill logits")
    assert_close(torch.stack(steps, 1), logits_theirs[:, 33:], torch.float32, f"{kind}: decoded logits")


def test_mamba2_without_n_groups_in_the_config_is_a_clear_error(tmp_path):
    _saved("mamba2", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["n_groups"]
    with pytest.raises(CheckpointError, match="n_groups"):
        load_hf_mamba(tmp_path, config=cfg)
    cfg["n_groups"] = 3  # 2 * 3 does not divide the conv's B, C channels
    with pytest.raises(CheckpointError, match="n_groups"):
        load_hf_mamba(tmp_path, config=cfg)
    with pytest.raises(CheckpointError, match="model_type"):
        load_hf_mamba(tmp_path, config={**cfg, "model_type": "llama"})
