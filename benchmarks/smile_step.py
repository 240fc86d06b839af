"""A SMILE training step against a plain fine-tuning step, and the cost of the mean teacher.

One process, one model, one batch. Both steps are :class:`~lightning_stl.methods.FineTune`'s own
``training_loss`` followed by backward and an SGD step (momentum 0.9, weight decay 1e-4) over its
``student_parameters()``, from the same initial weights:

* plain: ``mixup_alpha=None`` (cross-entropy, no teacher; SMILE's "L²" baseline);
* SMILE: mixup (α = 0.2), γ_FE = γ_FC = 0.1 (Eqs. 4-5), the mean teacher's forward of the clean
  batch, the auxiliary source-class head, and after the step the teacher update of the
  :class:`~lightning_stl.callbacks.MeanTeacherUpdate` callback (``teacher.update``, every step).

The two alternate step by step (plain then SMILE in even pairs, SMILE then plain in odd ones),
each step timed on its own, so that a change of machine load hits both alike; the ratio is the
median over adjacent pairs. ``--repeats`` rounds of ``--steps`` pairs follow two warm-up steps of
each. The teacher update is timed inside the SMILE steps (its share of a step) and alone, fused
(``MeanTeacher.update``: one ``torch._foreach_lerp_``) against a per-parameter Python loop that
computes the same average, again call by call in alternation; and the teacher's forward of the
clean batch, the main extra cost of a SMILE step, is timed alone against plain steps.

    python benchmarks/smile_step.py [--model resnet18] [--image-size 112] [--batch-size 48]
                                    [--steps 20] [--repeats 3] [--fast]

``--fast`` runs both steps in the fast mode (lightning_stl/speed.py): weights and batch
channels_last, the loss (the teacher's forward included) under bf16 autocast.

Prints the median ms/step of each, the ratio SMILE / plain (SMILE, Section 4.1.1: "less than 20%"
more time; goal here on a CPU: <= 1.4), the teacher update's time and share of a SMILE step, and
the ratio fused / loop (goal <= 1). torch uses the threads it finds (``torch.get_num_threads()``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from lightning_stl.callbacks import MeanTeacherUpdate
from lightning_stl.methods import FineTune
from lightning_stl.models.mean_teacher import MeanTeacher
from lightning_stl.speed import compile_models, to_channels_last

WARMUP = 2  # untimed steps of each before the rounds (allocator, oneDNN kernels)
DECAY = 0.999


def make_module(args: argparse.Namespace, smile: bool) -> FineTune:
    """A FineTune on ``args.model`` from seed 0: SMILE's (teacher, auxiliary head) or plain."""
    torch.manual_seed(0)
    options = (
        {
            "mixup_alpha": 0.2,
            "feature_mixup_weight": 0.1,
            "label_mixup_weight": 0.1,
            "num_source_classes": args.source_classes,
        }
        if smile
        else {"mixup_alpha": None}
    )
    module = FineTune(
        backbone=args.model, in_chans=3, num_target_classes=args.target_classes, **options
    )
    if module.teacher is not None:  # ω_T = ω_s: the teacher starts as the student
        module.teacher.copy_from(*module.teacher_sources())
    return module.train()


def make_step(
    module: FineTune,
    x: Tensor,
    y: Tensor,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Callable[[], float]:
    """One training step of ``module`` on ``(x, y)``: loss, backward, SGD, and (SMILE) the mean
    teacher update through the callback, as ``Trainer.fit`` runs them. The loss is computed
    inside ``context()`` (the fast mode: bf16 autocast, as Lightning's ``bf16-mixed`` wraps
    ``training_step``; backward and the optimiser outside it). Returns the seconds the teacher
    update took (0 without a teacher)."""
    optimizer = torch.optim.SGD(
        module.student_parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4
    )
    callback = MeanTeacherUpdate(decay=DECAY, every_n_steps=1) if module.teacher else None
    trainer = SimpleNamespace(global_step=0)

    def step() -> float:
        with context():
            loss, _ = module.training_loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        trainer.global_step += 1
        if callback is None:
            return 0.0
        start = time.perf_counter()
        callback.on_train_batch_end(trainer, module, None, None, 0)
        return time.perf_counter() - start

    return step


def alternate(first: Callable[[], Any], second: Callable[[], Any], pairs: int) -> list[tuple]:
    """``pairs`` calls of each, alternating which goes first; per pair: (seconds of ``first``,
    seconds of ``second``, what ``second`` returned)."""
    results = []
    for index in range(pairs):
        times, returned = {}, None
        for name in ("a", "b") if index % 2 == 0 else ("b", "a"):
            start = time.perf_counter()
            out = (first if name == "a" else second)()
            times[name] = time.perf_counter() - start
            if name == "b":
                returned = out
        results.append((times["a"], times["b"], returned))
    return results


@torch.no_grad()
def loop_update(
    teacher: MeanTeacher, backbone: torch.nn.Module, classifier: torch.nn.Module
) -> None:
    """Reference: the same θ_T ← decay·θ_T + (1 − decay)·θ_S, one tensor at a time."""
    for ours, theirs in ((teacher.backbone, backbone), (teacher.classifier, classifier)):
        student = theirs.state_dict(keep_vars=True)
        for key, value in ours.state_dict(keep_vars=True).items():
            if value.is_floating_point():
                value.data.lerp_(student[key].data, 1.0 - DECAY)
            else:
                value.data.copy_(student[key].data)


def teacher_update_times(module: FineTune, calls: int) -> tuple[list[tuple], float]:
    """Per call: (seconds of the loop reference, seconds of the fused update); and the largest
    difference between the teachers the two produce from the same start."""
    backbone, classifier = module.teacher_sources()
    fused_teacher, loop_teacher = module.teacher, MeanTeacher(backbone, classifier)
    loop_teacher.load_state_dict(fused_teacher.state_dict())
    fused_teacher.update(backbone, classifier, DECAY)
    loop_update(loop_teacher, backbone, classifier)
    difference = max(
        float((a - b).abs().max())
        for a, b in zip(
            fused_teacher.state_dict().values(), loop_teacher.state_dict().values(), strict=True
        )
        if a.is_floating_point()
    )
    times = alternate(
        lambda: loop_update(loop_teacher, backbone, classifier),
        lambda: fused_teacher.update(backbone, classifier, DECAY),
        calls,
    )
    return times, difference


def ms(values: list[float]) -> str:
    return ", ".join(f"{v * 1e3:.1f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18", help="a timm model, e.g. resnet50")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=48, help="SMILE's batch: 48")
    parser.add_argument("--target-classes", type=int, default=200, help="CUB-200's 200")
    parser.add_argument("--source-classes", type=int, default=1000, help="ImageNet's 1000")
    parser.add_argument("--steps", type=int, default=20, help="timed step pairs per round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds")
    parser.add_argument("--teacher-updates", type=int, default=100, help="timed pairs of updates")
    parser.add_argument(
        "--fast",
        action="store_true",
        help="the fast mode (lightning_stl/speed.py): channels_last, bf16 autocast",
    )
    parser.add_argument(
        "--compile", action="store_true", help="speed.compile: torch.compile every model"
    )
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator)
    y = torch.randint(0, args.target_classes, (args.batch_size,), generator=generator)
    modules = {"plain": make_module(args, smile=False), "smile": make_module(args, smile=True)}
    context = contextlib.nullcontext
    if args.fast:
        for module in modules.values():
            to_channels_last(module)
        x = x.contiguous(memory_format=torch.channels_last)

        def context() -> contextlib.AbstractContextManager:
            return torch.autocast("cpu", dtype=torch.bfloat16)

    if args.compile:
        for module in modules.values():
            compile_models(module, None)
    plain_step, smile_step = (
        make_step(modules[name], x, y, context) for name in ("plain", "smile")
    )
    load_before = os.getloadavg()
    started = time.perf_counter()
    for _ in range(WARMUP):  # allocator, oneDNN kernels
        plain_step(), smile_step()
    rounds = [alternate(plain_step, smile_step, args.steps) for _ in range(args.repeats)]
    teacher, smile_module = modules["smile"].teacher, modules["smile"]

    def teacher_forward_alone() -> None:
        with context():
            teacher(x, classify=smile_module.label_mixup_weight > 0)

    forwards = alternate(  # what the teacher's forward of the clean batch adds to a step
        plain_step, teacher_forward_alone, max(3, args.steps // 4)
    )
    updates, difference = teacher_update_times(smile_module, args.teacher_updates)
    elapsed = time.perf_counter() - started

    pairs = [pair for round_ in rounds for pair in round_]
    plain = statistics.median(p for p, _, _ in pairs)
    smile = statistics.median(s for _, s, _ in pairs)
    ratio = statistics.median(s / p for p, s, _ in pairs)
    in_step = statistics.median(u for _, _, u in pairs)
    share = statistics.median(u / s for _, s, u in pairs)
    loop = statistics.median(t for t, _, _ in updates)
    fused = statistics.median(t for _, t, _ in updates)
    fused_ratio = statistics.median(f / t for t, f, _ in updates)
    teacher_forward = statistics.median(t for _, t, _ in forwards)
    forward_share = statistics.median(t / p for p, t, _ in forwards)
    parameters = sum(p.numel() for p in teacher.parameters())

    def per_round(index: int) -> str:
        return ms([statistics.median(pair[index] for pair in round_) for round_ in rounds])

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model} "
        f"{args.batch_size}x3x{args.image_size}x{args.image_size}, {args.target_classes} target / "
        f"{args.source_classes} source classes; {args.repeats} rounds x {args.steps} step pairs, "
        f"{args.teacher_updates} update pairs ({elapsed:.0f} s); "
        f"{'fast mode (channels_last, bf16 autocast)' if args.fast else 'float32'}"
        f"{', torch.compile' if args.compile else ''}; "
        f"load average {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}"
    )
    print(f"plain fine-tuning {plain * 1e3:8.1f} ms/step  (round medians: {per_round(0)})")
    print(f"SMILE             {smile * 1e3:8.1f} ms/step  (round medians: {per_round(1)})")
    print(
        f"ratio SMILE / plain: {ratio:.3f} (median of adjacent pairs; ratio of medians "
        f"{smile / plain:.3f}); paper: < 1.2 (hardware not given); goal here <= 1.4"
    )
    print(
        f"teacher forward of the clean batch alone: {teacher_forward * 1e3:.1f} ms = "
        f"{forward_share:.1%} of a plain step (median of {len(forwards)} adjacent pairs)"
    )
    print(f"mean-teacher update inside SMILE steps: {in_step * 1e3:.1f} ms = {share:.1%} of a step")
    print(
        f"teacher update alone ({parameters / 1e6:.1f} M parameters): fused {fused * 1e3:.2f} ms "
        f"(min {min(t for _, t, _ in updates) * 1e3:.2f}), per-parameter loop {loop * 1e3:.2f} ms "
        f"(min {min(t for t, _, _ in updates) * 1e3:.2f}); ratio fused / loop {fused_ratio:.3f} "
        f"(goal <= 1); largest difference {difference:.1e}"
    )


if __name__ == "__main__":
    main()
