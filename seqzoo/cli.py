"""The ``seqzoo`` command: train | eval | generate | describe | list | compare | export | tokenizer.

User errors (a recipe typo, a missing file, a corrupt checkpoint) print one line naming the
file and the key, and exit with code 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from seqzoo.cli_args import OneLineParser, float_in, int_in
from seqzoo.errors import SeqzooError
from seqzoo.limits import MAX_BATCH, MAX_EVAL_BATCHES, MAX_NEW_TOKENS, MAX_SEED, MAX_SEQ_LEN, MAX_VOCAB

EXAMPLES = """examples:
  seqzoo train recipes/tiny-attention.yaml                 # ~3 min on a laptop CPU
  seqzoo train recipes/tiny-attention.yaml --steps 50 --out runs/try --overwrite
  seqzoo train tiny-attention train.lr=1e-3 model.d_model=64 task.seq_len=256   # dotted overrides
  seqzoo eval runs/tiny-attention
  seqzoo generate runs/tiny-attention --prompt "def " --max-new-tokens 200
  seqzoo list --params
  seqzoo compare recipes/compare/mqar.yaml --smoke         # the whole comparison pipeline in seconds
  seqzoo export runs/tiny-attention hf/tiny-attention      # a Hugging Face style pretrained directory
  seqzoo tokenizer train --vocab-size 4096 --out bpe.json  # byte-level BPE on the local corpus
"""
OVERRIDES_HELP = ("recipe values to change, KEY=VALUE with a dotted key (train.lr=1e-3 model.d_model=64 "
                  "model.mixers.attn.window=32); values are YAML scalars, validated like the file")


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="seqzoo", description="Compose, train and compare token mixers.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"seqzoo {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("train", help="train a recipe on its task", description=
                       "Train the model a recipe describes on the recipe's task; writes metrics.jsonl, "
                       "checkpoints/ (safetensors + JSON, atomic) and curves.png into --out.")
    t.add_argument("recipe", help="recipe YAML path, or a name in ./recipes/ (e.g. tiny-attention)")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    t.add_argument("--steps", type=int, help="optimiser steps (overrides train.steps)")
    t.add_argument("--device", help="auto | cpu | cuda | cuda:N (overrides train.device; auto = cuda if present)")
    t.add_argument("--out", help="output directory (default: runs/<recipe name>)")
    t.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out (exactly: same batches and schedule)")
    t.add_argument("--overwrite", action="store_true", help="delete checkpoints already in --out and start afresh")
    t.add_argument("--allow-recipe-change", action="store_true",
                   help="with --resume: continue even though the recipe differs from the checkpoint's")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")

    e = sub.add_parser("eval", help="evaluate a checkpoint on its recipe's held-out set",
                       description="Load the latest checkpoint of a run directory (or a checkpoint directory) "
                       "and report the task's metrics on the held-out split.")
    e.add_argument("run", help="run directory (from `seqzoo train --out`) or a checkpoint directory")
    e.add_argument("--batches", type=int_in(1, MAX_EVAL_BATCHES), default=16, help="number of eval batches (default 16)")
    e.add_argument("--batch-size", type=int_in(1, MAX_BATCH), default=16, help="sequences per eval batch (default 16)")
    e.add_argument("--seq-len", type=int_in(1, MAX_SEQ_LEN), help="evaluate at this sequence length instead of the task's")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")

    g = sub.add_parser("generate", help="sample text from a trained checkpoint",
                       description="Prefill the prompt, then decode token by token with the model's recurrent state.")
    g.add_argument("run", help="run directory or checkpoint directory")
    g.add_argument("--prompt", default="def ", help="text prompt (bytes for byte-level models)")
    g.add_argument("--max-new-tokens", type=int_in(0, MAX_NEW_TOKENS), default=200, help="tokens to generate (default 200)")
    g.add_argument("--temperature", type=float_in(0, 1000), default=0.8,
                   help="softmax temperature; 0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int_in(1, MAX_VOCAB), default=40,
                   help="sample among the k most likely tokens (default 40)")
    g.add_argument("--seed", type=int_in(0, MAX_SEED), default=0, help="sampling seed")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")

    c = sub.add_parser("compare", help="train several recipes on one task and write a comparison report",
                       description="Train every model of a sweep file (recipes/compare/*.yaml) on the sweep's "
                       "task with identical data order, seed, steps, optimiser and schedule (optionally the best "
                       "of several learning rates), evaluate at each test length, and write report.md, "
                       "results.json and PNG plots into --out, with the sweep's claims checked. Exits with 1 if every run "
                       "of some model failed, or with --strict if a claim fails.")
    c.add_argument("sweep", help="sweep YAML path (e.g. recipes/compare/mqar.yaml)")
    c.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="sweep values to change, e.g. train.steps=50 model.d_model=32 task.seq_len=128")
    c.add_argument("--smoke", action="store_true",
                   help="a seconds-long run of the whole pipeline: few steps, tiny eval (what CI runs)")
    c.add_argument("--out", help="output directory (default: runs/compare/<sweep name>[-smoke])")
    c.add_argument("--device", help="auto | cpu | cuda | cuda:N (overrides the sweep's train.device)")
    c.add_argument("--jobs", type=int_in(1, 256), default=1,
                   help="train this many models at once in worker processes (default 1; on a many-core machine)")
    c.add_argument("--reuse", action="store_true",
                   help="keep finished runs whose recipe is unchanged (continue an interrupted sweep)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.add_argument("--strict", action="store_true",
                   help="exit with 1 when a claim of the sweep fails (without it a failed claim is reported)")

    d = sub.add_parser("describe", help="print the effective recipe and its layers: mixer, backend, parameters, state size")
    d.add_argument("recipe", help="recipe YAML path or name in ./recipes/")
    d.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)

    lst = sub.add_parser("list", help="list registered mixers, tasks and the recipes in ./recipes/")
    lst.add_argument("--params", action="store_true", help="also build every recipe and print its parameter count")
    lst.add_argument("--recipes-dir", default="recipes", help="where to look for recipes (default ./recipes)")

    x = sub.add_parser("export", help="write a run's weights as a pretrained directory (seqzoo and Hugging Face)",
                       description="Write config.json, model.safetensors (and tokenizer.json for text models) of "
                       "a run's latest checkpoint; load it with LanguageModel.from_pretrained or, after "
                       "`import seqzoo.hf`, with transformers.AutoModelForCausalLM.from_pretrained.")
    x.add_argument("run", help="run directory or checkpoint directory")
    x.add_argument("out", help="directory to write")

    tk = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a local corpus (offline)")
    tk_sub = tk.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    tt = tk_sub.add_parser("train", help="train a byte-level BPE and write its tokenizer.json",
                           description="Train a byte-level BPE (GPT-2 style, <|endoftext|> as document separator) "
                           "on the training split of a text corpus and write tokenizer.json; use it as "
                           "`task: {type: text, tokenizer: FILE}`.")
    tt.add_argument("--out", required=True, help="tokenizer.json path to write")
    tt.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size (default 4096)")
    tt.add_argument("--min-frequency", type=int, default=2, help="merge pairs seen at least this often (default 2)")
    tt.add_argument("--path", help="file or directory of text files (default: the Python stdlib source)")
    tt.add_argument("--dataset", help="Hugging Face dataset name or local parquet/jsonl/csv/txt file, instead of --path")
    tt.add_argument("--text-field", default="text", help="dataset column holding the text (default text)")
    tt.add_argument("--max-bytes", type=int, default=16_000_000, help="text read at most (default 16 MB)")
    return p


def _version() -> str:
    from seqzoo import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    from seqzoo.env_errors import environment_error_line

    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # argparse hands KEY=VALUE items that follow an option to `extra`; they are overrides too.
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return COMMANDS[args.command](args)
    except SeqzooError as err:
        print(f"error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        return 2
    except (OSError, MemoryError, RuntimeError) as err:  # the disk, the memory: one line; else a bug
        line = environment_error_line(err)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _cmd_train(args: argparse.Namespace) -> int:
    from seqzoo.recipes import load_recipe
    from seqzoo.train.loop import train

    recipe = load_recipe(args.recipe, overrides=args.overrides)
    result = train(recipe, out_dir=args.out, steps=args.steps, device=args.device, resume=args.resume,
                   overwrite=args.overwrite, allow_recipe_change=args.allow_recipe_change,
                   progress=not args.no_progress)
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


def _cmd_eval(args: argparse.Namespace) -> int:
    from seqzoo.runs import load_run
    from seqzoo.train.evaluate import evaluate

    run = load_run(args.run, device=args.device, batch_size=args.batch_size, seq_len=args.seq_len)
    metrics = evaluate(run.model, run.task, n_batches=args.batches, batch_size=args.batch_size, device=run.device,
                       seq_len=args.seq_len)
    bad = [f"{k}={v}" for k, v in metrics.items() if not math.isfinite(v)]
    if bad:  # a number that is not one is a failure, not a result
        raise SeqzooError(f"{run.checkpoint}: evaluation gave {', '.join(bad)} (the model's outputs overflow)")
    print(f"{run.checkpoint}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from seqzoo.runs import load_run

    if not args.prompt:
        raise SeqzooError("--prompt: expected at least one character")
    run = load_run(args.run, device=args.device, seq_len=len(args.prompt.encode("utf-8", "surrogateescape"))
                   + args.max_new_tokens)
    if not hasattr(run.task, "decode"):
        raise SeqzooError(f"generate: the recipe's task is {run.recipe.task.get('type')!r}; text generation "
                          f"needs a text model (task bytes or text)")
    ids = torch.tensor(run.task.encode(args.prompt), device=run.device, dtype=torch.long)[None]
    if ids.shape[1] == 0:
        raise SeqzooError("--prompt: expected at least one token")
    gen = torch.Generator(device=run.device).manual_seed(args.seed)
    out = run.model.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             generator=gen)
    print(run.task.decode(out[0].tolist()))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from seqzoo.compare import run_sweep

    result = run_sweep(args.sweep, out_dir=args.out, smoke=args.smoke, device=args.device,
                       progress=not args.no_progress, jobs=args.jobs, reuse=args.reuse, overrides=args.overrides)
    print(f"\n{result.table}\n")
    if result.claims_table:
        print(f"claims ({sum(r.holds for r in result.claims)} of {len(result.claims)} hold):\n{result.claims_table}\n")
    print(f"report: {result.report}")
    for plot in result.plots:
        print(f"plot: {plot}")
    code = 0
    if result.failed:
        print(f"error: no run of {', '.join(result.failed)} finished; see the Failures section of the report",
              file=sys.stderr)
        code = 1
    if result.failed_claims:
        print(f"{'error' if args.strict else 'warning'}: {len(result.failed_claims)} claim(s) fail: "
              + "; ".join(result.failed_claims), file=sys.stderr)
        code = 1 if args.strict else code
    return code


def _cmd_describe(args: argparse.Namespace) -> int:
    import torch

    import seqzoo
    from seqzoo.models.lm import LanguageModel
    from seqzoo.runs import recipe_yaml

    recipe = seqzoo.load_recipe(args.recipe, overrides=args.overrides)
    print(f"# effective recipe{' (after ' + ' '.join(args.overrides) + ')' if args.overrides else ''}")
    print(recipe_yaml(recipe))
    with torch.device("meta"):  # shapes only: a 340M-parameter recipe is described without memory
        print(LanguageModel(recipe).describe())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from seqzoo.runs import load_run

    run = load_run(args.run)
    out = run.model.save_pretrained(args.out)
    print(f"{run.checkpoint} (step {run.step}) -> {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return 0


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    from seqzoo.tasks import build_task
    from seqzoo.tokenizer import train_bpe

    source = {"dataset": args.dataset, "text_field": args.text_field} if args.dataset else {"path": args.path}
    corpus = build_task({"type": "text", "tokenizer": "bytes", "max_bytes": args.max_bytes, **source})
    tok = train_bpe(corpus.texts("train"), vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    print(f"{out}: byte-level BPE, {tok.get_vocab_size():,} tokens")
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
            "list": _cmd_list, "compare": _cmd_compare, "export": _cmd_export, "tokenizer": _cmd_tokenizer}

if __name__ == "__main__":
    sys.exit(main())
