"""Checkpoints that are either whole or absent: written beside their final name, then renamed.

Lightning's ``TorchCheckpointIO`` saves through ``fsspec``'s local transaction, which writes the
file in ``$TMPDIR`` and moves it into place: across file systems that move is a copy, so a full
disk or a kill during it leaves a truncated file under the final name (a resume then reads it and
crashes), and its ``_atomic_save`` drops a ``PermissionError`` without a word, so a run whose
checkpoint folder cannot be written trains to the end and loses everything. Neither Lightning nor
fsspec offers a same-folder write-fsync-rename for local paths, hence this plugin:

1. ``torch.save`` into ``.<name>.<pid>.tmp`` in the checkpoint's own folder;
2. ``flush`` + ``os.fsync`` of the file, ``os.replace`` onto the final name (atomic on POSIX
   within one file system), ``fsync`` of the folder so that the rename itself is durable;
3. on any error the temporary file is removed and the error is raised, never swallowed.

A reader therefore sees the previous checkpoint or the new one, never a part of one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose ``save_checkpoint`` is write-to-temp, fsync, rename."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                "AtomicCheckpointIO.save_checkpoint takes no storage_options, got "
                f"{storage_options!r}"
            )
        write_atomically(checkpoint, Path(path))


def write_atomically(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` so that ``path`` is never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


class DamagedCheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, corrupt, or not a checkpoint)."""


def read_checkpoint(path: str | os.PathLike, purpose: str) -> dict[str, Any]:
    """``torch.load(path)`` on the CPU (``weights_only``), or one message naming the damaged file,
    what it was needed for and what to do, instead of PyTorch's stream-reader error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # zip/pickle/stream errors: the file itself is bad
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise DamagedCheckpointError(
            f"checkpoint {path} cannot be read ({type(error).__name__}: {reason[:200]}); it is "
            f"truncated or corrupt (written by a killed process or onto a full disk?). It was "
            f"needed to {purpose}. Delete it to train that stage again from its start"
        ) from None


def check_writable(folder: Path, what: str, setting: str) -> None:
    """Create ``folder`` and write a probe file into it, or stop with one message naming the
    folder, the reason and the ``setting`` that chooses it: before training, not at the first
    checkpoint (nor, as Lightning's ``_atomic_save`` would, silently)."""
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"ok")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ValueError(
            f"the {what} {folder} cannot be written ({reason}); nothing was trained. Choose "
            f"another folder with {setting}, or make this one writable"
        ) from None
