"""Forward throughput of each offline-loadable backbone, as ratios to EfficientNet-Lite0.

Feature extraction runs every image through the backbone once, so this is what
choosing a backbone costs. All backbones run in the same process on the same
machine, taking turns for `--rounds` rounds and keeping each one's best rate,
so the ratios hold even on a shared machine whose load comes and goes.
EfficientNet-Lite0/1/2 use their offline ImageNet weights; the keras.applications
backbones have random weights (no internet here), which does not change their
speed. `--native` also times each Lite variant at its native size (224, 240,
260 px). Each run is a `tf.function` loop over one fixed batch; the first call
(tracing, allocation) is a warm-up and not timed.

    python bench/backbones.py [--sizes 96 224] [--batch 64] [--batches 3] [--rounds 3] [--native]
        [--backbones ...]
"""
from __future__ import annotations

import argparse
import time

from tasks.backbones import LITE, LITE0, available_backbones, load_backbone


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
    parser.add_argument("--batches", type=int, default=3, help="timed batches per backbone, size and round")
    parser.add_argument("--rounds", type=int, default=3, help="the backbones take turns this often; best rate kept")
    parser.add_argument("--backbones", nargs="+", default=available_backbones())
    parser.add_argument("--native", action="store_true", help="also time each Lite variant at its native size")
    args = parser.parse_args()
    names = [LITE0, *[name for name in args.backbones if name != LITE0]]
    print(f"batch {args.batch}, {args.batches} timed batches after one warm-up, tf.function forward pass, "
          f"best of {args.rounds} interleaved rounds")
    print(f"{'backbone':<20}{'weights':<10}{'px':>5}{'img/s':>10}{'vs lite0':>10}")
    groups = [[(name, size) for name in names] for size in args.sizes]
    if args.native:
        from tasks.efficientnet_lite import VARIANTS

        groups.append([(name, VARIANTS[name].native_size) for name in names if name in LITE])
    for group in groups:
        models = {(name, size): load_backbone(name, size, weights="imagenet" if name in LITE else "none").model
                  for name, size in group}
        rates = dict.fromkeys(models, 0.0)
        for _ in range(args.rounds):  # interleaved, best kept: a load spike on a shared machine hits one turn
            for key, model in models.items():
                rates[key] = max(rates[key], images_per_second(model, key[1], args.batch, args.batches))
        baseline = rates[group[0]]
        for name, size in group:
            weights = "imagenet" if name in LITE else "none"
            print(f"{name:<20}{weights:<10}{size:>5}{rates[(name, size)]:>10.1f}"
                  f"{rates[(name, size)] / baseline:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
