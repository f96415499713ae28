"""Strict schemas: no bool-as-int, no string-as-number, no NaN or infinity, upper bounds on
everything that allocates, every CLI number checked the way the recipe is; and numbers that
would look perfect while measuring nothing are refused."""

from __future__ import annotations

import copy
import glob
import re

import pytest
import yaml

import seqzoo
from seqzoo.cli import main
from seqzoo.compare.runner import build_recipes
from seqzoo.compare.schema import load_sweep
from seqzoo.errors import RecipeError, SeqzooError
from seqzoo.train.loop import train

GOOD = {
    "name": "t",
    "model": {"d_model": 32, "n_layers": 1, "mixers": {"a": {"type": "attention", "n_heads": 2}}},
    "task": {"type": "mqar", "seq_len": 32, "num_kv_pairs": 4, "vocab_size": 32},
    "train": {"steps": 2, "batch_size": 2, "eval_batches": 1, "warmup_steps": 1, "log_every": 1},
}


def changed(path: str, value):
    data = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return data


@pytest.mark.parametrize("path, value, key, expected", [
    ("model.n_layers", True, "model.n_layers", "valid integer"),
    ("model.d_model", "32", "model.d_model", "valid integer"),
    ("model.d_model", 32.0, "model.d_model", "valid integer"),
    ("train.lr", True, "train.lr", "valid number"),
    ("train.lr", float("inf"), "train.lr", "finite number"),
    ("train.lr", float("nan"), "train.lr", "finite number"),
    ("train.lr", 1e12, "train.lr", "less than or equal to 1"),
    ("train.betas", [True, 0.9], "train.betas[0]", "valid number"),
    ("train.betas", [0.9, 1.5], "train.betas[1]", "less than 1"),
    ("train.steps", 0, "train.steps", "greater than or equal to 1"),
    ("train.seed", 2**70, "train.seed", "less than or equal to"),
    ("train.eval_batch_size", -1, "train.eval_batch_size", "greater than or equal to 1"),
    ("train.device", "meta", "train.device", "expected auto, cpu, cuda, cuda:N or mps"),
    ("model.d_model", 10**12, "model.d_model", "less than or equal to 65536"),
    ("model.pattern", [], "model.pattern", "at least 1 item"),
    ("model.mixers", {}, "model.pattern", "expected at least one mixer entry"),  # found by the fuzzer
    ("model.tie_embeddings", 1, "model.tie_embeddings", "valid boolean"),
    ("model.mixers.a.n_heads", True, "model.mixers.a.n_heads", "valid integer"),
    ("model.mixers.a.n_heads", 2**70, "model.mixers.a.n_heads", "at most 1,048,576"),
    ("model.mixers.a.rope_base", float("inf"), "model.mixers.a.rope_base", "finite number"),
    ("model.mixers.a.type", ["attention"], "model.mixers.a.type", "needs a `type`"),
    ("task.type", ["mqar"], "task.type", "unknown task"),
    ("task.seq_len", 0, "task.seq_len", "greater than or equal to 1"),
    ("task.seq_len", -5, "task.seq_len", "greater than or equal to 1"),
    ("task.seq_len", 2**70, "task.seq_len", "less than or equal to"),
    ("task.vocab_size", True, "task.vocab_size", "valid integer"),
    ("task.seed", 2**70, "task.seed", "less than or equal to"),
    ("name", "../escape", "name", "should match pattern"),
])
def test_invalid_values_are_refused_naming_the_key(path, value, key, expected):
    with pytest.raises(RecipeError) as info:
        seqzoo.recipe_from_dict(changed(path, value), path="r.yaml")
    message = str(info.value)
    assert message.startswith(f"r.yaml: {key}: ") and expected in message and "\n" not in message, message


def test_every_recipe_and_sweep_in_the_repository_is_valid(capsys):
    recipes = glob.glob("recipes/*.yaml") + glob.glob("recipes/paper-340m/*.yaml")
    sweeps = glob.glob("recipes/compare/*.yaml") + glob.glob("recipes/reproduce/*.yaml")
    assert len(recipes) >= 30 and len(sweeps) >= 18
    for path in recipes:
        assert main(["describe", path]) == 0, path  # built on "meta": every mixer, no memory
    for path in sweeps:
        sweep = load_sweep(path)
        build_recipes(sweep, path)
        build_recipes(sweep, path, smoke=True)


def test_sweeps_are_strict_and_bounded(tmp_path):
    base = {"name": "s", "task": {"type": "mqar", "seq_len": 32, "num_kv_pairs": 4, "vocab_size": 32},
            "models": ["recipes/tiny-attention.yaml"]}
    for change, key in [({"lrs": [True]}, "lrs[0]"), ({"lrs": [1e12]}, "lrs[0]"), ({"eval_seq_lens": [2**70]},
                        "eval_seq_lens[0]"), ({"train": {"seed": 2**70}}, "train.seed"),
                        ({"smoke": {"steps": True}}, "smoke.steps"), ({"eval_batches": 0}, "eval_batches")]:
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump({**base, **change}))
        with pytest.raises(RecipeError, match=re.escape(f"s.yaml: {key}: ")):
            load_sweep(path)
    path.write_text(yaml.safe_dump({**base, "task": {**base["task"], "seed": 2**70}}))
    with pytest.raises(RecipeError, match=r"task.seed: Input should be less than or equal to"):
        build_recipes(load_sweep(path), path)


def test_command_line_overrides_are_validated_like_the_recipe(tmp_path):
    recipe = seqzoo.recipe_from_dict(GOOD)
    for steps in (0, -3):
        with pytest.raises(RecipeError, match=r"command line: train.steps: Input should be greater than or equal to 1"):
            train(recipe, out_dir=tmp_path / "o", steps=steps, progress=False)
    with pytest.raises(RecipeError, match="train.device: expected auto"):
        train(recipe, out_dir=tmp_path / "o", device="meta", progress=False)
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_a_mean_over_nothing_is_an_error_not_a_perfect_score():
    from seqzoo.tasks import build_task
    from seqzoo.train.evaluate import evaluate

    model = seqzoo.build_model(GOOD)
    with pytest.raises(SeqzooError, match="saw no target tokens"):
        evaluate(model, build_task(GOOD["task"]), n_batches=0, batch_size=2, device="cpu")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    data = {**GOOD, "task": {"type": "bytes", "seq_len": 32, "path": str(seqzoo.__path__[0]), "max_bytes": 100_000},
            "train": {**GOOD["train"], "sample_tokens": 0}}
    train(seqzoo.recipe_from_dict(data), out_dir=out, progress=False, plot=False)
    return out


@pytest.mark.parametrize("argv, expected", [
    (["eval", "RUN", "--batches", "0"], "argument --batches: expected an integer in [1, 1,000,000], got '0'"),
    (["eval", "RUN", "--batches", "-1"], "argument --batches: expected an integer"),
    (["eval", "RUN", "--batch-size", "0"], "argument --batch-size: expected an integer"),
    (["eval", "RUN", "--seq-len", "-5"], "argument --seq-len: expected an integer"),
    (["eval", "RUN", "--seq-len", "100000000"], "argument --seq-len: expected an integer"),
    (["eval", "RUN", "--seq-len", "1000000", "--batches", "1"], "expected a sequence length of at most"),
    (["eval", "RUN", "--seq-len", "1000000", "--batch-size", "60000"], "needs at least"),
    (["eval", "RUN", "--device", "meta"], "--device: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'meta'"),
    (["generate", "RUN", "--top-k", "0"], "argument --top-k: expected an integer"),
    (["generate", "RUN", "--top-k", "-1"], "argument --top-k: expected an integer"),
    (["generate", "RUN", "--temperature", "nan"], "argument --temperature: expected a finite number"),
    (["generate", "RUN", "--temperature", "inf"], "argument --temperature: expected a finite number"),
    (["generate", "RUN", "--max-new-tokens", "-1"], "argument --max-new-tokens: expected an integer"),
    (["generate", "RUN", "--prompt", ""], "--prompt: expected at least one character"),
    (["compare", "recipes/compare/mqar.yaml", "--jobs", "0"], "argument --jobs: expected an integer"),
    (["train", "recipes/tiny-attention.yaml", "--steps", "x"], "argument --steps: invalid int value"),
])
def test_bad_command_line_numbers_are_one_line(argv, expected, run, capsys):
    argv = [str(run) if a == "RUN" else a for a in argv]
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err


def _numeric_fields(config_cls) -> list[str]:
    out = []
    for name, field in config_cls.model_fields.items():
        kinds = str(field.annotation)
        if ("int" in kinds or "float" in kinds) and "bool" not in kinds:
            out.append(name)
    return out


def test_no_numeric_field_of_any_schema_takes_a_bool():
    """`true` is not 1 anywhere: every numeric field of every mixer, task and training schema."""
    from seqzoo import mixers
    from seqzoo.compare.schema import SmokeSpec, Sweep
    from seqzoo.mixers.base import ConfigError, get, make_config
    from seqzoo.recipes import ModelSpec, TrainSpec
    from seqzoo.tasks import available_tasks, build_task
    from seqzoo.tasks.base import _TASKS

    checked = 0
    for name in mixers.available():
        for field in _numeric_fields(get(name).Config):
            with pytest.raises(ConfigError) as info:
                make_config(name, {field: True}, d_model=64)
            assert info.value.key.startswith(field), (name, field, info.value)
            checked += 1
    for task in available_tasks():
        for field in _numeric_fields(_TASKS[task].Config):
            with pytest.raises(ConfigError) as info:
                build_task({"type": task, field: True})
            assert info.value.key.startswith(field), (task, field, info.value)
            checked += 1
    for schema in (ModelSpec, TrainSpec, SmokeSpec, Sweep):
        for field in _numeric_fields(schema):
            errors = None
            try:
                schema.model_validate({field: True})
            except Exception as err:  # noqa: BLE001 - pydantic's ValidationError
                errors = [e["loc"][0] for e in err.errors()]
            assert errors and field in errors, (schema.__name__, field)
            checked += 1
    assert checked >= 60


def test_no_integer_hyper_parameter_of_a_mixer_is_unbounded():
    from seqzoo import mixers
    from seqzoo.mixers.base import ConfigError, get, make_config

    for name in mixers.available():
        for field, info in get(name).Config.model_fields.items():
            if "int" in str(info.annotation) and "bool" not in str(info.annotation):
                with pytest.raises(ConfigError, match=field):
                    make_config(name, {field: 2**70}, d_model=64)


def test_list_params_survives_oversized_and_invalid_recipes(tmp_path, capsys):
    big = changed("model.d_model", 60000)
    big["model"]["n_layers"] = 64
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(big))
    (tmp_path / "overflow.yaml").write_text(yaml.safe_dump(changed("model.mixers.a.n_heads", 2**70)))
    assert main(["list", "--params", "--recipes-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "big.yaml" in out and "overflow.yaml" not in out


def test_a_recipe_survives_the_json_round_trip_of_state_json():
    """The one field that admits infinity (mamba2's dt_limit) stays infinite, not null."""
    import json

    from seqzoo.train.resume_check import canonical

    data = changed("model.mixers", {"m": {"type": "mamba2", "d_state": 16, "headdim": 16,
                                          "dt_limit": [0.0, float("inf")]}})
    data["model"]["pattern"] = ["m"]
    recipe = seqzoo.recipe_from_dict(data)
    again = seqzoo.recipe_from_dict(json.loads(json.dumps(recipe.model_dump(mode="json"))))
    assert again.model.mixers["m"]["dt_limit"] == [0.0, float("inf")] and canonical(again) == canonical(recipe)


def test_a_byte_model_with_a_larger_vocabulary_samples_text(tmp_path, capsys):
    """The paper recipes pair a 32K vocabulary with the byte task: ids past 255 are not bytes
    (found by the fuzzer: the end-of-training sample raised ValueError)."""
    from seqzoo.models.generation import bytes_text

    assert bytes_text([104, 105, 300]) == "hi\ufffd" and bytes_text([0xC3, 0xA9]) == "é"
    data = {**GOOD, "model": {**GOOD["model"], "vocab_size": 4096},
            "task": {"type": "bytes", "seq_len": 32, "path": str(seqzoo.__path__[0]), "max_bytes": 100_000},
            "train": {**GOOD["train"], "steps": 1, "sample_tokens": 64, "lr": 1.0}}  # lr 1: wild samples
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["train", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert main(["generate", str(tmp_path / "o"), "--max-new-tokens", "64", "--temperature", "5",
                 "--top-k", "4096"]) == 0
    capsys.readouterr()
