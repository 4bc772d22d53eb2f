"""linear_cross_entropy == F.cross_entropy(hidden @ weight.T, labels) in value and every gradient, without
ever allocating the (N, V) logits."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from leantune.losses import linear_cross_entropy

IGNORE = -100


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Every matmul here is tiny; with 2 intra-op threads on a shared 2-core box the thread
    # synchronisation costs more than the math (measured: ~5x slower under load).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _make(shape, vocab, *, seed=0, ignore_frac=0.3, dtype=torch.float32, with_weights=False):
    """Random (hidden (*shape), weight (V, H), labels (*shape[:-1]), weights or None) with some ignored labels."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(vocab, shape[-1], generator=g, dtype=torch.float64) / shape[-1] ** 0.5).to(dtype)
    labels = torch.randint(0, vocab, shape[:-1], generator=g)
    labels[torch.rand(shape[:-1], generator=g) < ignore_frac] = IGNORE
    weights = torch.rand(shape[:-1], generator=g, dtype=torch.float64).to(dtype) + 0.1 if with_weights else None
    return hidden, weight, labels, weights


def _reference(hidden, weight, labels, weights=None, reduction="mean"):
    """Plain fp64 PyTorch: full logits, F.cross_entropy; weights normalised over counted tokens."""
    logits = hidden.double() @ weight.double().T  # (..., V)
    flat_logits, flat_labels = logits.flatten(0, -2), labels.flatten()
    if weights is None and reduction == "mean":
        return F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE)
    per_token = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE, reduction="none")
    w = torch.ones_like(per_token) if weights is None else weights.flatten().double()
    w = w * (flat_labels != IGNORE)
    total = (per_token * w).sum()
    return total / w.sum() if reduction == "mean" else total


def _loss_and_grads(fn, hidden, weight, labels, weights=None, *, grad_weight=True, **kw):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(grad_weight)
    loss = fn(h, w, labels, weights=weights, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _assert_matches(hidden, weight, labels, weights=None, *, reduction="mean", chunk_size=1024, atol=1e-5, rtol=1e-5):
    loss, gh, gw = _loss_and_grads(
        linear_cross_entropy, hidden, weight, labels, weights, chunk_size=chunk_size, reduction=reduction
    )
    rloss, rgh, rgw = _loss_and_grads(
        _reference, hidden.double(), weight.double(), labels, weights, reduction=reduction
    )
    torch.testing.assert_close(loss.double(), rloss, atol=atol, rtol=rtol)
    torch.testing.assert_close(gh.double(), rgh, atol=atol, rtol=rtol)
    torch.testing.assert_close(gw.double(), rgw, atol=atol, rtol=rtol)


@pytest.mark.parametrize(
    "shape,vocab,chunk_size",
    [
        ((5, 123, 64), 257, 37),
        ((5, 123, 64), 257, 100),
        ((5, 123, 64), 257, 4096),  # one chunk larger than N
        ((3, 7, 33), 1000, 1),  # chunk of 1 row; on the small shape to keep the loop short
        ((3, 7, 33), 1000, 7),
        ((3, 7, 33), 1000, 64),
    ],
)
def test_matches_cross_entropy_with_ignored_labels(shape, vocab, chunk_size):
    hidden, weight, labels, _ = _make(shape, vocab, seed=chunk_size)
    _assert_matches(hidden, weight, labels, chunk_size=chunk_size)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [37, 128])
def test_per_token_weights(reduction, chunk_size):
    hidden, weight, labels, weights = _make((5, 123, 64), 257, seed=1, with_weights=True)
    _assert_matches(hidden, weight, labels, weights, reduction=reduction, chunk_size=chunk_size, atol=1e-4)


def test_sum_reduction_without_weights():
    hidden, weight, labels, _ = _make((3, 7, 33), 1000, seed=2)
    _assert_matches(hidden, weight, labels, reduction="sum", chunk_size=5, atol=1e-4)


def test_no_ignored_labels_and_2d_hidden():
    hidden, weight, labels, _ = _make((50, 16), 37, seed=3, ignore_frac=0.0)
    _assert_matches(hidden, weight, labels, chunk_size=8)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("use_weights", [False, True])
def test_all_masked_gives_zero_loss_and_zero_grads(reduction, use_weights):
    hidden, weight, labels, _ = _make((2, 9, 16), 31, seed=4)
    weights = None
    if use_weights:  # every label valid, every weight zero
        labels = labels.clamp(min=0)
        weights = torch.zeros(labels.shape)
    else:
        labels = torch.full_like(labels, IGNORE)
    hidden[0, 0, 0] = float("inf")  # unused rows must not leak NaN into the loss
    loss, gh, gw = _loss_and_grads(linear_cross_entropy, hidden, weight, labels, weights, reduction=reduction)
    assert loss.dim() == 0 and loss.item() == 0.0
    assert torch.equal(gh, torch.zeros_like(hidden))
    assert torch.equal(gw, torch.zeros_like(weight))


def test_zero_weight_equals_masking():
    hidden, weight, labels, weights = _make((4, 30, 24), 101, seed=5, ignore_frac=0.0, with_weights=True)
    dropped = torch.rand(labels.shape, generator=torch.Generator().manual_seed(6)) < 0.4
    zero_weighted = weights.masked_fill(dropped, 0.0)
    ignored = labels.masked_fill(dropped, IGNORE)
    for reduction in ("mean", "sum"):
        kw = dict(reduction=reduction, chunk_size=16)
        a = _loss_and_grads(linear_cross_entropy, hidden, weight, labels, zero_weighted, **kw)
        b = _loss_and_grads(linear_cross_entropy, hidden, weight, ignored, weights, **kw)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)
        assert a[1][dropped].abs().sum() == 0  # masked rows get exactly zero gradient


def test_frozen_lm_head_skips_weight_grad():
    hidden, weight, labels, weights = _make((5, 123, 64), 257, seed=7, with_weights=True)
    loss, gh, gw = _loss_and_grads(
        linear_cross_entropy, hidden, weight, labels, weights, grad_weight=False, chunk_size=32
    )
    rloss, rgh, _ = _loss_and_grads(_reference, hidden.double(), weight.double(), labels, weights, grad_weight=False)
    assert gw is None
    torch.testing.assert_close(loss.double(), rloss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh.double(), rgh, atol=1e-5, rtol=1e-5)


def test_backward_skips_grad_weight_matmul_when_frozen():
    """No (V, H)-shaped matmul in backward when the LM head is frozen: the LoRA saving is real."""
    hidden, weight, labels, _ = _make((64, 8), 50, seed=8)
    h = hidden.clone().requires_grad_(True)
    loss = linear_cross_entropy(h, weight, labels, chunk_size=16)
    with _OutputRecorder() as rec:
        loss.backward()
    mm_shapes = {shape for op, shape in rec.outputs if "mm" in op}
    assert tuple(weight.shape) not in mm_shapes, mm_shapes
    assert h.grad is not None


@pytest.mark.parametrize("chunk_size", [37, 128])
def test_bf16_matches_fp32_reference(chunk_size):
    hidden, weight, labels, weights = _make((5, 123, 64), 257, seed=9, dtype=torch.bfloat16, with_weights=True)
    loss, gh, gw = _loss_and_grads(linear_cross_entropy, hidden, weight, labels, weights, chunk_size=chunk_size)
    assert loss.dtype == torch.float32 and gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    # Same bf16 inputs, reference in fp64: only the final bf16 rounding of the gradients differs.
    rloss, rgh, rgw = _loss_and_grads(_reference, hidden.double(), weight.double(), labels, weights)
    torch.testing.assert_close(loss.double(), rloss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh.double(), rgh, atol=1e-4, rtol=2e-2)
    torch.testing.assert_close(gw.double(), rgw, atol=1e-4, rtol=2e-2)


def test_bf16_weight_is_never_converted_whole(monkeypatch):
    """A bf16 lm_head is converted to fp32 a block of rows at a time, forward and backward (frozen
    head, the LoRA case): no fp32 (V, H) copy exists, and the result equals the unblocked one."""
    lce_module = sys.modules[linear_cross_entropy.__module__]
    hidden, weight, labels, weights = _make((3, 41, 64), 257, seed=12, dtype=torch.bfloat16, with_weights=True)
    loss, gh, _ = _loss_and_grads(linear_cross_entropy, hidden, weight, labels, weights, grad_weight=False,
                                  chunk_size=32)  # unblocked: the default block holds all 257 rows

    class Fp32Outputs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes: list[tuple[int, ...]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.shapes += [tuple(t.shape) for t in tree_leaves(out)
                            if isinstance(t, torch.Tensor) and t.dtype == torch.float32]
            return out

    monkeypatch.setattr(lce_module, "_CAST_BLOCK_BYTES", 50 * 64 * 4)  # 50 rows of fp32 per block
    with Fp32Outputs() as rec:
        bloss, bgh, _ = _loss_and_grads(linear_cross_entropy, hidden, weight, labels, weights, grad_weight=False,
                                        chunk_size=32)
    assert (257, 64) not in rec.shapes and (50, 64) in rec.shapes
    torch.testing.assert_close(bloss, loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(bgh.float(), gh.float(), atol=1e-2, rtol=1e-2)  # bf16 rounding of a re-ordered sum


def test_gradcheck_fp64():
    hidden, weight, labels, weights = _make((2, 5, 6), 9, seed=10, dtype=torch.float64, with_weights=True)
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    for reduction in ("mean", "sum"):
        assert torch.autograd.gradcheck(
            lambda h, w: linear_cross_entropy(h, w, labels, weights=weights, chunk_size=3, reduction=reduction),
            (h, w),
        )


class _OutputRecorder(TorchDispatchMode):
    """Records (op name, shape) of every tensor any aten op returns, forward and backward."""

    def __init__(self):
        super().__init__()
        self.outputs: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.outputs.append((str(func), tuple(t.shape)))
        return out

    def max_numel(self) -> int:
        return max(torch.Size(s).numel() for _, s in self.outputs)


def test_never_allocates_full_logits():
    n, hdim, vocab, chunk = 256, 16, 300, 32  # N*V = 76800 > every legitimate tensor below
    hidden, weight, labels, _ = _make((n, hdim), vocab, seed=11, ignore_frac=0.0)
    legit = max(chunk * vocab, vocab * hdim, n * hdim)  # a chunk of logits, the weight, the hidden states
    assert legit < n * vocab

    def run(fn):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        with _OutputRecorder() as rec:
            fn(h, w).backward()
        return rec

    # The recorder does see the full logits when they exist (so the assertion below can fail).
    naive = run(lambda h, w: F.cross_entropy(h @ w.T, labels))
    assert naive.max_numel() >= n * vocab

    lean = run(lambda h, w: linear_cross_entropy(h, w, labels, chunk_size=chunk))
    assert lean.max_numel() <= legit, max(lean.outputs, key=lambda o: torch.Size(o[1]).numel())
    assert any(op.startswith("aten.addmm") for op, _ in lean.outputs)  # backward was recorded too


def test_masked_rows_get_no_lm_head_work():
    """Logits masking: with 3 of 40 tokens kept, the only logits computed are (3, V)."""
    hidden, weight, labels, _ = _make((40, 8), 50, seed=12, ignore_frac=0.0)
    labels = torch.full_like(labels, IGNORE)
    labels[[3, 17, 31]] = torch.tensor([1, 2, 3])
    h = hidden.clone().requires_grad_(True)
    with _OutputRecorder() as rec:
        linear_cross_entropy(h, weight, labels, chunk_size=1024).backward()
    logit_shapes = [s for op, s in rec.outputs if "mm" in op and s[-1:] == (50,)]  # matmuls into vocab space
    assert logit_shapes and all(s[0] == 3 for s in logit_shapes), logit_shapes


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(labels=torch.zeros(2, 4, dtype=torch.long)), "labels shape"),
        (dict(weight=torch.randn(10, 7)), "weight must be"),
        (dict(weight=torch.randn(8, 10)), "weight must be"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(reduction="none"), "reduction"),
        (dict(weights=torch.ones(2, 4)), "weights shape"),
        (dict(labels=torch.zeros(2, 3)), "integer"),
        (dict(labels=torch.full((2, 3), 10)), "outside"),
    ],
)
def test_input_errors(kwargs, match):
    args = dict(hidden=torch.randn(2, 3, 8), weight=torch.randn(10, 8), labels=torch.zeros(2, 3, dtype=torch.long))
    args.update(kwargs)
    hidden, weight, labels = args.pop("hidden"), args.pop("weight"), args.pop("labels")
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(hidden, weight, labels, **args)
