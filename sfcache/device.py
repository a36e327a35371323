"""The model's device: the one rule for a device setting, then every copy between it and the host during extraction.

Only uint8 frames go to the device (pinned host memory, non-blocking copy) and only stored bytes come
back (cast there by `sfcache.store.encoding.encode_on_device`: float16 / bfloat16 bits / int8 with scales,
re-exported here for the extractor), copied into pinned memory without
blocking the thread that launches the work; a CUDA event tells the writer thread when they are there.
So copies in, VGGT, pooling and copies out are queued back to back on the GPU, and the CPU never
waits for the GPU except in the writer, when it needs the bytes. On the CPU all of it is a no-op.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from sfcache.errors import Field, Message, SfcacheError
from sfcache.store.encoding import Encoded, encode_on_device

__all__ = ["DEVICE_CHOICES", "HostCopy", "check_device", "encode_on_device", "pinned", "resolve_device", "to_device"]

DEVICE_CHOICES = "auto | cpu | cuda | cuda:N"  # what every --device accepts


def check_device(asked: str, name: Field | str = "device") -> None:
    """SfcacheError unless `asked` is one of DEVICE_CHOICES (checked before anything is loaded or started); the
    message names the device as `name` (the config field that holds it)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", asked or ""):
        raise SfcacheError(Message(name, f" {asked!r}: expected {DEVICE_CHOICES}"))


def resolve_device(asked: str, gpus: int | None = None, name: Field | str = "device") -> torch.device:
    """The device for `asked` on a machine with `gpus` visible CUDA GPUs (this process's by default): auto is the
    first GPU if there is one, else the CPU; asking for a GPU that is not there is an SfcacheError naming `name`."""
    check_device(asked, name)
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if asked == "auto":
        return torch.device("cuda" if gpus else "cpu")
    device = torch.device(asked)
    if device.type == "cuda" and not gpus:
        raise SfcacheError(Message(name, f" {asked}: no CUDA GPU is visible here"))
    if device.type == "cuda" and (device.index or 0) >= gpus:
        raise SfcacheError(
            Message(name, f" {asked}: only {gpus} CUDA GPU(s) are visible here (cuda:0..cuda:{gpus - 1})")
        )
    return device


def pinned(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host tensor of `array` ready for a non-blocking copy to `device` (page-locked when it is CUDA).

    Called in the reader thread, so the pinning copy is off the model's thread."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.pin_memory() if device.type == "cuda" else tensor


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Queue the copy of a `pinned` tensor to `device` (returns at once on CUDA; the tensor itself on CPU)."""
    return tensor.to(device, non_blocking=True)


class HostCopy:
    """Encoded device tensors on their way to host memory; `get()` waits for them (in the writer thread)."""

    def __init__(self, encoded: dict[int, tuple[torch.Tensor, torch.Tensor | None]]):
        self.event = None
        if any(stored.device.type == "cuda" for stored, _ in encoded.values()):
            encoded = {
                layer: tuple(None if t is None else _pinned_copy(t) for t in pair) for layer, pair in encoded.items()
            }
            self.event = torch.cuda.Event()
            self.event.record()
        self.encoded = encoded

    def get(self) -> dict[int, Encoded]:
        """{layer: (stored numpy in the store's dtype, scales or None)} once the copies have landed."""
        if self.event is not None:
            self.event.synchronize()
        return {
            layer: (_numpy(stored), None if scale is None else _numpy(scale))
            for layer, (stored, scale) in self.encoded.items()
        }


def _pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    array = tensor.numpy()
    return array.view(np.uint16) if array.dtype == np.int16 else array  # bfloat16 bits, as the store keeps them
