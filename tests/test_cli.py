"""The command line itself: --version, help on every option, --quiet / --verbose, results on stdout only."""

from __future__ import annotations

import argparse
import json

import pytest

from leantune.cli import build_parser, main, version
from leantune.log import configure_logging, progress_enabled

# `report` belongs to another change in flight (its subparser is edited there); it joins the check once merged.
OWNED_ELSEWHERE: set[str] = set()


def _walk(parser: argparse.ArgumentParser, path: str = "leantune"):
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        yield path, action
        if isinstance(action, argparse._SubParsersAction):
            for pseudo in action._choices_actions:  # the one-line help of each subcommand
                yield f"{path} {pseudo.dest}", pseudo
            for name, sub in action.choices.items():
                if name not in OWNED_ELSEWHERE:
                    yield from _walk(sub, f"{path} {name}")


def test_every_option_and_positional_has_help():
    actions = list(_walk(build_parser()))
    assert len(actions) > 40  # the walk reached the subcommands
    missing = [f"{path}: {'/'.join(a.option_strings) or a.dest}" for path, a in actions
               if not (a.help or "").strip() or a.help == argparse.SUPPRESS]
    assert not missing, "options without help text:\n" + "\n".join(missing)


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    printed = capsys.readouterr().out.strip()
    assert printed == f"leantune {version()}" and version()[0].isdigit()


def test_quiet_and_verbose_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--quiet", "--verbose", "validate", "x.yaml"])
    assert done.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_make_data_messages_go_to_stderr_and_obey_quiet(tmp_path, capsys):
    args = ["make-data", "arithmetic", "--out", str(tmp_path), "--train", "4", "--valid", "2"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert out == "" and f"[leantune] wrote train: {tmp_path / 'train.jsonl'}" in err
    assert main(["--quiet", *args]) == 0
    assert capsys.readouterr() == ("", "")
    assert not progress_enabled()
    configure_logging()
    assert progress_enabled()


def test_eval_prints_json_to_stdout_with_bars_and_debug_on_stderr(tiny_chat_model_dir, capsys):
    args = ["eval", str(tiny_chat_model_dir), "--task", "arithmetic", "--num-problems", "3", "--max-new-tokens", "3",
            "--batch-size", "2"]
    assert main(["--verbose", *args]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["problems"] == 3  # stdout is the result and nothing else
    assert "generate" in err and "batch" in err  # the generation bar: 2 batches
    assert "load " in err and "stage" in err  # the model-loading stage bar
    assert "[leantune] debug (leantune.models.loading): loaded" in err
    assert main(["--quiet", *args]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["problems"] == 3
    assert "generate" not in err and "stage" not in err and "[leantune]" not in err
    configure_logging()


def test_quantization_bar_obeys_quiet(tiny_model_dir, capsys):
    from leantune.config import ModelConfig
    from leantune.models.loading import load_model
    from leantune.quant import quantize_model

    configure_logging()
    stats = quantize_model(load_model(ModelConfig(path=str(tiny_model_dir))), 8)
    err = capsys.readouterr().err
    assert f"quantize INT8:   0%|          | 0/{stats.layers}" in err  # one step per layer
    configure_logging(quiet=True)
    quantize_model(load_model(ModelConfig(path=str(tiny_model_dir))), 8)
    err = capsys.readouterr().err
    assert "quantize" not in err and "Loading weights" not in err  # Hugging Face's own bar obeys --quiet too
    configure_logging()
