"""Offloaded checkpoints (issue 4): checkpointed layers' inputs live in a file, not in RAM.

With activation checkpointing, what a step keeps from forward to backward is each checkpointed decoder
layer's input, B x T x H per layer (the layer itself is recomputed in backward). `ActivationSpill`
moves those tensors into a memory-mapped file:

1. a forward hook on the embeddings and on every decoder layer returns its output copied into a fresh
   page-aligned slot of a temporary file mapped ``MAP_SHARED`` (`_ToSlot`: identity for autograd), so the
   next layer -- and its checkpoint, which holds its inputs until backward -- sees the file-backed copy
   and the RAM copy is freed;
2. once the next layer's output arrives, the previous slot has been read: ``madvise(MADV_PAGEOUT)``
   writes it back and drops its pages, so RAM holds about one layer input at a time;
3. backward's recomputation of a layer reads its input from the mapping: the kernel pages it back in,
   and when that layer's backward is done autograd frees the tensor, and with it the mapping (only the
   tensors hold the older mappings), so those pages leave the process too.

Cost: one write and one read of B x T x H x (layers + 1) elements per step. The hooks do nothing outside
`ActivationSpill.forward()` (evaluation, backward's recomputation), and the file is deleted on close.
On a kernel without ``MADV_PAGEOUT`` (before Linux 5.4) ``MADV_DONTNEED`` drops the pages from this
process but the page cache keeps them until written back and reclaimed. Either way the kernel's page cache
may keep a clean copy of the file after the pages leave the process: not this process's memory, and
reclaimable at once under pressure.

Python's ``mmap`` module names ``MADV_PAGEOUT`` from 3.13 on; its value on Linux is 21.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile

import torch

MADV_PAGEOUT = getattr(mmap, "MADV_PAGEOUT", 21)
PAGE = mmap.PAGESIZE


class _ToSlot(torch.autograd.Function):
    """Forward: ``x`` copied into ``slot`` (same shape), which is returned. Backward: the identity."""

    @staticmethod
    def forward(ctx, x, slot):
        slot.copy_(x)
        return slot

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ActivationSpill:
    """Spill the inputs of a causal LM's decoder layers to a temporary file during training forwards.

    Usage (``model`` with activation checkpointing on)::

        spill = ActivationSpill(model, run_dir)
        with spill.forward():
            loss = loss_fn(model, batch)
        loss.backward()  # the recomputation reads the file
        spill.close()
    """

    def __init__(self, model, directory: str | os.PathLike | None = None):
        from leantune.adapters.lora import causal_lm

        decoder = causal_lm(model).get_decoder()
        device = next(iter((*model.parameters(), *model.buffers())), torch.empty(0)).device
        if device.type != "cpu":
            raise ValueError(
                f"train.offload_checkpoints: the model is on {device}; offloading to a memory-mapped file is for "
                "CPU training (on a GPU the checkpointed inputs would go to host memory, which leantune does not do)"
            )
        layers = getattr(decoder, "layers", None)
        if layers is None:
            raise ValueError("offload_checkpoints: the decoder has no .layers to hook")
        self._file = tempfile.TemporaryFile(dir=directory, prefix="leantune-activations-")
        self._size = 0
        # The mappings of this forward's last two slots; older ones are referenced only by their tensors,
        # so when backward frees a layer input its mapping goes too (pages it faulted back in included).
        self._maps: list[mmap.mmap] = []
        self._offset = 0  # where the next slot starts in the file
        self._active = False
        self.slots_written = 0
        self.bytes_written = 0
        modules = [decoder.get_input_embeddings(), *layers]
        self._handles = [m.register_forward_hook(self._hook) for m in modules]

    @contextlib.contextmanager
    def forward(self):
        """A training forward: layer inputs go to the file (mappings of the last step are released)."""
        self._maps, self._offset = [], 0
        self._active = True
        try:
            yield self
        finally:
            self._active = False
            if self._maps:  # the last slot feeds the final norm / loss: drop it now, it is re-read in backward
                self._page_out(self._maps[-1])
            self._maps = []

    def _hook(self, module, args, output):
        if not self._active or not torch.is_grad_enabled():
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        if not isinstance(hidden, torch.Tensor) or hidden.device.type != "cpu":
            return None
        spilled = _ToSlot.apply(hidden, self._slot(hidden))
        if len(self._maps) > 1:  # the previous slot has been read by the layer that just ran
            self._page_out(self._maps[-2])
            del self._maps[:-1]
        return (spilled, *output[1:]) if isinstance(output, tuple) else spilled

    def _slot(self, like: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like ``like`` in a new page-aligned region of the file, mapped shared."""
        nbytes = like.numel() * like.element_size()
        length = max(PAGE, -(-nbytes // PAGE) * PAGE)
        offset = self._offset
        self._offset += length
        if offset + length > self._size:
            self._size = offset + length
            os.ftruncate(self._file.fileno(), self._size)
        region = mmap.mmap(self._file.fileno(), length, flags=mmap.MAP_SHARED,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        self._maps.append(region)
        self.slots_written += 1
        self.bytes_written += nbytes
        flat = torch.frombuffer(region, dtype=like.dtype, count=like.numel())
        return flat.view(like.shape)

    @staticmethod
    def _page_out(region: mmap.mmap) -> None:
        try:
            region.madvise(MADV_PAGEOUT)
        except OSError:  # kernel before 5.4: at least leave this process's resident set
            region.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        """Remove the hooks and delete the file (mappings still referenced stay valid until freed)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._maps = []
        self._file.close()
