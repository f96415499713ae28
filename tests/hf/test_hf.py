"""Hugging Face interop: every mixer (each in a two-layer hybrid with sliding-window
attention) loads through AutoModelForCausalLM without trust_remote_code, with logits equal
to seqzoo's and greedy `generate` equal to LanguageModel.generate; HF's own save_pretrained
round-trips; lm-eval's `hf` model scores it exactly as seqzoo does."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import seqzoo  # noqa: E402
import seqzoo.hf  # noqa: E402,F401 - registers model_type "seqzoo"
from seqzoo import mixers  # noqa: E402
from seqzoo.models.lm import LanguageModel  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def recipe(mixer: str) -> dict:
    # The first choice of each hyper-parameter the mixer's own invariant tests draw from.
    params = {k: v[0] for k, v in mixers.get(mixer).test_space.items()}
    return {"name": f"hf-{mixer}", "task": {"type": "bytes", "seq_len": 32},
            "model": {"d_model": 16, "n_layers": 2, "mixers": {"m": {"type": mixer, **params},
                                                               "swa": {"type": "attention", "n_heads": 2, "window": 4}},
                      "pattern": ["m", "swa"]}}


@pytest.mark.parametrize("mixer", mixers.available())
def test_every_mixer_through_auto_model(tmp_path, mixer):
    torch.manual_seed(0)
    model = seqzoo.build_model(recipe(mixer)).eval()
    with torch.no_grad():  # non-trivial weights, so that every layer matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)  # no trust_remote_code
    assert type(hf).__name__ == "SeqzooForCausalLM" and isinstance(AutoConfig.from_pretrained(tmp_path),
                                                                   seqzoo.hf.SeqzooConfig)
    x = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        assert torch.equal(hf(x).logits, model(x)[0])
    prompt = torch.tensor([list(b"def f(")])
    ours = model.generate(prompt, 9, temperature=0)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=9, do_sample=False)
    assert torch.equal(theirs, ours)


def test_tokenizer_generate_loss_and_hf_save_pretrained(tmp_path):
    torch.manual_seed(1)
    model = seqzoo.build_model(recipe("mamba")).eval()
    model.save_pretrained(tmp_path / "p")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    tok = AutoTokenizer.from_pretrained(tmp_path / "p")
    enc = tok("import os", return_tensors="pt")
    assert enc["input_ids"][0].tolist() == list(b"import os")
    out = hf.generate(**enc, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, model.generate(enc["input_ids"], 5, temperature=0))
    # labels as in HF: the mean next-token loss, shifted inside.
    ids = enc["input_ids"]
    logits = model(ids)[0]
    expect = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert torch.allclose(hf(ids, labels=ids).loss, expect, rtol=1e-6, atol=0)
    # What HF's own save_pretrained writes loads back in seqzoo (and in HF) unchanged.
    hf.save_pretrained(tmp_path / "hf")
    again = LanguageModel.from_pretrained(tmp_path / "hf")
    assert torch.equal(again(ids)[0], logits)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["recipe"] == model.recipe.model_dump(mode="json")


def test_padding_and_beam_search_are_refused_clearly(tmp_path):
    seqzoo.build_model(recipe("attention")).save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(NotImplementedError, match="padded batches"):
        hf(ids, attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
    with pytest.raises(NotImplementedError, match="beam search"):
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, num_beams=2, do_sample=False)


def test_lm_eval_hf_model_scores_like_seqzoo(tmp_path):
    pytest.importorskip("accelerate")
    huggingface = pytest.importorskip("lm_eval.models.huggingface")
    from lm_eval.api.instance import Instance

    torch.manual_seed(2)
    model = seqzoo.build_model(recipe("gated_deltanet")).eval()
    model.save_pretrained(tmp_path)
    lm = huggingface.HFLM(pretrained=str(tmp_path), batch_size=1, device="cpu")
    pairs = [("def foo(", "x):"), ("import", " os"), ("class A", "(B):")]
    scores = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i)
                               for i, p in enumerate(pairs)])
    for (context, continuation), (logprob, greedy) in zip(pairs, scores):
        ids = torch.tensor([list((context + continuation).encode())])
        n = len(continuation.encode())
        logp = model(ids[:, :-1])[0][0, -n:].log_softmax(-1)  # (n, V)
        target = ids[0, -n:]
        assert logprob == pytest.approx(logp.gather(-1, target[:, None]).sum().item(), rel=1e-5)
        assert greedy == bool((logp.argmax(-1) == target).all())
    request = Instance(request_type="generate_until", doc={},
                       arguments=("def ", {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}), idx=0)
    [text] = lm.generate_until([request])
    ours = bytes(model.generate(torch.tensor([list(b"def ")]), 8, temperature=0)[0, 4:].tolist())
    assert text == ours.split(b"\n")[0].decode("utf-8", errors="replace")
