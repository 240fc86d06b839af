"""The fine-grained SMILE targets read from small trees in each official layout, and the
DataModule on them (per-image transforms in workers, protocols, no validation, CV folds)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
import torch
from omegaconf import OmegaConf
from PIL import Image

from lightning_stl.data import (
    DATASETS,
    DatasetNotFoundError,
    FileImageSet,
    SourceTargetDataModule,
    load_cub200,
    load_fgvc_aircraft,
    load_food101,
    load_mit_indoor67,
    load_stanford_cars,
)
from lightning_stl.data.file_image_set import IMAGENET_MEAN, IMAGENET_STD
from tests.conftest import CONF_DIR

# Images are 52 wide x 44 high, so Resize((40, 40)) really resizes (and squashes) them.
IMAGE_SIZE = (52, 44)
RESIZE, CROP = 40, 32
# Expected samples of a tree: split -> [(path relative to the data set folder, class name)]
Expected = dict[str, list[tuple[str, str]]]


def write_image(path: Path, class_index: int, seed: int) -> None:
    """A JPEG with a colour of its own class plus a noise pattern of its own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = np.array(
        [(53 * class_index) % 256, (97 * class_index + 40) % 256, 200 - 20 * class_index]
    )
    noise = rng.integers(-40, 41, size=(IMAGE_SIZE[1], IMAGE_SIZE[0], 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=95)


def per_class(counts: list[int]) -> list[int]:
    """Class index of each image, ``counts[c]`` images of class c, classes interleaved."""
    return sorted((c for c, n in enumerate(counts) for _ in range(n)), key=lambda c: (c * 7) % 5)


def build_cub(root: Path, train: list[int], test: list[int]) -> Expected:
    folder = root / "CUB_200_2011"
    names = [f"{c + 1:03d}.Bird_{chr(65 + c)}" for c in range(len(train))]
    rows, expected = [], {"train": [], "test": []}
    for split, counts in (("train", train), ("test", test)):
        for k, c in enumerate(per_class(counts)):
            rel = f"{names[c]}/{names[c].split('.')[1]}_{split}_{k:04d}.jpg"
            rows.append((rel, c, split))
    order = np.random.default_rng(0).permutation(len(rows))  # train and test ids interleaved
    lines = {"images": [], "labels": [], "split": []}
    for image_id, r in enumerate(order, start=1):
        rel, c, split = rows[r]
        write_image(folder / "images" / rel, c, image_id)
        lines["images"].append(f"{image_id} {rel}")
        lines["labels"].append(f"{image_id} {c + 1}")
        lines["split"].append(f"{image_id} {int(split == 'train')}")
        expected[split].append((f"images/{rel}", names[c]))
    (folder / "images.txt").write_text("\n".join(lines["images"]) + "\n")
    (folder / "image_class_labels.txt").write_text("\n".join(lines["labels"]) + "\n")
    (folder / "train_test_split.txt").write_text("\n".join(lines["split"]) + "\n")
    classes = "\n".join(f"{c + 1} {n}" for c, n in enumerate(names))
    (folder / "classes.txt").write_text(classes + "\n")
    return expected


def build_cars(root: Path, train: list[int], test: list[int]) -> Expected:
    folder = root / "stanford_cars"
    (folder / "devkit").mkdir(parents=True)
    names = [f"Make{c} Model {2000 + c}" for c in range(len(train))]
    class_names = np.empty((1, len(names)), dtype=object)
    class_names[0, :] = names
    sio.savemat(folder / "devkit" / "cars_meta.mat", {"class_names": class_names})
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    expected: Expected = {}
    for split, counts, mat in (
        ("train", train, folder / "devkit" / "cars_train_annos.mat"),
        ("test", test, folder / "cars_test_annos_withlabels.mat"),
    ):
        labels = per_class(counts)
        annotations = np.zeros((1, len(labels)), dtype=[(f, "O") for f in fields])
        expected[split] = []
        for k, c in enumerate(labels):
            fname = f"{k + 1:05d}.jpg"
            write_image(folder / f"cars_{split}" / fname, c, 1000 * (split == "test") + k)
            annotations[0, k] = (1, 1, 40, 30, np.uint16(c + 1), fname)
            expected[split].append((f"cars_{split}/{fname}", names[c]))
        sio.savemat(mat, {"annotations": annotations})
    return expected


def build_aircraft(root: Path, train: list[int], test: list[int]) -> Expected:
    data = root / "fgvc-aircraft-2013b" / "data"
    names = [f"7{c}7-200" if c % 2 else f"F-{c}A/B Mk {c}" for c in range(len(train))]
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(names) + "\n")
    expected: Expected = {}
    for split, counts in (("trainval", train), ("test", test)):
        lines, key = [], "train" if split == "trainval" else "test"
        expected[key] = []
        for k, c in enumerate(per_class(counts)):
            image_id = f"{(split == 'test') * 5000000 + 1000000 + k:07d}"
            write_image(data / "images" / f"{image_id}.jpg", c, int(image_id))
            lines.append(f"{image_id} {names[c]}")
            expected[key].append((f"data/images/{image_id}.jpg", names[c]))
        (data / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    return expected


def build_indoor(root: Path, train: list[int], test: list[int]) -> Expected:
    folder = root / "mit_indoor67"
    names = sorted(["kitchen", "airport_inside", "bar", "winecellar", "studiomusic", "gym"])
    names = sorted(names[: len(train)])
    expected: Expected = {}
    for split, counts, file in (
        ("train", train, "TrainImages.txt"),
        ("test", test, "TestImages.txt"),
    ):
        lines = []
        expected[split] = []
        for k, c in enumerate(per_class(counts)):
            rel = f"{names[c]}/{split}_{k}.jpg"
            write_image(folder / "Images" / rel, c, 3000 * (split == "test") + k)
            lines.append(rel)
            expected[split].append((f"Images/{rel}", names[c]))
        (folder / file).write_text("\r\n".join(lines) + "\r\n")  # the official lists use CRLF
    return expected


def build_food(root: Path, train: list[int], test: list[int]) -> Expected:
    folder = root / "food-101"
    names = ["apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio", "beignets", "bibimbap"]
    names = names[: len(train)]
    (folder / "meta").mkdir(parents=True)
    (folder / "meta" / "classes.txt").write_text("\n".join(names) + "\n")
    expected: Expected = {}
    for split, counts in (("train", train), ("test", test)):
        meta: dict[str, list[str]] = {name: [] for name in names}
        for k, c in enumerate(per_class(counts)):
            rel = f"{names[c]}/{100000 * (split == 'test') + k}"
            write_image(folder / "images" / f"{rel}.jpg", c, 7000 * (split == "test") + k)
            meta[names[c]].append(rel)
        (folder / "meta" / f"{split}.json").write_text(json.dumps(meta))
        # torchvision lists the images class by class
        expected[split] = [(f"images/{rel}.jpg", n) for n in meta for rel in meta[n]]
    return expected


Builder = Callable[[Path, list[int], list[int]], Expected]
LAYOUTS: dict[str, tuple[Builder, Callable, str]] = {
    "cub200": (build_cub, load_cub200, "CUB_200_2011"),
    "stanford_cars": (build_cars, load_stanford_cars, "stanford_cars"),
    "fgvc_aircraft": (build_aircraft, load_fgvc_aircraft, "fgvc-aircraft-2013b"),
    "mit_indoor67": (build_indoor, load_mit_indoor67, "mit_indoor67"),
    "food101": (build_food, load_food101, "food-101"),
}
TRAIN, TEST = [5, 3, 4, 6], [2, 3, 1, 2]


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Expected]]:
    """One small tree per layout: 4 classes, 18 training and 8 test images."""
    out = {}
    for name, (build, _, _) in LAYOUTS.items():
        root = tmp_path_factory.mktemp(name)
        out[name] = (root, build(root, TRAIN, TEST))
    return out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_loaders_read_the_official_splits(name, trees):
    build, load, folder = LAYOUTS[name]
    root, expected = trees[name]
    splits = load(root)
    assert set(splits) == {"train", "test"}
    for split, data in splits.items():
        assert isinstance(data, FileImageSet) and data.num_classes == 4 and len(data.classes) == 4
        assert len(data) == len(expected[split]) == sum(TRAIN if split == "train" else TEST)
        got = sorted(
            (str(data.path(i).relative_to(root / folder)), data.classes[int(data.labels[i])])
            for i in range(len(data))
        )
        assert got == sorted(expected[split])
        assert all(data.path(i).is_file() for i in range(len(data)))
    assert splits["train"].classes == splits["test"].classes
    counts = Counter(splits["train"].labels.tolist())
    names = sorted({n for _, n in expected["train"]}, key=splits["train"].classes.index)
    assert [counts[i] for i in range(4)] == [
        sum(n == names[i] for _, n in expected["train"]) for i in range(4)
    ]


def test_cub_labels_follow_the_class_ids(trees):
    root, _ = trees["cub200"]
    train = load_cub200(root)["train"]
    assert train.classes == ("001.Bird_A", "002.Bird_B", "003.Bird_C", "004.Bird_D")
    assert Counter(train.labels.tolist()) == {0: 5, 1: 3, 2: 4, 3: 6}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_absent_data_names_the_folder_and_files(name, tmp_path):
    _, load, folder = LAYOUTS[name]
    with pytest.raises(DatasetNotFoundError) as info:
        load(tmp_path)
    message = str(info.value)
    assert str((tmp_path / folder).resolve()) in message and f"'{name}'" in message
    for file in info.value.expected:
        assert file in message
    if name in ("fgvc_aircraft", "food101"):
        assert "data.download=true" in message
    else:
        assert "cannot be downloaded automatically" in message and "https://" in message
        assert "data.download=true" not in message


@pytest.mark.parametrize(
    ("name", "missing"),
    [
        ("cub200", "train_test_split.txt"),
        ("stanford_cars", "cars_test_annos_withlabels.mat"),
        ("fgvc_aircraft", "data/images_variant_test.txt"),
        ("mit_indoor67", "TestImages.txt"),
        ("food101", "meta/test.json"),
    ],
)
def test_a_missing_annotation_file_is_marked(name, missing, tmp_path):
    build, load, folder = LAYOUTS[name]
    build(tmp_path, [1, 1], [1, 1])
    (tmp_path / folder / missing).unlink()
    with pytest.raises(DatasetNotFoundError, match=rf"{missing} \(missing\)"):
        load(tmp_path)


def test_a_failed_download_is_reported(tmp_path, monkeypatch):
    import torchvision.datasets.fgvc_aircraft as tv_aircraft

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(tv_aircraft, "download_and_extract_archive", offline)
    with pytest.raises(DatasetNotFoundError, match="the download failed: OSError: network"):
        load_fgvc_aircraft(tmp_path, download=True)


def test_registry_entries():
    for name, (num_classes, train_size) in {
        "cub200": (200, 5994),
        "stanford_cars": (196, 8144),
        "fgvc_aircraft": (100, 6667),
        "mit_indoor67": (67, 5360),
        "food101": (101, 75750),
    }.items():
        spec = DATASETS[name]
        assert (spec.num_classes, spec.train_size, spec.val_size) == (num_classes, train_size, 0)
        assert spec.files and not spec.cache


# --------------------------------------------------------------------------------------------
# The DataModule on file-based sets
# --------------------------------------------------------------------------------------------


def file_dm(root: Path, target: str = "cub200", **kwargs) -> SourceTargetDataModule:
    options = {
        "target": target,
        "source": None,
        "root": root,
        "val_size": 0,
        "resize_size": RESIZE,
        "crop_size": CROP,
        "target_batch_size": 4,
        "eval_batch_size": 5,
        **kwargs,
    }
    dm = SourceTargetDataModule(**options)
    dm.setup("fit")
    dm.configure_training(["target"], "target")
    return dm


def reference_test_image(path: Path) -> np.ndarray:
    """Resize((40, 40)) -> CenterCrop(32) -> ToTensor -> Normalize, by hand with PIL and NumPy."""
    with Image.open(path) as image:
        resized = image.convert("RGB").resize((RESIZE, RESIZE), Image.BILINEAR)
    x = np.asarray(resized, dtype=np.float32) / 255
    top = int(round((RESIZE - CROP) / 2))
    x = x[top : top + CROP, top : top + CROP]
    x = (x - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    return x.transpose(2, 0, 1)


def test_datamodule_decodes_and_normalises_in_workers(trees):
    root, _ = trees["mit_indoor67"]
    dm = file_dm(root, "mit_indoor67", num_workers=2, protocol="100%")
    assert dm.num_target_classes == 4 and not dm.has_validation
    assert dm.describe()["num_classes"] == 4 and dm.describe()["protocol"] == "100%"
    test_loader = dm.test_dataloader()
    assert test_loader.num_workers == 2 and test_loader.persistent_workers
    x, y = next(iter(test_loader))
    assert x.dtype == torch.float32 and x.shape == (5, 3, CROP, CROP) and y.dtype == torch.int64
    for i in range(5):
        np.testing.assert_allclose(
            x[i].numpy(), reference_test_image(dm.test_set.path(i)), atol=1e-5
        )
        assert int(y[i]) == int(dm.test_set.labels[i])
    assert dm.preprocess("target", x, train=False) is x  # normalised in the workers already
    batch, _, _ = next(iter(dm.train_dataloader()))
    assert set(batch) == {"target"}
    xt, yt = batch["target"]
    assert xt.shape == (4, 3, CROP, CROP) and xt.dtype == torch.float32 and yt.dtype == torch.int64
    assert float(xt.min()) < 0 < float(xt.max())
    assert dm.steps_per_epoch() == -(-18 // 4)
    with pytest.raises(RuntimeError, match="no validation split.*limit_val_batches=0"):
        dm.val_dataloader()


def reference_keep_aspect_test_image(path: Path) -> np.ndarray:
    """The authors' ``transform_test`` with ``keep_aspect`` by hand: the shorter side to 40 (the
    longer one scaled by the same factor, truncated), then the central 32 x 32."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        width, height = rgb.size
        if width <= height:
            size = (RESIZE, int(RESIZE * height / width))
        else:
            size = (int(RESIZE * width / height), RESIZE)
        resized = rgb.resize(size, Image.BILINEAR)
    x = np.asarray(resized, dtype=np.float32) / 255
    top = int(round((size[1] - CROP) / 2))
    left = int(round((size[0] - CROP) / 2))
    x = x[top : top + CROP, left : left + CROP]
    x = (x - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    return x.transpose(2, 0, 1)


def test_keep_aspect_resizes_the_shorter_side_as_the_authors_code_does(trees):
    root, _ = trees["cub200"]
    assert IMAGE_SIZE[0] != IMAGE_SIZE[1]  # a square image would not tell the two apart
    dm = file_dm(root, "cub200", keep_aspect=True)
    square = file_dm(root, "cub200")
    x, _ = next(iter(dm.test_dataloader()))
    x_square, _ = next(iter(square.test_dataloader()))
    for i in range(len(x)):
        np.testing.assert_allclose(
            x[i].numpy(), reference_keep_aspect_test_image(dm.test_set.path(i)), atol=1e-5
        )
    assert float((x - x_square).abs().max()) > 0.1
    batch, _, _ = next(iter(dm.train_dataloader()))
    assert batch["target"][0].shape == (4, 3, CROP, CROP)
    with pytest.raises(ValueError, match=r"data.keep_aspect='yes' is not allowed.*true or false"):
        file_dm(root, "cub200", keep_aspect="yes")


def class_of(data: FileImageSet, root: Path) -> list[str]:
    """The original class name of each image, from its folder (the CUB layout)."""
    return [data.path(i).parent.name for i in range(len(data))]


@pytest.fixture(scope="module")
def cub8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CUB layout with 8 classes of 6 training and 2 test images: C:25% keeps 2 classes."""
    root = tmp_path_factory.mktemp("cub8")
    build_cub(root, [6] * 8, [2] * 8)
    return root


def test_class_protocol_restricts_both_splits_and_remaps_labels(cub8):
    dm = file_dm(cub8, protocol="C:25%/N:10", subset_seed=3)
    train, test = dm.train_sets["target"], dm.test_set
    assert dm.num_target_classes == 2 == train.num_classes == test.num_classes
    kept = dm.target_class_ids.tolist()
    assert len(kept) == 2 and dm.describe()["target_class_ids"] == kept
    assert len(train) == 10 and Counter(train.labels.tolist()) == {0: 5, 1: 5}
    assert len(test) == 4 and Counter(test.labels.tolist()) == {0: 2, 1: 2}
    names = [f"{c + 1:03d}.Bird_{chr(65 + c)}" for c in kept]
    assert train.classes == test.classes == tuple(names)
    for data in (train, test):  # image of original class c -> new label = position of c
        assert [names[int(label)] for label in data.labels] == class_of(data, cub8)
    other = file_dm(cub8, protocol="C:25%/N:10", subset_seed=4)
    same = file_dm(cub8, protocol="C:25%/N:10", subset_seed=3)
    assert list(same.train_sets["target"].files) == list(train.files)
    assert other.target_class_ids.tolist() != kept


def test_too_large_n_names_the_numbers(cub8):
    with pytest.raises(
        ValueError, match=r"N=13 training images, but the 2 chosen classes .* only 12"
    ):
        file_dm(cub8, protocol="C:25%/N:13")


def test_cv_folds_partition_the_drawn_training_set(cub8):
    drawn = file_dm(cub8, protocol="C:All/N:50%", subset_seed=1).train_sets["target"]
    assert len(drawn) == 24 and set(Counter(drawn.labels.tolist()).values()) == {3}
    seen_val: list[str] = []
    for fold in range(3):
        dm = file_dm(cub8, protocol="C:All/N:50%", subset_seed=1, cv_folds=3, cv_fold=fold)
        assert dm.has_validation
        train, val = set(dm.train_sets["target"].files), list(dm.val_set.files)
        assert not train & set(val) and train | set(val) == set(drawn.files)
        assert Counter(dm.val_set.labels.tolist()) == {c: 1 for c in range(8)}  # stratified
        assert dm.describe()["cv_fold"] == fold and dm.describe()["cv_folds"] == 3
        assert len(dm.val_dataloader().dataset) == 8
        seen_val += val
    assert sorted(seen_val) == sorted(drawn.files)  # the folds are disjoint and cover the set


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_data_configs_instantiate(name, trees):
    from hydra.utils import instantiate

    root, _ = trees[name]
    cfg = OmegaConf.create(
        {
            "seed": 0,
            "paths": {"data_dir": str(root)},
            "data": OmegaConf.load(f"{CONF_DIR}/data/{name}.yaml"),
        }
    )
    assert cfg.data.target == name and cfg.data.source is None and cfg.data.val_size == 0
    assert (cfg.data.target_batch_size, cfg.data.resize_size, cfg.data.crop_size) == (48, 256, 224)
    assert cfg.data.keep_aspect is False  # the paper's 256 x 256 (the profiles set CUB's)
    dm = instantiate(cfg.data, _convert_="all")
    expected = "100%" if name in ("food101", "mit_indoor67") else "C:All/N:100%"
    assert dm.protocol.name == expected and dm.num_target_classes == DATASETS[name].num_classes
    assert not dm.has_validation and dm.num_workers == 8
