"""optuna-dashboard reads the study a sweep wrote: its server on a loopback port, its HTTP API."""

from __future__ import annotations

import json
import threading
import urllib.request
from wsgiref.simple_server import WSGIRequestHandler, make_server

from tests.test_sweeps import load, sweep_args


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # no request lines in the test output
        pass


def test_the_dashboard_serves_the_trials_of_a_sweep(tmp_path, run_cli):
    import optuna_dashboard

    storage = f"sqlite:///{tmp_path}/study.db"
    sweep = run_cli(
        *sweep_args(
            tmp_path,
            f"hydra.sweeper.storage={storage}",
            "hydra.sweeper.study_name=watched",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=1",
        )
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    server = make_server("127.0.0.1", 0, optuna_dashboard.wsgi(storage), handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        with urllib.request.urlopen(f"{base}/api/studies", timeout=30) as response:
            studies = json.load(response)["study_summaries"]
        (summary,) = [s for s in studies if s["study_name"] == "watched"]
        with urllib.request.urlopen(f"{base}/api/studies/{summary['study_id']}", timeout=30) as r:
            detail = json.load(r)
    finally:
        server.shutdown()
        thread.join(timeout=10)
    study = load(storage, "watched")
    served = {t["number"]: t for t in detail["trials"]}
    assert sorted(served) == [t.number for t in study.trials] == [0, 1]
    for trial in study.trials:
        got = served[trial.number]
        assert got["state"].lower() == trial.state.name.lower()
        assert got["values"] == trial.values
        params = {p["name"]: float(p["param_internal_value"]) for p in got["params"]}
        internal = {
            name: trial.distributions[name].to_internal_repr(value)
            for name, value in trial.params.items()
        }
        assert params == internal
