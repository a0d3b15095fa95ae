"""What a sweep of candidate backbones costs, against the same candidates run one at a time.

On the offline default data (Fashion-MNIST, 10 % of train), in one process:
each candidate's feature extraction alone in its own fresh run, then both as
a sweep in one fresh run (each candidate's mapped train step, then select),
exactly the step functions the DAG calls. The goal of the issue: the sweep
costs at most the sum of the single runs + 10 %. Ends with one JSON line.

    python bench/candidates.py [--run-root .bench-runs] [--candidates efficientnet_lite0@96,efficientnet_lite0@128]
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import time

from bench.json_line import json_line
from tasks import storage
from tasks.config import RunConfig, candidate_list


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-root", default=".bench-runs")
    parser.add_argument("--candidates", default="efficientnet_lite0@96,efficientnet_lite0@128")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from tasks.steps.acquire import acquire
    from tasks.steps.select import select
    from tasks.steps.subsample import subsample
    from tasks.steps.train import train

    base = RunConfig(candidates=args.candidates, epochs=args.epochs, patience=args.epochs, run_root=args.run_root)
    specs = candidate_list(base)

    def fresh(run_id: str) -> tuple[RunConfig, dict]:
        """A new run with its data selected (untimed): only training and selection are compared."""
        cfg = dataclasses.replace(base, run_id=run_id)
        storage.delete(cfg.run_uri + "/")
        return cfg, subsample(cfg, acquire(cfg))

    singles = {}
    for candidate in specs:
        cfg, data = fresh(f"bench-single-{candidate.slug}")
        started = time.perf_counter()
        train(cfg, data, dataclasses.asdict(candidate))
        singles[candidate] = time.perf_counter() - started

    cfg, data = fresh("bench-sweep")
    started = time.perf_counter()
    trained = [train(cfg, data, dataclasses.asdict(candidate)) for candidate in specs]
    winner = select(cfg, trained)
    sweep = time.perf_counter() - started

    single_sum = sum(singles.values())
    result = {f"single_{c.backbone}_{c.image_size}_s": round(t, 1) for c, t in singles.items()}
    result |= {"sweep_s": round(sweep, 1), "single_sum_s": round(single_sum, 1),
               "sweep_to_single_sum": round(sweep / single_sum, 3), "goal_sweep_to_single_sum": 1.10,
               "winner": f"{winner['backbone']}@{winner['image_size']}",
               "winner_val_accuracy": round(winner["val_accuracy"], 4)}
    print(json_line(result))


if __name__ == "__main__":
    main()
