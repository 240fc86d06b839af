"""The cost of resumable random crops: an image's transform seeded from its place in the stream.

File-based sets (the fine-grained SMILE targets) decode and transform each image in the
DataLoader's workers. For a resumed run to draw the same crops and flips,
:class:`~lightning_stl.data.streams.EpochPermutationSampler` gives every image a seed and
:class:`~lightning_stl.data.FileImageDataset` draws its transform from it (the CPU generator
seeded, then set back). This times SMILE's training transform (resize 256, crop 224, flip) on
CUB-sized JPEGs (500 x 375) with and without the seed, in one process.

    python benchmarks/seeded_transforms.py [--images 200] [--repeats 5]

Prints milliseconds per image of each and their ratio (goal: seeded / unseeded <= 1.05).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lightning_stl.data.file_image_set import FileImageDataset, FileImageSet, smile_transform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        names = []
        for i in range(args.images):
            pixels = rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(Path(folder) / f"{i}.jpg", quality=90)
            names.append(f"{i}.jpg")
        data = FileImageSet(
            Path(folder), np.array(names), torch.zeros(len(names), dtype=torch.long), 1
        )
        dataset = FileImageDataset(data, smile_transform(True))
        times: dict[str, list[float]] = {"unseeded": [], "seeded": []}
        for _ in range(args.repeats):  # alternate, so that machine load affects both alike
            for kind in times:
                start = time.perf_counter()
                for i in range(len(names)):
                    dataset[(i, 12345 + i)] if kind == "seeded" else dataset[i]
                times[kind].append((time.perf_counter() - start) / len(names) * 1000)
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"torch {torch.__version__}, {args.images} images x {args.repeats} rounds, 1 thread")
    for kind, ms in median.items():
        print(f"{kind:>9}: {ms:.3f} ms per image")
    print(f"ratio seeded / unseeded: {median['seeded'] / median['unseeded']:.3f}  (goal <= 1.05)")


if __name__ == "__main__":
    main()
