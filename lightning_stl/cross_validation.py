"""k-fold cross-validation of a run on its training set (SMILE, Section 4.0.2)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from lightning_stl.run_files import _write_json


def cross_validate(
    cfg: DictConfig, train: Callable[[DictConfig], dict[str, Any]]
) -> dict[str, Any]:
    """``data.cv_folds`` = k trainings, fold i validating on the i-th of k stratified folds of the
    training set and training on the others (``data.cv_folds``/``data.cv_fold``), each in
    ``fold<i>/`` of the run folder, each trained by ``train`` (:func:`lightning_stl.run.train`).
    Returns the mean of the folds' objectives (``cv.json``).

    SMILE, Section 4.0.2: "a simple three-fold cross validation on the original training set".
    """
    folds = cfg.data.cv_folds
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(
            f"data.cv_folds={folds!r} is not allowed: it must be an integer >= 2, or null"
        )
    run_dir = Path(cfg.paths.output_dir)
    started = time.perf_counter()
    results = []
    for fold in range(folds):
        fold_cfg = cfg.copy()
        with open_dict(fold_cfg):
            fold_cfg.data.cv_fold = fold
            fold_cfg.paths.output_dir = str(run_dir / f"fold{fold}")
        results.append(train(fold_cfg))
    objectives = [float(r["objective"]) for r in results]
    summary = {
        "cv_folds": folds,
        "objective": sum(objectives) / folds,
        "fold_objectives": objectives,
        "status": "ok" if all(r["status"] == "ok" for r in results) else "diverged",
        "best_val_acc": sum(objectives) / folds,
        "wall_time_s": time.perf_counter() - started,
    }
    _write_json(run_dir / "cv.json", summary)
    print(f"{folds}-fold cross-validation accuracy {summary['objective']:.4f}  -> {run_dir}")
    return summary
