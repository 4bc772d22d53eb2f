"""Selective activation checkpointing (`train.activation_checkpointing: selective`): the gradients of no
checkpointing; what a step keeps lies between 'all' and 'off' and is what the planner predicts; the
`--memory` search offers it; a recipe that leaves the setting null gets the fastest one that fits."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
import yaml
from conftest import tiny_recipe
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from leantune.adapters.lora import apply_adapter, causal_lm
from leantune.cli import main
from leantune.config import AdapterConfig, recipe_from_dict
from leantune.models.tiny import tiny_model
from leantune.plan import memory as M
from leantune.plan import model_shape, plan_memory
from leantune.plan.model_shape import shape_from_config
from leantune.plan.search import (
    AUTO_BUDGET_FRACTION,
    CHECKPOINT_CHOICES,
    choose_activation_checkpointing,
    knob_values,
    search,
    step_cost,
)
from leantune.train.session import set_activation_checkpointing

ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
V = 101


def _model(method="lora", targets=ALL_LINEARS, dropout=0.0, dtype=torch.float32, layers=2):
    model = tiny_model(vocab_size=V, layers=layers, seed=1).to(dtype)
    model = apply_adapter(model, AdapterConfig(method=method, r=4, alpha=8, dropout=dropout, target_modules=targets))
    with torch.no_grad():  # LoRA's B starts at zero, which would leave every A gradient zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model.train()


def _batch(batch=3, seq=13, padded=True):
    ids = torch.randint(3, V, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padded:
        mask[1:, seq // 2:] = 0
    return ids, mask


def _grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same dropout masks in every run
    logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method, dropout", [("lora", 0.0), ("lora", 0.1), ("full", 0.0)])
def test_selective_gives_the_gradients_of_no_checkpointing(method, dropout):
    model = _model(method, dropout=dropout)
    ids, mask = _batch()
    ref = _grads(model, ids, mask)
    assert set_activation_checkpointing(model, "selective") == 2
    got = _grads(model, ids, mask)
    assert set(got) == set(ref) and all(g.abs().sum() > 0 for g in ref.values())
    if method == "lora":
        assert len(ref) == 2 * 2 * len(ALL_LINEARS)  # every A and B of every adapted linear
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-8, msg=name)


def test_selective_with_offloaded_inputs_gives_the_same_gradients(tmp_path):
    """train.offload_checkpoints with selective: the layer inputs in a file, the cache in RAM, same gradients."""
    from leantune.train.offload import ActivationSpill

    model = _model(dropout=0.1)
    ids, mask = _batch()
    ref = _grads(model, ids, mask)
    set_activation_checkpointing(model, "selective")
    spill = ActivationSpill(model, tmp_path)
    try:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        with spill.forward():
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
        loss.backward()
        assert spill.slots_written == 1 + 2  # the embeddings' output and each layer's
    finally:
        spill.close()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref[name], rtol=1e-6, atol=1e-8, msg=name)


# ----------------------------------------------------------------------------------------------
# What a step keeps: measured


class _Allocations(TorchDispatchMode):
    """Weak references to the storage of every tensor an op returns while the mode is active (outermost,
    so it also sees the ops that run under the selective checkpoint's caching mode)."""

    def __init__(self):
        super().__init__()
        self.storages: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.storages.append(weakref.ref(t.untyped_storage()))
        return out


def _live_bytes(allocations: _Allocations, exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages ``allocations`` saw that are still alive, less those of ``exclude``
    (parameters and inputs: a view of one, such as a transposed weight, shares its storage)."""
    gc.collect()
    owned = {t.untyped_storage().data_ptr() for t in exclude}
    live = {}
    for ref in allocations.storages:
        s = ref()
        if s is not None and s.data_ptr() not in owned:
            live[s.data_ptr()] = s.nbytes()
    return sum(live.values())


def _kept_bytes(model, ids, mask) -> int:
    """Bytes of the storages a decoder forward creates that are still alive once its output has been
    reduced to a scalar: what the step keeps for backward (autograd's saved tensors, checkpoint inputs,
    the selective checkpoint's cache, what their closures hold), whatever the mechanism."""
    decoder = causal_lm(model).get_decoder()
    allocations = _Allocations()
    with allocations:
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    loss = hidden.sum()  # sum's backward keeps no tensor
    del hidden
    kept = _live_bytes(allocations, [*model.parameters(), *model.buffers(), ids, mask, loss])
    assert loss.requires_grad  # the graph, and everything it holds, stayed alive until here
    return kept


def _kept_by_policy(policy: str, padded: bool = True, **model_kw) -> int:
    model = _model(**model_kw)
    ids, mask = _batch(padded=padded)
    set_activation_checkpointing(model, policy)
    return _kept_bytes(model, ids, mask)


def test_the_measurement_counts_what_autograd_saves():
    """The live-storage count equals a saved-tensors-hook count where both apply (no checkpointing)."""
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(5, 8, requires_grad=True)
    hooked = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in (x.untyped_storage().data_ptr(), lin.weight.untyped_storage().data_ptr()):
            hooked[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    allocations = _Allocations()
    with allocations, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = torch.nn.functional.silu(lin(x)) * 3.0  # silu saves its (5, 4) input; * 3.0 saves nothing
    loss = y.sum()
    del y
    live = _live_bytes(allocations, [x, lin.weight, lin.bias, loss])
    assert live == sum(hooked.values()) == 5 * 4 * 4


@pytest.mark.parametrize("padded", [True, False])
def test_selective_keeps_less_than_off_and_more_than_all(padded):
    off, sel, full = (_kept_by_policy(p, padded=padded) for p in ("off", "selective", "all"))
    assert full < sel < off


@pytest.mark.parametrize("dtype, targets, method, dropout, padded", [
    (torch.float32, ALL_LINEARS, "lora", 0.0, True),
    (torch.float32, ["q_proj", "v_proj", "down_proj"], "lora", 0.1, False),
    (torch.bfloat16, ["q_proj", "k_proj", "v_proj", "o_proj"], "lora", 0.0, True),
    (torch.float32, ["q_proj"], "full", 0.0, True),
])
def test_planner_term_matches_what_selective_keeps(dtype, targets, method, dropout, padded):
    """Per layer, selective keeps what the planner says: 'all' keeps each layer's input only, so the
    measured difference between the two is exactly sum over layers of (selective term - layer input)."""
    kw = dict(method=method, targets=targets, dropout=dropout, dtype=dtype)
    ids, mask = _batch(padded=padded)
    kept = {}
    for policy in ("all", "selective"):
        model = _model(**kw)
        set_activation_checkpointing(model, policy)
        kept[policy] = _kept_bytes(model, ids, mask)
    B, T = ids.shape
    e = M.DTYPE_BYTES[str(dtype).removeprefix("torch.")]
    recipe = recipe_from_dict({"model": {"path": "unused", "dtype": str(dtype).removeprefix("torch.")},
                               "data": {"train": "unused", "max_length": T},
                               "adapter": {"method": method, "r": 4, "dropout": dropout, "target_modules": targets}})
    shape = shape_from_config(causal_lm(model).config)
    specs = M.layer_specs(shape, recipe)
    per_layer = [M.selective_layer_saved_bytes(s, [lin for lin in shape.linears if lin.layer == i], shape, B, T, e, 4)
                 for i, s in enumerate(specs)]
    assert kept["selective"] - kept["all"] == sum(per_layer) - shape.layers * B * T * shape.hidden * e


class _PeakAllocations(_Allocations):
    """``_Allocations`` that also records the most bytes alive after any op (``exclude``: not counted)."""

    def __init__(self, exclude: set[int]):
        super().__init__()
        self.exclude, self.peak = exclude, 0

    def live(self) -> int:
        live = {}
        for ref in self.storages:
            s = ref()
            if s is not None and s.data_ptr() not in self.exclude:
                live[s.data_ptr()] = s.nbytes()
        return sum(live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.peak = max(self.peak, self.live())
        return out


def _backward_peak(policy: str, layers: int = 3) -> int:
    model = _model(layers=layers)
    ids, mask = _batch()
    set_activation_checkpointing(model, policy)
    tracker = _PeakAllocations({t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), ids, mask]})
    with tracker:
        loss = causal_lm(model).get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state.sum()
        tracker.peak = 0
        loss.backward()
    return tracker.peak


def test_backward_peak_of_selective_is_what_the_planner_counts():
    """In backward a selective layer's cache goes to its recomputation: the peak exceeds 'all''s by the
    lower layers' caches (selective term - input), as plan_memory's decoder-backward phase counts, within
    10% and never under (the recomputation drops part of the cache)."""
    B, T = _batch()[0].shape
    model = _model(layers=3)
    shape = shape_from_config(causal_lm(model).config)
    recipe = recipe_from_dict({"model": {"path": "unused", "dtype": "float32"}, "data": {"train": "unused", "max_length": T},
                               "adapter": {"r": 4, "target_modules": ALL_LINEARS}})
    sel = [M.selective_layer_saved_bytes(s, [lin for lin in shape.linears if lin.layer == i], shape, B, T, 4, 4)
           for i, s in enumerate(M.layer_specs(shape, recipe))]
    predicted = sum(sel[:-1]) - (shape.layers - 1) * B * T * shape.hidden * 4  # at the top layer
    measured = _backward_peak("selective") - _backward_peak("all")
    assert 0.9 * predicted <= measured <= predicted


# ----------------------------------------------------------------------------------------------
# The planner, the cost model and the search


def _recipe(tiny_model_dir, tmp_path, **sections):
    return recipe_from_dict(tiny_recipe(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "run", **sections))


def _with(recipe, **train):
    return recipe.model_copy(update={"train": recipe.train.model_copy(update=train)})


def test_plan_of_selective_by_hand(tiny_model_dir, tmp_path):
    # tiny_recipe: fp32, LoRA r=4 on q_proj, v_proj, down_proj; micro-batch 4 x max_length 64
    recipe = _recipe(tiny_model_dir, tmp_path)
    shape = model_shape(recipe.model)
    N = 4 * 64
    layer = N * 64 * 4 + N * 4 * (64 + 32 + 32 + 64 + 128 + 128 + 64)  # input + q k v o gate up down outputs
    layer += 3 * N * 4 * 4  # LoRA A outputs (N x r fp32) of q, v, down; B's rank-4 products are recomputed
    layer += N * 64 * 4 + N * 4 * 4  # SDPA output (4 heads x 16) + logsumexp
    shared, final_norm = 2 * 64 * 16 * 4, N * (4 * 64 + 4)
    sel = plan_memory(_with(recipe, activation_checkpointing="selective"), shape, "local")
    assert sel.phases["forward + loss"]["activations"][0] == 2 * layer + shared + final_norm
    off = plan_memory(_with(recipe, activation_checkpointing="off"), shape, "local")
    full = plan_memory(_with(recipe, activation_checkpointing="all"), shape, "local")
    acts = [p.phases["forward + loss"]["activations"][0] for p in (full, sel, off)]
    assert acts[0] < acts[1] < acts[2]
    # its inputs in a file: one layer input resident instead of two
    spilled = plan_memory(_with(recipe, activation_checkpointing="selective", offload_checkpoints=True), shape, "local")
    assert spilled.phases["forward + loss"]["activations"][0] == 2 * layer - N * 64 * 4 + shared + final_norm
    # a null setting is planned as off (the fastest), and says so
    unset = plan_memory(_with(recipe, activation_checkpointing=None), shape, "local")
    assert unset.peak == off.peak and any("null" in n for n in unset.notes)


def test_cost_of_selective_lies_between_off_and_all(tiny_model_dir, tmp_path):
    recipe = _recipe(tiny_model_dir, tmp_path)
    shape = model_shape(recipe.model)
    cost = {p: step_cost(_with(recipe, activation_checkpointing=p), shape) for p in ("off", "selective", "all")}
    assert cost["off"] < cost["selective"] < cost["all"]
    assert "selective" in knob_values(recipe)["train.activation_checkpointing"]
    assert None not in knob_values(_with(recipe, activation_checkpointing=None))["train.activation_checkpointing"]


def test_search_offers_selective_where_off_does_not_fit(tiny_model_dir, tmp_path):
    recipe = _with(_recipe(tiny_model_dir, tmp_path), activation_checkpointing="off")
    shape = model_shape(recipe.model)
    peak = {p: plan_memory(_with(recipe, activation_checkpointing=p), shape, "local").peak for p in ("off", "selective")}
    assert peak["selective"] < peak["off"]
    fits = search(recipe, shape, peak["selective"], "local", mode="sft")
    only_ckpt = [c for c in fits if set(c.changes) == {"train.activation_checkpointing"}]
    chosen = [c.changes["train.activation_checkpointing"] for c in only_ckpt]
    assert "selective" in chosen and "all" in chosen and "off" not in chosen
    assert chosen.index("selective") < chosen.index("all")  # cheaper first
    assert all(c.plan.peak <= peak["selective"] for c in fits)
    assert any("selective checkpointing" in n for c in only_ckpt for n in c.notes)
    # SFT: with the selective layers' inputs in a file it needs less; at that budget it is offered
    spilled = plan_memory(_with(recipe, activation_checkpointing="selective", offload_checkpoints=True), shape, "local").peak
    assert spilled < peak["selective"]
    fits = search(recipe, shape, spilled, "local", mode="sft")
    assert any(c.changes == {"train.activation_checkpointing": "selective", "train.offload_checkpoints": True}
               for c in fits)


# ----------------------------------------------------------------------------------------------
# The run-start choice for train.activation_checkpointing: null


def test_null_is_the_default_and_explicit_settings_are_kept(tiny_model_dir, tmp_path):
    recipe = _recipe(tiny_model_dir, tmp_path)
    assert recipe.train.activation_checkpointing is None
    for policy in ("off", "all", 2, "selective"):
        explicit = _with(recipe, activation_checkpointing=policy)
        kept, note = choose_activation_checkpointing(explicit, mode="sft", available=1)  # nothing would fit
        assert kept is explicit and "set in the recipe" in note


def test_null_takes_the_fastest_setting_that_fits(tiny_model_dir, tmp_path):
    recipe = _recipe(tiny_model_dir, tmp_path)
    shape = model_shape(recipe.model)
    peak = {p: plan_memory(_with(recipe, activation_checkpointing=p), shape, "local", mode="sft").peak
            for p in CHECKPOINT_CHOICES}
    cost = {p: step_cost(_with(recipe, activation_checkpointing=p), shape) for p in CHECKPOINT_CHOICES}
    assert peak["off"] == max(peak.values()) > min(peak.values())

    def choose(available):
        chosen, note = choose_activation_checkpointing(recipe, mode="sft", available=available)
        return chosen.train.activation_checkpointing, note

    plenty = 100 * 2**30
    policy, note = choose(plenty)
    assert policy == "off" and f"{AUTO_BUDGET_FRACTION:.0%} of 100.00 GiB" in note
    for level in CHECKPOINT_CHOICES:  # room for the settings whose peak is at most this one's
        policy, note = choose(int(peak[level] / AUTO_BUDGET_FRACTION) + 1)
        fitting = [p for p in CHECKPOINT_CHOICES if peak[p] <= peak[level]]
        assert policy in fitting and cost[policy] == min(cost[p] for p in fitting) and "fits" in note
    # room for nothing: the smallest peak, said so
    policy, note = choose(1)
    assert peak[policy] == min(peak.values()) and "no setting is predicted to fit" in note
    # memory.budget, when set, is the budget
    leanest = min(CHECKPOINT_CHOICES, key=peak.get)
    budgeted = recipe.model_copy(update={"memory": recipe.memory.model_copy(update={"budget": peak[leanest]})})
    chosen, note = choose_activation_checkpointing(budgeted, mode="sft", available=plenty)
    assert peak[chosen.train.activation_checkpointing] == peak[leanest] and "memory.budget" in note


def test_null_with_more_layers_prefers_the_cheaper_fitting_setting():
    """A 6-layer model: with room for every-2nd-layer checkpointing but not off, the choice is the cheapest
    setting that fits, whichever the cost model ranks first, and never one that does not fit."""
    model = _model(layers=6)
    shape = shape_from_config(causal_lm(model).config)
    recipe = recipe_from_dict({"model": {"path": "unused", "dtype": "float32"}, "data": {"train": "unused", "max_length": 64},
                               "adapter": {"r": 4, "target_modules": ["q_proj", "v_proj"]}})
    plans = {p: plan_memory(_with(recipe, activation_checkpointing=p), shape, "local", mode="sft") for p in CHECKPOINT_CHOICES}
    costs = {p: step_cost(_with(recipe, activation_checkpointing=p), shape) for p in CHECKPOINT_CHOICES}
    for budget_policy in CHECKPOINT_CHOICES:
        budget = plans[budget_policy].peak
        chosen, _ = choose_activation_checkpointing(recipe, mode="sft", available=int(budget / AUTO_BUDGET_FRACTION) + 1,
                                                    shape=shape, source_kind="local")
        got = chosen.train.activation_checkpointing
        fitting = [p for p in CHECKPOINT_CHOICES if plans[p].peak <= budget]
        assert got in fitting and costs[got] == min(costs[p] for p in fitting)


def _train_cli(tmp_path, raw, *overrides):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return main(["train", str(path), *overrides])


def test_a_run_records_what_it_chose_and_why(tiny_model_dir, sft_data, tmp_path):
    """memory.budget set to the smallest plan, activation_checkpointing left out: the run checkpoints
    what fits, and the ledger and the run's recipe say so; set explicitly to off, the same budget refuses."""
    recipe = recipe_from_dict(tiny_recipe(tiny_model_dir, sft_data, tmp_path / "run"))
    shape = model_shape(recipe.model)
    budget = min(plan_memory(_with(recipe, activation_checkpointing=p), shape, "local", mode="sft").peak
                 for p in CHECKPOINT_CHOICES)
    raw = tiny_recipe(tiny_model_dir, sft_data, tmp_path / "run", train={"steps": 1}, memory={"budget": budget})
    expected, _ = choose_activation_checkpointing(recipe_from_dict(raw), mode="sft")
    policy = expected.train.activation_checkpointing
    assert policy != "off"
    assert _train_cli(tmp_path, raw) == 0
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    note = ledger["extra"]["auto_choices"]["train.activation_checkpointing"]
    assert note.startswith(f"train.activation_checkpointing={policy}:") and "memory.budget" in note
    assert ledger["recipe"]["train"]["activation_checkpointing"] == policy
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["train"]["activation_checkpointing"] == policy
    # set explicitly, the same budget is checked, not worked around: off does not fit, and the run refuses
    raw["train"].update(activation_checkpointing="off", output_dir=str(tmp_path / "run2"))
    assert _train_cli(tmp_path, raw) == 2
    assert not (tmp_path / "run2" / "ledger.json").exists()


def test_a_run_with_plenty_of_memory_chooses_off(tiny_model_dir, sft_data, tmp_path):
    raw = tiny_recipe(tiny_model_dir, sft_data, tmp_path / "run", train={"steps": 1})
    assert _train_cli(tmp_path, raw) == 0
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    assert ledger["recipe"]["train"]["activation_checkpointing"] == "off"
    print(ledger["extra"]["auto_choices"]["train.activation_checkpointing"])  # the docs quote this line
    assert "fits" in ledger["extra"]["auto_choices"]["train.activation_checkpointing"]


def test_null_without_the_device_to_measure_plans_off(tiny_model_dir, tmp_path):
    """Planning a CUDA recipe on a machine without CUDA: nothing to measure, planned as off, said so."""
    if torch.cuda.is_available():
        pytest.skip("this machine has the device")
    chosen, note = choose_activation_checkpointing(_recipe(tiny_model_dir, tmp_path, train={"device": "cuda"}), mode="sft")
    assert chosen.train.activation_checkpointing == "off" and "cannot be measured here" in note
