"""A durable Optuna sweeper for Hydra: resumable studies, finite failures, a report at the end.

It takes hydra-optuna-sweeper's configuration (TPE by default, trials asked in batches of
``n_jobs`` and run by the configured launcher, ``params`` in Hydra's sweep grammar, see
:mod:`lightning_stl.search_space`) and runs on today's Optuna (>= 4), with what a long search on
shared machines needs:

- **Resume.** With ``storage`` (``sqlite:///study.db`` or a PostgreSQL URL) and ``study_name``, a
  sweep that was killed and is started again runs only the trials it still owes: trials that
  finished are kept and not run again, and the trials it left running are marked failed and their
  parameters asked again first.
- **Several sweep processes on one study.** Each process has a ``worker`` name (set it per
  process, with its own sampler seed); its trial budget ``n_trials`` counts only its own trials,
  so k processes end with the sum of their trials, and Optuna's storage never hands one trial to
  two of them.
- **Failures.** A trial that returns NaN or ±inf is recorded with ``failure_value`` (a finite
  worst value) instead of crashing the sweep; a trial that raises is recorded as failed, logged
  with its number, parameters and error, and counts against ``max_failure_rate``, judged over
  all the trials this sweep has finished, never before ``MIN_TRIALS_BEFORE_STOPPING`` of them
  (and once more at its end, so that a sweep of failures does not exit 0).
- **Report.** ``trials.csv`` (one row per trial: parameters, validation and test accuracy, status,
  wall time, run folder), ``best.yaml`` (the best parameters) and ``trials.png`` (validation
  accuracy by trial and the best so far) in the sweep folder, rewritten after every batch
  (:mod:`lightning_stl.reporting.sweep_report`; the study is opened by
  :func:`lightning_stl.study_storage.open_study`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from lightning_stl.reporting.sweep_report import write_report
from lightning_stl.search_space import SearchSpace, parse_search_space, suggest
from lightning_stl.study_storage import open_study
from lightning_stl.sweep_recovery import (
    FOLDER_ATTR,
    LAUNCHED,
    PROMOTED,
    STATUS_ATTR,
    WORKER_ATTR,
    Recovery,
    params_key,
    recover,
)
from lightning_stl.sweep_rungs import Rungs, climbing

log = logging.getLogger(__name__)


class DurableOptunaSweeper(Sweeper):
    """Hydra sweeper plugin: ``hydra/sweeper=durable_optuna`` (see the module docstring).

    Hydra instantiates it from :class:`~hydra_plugins.lightning_stl_sweeper.DurableOptunaSweeperConf`
    (the sampler already built from its ``_target_``), then calls :meth:`setup` and :meth:`sweep`.
    """

    def __init__(
        self,
        sampler: Any,
        direction: Any,
        storage: Any | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        custom_search_space: str | None,
        params: DictConfig | None,
        worker: str = "0",
        failure_value: float = 0.0,
        pruner: Any | None = None,
        fidelity: Any | None = None,
    ) -> None:
        if n_trials < 1 or n_jobs < 1:
            raise ValueError(
                f"hydra.sweeper.n_trials={n_trials} and n_jobs={n_jobs} must both be >= 1"
            )
        self.sampler = sampler
        self.direction = direction
        self.storage = storage
        self.study_name = study_name
        self.n_trials, self.n_jobs = int(n_trials), int(n_jobs)
        if not 0.0 <= max_failure_rate <= 1.0:
            raise ValueError(
                f"hydra.sweeper.max_failure_rate={max_failure_rate} is not allowed: it must lie "
                "in [0, 1]"
            )
        self.max_failure_rate = float(max_failure_rate)
        self.extend_search_space = get_method(custom_search_space) if custom_search_space else None
        self.params = params
        self.worker = str(worker)
        self.failure_value = float(failure_value)
        self.pruner = pruner
        self.rungs = Rungs.from_config(fidelity)
        if self.rungs is not None and pruner is None:
            raise ValueError(
                "hydra.sweeper.fidelity without a pruner: set hydra/sweeper/pruner="
                "successive_halving (or hyperband), which decides who climbs the rungs"
            )
        self.config: DictConfig | None = None
        self.launcher: Any = None
        self.job_idx = 0
        # parameters of trials a killed sweep left running -> their run folder's trial number, so
        # that the re-run resumes from the folder's last.ckpt instead of starting over
        self.rerun_folders: dict[str, int] = {}
        self.recovery = Recovery()

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.job_idx = config, 0
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    def _directions(self) -> list[str]:
        directions = (
            self.direction if isinstance(self.direction, list | tuple) else [self.direction]
        )
        return [str(getattr(d, "name", d)) for d in directions]

    def _trial_overrides(self, trial: optuna.Trial, space: SearchSpace) -> list[str]:
        """Draw ``trial``'s parameters and return its overrides."""
        for name, distribution in space.distributions.items():
            suggest(trial, name, distribution)
        if self.extend_search_space is not None:
            self.extend_search_space(self.config, trial)
        overlap = sorted(set(trial.params) & set(space.fixed))
        if overlap:
            raise ValueError(f"parameters both searched and fixed: {', '.join(overlap)}")
        return space.overrides(dict(trial.params))

    def _new_trial(self, study: optuna.Study) -> optuna.Trial:
        trial = study.ask()
        trial.set_user_attr(WORKER_ATTR, self.worker)
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        return trial

    # ------------------------------------------------------------------ helpers
    def _mine(self, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.user_attrs.get(WORKER_ATTR) == self.worker

    def _recover(self, study: optuna.Study) -> int:
        """Take over this worker's trials left by a killed sweep
        (:func:`lightning_stl.sweep_recovery.recover`); return how many have finished."""
        self.recovery = recover(
            study, self.worker, rungs=len(self.rungs.fractions) if self.rungs else None
        )
        self.rerun_folders.update(self.recovery.rerun_folders)
        return self.recovery.finished

    def _stop_for_failures(self, failed: list[Exception], finished: int) -> None:
        log.error(
            "%d of the %d trials this sweep finished failed, more than max_failure_rate=%s: "
            "stopping (trials.csv has every trial)",
            len(failed),
            finished,
            self.max_failure_rate,
        )
        raise failed[0]

    def _outcome(self, ret: JobReturn) -> tuple[float | None, dict[str, Any], Exception | None]:
        """(value to tell, user attributes, error) of one finished job."""
        attrs: dict[str, Any] = {}
        output_dir = (
            OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir") if ret.hydra_cfg else None
        )
        run_dir = Path(output_dir) if output_dir else None
        if run_dir is not None:
            attrs["run_dir"] = str(run_dir)
            metrics_file = run_dir / "metrics.json"
            if not metrics_file.exists():  # a cross-validated trial (hparams_search=smile_cv)
                metrics_file = run_dir / "cv.json"
            if metrics_file.exists():
                metrics = json.loads(metrics_file.read_text())
                for key in ("status", "test_acc", "best_val_acc", "best_step", "wall_time_s"):
                    if metrics.get(key) is not None:
                        attrs[key] = metrics[key]
        if ret.status == JobStatus.FAILED:
            error = _raised(ret)
            attrs[STATUS_ATTR] = "failed"
            attrs["error"] = f"{type(error).__name__}: {error}"[:2000]
            return None, attrs, error
        try:
            value = float(ret.return_value)
        except (TypeError, ValueError) as error:
            attrs[STATUS_ATTR] = "failed"
            attrs["error"] = f"return value {ret.return_value!r} is not a number"
            return None, attrs, error
        if not math.isfinite(value):
            attrs[STATUS_ATTR] = "non_finite"
            attrs["returned"] = str(value)
            return self.failure_value, attrs, None
        attrs.setdefault(STATUS_ATTR, "ok")
        return value, attrs, None

    # ------------------------------------------------------------------ the loop
    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None
        params = [f"{key}={value}" for key, value in (self.params or {}).items()]
        space = parse_search_space([*params, *arguments])
        directions = self._directions()
        if len(directions) != 1:
            raise ValueError(f"this sweeper optimises one objective, got directions {directions}")

        study = open_study(self.storage, self.study_name, self.sampler, directions, self.pruner)
        done = self._recover(study)
        if self.recovery.had_trials:
            # A seeded sampler started again would propose the parameters it proposed before.
            self.sampler.reseed_rng()
        climbers: list[tuple[optuna.Trial, int]] = list(self.recovery.resumed)  # next rungs
        to_go = max(0, self.n_trials - done - len(climbers))
        log.info(
            "study %r in %s, worker %r: %d of %d trials finished, %d to run, %d at a time",
            study.study_name,
            self.storage or "memory",
            self.worker,
            done,
            self.n_trials,
            to_go,
            self.n_jobs,
        )
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        finished, failed = 0, []  # this sweep's trials: the failure rate is judged over all
        drawn: dict[int, list[str]] = {}  # a trial's overrides, drawn once for all its rungs
        while to_go > 0 or climbers:
            batch, climbers = climbers[: self.n_jobs], climbers[self.n_jobs :]
            while len(batch) < self.n_jobs and to_go > 0:
                batch.append((self._new_trial(study), 0))
                to_go -= 1
            for trial, _ in batch:
                if trial.number not in drawn:
                    overrides = self._trial_overrides(trial, space)  # params drawn: known now
                    queued = self.rerun_folders.pop(params_key(trial.params), trial.number)
                    folder = trial.user_attrs.get(FOLDER_ATTR, queued)
                    trial.set_user_attr(FOLDER_ATTR, folder)
                    drawn[trial.number] = [*overrides, f"+optuna_trial={folder}"]
            overrides = [
                (*drawn[t.number], *([self.rungs.override(r)] if self.rungs else []))
                for t, r in batch
            ]
            for trial, _ in batch:  # every parameter drawn: from here a kill re-runs them
                trial.set_user_attr(STATUS_ATTR, LAUNCHED)
            started = time.time()
            returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            failures: list[Exception] = []
            reported: list[optuna.Trial] = []
            for (trial, rung), ret in zip(batch, returns, strict=True):
                value, attrs, error = self._outcome(ret)
                attrs.setdefault("wall_time_s", time.time() - started)
                if self.rungs is not None:
                    attrs["rung"], attrs["run_fraction"] = rung, self.rungs.fractions[rung]
                for key, item in attrs.items():
                    trial.set_user_attr(key, item)
                if error is not None:
                    log.warning(
                        "trial %d failed with parameters %s: %s (run folder %s)",
                        trial.number,
                        trial.params,
                        attrs.get("error"),
                        attrs.get("run_dir"),
                    )
                    study.tell(trial, state=TrialState.FAIL)
                    failures.append(error)
                    finished += 1
                    continue
                if attrs[STATUS_ATTR] != "ok":
                    log.warning(
                        "trial %d (%s) ended %s: recorded as %s",
                        trial.number,
                        trial.params,
                        attrs[STATUS_ATTR],
                        value,
                    )
                if self.rungs is not None:
                    trial.report(value, self.rungs.resource(rung))
                    if not self.rungs.is_last(rung):
                        if attrs[STATUS_ATTR] == "ok":
                            reported.append(trial)
                        else:  # a diverged run does not climb: its value is the failure value
                            study.tell(trial, state=TrialState.PRUNED)
                            finished += 1
                        continue
                study.tell(trial, value)
                finished += 1
            rung_of = {t.number: r for t, r in batch}
            for trial, climbs in climbing(reported):  # each verdict recorded as it is made
                if climbs:
                    trial.set_user_attr(STATUS_ATTR, PROMOTED)
                    climbers.append((trial, rung_of[trial.number] + 1))
                else:
                    study.tell(trial, state=TrialState.PRUNED)
                    finished += 1
            write_report(study, sweep_dir, directions[0])
            failed.extend(failures)
            if too_many_failures(len(failed), finished, self.max_failure_rate, final=False):
                self._stop_for_failures(failed, finished)

        write_report(study, sweep_dir, directions[0])
        if too_many_failures(len(failed), finished, self.max_failure_rate, final=True):
            self._stop_for_failures(failed, finished)
        completed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
        if completed:
            best = study.best_trial
            log.info("best value %s with %s (trial %d)", best.value, best.params, best.number)


#: A sweep is not stopped for its failure rate before it has finished this many trials (one
#: failing trial of a first batch of two is not a rate); at its end the rate is judged anyway.
MIN_TRIALS_BEFORE_STOPPING = 5


def too_many_failures(failed: int, finished: int, max_failure_rate: float, final: bool) -> bool:
    """Whether ``failed`` of the sweep's ``finished`` trials exceed ``max_failure_rate``: judged
    over every trial it has finished, once there are ``MIN_TRIALS_BEFORE_STOPPING`` of them, or
    at the end of the sweep (``final``)."""
    if failed == 0 or finished == 0:
        return False
    if not final and finished < MIN_TRIALS_BEFORE_STOPPING:
        return False
    return failed / finished > max_failure_rate


def _raised(ret: JobReturn) -> Exception:
    """The exception a failed job's task raised: ``JobReturn.return_value`` raises it again (and
    writes ``Error executing job ...`` to stderr, which is kept out: the sweep logs the failure)."""
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            value = ret.return_value
        except Exception as error:
            return error
    raise RuntimeError(f"job {ret.overrides} is marked failed but returned {value!r}")
