"""Selective activation checkpointing vs off / all: step time and what a step keeps, on a random Llama.

    python benchmarks/selective_checkpointing.py                       # tiny-family model, 4 layers, hidden 256
    python benchmarks/selective_checkpointing.py --hidden 576 --layers 4 --seq 256 --json out.json

For each policy (off, selective, all) it builds the same seeded LoRA model (r 8 on every linear, fp32),
times forward + backward of one micro-batch ``--repeats`` times after a warm-up, the policies
interleaved (wall time of the step, median), and measures the bytes the forward leaves alive for backward (the
storages its ops created that are still referenced once the output is reduced to a scalar; the method of
``tests/test_selective.py``), next to the planner's prediction of the same quantity. ``recompute_fraction``
= (selective - off) / (all - off) step time: the share of full checkpointing's recompute that selective
still pays, the ``CostModel.selective`` factor of ``leantune/plan/search.py``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

POLICIES = ("off", "selective", "all")


class _Allocations(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.storages: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.storages += [weakref.ref(t.untyped_storage()) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def build(args, policy: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from leantune.adapters.lora import apply_adapter
    from leantune.config import AdapterConfig
    from leantune.train.session import set_activation_checkpointing

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate or 3 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      max_position_embeddings=max(512, args.seq), pad_token_id=0)
    torch.manual_seed(0)
    model = apply_adapter(LlamaForCausalLM(cfg), AdapterConfig(r=8, alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    set_activation_checkpointing(model, policy)
    return model.train()


def kept_bytes(model, ids) -> int:
    from leantune.adapters.lora import causal_lm

    allocations = _Allocations()
    with allocations:
        hidden = causal_lm(model).get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
    loss = hidden.sum()
    del hidden
    gc.collect()
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), ids, loss]}
    live = {}
    for ref in allocations.storages:
        s = ref()
        if s is not None and s.data_ptr() not in owned:
            live[s.data_ptr()] = s.nbytes()
    return sum(live.values())


def step_seconds(model, ids) -> float:
    from leantune.adapters.lora import causal_lm

    t0 = time.perf_counter()
    causal_lm(model).get_decoder()(input_ids=ids, use_cache=False).last_hidden_state.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def predicted_layer_bytes(model, policy: str, batch: int, seq: int) -> int:
    """The planner's per-layer terms summed over layers (what differs between the policies)."""
    from leantune.adapters.lora import causal_lm
    from leantune.config import recipe_from_dict
    from leantune.plan import memory as M
    from leantune.plan.model_shape import shape_from_config

    shape = shape_from_config(causal_lm(model).config)
    recipe = recipe_from_dict({"model": {"path": "unused", "dtype": "float32"}, "data": {"train": "unused", "max_length": seq},
                               "adapter": {"r": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                      "up_proj", "down_proj"]}})
    specs = M.layer_specs(shape, recipe)
    if policy == "off":
        return sum(M.layer_saved_bytes(s, shape, batch, seq, 4, 8, False, False) for s in specs)
    if policy == "all":
        return shape.layers * batch * seq * shape.hidden * 4
    return sum(M.selective_layer_saved_bytes(s, [lin for lin in shape.linears if lin.layer == i], shape, batch, seq, 4, 8)
               for i, s in enumerate(specs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=None, help="default 3 x hidden")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the rows here too")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    models = {p: build(args, p) for p in POLICIES}
    times = {p: [] for p in POLICIES}
    for i in range(args.repeats + 1):  # interleaved, so load from other processes hits every policy alike
        for p in POLICIES:
            t = step_seconds(models[p], ids)
            if i:  # the first round is the warm-up
                times[p].append(t)
    rows = {p: {"step_s_median": statistics.median(times[p]), "step_s": times[p], "kept_bytes": kept_bytes(models[p], ids),
                "predicted_layer_bytes": predicted_layer_bytes(models[p], p, args.batch, args.seq)} for p in POLICIES}
    off, sel, full = (rows[p]["step_s_median"] for p in POLICIES)
    result = {"config": vars(args), "torch": torch.__version__, "rows": rows,
              "recompute_fraction": (sel - off) / (full - off) if full > off else None,
              "kept_vs_off": {p: rows[p]["kept_bytes"] / rows["off"]["kept_bytes"] for p in POLICIES}}
    for p in POLICIES:
        r = rows[p]
        print(f"{p:10s} step {r['step_s_median'] * 1e3:8.1f} ms  kept {r['kept_bytes'] / 2**20:8.2f} MiB "
              f"(layers predicted {r['predicted_layer_bytes'] / 2**20:8.2f} MiB)")
    print(f"recompute fraction (selective - off) / (all - off): {result['recompute_fraction']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
