"""Lightning's Smooth Transfer training step against a hand-written PyTorch loop.

Both train the same model (same initial weights) on the same data with the same math: the
embedded digits pair as ``python -m lightning_stl.run`` sets it up, sub-batches of 128 + 128, Eq. 3
with λ_ω(t) of Eq. 4, momentum SGD with warm-up and cosine annealing. Lightning runs as the default
run configures it (CSV logger, λ(t) callback, learning-rate monitor), without validation and
checkpointing, which the hand loop does not do either. The hand loop also reports the share of its
time spent getting and preprocessing batches.

    python benchmarks/training_step.py [--steps 400] [--repeats 3]

Prints the seconds per step of each, their ratio (goal: Lightning / hand-written <= 1.10) and the
data share. Rounds alternate between the two so that machine load affects both alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger

from lightning_stl.data import SourceTargetDataModule
from lightning_stl.methods import SmoothTransfer, smooth_transfer_loss
from lightning_stl.schedule import SigmoidTargetWeight, TargetWeightScheduler

ROOT = Path(__file__).resolve().parents[1]


def make_data(root: Path) -> SourceTargetDataModule:
    data = SourceTargetDataModule(
        target="digits", source="rendered_digits", root=root, target_size=50
    )
    data.prepare_data()
    data.setup("fit")
    return data


def make_module(seed: int) -> SmoothTransfer:
    torch.manual_seed(seed)
    return SmoothTransfer(backbone="digits_cnn", in_chans=1)


SKIP = 20  # steps left out of the timing (start-up of each loop)


class StepTimer(L.Callback):
    """Wall time from the start of step SKIP + 1 to the end of the last step."""

    def __init__(self) -> None:
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == SKIP:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()


def lightning_steps(data: SourceTargetDataModule, steps: int, out: Path) -> float:
    """Seconds per step of ``Trainer.fit``, steps SKIP + 1 to the last."""
    module = make_module(0)
    schedule = SigmoidTargetWeight(t0=0.0, tau=0.05, alpha=0.0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=CSVLogger(out, name="bench"),
        log_every_n_steps=50,
        callbacks=[
            TargetWeightScheduler(schedule),
            LearningRateMonitor("step"),
            timer := StepTimer(),
        ],
    )
    trainer.fit(module, datamodule=data)
    return (timer.end - timer.start) / (steps - SKIP)


def hand_written_steps(data: SourceTargetDataModule, steps: int) -> tuple[float, float]:
    """Seconds per step of a plain PyTorch loop, and the share spent on data."""
    module = make_module(0)
    model = module.model.train()
    schedule = SigmoidTargetWeight(t0=0.0, tau=0.05, alpha=0.0)
    built = module.optimizer_config.build(model, steps)
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    data_time = 0.0
    start = 0.0
    step = 0
    while step < steps:
        loader = data.train_dataloader()
        iterators = {k: iter(v) for k, v in loader.iterables.items()}
        for _ in range(data.steps_per_epoch()):
            if step >= steps:
                break
            if step == SKIP:
                start, data_time = time.perf_counter(), 0.0
            t_data = time.perf_counter()
            batch = {
                k: (data.preprocess(k, x, train=True), y)
                for k, (x, y) in ((k, next(it)) for k, it in iterators.items())
            }
            data_time += time.perf_counter() - t_data
            step += 1
            weight = schedule(step, steps)
            target_logits, source_logits = model(
                batch["target"][0] if weight > 0 else None,
                batch["source"][0] if weight < 1 else None,
            )
            loss, _ = smooth_transfer_loss(
                target_logits, batch["target"][1], source_logits, batch["source"][1], weight
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    total = time.perf_counter() - start
    return total / (steps - SKIP), data_time / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(ROOT / "data")
        lightning_times, hand_times, shares = [], [], []
        hand_written_steps(data, SKIP + 10)  # warm-up: allocator, oneDNN kernels
        for _ in range(args.repeats):
            lightning_times.append(lightning_steps(data, args.steps, Path(tmp)))
            hand, share = hand_written_steps(data, args.steps)
            hand_times.append(hand)
            shares.append(share)
    lightning_s, hand_s = statistics.median(lightning_times), statistics.median(hand_times)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps x {args.repeats}"
    )
    print(
        f"lightning     {lightning_s * 1e3:8.2f} ms/step  (runs: {', '.join(f'{t * 1e3:.2f}' for t in lightning_times)})"
    )
    print(
        f"hand-written  {hand_s * 1e3:8.2f} ms/step  (runs: {', '.join(f'{t * 1e3:.2f}' for t in hand_times)})"
    )
    print(f"ratio lightning / hand-written: {lightning_s / hand_s:.3f}  (goal <= 1.10)")
    print(
        f"share of hand-written step time on data (gather + preprocess): {statistics.median(shares):.1%}"
    )


if __name__ == "__main__":
    main()
