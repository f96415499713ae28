"""Bad recipes give one clear error naming the file, the key and what was expected."""

from __future__ import annotations

import pytest
import yaml

import seqzoo
from seqzoo import mixers
from seqzoo.errors import RecipeError
from seqzoo.mixers.base import ConfigError

GOOD = {
    "name": "t",
    "model": {"d_model": 32, "n_layers": 2, "mixers": {"attn": {"type": "attention", "n_heads": 4}},
              "pattern": ["attn"]},
    "task": {"type": "mqar", "seq_len": 32, "num_kv_pairs": 4, "vocab_size": 32},
    "train": {"steps": 2, "batch_size": 2},
}


def write(tmp_path, data, name="r.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def with_change(path: list, value):
    import copy

    data = copy.deepcopy(GOOD)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


def test_good_recipe_loads(tmp_path):
    recipe = seqzoo.load_recipe(write(tmp_path, GOOD))
    assert recipe.model.layer_names() == ["attn", "attn"]
    assert seqzoo.build_model(recipe).vocab_size == 32


@pytest.mark.parametrize("change, key, expected", [
    ((["model", "d_modle"], 32), "model.d_modle", "unknown key"),
    ((["train", "stesp"], 3), "train.stesp", "unknown key"),
    ((["model", "d_model"], "wide"), "model.d_model", "integer"),
    ((["model", "mixers"], {"attn": {"type": "atention"}}), "model.mixers.attn.type", "unknown mixer 'atention'"),
    ((["model", "mixers"], {"attn": {"type": "attention", "n_heads": 3}}), "model.mixers.attn.n_heads", "divisor of d_model=32"),
    ((["model", "mixers"], {"attn": {"type": "attention", "n_head": 4}}), "model.mixers.attn.n_head", "unknown key for mixer 'attention'"),
    ((["model", "mixers"], {"attn": {"n_heads": 4}}), "model.mixers.attn.type", "needs a `type`"),
    ((["model", "pattern"], ["attn", "mamba9"]), "model.pattern[1]", "not an entry of model.mixers"),
    ((["task", "type"], "mqarr"), "task.type", "unknown task"),
    ((["task", "vocab_sise"], 3), "task.vocab_sise", "unknown key for task"),
    ((["model", "vocab_size"], 16), "model.vocab_size", "at least 32"),
    ((["train", "grad_accum"], 3), "train", "divisible"),
])
def test_bad_recipe_names_file_and_key(tmp_path, change, key, expected):
    path = write(tmp_path, with_change(*change))
    with pytest.raises(RecipeError) as info:
        seqzoo.load_recipe(path)
    message = str(info.value)
    assert str(path) in message and key in message and expected in message, message


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML"):
        seqzoo.load_recipe(write(tmp_path, "model: [unclosed"))
    with pytest.raises(RecipeError, match="no such recipe"):
        seqzoo.load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="expected a mapping"):
        seqzoo.load_recipe(write(tmp_path, "- a\n- b\n"))


def test_recipe_cannot_execute_code(tmp_path):
    # A Python-object tag is refused by safe_load instead of being constructed.
    evil = "name: !!python/object/apply:os.system ['echo pwned']\n"
    with pytest.raises(RecipeError, match="not valid YAML"):
        seqzoo.load_recipe(write(tmp_path, evil))


def test_mixers_api():
    assert "attention" in mixers.available()
    m = mixers.build("attention", d_model=32, n_heads=2, window=8)
    assert m.config.window == 8 and m.d_model == 32
    with pytest.raises(ConfigError, match="n_heads"):
        mixers.build("attention", d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="backend"):
        mixers.build("attention", d_model=32, backend="fla").backend


def test_explicit_layers(tmp_path):
    data = with_change(["model", "mixers"], {"a": {"type": "attention", "n_heads": 2},
                                             "w": {"type": "attention", "n_heads": 2, "window": 4}})
    data["model"].pop("pattern")
    data["model"]["layers"] = ["a", "w"]
    model = seqzoo.build_model(seqzoo.load_recipe(write(tmp_path, data)))
    assert [b.mixer.config.window for b in model.blocks] == [None, 4]
    data["model"]["layers"] = ["a", "w", "a"]
    with pytest.raises(RecipeError, match="model.layers"):
        seqzoo.load_recipe(write(tmp_path, data))
