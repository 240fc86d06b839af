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
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from lightning_stl.finished_run import (
    CHECKPOINT_CHOICES,
    RunFolder,
    load_datamodule,
    load_module,
    read_run,
)
from lightning_stl.metrics import InterpolationLoss, interpolation_inputs, sample_mixing_weights
from lightning_stl.reporting.interpolation_table import (
    COLUMNS,
    SPLITS,
    loss_values,
    table_markdown,
    table_rows,
)
from lightning_stl.reporting.tables import write_csv_rows

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


# ---------------------------------------------------------------------- a run folder
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
            module, datamodule.target_loader(split), num_pairs, alpha, seed, preprocess
        )
        for key, value in losses.items():
            result[f"{key}_{split}"] = value
    return result


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
    table = table_markdown(rows)
    print(
        f"Interpolation loss (SMILE Eq. 6; lower is better): {args.pairs} pairs per set, "
        f"δ1, δ2, λ ~ Beta({args.alpha:g}, {args.alpha:g}), seed {args.seed}, "
        f"{args.checkpoint} checkpoints"
    )
    print(table, end="")
    bad = [row["run"] for row in rows if not all(math.isfinite(v) for v in loss_values(row))]
    if bad:
        print(f"warning: non-finite interpolation loss for {', '.join(bad)}", file=sys.stderr)
    if args.output:
        args.output.write_text(table)
    if args.csv:
        write_csv_rows(rows, args.csv)
    return rows


if __name__ == "__main__":
    main()
