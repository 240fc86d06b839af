"""Feature-IL and Label-IL of finished runs: SMILE's Table 6 (Section 5.2) for this project's runs.

    python -m lightning_stl.interpolation RUN_DIR [RUN_DIR ...] [--pairs 2000] [--alpha 1.0]
        [--seed 0] [--checkpoint best|last] [--output table.md] [--csv table.csv]

For each run folder (written by ``python -m lightning_stl.run``) the command loads the checkpoint
the run tested, rebuilds the run's target data, and measures the interpolation loss of Eq. 6 of
SMILE,

    IL(f) = E_{x,x'} E_{δ1,δ2} E_λ ‖ f(Mix_{λδ1+(1−λ)δ2}(x, x'))
                                     − (λ f(Mix_{δ1}(x, x')) + (1−λ) f(Mix_{δ2}(x, x'))) ‖₂ ,

on random pairs (x, x') of the run's TRAINING images (the N images it trained on) and of its TEST
set, for two functions f: the backbone's pooled features ``[B, F]`` (the last hidden layer:
Feature-IL) and the target classifier's logits ``[B, K]`` (Label-IL). δ1, δ2, λ ~ Beta(α, α)
(:func:`~lightning_stl.metrics.sample_mixing_weights`); pairs and weights come from a generator
seeded by ``--seed``, so two invocations print the same numbers. Lower is better; an affine f
scores 0. :func:`interpolation_losses` is the same measurement for any module and loader.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from lightning_stl.data import SourceTargetDataModule
from lightning_stl.metrics import InterpolationLoss, interpolation_inputs, sample_mixing_weights
from lightning_stl.schedule import TARGET

#: What a run folder of ``python -m lightning_stl.run`` holds (the checkpoints under checkpoints/).
RUN_FILES = ("run_identity.json", "metrics.json")
CHECKPOINT_CHOICES = ("best", "last")
SPLITS = ("train", "test")
#: Result keys of :func:`interpolation_losses` and the table's column order.
COLUMNS = (("label_il", "Label-IL"), ("feature_il", "Feature-IL"))

FeatureFunctions = tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]


# ---------------------------------------------------------------------- the measurement (Eq. 6)
def feature_functions(module: nn.Module) -> FeatureFunctions:
    """``(features, classify)`` of a method's module: images ``[B, C, H, W]`` → pooled features
    ``[B, F]`` (Feature-IL's f) and features ``[B, F]`` → target logits ``[B, K]`` (Label-IL's f).

    A :class:`~lightning_stl.methods.FineTune` (or any module) with ``extract_features`` and
    ``classify``; a :class:`~lightning_stl.methods.SmoothTransfer`: ``model.backbone`` and
    ``model.target_head``.
    """
    if hasattr(module, "extract_features") and hasattr(module, "classify"):
        return module.extract_features, module.classify
    model = getattr(module, "model", None)
    if model is not None and hasattr(model, "backbone") and hasattr(model, "target_head"):
        return model.backbone, model.target_head
    raise TypeError(
        f"{type(module).__name__} exposes no features and classifier: give it "
        "`extract_features(x) -> [B, F]` and `classify(features) -> [B, K]` (as FineTune has), "
        "or a `model` with `backbone` and `target_head` (as SmoothTransfer has)"
    )


def _first(batch: Any) -> Tensor:
    """The images of a batch ``(x, y)`` (or of a bare tensor ``x``)."""
    return batch[0] if isinstance(batch, list | tuple) else batch


def draw_pairs(
    num_images: int, num_pairs: int, alpha: float, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Indices ``i, j`` ``[P]`` of P pairs of distinct images drawn uniformly from ``num_images``,
    and their δ1, δ2, λ ``[P]`` ~ Beta(α, α), all from ``generator``."""
    if num_images < 2:
        raise ValueError(f"interpolation pairs need at least 2 images, the set has {num_images}")
    first = torch.randint(0, num_images, (num_pairs,), generator=generator)
    second = (first + torch.randint(1, num_images, (num_pairs,), generator=generator)) % num_images
    delta1, delta2, lam = sample_mixing_weights(num_pairs, alpha, generator)
    return first, second, delta1, delta2, lam


def interpolation_losses(
    module: nn.Module,
    images_loader: DataLoader,
    num_pairs: int = 2000,
    alpha: float = 1.0,
    seed: int = 0,
    preprocess: Callable[[Any], Tensor] | None = None,
) -> dict[str, float]:
    """Feature-IL and Label-IL (Eq. 6 of SMILE) of ``module`` on random pairs of a data set.

    Args:
        module: A method's module (see :func:`feature_functions`); evaluated in eval mode under
            ``torch.no_grad`` on its own device, and left in the mode it was in.
        images_loader: A DataLoader over a map-style data set of images (batches ``(x, y)`` or
            ``x``). The pairs' images are read through a loader like it (same collation, workers
            and batch size, i.e. ``batch_size`` pairs per step) over just the drawn indices.
        num_pairs: P, the number of pairs (x, x'), drawn uniformly with x ≠ x'.
        alpha: α of δ1, δ2, λ ~ Beta(α, α) (1: uniform).
        seed: Seeds the pairs and the mixing weights: the same seed gives the same numbers.
        preprocess: Turns a batch on the module's device into model-ready images ``[B, C, H, W]``
            (e.g. ``lambda b: datamodule.on_after_batch_transfer(b, 0)[0]``); default: take ``x``.

    Returns:
        ``{"feature_il": ..., "label_il": ...}``: the mean distance over the P pairs.
    """
    if isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 1:
        raise ValueError(f"num_pairs={num_pairs!r} is not allowed: it must be an integer >= 1")
    dataset = images_loader.dataset
    generator = torch.Generator().manual_seed(int(seed))
    first, second, delta1, delta2, lam = draw_pairs(len(dataset), num_pairs, alpha, generator)
    chunk = images_loader.batch_size or 1
    order = torch.cat(
        [
            torch.cat([first[s : s + chunk], second[s : s + chunk]])
            for s in range(0, num_pairs, chunk)
        ]
    )
    pair_loader = DataLoader(
        Subset(dataset, order.tolist()),
        batch_size=2 * chunk,
        shuffle=False,
        num_workers=images_loader.num_workers,
        collate_fn=images_loader.collate_fn,
        pin_memory=images_loader.pin_memory,
    )
    features_of, classify = feature_functions(module)
    device = next(module.parameters()).device
    metrics = {key: InterpolationLoss().to(device) for key, _ in COLUMNS}
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for step, batch in enumerate(pair_loader):
                batch = move_data_to_device(batch, device)
                images = (preprocess or _first)(batch)
                n = images.shape[0] // 2
                rows = slice(step * chunk, step * chunk + n)
                weights = [w[rows].to(device) for w in (delta1, delta2, lam)]
                inputs = interpolation_inputs(images[:n], images[n:], *weights)
                features = [features_of(x) for x in inputs]
                metrics["feature_il"].update(*features, weights[2])
                metrics["label_il"].update(*(classify(f) for f in features), weights[2])
    finally:
        module.train(was_training)
    return {key: float(metric.compute()) for key, metric in metrics.items()}


# ---------------------------------------------------------------------- run folders
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
    checkpoint's weights replace it, so the file need not exist any more.
    """
    header = torch.load(run.checkpoint, map_location="cpu", weights_only=True, mmap=True)
    options = dict((header.get("hyper_parameters") or {}).get("backbone_options") or {})
    options.pop("pretrained_file", None)
    module = module_class(run.identity).load_from_checkpoint(
        run.checkpoint, map_location=device, backbone_options=options
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


def split_loader(datamodule: SourceTargetDataModule, split: str) -> DataLoader:
    """An evaluation loader (no augmentation, no shuffle) over the run's training images or its
    test set; its batches go through ``datamodule.on_after_batch_transfer``."""
    if split == "test":
        return datamodule.test_dataloader()
    if split == "train":
        return datamodule._eval_loader(datamodule.train_sets[TARGET])
    raise ValueError(f"split={split!r} is not allowed: choose one of {', '.join(SPLITS)}")


def measure_run(
    run: RunFolder,
    data_dir: str | Path,
    num_pairs: int = 2000,
    alpha: float = 1.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    num_workers: int | None = None,
) -> dict[str, float]:
    """``{"label_il_train", "label_il_test", "feature_il_train", "feature_il_test"}`` of a run."""
    module = load_module(run, device)
    datamodule = load_datamodule(run, data_dir, batch_size, num_workers)

    def preprocess(batch: Any) -> Tensor:
        return _first(datamodule.on_after_batch_transfer(batch, 0))

    result = {}
    for split in SPLITS:
        losses = interpolation_losses(
            module, split_loader(datamodule, split), num_pairs, alpha, seed, preprocess
        )
        for key, value in losses.items():
            result[f"{key}_{split}"] = value
    return result


# ---------------------------------------------------------------------- the table
def table_rows(runs: Sequence[RunFolder], values: Sequence[dict[str, float]]) -> list[dict]:
    """One row per run: its label (with the folder's name when two labels are the same),
    settings and the four interpolation losses."""
    labels = [run.label for run in runs]
    rows = []
    for run, label, value in zip(runs, labels, values, strict=True):
        m = run.metrics
        rows.append(
            {
                "run": label if labels.count(label) == 1 else f"{label} ({run.path.name})",
                "method": m.get("method"),
                "target_size": m.get("target_size"),
                "seed": m.get("seed"),
                "test_acc": m.get("test_acc"),
                "checkpoint": str(run.checkpoint),
                **{
                    f"{key}_{split}": value[f"{key}_{split}"]
                    for key, _ in COLUMNS
                    for split in SPLITS
                },
            }
        )
    return rows


def markdown_table(rows: Sequence[dict], digits: int = 4) -> str:
    """SMILE's Table 6 layout: a row per run; Label-IL then Feature-IL, each Train and Test."""
    header = ["Run"] + [f"{name} {split.capitalize()}" for _, name in COLUMNS for split in SPLITS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * 4) + "|"]
    for row in rows:
        cells = [row["run"]] + [
            f"{row[f'{key}_{split}']:.{digits}f}" for key, _ in COLUMNS for split in SPLITS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict], path: str | Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------- command line
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_stl.interpolation",
        description="Feature-IL and Label-IL (SMILE Eq. 6, Table 6) of finished runs, on their "
        "training images and test set. Lower is better.",
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--pairs", type=int, default=2000, help="pairs (x, x') per set")
    parser.add_argument("--alpha", type=float, default=1.0, help="δ1, δ2, λ ~ Beta(α, α)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the pairs and weights")
    parser.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="best")
    parser.add_argument("--output", type=Path, help="also write the Markdown table here")
    parser.add_argument("--csv", type=Path, help="also write the rows (with test_acc) as CSV")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("LIGHTNING_STL_DATA", "data")),
        help="data.root of the runs (default: $LIGHTNING_STL_DATA or ./data, as conf/paths)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--batch-size", type=int, default=256, help="pairs per forward")
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader workers")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error(f"--pairs={args.pairs} is not allowed: it must be >= 1")
    if not args.alpha > 0:
        parser.error(f"--alpha={args.alpha} is not allowed: it must be > 0")
    if args.batch_size < 1:
        parser.error(f"--batch-size={args.batch_size} is not allowed: it must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Measure every run, print the table, write the files; returns the rows."""
    args = parse_args(argv)
    try:  # every folder is checked before the first (slow) measurement
        runs = [read_run(path, args.checkpoint) for path in args.runs]
        device = _device(args.device)
        values = [
            measure_run(
                run,
                args.data_dir,
                args.pairs,
                args.alpha,
                args.seed,
                device,
                args.batch_size,
                args.num_workers,
            )
            for run in runs
        ]
    except (FileNotFoundError, ValueError) as error:  # bad folders, settings, data
        sys.exit(f"error: {error}")
    rows = table_rows(runs, values)
    table = markdown_table(rows)
    print(
        f"Interpolation loss (SMILE Eq. 6; lower is better): {args.pairs} pairs per set, "
        f"δ1, δ2, λ ~ Beta({args.alpha:g}, {args.alpha:g}), seed {args.seed}, "
        f"{args.checkpoint} checkpoints"
    )
    print(table, end="")
    bad = [row["run"] for row in rows if not all(math.isfinite(v) for v in _values(row))]
    if bad:
        print(f"warning: non-finite interpolation loss for {', '.join(bad)}", file=sys.stderr)
    if args.output:
        args.output.write_text(table)
    if args.csv:
        write_csv(rows, args.csv)
    return rows


def _values(row: dict) -> list[float]:
    return [row[f"{key}_{split}"] for key, _ in COLUMNS for split in SPLITS]


if __name__ == "__main__":
    main()
