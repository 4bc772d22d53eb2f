"""MeZO: zeroth-order SGD in place, with perturbations that are undone bit for bit (arXiv 2305.17333).

One step with ``n`` samples, for each sample ``k`` with its own direction ``z_k ~ N(0, I)``::

    L+ = f(θ + ε z_k)        L- = f(θ - ε z_k)        g_k = (L+ - L-) / 2ε      # the projected gradient
    θ  ←  θ - η (λ θ + 1/n Σ_k g_k z_k)

``g_k z_k`` is an estimate of ∇f(θ) (exact in expectation for a quadratic, where the central
difference is exact: E[z zᵀ] ∇f = ∇f). No gradients, no activations kept for a backward pass, no
optimizer state: ``z`` is never stored but regenerated from a seed, so memory stays that of
inference. ``f`` is any callable returning a number and runs under ``torch.no_grad()``, so it may be
non-differentiable (accuracy of argmax predictions, a verifier's reward). It works on any set of
floating parameters: a LoRA adapter (the trainable subset) or every weight of the model.

Directions: ``z`` of parameter ``i`` (its position in the optimizer's parameter list), split into flat
chunks of ``chunk_numel`` elements, is drawn chunk ``j`` by chunk with ``torch.randn`` from a generator
seeded with ``direction_seed(seed, step, sample, i, j)``. Deterministic, independent of the order of
evaluation, and never more than one chunk of ``z`` in memory.

Exactness of perturb + restore (the issue's hard requirement). ``fl(fl(θ + εz) - εz) == θ`` does not
hold in floating point, and no in-place additive scheme can be undone without keeping some
information: ``θ ↦ fl(θ + εz)`` is not injective (every |θ| far below |εz| rounds onto the same few
values). The options weighed:

- keep a copy of every perturbed tensor: exact and simple, but 2× the trainable memory (fine for
  LoRA, not for full fine-tuning);
- swap perturbed copies in per module with forward (pre-)hooks, θ never touched: one module's weights
  extra, but wrong for any parameter read outside its module's ``forward`` -- leantune's own loss reads
  ``lm_head.weight`` directly, tied embeddings are read twice -- and such reads cannot be detected,
  so it needs an in-place path anyway;
- bit-level (integer) perturbations are exactly invertible but are not ``θ + εz`` (their size scales
  with |θ|, so a zero LoRA B would never move).

Chosen: perturb in place and keep, per chunk, only the *exceptions*: ``y = fl(θ + d)`` is computed
beside θ, together with what the restore will compute, ``fl(y - d)``; where that differs from θ, the
flat index (int32) and the original value are kept, then θ += d in place (the same ``y``). The restore
regenerates ``d``, subtracts it in place and writes the kept values back: θ is bit-identical by
construction, whatever the dtype, for ±ε alike, also when the objective raises (restore runs in
``finally``). Exceptions are rare where |εz| ≪ |θ|: measured with ε = 1e-3, 2% of elements for
N(0, 0.125) weights, 7.5% for N(0, 0.02), 12% for weights equal to 1, 0% for zeros (fresh LoRA B),
79% for N(0, 1e-4). At 8 bytes per exception (fp32; 6 for bf16) the kept data are ~4% of the
perturbed parameters' bytes for N(0, 0.125) and ~15% for N(0, 0.02) (15% measured on the tiny Llama,
all weights; under 2% for its fresh LoRA adapter; 3.6% (19 MB) for every weight of SmolLM2-135M in
fp32, benchmarks/zo_memory.py). A chunk whose exception list would outgrow a plain copy keeps a copy
instead, so they never exceed one copy. ``step()`` reports them as ``restore_bytes``. Transient
memory is ~2.25 chunks (``d``, ``fl(θ + d) - d``, a bool mask). The update needs no exactness and is
plain in-place SGD.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from statistics import fmean

import torch

_M64 = (1 << 64) - 1
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # float itemsize -> same-size integer view


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def direction_seed(seed: int, step: int, sample: int, index: int, chunk: int) -> int:
    """63-bit generator seed of the direction chunk ``chunk`` of parameter ``index`` (splitmix64 chain).

    >>> direction_seed(0, 0, 0, 0, 0) == direction_seed(0, 0, 0, 0, 0) != direction_seed(0, 1, 0, 0, 0)
    True
    """
    h = 0
    for part in (seed, step, sample, index, chunk):
        h = _splitmix64(h ^ (part & _M64))
    return h >> 1


def zo_projected_gradient(loss_plus: float, loss_minus: float, eps: float) -> float:
    """Central-difference directional derivative ``(L+ - L-) / 2ε`` along the perturbation direction.

    >>> zo_projected_gradient(1.5, 0.5, 0.25)
    2.0
    """
    return (float(loss_plus) - float(loss_minus)) / (2.0 * eps)


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _listed_tensors(params: list) -> list[torch.Tensor]:
    """The tensors in what a torch optimizer takes: tensors, (name, tensor) pairs, or groups of those."""
    out = []
    for item in params:
        inner = item["params"] if isinstance(item, dict) else [item]
        inner = [inner] if isinstance(inner, torch.Tensor) else inner
        out += [t[1] if isinstance(t, tuple) else t for t in inner]
    return out


class MeZO(torch.optim.Optimizer):
    """Zeroth-order SGD (MeZO, arXiv 2305.17333) as a ``torch.optim.Optimizer``.

    params: a module (its parameters with ``requires_grad``, named), or what any torch optimizer takes:
        parameters, ``(name, parameter)`` pairs, or groups (dicts) with their own ``lr``/``weight_decay``.
    lr: η of ``θ ← θ - η(λθ + g z)``; schedulers (``LambdaLR``) drive it as for any optimizer. The paper
        uses 1e-6..1e-7 for full parameters; LoRA needs larger values (tune them).
    eps: ε, the perturbation scale (paper: 1e-3). weight_decay: λ, per group (the paper exempts biases
        and norms: give them a group with ``weight_decay=0``).
    samples: directions per step; their updates are averaged. Each costs two calls of the objective.
    seed: with the step count, determines every direction; ``state_dict`` carries both, so a resumed
        run repeats the uninterrupted one exactly.
    chunk_numel: elements per direction chunk; bounds the transient memory (~2.25 chunks).

    ``step(objective)`` evaluates ``objective()`` (under ``no_grad``) ``2 * samples`` times; every call
    starts from the same torch RNG state (common random numbers), so dropout or sampling inside the
    objective is the same at θ+εz and θ-εz and does not swamp ``L+ - L-``. The optimizer keeps no
    per-parameter state: ``self.state`` stays empty.
    """

    def __init__(self, params, lr: float, *, eps: float = 1e-3, weight_decay: float = 0.0, samples: int = 1,
                 seed: int = 0, chunk_numel: int = 1 << 22):
        if isinstance(params, torch.nn.Module):
            params = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
            if not params:
                raise ValueError("MeZO: the module has no parameter with requires_grad=True; mark the ones to train")
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"MeZO: lr and weight_decay must be >= 0 (got lr={lr}, weight_decay={weight_decay})")
        if not eps > 0:
            raise ValueError(f"MeZO: eps must be > 0 (got {eps}); the paper uses 1e-3")
        if int(samples) != samples or samples < 1:
            raise ValueError(f"MeZO: samples must be an integer >= 1 (got {samples})")
        if int(chunk_numel) != chunk_numel or chunk_numel < 1:
            raise ValueError(f"MeZO: chunk_numel must be an integer >= 1 (got {chunk_numel})")
        params = list(params)
        tensors = _listed_tensors(params)
        if len({id(t) for t in tensors}) != len(tensors):
            raise ValueError("MeZO: a parameter is listed twice (tied weights?); pass each tensor once")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.eps, self.samples, self.seed, self.chunk_numel = float(eps), int(samples), int(seed), int(chunk_numel)
        self.zo_step = 0  # steps taken; with the seed it fixes the directions of the next step
        self._generators: dict[torch.device, torch.Generator] = {}
        for group in self.param_groups:
            names = group.get("param_names") or [f"parameter {i}" for i in range(len(group["params"]))]
            for name, p in zip(names, group["params"]):
                if not p.is_floating_point():
                    raise TypeError(f"MeZO: {name} has dtype {p.dtype}; only floating parameters can be perturbed")
                if not p.is_contiguous():
                    raise ValueError(f"MeZO: {name} is not contiguous; MeZO perturbs flat views (use .contiguous())")

    # ------------------------------------------------------------------------------------------
    # Directions and exact perturbation

    def _chunks(self) -> Iterator[tuple[dict, int, int, torch.Tensor]]:
        """(group, parameter index, chunk index, flat chunk view) over all parameters, in order."""
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                flat = p.detach().view(-1)
                for j, start in enumerate(range(0, flat.numel(), self.chunk_numel)):
                    yield group, index, j, flat[start : start + self.chunk_numel]
                index += 1

    def _z(self, chunk: torch.Tensor, step: int, sample: int, index: int, j: int) -> torch.Tensor:
        gen = self._generators.get(chunk.device)
        if gen is None:
            gen = self._generators[chunk.device] = torch.Generator(device=chunk.device)
        gen.manual_seed(direction_seed(self.seed, step, sample, index, j))
        return torch.randn(chunk.shape, generator=gen, dtype=chunk.dtype, device=chunk.device)

    def direction(self, sample: int = 0, step: int | None = None) -> list[torch.Tensor]:
        """The direction ``z`` of ``sample`` at ``step`` (default: the next step), one tensor per
        parameter, materialized: for tests and diagnostics only (it costs a parameter-sized copy)."""
        step = self.zo_step if step is None else step
        out: dict[int, list[torch.Tensor]] = {}
        for _, index, j, chunk in self._chunks():
            out.setdefault(index, []).append(self._z(chunk, step, sample, index, j))
        params = [p for g in self.param_groups for p in g["params"]]
        return [torch.cat(out[i]).view_as(p) if i in out else torch.zeros_like(p) for i, p in enumerate(params)]

    def _perturb(self, scale: float, step: int, sample: int, undo: list) -> None:
        """θ += scale·z in place; append to ``undo`` what ``_restore`` needs to return θ bit for bit."""
        for _, index, j, chunk in self._chunks():
            d = self._z(chunk, step, sample, index, j).mul_(scale)
            back = (chunk + d).sub_(d)  # fl(fl(θ + d) - d): exactly what the restore will compute
            bits = _BITS[chunk.element_size()]
            lost = back.view(bits) != chunk.view(bits)  # by bits: -0.0 vs 0.0 and NaN payloads count
            del back
            # count_nonzero, not lost.sum(): summing a bool tensor is ~10x slower (measured, 4M elements)
            n_lost = int(lost.count_nonzero())
            small = chunk.numel() < 2**31
            if n_lost == 0:
                kept = None
            elif n_lost * ((4 if small else 8) + chunk.element_size()) < chunk.numel() * chunk.element_size():
                where = lost.nonzero().squeeze(1).to(torch.int32 if small else torch.int64)
                kept = (where, chunk[where])
            else:  # an exception list would be larger than the chunk itself
                kept = (None, chunk.clone())
            del lost
            chunk.add_(d)  # the same fl(θ + d) as above, written in place (no copy of a second buffer)
            undo.append((index, j, scale, step, sample, kept))

    def _restore(self, undo: list) -> None:
        chunks = {(index, j): chunk for _, index, j, chunk in self._chunks()}
        while undo:  # newest first, freeing kept data as we go
            index, j, scale, step, sample, kept = undo.pop()
            chunk = chunks[index, j]
            if kept is not None and kept[0] is None:
                chunk.copy_(kept[1])
                continue
            chunk.sub_(self._z(chunk, step, sample, index, j).mul_(scale))
            if kept is not None:
                chunk[kept[0]] = kept[1]

    def _loss_at(self, objective: Callable[[], float], scale: float, sample: int, rng: tuple) -> tuple[float, int]:
        """objective() at θ + scale·z_sample, θ restored exactly afterwards (also if it raises)."""
        undo: list = []
        try:
            self._perturb(scale, self.zo_step, sample, undo)
            kept_bytes = sum(t.numel() * t.element_size() for *_, kept in undo if kept for t in kept if t is not None)
            _set_rng_state(rng)
            value = float(objective())
        finally:
            self._restore(undo)
        return value, kept_bytes

    def _projected_gradients(self, objective: Callable[[], float]) -> dict:
        rng = _rng_state()
        plus, minus, grads, kept = [], [], [], 0
        for k in range(self.samples):
            lp, b1 = self._loss_at(objective, self.eps, k, rng)
            lm, b2 = self._loss_at(objective, -self.eps, k, rng)
            plus.append(lp)
            minus.append(lm)
            grads.append(zo_projected_gradient(lp, lm, self.eps))
            kept = max(kept, b1, b2)
        if not all(math.isfinite(g) for g in grads):
            raise FloatingPointError(
                f"MeZO step {self.zo_step}: the objective returned a non-finite value "
                f"(L+ = {plus}, L- = {minus}); parameters were left unchanged. Lower eps or check the objective."
            )
        return {"plus": plus, "minus": minus, "grads": grads, "restore_bytes": kept}

    # ------------------------------------------------------------------------------------------
    # Public API

    @torch.no_grad()
    def step(self, objective: Callable[[], float] | None = None) -> dict:
        """One MeZO step on ``objective`` (a callable returning the loss to lower, e.g. the batch's
        mean cross-entropy). Returns ``loss`` = mean (L+ + L-)/2 (≈ f(θ), before the update),
        ``projected_grad`` = mean g, ``projected_grads``, ``loss_plus``, ``loss_minus``, ``lr`` (first
        group) and ``restore_bytes`` (peak data kept for the exact restore)."""
        if objective is None:
            raise TypeError("MeZO.step(objective): pass a callable that returns the loss (a float or 0-d tensor)")
        est = self._projected_gradients(objective)
        n = len(est["grads"])
        for group, index, j, chunk in self._chunks():
            lr, wd = group["lr"], group["weight_decay"]
            if wd:
                chunk.mul_(1.0 - lr * wd)
            for k, g in enumerate(est["grads"]):
                if g != 0.0:
                    chunk.add_(self._z(chunk, self.zo_step, k, index, j), alpha=-lr * g / n)
        self.zo_step += 1
        return {
            "loss": fmean([(a + b) / 2 for a, b in zip(est["plus"], est["minus"])]),
            "projected_grad": fmean(est["grads"]),
            "projected_grads": est["grads"],
            "loss_plus": fmean(est["plus"]),
            "loss_minus": fmean(est["minus"]),
            "lr": self.param_groups[0]["lr"],
            "restore_bytes": est["restore_bytes"],
        }

    @torch.no_grad()
    def estimate_gradient(self, objective: Callable[[], float]) -> list[torch.Tensor]:
        """The ZO gradient estimate ``1/n Σ_k g_k z_k`` of the next step, one tensor per parameter,
        without updating anything or advancing the step (diagnostics: materializes a gradient)."""
        est = self._projected_gradients(objective)
        total = None
        for k, g in enumerate(est["grads"]):
            z = self.direction(k)
            total = [g * t for t in z] if total is None else [a.add_(t, alpha=g) for a, t in zip(total, z)]
        return [t / len(est["grads"]) for t in total]

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["mezo"] = {"step": self.zo_step, "seed": self.seed, "eps": self.eps, "samples": self.samples,
                      "chunk_numel": self.chunk_numel}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        mezo = state_dict.pop("mezo", None)
        if mezo is None:
            raise ValueError("MeZO.load_state_dict: no 'mezo' entry; this state was not written by MeZO")
        super().load_state_dict(state_dict)
        self.zo_step, self.seed, self.eps = int(mezo["step"]), int(mezo["seed"]), float(mezo["eps"])
        self.samples, self.chunk_numel = int(mezo["samples"]), int(mezo["chunk_numel"])

