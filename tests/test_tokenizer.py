"""Tokenizers: the byte vocabulary equals the bytes task's ids, BPE trains offline (API and
`seqzoo tokenizer train`), `gpt2` without network fails in one clear line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("tokenizers")

from seqzoo.cli import main  # noqa: E402
from seqzoo.errors import SeqzooError  # noqa: E402
from seqzoo.tokenizer import EOS, byte_tokenizer, load_tokenizer, separator_ids, train_bpe  # noqa: E402

TEXT = "def f(x):\n    return x ** 2  # ünïcödé € 😀\n"


def test_byte_tokenizer_ids_are_utf8_bytes():
    tok = byte_tokenizer()
    assert tok.get_vocab_size() == 256
    assert tok.encode(TEXT).ids == list(TEXT.encode())
    assert tok.decode(list(TEXT.encode())) == TEXT
    assert separator_ids(tok) == [10]


def test_bpe_trains_offline_and_round_trips(tmp_path):
    texts = [TEXT * 20, "import os\nimport sys\n" * 30]
    tok = train_bpe(texts, vocab_size=300)
    assert tok.token_to_id(EOS) == 0 and separator_ids(tok) == [0]
    assert 258 <= tok.get_vocab_size() <= 300
    ids = tok.encode(TEXT).ids
    assert len(ids) < len(TEXT.encode()) and tok.decode(ids) == TEXT
    tok.save(str(tmp_path / "t.json"))
    assert load_tokenizer(str(tmp_path / "t.json")).encode(TEXT).ids == ids
    with pytest.raises(SeqzooError, match="--vocab-size"):
        train_bpe(texts, vocab_size=100)


def test_cli_tokenizer_train(tmp_path, capsys):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"{i}.py").write_text(TEXT * (i + 1))
    out = tmp_path / "bpe.json"
    assert main(["tokenizer", "train", "--path", str(corpus), "--vocab-size", "280", "--out", str(out)]) == 0
    assert "byte-level BPE" in capsys.readouterr().out
    assert load_tokenizer(str(out)).decode(load_tokenizer(str(out)).encode(TEXT).ids) == TEXT
    assert main(["tokenizer", "train", "--path", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "task.path" in capsys.readouterr().err


def test_gpt2_offline_is_one_clear_line(tmp_path):
    recipe = tmp_path / "g.yaml"
    recipe.write_text("model: {d_model: 16, n_layers: 1, mixers: {a: {type: attention, n_heads: 2}}}\n"
                      "task: {type: text, tokenizer: gpt2}\n")
    proc = subprocess.run([sys.executable, "-m", "seqzoo", "describe", str(recipe)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode == 0:  # a cached copy exists on this machine: then it must be GPT-2's
        assert "vocab=50257" in proc.stdout
        return
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: task.tokenizer: 'gpt2'") and "tokenizer.json" in lines[0]
