"""lm-eval's command line with seqzoo models registered (its `hf` model type then loads a
seqzoo pretrained directory without trust_remote_code):

    python -m seqzoo.hf.lm_eval --model hf --model_args pretrained=hf/tiny-attention --tasks lambada_openai
"""

from __future__ import annotations

import seqzoo.hf  # noqa: F401 - registers model_type "seqzoo" with AutoConfig / AutoModelForCausalLM

if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
