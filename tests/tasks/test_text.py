"""The text task: tokenised once into a memory-mapped cache, batches a pure function of
(seed, step), documents held out by name, bits per byte, local datasets files, exact resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers")

import seqzoo  # noqa: E402
from seqzoo.errors import SeqzooError  # noqa: E402
from seqzoo.mixers.base import ConfigError  # noqa: E402
from seqzoo.tasks import build_task  # noqa: E402
from seqzoo.tasks.text import TextLM  # noqa: E402
from seqzoo.tokenizer import train_bpe  # noqa: E402
from seqzoo.train.loop import train  # noqa: E402

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def make_corpus(root, n_files=40, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        body = " ".join(rng.choice(WORDS, size=120)) + f"\n# file {i} ü€\n"
        (root / f"doc{i:03d}.txt").write_text(body)
    return root


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path / "corpus")


@pytest.fixture
def bpe(tmp_path, corpus):
    path = tmp_path / "bpe.json"
    texts = (p.read_text() for p in sorted(corpus.glob("*.txt")))
    train_bpe(texts, vocab_size=300).save(str(path))
    return path


def spec(corpus, tmp_path, **kw):
    return {"type": "text", "path": str(corpus), "seq_len": 16, "cache_dir": str(tmp_path / "cache"),
            "eval_percent": 20, **kw}


def test_cache_is_built_once_and_batches_are_pure_functions_of_seed_and_step(corpus, tmp_path, bpe, monkeypatch):
    a = build_task(spec(corpus, tmp_path, tokenizer=str(bpe)))
    first = [a.train_batch(step, 4) for step in range(3)]
    meta = json.loads((a.cache_path / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["splits"]["train"]["tokens"] > 0
    assert isinstance(a.splits["train"], np.memmap)  # read through the page cache, never loaded whole

    def no_rebuild(*args, **kw):
        raise AssertionError("the cache was tokenised a second time")

    monkeypatch.setattr(TextLM, "_build", no_rebuild)
    b = build_task(spec(corpus, tmp_path, tokenizer=str(bpe)))  # a fresh task: reads the cache
    for step, (x, y) in enumerate(first):
        bx, by = b.train_batch(step, 4)
        assert torch.equal(x, bx) and torch.equal(y, by)
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    assert not torch.equal(first[0][0], first[1][0])
    # Each row is a contiguous window of the token file.
    tokens = np.fromfile(a.cache_path / "train.bin", dtype=np.uint16)
    row = first[2][0][0].numpy()
    hits = [i for i in range(tokens.size - 16) if (tokens[i:i + 16] == row).all()]
    assert hits
    # Another tokenizer (or corpus) gets its own cache.
    c = build_task(spec(corpus, tmp_path, tokenizer="bytes"))
    monkeypatch.undo()
    assert c.cache_path != a.cache_path and c.vocab_size == 256


def test_held_out_documents_and_bits_per_byte(corpus, tmp_path):
    task = build_task(spec(corpus, tmp_path, tokenizer="bytes"))
    train_text, eval_text = "".join(task.texts("train")), "".join(task.texts("eval"))
    assert eval_text and train_text
    train_files = {line for line in train_text.splitlines() if line.startswith("# file")}
    eval_files = {line for line in eval_text.splitlines() if line.startswith("# file")}
    assert train_files and eval_files and not train_files & eval_files
    n = task.meta["splits"]
    assert n["eval"]["tokens"] == len(eval_text.encode()) + len(eval_files)  # bytes + one newline per document
    assert n["eval"]["bytes"] == n["eval"]["tokens"]  # one token per byte
    assert task.report(1.0, 0.5)["bpb"] == pytest.approx(1 / math.log(2), rel=1e-12)
    assert task.decode(task.encode("ünï €")) == "ünï €" and task.encode("a") == [97]


def test_bpe_bits_per_byte_uses_the_tokens_per_byte_ratio(corpus, tmp_path, bpe):
    task = build_task(spec(corpus, tmp_path, tokenizer=str(bpe)))
    n = task.meta["splits"]["eval"]
    assert n["tokens"] < n["bytes"]  # merges: fewer tokens than bytes
    assert task.report(2.0, 0.0)["bpb"] == pytest.approx(2.0 / math.log(2) * n["tokens"] / n["bytes"], rel=1e-12)
    assert task.decode(task.encode("alpha beta ü")) == "alpha beta ü"


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_local_dataset_files(tmp_path, fmt):
    pytest.importorskip("datasets")
    rows = [{"id": i, "body": f"row {i}: " + " ".join(WORDS[i % 12:] * 8)} for i in range(60)]
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq = pytest.importorskip("pyarrow.parquet")
        import pyarrow as pa

        pq.write_table(pa.Table.from_pylist(rows), path)
    task = build_task({"type": "text", "dataset": str(path), "text_field": "body", "seq_len": 16,
                       "cache_dir": str(tmp_path / "cache"), "eval_percent": 20})
    texts = list(task.texts("train")) + list(task.texts("eval"))
    assert sorted(texts) == sorted(r["body"] for r in rows)
    x, y = task.train_batch(0, 2)
    assert x.shape == (2, 16) and x.max() < 256
    bad = build_task({"type": "text", "dataset": str(path), "text_field": "txt", "seq_len": 16,
                      "cache_dir": str(tmp_path / "cache2")})
    with pytest.raises(SeqzooError, match="task.text_field: 'txt' is not a column"):
        bad.train_batch(0, 2)


def test_bad_settings_are_clear(tmp_path, corpus):
    with pytest.raises(ConfigError, match="either `path`"):
        build_task({"type": "text", "path": str(corpus), "dataset": "x"})
    with pytest.raises(SeqzooError, match="task.tokenizer: 'nope.json' is neither"):
        build_task({"type": "text", "tokenizer": "nope.json"})
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(SeqzooError, match="not a valid tokenizer.json"):
        build_task({"type": "text", "tokenizer": str(tmp_path / "broken.json")})
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "a.txt").write_text("short")
    with pytest.raises(SeqzooError, match="fewer than seq_len"):
        build_task({"type": "text", "path": str(tiny), "cache_dir": str(tmp_path / "c")}).train_batch(0, 1)


def test_resume_on_the_text_task_is_exact(corpus, tmp_path, bpe):
    recipe = seqzoo.recipe_from_dict({
        "name": "text", "model": {"d_model": 16, "n_layers": 1, "mixers": {"a": {"type": "attention", "n_heads": 2}}},
        "task": spec(corpus, tmp_path, tokenizer=str(bpe)),
        "train": {"steps": 6, "batch_size": 2, "eval_every": 100, "eval_batches": 1, "ckpt_every": 3, "log_every": 1,
                  "warmup_steps": 1, "sample_tokens": 4, "device": "cpu"}})
    assert seqzoo.build_model(recipe).vocab_size == 300
    straight = train(recipe, out_dir=tmp_path / "straight", progress=False, plot=False)
    assert isinstance(straight.sample, str) and straight.sample.startswith("def ")

    def crash(step, record):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(recipe, out_dir=tmp_path / "resumed", progress=False, plot=False, on_step=crash)
    train(recipe, out_dir=tmp_path / "resumed", progress=False, plot=False, resume=True)

    def losses(out):
        return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if r["split"] == "train"]

    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert [s for s, _ in losses(tmp_path / "straight")] == list(range(1, 7))
