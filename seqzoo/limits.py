"""Upper bounds of every value that sizes an allocation or a loop, and of the files seqzoo reads.

A value beyond these is a typo or an attack, not an experiment: the largest published
configurations stay far below (widths of 16K, 1M-token contexts, vocabularies of 256K).
They exist so a bad recipe is refused with one line naming its key, instead of reaching the
allocator (``10^12`` -> an allocator error, ``2^70`` -> a C++ backtrace) or running forever.
"""

from __future__ import annotations

MAX_WIDTH = 65_536            # d_model and any hidden width
MAX_LAYERS = 4_096            # n_layers
MAX_VOCAB = 1_048_576         # vocabulary sizes (2^20)
MAX_SEQ_LEN = 1_048_576       # sequence lengths, chunk / segment / window lengths (2^20)
MAX_BATCH = 65_536            # sequences per batch
MAX_STEPS = 1_000_000_000     # optimiser steps, eval / log / checkpoint intervals
MAX_EVAL_BATCHES = 1_000_000  # held-out batches per evaluation
MAX_NEW_TOKENS = 1_048_576    # tokens generated in one call
MAX_SEED = 2**63 - 1          # torch seeds are 64-bit
MAX_HYPERPARAM_INT = 1_048_576  # any integer hyper-parameter of a mixer (heads, state dims, ...)
MAX_EXPANSION = 64.0          # width multipliers (mlp_ratio, expand, expand_k, expand_v)
MAX_LR = 1.0                  # AdamW learning rates (typical: 1e-4 .. 1e-2)
MAX_CORPUS_BYTES = 2**34      # bytes of text a task reads into memory (16 GiB)

MAX_RECIPE_BYTES = 1_048_576  # a recipe or sweep file (the largest in recipes/ is ~3 KB)
MAX_YAML_DEPTH = 32           # nesting of a recipe (the deepest in recipes/ is 5)
MAX_YAML_NODES = 100_000      # scalars + collections after alias expansion
MAX_JSON_BYTES = 64 * 2**20   # state.json / latest.json of a checkpoint
