"""Host-to-device batch copies (`engine/copies.py`): on a side stream, ordered on the device."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import gpu_losses_agree
from mmpretrain.engine.copies import BatchCopier, batch_copier
from mmpretrain.engine.trainer import Trainer


class _Stream:
    """A stream stand-in that logs the waits issued on it."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def wait_stream(self, other: "_Stream") -> None:
        self.log.append(("wait", self.name, other.name))


class _Cuda:
    """The part of `torch.cuda` BatchCopier uses, logging which stream is active."""

    def __init__(self, log: list) -> None:
        self.log, self.active = log, "compute"
        self.compute = _Stream("compute", log)

    def current_stream(self, device: torch.device) -> _Stream:
        return self.compute

    @contextlib.contextmanager
    def stream(self, s: _Stream) -> Iterator[None]:
        self.log.append(("enter", s.name))
        self.active = s.name
        try:
            yield
        finally:
            self.active = "compute"
            self.log.append(("exit", s.name))


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> tuple[list, _Cuda]:
    """(log, fake cuda): `Tensor.to` logs the active stream and `non_blocking`,
    `Tensor.record_stream` logs its stream."""
    log: list = []
    cuda = _Cuda(log)
    to = torch.Tensor.to

    def logging_to(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        log.append(("copy", cuda.active, kwargs.get("non_blocking", False)))
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", logging_to)
    monkeypatch.setattr(torch.Tensor, "record_stream",
                        lambda self, s: log.append(("record", s.name)))
    return log, cuda


def _batch() -> list[torch.Tensor]:
    return [torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8),  # (B, 3, S, S)
            torch.randint(0, 100, (4, 7))]  # (B, L)


def test_side_stream_copies_then_compute_waits_on_the_device(logged) -> None:
    """The copies run inside the copy stream's context, non-blocking; then the compute stream
    waits for the copy stream (no host wait) and each copied tensor is recorded as used by the
    compute stream, in that order; the values arrive unchanged."""
    log, cuda = logged
    copier = BatchCopier(torch.device("cpu"), stream=_Stream("copy", log), cuda=cuda)
    batch = _batch()
    out = copier(batch)
    assert log == [("enter", "copy"), ("copy", "copy", True), ("copy", "copy", True),
                   ("exit", "copy"), ("wait", "compute", "copy"),
                   ("record", "compute"), ("record", "compute")]
    assert all(torch.equal(a, b) for a, b in zip(out, batch))


def test_without_a_side_stream_copies_on_the_current_stream(logged) -> None:
    """`engine.copy_stream=false`, and every CPU run: one copy per tensor on the current
    stream, blocking on CPU, no waits and no stream records."""
    log, _ = logged
    copier = batch_copier(torch.device("cpu"), side_stream=True)
    assert copier.stream is None  # no CUDA stream on CPU
    copier(_batch())
    assert log == [("copy", "compute", False), ("copy", "compute", False)]


def test_trainer_copies_each_batch_through_its_copier(logged) -> None:
    """`Trainer._to_device` hands images and tokens to the copier (the side stream on CUDA)."""
    log, cuda = logged
    copier = BatchCopier(torch.device("cpu"), stream=_Stream("copy", log), cuda=cuda)
    batch = dict(zip(("image", "tokens"), _batch()))
    fake = SimpleNamespace(task=SimpleNamespace(caption_loss=None), _copy=copier)
    images, tokens = Trainer._to_device(fake, batch)
    assert torch.equal(images, batch["image"]) and torch.equal(tokens, batch["tokens"])
    assert [e[:2] for e in log if e[0] == "copy"] == [("copy", "copy")] * 2
    assert ("wait", "compute", "copy") in log


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_copy_runs_while_the_previous_step_computes() -> None:
    """With the compute stream busy (a ~0.5 s spin: the previous step), the side stream's
    copies finish while it still runs; on the compute stream they would wait for the spin."""
    cuda = torch.device("cuda")
    copier = batch_copier(cuda, side_stream=True)
    batch = [t.pin_memory() for t in _batch()]
    torch.cuda._sleep(1_000_000_000)  # the previous step's work: ~0.5 s at 2 GHz
    out = copier(batch)
    copier.stream.synchronize()  # the copies have arrived ...
    compute_busy = not torch.cuda.current_stream().query()  # ... while the spin still runs
    torch.cuda.synchronize()
    assert compute_busy
    assert all(torch.equal(a.cpu(), b) for a, b in zip(out, batch))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_side_stream_copies_train_as_the_compute_stream_does(tmp_path: Path) -> None:
    """One GPU, bf16, ZeRO-1, batches made on the host each step (the synthetic source): 20
    steps with the copies on the side stream give the losses of copies on the compute stream.
    A forward that read a batch before its copy ended would see another batch's bytes."""
    gpu_losses_agree(tmp_path, ["engine.zero_stage=1", "engine.copy_stream=true"],
                     ["engine.zero_stage=1", "engine.copy_stream=false"])
