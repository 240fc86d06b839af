"""What a sweep started again finds in its study: the trials a killed sweep of the same worker left.

:func:`recover` goes through this worker's trials once, before the sweep asks anything:

- a trial that ended counts against the budget: COMPLETE, PRUNED (stopped on a rung), or FAIL
  because its own run failed;
- a trial left RUNNING by a dead process of this host is taken over. In a sweep with rungs
  (:mod:`lightning_stl.sweep_rungs`) it is *continued*: the same Optuna trial climbs on from the
  rung it was on, in its own folder (a run killed mid-way resumes from its ``last.ckpt``), and a
  decision the pruner had not made yet for its last reported rung is made first. Without rungs it
  is failed and its parameters queued again (``enqueue_trial``), the new trial run in the old
  one's folder so that its run resumes there too;
- a trial killed while its parameters were being drawn was never launched: failed, not queued;
- a RUNNING trial of another host is left alone, and a live process of this host with the same
  worker name is refused (two sweeps must not share a name).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

log = logging.getLogger(__name__)

WORKER_ATTR = "sweep_worker"
STATUS_ATTR = "status"
FOLDER_ATTR = "folder"  # the trial folder number a trial's runs write into
LAUNCHED = "launched"
PROMOTED = "promoted"  # the pruner let the trial climb; its next rung is not launched yet


@dataclass
class Recovery:
    """What :func:`recover` found."""

    finished: int = 0
    """This worker's trials that have ended (they count against ``n_trials``)."""
    resumed: list[tuple[optuna.Trial, int]] = field(default_factory=list)
    """Trials of a rung sweep taken over, with the rung each goes on from."""
    rerun_folders: dict[str, int] = field(default_factory=dict)
    """Parameters queued again -> the folder number of the trial that was killed."""
    had_trials: bool = False
    """Whether this worker had any trial in the study (then a seeded sampler is reseeded)."""


def folder_of(trial: optuna.trial.FrozenTrial | optuna.Trial) -> int:
    """The folder number of ``trial``'s runs: its own number unless it re-runs a killed one."""
    return int(trial.user_attrs.get(FOLDER_ATTR, trial.number))


def params_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def recover(study: optuna.Study, worker: str, rungs: int | None) -> Recovery:
    """Take over this ``worker``'s trials left by a killed sweep (see the module docstring);
    ``rungs`` is the number of rungs of a rung sweep, None without."""
    found = Recovery()
    for trial in study.get_trials(deepcopy=False):
        if trial.user_attrs.get(WORKER_ATTR) != worker:
            continue
        found.had_trials = True
        status = trial.user_attrs.get(STATUS_ATTR)
        if trial.state != TrialState.RUNNING:
            if trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
                trial.state == TrialState.FAIL and status == "failed"
            ):
                found.finished += 1
            continue
        host, pid = trial.user_attrs.get("host"), trial.user_attrs.get("pid")
        if host != socket.gethostname():
            log.warning(
                "trial %d of worker %r is running on %s: left alone (if that sweep is dead, mark "
                "the trial failed with optuna's API)",
                trial.number,
                worker,
                host,
            )
            continue
        if pid is not None and _alive(int(pid)):
            raise RuntimeError(
                f"sweep worker name {worker!r} is in use by the live process {pid} (trial "
                f"{trial.number}); give every sweep process on a study its own "
                "hydra.sweeper.worker"
            )
        if rungs and trial.params and status is not None:
            _continue(study, trial, found, rungs)
            continue
        fixed = trial.system_attrs.get("fixed_params")
        if status is None and fixed and FOLDER_ATTR in trial.user_attrs:
            # a queued re-run killed before its parameters were drawn: queued once more
            study.tell(trial.number, state=TrialState.FAIL)
            study.enqueue_trial(fixed, user_attrs={FOLDER_ATTR: folder_of(trial)})
            found.rerun_folders[params_key(fixed)] = folder_of(trial)
            continue
        log.warning(
            "trial %d (%s) was left running by an earlier sweep: marked failed, its parameters "
            "will be run again",
            trial.number,
            trial.params,
        )
        study.tell(trial.number, state=TrialState.FAIL)
        if trial.params and status is not None:  # launched: its folder holds its run
            study.enqueue_trial(trial.params, user_attrs={FOLDER_ATTR: folder_of(trial)})
            found.rerun_folders[params_key(trial.params)] = folder_of(trial)
    return found


def _continue(
    study: optuna.Study, frozen: optuna.trial.FrozenTrial, found: Recovery, rungs: int
) -> None:
    """Take over a rung sweep's trial as the same Optuna trial, at the rung it was on."""
    # optuna.trial.Trial(study, trial_id) is how Optuna itself wraps a trial of a study; there is
    # no public call to take over a RUNNING trial from a dead process
    trial = optuna.trial.Trial(study, frozen._trial_id)
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    rung = len(frozen.intermediate_values)
    status = frozen.user_attrs.get(STATUS_ATTR)
    if rung >= rungs:  # killed after its last rung's value was reported, before it was told
        study.tell(trial, frozen.intermediate_values[max(frozen.intermediate_values)])
        found.finished += 1
        return
    if status not in (LAUNCHED, PROMOTED) and rung and _pruned_now(trial, frozen, rung, status):
        study.tell(trial, state=TrialState.PRUNED)
        found.finished += 1
        log.warning("trial %d was left between two rungs: pruned now", frozen.number)
        return
    log.warning(
        "trial %d (%s) was left running by an earlier sweep: it goes on at rung %d in its folder",
        frozen.number,
        frozen.params,
        rung,
    )
    found.resumed.append((trial, rung))


def _pruned_now(
    trial: optuna.Trial, frozen: optuna.trial.FrozenTrial, rung: int, status: str | None
) -> bool:
    """The decision for a trial killed after reporting ``rung`` (1-based count), before the sweep
    recorded the pruner's verdict."""
    if status != "ok":  # a diverged run does not climb
        return True
    # Optuna's successive halving marks a rung as decided (completed_rung_k) when it is asked;
    # asked again it would judge the next rung. Killed between the two, the verdict is lost:
    # the trial is pruned rather than promoted on a question it was never asked.
    if f"completed_rung_{rung - 1}" in frozen.system_attrs:
        return True
    return trial.should_prune()


def _alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
