"""Transfer learning on Airflow: acquire → subsample → train (per candidate) → select → decide → fine-tune? →
evaluate → publish.

Two DAGs run the same pipeline:
- `transfer_learning`: triggered by hand from the UI form (defaults = the offline demo);
- `transfer_learning_retrain`: on a cron schedule (env `TLP_RETRAIN_SCHEDULE`), with production params
  from the Airflow Variable `tlp_retrain_params` (JSON) over the same defaults.
Every task body is one call into `tasks/`; TensorFlow is only imported inside task bodies. Each edge
carries the small dict (URIs, hashes, metrics, decisions) the next step reads; big artifacts stay under
the run's run root. Object storage credentials come from the Airflow connection `model_store`.
"""
from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.sdk import (Asset, AssetAlias, ExceptionRetryPolicy, Label, Param, RetryAction, RetryRule, TriggerRule,
                         dag, get_current_context, task)

from airflow.providers.standard.operators.hitl import HITLOperator

from tasks import approval, settings
from tasks.config import RunConfig, param_specs

SETTINGS = settings.load()
CHAMPION_ALIAS = AssetAlias("tlpipe-champion")

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
APPROVAL_PARAMS = {approval.COMMENT: Param("", type="string", title="Comment",
                                           description="Why (kept with the promotion decision)")}
# The trigger form, generated from RunConfig's own field metadata (one place per rule).
PARAMS = {name: Param(default, **schema) for name, (default, schema) in param_specs(RunConfig()).items()}


def _config(cfg: dict, winner: dict | None = None) -> RunConfig:
    """Rebuild the config in this task's process and point storage at the model store.

    `cfg` comes from XCom, which whoever may trigger runs may also edit: it is
    validated again as the trigger form is, with the run root from the deployment
    settings, the run's identity from Airflow and the publish location checked
    (tasks.config.trusted_config). A `conn://<connection id>` source is resolved
    here, in this process only: its credentials never reach XCom or a log.
    Steps after `select` get the winning candidate's config: its backbone, image size and artifacts.
    """
    import dataclasses

    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    from tasks.config import trusted_config
    from tasks.datasets import connection_id, connection_source
    from tasks.storage import s3_env

    try:
        conn = Connection.get(settings.load().model_store_conn_id)
        os.environ.update(s3_env(conn.login, conn.password, conn.extra_dejson))
    except AirflowNotFoundException:
        pass  # no connection: the worker's own AWS_* environment applies
    dag_run = get_current_context()["dag_run"]
    config = trusted_config(cfg, dag_run.run_id, dag_run.dag_id, settings.load())
    if connection_id(config.source):
        try:
            source = Connection.get(connection_id(config.source))
        except AirflowNotFoundException as error:
            from tasks.errors import DatasetError

            raise DatasetError(f"source {config.source}: no Airflow connection {connection_id(config.source)!r}; "
                               "create it (Admin > Connections) or fix the id") from error
        config = dataclasses.replace(config, source=connection_source(
            config.source, source.conn_type, source.host, source.login, source.password, source.port,
            source.schema, source.extra_dejson))
    if winner is None:
        return config
    from tasks.config import Candidate

    return config.for_candidate(Candidate(winner["backbone"], winner["image_size"], winner["candidate"]))


def transfer_learning_pipeline(dag_id: str, overrides_variable: str | None = None) -> None:
    """The task graph shared by the manual and the scheduled DAG (with an approval step where the deployment
    asks for one: TLP_APPROVAL_DAGS)."""

    @task(show_return_value_in_logs=False)  # the config may hold a source URL with credentials
    def configure(params: dict | None = None, dag_run=None) -> dict:
        """Refuse undeclared conf keys, validate the params once; later tasks get this config (and check it again)."""
        from tasks.config import check_conf, trusted_config

        check_conf(dag_run.conf or {})
        overrides = {}
        if overrides_variable:
            from airflow.sdk import Variable

            overrides = Variable.get(overrides_variable, default={}, deserialize_json=True)
            check_conf(overrides, origin=f"Variable {overrides_variable}")
        cfg = trusted_config({**params, **overrides}, dag_run.run_id, dag_run.dag_id, settings.load())
        return cfg.to_dict()

    @task
    def acquire(cfg: dict) -> dict:
        from tasks.steps.acquire import acquire

        return acquire(_config(cfg))

    @task
    def subsample(cfg: dict, acquired: dict) -> dict:
        from tasks.steps.subsample import subsample

        return subsample(_config(cfg), acquired)

    @task.short_circuit
    def check_changes(cfg: dict, data: dict) -> bool:
        """Data and config equal the champion's → every later task is skipped (the reason is in the log and in XCom
        key `changes`); else the change report goes on with the run."""
        from tasks.steps.check_changes import check_changes

        changes = check_changes(_config(cfg), data)
        get_current_context()["ti"].xcom_push(key="changes", value=changes)
        return changes["train"]

    @task
    def candidates(cfg: dict) -> list[dict]:
        """The backbones to compare (one unless the `candidates` param lists several): train maps over them."""
        from dataclasses import asdict

        from tasks.config import candidate_list

        return [asdict(candidate) for candidate in candidate_list(_config(cfg))]

    @task(queue=SETTINGS.train_queue)
    def train(cfg: dict, data: dict, candidate: dict) -> dict:
        from tasks.steps.train import train_candidate

        return train_candidate(_config(cfg), data, candidate)

    @task(trigger_rule=TriggerRule.ALL_DONE_MIN_ONE_SUCCESS)  # runs when every candidate is done, failed or not
    def select(cfg: dict, trained: list) -> dict:
        """Rank the candidates on validation accuracy (a failed one is listed with its error); the winner goes on."""
        from tasks.steps.select import select

        return select(_config(cfg), list(trained))

    @task.branch
    def decide(cfg: dict, best: dict) -> str:
        """Branch on the plateau rule; the decision and its reason also go to XCom key `decision`."""
        from tasks.steps.decide import decide_step

        decision = decide_step(_config(cfg, best), best)
        get_current_context()["ti"].xcom_push(key="decision", value=decision)
        return "fine_tune" if decision["fine_tune"] else "skip_fine_tune"

    @task(queue=SETTINGS.train_queue)
    def fine_tune(cfg: dict, best: dict) -> dict:
        from tasks.steps.fine_tune import fine_tune

        return fine_tune(_config(cfg, best), best)

    @task
    def skip_fine_tune() -> dict:
        return {"fine_tuned": False}

    @task(queue=SETTINGS.train_queue, trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    def evaluate(cfg: dict, data: dict, best: dict) -> dict:
        """Evaluates the winner's kept model (the better phase): runs after whichever branch ran."""
        from tasks.steps.evaluate import evaluate

        return evaluate(_config(cfg, best), data)

    @task
    def publish_version(cfg: dict, evaluation: dict, best: dict) -> dict:
        """Serving check, TFLite variants, a verified version of the winner's model; judges whether it may
        replace the champion."""
        from tasks.steps.publish_version import publish_version

        return publish_version(_config(cfg, best), evaluation)

    @task.branch
    def approval_gate(published: dict) -> str:
        """Only a candidate the rule would promote waits for a human; the others go straight to promote."""
        return "approval_request" if published["eligible"] else "promote"

    @task(multiple_outputs=True)
    def approval_request(cfg: dict, published: dict) -> dict:
        """What the approver reads: champion vs candidate on the same test images, what changed in the data, links
        to the report."""
        from tasks.steps.check_changes import recorded_changes

        return approval.approval_request(published, recorded_changes(_config(cfg)))

    @task(outlets=[CHAMPION_ALIAS], trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    def promote(cfg: dict, published: dict, approval: dict | None) -> dict:
        """Moves the champion when eligible (and approved, where approval is asked); records who and why."""
        from tasks.steps.check_changes import hold_for_shift
        from tasks.steps.promote import promote

        result = promote(_config(cfg), hold_for_shift(_config(cfg), published, approval), approval)
        if result["promoted"]:
            champion = Asset(name=f"champion-{cfg['model_name']}",
                             uri=f"{cfg['publish_uri'].rstrip('/')}/{cfg['model_name']}/champion.json")
            get_current_context()["outlet_events"][CHAMPION_ALIAS].add(champion, extra=result)
        return result

    cfg = configure()
    data = subsample(cfg, acquire(cfg))
    backbones = candidates(cfg)
    check_changes(cfg, data) >> Label("data or config changed since the champion") >> backbones
    trained = train.partial(cfg=cfg, data=data).expand(candidate=backbones)
    best = select(cfg, trained)
    branch = decide(cfg, best)
    evaluation = evaluate(cfg, data, best)
    branch >> [fine_tune(cfg, best), skip_fine_tune()] >> evaluation
    published = publish_version(cfg, evaluation, best)
    if dag_id not in SETTINGS.approval_dags:
        promote(cfg, published, None)
        return
    request = approval_request(cfg, published)
    approve = HITLOperator(task_id="approve", subject=request["subject"], body=request["body"],
                           options=approval.OPTIONS, defaults=[approval.REJECT], params=APPROVAL_PARAMS,
                           response_timeout=timedelta(hours=SETTINGS.approval_timeout_hours))
    approval_gate(published) >> [request, promote(cfg, published, approve.output)]
    request >> approve


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
    transfer_learning_pipeline("transfer_learning")


def retrain_schedule():
    """The cron; or the cron or new training data, when the deployment names the data's prefix to watch
    (TLP_RETRAIN_WATCH_URI). A producer DAG that lists the same Asset as an outlet also starts a retrain."""
    if not SETTINGS.retrain_watch_uri:
        return SETTINGS.retrain_schedule
    from airflow.sdk import AssetOrTimeSchedule, AssetWatcher, CronTriggerTimetable
    from s3_prefix_trigger import S3PrefixChangedTrigger  # plugins/: on the triggerer's and parser's sys.path

    watcher = AssetWatcher(name="tlpipe-training-data-watcher", trigger=S3PrefixChangedTrigger(
        SETTINGS.retrain_watch_uri, SETTINGS.retrain_watch_interval_s, SETTINGS.model_store_conn_id))
    data = Asset(name="tlpipe-training-data", uri=SETTINGS.retrain_watch_uri, watchers=[watcher])
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(SETTINGS.retrain_schedule, timezone="UTC"),
                               assets=[data])


@dag(dag_id="transfer_learning_retrain", schedule=retrain_schedule(),
     tags=["ml", "transfer-learning", "scheduled"], **DAG_SETTINGS)
def transfer_learning_retrain() -> None:
    transfer_learning_pipeline("transfer_learning_retrain", overrides_variable=SETTINGS.retrain_params_variable)


transfer_learning()
transfer_learning_retrain()
