"""Names people already know (transformers, PEFT, TRL, axolotl): refused, with leantune's name in the error."""

from __future__ import annotations

import pytest
import yaml
from pydantic import BaseModel

from leantune.config import Recipe, RecipeError, load_recipe
from leantune.config_hints import FOREIGN_NAMES, real_key

BASE = {"model": {"path": "m"}, "data": {"train": "d.jsonl"}}
NAMES = sorted(FOREIGN_NAMES)


def _fields() -> set[str]:
    """Every dotted ``section.key`` of the recipe models, walked from ``Recipe``."""
    out = set()
    for name, field in Recipe.model_fields.items():
        cls = field.annotation
        assert isinstance(cls, type) and issubclass(cls, BaseModel), name
        out |= {f"{name}.{key}" for key in cls.model_fields}
    return out


def test_every_target_is_a_real_field():
    fields = _fields()
    missing = {k: v.target for k, v in FOREIGN_NAMES.items() if v.target not in fields}
    assert not missing, f"targets that are not recipe fields: {missing}"
    assert all(real_key(v.target) for v in FOREIGN_NAMES.values())
    assert not real_key("optim.learning_rate") and not real_key("nosection.lr")


def test_no_foreign_name_is_a_section():
    assert not set(FOREIGN_NAMES) & set(Recipe.model_fields)  # a section name would never reach the hint


def _refused(tmp_path, raw: dict, overrides: list[str] | None = None) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError) as err:
        load_recipe(path, overrides)
    return str(err.value)


def _foreign_section(key: str) -> str:
    """A section where ``key`` is not a field: its target's section, unless leantune uses the same name there."""
    section = FOREIGN_NAMES[key].target.split(".")[0]
    return section if not real_key(f"{section}.{key}") else "quant"


@pytest.mark.parametrize("key", NAMES)
def test_foreign_name_is_refused_with_leantune_name(tmp_path, key):
    target, origin = FOREIGN_NAMES[key].target, FOREIGN_NAMES[key].origin
    expected = f"{key!r} is the {origin} name; leantune's is {target!r}"
    top = _refused(tmp_path, {**BASE, key: 1})  # learning_rate: 1e-4 at the top level
    assert f"unknown key {key!r}" in top and expected in top and f"{tmp_path / 'r.yaml'}:" in top
    section = _foreign_section(key)
    inside = _refused(tmp_path, {**BASE, section: {key: 1}})  # optim: {learning_rate: 1e-4}
    assert f"unknown key '{section}.{key}'" in inside and expected in inside
    for dotted in (f"{key}=1", f"{section}.{key}=1"):  # the same from the command line
        assert expected in _refused(tmp_path, BASE, [dotted])


def test_real_key_in_the_wrong_section_names_its_home(tmp_path):
    msg = _refused(tmp_path, {**BASE, "train": {"lr": 1e-4}})
    assert "'lr' is not a key of 'train'; it lives at 'optim.lr'" in msg
    msg = _refused(tmp_path, {**BASE, "steps": 3})
    assert "'steps' is not a top-level section; it lives at 'train.steps'" in msg


def test_typo_still_gets_did_you_mean(tmp_path):
    msg = _refused(tmp_path, {**BASE, "optim": {"lrr": 1e-4}})
    assert "Did you mean 'lr'" in msg and "Valid keys:" in msg


def test_report_to_field():
    r = Recipe.model_validate({**BASE, "train": {"report_to": ["tensorboard", "mlflow"]}})
    assert r.train.report_to == ["tensorboard", "mlflow"]
    assert Recipe.model_validate(BASE).train.report_to == []
    with pytest.raises(ValueError, match="report_to"):
        Recipe.model_validate({**BASE, "train": {"report_to": ["comet"]}})
