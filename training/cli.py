"""``radvlm-pacs train ...``: build the instruction set, fine-tune, evaluate.

What a user can fix (a folder, a table's column, an image, a flag, an endpoint that refuses, a
checkpoint path) is ``training.errors.Refused``: one line on stderr, exit status 2, and nothing
left at ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training import COMMAND_HELP
from training.errors import Refused

LLM_KEY_ENV = "RADVLM_LLM_API_KEY"


def _refusals(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``command``, with what the user can fix said in one line and exit status 2."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except Refused as exc:
            print(f"radvlm-pacs: {exc}", file=sys.stderr)
            return 2

    return run


def default_workers() -> int:
    """Data loader processes: this machine's cores (those this process may use), shared among the training
    processes of the node (``LOCAL_WORLD_SIZE``, set by accelerate and torchrun)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def checkpoint(model: str) -> str:
    """``model`` when it is an existing folder or can be a hub id (OWNER/NAME). A path that does not exist
    is refused at once: transformers would try it on the hub, for minutes without a network."""
    if Path(model).expanduser().exists():
        return model
    parts = model.replace("\\", "/").split("/")
    if model.startswith((".", "/", "~")) or len(parts) != 2 or not all(parts) or Path(parts[0]).is_dir():
        found = next((parent for parent in Path(model).expanduser().absolute().parents if parent.is_dir()), None)
        raise Refused(f"--model {model}: no such folder" + (f" ({found} holds no {Path(model).name})" if found else "")
                      + "; a hub id is OWNER/NAME")
    return model


def _folders(pairs: list[str]) -> dict[str, Path]:
    from training.recipe import DATASETS

    folders = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or name not in DATASETS:
            raise Refused(f"--data takes NAME=FOLDER with NAME one of {', '.join(DATASETS)}, not {pair!r}")
        if not Path(path).is_dir():
            raise Refused(f"--data {pair}: no such folder")
        folders[name] = Path(path)
    return folders


def _llm(url: str | None, model: str | None) -> Any:
    if not url:
        return None
    from training.llm import ChatLLM, Endpoint

    if not model:
        raise Refused(f"the LLM endpoint {url} needs a model name too (--llm-model or --judge-model)")
    return ChatLLM(Endpoint(url=url, model=model, api_key=os.environ.get(LLM_KEY_ENV, "unused")))


@_refusals
def cmd_dataset(args: argparse.Namespace) -> int:
    """``train dataset``: build the parts the given folders (and LLM) allow, write the instruction JSON to ``--out``,
    and print the counts beside the paper's."""
    from training import instructions, recipe
    from training.reports import LLMCleaner, RuleCleaner

    llm = _llm(args.llm_url, args.llm_model)
    folders = _folders(args.data)
    cleaner = LLMCleaner(llm, args.cache / "reports") if llm else RuleCleaner()
    inputs = recipe.Inputs(folders=folders, cleaner=cleaner, split=args.split, uncertain=args.uncertain,
                           llm=llm, cache=args.cache, images=args.missing_images)
    parts = recipe.select(inputs, args.only or ())
    tallies: list[recipe.Tally] = []
    instructions.write(recipe.build(parts, inputs, random.Random(args.seed), tallies), args.out)
    print(recipe.counts_table(tallies))
    for note in recipe.notes(tallies):
        print(note)
    print(f"wrote {recipe.count(sum(t.written for t in tallies), 'datapoint')} to {args.out}")
    return 0


def _dataset_help() -> str:
    """The epilog of ``train dataset --help``: each data set's folder as the builders read it."""
    from training.recipe import LAYOUTS, PARTS

    lines = ["data sets (--data NAME=FOLDER), the files read in each folder ([column]: read when present), and the "
             "parts built from them:"]
    for name, layout in LAYOUTS.items():
        parts = [part.name for part in PARTS if name in part.needs]
        lines.append(f"  {name}: {', '.join(parts)}")
        lines += [f"      {line}" for line in layout.describe()]
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose epilog may be a function, called when help is shown: the data set layouts
    import every source, which every other command can do without."""

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


@_refusals
def cmd_finetune(args: argparse.Namespace) -> int:
    """``train finetune``: train ``--model`` on the instruction files with RadVLM's recipe (the flags overriding it) and
    print the final metrics."""
    model = checkpoint(args.model)
    from training.finetune import Recipe, finetune
    from training.instructions import read

    items = [item for path in args.data for item in read(path)]
    recipe = Recipe(learning_rate=args.lr, vision_learning_rate=args.vision_lr, epochs=args.epochs,
                    batch_size=args.batch_size, gradient_accumulation=args.grad_accum, max_length=args.max_length,
                    save_steps=args.save_steps, logging_steps=args.logging_steps, deepspeed=args.deepspeed,
                    lora=args.lora, gradient_checkpointing=not args.no_gradient_checkpointing, seed=args.seed,
                    dataloader_workers=args.workers)
    result = finetune(model, items, args.out, recipe, image_folder=args.image_folder, resume=args.resume,
                      too_long=args.too_long)
    print(json.dumps(result, indent=2))
    return 0


@_refusals
def cmd_evaluate(args: argparse.Namespace) -> int:
    """``train evaluate``: ask the configured model every question of ``--data`` (or take ``--predictions`` made
    before), score them per task and write ``metrics.json`` to ``--out``."""
    from training import evaluate
    from training.instructions import read

    if not args.predictions and not args.data:
        raise Refused("evaluate needs --data (to ask the model) or --predictions (to score)")
    judge = _llm(args.judge_url, args.judge_model)
    if args.predictions:
        predictions = evaluate.read_predictions(args.predictions)
        args.out.mkdir(parents=True, exist_ok=True)
    else:
        from radvlm.backends import load_backend
        from radvlm.backends.base import GenerationParams
        from records.settings import load_settings
        from training.progress import progress

        settings = load_settings(args.config)
        items = list(read(args.data))[: args.limit or None]
        if settings.model.backend == "transformers":
            checkpoint(settings.model.id)
        backend = load_backend(settings.model)
        args.out.mkdir(parents=True, exist_ok=True)
        predictions = evaluate.write_predictions(
            evaluate.predict(progress(items, "evaluate", total=len(items)), backend, args.image_folder,
                             GenerationParams(settings.model.max_new_tokens)),
            args.out / "predictions.jsonl")
    scores = evaluate.score(predictions, evaluate.Scoring(args.bertscore_model, args.bertscore_layers, judge))
    (args.out / "metrics.json").write_text(json.dumps(scores, indent=2))
    for task, entry in scores.items():
        shown = {k: v for k, v in entry.items() if k != "per_label"}
        print(f"{task}: {json.dumps(shown)}")
    return 0


@_refusals
def cmd_export_site(args: argparse.Namespace) -> int:
    """``train export-site``: add this installation's signed-off studies, de-identified, to ``--out`` (an audited
    export) and say how many were left out, and why."""
    import getpass

    from records.clock import utcnow
    from records.db import make_engine, make_session_factory
    from records.settings import load_settings
    from records.storage import InstanceStore
    from training.sources import site

    settings = load_settings(args.config)
    site.check_database(settings.effective_database_url)  # before the engine, which would create one
    sessions = make_session_factory(make_engine(settings.effective_database_url))
    done = site.export(sessions, InstanceStore(settings.effective_storage_dir, fsync=False), args.out,
                       user=getpass.getuser(), clock=utcnow)
    left_out = [f"{done.removed:,d} whose images were already removed (node.keep_images_days)"] * bool(done.removed)
    left_out += [f"{done.burned_in:,d} whose images carry burned-in text"] * bool(done.burned_in)
    print(f"{done.rows:,d} signed-off studies in {args.out / site.TABLE}, {done.added:,d} added now, de-identified"
          + (f"; left out: {', '.join(left_out)}" if left_out else ""))
    return 0


def add_commands(sub: Any) -> None:
    """Add ``train`` (dataset, finetune, export-site, evaluate) to ``sub``, the command line's subparsers; each
    command's ``func`` returns the exit status."""
    train = sub.add_parser("train", help=COMMAND_HELP).add_subparsers(
        dest="train_command", required=True, parser_class=_Parser)

    data = train.add_parser("dataset", help="build the LLaVA instruction JSON from public data set folders",
                            epilog=_dataset_help, formatter_class=argparse.RawDescriptionHelpFormatter)
    data.add_argument("--data", action="append", default=[], metavar="NAME=FOLDER",
                      help="a data set's folder, e.g. vindr-cxr=/data/vindr (repeat)")
    data.add_argument("--out", type=Path, required=True)
    data.add_argument("--only", action="append", help="build only this part, e.g. vindr-cxr/detection (repeat)")
    data.add_argument("--split", choices=("train", "test"), default="train",
                      help="train: the recipe's mix; test: each source's held-out test split, once, for evaluate")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--uncertain", choices=("absent", "present"), default="absent",
                      help="CheXpert's uncertain labels (the paper: absent; RadVLM's code: present)")
    data.add_argument("--llm-url", help="OpenAI-compatible endpoint that cleans reports and writes conversations "
                                        f"(key in ${LLM_KEY_ENV}); without one, reports are cleaned by rules")
    data.add_argument("--llm-model")
    data.add_argument("--cache", type=Path, default=Path("llm-cache"), help="the LLM's answers, for resuming")
    data.add_argument("--missing-images", choices=("refuse", "skip"), default="refuse",
                      help="an image that is missing or does not open (every one is checked: a DICOM header, or "
                           "a file PIL verifies), or that boxes fall outside of (a downsampled copy, not the "
                           "original): refuse the build (exit 2, nothing written), or leave its datapoints out and "
                           "count them")
    data.set_defaults(func=cmd_dataset)

    tune = train.add_parser("finetune", help="fine-tune a LLaVA-OneVision checkpoint with RadVLM's recipe")
    tune.add_argument("--model", required=True, help="checkpoint: hub id or folder")
    tune.add_argument("--data", type=Path, action="append", required=True, help="instruction JSON (repeat)")
    tune.add_argument("--out", type=Path, required=True)
    tune.add_argument("--image-folder", type=Path, help="where relative image paths start")
    tune.add_argument("--lr", type=float, help="learning rate of the language model and projector "
                                               "(default 1e-5, RadVLM's; with --lora 2e-4)")
    tune.add_argument("--vision-lr", type=float, default=2e-6)
    tune.add_argument("--epochs", type=float, default=1.0)
    tune.add_argument("--batch-size", type=int, default=1)
    tune.add_argument("--grad-accum", type=int, default=2)
    tune.add_argument("--max-length", type=int, default=32768, help="tokens per datapoint, image included")
    tune.add_argument("--too-long", choices=("refuse", "skip"), default="refuse",
                      help="a datapoint over --max-length, found before the first step: refuse the run (exit 2, "
                           "no --out made), or leave it out and count it")
    tune.add_argument("--save-steps", type=int, default=500)
    tune.add_argument("--logging-steps", type=int, default=10)
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--workers", type=int, default=default_workers(),
                      help="data loader processes (default: this machine's cores, divided among the training "
                           "processes of the node)")
    tune.add_argument("--deepspeed", type=Path, help="DeepSpeed config, e.g. training/zero3.json")
    tune.add_argument("--lora", action="store_true",
                      help="low-rank adapters on the language model (one GPU), at 2e-4 unless --lr says otherwise; "
                           "merged into the model at the end, so --out is a full checkpoint (the adapter alone in "
                           "--out/adapter)")
    tune.add_argument("--no-gradient-checkpointing", action="store_true")
    tune.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    tune.set_defaults(func=cmd_finetune)

    export = train.add_parser("export-site", help="this installation's signed-off studies (image, report and "
                                                  "findings as signed), de-identified, as a data set folder: "
                                                  "--data site=FOLDER")
    export.add_argument("--out", type=Path, required=True, help="the folder; run again to add newer sign-offs")
    export.set_defaults(func=cmd_export_site)

    ev = train.add_parser("evaluate", help="the paper's metrics for the configured model on an instruction JSON")
    ev.add_argument("--data", type=Path, help="instruction JSON (test split)")
    ev.add_argument("--predictions", type=Path, help="score these predictions.jsonl instead of asking the model")
    ev.add_argument("--out", type=Path, required=True)
    ev.add_argument("--image-folder", type=Path)
    ev.add_argument("--limit", type=int, help="the first N datapoints only")
    ev.add_argument("--bertscore-model", help="e.g. roberta-large, or a local folder")
    ev.add_argument("--bertscore-layers", type=int)
    ev.add_argument("--judge-url", help="OpenAI-compatible endpoint of the conversation judge")
    ev.add_argument("--judge-model")
    ev.set_defaults(func=cmd_evaluate)

