"""The ``leantune`` command line.

    leantune [--quiet | --verbose] COMMAND ...   (--version prints the version)
    leantune train RECIPE.yaml [key.sub=value ...] [--resume] [--nproc N]
    leantune rl RECIPE.yaml [key.sub=value ...] [--resume] [--nproc N]
    leantune rft RECIPE.yaml [key.sub=value ...]
    leantune dpo RECIPE.yaml [key.sub=value ...] [--resume]
    leantune plan RECIPE.yaml [key.sub=value ...] [--memory 2GB [--out FILE]] [--json]
    leantune eval RUN_DIR|MODEL (--task NAME | --data FILE.jsonl | --memorization [--prefix 32 --suffix 32])
    leantune export RUN_DIR --merged OUT_DIR [--adapter OUT_DIR]
    leantune report RUN_DIR [RUN_DIR ...] [--out DIR]
    leantune validate RECIPE.yaml [RECIPE.yaml ...]
    leantune demo [--out DIR] [--quick] [--rl]
    leantune dpo RECIPE.yaml [key.sub=value ...] [--resume] [--nproc N]
    leantune make-data TASK --out DIR [--train N] [--valid N] [--pairs]
    leantune data dedup IN OUT [--threshold 0.8] [--num-perm 128] [--shingle words:3] [--report FILE.json]

Errors a user can fix (bad recipe, bad data, missing model) print one clear message and exit 2.
Results (JSON, tables, the ledger summary) go to stdout; diagnostics go to stderr through ``leantune.log``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
log = logging.getLogger("leantune.cli")


class UserError(Exception):
    """Raised for problems the user can fix; printed without a traceback."""


def _user_errors():
    from leantune.allocator import AllocatorError
    from leantune.config import RecipeError
    from leantune.models.loading import ModelLoadError
    from leantune.plan.model_shape import PlanError

    errors: list[type[BaseException]] = [RecipeError, ModelLoadError, PlanError, UserError, AllocatorError,
                                         FileExistsError, FileNotFoundError]
    try:
        from leantune.data.records import DataError

        errors.append(DataError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


TRAINERS = {  # command -> (module, function); each takes (recipe, *, quiet, ...) and returns a TrainResult
    "train": ("leantune.train.sft", "train"),
    "rl": ("leantune.train.rl", "train_rl"),
    "dpo": ("leantune.train.dpo", "train_dpo"),
    "rft": ("leantune.train.rft", "train_rft"),
}


def cmd_run(args) -> int:
    """train / rl / dpo / rft: load the recipe, run the trainer, print the ledger's summary (rank 0)."""
    import importlib

    from leantune.config import load_recipe
    from leantune.ledger import summarize_ledger

    module, name = TRAINERS[args.command]
    trainer = getattr(importlib.import_module(module), name)
    recipe = load_recipe(args.recipe, args.overrides)
    kwargs = {"resume": args.resume, "recipe_path": args.recipe} if hasattr(args, "resume") else {}
    result = trainer(recipe, quiet=args.quiet, **kwargs)
    if _is_rank_zero():
        print(summarize_ledger(result.ledger))
        log.info("run directory: %s", recipe.train.output_dir)
    return 0


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def cmd_plan(args) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from leantune.config import load_recipe
    from leantune.plan.search import (
        budget_bytes,
        default_out_path,
        floor_note,
        gib,
        plan_recipe,
        search,
        write_recipe,
    )

    recipe = load_recipe(args.recipe, args.overrides)
    plan, shape, kind = plan_recipe(recipe, mode=args.mode)
    console = Console(width=max(100, Console().width))
    if not args.memory:
        if args.json:
            print(json.dumps({"what": plan.label, "device": plan.device, "peak_bytes": plan.peak,
                              "peak_phase": plan.peak_phase, "phases": plan.totals,
                              "terms": {k: {"bytes": v, "how": how} for k, (v, how) in plan.terms.items()},
                              "notes": plan.notes}, indent=1))
            return 0
        console.print(f"model: {recipe.model.path} ({shape.model_type}, {shape.params / 1e6:.1f}M params, "
                      f"{shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab}; from the {kind} config, no weights read)")
        table = Table(title=f"{plan.label} {gib(plan.peak)} (phase: {plan.peak_phase})")
        for col, just in (("term", "left"), ("size", "right"), ("how", "left")):
            table.add_column(col, justify=just)
        for name, (nbytes, how) in plan.terms.items():
            table.add_row(name, gib(nbytes), how)
        console.print(table)
        console.print("phases: " + " | ".join(f"{k} {gib(v)}" for k, v in plan.totals.items()))
        for note in plan.notes:
            console.print(f"note: {note}")
        if recipe.memory.budget is not None:
            fits = plan.fits(recipe.memory.budget_bytes)
            console.print(f"memory.budget {recipe.memory.budget}: {'fits' if fits else 'EXCEEDED'}")
        return 0

    budget = budget_bytes(args.memory)
    fits = search(recipe, shape, budget, kind, mode=args.mode)
    if not fits:
        raise UserError(f"nothing fits in {args.memory} ({gib(budget)}): {floor_note(recipe, shape, kind, mode=args.mode)}")
    out = Path(args.out) if args.out else default_out_path(args.recipe, args.memory)
    write_recipe(args.recipe, args.overrides, fits[0], args.memory, out)
    if args.json:
        print(json.dumps({"budget_bytes": budget, "recipe_peak_bytes": plan.peak, "written": str(out),
                          "fits": [{"changes": c.changes, "peak_bytes": c.plan.peak, "peak_phase": c.plan.peak_phase,
                                    "cost": round(c.cost, 4), "tokens_per_s": round(c.speed, 4), "notes": c.notes}
                                   for c in fits[: args.top]], "fitting_settings": len(fits)}, indent=1))
        return 0
    console.print(f"recipe as written: {gib(plan.peak)} ({plan.peak_phase}); budget {args.memory} = {gib(budget)}; "
                  f"{len(fits)} searched settings fit")
    table = Table(title=f"settings that fit in {args.memory}, cheapest first")
    table.add_column("#", justify="right")
    table.add_column("changes (overrides)", no_wrap=True)
    for col in ("peak", "tokens/s", "cost"):
        table.add_column(col, justify="right")
    table.add_column("notes")
    for i, c in enumerate(fits[: args.top], 1):
        table.add_row(str(i), "\n".join(c.overrides()) or "(as written)", gib(c.plan.peak),
                      f"x{c.speed:.2f}", f"x{c.cost:.2f}", "; ".join(c.notes))
    console.print(table)
    console.print("cost: expected time to the same training progress relative to the recipe (model in "
                  "leantune/plan/search.py); tokens/s: relative throughput")
    console.print(f"wrote {out}  (leantune train {out})")
    return 0


def cmd_validate(args) -> int:
    from leantune.config import load_recipe

    for path in args.recipes:
        recipe = load_recipe(path, args.overrides)
        print(f"ok  {path}")
        if recipe.train.activation_checkpointing is None:
            print("    train.activation_checkpointing: null -- chosen at run start: the fastest setting the planner "
                  "predicts to fit memory.budget, or 80% of the available memory (`leantune plan` shows the choice)")
    return 0


def cmd_eval(args) -> int:
    import json

    from leantune.eval.evaluate import evaluate_target

    if args.memorization:
        from leantune.eval.memorization import evaluate_memorization

        result = evaluate_memorization(args.target, heldout=args.heldout, prefix=args.prefix, suffix=args.suffix,
                                       samples=args.samples, seed=args.seed, align=args.align,
                                       batch_size=args.batch_size, dtype=args.dtype)
        print(json.dumps(result, indent=1))
        return 0
    if args.heldout:
        raise UserError("eval: --heldout goes with --memorization")
    result = evaluate_target(
        args.target, task=args.task, data=args.data, num_problems=args.num_problems,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, dtype=args.dtype,
    )
    print(json.dumps(result, indent=1))
    return 0


def cmd_export(args) -> int:
    from leantune.eval.evaluate import export_run

    if not args.merged and not args.adapter:
        raise UserError("export: give --merged OUT_DIR and/or --adapter OUT_DIR")
    for kind, out in export_run(args.run_dir, merged=args.merged, adapter=args.adapter).items():
        log.info("wrote %s: %s", kind, out)
    return 0


def cmd_report(args) -> int:
    from leantune.report import compare_runs, make_report

    try:
        if len(args.run_dirs) == 1:
            paths = make_report(args.run_dirs[0], args.out)
        else:
            paths = compare_runs(args.run_dirs, args.out)
    except ValueError as e:  # an empty metrics file, a broken ledger.json: the message says which file
        raise UserError(str(e)) from None
    for path in paths:
        print(f"[leantune] wrote {path}")
        if path.suffix == ".md":
            print(path.read_text())
    page = next(p for p in paths if p.suffix == ".html")
    print(f"[leantune] open {page.resolve().as_uri()}")
    return 0


def cmd_make_data(args) -> int:
    from leantune.demo import write_task_data

    paths = write_task_data(args.task, Path(args.out), args.train, args.valid, seed=args.seed, pairs=args.pairs)
    for split, path in paths.items():
        log.info("wrote %s: %s", split, path)
    return 0


def cmd_data_dedup(args) -> int:
    import json

    from pydantic import ValidationError

    from leantune.config import DedupConfig
    from leantune.data.dedup import dedup_file, summary_line

    try:
        cfg = DedupConfig(exact=not args.no_exact, near=None if args.threshold == 0 else args.threshold,
                          num_perm=args.num_perm, shingle=args.shingle, seed=args.seed)
    except ValidationError as err:
        flags = {"near": "--threshold", "num_perm": "--num-perm", "shingle": "--shingle"}
        raise UserError("data dedup: " + "; ".join(
            f"{flags.get(str(e['loc'][0]), e['loc'][0])}: {e['msg']}" if e["loc"] else e["msg"].removeprefix("Value error, ")
            for e in err.errors())) from None
    report = dedup_file(args.input, args.output, cfg, fields=args.field or None, split=args.split, report_path=args.report)
    print(summary_line(report, args.input, args.output))
    for c in report.clusters[: args.show]:
        removed = ", ".join(f"{r.location} (J~{r.jaccard:.2f})" for r in c.removed[:5])
        more = f" and {len(c.removed) - 5} more" if len(c.removed) > 5 else ""
        print(f"  cluster {c.id} [{c.kind}]: kept {c.kept.location}; removed {removed}{more}")
    if args.report:
        log.info("wrote %s", args.report)
    if args.json:
        print(json.dumps({k: v for k, v in report.as_dict().items() if k != "clusters"}, indent=1))
    return 0


def cmd_demo(args) -> int:
    from leantune.demo import run_demo

    run_demo(out=Path(args.out), quick=args.quick, rl=args.rl)
    return 0


def _run_command(sub, name: str, help: str, example: str, *, resume: bool = True, processes: bool = True):
    """A subcommand that runs a trainer from a recipe: RECIPE [overrides] [--resume] [--nproc N]."""
    c = sub.add_parser(name, help=help)
    c.add_argument("recipe", help="recipe YAML file (leantune validate checks it without loading a model)")
    c.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")
    if resume:
        c.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    if processes:
        c.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="run on N processes on this machine: re-launches itself with torchrun (DDP or FSDP2, "
                       "train.parallel); the same as torchrun --standalone --nproc-per-node N -m leantune ...")
    c.set_defaults(func=cmd_run)
    return c


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leantune", description="Memory-lean post-training with an honest ledger.")
    p.add_argument("--version", action="version", version=f"leantune {version()}", help="print the version and exit")
    noise = p.add_mutually_exclusive_group()
    noise.add_argument("-q", "--quiet", action="store_true",
                       help="warnings and errors only, no progress bars (results still go to stdout)")
    noise.add_argument("-v", "--verbose", action="store_true", help="debug messages too (stage timings, trackers)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           help="one of the commands below; `leantune COMMAND -h` for its options")

    _run_command(sub, "train", "supervised fine-tuning (LoRA or full) from a recipe", "optim.lr=1e-4 train.steps=50")
    _run_command(sub, "rl", "RL with verifiable rewards (GRPO / DAPO / Dr.GRPO) from a recipe",
                 "rl.group_size=4 train.steps=20")
    _run_command(sub, "dpo", "preference optimization (DPO / IPO / SimPO) on chosen/rejected pairs from a recipe",
                 "dpo.loss=ipo dpo.beta=0.5 train.steps=20")
    _run_command(sub, "rft", "expert iteration: sample, keep verified completions, fine-tune, repeat", "rft.rounds=2",
                 resume=False, processes=False)

    pl = sub.add_parser("plan", help="predict peak memory from the recipe (no weights loaded); --memory: settings that fit")
    pl.add_argument("recipe", help="recipe YAML file (leantune validate checks it without loading a model)")
    pl.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch_size=2")
    pl.add_argument("--memory", help="budget, e.g. 2GB (10^9 bytes) or 1.5GiB (2^30): list settings that fit, "
                    "cheapest first, and write the cheapest as a recipe")
    pl.add_argument("--out", help="recipe file to write with --memory (default: RECIPE.fit-<budget>.yaml next to RECIPE)")
    pl.add_argument("--top", type=int, default=10, help="rows of the --memory table (default 10)")
    pl.add_argument("--mode", choices=["sft", "rl", "dpo"], default=None,
                    help="plan `leantune train` (sft), `leantune rl` (rollouts + updates) or `leantune dpo` (pairs, "
                    "reference); default: rl if the recipe has an rl section, dpo if it has a dpo section, else sft")
    pl.add_argument("--json", action="store_true", help="print JSON instead of tables")
    pl.set_defaults(func=cmd_plan)

    v = sub.add_parser("validate", help="check recipes without building a model")
    v.add_argument("recipes", nargs="+", help="recipe YAML files; each is loaded and validated, no model is built")
    v.add_argument("--set", dest="overrides", action="append", default=[], help="dotted override (repeatable)")
    v.set_defaults(func=cmd_validate)

    e = sub.add_parser("eval", help="accuracy on a verifiable task, loss/perplexity on data, or memorization of a run's data")
    e.add_argument("target", help="a run directory, a model directory, a .gguf file or builtin:NAME")
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--task", help="verifiable task name, e.g. arithmetic")
    g.add_argument("--data", help="JSONL/Parquet file for mean loss and perplexity")
    g.add_argument("--memorization", action="store_true",
                   help="k-extractable memorization (arXiv 2202.07646) of a run's training data and the held-out minus "
                   "train loss gap (docs/dedup.md); needs a run directory")
    e.add_argument("--prefix", type=int, default=32, help="--memorization: prompt tokens taken from each example (default 32)")
    e.add_argument("--suffix", type=int, default=32,
                   help="--memorization: tokens greedy decoding must reproduce exactly to count as extracted (default 32)")
    e.add_argument("--samples", type=int, default=100,
                   help="--memorization: training (and held-out) examples sampled, seeded (default 100)")
    e.add_argument("--heldout", default=None,
                   help="--memorization: held-out data for the control rate and the loss gap (default: the run's data.eval)")
    e.add_argument("--align", choices=["start", "completion"], default="start",
                   help="--memorization: window at the example's first token (start) or suffix = the first completion "
                   "tokens (completion); default start")
    e.add_argument("--seed", type=int, default=0, help="--memorization: seed of the example sample (default 0)")
    e.add_argument("--num-problems", type=int, default=50, help="--task: held-out problems to score (default 50)")
    e.add_argument("--max-new-tokens", type=int, default=48,
                   help="--task: greedy completion budget per problem, in tokens (default 48)")
    e.add_argument("--batch-size", type=int, default=16,
                   help="prompts generated together (--task, --memorization) or examples per forward pass (--data); default 16")
    e.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype of the model (default: the run's model.dtype, else float32)")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="write a merged model and/or the PEFT adapter of a run")
    x.add_argument("run_dir", help="a finished leantune run directory (has recipe.yaml and adapter/ or model/)")
    x.add_argument("--merged", help="output directory for the merged safetensors model")
    x.add_argument("--adapter", help="output directory for a copy of the PEFT adapter")
    x.set_defaults(func=cmd_export)

    r = sub.add_parser("report", help="one run: plots, summary.md and report.html; several runs: compare.html")
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directory (train.output_dir); give two or more to compare them on the same axes")
    r.add_argument("--out", metavar="DIR", default=None,
                   help="where to write the files (default: the run directory; for a comparison, the first run's "
                        "directory: compare.html + compare.png)")
    r.set_defaults(func=cmd_report)

    m = sub.add_parser("make-data", help="write a verifiable task's train/valid JSONL (messages shape)")
    m.add_argument("task", help="task name, e.g. arithmetic")
    m.add_argument("--out", required=True, help="output directory")
    m.add_argument("--train", type=int, default=2000, help="training problems")
    m.add_argument("--valid", type=int, default=64, help="validation problems (held-out split)")
    m.add_argument("--seed", type=int, default=0, help="seed of the problem generator (default 0)")
    m.add_argument("--pairs", action="store_true",
                   help="preference pairs for `leantune dpo` instead: prompt, chosen = the worked solution, rejected = "
                   "the same with a wrong final answer")
    m.set_defaults(func=cmd_make_data)

    da = sub.add_parser("data", help="data tools: dedup (remove exact and near-duplicate rows)")
    dsub = da.add_subparsers(dest="data_command", required=True, metavar="TOOL", help="`leantune data TOOL -h` for its options")
    dd = dsub.add_parser("dedup", help="remove exact and near-duplicate rows (MinHash), keeping the first; see docs/dedup.md")
    dd.add_argument("input", metavar="IN", help="rows to read: any source data.train takes (.jsonl, .parquet, .csv, .json, "
                    ".arrow, a save_to_disk directory, a hub dataset id)")
    dd.add_argument("output", metavar="OUT", help="JSON Lines file for the kept rows, as read (written atomically; nothing is "
                    "written if any row is bad)")
    dd.add_argument("--threshold", type=float, default=0.8,
                    help="remove a row whose estimated Jaccard similarity with an earlier row is >= this (0 < t <= 1; "
                    "lower removes more); 0: exact duplicates only (default 0.8)")
    dd.add_argument("--num-perm", type=int, default=128,
                    help="MinHash permutations: closer estimates (error ~ 1/sqrt(N)) for more time and memory (default 128)")
    dd.add_argument("--shingle", default="words:3",
                    help="set elements: words:N (word N-grams, prose) or chars:N (character N-grams, short or numeric "
                    "text); default words:3")
    dd.add_argument("--no-exact", action="store_true",
                    help="skip the exact (normalized-text hash) pass; identical rows are still near-duplicates at J=1")
    dd.add_argument("--field", action="append", metavar="NAME",
                    help="compare these fields (repeatable, in order) instead of messages or prompt + completion")
    dd.add_argument("--split", default=None, help="split of IN when it has several (default: train, or the only one)")
    dd.add_argument("--seed", type=int, default=0, help="seed of the MinHash permutations (default 0)")
    dd.add_argument("--report", metavar="FILE.json", default=None,
                    help="write every cluster (kept row, removed rows with file:line, Jaccard estimates) as JSON")
    dd.add_argument("--show", type=int, default=5, metavar="N", help="clusters to print (default 5)")
    dd.add_argument("--json", action="store_true", help="also print the counts and settings as JSON")
    dd.set_defaults(func=cmd_data_dedup)

    d = sub.add_parser("demo", help="the embedded default: fine-tune SmolLM2-135M on arithmetic, offline")
    d.add_argument("--out", default="out/demo", help="output directory (default: out/demo)")
    d.add_argument("--quick", action="store_true", help="same pipeline on a tiny random model, < 1 minute")
    d.add_argument("--rl", action="store_true",
                   help="add a short RL (DAPO) phase after fine-tuning; greedy accuracy after each phase, and sampled "
                   "pass@1 at the RL temperature before and after RL (~27 min on 2 cores)")
    d.set_defaults(func=cmd_demo)
    return p


def version() -> str:
    """The installed distribution's version, else the source tree's ``leantune.__version__``."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("leantune")
    except PackageNotFoundError:
        from leantune import __version__

        return __version__


def _switch_allocator(args, argv: list[str]) -> None:
    """train / rl / rft / dpo / demo: re-execute this command on the recipe's ``train.allocator`` (a caching malloc,
    ``leantune.allocator``) before any work starts. A recipe that does not load is left to the command to
    report."""
    from leantune.allocator import reexec_with

    if args.command in ("train", "rl", "rft", "dpo"):
        from leantune.config import load_recipe

        try:
            choice = load_recipe(args.recipe, args.overrides).train.allocator
        except Exception:  # noqa: BLE001 -- the command itself reports a bad recipe, with file:line
            return
    elif args.command == "demo":
        from leantune.config import TrainConfig

        choice = TrainConfig().allocator
    else:
        return
    reexec_with(choice, argv)


def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` minus ``--nproc N`` / ``--nproc=N`` (what each torchrun process gets)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run one command. Called without ``argv`` (the ``leantune`` program itself), train / rl / rft / dpo / demo
    first switch to the recipe's malloc by re-executing; called with ``argv`` (tests, scripts), never."""
    import warnings

    # PEFT still calls transformers' deprecated alias; the warning says nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    program = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    from leantune.log import configure_logging

    configure_logging(quiet=args.quiet, verbose=args.verbose)
    try:
        if getattr(args, "nproc", 1) > 1 and "WORLD_SIZE" not in os.environ:
            from leantune.distributed import launch_torchrun

            return launch_torchrun(args.nproc, _without_nproc(argv))
        if program:
            _switch_allocator(args, argv)
        return args.func(args)
    except _user_errors() as err:
        print(f"leantune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leantune: interrupted; the last complete checkpoint is intact (use --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
