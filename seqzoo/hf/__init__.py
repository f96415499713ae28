"""Hugging Face interop (``pip install 'seqzoo[hf]'``): every seqzoo model behind
``transformers``' ``AutoConfig`` / ``AutoModelForCausalLM`` and ``generate``.

    import seqzoo.hf                                  # registers model_type "seqzoo"
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("hf/tiny-attention")    # no trust_remote_code
    tok = AutoTokenizer.from_pretrained("hf/tiny-attention")
    out = model.generate(**tok("def ", return_tensors="pt"), max_new_tokens=40, do_sample=False)

The directory is what ``LanguageModel.save_pretrained`` (or ``seqzoo export``) writes; see
``seqzoo.pretrained``. ``generate`` carries seqzoo's own decode state (one mixer state per
layer: KV caches, SSM states, Titans memories) as its cache, so decoding is the model's
recurrent ``step``, exactly as ``LanguageModel.generate`` does it.
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without the extra
    from seqzoo.errors import SeqzooError

    raise SeqzooError("seqzoo.hf needs transformers; pip install 'seqzoo[hf]'") from err

from seqzoo.hf.modeling import SeqzooCache, SeqzooConfig, SeqzooForCausalLM, register

register()

__all__ = ["SeqzooCache", "SeqzooConfig", "SeqzooForCausalLM", "register"]
