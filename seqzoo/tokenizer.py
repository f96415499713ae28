"""Tokenizers for the ``text`` task and for Hugging Face export, via the ``tokenizers``
library (``pip install 'seqzoo[text]'``).

* ``bytes``: one token per UTF-8 byte (ids 0..255 are the byte values), the same ids the
  ``bytes`` task uses, so byte-level models export with a working tokenizer.
* ``gpt2``: GPT-2's BPE from the Hugging Face hub (needs the network once, then its cache).
* a path to a ``tokenizer.json``, e.g. one trained offline with ``seqzoo tokenizer train``
  (byte-level BPE, GPT-2 style pre-tokenisation, ``<|endoftext|>`` as document separator).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from seqzoo.errors import SeqzooError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

EOS = "<|endoftext|>"
GPT2_REPO = "openai-community/gpt2"


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise SeqzooError("tokenizers are not installed; pip install 'seqzoo[text]'") from None
    return tokenizers


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what the ``tokenizers``
    ByteLevel pre-tokenizer uses), so a byte vocabulary can be written as a BPE vocabulary."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def byte_tokenizer() -> "Tokenizer":
    """ids == UTF-8 bytes: a BPE without merges over the 256 byte symbols."""
    tk = _tokenizers()
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tok = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tk.decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2) -> "Tokenizer":
    """A byte-level BPE trained on ``texts`` (offline), with ``<|endoftext|>`` as id 0."""
    tk = _tokenizers()
    if vocab_size < 257 + 1:
        raise SeqzooError(f"--vocab-size: expected at least 258 (256 bytes, {EOS}, one merge), got {vocab_size}")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(spec: str, *, key: str = "task.tokenizer") -> "Tokenizer":
    """``bytes`` | ``gpt2`` | a path to a tokenizer.json; errors name ``key``."""
    if spec == "bytes":
        return byte_tokenizer()
    if spec == "gpt2":
        return _from_file(_gpt2_file(key), key)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise SeqzooError(f"{key}: {spec!r} is neither 'bytes', 'gpt2' nor an existing tokenizer.json file")
    return _from_file(str(path.resolve()), key, path.stat().st_mtime_ns)


@lru_cache(maxsize=8)
def _from_file(path: str, key: str, mtime_ns: int = 0) -> "Tokenizer":
    tk = _tokenizers()
    try:
        return tk.Tokenizer.from_file(path)
    except Exception as err:  # the Rust side raises plain Exceptions for malformed files
        raise SeqzooError(f"{key}: {path} is not a valid tokenizer.json ({str(err).splitlines()[0]})") from None


def _gpt2_file(key: str) -> str:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise SeqzooError(f"{key}: 'gpt2' needs huggingface_hub; pip install 'seqzoo[text]'") from None
    try:
        return hf_hub_download(GPT2_REPO, "tokenizer.json", local_files_only=True)  # the hub cache first
    except Exception:  # noqa: BLE001 - not cached: try the network below
        pass
    hint = "without network give a tokenizer.json path instead (train one offline with `seqzoo tokenizer train`)"
    if not _hub_reachable():  # fail at once rather than after the hub client's retries
        raise SeqzooError(f"{key}: 'gpt2' is not in the Hugging Face cache and the hub is unreachable; {hint}")
    try:
        return hf_hub_download(GPT2_REPO, "tokenizer.json")
    except Exception as err:  # offline mode, the repo moved, no access
        raise SeqzooError(f"{key}: 'gpt2' could not be fetched from the Hugging Face hub "
                          f"({type(err).__name__}); {hint}") from None


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def fingerprint(tok: "Tokenizer") -> str:
    """A hash of the whole tokenizer definition (vocabulary, merges, normalisation)."""
    return hashlib.sha1(tok.to_str().encode()).hexdigest()[:16]


def separator_ids(tok: "Tokenizer") -> list[int]:
    """What goes between documents: ``<|endoftext|>`` if the vocabulary has it, else a newline."""
    eos = tok.token_to_id(EOS)
    return [eos] if eos is not None else tok.encode("\n").ids


def save_for_transformers(tok: "Tokenizer", out_dir: Path, *, model_max_length: int) -> list[Path]:
    """tokenizer.json + tokenizer_config.json, so ``AutoTokenizer.from_pretrained(out_dir)``
    (a ``PreTrainedTokenizerFast``) works; no code is involved."""
    out_dir = Path(out_dir)
    tok.save(str(out_dir / "tokenizer.json"))
    # The document separator doubles as BOS / EOS (tools such as lm-eval need one): <|endoftext|>,
    # or for the byte vocabulary the newline the byte corpora are joined with.
    sep = tok.id_to_token(separator_ids(tok)[0])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False, "eos_token": sep, "bos_token": sep}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return [out_dir / "tokenizer.json", out_dir / "tokenizer_config.json"]
