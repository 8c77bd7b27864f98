"""One pipeline stage's forward and backward of a micro-batch, with recompute, offload and memory accounting.

What a schedule (``schedules.py``) drives: ``forward(i)`` takes micro-batch i's input (the batch chunk on the
first stage, the previous stage's activation elsewhere), runs the stage's layers (the loss too on the last
stage) and sends the output on; ``backward(i)`` takes the gradient of that output (from the next stage, or the
loss), back-propagates it into the stage's parameters (accumulating over micro-batches) and sends the input's
gradient back. No MPI here: the bytes move through :class:`~hpcai.parallel.pipeline_comm.PipelineComm`.

Memory: every tensor autograd saves for backward passes a saved-tensor hook that counts its bytes (once per
storage; parameters are not activations) against the micro-batch, released at its backward: ``peak_bytes`` is
the most this stage held at once, ``max_in_flight`` the most micro-batches between forward and backward.
``recompute`` wraps the stage in ``torch.utils.checkpoint`` (non-reentrant): it saves only the stage input
(which passes the same hook, so it is counted), and rebuilds the activations of one micro-batch during its
backward. ``offload`` moves saved tensors that live on an accelerator to host memory in the same hook and back
in backward; on a CPU-only run they are on the host already, so the hook runs but moves nothing.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hpcai.parallel.pipeline_comm import PipelineComm
from hpcai.parallel.pipeline_trace import BACKWARD, FORWARD, Timeline


class Stage:
    """Micro-batch state of one stage during one step; counters over the run."""

    def __init__(self, module: nn.Module, comm: PipelineComm, tl: Timeline, recompute: bool, offload: bool):
        self.module, self.comm, self.tl = module, comm, tl
        self.stage, self.stages = comm.stage, comm.stages
        self.first, self.last = self.stage == 0, self.stage == self.stages - 1
        self.recompute, self.offload = recompute, offload
        self._param_ptrs = {p.data_ptr() for p in module.parameters()}
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # the stage output, or the scaled loss on the last stage
        self.held: dict[int, int] = {}  # bytes held for micro-batch i's backward
        self.live_bytes = self.peak_bytes = 0
        self.max_in_flight = 0
        self.offloaded_bytes = 0
        self.x_chunks: tuple[torch.Tensor, ...] = ()
        self.y_chunks: tuple[torch.Tensor, ...] = ()
        self.loss_fn = None
        self.batch_len = 0
        self.loss = torch.zeros(())

    def begin(self, x: torch.Tensor, y: torch.Tensor, micro_batches: int, loss_fn) -> None:
        self.x_chunks, self.y_chunks = x.chunk(micro_batches), y.chunk(micro_batches)
        self.batch_len, self.loss_fn = len(y), loss_fn
        self.loss = torch.zeros(())

    # ------------------------------------------------------------------------------- saved-tensor hooks
    def _hooks(self, mb: int) -> torch.autograd.graph.saved_tensors_hooks:
        seen: set[tuple[int, int]] = set()
        self.held[mb] = 0

        def pack(t: torch.Tensor):
            key = (t.data_ptr(), t.numel())
            if t.data_ptr() not in self._param_ptrs and key not in seen:
                seen.add(key)
                self.held[mb] += t.numel() * t.element_size()
            if self.offload and t.device.type != "cpu":
                self.offloaded_bytes += t.numel() * t.element_size()
                return t.device, t.to("cpu", non_blocking=True)
            return None, t

        def unpack(packed):
            device, t = packed
            return t if device is None else t.to(device, non_blocking=True)

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    # ------------------------------------------------------------------------------- the two moves
    def forward(self, mb: int) -> None:
        if self.first:
            x = self.x_chunks[mb]
        else:
            x = self.comm.recv_forward(mb).requires_grad_()  # a leaf: its .grad goes back upstream
        with self.tl.span(FORWARD, mb), self._hooks(mb):
            out = checkpoint(self.module, x, use_reentrant=False) if self.recompute else self.module(x)
            if self.last:
                y = self.y_chunks[mb]
                # The micro-batch's mean loss times its share: the parts sum to the batch's mean loss, so the
                # accumulated gradients are the whole batch's.
                out = self.loss_fn(out, y) * (len(y) / self.batch_len)
        self.inputs[mb], self.outputs[mb] = x, out
        self.live_bytes += self.held[mb]
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self.max_in_flight = max(self.max_in_flight, len(self.outputs))
        if self.last:
            self.loss += out.detach()
        else:
            self.comm.send_forward(out, mb)

    def backward(self, mb: int) -> None:
        x, out = self.inputs.pop(mb), self.outputs.pop(mb)
        grad = None if self.last else self.comm.recv_backward(mb)
        with self.tl.span(BACKWARD, mb):
            torch.autograd.backward(out, grad_tensors=grad)
        del out
        self.live_bytes -= self.held.pop(mb)
        if not self.first:
            self.comm.send_backward(x.grad, mb)
