"""Model loading: local safetensors, GGUF, clear one-line errors, no pickles, no remote code."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from leantune.cli import main
from leantune.config import ModelConfig
from leantune.models.loading import ModelLoadError, load_model, load_model_and_tokenizer, resolve_source


def test_local_directory_loads_in_chosen_dtype(tiny_model_dir):
    model, tok, src = load_model_and_tokenizer(ModelConfig(path=str(tiny_model_dir), dtype="bfloat16"))
    assert src.kind == "local" and next(model.parameters()).dtype == torch.bfloat16
    assert tok.pad_token_id is not None


def test_missing_path_is_one_line(tmp_path):
    with pytest.raises(ModelLoadError) as e:
        resolve_source(ModelConfig(path=str(tmp_path / "nope")))
    assert "no such file or directory" in str(e.value) and "\n" not in str(e.value)


def test_pickled_weights_refused(tmp_path, tiny_model_dir):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(tiny_model_dir / "config.json", d)
    torch.save({"w": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only pickled weights"):
        resolve_source(ModelConfig(path=str(d)))


def test_non_gguf_file_and_missing_config(tmp_path):
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="must be .gguf"):
        resolve_source(ModelConfig(path=str(f)))
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_source(ModelConfig(path=str(tmp_path)))


def test_unreadable_weights_are_one_line(tmp_path, tiny_model_dir):
    d = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, d)
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError) as e:
        load_model(ModelConfig(path=str(d)))
    assert "cannot load model" in str(e.value) and "\n" not in str(e.value)


def test_unsupported_architecture(tmp_path, tiny_model_dir):
    d = tmp_path / "alien"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "alien_transformer"
    cfg["architectures"] = ["AlienForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as e:
        load_model(ModelConfig(path=str(d)))
    assert "alien" in str(e.value).lower() and "\n" not in str(e.value)


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="hub"):
        load_model(ModelConfig(path="no-such-org/no-such-model"))


def test_remote_code_off_by_default():
    assert ModelConfig(path="x").trust_remote_code is False


def test_cli_reports_model_error(tmp_path, sft_data, capsys):
    import yaml

    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"model": {"path": str(tmp_path / "missing")}, "data": {"train": str(sft_data)},
                                 "train": {"output_dir": str(tmp_path / "run"), "progress": False}}))
    assert main(["train", str(p)]) == 2
    err = capsys.readouterr().err
    assert "missing: no such file or directory" in err
    assert not (tmp_path / "run" / "ledger.json").exists()


@pytest.mark.slow
def test_builtin_smollm2_gguf_loads():
    pytest.importorskip("gguf")
    try:
        src = resolve_source(ModelConfig(path="builtin:smollm2-135m-instruct"))
    except ModelLoadError as e:
        pytest.skip(str(e))
    model, tok, _ = load_model_and_tokenizer(ModelConfig(path="builtin:smollm2-135m-instruct"))
    assert src.kind == "gguf" and model.config.vocab_size == 49152
    ids = tok("2 + 2 =", return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()
