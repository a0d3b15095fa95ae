"""Batch-scoring speed: the bare engines on one core and on all cores, and the batch_predict DAG end to end.

Publishes an untrained EfficientNet-Lite0 classifier (devtools/published_model.py) at the default image size,
writes N small JPEGs (at the model's size, so no resize is needed: the case of images prepared for the model),
then measures, each in a fresh process so thread settings hold:
- the LiteRT interpreter on the TFLite float16 variant and float32, and the SavedModel through its serving
  signature, on 1 thread and on all cores, over images already decoded (batches of tasks.batch_scoring.BATCH);
- the TFLite scoring model batch scoring runs (float32, probabilities and embeddings from one pass);
- whether the engines agree: top-1 labels equal and the largest probability difference;
- `batch_predict` run by `dag.test` (in a DAG folder of its own, see `run_dag`) on the N images (listing,
  reading, hashing, decoding, scoring, Parquet/CSV, merge, summary and gallery included), in images/s of the
  whole run, and its ratio to the bare interpreter on all cores (`dag_vs_bare_interpreter_all_cores`, issue
  19's 0.7), and the peak resident memory of that run's process (`dag_peak_rss_mb`, its own VmHWM: dag.test
  runs every task in it, so it is the most any one task held, plus Airflow);
- where the run's time went: each step's task seconds (the mapped shards summed) and the seconds outside any task
  (DAG serialization, run creation, scheduling);
- `dag.test`'s one-time start of Airflow's execution API, warmed before the clock starts and reported apart
  (`dag_execution_api_start_seconds`, with `dag_seconds_cold` and `dag_vs_bare_interpreter_all_cores_cold`: the
  run plus that start, what a first `dag.test` in a fresh process takes). `dag.test` serves the execution API
  in-process and builds it lazily: Cadwyn generates its versioned routers on the first request, 4.1 s on the
  2-core VM (building the app itself 0.5 s; every later request ~0.01-0.03 s). A deployment's api-server pays
  that once when it starts, not per run, so it is no cost of a batch run; before the warm-up it landed in the
  run's first task (the first task's PATCH .../run took 4.3 s, the rest 0.02 s);
- `dag_fixed_seconds`: the same DAG on as many one-image shards (the execution API warmed likewise), what a run
  costs whatever its size, and the ratio with that taken off (`dag_vs_bare_interpreter_all_cores_less_fixed`: the
  per-image efficiency);
- rounds (`--rounds`, default 3): the bare interpreter on all cores, then the DAG, then the bare interpreter
  again, and so on, each DAG run against the mean of the bare rates just before and after it. The machine's speed
  drifts by a fifth or more between processes a minute apart, and one DAG run against one bare measurement read
  anywhere from 0.49 to 0.69 for the same code. `dag_vs_bare_interpreter_all_cores` is the median round's ratio,
  `dag_vs_bare_interpreter_all_cores_rounds` every round's, `bare_all_cores_rounds` the bare rates in order; the
  other DAG keys are the median round's. Each round scores into a location of its own (shards are keyed by
  content: a second run on the same images would reuse the first's);
- the summary's embedding shift of the bench images against the untrained model's reference sample (drawn
  like them), with its seconds in merge_predictions not measured apart.
Absolute rates move with the machine's load: compare numbers of one run.

Where a warm run's time goes beyond the interpreter (2-core VM, 10,000 images, shards of 2,500): each shard hashes
its files first (~0.07 s, by its own thread), then scores them in lanes (tasks.batch_scoring.score: one
single-threaded interpreter per core, each reading, decoding and scoring its own batches), the one decoder (Pillow,
~0.2 ms per 96 px JPEG, ~0.13 ms of it libjpeg) sharing the cores; Parquet/CSV ~0.05 s a shard; the run's fixed
cost is ~2 s (listing 0.2, merge 0.5-0.8, outside tasks 0.5, Airflow ~0.1 s a task). Before the lanes, one
interpreter on both cores with the next batch decoded beside it ran at 0.63-0.7x: each of its parallel operations
waited for the thread the decoder had taken.

    python bench/predict.py [--images 10000] [--image-size 96] [--shard-size 2500] [--rounds 3]

Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.bracketed import bracketed_ratios, median_index
from bench.json_line import json_line

ROOT = Path(__file__).resolve().parents[1]
MEASURE_IMAGES = 2048  # ~1.5-3 s a measurement: 512 (0.3 s) caught bursts of the shared VM (both-core rates 1.1-1.7k)
MODEL_NAME = "bench-model"
CLASSES = ("dark", "mid", "light")


def measure(engine: str, path: str, image_size: int, threads: int) -> dict:
    """Images/s of one engine over pre-decoded images (runs in a fresh process), and its probabilities."""
    import numpy as np

    if engine == "saved_model":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        from tasks.scoring_model import saved_model_scorer

        score = saved_model_scorer(Path(path))
    else:
        from tasks.scoring_model import tflite_scorer

        score = tflite_scorer(Path(path), threads)
    from tasks.batch_scoring import BATCH

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (MEASURE_IMAGES, image_size, image_size, 3)).astype("float32")
    score(images[:BATCH])  # warm-up: allocation, tracing
    started = time.perf_counter()
    outputs = [score(images[start:start + BATCH])[0] for start in range(0, MEASURE_IMAGES, BATCH)]
    seconds = time.perf_counter() - started
    return {"images_per_s": MEASURE_IMAGES / seconds, "probabilities": np.concatenate(outputs).tolist()}


def in_fresh_process(engine: str, path: Path, image_size: int, threads: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--measure", engine, str(path), str(image_size), str(threads)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {engine} on {threads} threads failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_images(folder: Path, count: int, size: int, seed: int = 1) -> list[Path]:
    """`count` JPEGs of `size` px in 10 folders: noise around three brightness levels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for n in range(count):
        path = folder / f"batch-{n % 10}" / f"{n:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        level = (n % 3) * 100 + 20
        Image.fromarray(np.clip(level + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype("uint8")).save(
            path, quality=90)
        paths.append(path)
    return paths


def run_dag(work: Path, images: Path, shard_size: int, home: str) -> dict:
    """`dag.test` on the images (a fresh Airflow home and DB, created before the clock starts): its seconds, the
    peak RSS of its process in MB, the seconds of each step (mapped shards summed) and the run's summary, and the
    seconds of the in-process execution API's start (one request before the clock: see the module docstring).

    Predictions go under the Airflow home: each run scores its shards afresh.
    The DAG folder holds batch_predict alone: dag.test serializes every DAG of its bundle into the metadata DB
    before it runs, so the training DAG's serialization (about a second here) would count as batch overhead."""
    dags = work / home / "dags"
    dags.mkdir(parents=True)
    (dags / "batch_predict.py").symlink_to(ROOT / "dags" / "batch_predict.py")
    script = f"""
import json, resource, time
from airflow.utils import db
db.initdb()
from airflow.dag_processing.dagbag import DagBag
dag = DagBag(dag_folder={str(dags)!r}).dags["batch_predict"]
import httpx
from airflow.sdk.execution_time.supervisor import in_process_api_server
api_started = time.perf_counter()  # the api-server's start in a deployment, once per process under dag.test
api = httpx.Client(transport=in_process_api_server().transport, base_url="http://in-process.invalid./")
assert api.get("health").status_code == 200
api_start = time.perf_counter() - api_started
started = time.perf_counter()
run = dag.test(run_conf={{"images": {str(images)!r}, "model_name": {MODEL_NAME!r}, "shard_size": {shard_size}}})
seconds = time.perf_counter() - started
assert run.state == "success", {{ti.task_id: ti.state for ti in run.get_task_instances()}}
merged = run.get_task_instance("merge_predictions").xcom_pull(task_ids="merge_predictions")
from tasks import storage
summary = storage.read_json(merged["summary_uri"])
try:  # this image's own peak: ru_maxrss keeps the forked bench's (TensorFlow loaded) across exec
    peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
except (OSError, IndexError):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
steps = {{}}
for ti in run.get_task_instances():
    steps[ti.task_id] = steps.get(ti.task_id, 0.0) + (ti.duration or 0.0)
print(json.dumps({{"seconds": seconds, "api_start_seconds": api_start, "peak_rss_mb": peak, "steps": steps,
                  "embedding_shift": summary["embedding_shift"]}}))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AIRFLOW_HOME": str(work / home),
           "TLP_PREDICTIONS_URI": str(work / home / "predictions"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
           "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"dag.test failed: {done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--shard-size", type=int, default=2500)
    parser.add_argument("--rounds", type=int, default=3, help="DAG runs, each between two bare measurements "
                        "(the median ratio is kept)")
    parser.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.measure:
        engine, path, size, threads = args.measure
        print(json.dumps(measure(engine, path, int(size), int(threads))))
        return

    import numpy as np

    work = Path(tempfile.mkdtemp(prefix="tlp-bench-predict-"))
    os.environ.update({"TLP_RUN_ROOT": str(work / "runs"), "TLP_PUBLISH_URI": str(work / "models"),
                       "TLP_CACHE_DIR": os.environ.get("TLP_CACHE_DIR", str(work / "cache"))})
    from devtools.published_model import publish_untrained
    from tasks import scoring_model

    paths = write_images(work / "images", args.images, args.image_size)
    reference = write_images(work / "reference", 300, args.image_size, seed=2)
    champion = publish_untrained(str(work / "models"), MODEL_NAME, CLASSES, args.image_size,
                                 os.environ["TLP_CACHE_DIR"], [path.read_bytes() for path in paths[:300]],
                                 train_images=[path.read_bytes() for path in reference])
    version = champion["uri"]
    cores = os.cpu_count() or 1
    engines = {"tflite_float16": "tflite/float16.tflite", "tflite_float32": "tflite/float32.tflite",
               "tflite_scoring": scoring_model.SCORING_FILE, "saved_model": "saved_model"}
    results, probabilities = {}, {}
    for name, relative in engines.items():
        for threads in (1, cores):
            engine = "saved_model" if name == "saved_model" else "tflite"
            measured = in_fresh_process(engine, Path(version) / relative, args.image_size, threads)
            results[f"{name}_{'1_core' if threads == 1 else 'all_cores'}"] = round(measured["images_per_s"], 1)
            probabilities[name] = np.asarray(measured["probabilities"])
    agreement = {name: {"top1_equal": float(np.mean(probabilities[name].argmax(1)
                                                     == probabilities["saved_model"].argmax(1))),
                        "max_abs_diff": float(np.abs(probabilities[name] - probabilities["saved_model"]).max())}
                 for name in ("tflite_float16", "tflite_float32", "tflite_scoring")}
    bare_path = Path(version) / scoring_model.SCORING_FILE  # what the DAG runs
    bare = [results["tflite_scoring_all_cores"]]
    runs = []
    for round_ in range(args.rounds):
        runs.append(run_dag(work, work / "images", args.shard_size, home=f"airflow-{round_}"))
        bare.append(in_fresh_process("tflite", bare_path, args.image_size, cores)["images_per_s"])
    ratios = bracketed_ratios([args.images / run["seconds"] for run in runs], bare)
    middle = median_index(ratios)
    run, bracket = runs[middle], (bare[middle] + bare[middle + 1]) / 2
    seconds, embedding_shift = run["seconds"], run["embedding_shift"]
    # the same DAG with as many shards of one image each: what a run costs whatever its size (Airflow's start-up
    # and per-task overhead, a model load per shard, a merge)
    shards = -(-args.images // args.shard_size)
    write_images(work / "fixed", shards, args.image_size, seed=3)
    fixed_run = run_dag(work, work / "fixed", 1, home="airflow-fixed")
    fixed = fixed_run["seconds"]
    cold = seconds + run["api_start_seconds"]
    print(json_line({"bench": "predict", "images": args.images, "image_size": args.image_size, "cores": cores,
                      "shard_size": args.shard_size, "engine": scoring_model.ENGINE, "images_per_s": results,
                      "agreement_with_saved_model": agreement, "dag_seconds": round(seconds, 1),
                      "dag_images_per_s": round(args.images / seconds, 1),
                      "dag_vs_bare_interpreter_all_cores": round(ratios[middle], 3),
                      "dag_vs_bare_interpreter_all_cores_rounds": [round(ratio, 3) for ratio in ratios],
                      "bare_all_cores_rounds": [round(rate, 1) for rate in bare],
                      "dag_peak_rss_mb": round(run["peak_rss_mb"]),
                      "dag_step_seconds": {**{step: round(value, 1) for step, value in run["steps"].items()},
                                           "outside_tasks": round(seconds - sum(run["steps"].values()), 1)},
                      "dag_execution_api_start_seconds": round(run["api_start_seconds"], 1),
                      "dag_seconds_cold": round(cold, 1),
                      "dag_vs_bare_interpreter_all_cores_cold": round(args.images / cold / bracket, 3),
                      "dag_fixed_seconds": round(fixed, 1),
                      "dag_fixed_seconds_cold": round(fixed + fixed_run["api_start_seconds"], 1),
                      "dag_vs_bare_interpreter_all_cores_less_fixed": round(
                          args.images / max(seconds - fixed, 1e-9) / bracket, 3),
                      "embedding_shift": {key: embedding_shift.get(key) for key in
                                          ("status", "auc", "noise_band", "n_reference", "n_batch")}}))


if __name__ == "__main__":
    main()
