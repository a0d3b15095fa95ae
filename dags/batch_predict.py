"""Batch scoring with a published model: list_images → score_shard (one mapped task per shard) →
merge_predictions.

Scores a folder, an S3 prefix or an archive of images with the champion (or a given version) of a model from
one of the deployment's publish locations, and writes per-image predictions (Parquet + CSV), a summary and a
gallery of the least confident predictions (the run's "Predictions" tab, plugins/ml_predictions.py). Shards
are keyed by content, so a re-run on the same images and model reuses finished shards. The scoring tasks run on
the score queue (TLP_SCORE_QUEUE, default the train queue: a GPU worker can take them), at most
TLP_SCORE_PARALLELISM at once per run. Every task body is one call into `tasks/`.

list_images also refuses undeclared conf keys and fixes the model version for every shard (in the listing, on
the run root): a separate configure task cost a task's start and its XComs on every run, and the shards and the
merge rebuild their config from the run's params anyway. Tasks return one XCom each (`multiple_outputs=False`),
not one per key of their dict.
"""
from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.sdk import (
    Asset,
    AssetAlias,
    ExceptionRetryPolicy,
    Param,
    RetryAction,
    RetryRule,
    dag,
    get_current_context,
    task,
)

from tasks import settings
from tasks.batch_config import BatchConfig, param_specs

SETTINGS = settings.load()
PREDICTIONS_ALIAS = AssetAlias("tlpipe-predictions")
RETRY_POLICY = ExceptionRetryPolicy(rules=[
    RetryRule(exception="tasks.errors.PermanentError", action=RetryAction.FAIL,
              reason="invalid input: fix what the error names and trigger again"),
    RetryRule(exception="tasks.errors.TransientError", action=RetryAction.RETRY,
              reason="a network or object-store failure that may pass"),
])
DEFAULT_ARGS = {
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=10),
    "execution_timeout": timedelta(hours=1),
    "retry_policy": RETRY_POLICY,
}
PARAMS = {name: Param(default, **schema) for name, (default, schema) in param_specs().items()}


def _config(params: dict) -> BatchConfig:
    """Build and check the config from the run's params in this task's process; point storage at the model store.

    The run's identity (which folder of the run root it writes) comes from Airflow's context, not from XCom.
    """
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    from tasks.storage import s3_env

    deployment = settings.load()
    try:
        conn = Connection.get(deployment.model_store_conn_id)
        os.environ.update(s3_env(conn.login, conn.password, conn.extra_dejson))
    except AirflowNotFoundException:
        pass  # no connection: the worker's own AWS_* environment applies
    context = get_current_context()
    config = BatchConfig.from_params(params, run_root=deployment.run_root, dag_id=context["dag"].dag_id,
                                     run_id=context["run_id"])
    config.check_locations(deployment)
    return config


@dag(dag_id="batch_predict", schedule=None, start_date=datetime(2026, 1, 1), catchup=False, max_active_runs=4,
     dagrun_timeout=timedelta(hours=6), default_args=DEFAULT_ARGS, params=PARAMS, doc_md=__doc__,
     tags=["ml", "batch-scoring"])
def batch_predict() -> None:

    @task(multiple_outputs=False)
    def list_images(params: dict | None = None, dag_run=None) -> list[dict]:
        """Refuse undeclared conf keys, check the locations, fix the model version, list and shard the images."""
        from tasks.batch_config import check_conf
        from tasks.steps.list_images import list_images

        check_conf(dag_run.conf or {})
        return list_images(_config(params))

    @task(queue=SETTINGS.score_queue, max_active_tis_per_dagrun=SETTINGS.score_parallelism, multiple_outputs=False)
    def score_shard(shard: dict, params: dict | None = None) -> dict:
        from tasks.steps.score_shard import score_shard

        return score_shard(_config(params), shard)

    @task(outlets=[PREDICTIONS_ALIAS], multiple_outputs=False)
    def merge_predictions(scored: list, params: dict | None = None) -> dict:
        """Merges what the run root says the shards wrote (`scored` orders this task after them)."""
        from tasks.steps.merge_predictions import merge_predictions

        config = _config(params)
        result = merge_predictions(config)
        predictions = Asset(name=f"predictions-{config.model_name}", uri=_asset_uri(config.output_root))
        get_current_context()["outlet_events"][PREDICTIONS_ALIAS].add(predictions, extra=result)
        return result

    merge_predictions(score_shard.expand(shard=list_images()))


def _asset_uri(location: str) -> str:
    """An asset URI for a predictions location (a local folder as file://)."""
    return location if "://" in location else f"file://{location}"


batch_predict()
