"""The fast mode's step time against float32: channels_last + bf16 autocast (lightning_stl/speed.py).

For each model, one Smooth Transfer training step (target + source sub-batch through
:class:`~lightning_stl.models.source_target.SourceTargetClassifier`, Eq. 3's two cross-entropies,
backward, SGD with momentum) in float32 on contiguous tensors and in the fast mode (weights and
inputs channels_last, forward and loss under ``torch.autocast(dtype=torch.bfloat16)``, backward and
SGD outside it: what Lightning's ``precision="bf16-mixed"`` does):

* ``digits_cnn``: the embedded pair, 128 + 128 images of 1x8x8;
* ``resnet20`` (CIFAR-10 <- CIFAR-100) and ``wrn10_2`` (SVHN <- MNIST): 128 + 128 of 3x32x32.

Then SMILE / fine-tuning in both modes (:class:`~lightning_stl.methods.FineTune`'s own
``training_loss``: mixup, L^FE and L^FC against the mean teacher, and the teacher update after the
step; against plain cross-entropy), on ``digits_cnn`` (batch 48 of 1x8x8) and ``resnet20`` (48 of
3x32x32). ``benchmarks/smile_step.py --fast`` does the same on SMILE's ResNet-18 at 112x112.

Steps of the two variants alternate call by call (which goes first alternates too), each timed
on its own; a ratio is the median over adjacent pairs, so a change of machine load hits both alike.

    python benchmarks/step_speed.py [--steps 30] [--repeats 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smile_step import alternate, make_step  # noqa: E402  (the benchmark next door)

from lightning_stl.methods import FineTune  # noqa: E402
from lightning_stl.models.registry import create_backbone  # noqa: E402
from lightning_stl.models.source_target import SourceTargetClassifier  # noqa: E402
from lightning_stl.speed import bf16_is_fast, to_channels_last  # noqa: E402

MODELS = {  # backbone: (input shape, source classes, batchnorm)
    "digits_cnn": ((1, 8, 8), 10, "shared"),
    "resnet20": ((3, 32, 32), 100, "shared"),
    "wrn10_2": ((3, 32, 32), 10, "per_domain"),
}
SMILE_MODELS = {"digits_cnn": (1, 8, 8), "resnet20": (3, 32, 32)}


def autocast(device: torch.device, fast: bool) -> contextlib.AbstractContextManager:
    if not fast:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def smooth_step(name: str, device: torch.device, fast: bool, batch: int) -> Callable[[], None]:
    shape, source_classes, batchnorm = MODELS[name]
    torch.manual_seed(0)
    model = SourceTargetClassifier(
        create_backbone(name, in_chans=shape[0]), 10, source_classes, batchnorm
    ).to(device)
    generator = torch.Generator().manual_seed(0)
    xt, xs = (torch.randn(batch, *shape, generator=generator).to(device) for _ in range(2))
    yt = torch.randint(0, 10, (batch,), generator=generator).to(device)
    ys = torch.randint(0, source_classes, (batch,), generator=generator).to(device)
    if fast:
        to_channels_last(model)
        xt, xs = (x.contiguous(memory_format=torch.channels_last) for x in (xt, xs))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step() -> None:
        with autocast(device, fast):
            target_logits, source_logits = model(xt, xs)
            loss = 0.5 * F.cross_entropy(target_logits, yt) + 0.5 * F.cross_entropy(
                source_logits, ys
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def fine_tune_step(
    name: str, device: torch.device, fast: bool, smile: bool, batch: int
) -> Callable[[], None]:
    shape = SMILE_MODELS[name]
    torch.manual_seed(0)
    options = (
        {"mixup_alpha": 0.2, "feature_mixup_weight": 0.1, "label_mixup_weight": 0.1}
        if smile
        else {"mixup_alpha": None}
    )
    module = FineTune(
        backbone=name, in_chans=shape[0], num_target_classes=10, num_source_classes=100, **options
    ).to(device)
    if module.teacher is not None:
        module.teacher.copy_from(*module.teacher_sources())
    module.train()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=generator).to(device)
    y = torch.randint(0, 10, (batch,), generator=generator).to(device)
    if fast:
        to_channels_last(module)
        x = x.contiguous(memory_format=torch.channels_last)
    inner = make_step(module, x, y, lambda: autocast(device, fast))  # smile_step.py's step

    def step() -> None:
        inner()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def ratio(
    first: Callable, second: Callable, steps: int, repeats: int
) -> tuple[float, float, float]:
    """(median ms of ``first``, median ms of ``second``, median of second / first over pairs)."""
    for _ in range(3):  # warm-up: allocator, oneDNN / cuDNN kernels
        first(), second()
    pairs = [p for _ in range(repeats) for p in alternate(first, second, steps)]
    return (
        statistics.median(a for a, _, _ in pairs) * 1e3,
        statistics.median(b for _, b, _ in pairs) * 1e3,
        statistics.median(b / a for a, b, _ in pairs),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed step pairs per round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128, help="each sub-batch (Smooth)")
    parser.add_argument("--smile-batch-size", type=int, default=48)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"torch {torch.__version__}, {where}, {torch.get_num_threads()} threads; bf16 units: "
        f"{bf16_is_fast(device)}; {args.repeats} rounds x {args.steps} step pairs"
    )
    started = time.perf_counter()
    print("| step | float32 ms | fast ms | fast / float32 |\n|---|---:|---:|---:|")
    for name in args.models:
        slow, fast, r = ratio(
            smooth_step(name, device, False, args.batch_size),
            smooth_step(name, device, True, args.batch_size),
            args.steps,
            args.repeats,
        )
        shape = "x".join(map(str, MODELS[name][0]))
        print(
            f"| Smooth Transfer, {name}, {args.batch_size}+{args.batch_size} of {shape} | "
            f"{slow:.1f} | {fast:.1f} | **{r:.3f}** |",
            flush=True,
        )
    print("\n| SMILE / fine-tune | float32 | fast mode |\n|---|---:|---:|")
    for name in [m for m in SMILE_MODELS if m in args.models]:
        cells = []
        for fast in (False, True):
            plain_ms, smile_ms, r = ratio(
                fine_tune_step(name, device, fast, False, args.smile_batch_size),
                fine_tune_step(name, device, fast, True, args.smile_batch_size),
                args.steps,
                args.repeats,
            )
            cells.append(f"**{r:.3f}** ({smile_ms:.1f} / {plain_ms:.1f} ms)")
        print(f"| {name}, batch {args.smile_batch_size} | {cells[0]} | {cells[1]} |", flush=True)
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
