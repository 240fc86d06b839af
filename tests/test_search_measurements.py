"""The two measurements the multi-fidelity search is judged by: how well short runs rank ω
(experiments/fidelity_ranking.py) and what the search costs against the paper's protocol
(benchmarks/search_cost.py), on known inputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(relative: str):
    spec = importlib.util.spec_from_file_location(Path(relative).stem, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ranking = load("experiments/fidelity_ranking.py")
cost = load("benchmarks/search_cost.py")


def test_a_cut_keeps_the_best_floor_n_over_eta_as_optunas_successive_halving_does():
    short = np.array([0.9, 0.1, 0.5, 0.7, 0.3])  # ranks: 0, 4, 2, 1, 3
    assert ranking.kept_by_cut(short, 2).tolist() == [True, False, False, True, False]  # ⌊5/2⌋
    assert ranking.kept_by_cut(short, 3).tolist() == [True, False, False, False, False]
    assert ranking.kept_by_cut(short[:1], 3).tolist() == [True]  # never fewer than one


def test_survival_and_regret_of_a_cut():
    short = np.array([0.9, 0.1, 0.5, 0.7, 0.3])
    full = np.array([0.80, 0.95, 0.70, 0.90, 0.60])  # best at full length: 1, 3, 0
    assert ranking.survives(short, full, 2, 3) == pytest.approx(2 / 3)  # 3 and 0 kept, 1 cut
    assert ranking.regret(short, full, 2) == pytest.approx(5.0)  # 95 best, 90 the best kept


def test_the_ranking_table_has_a_noise_ceiling_row_and_skips_runs_without_a_value():
    rows = []
    for omega in range(6):
        full = 0.5 + 0.05 * omega
        rows += [
            {"target_size": 10, "omega": omega, "fraction": 1.0, "seed": 1000, "val_acc": full},
            {"target_size": 10, "omega": omega, "fraction": 0.5, "val_acc": full - 0.1},  # old row
            {"target_size": 10, "omega": omega, "fraction": 1.0, "seed": 7, "val_acc": 1 - full},
        ]
    rows.append({"target_size": 10, "omega": 6, "fraction": 0.5, "val_acc": None})
    table = ranking.summarize(rows, [0.5, 1.0]).splitlines()
    assert table[2].startswith("| 10 | 0.5 | 6 | 1.00 ")  # the same order: ρ = 1
    assert table[3].startswith("| 10 | 1 at seed 7 (noise ceiling) | 6 | -1.00 ")
    assert len(table) == 4


def result(protocol: list[float], asha: list[float], reach: float | None) -> dict:
    seeds = range(len(protocol))
    return {
        "size": 10,
        "protocol_s": 3600.0,
        "protocol_all_s": 4000.0,
        "protocol_val": 0.8,
        "asha_s": 720.0,
        "asha_all_s": None,
        "asha_val": 0.79,
        "reach_s": reach,
        "retrained": {
            "protocol": dict(zip(seeds, protocol, strict=True)),
            "asha": dict(zip(seeds, asha, strict=True)),
        },
    }


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_the_cost_table_tells_a_difference_the_seeds_cannot_see_from_one_they_can():
    protocol = [70.0, 72.0, 74.0, 71.0, 73.0]
    same = [p + d for p, d in zip(protocol, [0.5, -0.5, 0.3, -0.2, 0.1], strict=True)]
    worse = [p - 3 + d for p, d in zip(protocol, [0.5, -0.5, 0.3, -0.2, 0.1], strict=True)]
    table = cost.report([result(protocol, same, 900.0), result(protocol, worse, None)], range(5))
    first, second = (cells(line) for line in table.splitlines()[2:])
    assert first[1] == "1.00 h (1.11 h), 0.8000" and first[2].startswith("0.20 h (not kept) (20%)")
    assert first[3] == "0.25 h = **25%** of the protocol"
    assert first[7:9] == ["yes", "yes (protocol mean ± 1.96)"]  # t_4 · 1.58 / √5
    assert second[3] == "not reached (20% spent in all)"
    assert second[6].startswith("-2.96 [") and second[7:9] == ["no", "no (protocol mean ± 1.96)"]


def test_the_cost_table_makes_no_interval_of_one_seed():
    table = cost.report([result([70.0], [71.0], 900.0)], range(1))
    assert cells(table.splitlines()[2])[7:9] == ["n/a (one seed)", "n/a (one seed)"]


def test_the_cpu_ledger_adds_every_invocation_of_a_resumed_search(tmp_path):
    entries = [
        {"search": "smooth_asha", "size": 10, "cpu_s": 100.0, "wall_s": 60.0},
        {"search": "smooth_asha", "size": 10, "cpu_s": 50.0, "wall_s": 30.0},  # resumed
        {"search": "smooth_tpe", "size": 10, "cpu_s": 999.0, "wall_s": 1.0},
    ]
    (tmp_path / "cpu_ledger.json").write_text(json.dumps(entries))
    assert cost.ledger_cpu(tmp_path, "smooth_asha", 10) == 150.0
    assert cost.ledger_cpu(tmp_path, "smooth_asha", 50) is None
    entries.append({"search": "smooth_tpe", "size": 50, "cpu_s": 5.0, "predates_ledger": True})
    (tmp_path / "cpu_ledger.json").write_text(json.dumps(entries))
    assert cost.ledger_cpu(tmp_path, "smooth_tpe", 50) is None  # its earlier sweep uncounted


def test_a_search_that_is_killed_still_adds_its_cpu_to_the_ledger(tmp_path, monkeypatch):
    def killed_sweep(*args):
        sum(i * i for i in range(2_000_000))  # CPU of this process, not a child's: 0 counted
        raise KeyboardInterrupt

    monkeypatch.setattr(cost, "run_search", killed_sweep)
    (tmp_path / "smooth_asha" / "n10" / "trial_0").mkdir(parents=True)
    (tmp_path / "smooth_asha" / "n10" / "trial_0" / "metrics.json").write_text("{}")
    with pytest.raises(KeyboardInterrupt):
        cost.search_with_ledger("smooth_asha", 10, 4, 1, tmp_path, "data")
    (entry,) = json.loads((tmp_path / "cpu_ledger.json").read_text())
    assert entry["search"] == "smooth_asha" and entry["size"] == 10
    assert entry["predates_ledger"] is True  # a run was there before the first entry
    assert cost.ledger_cpu(tmp_path, "smooth_asha", 10) is None


def test_committed_ranking_rows_are_read_back_and_a_different_omega_is_refused(tmp_path):
    omegas = [{"method.target_weight.t0": 0.1, "method.target_weight.tau": 0.5}]
    path = tmp_path / "runs.csv"
    path.write_text(
        "target_size,omega,t0,tau,fraction,total_steps,val_acc,test_acc,status\n"
        "10,0,0.1,0.5,0.125,300,0.75,0.72,ok\n"
        "10,0,0.1,0.5,1.0,2370,,,diverged\n"
    )
    rows = ranking.recorded_rows(path, omegas)
    assert set(rows) == {(10, 0, 0.125, 1000), (10, 0, 1.0, 1000)}  # seed: the search's
    assert rows[(10, 0, 0.125, 1000)]["val_acc"] == 0.75
    assert rows[(10, 0, 0.125, 1000)]["total_steps"] == 300
    assert rows[(10, 0, 1.0, 1000)]["val_acc"] is None
    with pytest.raises(ValueError, match="not the .* drawn now"):
        ranking.recorded_rows(
            path, [{"method.target_weight.t0": 0.2, "method.target_weight.tau": 0.5}]
        )


def test_sizes_finished_by_earlier_invocations_come_back_with_integer_seeds(tmp_path):
    saved = tmp_path / "results.json"
    saved.write_text(
        json.dumps({"10": {**result([70.0, 72.0], [71.0, 73.0], None), "seeds": [0, 1]}})
    )
    (loaded,) = cost.load_results(saved).values()
    assert loaded["retrained"]["asha"] == {0: 71.0, 1: 73.0}
    assert cells(cost.report([loaded], [7]).splitlines()[2])[6].startswith("+1.00 [")
