"""Recipes: validation errors name the file, line and field; every shipped recipe validates; docs/recipes.md in sync."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from leantune.cli import main
from leantune.config import REFERENCE_MARKERS, RecipeError, load_recipe, recipe_reference_markdown, sync_reference

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


GOOD = "model:\n  path: m\ndata:\n  train: d.jsonl\noptim:\n  lr: 0.001\n"


def test_overrides_apply_and_validate(tmp_path):
    r = load_recipe(_write(tmp_path, GOOD), ["optim.lr=3e-4", "train.activation_checkpointing=2", "adapter.target_modules=[q_proj]"])
    assert r.optim.lr == 3e-4 and r.train.activation_checkpointing == 2 and r.adapter.target_modules == ["q_proj"]


def test_unknown_key_lists_valid_keys_with_line(tmp_path):
    p = _write(tmp_path, GOOD + "train:\n  stepz: 3\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert f"{p}:8" in msg and "train.stepz" in msg and "Did you mean 'steps'" in msg
    assert "micro_batch_size" in msg and "grad_accum" in msg


def test_wrong_type_names_field_and_line(tmp_path):
    p = _write(tmp_path, GOOD.replace("0.001", "fast"))
    with pytest.raises(RecipeError, match=rf"{re.escape(str(p))}:6: field 'optim.lr'"):
        load_recipe(p)


def test_unknown_override_is_an_error():
    with pytest.raises(RecipeError, match="unknown key 'optim.lrr'.*Valid keys: .*lr"):
        load_recipe(ROOT / "recipes" / "sft_smollm2_addition.yaml", ["optim.lrr=1"])


def test_missing_section_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="missing required field 'data'"):
        load_recipe(_write(tmp_path, "model:\n  path: m\n"))
    with pytest.raises(RecipeError, match=r"r.yaml:\d+: invalid YAML"):
        load_recipe(_write(tmp_path, "model:\n  path: [m\n"))
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_stage_order_validated(tmp_path):
    text = GOOD + "loss:\n  stages:\n    - {until_step: 10}\n    - {until_step: 5}\n"
    with pytest.raises(RecipeError, match="until_step values must increase"):
        load_recipe(_write(tmp_path, text))


def test_stage_weights_schedule(tmp_path):
    text = GOOD + "loss:\n  stages:\n    - {until_step: 2, weights: {think: 1.0}}\n    - {weights: {think: 0.0}}\n"
    r = load_recipe(_write(tmp_path, text))
    assert [r.loss.weights_at(s).think for s in range(4)] == [1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_validates_and_documents_its_command(path):
    load_recipe(path)  # no model is built
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "leantune " in first, f"{path.name}: first line must give the command"


def test_shipped_recipes_exist():
    assert len(RECIPES) >= 3


def test_validate_cli(capsys, tmp_path):
    assert main(["validate", *map(str, RECIPES)]) == 0
    assert main(["validate", str(_write(tmp_path, GOOD + "bogus: 1\n"))]) == 2
    assert "unknown key 'bogus'" in capsys.readouterr().err


def test_demo_recipe_file_matches_demo():
    import yaml

    from leantune.demo import DEMO_RECIPE

    shipped = yaml.safe_load((ROOT / "recipes" / "sft_smollm2_addition.yaml").read_text())
    assert shipped == DEMO_RECIPE


def test_recipe_reference_in_sync():
    """docs/recipes.md's reference is what the config models generate (python -m leantune.config docs/recipes.md)."""
    doc = (ROOT / "docs" / "recipes.md").read_text()
    start, end = REFERENCE_MARKERS
    assert start in doc and end in doc
    body = doc.split(start)[1].split(end)[0].strip()
    assert body == recipe_reference_markdown().strip(), "run: python -m leantune.config docs/recipes.md"
    # nested sections list their own keys, dotted (an optional section's too)
    from leantune.config import ActiveConfig, MixtureConfig, RouterConfig

    for prefix, cls in (("rl.router", RouterConfig), ("dpo.active", ActiveConfig), ("data.mixture", MixtureConfig)):
        for key in cls.model_fields:
            assert f"| `{prefix}.{key}` |" in body, f"{prefix}.{key}"


def test_sync_reference_rewrites_only_the_marked_block(tmp_path):
    start, end = REFERENCE_MARKERS
    doc = tmp_path / "ref.md"
    doc.write_text(f"# head\n{start}\nstale\n{end}\ntail\n")
    assert sync_reference(doc) is True
    text = doc.read_text()
    assert text.startswith(f"# head\n{start}\n") and text.endswith(f"{end}\ntail\n")
    assert "stale" not in text and "`model.path`" in text
    assert sync_reference(doc) is False
    (tmp_path / "none.md").write_text("no markers")
    with pytest.raises(RecipeError, match="markers"):
        sync_reference(tmp_path / "none.md")
