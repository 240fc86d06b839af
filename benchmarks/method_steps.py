"""Step time of every fine-tuning method relative to plain fine-tuning, on one model and one batch.

Each method is built exactly as a run builds it (``+experiment=digits_smile method=<name>``: the
cached source pre-training, the regularisers' ``setup``), then timed on the same target batch:
``training_loss`` + backward + SGD step (+ the method's callbacks' per-step work, such as SMILE's
mean-teacher update or RegSL's projection, called as Lightning would). Methods are interleaved
step by step and the table gives median ms/step and the ratio to ``finetune_l2``.

    python benchmarks/method_steps.py --steps 50 --repeats 3
    python benchmarks/method_steps.py --methods finetune_l2 smile delta --batch 96
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from lightning_stl.method_module import build_module
from lightning_stl.run import compose_config
from lightning_stl.schedule import TARGET

DEFAULT_METHODS = ["finetune_l2", "mixup", "smile", "smile_official"]


def build(method: str, work: Path, data_dir: Path, batch: int):
    """(module, optimiser, per-step callbacks, a preprocessed target batch) for ``method``."""
    import hydra

    cfg = compose_config(
        [
            "+experiment=digits_smile",
            f"method={method}",
            f"data.target_batch_size={batch}",
            f"data.target_size={max(batch, 50)}",
            f"pretraining.cache_dir={work / 'pretrained'}",
            "pretraining.epochs=3",
        ],
        work / method,
        data_dir,
    )
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    torch.manual_seed(0)
    module = build_module(cfg, datamodule)  # may pre-train on the source first (cached)
    datamodule.configure_training([TARGET], TARGET)
    module.train()
    optimizer = torch.optim.SGD(module.student_parameters(), lr=0.01, momentum=0.9)
    callbacks = [
        hydra.utils.instantiate(c) for c in (cfg.method.get("callbacks") or {}).values() if c
    ]
    images, labels = next(iter(datamodule.train_dataloader()))[0][TARGET]
    x = datamodule.preprocess(TARGET, images, train=True)
    return module, optimizer, callbacks, (x, labels)


def one_step(module, optimizer, callbacks, batch, trainer) -> float:
    x, y = batch
    start = time.perf_counter()
    loss, _ = module.training_loss(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    trainer.global_step += 1
    for callback in callbacks:
        callback.on_train_batch_end(trainer, module, None, batch, 0)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--data", type=Path, default=Path("data"))
    args = parser.parse_args()
    methods = list(dict.fromkeys(["finetune_l2", *args.methods]))
    with tempfile.TemporaryDirectory() as tmp:
        built = {m: build(m, Path(tmp), args.data, args.batch) for m in methods}
        trainers = {
            m: SimpleNamespace(
                global_step=0, training=True, estimated_stepping_batches=10**6, current_epoch=0
            )
            for m in methods
        }
        for method, (module, optimizer, callbacks, batch) in built.items():
            for cb in callbacks:  # the hooks Lightning calls before the first step
                cb.setup(trainers[method], module, "fit")
                cb.on_fit_start(trainers[method], module)
            for _ in range(3):  # warm-up
                one_step(module, optimizer, callbacks, batch, trainers[method])
        times: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(args.repeats):
            for _ in range(args.steps):
                for method in methods:
                    times[method].append(one_step(*built[method], trainers[method]))
    base = statistics.median(times["finetune_l2"])
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; digits_cnn, batch "
        f"{args.batch} of 1x8x8; {args.repeats} x {args.steps} interleaved steps per method"
    )
    print(f"{'method':<18} {'ms/step':>9} {'ratio':>7}")
    for method in methods:
        median = statistics.median(times[method])
        print(f"{method:<18} {1000 * median:9.2f} {median / base:7.2f}")


if __name__ == "__main__":
    main()
