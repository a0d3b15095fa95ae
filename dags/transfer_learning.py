"""Transfer learning on Airflow: acquire → subsample → train → decide → fine-tune? → evaluate → publish.

Two DAGs run the same pipeline:
- `transfer_learning`: triggered by hand from the UI form (defaults = the offline demo);
- `transfer_learning_retrain`: on a cron schedule (env `TLP_RETRAIN_SCHEDULE`), with production params
  from the Airflow Variable `tlp_retrain_params` (JSON) over the same defaults.
Every task body is one call into `tasks/`; TensorFlow is only imported inside task bodies.
Object storage credentials come from the Airflow connection `model_store` (conn type aws).
"""
from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import (Asset, AssetAlias, ExceptionRetryPolicy, Param, RetryAction, RetryRule, TriggerRule, dag,
                         get_current_context, task)

from tasks.config import FINE_TUNE_MODES, RunConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODEL_STORE_CONN_ID = os.environ.get("TLP_MODEL_STORE_CONN_ID", "model_store")
RETRAIN_SCHEDULE = os.environ.get("TLP_RETRAIN_SCHEDULE", "0 3 * * 1")
RETRAIN_PARAMS_VARIABLE = "tlp_retrain_params"
# heavy steps can go to a GPU worker: `airflow celery worker -q gpu` and TLP_TRAIN_QUEUE=gpu
TRAIN_QUEUE = os.environ.get("TLP_TRAIN_QUEUE", "default")
CHAMPION_ALIAS = AssetAlias("tlpipe-champion")
DEFAULTS = RunConfig(
    run_root=os.environ.get("TLP_RUN_ROOT", str(PROJECT_ROOT / ".runs")),
    publish_uri=os.environ.get("TLP_PUBLISH_URI", "s3://models"),
)

# Named in tasks/errors.py: bad input fails at once; an outside failure that may pass is retried (so is anything
# unnamed, e.g. a lost worker).
RETRY_POLICY = ExceptionRetryPolicy(rules=[
    RetryRule(exception="tasks.errors.PermanentError", action=RetryAction.FAIL,
              reason="invalid input: fix what the error names and trigger again"),
    RetryRule(exception="tasks.errors.TransientError", action=RetryAction.RETRY,
              reason="a network or object-store failure that may pass"),
])
DEFAULT_ARGS = {
    "retries": 2,
    "retry_delay": timedelta(minutes=1),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=15),
    "execution_timeout": timedelta(hours=2),
    "retry_policy": RETRY_POLICY,
}


def _param(name: str, title: str, description: str, **schema) -> Param:
    """A trigger-form field whose default is the RunConfig default, so both agree."""
    return Param(getattr(DEFAULTS, name), title=title, description=description, **schema)


PARAMS = {
    "source": _param("source", "Dataset source", "tfds://<name>, http(s)://…zip|tar.gz, a local folder or "
                     "file:// URI (<split>/<class>/<image>), s3://bucket/prefix/, or idx://fashion_mnist.",
                     type="string", minLength=3),
    "classes": Param("", title="Classes", description="Empty = all classes; a number N = the first N; or "
                     "comma-separated class names.", type="string"),
    "train_percent": _param("train_percent", "Train % per class", "Percent of each class's training images.",
                            type="number", exclusiveMinimum=0, maximum=100),
    "val_fraction": _param("val_fraction", "Validation fraction", "Stratified share of the selected training "
                           "images held out for validation (the test split is never used for selection).",
                           type="number", exclusiveMinimum=0, exclusiveMaximum=1),
    "seed": _param("seed", "Seed", "Seeds the subsample, shuffles and initialisation.", type="integer", minimum=0),
    "backbone": _param("backbone", "Backbone", "efficientnet_lite0 (offline ImageNet), efficientnet_b0, "
                       "resnet50_v2, mobilenet_v2, a TF Hub handle, or a SavedModel path / s3:// prefix.",
                       type="string", minLength=1),
    "image_size": _param("image_size", "Image size (px)", "Square input size of the backbone.",
                         type="integer", minimum=32, maximum=1024),
    "batch_size": _param("batch_size", "Batch size", "", type="integer", minimum=1, maximum=1024),
    "epochs": _param("epochs", "Feature-extraction epochs", "Maximum epochs; early stopping may end sooner.",
                     type="integer", minimum=1, maximum=500),
    "learning_rate": _param("learning_rate", "Learning rate", "Of the head in feature extraction.",
                            type="number", exclusiveMinimum=0, maximum=1),
    "augment": _param("augment", "Augment", "Random flips/rotations/zooms; the backbone then runs every epoch "
                      "instead of once (slower).", type="boolean"),
    "fine_tune": _param("fine_tune", "Fine-tune", "auto = only when validation accuracy plateaus below the "
                        "target; always; never.", type="string", enum=list(FINE_TUNE_MODES)),
    "fine_tune_layers": _param("fine_tune_layers", "Layers to unfreeze", "Top backbone layers made trainable "
                               "(BatchNorm stays frozen).", type="integer", minimum=1),
    "fine_tune_epochs": _param("fine_tune_epochs", "Fine-tune epochs", "", type="integer", minimum=1, maximum=500),
    "fine_tune_lr_factor": _param("fine_tune_lr_factor", "Fine-tune LR factor", "Fine-tune learning rate = "
                                  "learning rate × this.", type="number", exclusiveMinimum=0, maximum=1),
    "patience": _param("patience", "Patience (epochs)", "Early stopping and plateau window.",
                       type="integer", minimum=1),
    "min_delta": _param("min_delta", "Min improvement", "Smaller val_accuracy gains count as no improvement.",
                        type="number", minimum=0),
    "target_accuracy": Param(DEFAULTS.target_accuracy or 0.0, title="Target accuracy", description="Fine-tune "
                             "only below this validation accuracy (0 = no target).", type="number",
                             minimum=0, maximum=1),
    "top_k_wrong": _param("top_k_wrong", "Most-wrong gallery size", "", type="integer", minimum=1, maximum=1000),
    "model_name": _param("model_name", "Model name", "Lowercase letters, digits, . _ -; names the published "
                         "model.", type="string", pattern="^[a-z0-9][a-z0-9._-]{0,62}$"),
    "publish_uri": _param("publish_uri", "Publish to", "Model registry root, e.g. s3://models (S3 settings from "
                          f"the '{MODEL_STORE_CONN_ID}' connection).", type="string", minLength=1),
    "run_root": _param("run_root", "Run root", "Where run artifacts go, one folder per run_id: a shared "
                       "directory or s3:// URI (required with several workers).", type="string", minLength=1),
}


def _config(cfg: dict) -> RunConfig:
    """Rebuild the validated config in this task's process and point storage at the model store."""
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    from tasks.storage import s3_env

    try:
        conn = Connection.get(MODEL_STORE_CONN_ID)
        os.environ.update(s3_env(conn.login, conn.password, conn.extra_dejson))
    except AirflowNotFoundException:
        pass  # no connection: the worker's own AWS_* environment applies
    return RunConfig.from_params(cfg)


def transfer_learning_pipeline(overrides_variable: str | None = None) -> None:
    """The task graph shared by the manual and the scheduled DAG."""

    @task
    def configure(params: dict | None = None, run_id: str | None = None) -> dict:
        """Validate the params once (Airflow fills in `params` and `run_id`); later tasks get this config."""
        overrides = {}
        if overrides_variable:
            from airflow.sdk import Variable

            overrides = Variable.get(overrides_variable, default={}, deserialize_json=True)
        return RunConfig.from_params({**params, **overrides}, run_id=run_id).to_dict()

    @task
    def acquire(cfg: dict) -> dict:
        from tasks.acquire import acquire

        return acquire(_config(cfg))

    @task
    def subsample(cfg: dict, acquired: dict) -> dict:
        from tasks.subsample import subsample

        return subsample(_config(cfg))

    @task(queue=TRAIN_QUEUE)
    def train(cfg: dict, data: dict) -> dict:
        from tasks.train import train

        return train(_config(cfg))

    @task.branch
    def decide(cfg: dict, trained: dict) -> str:
        """Branch on the plateau rule; the decision and its reason also go to XCom key `decision`."""
        from tasks.decide import decide_step

        decision = decide_step(_config(cfg))
        get_current_context()["ti"].xcom_push(key="decision", value=decision)
        return "fine_tune" if decision["fine_tune"] else "skip_fine_tune"

    @task(queue=TRAIN_QUEUE)
    def fine_tune(cfg: dict) -> dict:
        from tasks.fine_tune import fine_tune

        return fine_tune(_config(cfg))

    @task
    def skip_fine_tune() -> dict:
        return {"fine_tuned": False}

    @task(queue=TRAIN_QUEUE, trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    def evaluate(cfg: dict) -> dict:
        from tasks.evaluate import evaluate

        return evaluate(_config(cfg))

    @task(outlets=[CHAMPION_ALIAS])
    def publish(cfg: dict, evaluation: dict) -> dict:
        from tasks.publish import publish

        result = publish(_config(cfg), evaluation)
        if result["promoted"]:
            champion = Asset(name=f"champion-{cfg['model_name']}",
                             uri=f"{cfg['publish_uri'].rstrip('/')}/{cfg['model_name']}/champion.json")
            get_current_context()["outlet_events"][CHAMPION_ALIAS].add(champion, extra=result)
        return result

    cfg = configure()
    data = subsample(cfg, acquire(cfg))
    branch = decide(cfg, train(cfg, data))
    evaluation = evaluate(cfg)
    branch >> [fine_tune(cfg), skip_fine_tune()] >> evaluation
    publish(cfg, evaluation)


# shared by both DAGs: one run at a time (runs share the champion), bounded, retried, documented
DAG_SETTINGS = {
    "start_date": datetime(2026, 1, 1),
    "catchup": False,
    "max_active_runs": 1,
    "dagrun_timeout": timedelta(hours=8),
    "default_args": DEFAULT_ARGS,
    "params": PARAMS,
    "doc_md": __doc__,
}


@dag(dag_id="transfer_learning", schedule=None, tags=["ml", "transfer-learning"], **DAG_SETTINGS)
def transfer_learning() -> None:
    transfer_learning_pipeline()


@dag(dag_id="transfer_learning_retrain", schedule=RETRAIN_SCHEDULE, tags=["ml", "transfer-learning", "scheduled"],
     **DAG_SETTINGS)
def transfer_learning_retrain() -> None:
    transfer_learning_pipeline(overrides_variable=RETRAIN_PARAMS_VARIABLE)


transfer_learning()
transfer_learning_retrain()
