"""A finished run folder of ``python -m lightning_stl.run``: its files, the checkpoint it tested,
its module and its target data, rebuilt to measure the trained model again (as
``python -m lightning_stl.interpolation`` does)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch

from lightning_stl.data import SourceTargetDataModule
from lightning_stl.schedule import TARGET

#: What a run folder of ``python -m lightning_stl.run`` holds (the checkpoints under checkpoints/).
RUN_FILES = ("run_identity.json", "metrics.json")
CHECKPOINT_CHOICES = ("best", "last")


@dataclass(frozen=True)
class RunFolder:
    """A finished run: its folder, resolved settings (``run_identity.json``), results
    (``metrics.json``) and the checkpoint to measure."""

    path: Path
    identity: dict[str, Any]
    metrics: dict[str, Any]
    checkpoint: Path

    @property
    def label(self) -> str:
        """``<method> N=<training images> seed=<seed>``, a row of the table."""
        m = self.metrics
        return f"{m.get('method', '?')} N={m.get('target_size', '?')} seed={m.get('seed', '?')}"


def _resolve_checkpoint(run_dir: Path, stage: str, recorded: str | None) -> Path | None:
    """The recorded checkpoint, or the file of that name in ``checkpoints/<stage>/`` (a moved
    run folder); ``None`` when neither exists."""
    if not recorded:
        return None
    for candidate in (Path(recorded), run_dir / "checkpoints" / stage / Path(recorded).name):
        if candidate.is_file():
            return candidate
    return None


def read_run(run_dir: str | Path, checkpoint: str = "best") -> RunFolder:
    """Read a run folder and choose its checkpoint.

    ``checkpoint="best"`` takes the checkpoint the run tested: the best-validation one when there
    is one, else the last; ``"last"`` the final model.
    """
    if checkpoint not in CHECKPOINT_CHOICES:
        raise ValueError(
            f"checkpoint={checkpoint!r} is not allowed: "
            f"choose one of {', '.join(CHECKPOINT_CHOICES)}"
        )
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a folder")
    missing = [name for name in RUN_FILES if not (run_dir / name).is_file()]
    if missing:
        hint = (
            " (the run has not finished: metrics.json is written after its test)"
            if missing == ["metrics.json"]
            else ""
        )
        raise FileNotFoundError(
            f"{run_dir} is not a finished run folder: it has no {' and no '.join(missing)}{hint}. "
            f"A run folder of `python -m lightning_stl.run` holds {', '.join(RUN_FILES)} and "
            "checkpoints/<stage>/*.ckpt"
        )
    identity = json.loads((run_dir / "run_identity.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    stages = metrics.get("stages") or [{}]
    final = stages[-1]
    stage = str(final.get("name", ""))
    names = ["best_model_path", "last_model_path"] if checkpoint == "best" else ["last_model_path"]
    for name in names:
        path = _resolve_checkpoint(run_dir, stage, final.get(name))
        if path is not None:
            return RunFolder(run_dir, identity, metrics, path)
    recorded = {name: final.get(name) for name in names}
    raise FileNotFoundError(
        f"run {run_dir} has no {checkpoint} checkpoint: metrics.json names {recorded} "
        f"(status {metrics.get('status')!r}) and checkpoints/{stage}/ holds none of them"
    )


def module_class(identity: dict[str, Any]) -> type[L.LightningModule]:
    """The LightningModule class of a run's method (``method.module._target_``; SmoothTransfer
    when the method has no module, as :func:`lightning_stl.method_module.build_module` does)."""
    target = ((identity.get("method") or {}).get("module") or {}).get("_target_")
    return hydra.utils.get_class(target or "lightning_stl.methods.SmoothTransfer")


def load_module(run: RunFolder, device: torch.device | str = "cpu") -> L.LightningModule:
    """The run's module from its checkpoint (``load_from_checkpoint``), in eval mode on ``device``.

    A backbone's ``pretrained_file`` is dropped from the rebuilt hyper-parameters: the
    checkpoint's weights replace it, so the file need not exist any more. A fine-tuning
    checkpoint of an older version (its regularisers' configs in ``hparams``) is rebuilt without
    them, with the source head its weights have.
    """
    header = torch.load(run.checkpoint, map_location="cpu", weights_only=True, mmap=True)
    hparams = header.get("hyper_parameters") or {}
    options = dict(hparams.get("backbone_options") or {})
    options.pop("pretrained_file", None)
    extra: dict[str, Any] = {}
    if "regularizers" in hparams:
        # written when regularisers were configs in hparams: a trained model needs none of them
        extra["regularizers"] = ()
        if "with_source_head" not in hparams:
            keys = header.get("state_dict") or {}
            extra["with_source_head"] = any(k.startswith("source_head.") for k in keys)
    module = module_class(run.identity).load_from_checkpoint(
        run.checkpoint, map_location=device, backbone_options=options, **extra
    )
    return module.eval()


def load_datamodule(
    run: RunFolder,
    data_dir: str | Path,
    batch_size: int = 256,
    num_workers: int | None = None,
) -> SourceTargetDataModule:
    """The run's target data, set up: the same N training images, the same test set.

    The source set is not loaded (``source=None``): the draw of the target images does not
    depend on it. Checks that the training set has the run's size.
    """
    data = {k: v for k, v in (run.identity.get("data") or {}).items() if k != "_target_"}
    data.update(root=str(data_dir), download=False, source=None, eval_batch_size=batch_size)
    if num_workers is not None:
        data["num_workers"] = num_workers
    datamodule = SourceTargetDataModule(**data)
    datamodule.setup("fit")
    expected, found = run.metrics.get("target_size"), len(datamodule.train_sets[TARGET])
    if expected is not None and expected != found:
        raise ValueError(
            f"run {run.path} trained on {expected} target images, but its data settings now give "
            f"{found} (data under {data_dir}); is it the data folder the run used (--data-dir)?"
        )
    return datamodule
