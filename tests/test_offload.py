"""Offloaded checkpoints (`train.offload_checkpoints`): layer inputs in a memory-mapped file give the same
loss and gradients as keeping them in RAM, and the file holds what it should."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_recipe

from leantune.adapters.lora import apply_adapter
from leantune.config import AdapterConfig, RecipeError, recipe_from_dict
from leantune.models.tiny import tiny_model
from leantune.train.offload import ActivationSpill
from leantune.train.session import set_activation_checkpointing


def _model(policy="all"):
    model = apply_adapter(tiny_model(vocab_size=101, hidden_size=48, layers=3, seed=1),
                          AdapterConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    set_activation_checkpointing(model, policy)
    return model.train()


def _loss_and_grads(model, ids, spill=None):
    model.zero_grad(set_to_none=True)
    ctx = spill.forward() if spill is not None else torch.enable_grad()
    with ctx:
        logits = model(input_ids=ids).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("policy", ["all", 2])
def test_offloaded_checkpoints_give_the_same_gradients(tmp_path, policy):
    ids = torch.randint(0, 101, (3, 13), generator=torch.Generator().manual_seed(0))
    model = _model(policy)
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    spill = ActivationSpill(model, tmp_path)
    try:
        loss, grads = _loss_and_grads(model, ids, spill)
        # the embeddings' output and every decoder layer's output, B x T x H fp32 each
        assert spill.slots_written == 1 + 3
        assert spill.bytes_written == 4 * 3 * 13 * 48 * 4
        loss2, grads2 = _loss_and_grads(model, ids, spill)  # a second step reuses the file
    finally:
        spill.close()
    assert torch.equal(loss, ref_loss) and torch.equal(loss2, ref_loss)
    assert set(grads) == set(ref_grads) and all(g.abs().sum() > 0 for g in grads.values())
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=0)
        torch.testing.assert_close(grads2[name], ref_grads[name], rtol=0, atol=0)


def _mapping_of(ptr: int) -> dict:
    """The /proc/self/smaps entry holding address ``ptr``: its path and resident kB."""
    entry = None
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            entry = {"path": " ".join(head[5:]), "rss_kb": None} if lo <= ptr < hi else None
        elif entry is not None and head[0] == "Rss:":
            entry["rss_kb"] = int(head[1])
            return entry
    raise AssertionError(f"no mapping holds {ptr:#x}")


def test_the_layer_inputs_live_in_the_file_and_leave_ram(tmp_path):
    """What the next layer receives is the file-backed copy, paged out once read; nothing is written
    outside forward()."""
    model = _model()
    seen = []
    layer1 = model.get_base_model().model.layers[1]
    handle = layer1.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    spill = ActivationSpill(model, tmp_path)
    try:
        ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
        with spill.forward():
            out = model(input_ids=ids).logits
        region = _mapping_of(seen[0].data_ptr())
        assert region["path"].startswith(str(tmp_path))  # a (deleted) temporary file in the given directory
        assert region["rss_kb"] == 0  # paged out: in the file, not in RAM
        out.sum().backward()  # the recomputation reads it back
        written = spill.slots_written
        with torch.no_grad():
            model.eval()(input_ids=ids)  # evaluation: hooks inactive
        model.train()
        assert spill.slots_written == written == 4
    finally:
        handle.remove()
        spill.close()
    assert not spill._handles


def test_training_with_offload_matches_and_bills_it(tiny_model_dir, sft_data, tmp_path):
    """`leantune train` with train.offload_checkpoints: the same losses as without, the ledger counts the
    bytes that went through the file, and the file is gone afterwards."""
    import json

    from leantune.train.sft import train

    losses, ledgers = {}, {}
    for offload in (False, True):
        out = tmp_path / f"run-{offload}"
        raw = tiny_recipe(tiny_model_dir, sft_data, out, train={"activation_checkpointing": "all",
                                                                  "offload_checkpoints": offload})
        ledgers[offload] = train(recipe_from_dict(raw), quiet=True).ledger
        losses[offload] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert not list(out.glob("leantune-activations-*"))
    assert losses[True] == losses[False]
    assert ledgers[False]["extra"]["offloaded_checkpoints"] is None
    billed = ledgers[True]["extra"]["offloaded_checkpoints"]
    assert billed["slots_written"] == 3 * (1 + 2) and billed["bytes_written"] > 0  # 3 steps x (embeddings + 2 layers)


def test_offload_needs_checkpointing(tiny_model_dir, tmp_path):
    raw = tiny_recipe(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "run")
    raw["train"]["offload_checkpoints"] = True
    with pytest.raises(RecipeError, match="offload_checkpoints"):
        recipe_from_dict(raw)
    raw["train"]["activation_checkpointing"] = "all"
    assert recipe_from_dict(raw).train.offload_checkpoints


def test_offload_refuses_a_model_that_is_not_on_the_cpu(tmp_path):
    model = tiny_model().to("meta")  # stands in for a GPU: any device but the CPU
    with pytest.raises(ValueError, match="model is on meta"):
        ActivationSpill(model, tmp_path)
    assert list(tmp_path.iterdir()) == []  # refused before creating its file
