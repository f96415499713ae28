"""Language modelling on tokenised text: local files or a Hugging Face ``datasets`` corpus.

    task: {type: text, tokenizer: runs/bpe.json, path: ~/corpus, seq_len: 256}
    task: {type: text, tokenizer: gpt2, dataset: roneneldan/TinyStories}      # needs network
    task: {type: text, dataset: data/train.parquet, text_field: text}         # local file

The corpus is tokenised once into a memory-mapped token file per split (``uint16`` or
``uint32``) under the cache directory, keyed by the corpus, the tokenizer and the split
settings, and written to a temporary name then renamed, so an interrupted build is never
read. Batches are windows at positions drawn from the step's generator, so a batch is a
pure function of (seed, step) and resume stays exact; only the pages a batch touches are
read. Documents are held out by a stable hash of their name (file path or row index).
Reported: bits per byte (the split's tokens-per-byte ratio converts nats per token), loss
in nats per token, and next-token accuracy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor

from seqzoo.errors import SeqzooError
from seqzoo.tasks.base import Task, TaskConfig, register_task
from seqzoo.tasks.bytes_lm import corpus_files, held_out, held_out_file

CACHE_ENV = "SEQZOO_CACHE"
CACHE_VERSION = 1
LOCAL_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text"}
_BATCH_DOCS = 64  # documents per encode_batch call (the tokenizer parallelises inside a batch)


class TextLMConfig(TaskConfig):
    tokenizer: str = Field("bytes", description="bytes | gpt2 | path to a tokenizer.json")
    path: str | None = Field(None, description="file or directory of text files; default: the Python stdlib source")
    dataset: str | None = Field(None, description="Hugging Face dataset name (streamed), or a local "
                                "parquet / jsonl / json / csv / txt file read through `datasets`")
    dataset_config: str | None = None
    dataset_split: str = "train"
    text_field: str = "text"
    eval_percent: float = Field(5.0, gt=0, lt=100, description="share of documents held out")
    max_bytes: int | None = Field(16_000_000, ge=1024, description="stop reading after this much text; null: all")
    cache_dir: str | None = Field(None, description=f"token cache; default ${CACHE_ENV} or ~/.cache/seqzoo")

    @model_validator(mode="after")
    def _one_source(self) -> "TextLMConfig":
        if self.path is not None and self.dataset is not None:
            raise ValueError("give either `path` (local text files) or `dataset`, not both")
        return self


@register_task
class TextLM(Task):
    name = "text"
    Config = TextLMConfig
    metrics = ("bpb", "loss", "accuracy")

    def __init__(self, config: TextLMConfig) -> None:
        super().__init__(config)
        from seqzoo.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(config.tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    # -- the token cache ------------------------------------------------------------------
    @cached_property
    def cache_path(self) -> Path:
        """The directory holding ``train.bin``, ``eval.bin`` and ``meta.json``; built on first use."""
        from seqzoo.tokenizer import fingerprint

        c = self.config
        key = {"version": CACHE_VERSION, "source": self._source_key(), "tokenizer": fingerprint(self.tokenizer),
               "eval_percent": c.eval_percent, "max_bytes": c.max_bytes, "seed": c.seed}
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        root = Path(c.cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "seqzoo").expanduser()
        path = root / "tokens" / digest
        if not (path / "meta.json").is_file():
            self._build(path, key)
        return path

    def _source_key(self) -> dict[str, Any]:
        c = self.config
        if c.dataset is None:
            root, files = corpus_files(c.path, seed=c.seed)
            stats = [(str(f.relative_to(root)) if f != root else f.name, f.stat().st_size, f.stat().st_mtime_ns)
                     for f in sorted(files)]
            return {"path": str(root.resolve()), "files": hashlib.sha1(json.dumps(stats).encode()).hexdigest()}
        local = Path(c.dataset).expanduser()
        stat = [local.stat().st_size, local.stat().st_mtime_ns] if local.is_file() else None
        return {"dataset": c.dataset, "config": c.dataset_config, "split": c.dataset_split,
                "field": c.text_field, "file": stat}

    def texts(self, split: str) -> Iterator[str]:
        """The documents of one split ("train" or "eval"), e.g. to train a tokenizer on."""
        return (text for is_eval, text in self._documents() if is_eval == (split == "eval"))

    def _documents(self) -> Iterator[tuple[bool, str]]:
        """(held out?, text) per document, in a fixed order, up to ``max_bytes`` of text."""
        c = self.config
        budget = c.max_bytes if c.max_bytes is not None else math.inf
        if c.dataset is None:
            root, files = corpus_files(c.path, seed=c.seed)
            if len(files) == 1:
                text = files[0].read_text(errors="replace")
                yield from _split_tail(text if c.max_bytes is None else text[:c.max_bytes], c.eval_percent)
                return
            source = ((held_out_file(root, f, c.eval_percent), f) for f in files)
            docs = ((is_eval, _read(f)) for is_eval, f in source)
        else:
            docs = ((held_out(str(i), c.eval_percent), text) for i, text in enumerate(self._dataset_texts()))
        for is_eval, text in docs:
            if text is None:
                continue
            if budget <= 0:
                return
            budget -= len(text.encode())
            yield is_eval, text

    def _dataset_texts(self) -> Iterator[str]:
        c = self.config
        try:
            import datasets
        except ImportError:
            raise SeqzooError("task.dataset: needs the `datasets` package; pip install 'seqzoo[text]'") from None
        local = Path(c.dataset).expanduser()
        try:
            if local.is_file():
                fmt = LOCAL_FORMATS.get(local.suffix)
                if fmt is None:
                    raise SeqzooError(f"task.dataset: {local} is a file of unknown format; expected one of "
                                      f"{sorted(LOCAL_FORMATS)}")
                ds = datasets.load_dataset(fmt, data_files=str(local), split="train", streaming=True)
            else:
                ds = datasets.load_dataset(c.dataset, c.dataset_config, split=c.dataset_split, streaming=True)
            for row in ds:
                if c.text_field not in row:
                    raise SeqzooError(f"task.text_field: {c.text_field!r} is not a column of {c.dataset}; "
                                      f"expected one of {sorted(row)}")
                yield row[c.text_field]
        except SeqzooError:
            raise
        except Exception as err:  # network, hub or format errors from `datasets`
            raise SeqzooError(f"task.dataset: could not read {c.dataset!r} ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); without network use a local "
                              f"file or `path:`") from None

    def _build(self, path: Path, key: dict[str, Any]) -> None:
        from seqzoo.tokenizer import EOS, separator_ids

        dtype = np.uint16 if self.vocab_size <= 2**16 else np.uint32
        sep = separator_ids(self.tokenizer)
        # A newline separator is text (one byte); <|endoftext|> is not, so it adds no bytes.
        sep_bytes = 0 if self.tokenizer.token_to_id(EOS) is not None else len(self.tokenizer.decode(sep).encode())
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        counts = {split: {"tokens": 0, "bytes": 0} for split in ("train", "eval")}
        files = {split: open(tmp / f"{split}.bin", "wb") for split in counts}
        try:
            batch: list[tuple[bool, str]] = []
            for doc in self._documents():
                batch.append(doc)
                if len(batch) == _BATCH_DOCS:
                    self._write(batch, files, counts, sep, sep_bytes, dtype)
                    batch = []
            self._write(batch, files, counts, sep, sep_bytes, dtype)
        finally:
            for f in files.values():
                f.close()
        for split, n in counts.items():
            if n["tokens"] < self.config.seq_len + 2:
                shutil.rmtree(tmp, ignore_errors=True)
                raise SeqzooError(f"task: the {split} split holds {n['tokens']} tokens, fewer than seq_len+2 "
                                  f"({self.config.seq_len + 2}); give a larger corpus or a lower eval_percent")
        meta = {"dtype": np.dtype(dtype).name, "splits": counts, "key": key}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished the same cache first
            shutil.rmtree(tmp, ignore_errors=True)
            if not (path / "meta.json").is_file():
                raise

    def _write(self, batch: list[tuple[bool, str]], files: dict[str, Any], counts: dict[str, dict[str, int]],
               sep: list[int], sep_bytes: int, dtype: type) -> None:
        if not batch:
            return
        for (is_eval, text), enc in zip(batch, self.tokenizer.encode_batch([t for _, t in batch])):
            split = "eval" if is_eval else "train"
            ids = np.asarray(enc.ids + sep, dtype=dtype)
            ids.tofile(files[split])
            counts[split]["tokens"] += ids.size
            counts[split]["bytes"] += len(text.encode()) + sep_bytes

    @cached_property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.cache_path / "meta.json").read_text())

    @cached_property
    def splits(self) -> dict[str, np.memmap]:
        dtype = np.dtype(self.meta["dtype"])
        return {split: np.memmap(self.cache_path / f"{split}.bin", dtype=dtype, mode="r")
                for split in ("train", "eval")}

    # -- the task contract ---------------------------------------------------------------
    def make_batch(self, generator: torch.Generator, batch_size: int, *, split: str,
                   seq_len: int | None = None) -> tuple[Tensor, Tensor]:
        t = seq_len or self.config.seq_len
        data = self.splits[split]
        if data.size < t + 2:
            raise SeqzooError(f"task: the {split} split holds {data.size} tokens, fewer than seq_len+2 ({t + 2})")
        starts = torch.randint(0, data.size - t - 1, (batch_size,), generator=generator)
        idx = starts[:, None] + torch.arange(t + 1)  # (B, T+1)
        window = torch.from_numpy(data[idx.numpy()].astype(np.int64))  # reads only these pages
        return window[:, :-1], window[:, 1:]

    def report(self, loss: float, accuracy: float) -> dict[str, float]:
        n = self.meta["splits"]["eval"]
        tokens_per_byte = n["tokens"] / max(n["bytes"], 1)
        return {"bpb": loss / math.log(2) * tokens_per_byte, "loss": loss, "accuracy": accuracy}


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _split_tail(text: str, eval_percent: float) -> Iterator[tuple[bool, str]]:
    cut = int(len(text) * (1 - eval_percent / 100))  # a single file: its tail is held out
    yield False, text[:cut]
    yield True, text[cut:]
