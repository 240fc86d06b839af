"""SMILE end to end: the paper's fine-grained protocol on a small CUB tree from a local weights file,
the 3-fold cross-validated search, and `make reproduce-smile` with its resumption."""

from __future__ import annotations

import json
import socket
import statistics
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import timm
import torch

from lightning_stl.run import compose_config, train
from tests.figure_pixels import AxesBox, colour_mask, read_rgb
from tests.test_fine_grained import build_cub
from tests.test_reproduce_table1 import read_runs, reproduce

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cub")
    build_cub(root, train=[6] * 8, test=[3] * 8)
    return root


@pytest.fixture(scope="module")
def imagenet_like_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A timm resnet10t state dict with a 1000-way `fc`, as timm's ImageNet files are."""
    path = tmp_path_factory.mktemp("weights") / "resnet10t_imagenet.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet10t", num_classes=1000).state_dict(), path)
    return path


def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def cub_overrides(weights: Path, *extra: str) -> list[str]:
    return [
        "+experiment=cub200_smile",
        "backbone.name=resnet10t",
        f"backbone.weights={weights}",
        "data.resize_size=40",
        "data.crop_size=32",
        "data.num_workers=0",
        "data.eval_batch_size=16",
        "data.target_batch_size=8",
        "steps.finetune=4",
        "trainer.enable_progress_bar=false",
        "callbacks=none",
        "logger=none",
        *extra,
    ]


def test_cub_protocol_from_a_local_imagenet_file(
    cub_root, imagenet_like_weights, tmp_path, monkeypatch
):
    _no_network(monkeypatch)
    cfg = compose_config(
        cub_overrides(imagenet_like_weights, "data.protocol=C:25%/N:8"), tmp_path / "run", cub_root
    )
    metrics = train(cfg)
    assert metrics["num_classes"] == 2  # 25% of 8 classes
    assert metrics["target_size"] == 8
    assert metrics["test_size"] == 6  # the chosen classes' test images only
    assert metrics["best_val_acc"] is None  # no validation: the final model is tested
    assert metrics["best_step"] == 4 and 0.0 <= metrics["test_acc"] <= 1.0
    state = torch.load(metrics["stages"][-1]["last_model_path"], weights_only=True)["state_dict"]
    assert state["source_head.weight"].shape == (1000, 512)  # the ImageNet classifier, auxiliary
    assert state["head.weight"].shape == (2, 512)
    # the run started from the file's weights: after 4 updates of decay 0.999 the mean teacher
    # is still within 1% of the distance the student moved from them
    saved = torch.load(imagenet_like_weights, map_location="cpu", weights_only=True)
    for key, value in saved.items():
        if not value.is_floating_point():
            continue
        student, teacher = (
            (f"source_head.{key[3:]}", f"teacher.classifier.{key[3:]}")
            if key.startswith("fc.")
            else (f"backbone.{key}", f"teacher.backbone.{key}")
        )
        moved = (state[student] - value).abs().max()
        assert (state[teacher] - value).abs().max() <= 0.01 * moved + 1e-6 * value.abs().max(), key


def test_places365_file_gives_a_365_way_auxiliary_head(cub_root, tmp_path, monkeypatch):
    """The official Places365 file: {'arch', 'epoch', 'state_dict': {'module.<key>': ...}}."""
    _no_network(monkeypatch)
    model = timm.create_model("resnet10t", num_classes=365)
    path = tmp_path / "resnet10t_places365.pth.tar"
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 90, "arch": "resnet10t", "state_dict": state}, path)
    cfg = compose_config(
        cub_overrides(path, "data.protocol=C:All/N:50%"), tmp_path / "run", cub_root
    )
    metrics = train(cfg)
    last = torch.load(metrics["stages"][-1]["last_model_path"], weights_only=True)["state_dict"]
    assert last["source_head.weight"].shape == (365, 512)
    assert metrics["num_classes"] == 8 and metrics["target_size"] == 24


def test_weights_of_another_backbone_name_the_keys(cub_root, imagenet_like_weights, tmp_path):
    cfg = compose_config(
        cub_overrides(imagenet_like_weights, "backbone.name=resnet18"), tmp_path / "run", cub_root
    )
    with pytest.raises(ValueError, match="does not fit backbone 'resnet18'.*(missing|unexpected)"):
        train(cfg)


def test_cross_validation_trains_every_fold_and_averages(cub_root, imagenet_like_weights, tmp_path):
    cfg = compose_config(
        cub_overrides(imagenet_like_weights, "data.cv_folds=3", "data.protocol=C:All/N:100%"),
        tmp_path / "run",
        cub_root,
    )
    summary = train(cfg)
    folds = [
        json.loads((tmp_path / "run" / f"fold{i}" / "metrics.json").read_text()) for i in range(3)
    ]
    assert [f["cv_fold"] for f in folds] == [0, 1, 2]
    assert all(f["val_size"] == 16 and f["target_size"] == 32 for f in folds)
    assert summary["objective"] == pytest.approx(sum(f["best_val_acc"] for f in folds) / 3)
    assert json.loads((tmp_path / "run" / "cv.json").read_text())["fold_objectives"] == [
        f["best_val_acc"] for f in folds
    ]


def test_smile_cv_search_config(make_cfg):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["+experiment=digits_smile", "hparams_search=smile_cv"],
            return_hydra_config=True,
        )
    params = cfg.hydra.sweeper.params
    assert params["method.module.feature_mixup_weight"] == "tag(log, interval(0.01, 0.1))"
    assert params["method.module.label_mixup_weight"] == "tag(log, interval(0.01, 0.1))"
    assert cfg.data.cv_folds == 3 and cfg.data.cv_fold is None and cfg.method.name == "smile"


def test_reproduce_smile_writes_table_and_chart_and_resumes(tmp_path, data_dir):
    out = tmp_path / "results"
    reproduce("reproduce_smile.py", tmp_path, data_dir)
    table = (out / "table.md").read_text()
    assert "| Method | N=30 |" in table
    runs = read_runs(out)  # each row is the result its run folder holds
    assert sorted({r["method"] for r in runs}) == ["finetune_l2", "smile"] and len(runs) == 4

    # one row per method (the profile's order): mean ± std (%) over the seeds, recomputed here;
    # the best mean of the column (ties included) in bold
    methods = {"finetune_l2": "L²", "smile": "SMILE"}
    stats, bold = {}, {}
    for method, label in methods.items():
        (row,) = [line for line in table.splitlines() if line.startswith(f"| {label} |")]
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        assert len(cells) == 2
        accs = [100 * float(r["test_acc"]) for r in runs if r["method"] == method]
        stats[method] = (statistics.mean(accs), statistics.stdev(accs))
        bold[method] = cells[1].startswith("**") and cells[1].endswith("**")
        shown = [float(v) for v in cells[1].strip("*").split("±")]
        assert np.allclose(shown, stats[method], rtol=0, atol=0.005 + 1e-9), (row, accs)
    best = max(mean for mean, _ in stats.values())
    assert bold == {m: mean >= best - 1e-9 for m, (mean, _) in stats.items()}, (stats, table)

    # the chart: one bar per method, left to right in the table's order, in tab10's colours, as
    # high as its mean (the y axis from 5 below the lowest mean - std to 100), with a black
    # error bar at its centre from mean - std to mean + std (to within the line widths)
    rgb = read_rgb(out / "bars.png")
    box = AxesBox.find(rgb)
    ylim = (max(0.0, min(mean - std for mean, std in stats.values()) - 5), 100)
    dark = (np.ptp(rgb, axis=-1) < 0.08) & (rgb.max(axis=-1) < 0.35)
    inner = slice(int(box.top) + 3, int(box.bottom) - 2)  # between the spines
    lefts = []
    for i, (mean, std) in enumerate(stats.values()):
        rows, cols = np.nonzero(box.inside(colour_mask(rgb, matplotlib.colormaps["tab10"](i))))
        assert abs(rows.min() - box.row(mean, ylim)) <= 1.5, (i, mean)
        centre = int(round((cols.min() + cols.max()) / 2))
        whisker = np.nonzero(dark[inner, centre - 1 : centre + 2].any(axis=1))[0] + inner.start
        assert abs(whisker.min() - box.row(mean + std, ylim)) <= 2.5, (i, mean, std)
        assert abs(whisker.max() - box.row(mean - std, ylim)) <= 2.5, (i, mean, std)
        lefts.append(cols.min())
    assert lefts == sorted(lefts)
    pretrained = list((tmp_path / "work" / "pretrained").glob("*/checkpoints/source/last.ckpt"))
    assert len(pretrained) == 1  # one source pre-training shared by every run
    stamps = {p: p.stat().st_mtime for p in tmp_path.rglob("*.ckpt")}

    reproduce("reproduce_smile.py", tmp_path, data_dir)
    assert {p: p.stat().st_mtime for p in tmp_path.rglob("*.ckpt")} == stamps  # nothing redone


def test_rerunning_some_methods_keeps_the_other_rows_of_the_table(tmp_path, monkeypatch):
    """`reproduce_smile.py --methods regsl` runs that row only: the table keeps the other
    methods' runs of the profile's settings and seeds from the runs.csv already written."""
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import reproduce_smile

    path = tmp_path / "runs.csv"
    header = "method,setting,seed,target_size,test_acc,best_val_acc,best_step,total_steps,"
    path.write_text(
        header + "wall_time_s,run_dir\n"
        "mixup,N=10,0,10,0.75,0.8,110,600,20.5,outputs/smile/mixup/N_10/seed0\n"
        "mixup,N=10,1,10,0.85,0.9,120,600,21.5,outputs/smile/mixup/N_10/seed1\n"
        "regsl,N=10,0,10,0.10,0.1,10,600,22.5,outputs/smile/regsl/N_10/seed0\n"
        "dropped,N=10,0,10,0.99,0.99,10,600,1.0,outputs/smile/dropped/N_10/seed0\n"
        "mixup,N=99,0,99,0.99,0.99,10,600,1.0,outputs/smile/mixup/N_99/seed0\n"
        "mixup,N=10,7,10,0.99,0.99,10,600,1.0,outputs/smile/mixup/N_10/seed7\n"
    )
    kept = reproduce_smile.previous_rows(
        path, ["mixup", "regsl"], exclude=["regsl"], settings=["N=10"], seeds=[0, 1]
    )
    assert [(r["method"], r["seed"], r["test_acc"], r["best_step"]) for r in kept] == [
        ("mixup", 0, 0.75, 110),
        ("mixup", 1, 0.85, 120),
    ]
    assert kept[0]["run_dir"] == str(ROOT / "outputs/smile/mixup/N_10/seed0")
    new = {**kept[0], "method": "regsl", "test_acc": 0.5}
    markdown, _, stats = reproduce_smile.summarize([*kept, new], ["mixup", "regsl"], ["N=10"])
    assert stats["mixup", "N=10"][:2] == pytest.approx((80.0, 7.0710678))
    assert stats["regsl", "N=10"][0] == pytest.approx(50.0)
    assert "| **80.00 ± 7.07** |" in markdown and "| 50.00 ± 0.00 |" in markdown
    assert reproduce_smile.previous_rows(tmp_path / "absent.csv", ["mixup"], []) == []
    assert len(reproduce_smile.previous_rows(path, ["mixup"], [])) == 4  # no filter: every row


def test_a_finished_cell_of_other_settings_is_refused_not_reused(tmp_path, data_dir, monkeypatch):
    """A run folder whose metrics.json was made with other overrides (e.g. before a profile's
    method_overrides changed) stops the driver with the folder and the settings that differ."""
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import reproduce_table1

    run_dir = tmp_path / "cell"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({"test_acc": 0.5}))
    base = ["+experiment=digits_smile", "method=l2sp"]
    assert reproduce_table1.train_cell(base, str(run_dir), str(data_dir)) == {"test_acc": 0.5}
    changed = [*base, "++method.regularizer_options.l2sp.alpha=0.001"]
    with pytest.raises(ValueError, match=r"cell holds a run with other settings of method"):
        reproduce_table1.train_cell(changed, str(run_dir), str(data_dir))

    class Refused:
        def result(self):
            return reproduce_table1.train_cell(changed, str(run_dir), str(data_dir))

    with pytest.raises(SystemExit, match=r"^error: .*other settings of method"):
        reproduce_table1.cell_result(Refused())


def test_method_overrides_must_name_methods_of_the_profile(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import reproduce_smile

    profiles = {
        "x": {
            "typo": {"methods": ["l2sp"], "method_overrides": {"l2_sp": ["a=1"]}},
            "string": {"methods": ["l2sp"], "method_overrides": {"l2sp": "a=1"}},
        }
    }
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "smile_profiles.yaml").write_text(json.dumps(profiles))
    monkeypatch.setattr(reproduce_smile, "ROOT", tmp_path)
    with pytest.raises(SystemExit, match=r"method_overrides of \['l2_sp'\] name no method"):
        reproduce_smile.load_profile("x", "typo")
    with pytest.raises(SystemExit, match=r"method_overrides.l2sp='a=1' is not allowed"):
        reproduce_smile.load_profile("x", "string")
