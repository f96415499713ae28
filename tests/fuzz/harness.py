"""The recipe fuzzer's engine: mutate the real recipes and sweeps of ``recipes/``, run the real
CLI in this process, and classify what happened.

A document is one of the files in ``recipes/`` shrunk to seconds (legitimate values: a small
corpus, batches of 2, one eval batch, four sample tokens) and then mutated: keys dropped or
added, values retyped, extreme values, nesting, and text-level damage (duplicate keys,
encodings, NUL and invalid bytes, BOM, truncation, alias bombs, recursive aliases, oversize).
Mutations known to make the document invalid set ``must_reject``.

Outcomes: ``ok`` (exit 0, every reported number finite), ``rejected`` (exit 2 with one line
``error: ...``), and the failures: ``traceback`` (an exception escaped the CLI, or a run of a
sweep failed with something other than a seqzoo error), ``hang`` (past the time limit),
``multiline`` (exit 2 but not one line), ``nonfinite`` (exit 0 reporting NaN/inf),
``accepted_invalid`` (exit 0 for a document that ``must_reject``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import faulthandler
import io
import json
import math
import re
import resource
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "seqzoo"  # ~100 .py files: a byte-level corpus read in milliseconds
MAX_TRAIN_PARAMS = 5_000_000  # 1-step trains only of tiny models (the paper recipes are described)
COMMAND_TIMEOUT_S = 120.0
FAILURES = ("traceback", "hang", "multiline", "nonfinite", "accepted_invalid")

EXTREMES = [0, -1, 1, 2**31, 2**63, 2**70, -2**70, 10**12, 1e12, -1e12, 1e-300, 1e308,
            math.nan, math.inf, -math.inf, True, False, None, "", "x" * 300, [], {}]


@dataclasses.dataclass(frozen=True)
class Base:
    kind: str  # "recipe" or "sweep"
    path: Path
    data: dict[str, Any]


def bases() -> list[Base]:
    out = []
    for path in sorted((ROOT / "recipes").rglob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        out.append(Base("sweep" if "models" in data else "recipe", path, data))
    return out


def shrink(base: Base, *, pick: int) -> dict[str, Any]:
    """The base document with legitimate values that make a 1-step run take about a second."""
    doc = copy.deepcopy(base.data)
    task = doc.setdefault("task", {"type": "bytes"})
    if task.get("type") == "bytes":
        task.update(path=str(CORPUS), max_bytes=200_000)
    task["seq_len"] = min(task.get("seq_len", 64), 64)
    train = doc.setdefault("train", {})
    train.update(batch_size=2, grad_accum=1, eval_batches=1, eval_batch_size=2, sample_tokens=4, log_every=1,
                 warmup_steps=1)
    if base.kind == "sweep":
        entry = doc["models"][pick % len(doc["models"])]
        if isinstance(entry, str):
            entry = str(ROOT / entry)
        else:
            entry = {**entry, "recipe": str(ROOT / entry["recipe"])}
        doc["models"] = [entry]
        doc.pop("lrs", None)
        doc["eval_seq_lens"] = doc.get("eval_seq_lens", [])[:1]
        doc["claims"] = _claims_about(doc, entry)
        doc["eval_batches"] = 1
        doc["smoke"] = {**doc.get("smoke", {}), "steps": 1, "batch_size": 2, "eval_batches": 1, "eval_batch_size": 2}
        doc["smoke"].pop("eval_seq_lens", None)
        smoke_task = doc["smoke"].get("task", {})
        if task.get("type") == "bytes":
            doc["smoke"]["task"] = {**smoke_task, "max_bytes": 200_000}
    return doc


def _claims_about(doc: dict[str, Any], entry: Any) -> list[dict[str, Any]]:
    """The sweep's claims that still refer only to the one model and the lengths kept."""
    import fnmatch

    label = entry.get("name") if isinstance(entry, dict) else None
    label = label or yaml.safe_load(Path(entry if isinstance(entry, str) else entry["recipe"]).read_text()).get("name")
    lengths = {None, doc["task"].get("seq_len"), *doc["eval_seq_lens"]}
    kept = []
    for claim in doc.get("claims", []):
        patterns = [p for key in ("models", "better", "worse", "faster", "slower") for p in claim.get(key, [])]
        used = [claim.get(k) for k in ("seq_len", "from_len", "to_len")] + list(claim.get("seq_lens") or [])
        if all(fnmatch.fnmatchcase(str(label), p) for p in patterns) and all(n in lengths for n in used):
            kept.append(claim)
    return kept


# -- structural mutations ---------------------------------------------------------------------
def _paths(node: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, path + (i,))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def _set(doc: Any, path: tuple, value: Any) -> None:
    _get(doc, path[:-1])[path[-1]] = value


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _kind(v: Any) -> str:
    return "bool" if isinstance(v, bool) else "number" if _is_number(v) else type(v).__name__


def _strict_mapping(path: tuple) -> bool:
    """Whether every key of the mapping at ``path`` is checked against a schema (the entries
    of ``mixers`` are user names; everything else is a schema)."""
    return not (path and path[-1] == "mixers")


@st.composite
def structural(draw, doc: dict[str, Any]) -> tuple[str, bool]:
    """Mutate ``doc`` in place; returns (description, whether the result must be rejected)."""
    paths = _paths(doc)
    path = draw(st.sampled_from(paths))
    value = _get(doc, path)
    what = draw(st.sampled_from(["drop", "add", "retype", "extreme", "nest", "small_int"]))
    if what == "drop" and path:
        parent = _get(doc, path[:-1])
        del parent[path[-1]]
        return f"drop {path}", False
    if what == "add" and isinstance(value, dict):
        key = "zz_" + draw(st.text("abcdefgh_", min_size=1, max_size=8))
        value[key] = draw(st.sampled_from([1, "x", True, None, [1], {"a": 1}]))
        return f"add {path + (key,)}", _strict_mapping(path)
    if not path:
        return "noop", False
    if what == "retype":
        new = draw(st.sampled_from([True, False, 7, 2.5, "text", [1, 2], {"k": 1}, None]))
        _set(doc, path, new)
        old_kind, new_kind = _kind(value), _kind(new)
        invalid = (old_kind in ("bool", "number") and new_kind in ("bool", "number", "str", "list", "dict")
                   and old_kind != new_kind) or (old_kind == "str" and value != "auto" and new_kind in ("bool", "number"))
        return f"retype {path} {value!r} -> {new!r}", invalid
    if what == "extreme":
        new = draw(st.sampled_from(EXTREMES))
        _set(doc, path, new)
        invalid = _is_number(value) and (
            (isinstance(new, float) and math.isnan(new))
            or (isinstance(new, float) and math.isinf(new) and not str(path).endswith("'dt_limit', 1)"))
            or (new == -1 and type(new) is int and type(value) is int)
            or (_kind(new) in ("bool", "str", "list", "dict")))
        return f"extreme {path} {value!r} -> {new!r}", invalid
    if what == "nest":
        depth = draw(st.integers(1, 40))
        new = value
        for _ in range(depth):
            new = draw(st.sampled_from([[new], {"n": new}]))
        _set(doc, path, new)
        scalar = not isinstance(value, (dict, list))
        return f"nest {path} x{depth}", scalar and value is not None
    if _is_number(value):
        new = draw(st.integers(-2, 64))
        _set(doc, path, new)
        return f"small_int {path} {value!r} -> {new}", False
    return "noop", False


# -- text-level mutations ---------------------------------------------------------------------
BOMB = "[" + ", ".join(["&l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [
    f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 7)]) + "]"
PLACEHOLDER = "__FUZZ_PLACEHOLDER__"
KEY_LINE = re.compile(r"^\s*(- )?[A-Za-z_][A-Za-z0-9_]*:(\s|$)")


def dump(doc: Any) -> str:
    return yaml.safe_dump(doc, sort_keys=False, width=10**9, allow_unicode=True)


@st.composite
def text_level(draw, doc: dict[str, Any]) -> tuple[bytes, str, bool]:
    """Serialise ``doc`` and maybe damage the text; (bytes, description, must_reject)."""
    what = draw(st.sampled_from(["none", "none", "none", "dup_line", "utf16", "latin1", "nul", "bad_byte", "bom",
                                 "truncate", "bomb", "recursive", "oversize"]))
    if what in ("bomb", "recursive"):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            return dump(doc).encode(), "none", False
        path = draw(st.sampled_from(paths))
        _set(doc, path, PLACEHOLDER)
        text = dump(doc).replace(PLACEHOLDER, BOMB if what == "bomb" else "&r [*r]", 1)
        return text.encode(), f"{what} at {path}", True
    text = dump(doc)
    if what == "dup_line":
        lines = text.splitlines(keepends=True)
        keyed = [i for i, line in enumerate(lines) if KEY_LINE.match(line) and not line.lstrip().startswith("- ")]
        if not keyed:
            return text.encode(), "none", False
        i = draw(st.sampled_from(keyed))
        # Duplicate the key line together with its block, so the key repeats in the same mapping.
        indent = len(lines[i]) - len(lines[i].lstrip())
        j = i + 1
        while j < len(lines) and len(lines[j]) - len(lines[j].lstrip()) > indent:
            j += 1
        return "".join(lines[:j] + lines[i:j] + lines[j:]).encode(), f"dup_line {lines[i].strip()!r}", True
    if what == "utf16":
        return text.encode("utf-16"), what, True
    if what == "latin1":
        return text.replace("name: ", "name: é", 1).encode("latin-1", errors="replace"), what, "name: " in text
    data = text.encode()
    if what == "nul":
        at = draw(st.integers(0, len(data)))
        return data[:at] + b"\x00" + data[at:], what, True
    if what == "bad_byte":
        at = draw(st.integers(0, len(data)))
        return data[:at] + b"\xff" + data[at:], what, True
    if what == "bom":
        return b"\xef\xbb\xbf" + data, what, False
    if what == "truncate":
        return data[:draw(st.integers(0, len(data)))], what, False
    if what == "oversize":
        return data + b"# " + b"pad " * 300_000 + b"\n", what, True
    return data, "none", False


@st.composite
def fuzz_case(draw, base_list: list[Base]) -> tuple[Base, bytes, list[str], bool]:
    base = draw(st.sampled_from(base_list))
    doc = shrink(base, pick=draw(st.integers(0, 100)))
    notes, flags = [], []
    for _ in range(draw(st.integers(0, 3))):
        note, invalid = draw(structural(doc))
        notes.append(note)
        flags.append(invalid)
    data, note, text_invalid = draw(text_level(doc))
    notes.append(note)
    # A later mutation may undo an earlier one (drop an added key, or a truncation cut it
    # off): only a lone structural mutation with the text intact, or text-level damage, is
    # known to make the document invalid.
    must_reject = text_invalid or (len(flags) == 1 and flags[0] and note != "truncate")
    return base, data, notes, must_reject


# -- running ----------------------------------------------------------------------------------
class Hang(BaseException):
    """Raised by the timer; a BaseException so that no `except Exception` swallows it."""


@dataclasses.dataclass
class Outcome:
    command: str
    kind: str
    detail: str = ""


def _run_cli(argv: list[str], *, timeout_s: float) -> tuple[int | None, str, str, str | None]:
    """(exit code, stdout, stderr, traceback text or None) of ``seqzoo.cli.main(argv)``."""
    from seqzoo.cli import main

    out, err = io.StringIO(), io.StringIO()
    use_alarm = threading.current_thread() is threading.main_thread()

    def on_alarm(signum, frame):
        raise Hang

    if use_alarm:
        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
    # The last resort, should the alarm never reach Python (one endless C++ call, or not the
    # main thread): print every thread's stack and end the process, so a hang still fails.
    faulthandler.dump_traceback_later(2 * timeout_s, exit=True)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 2
        return code, out.getvalue(), err.getvalue(), None
    except Hang:
        return None, out.getvalue(), err.getvalue(), "hang"
    except Exception:  # noqa: BLE001 - an escaped exception is exactly what the fuzzer looks for
        return -1, out.getvalue(), err.getvalue(), traceback.format_exc(limit=-6)
    finally:
        faulthandler.cancel_dump_traceback_later()
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def _classify(command: str, code: int | None, stdout: str, stderr: str, tb: str | None) -> Outcome:
    if tb == "hang":
        return Outcome(command, "hang", f"no answer within {COMMAND_TIMEOUT_S:.0f} s")
    if tb is not None:
        return Outcome(command, "traceback", tb.strip().splitlines()[-1])
    if "Traceback" in stderr:
        return Outcome(command, "traceback", stderr.strip().splitlines()[-1])
    if code == 0:
        return Outcome(command, "ok")
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    if code == 2 and len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0]:
        return Outcome(command, "rejected", errors[0][:300])
    if command == "compare" and code == 1 and errors:
        return Outcome(command, "all_failed", errors[0][:300])
    return Outcome(command, "multiline", f"exit {code}: {stderr.strip()[-300:]}")


def _finite_numbers(obj: Any) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_finite_numbers(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite_numbers(v) for v in obj)
    return True


def _check_train_output(out_dir: Path) -> Outcome | None:
    log = out_dir / "metrics.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    if not records:
        return Outcome("train", "nonfinite", "exit 0 without a single metrics record")
    bad = [r for r in records if not _finite_numbers(r)]
    return Outcome("train", "nonfinite", json.dumps(bad[0])[:300]) if bad else None


def _check_compare_output(out_dir: Path) -> Outcome | None:
    """Runs that failed must have failed with a seqzoo error (one line), never a bug; the
    final metrics of finished runs must be finite."""
    from seqzoo.env_errors import environment_error_line

    results = json.loads((out_dir / "results.json").read_text())
    for model in results["models"]:
        for run in model["runs"]:
            error = run.get("error")
            if error and (error.startswith("RuntimeError") or error.startswith("ValueError")
                          or error.startswith("TypeError")) and environment_error_line(RuntimeError(error)) is None:
                return Outcome("compare", "traceback", error[:300])
            if not error and not _finite_numbers(run["final_eval"]):
                return Outcome("compare", "nonfinite", json.dumps(run["final_eval"])[:300])
    return None


def _params(path: Path) -> int | None:
    import seqzoo
    from seqzoo.errors import SeqzooError
    from seqzoo.train.memory_budget import count_parameters

    try:
        return count_parameters(seqzoo.load_recipe(path))
    except (SeqzooError, OSError):
        return None
    except Exception:  # noqa: BLE001 - a bug, which the CLI run of this document reports as a traceback
        return None


def run_case(base: Base, data: bytes, must_reject: bool, workdir: Path) -> list[Outcome]:
    """Every command the document goes through, each classified."""
    path = workdir / "fuzzed.yaml"
    path.write_bytes(data)
    outcomes = []
    if base.kind == "recipe":
        outcomes.append(_classify("describe", *_run_cli(["describe", str(path)], timeout_s=COMMAND_TIMEOUT_S)))
        params = _params(path)
        if params is None or params <= MAX_TRAIN_PARAMS:
            out = workdir / "run"
            result = _classify("train", *_run_cli(["train", str(path), "--steps", "1", "--out", str(out),
                                                   "--no-progress", "--device", "cpu", "--overwrite"],
                                                  timeout_s=COMMAND_TIMEOUT_S))
            if result.kind == "ok":
                result = _check_train_output(out) or result
            outcomes.append(result)
    else:
        out = workdir / "compare"
        result = _classify("compare", *_run_cli(["compare", str(path), "--smoke", "--out", str(out), "--no-progress",
                                                 "--device", "cpu"], timeout_s=COMMAND_TIMEOUT_S))
        if result.kind in ("ok", "all_failed"):
            result = _check_compare_output(out) or result
        outcomes.append(result)
    if must_reject:
        outcomes = [Outcome(o.command, "accepted_invalid", "exit 0") if o.kind == "ok" else o for o in outcomes]
    return outcomes


@contextlib.contextmanager
def memory_ceiling(extra_bytes: int = 6 * 2**30):
    """Cap this process's address space while fuzzing, so that a recipe which slips past
    the checks fails its allocation (a one-line error) instead of exhausting a shared machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    try:
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * resource.getpagesize()
    except (OSError, ValueError):
        yield
        return
    limit = mapped + extra_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def describe_case(base: Base, notes: list[str], outcomes: list[Outcome]) -> str:
    rel = base.path.relative_to(ROOT)
    return f"{rel} {notes}: " + "; ".join(f"{o.command} {o.kind} {o.detail}" for o in outcomes)


if __name__ == "__main__":  # pragma: no cover - see long_run.py
    sys.exit("run tests/fuzz/long_run.py or pytest tests/fuzz")
