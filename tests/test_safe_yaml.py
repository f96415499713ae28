"""Reading recipe files cannot execute code, block, or blow up: every refusal is one
RecipeError naming the file (and the key where there is one)."""

from __future__ import annotations

import os
import threading

import pytest

import seqzoo
from seqzoo.compare.schema import load_sweep
from seqzoo.errors import RecipeError
from seqzoo.limits import MAX_RECIPE_BYTES
from seqzoo.safe_yaml import load_yaml_file, parse_yaml

GOOD = "name: t\nmodel: {d_model: 32, mixers: {a: {type: attention, n_heads: 2}}}\ntrain: {lr: 1e-3}\n"


def refused(text: str, match: str) -> None:
    with pytest.raises(RecipeError, match=match) as info:
        parse_yaml(text, source="r.yaml")
    assert str(info.value).startswith("r.yaml: ") and "\n" not in str(info.value)


def test_plain_yaml_loads_with_yaml_1_2_floats():
    assert parse_yaml(GOOD, source="r.yaml")["train"]["lr"] == 0.001
    assert parse_yaml("a: [1e12, 3.0e-3, -2E+5, 12, 1.5]", source="r")["a"] == [1e12, 3e-3, -2e5, 12, 1.5]
    assert parse_yaml("base: &b {x: 1, y: 2}\nd: {<<: *b, y: 3}\n", source="r")["d"] == {"x": 1, "y": 3}


@pytest.mark.parametrize("text, match", [
    ("a: 1\nb: 2\na: 3\n", r"r.yaml: a: duplicate key \(line 1 and line 3\)"),
    ("m:\n  x: 1\n  x: 2\n", r"m.x: duplicate key"),
    ("1: a\n", "key '1' .* is not a string"),
    ("on: a\n", "key 'on' .* is not a string"),
    ("null: a\n", "key 'null' .* is not a string"),
    ("? [a, b]\n: c\n", "key 'sequence' .* is not a string"),
    ("a: " + "[" * 3000 + "]" * 3000, "nested deeper than 32 levels"),
    ("".join("  " * i + f"k{i}:\n" for i in range(100)), "nested deeper than 32 levels"),
    ("a: &a [*a]\n", r"a\[0\]: a recursive alias"),
    ("a: &a {b: *a}\n", r"a.b: a recursive alias"),
    ("a: !!python/object/apply:os.system ['echo pwned']\n", "not valid YAML: could not determine a constructor"),
    ("a: [1,\n", r"not valid YAML: .* \(line 2, column 1\)"),
    ("a: \x00\n", "not valid YAML: unacceptable character"),
    ("a: " + "9" * 5000, "a number is too long to read"),
])
def test_dangerous_or_ambiguous_yaml_is_refused(text, match):
    refused(text, match)


def test_an_alias_bomb_is_refused_without_being_expanded():
    levels = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    refused("\n".join(levels) + "\ntrain: {betas: *a8}\n", "expands to more than 100,000 values")  # 10^9 values


def test_aliases_within_limits_are_plain_yaml():
    assert parse_yaml("a: &x [1, 2]\nb: *x\n", source="r") == {"a": [1, 2], "b": [1, 2]}


def test_special_files_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "big.yaml").write_text("#" * (MAX_RECIPE_BYTES + 1))
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (tmp_path / "utf16.yaml").write_bytes(GOOD.encode("utf-16"))
    cases = {fifo: "is not a regular file", "/dev/zero": "is not a regular file",
             tmp_path / "dir.yaml": "is a directory", tmp_path / "big.yaml": "may hold at most 1,048,576",
             tmp_path / "latin1.yaml": r"is not UTF-8 text \(byte 9", tmp_path / "utf16.yaml": "is not UTF-8 text",
             tmp_path / "missing.yaml": "no such recipe file"}
    result: dict = {}

    def load_all():  # in a thread, so that a blocking open fails the test instead of hanging it
        for path, match in cases.items():
            with pytest.raises(RecipeError, match=match):
                load_yaml_file(path)
        result["done"] = True

    worker = threading.Thread(target=load_all, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert result.get("done"), "reading a special file blocked or failed"


def test_recipes_and_sweeps_are_read_through_it(tmp_path):
    (tmp_path / "r.yaml").write_text(GOOD + "name: again\n")
    with pytest.raises(RecipeError, match="r.yaml: name: duplicate key"):
        seqzoo.load_recipe(tmp_path / "r.yaml")
    (tmp_path / "s.yaml").write_text("name: s\nname: t\n")
    with pytest.raises(RecipeError, match="s.yaml: name: duplicate key"):
        load_sweep(tmp_path / "s.yaml")
    (tmp_path / "d.yaml").mkdir()
    with pytest.raises(RecipeError, match="is a directory"):
        load_sweep(tmp_path / "d.yaml")
