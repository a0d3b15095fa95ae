"""Forward throughput of each offline-loadable backbone, as ratios to EfficientNet-Lite0.

Feature extraction runs every image through the backbone once, so this is what
choosing a backbone costs. All backbones run in the same process on the same
machine, so the ratios hold even when the absolute numbers move with load.
Lite0 uses its ImageNet weights; the keras.applications backbones have random
weights (no internet here), which does not change their speed. Each run is a
`tf.function` loop over one fixed batch; the first call (tracing, allocation)
is a warm-up and not timed.

    python bench/backbones.py [--sizes 96 224] [--batch 64] [--batches 3]
"""
from __future__ import annotations

import argparse
import time


from tasks.backbones import LITE0, available_backbones, load_backbone  # noqa: E402


def images_per_second(model, image_size: int, batch: int, batches: int) -> float:
    import tensorflow as tf

    forward = tf.function(lambda x: model(x, training=False))
    images = tf.random.uniform((batch, image_size, image_size, 3), 0, 255, seed=0)
    forward(images).numpy()
    start = time.perf_counter()
    for _ in range(batches):
        forward(images).numpy()
    return batch * batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 224])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=3, help="timed batches per backbone and size")
    parser.add_argument("--backbones", nargs="+", default=available_backbones())
    args = parser.parse_args()
    names = [LITE0, *[name for name in args.backbones if name != LITE0]]
    print(f"batch {args.batch}, {args.batches} timed batches after one warm-up, tf.function forward pass")
    print(f"{'backbone':<20}{'weights':<10}{'px':>5}{'img/s':>10}{'vs lite0':>10}")
    for size in args.sizes:
        baseline = None
        for name in names:
            weights = "imagenet" if name == LITE0 else "none"
            backbone = load_backbone(name, size, weights=weights)
            rate = images_per_second(backbone.model, size, args.batch, args.batches)
            baseline = baseline or rate
            print(f"{name:<20}{weights:<10}{size:>5}{rate:>10.1f}{rate / baseline:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
