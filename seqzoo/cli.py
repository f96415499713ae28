"""The ``seqzoo`` command: train | eval | generate | describe | list | compare.

User errors (a recipe typo, a missing file, a corrupt checkpoint) print one line naming the
file and the key, and exit with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from seqzoo.errors import SeqzooError

EXAMPLES = """examples:
  seqzoo train recipes/tiny-attention.yaml                 # ~3 min on a laptop CPU
  seqzoo train recipes/tiny-attention.yaml --steps 50 --out runs/try --overwrite
  seqzoo eval runs/tiny-attention
  seqzoo generate runs/tiny-attention --prompt "def " --max-new-tokens 200
  seqzoo list --params
  seqzoo compare recipes/compare/mqar.yaml --smoke         # the whole comparison pipeline in seconds
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqzoo", description="Compose, train and compare token mixers.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("train", help="train a recipe on its task", description=
                       "Train the model a recipe describes on the recipe's task; writes metrics.jsonl, "
                       "checkpoints/ (safetensors + JSON, atomic) and curves.png into --out.")
    t.add_argument("recipe", help="recipe YAML path, or a name in ./recipes/ (e.g. tiny-attention)")
    t.add_argument("--steps", type=int, help="optimiser steps (overrides train.steps)")
    t.add_argument("--device", help="auto | cpu | cuda | cuda:N (overrides train.device; auto = cuda if present)")
    t.add_argument("--out", help="output directory (default: runs/<recipe name>)")
    t.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out (exactly: same batches and schedule)")
    t.add_argument("--overwrite", action="store_true", help="delete checkpoints already in --out and start afresh")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")

    e = sub.add_parser("eval", help="evaluate a checkpoint on its recipe's held-out set",
                       description="Load the latest checkpoint of a run directory (or a checkpoint directory) "
                       "and report the task's metrics on the held-out split.")
    e.add_argument("run", help="run directory (from `seqzoo train --out`) or a checkpoint directory")
    e.add_argument("--batches", type=int, default=16, help="number of eval batches (default 16)")
    e.add_argument("--batch-size", type=int, default=16, help="sequences per eval batch (default 16)")
    e.add_argument("--seq-len", type=int, help="evaluate at this sequence length instead of the task's")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")

    g = sub.add_parser("generate", help="sample text from a trained checkpoint",
                       description="Prefill the prompt, then decode token by token with the model's recurrent state.")
    g.add_argument("run", help="run directory or checkpoint directory")
    g.add_argument("--prompt", default="def ", help="text prompt (bytes for byte-level models)")
    g.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    g.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens (default 40)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")

    c = sub.add_parser("compare", help="train several recipes on one task and write a comparison report",
                       description="Train every model of a sweep file (recipes/compare/*.yaml) on the sweep's "
                       "task with identical data order, seed, steps, optimiser and schedule (optionally the best "
                       "of several learning rates), evaluate at each test length, and write report.md, "
                       "results.json and PNG plots into --out. Exits with 1 if every run of some model failed.")
    c.add_argument("sweep", help="sweep YAML path (e.g. recipes/compare/mqar.yaml)")
    c.add_argument("--smoke", action="store_true",
                   help="a seconds-long run of the whole pipeline: few steps, tiny eval (what CI runs)")
    c.add_argument("--out", help="output directory (default: runs/compare/<sweep name>[-smoke])")
    c.add_argument("--device", help="auto | cpu | cuda | cuda:N (overrides the sweep's train.device)")
    c.add_argument("--jobs", type=int, default=1,
                   help="train this many models at once in worker processes (default 1; on a many-core machine)")
    c.add_argument("--reuse", action="store_true",
                   help="keep finished runs whose recipe is unchanged (continue an interrupted sweep)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")

    d = sub.add_parser("describe", help="print a recipe's layers: mixer, backend, parameters, state size")
    d.add_argument("recipe", help="recipe YAML path or name in ./recipes/")

    lst = sub.add_parser("list", help="list registered mixers, tasks and the recipes in ./recipes/")
    lst.add_argument("--params", action="store_true", help="also build every recipe and print its parameter count")
    lst.add_argument("--recipes-dir", default="recipes", help="where to look for recipes (default ./recipes)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except SeqzooError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _cmd_train(args: argparse.Namespace) -> int:
    from seqzoo.recipes import load_recipe
    from seqzoo.train.loop import train

    recipe = load_recipe(args.recipe)
    result = train(recipe, out_dir=args.out, steps=args.steps, device=args.device, resume=args.resume,
                   overwrite=args.overwrite, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    head = next(iter(result.final_eval), None)
    print(f"\n{recipe.name}: {result.steps} steps in {result.wall_time_s:.1f} s "
          f"({result.tokens_per_s:,.0f} tokens/s) -> {result.out_dir}")
    if head and result.first_eval:
        print(f"eval {head}: {result.first_eval[head]:.3f} -> {result.final_eval[head]:.3f}")
    elif head:
        print(f"eval {head}: {result.final_eval[head]:.3f}")
    if result.plot:
        print(f"curves: {result.plot}")
    if result.sample is not None:
        print("\nsample:\n" + result.sample)
    return 0


def _load_run(run: str, device: str):
    """(model, recipe, checkpoint path) from a run or checkpoint directory; no code executed."""
    from seqzoo.errors import CheckpointError
    from seqzoo.models.lm import LanguageModel
    from seqzoo.recipes import recipe_from_dict
    from seqzoo.train import checkpoint as ckpt
    from seqzoo.train.loop import resolve_device

    path = Path(run)
    if not path.exists():
        raise CheckpointError(str(path), "no such run or checkpoint directory")
    target = path if (path / "state.json").exists() else ckpt.latest_checkpoint(path)
    if target is None:
        raise CheckpointError(str(path), "holds no checkpoint (expected checkpoints/latest.json or state.json)")
    state = ckpt.read_state(target)
    if "recipe" not in state:
        raise CheckpointError(str(target / "state.json"), "no recipe stored", key="recipe")
    recipe = recipe_from_dict(state["recipe"], path=str(target / "state.json"))
    dev = resolve_device(device)
    model = LanguageModel(recipe)
    ckpt.load_model_weights(target, model)
    return model.to(dev).eval(), recipe, target, dev


def _cmd_eval(args: argparse.Namespace) -> int:
    from seqzoo.tasks import build_task
    from seqzoo.train.evaluate import evaluate

    model, recipe, target, dev = _load_run(args.run, args.device)
    task = build_task(recipe.task)
    metrics = evaluate(model, task, n_batches=args.batches, batch_size=args.batch_size, device=dev,
                       seq_len=args.seq_len)
    print(f"{target}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from seqzoo.tasks import build_task

    model, recipe, _, dev = _load_run(args.run, args.device)
    if build_task(recipe.task).name != "bytes":
        raise SeqzooError(f"generate: the recipe's task is {recipe.task.get('type')!r}; text generation needs a byte-level (bytes) model")
    ids = torch.tensor(list(args.prompt.encode()), device=dev)[None]
    if ids.shape[1] == 0:
        raise SeqzooError("--prompt: expected at least one character")
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    out = model.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, generator=gen)
    print(bytes(out[0].tolist()).decode("utf-8", errors="replace"))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from seqzoo.compare import run_sweep

    result = run_sweep(args.sweep, out_dir=args.out, smoke=args.smoke, device=args.device,
                       progress=not args.no_progress, jobs=args.jobs, reuse=args.reuse)
    print(f"\n{result.table}\n")
    print(f"report: {result.report}")
    for plot in result.plots:
        print(f"plot: {plot}")
    if result.failed:
        print(f"error: no run of {', '.join(result.failed)} finished; see the Failures section of the report",
              file=sys.stderr)
        return 1
    return 0


def _cmd_describe(args: argparse.Namespace) -> int:
    import seqzoo

    print(seqzoo.build_model(args.recipe).describe())
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from seqzoo import mixers
    from seqzoo.tasks import available_tasks

    print("mixers: " + ", ".join(mixers.available()))
    print("tasks:  " + ", ".join(available_tasks()))
    recipes = sorted(Path(args.recipes_dir).rglob("*.yaml")) if Path(args.recipes_dir).exists() else []
    if not recipes:
        return 0
    print("\n| recipe | mixers | parameters |" if args.params else "\nrecipes:")
    if args.params:
        print("|---|---|---:|")
    import torch

    import seqzoo

    for path in recipes:
        if not args.params:
            print(f"  {path}")
            continue
        try:
            recipe = seqzoo.load_recipe(path)
        except SeqzooError:
            continue  # not a model recipe (e.g. a comparison sweep)
        with torch.device("meta"):  # shapes only: counts 340M-parameter recipes instantly
            model = seqzoo.build_model(recipe)
        kinds = sorted({b.mixer.name for b in model.blocks})
        print(f"| {path} | {', '.join(kinds)} | {model.num_params():,} |")
    return 0


COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "generate": _cmd_generate, "describe": _cmd_describe,
            "list": _cmd_list, "compare": _cmd_compare}

if __name__ == "__main__":
    sys.exit(main())
