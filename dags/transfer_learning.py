"""Transfer learning on Airflow: acquire → subsample → train (per candidate) → select → decide → fine-tune? →
evaluate → publish_version → (approve, for a model the deployment wants approved) → promote.

Two DAGs run the same pipeline:
- `transfer_learning`: triggered by hand from the UI form (defaults = the offline demo);
- `transfer_learning_retrain`: on a cron schedule (env `TLP_RETRAIN_SCHEDULE`), with production params
  from the Airflow Variable `tlp_retrain_params` (JSON) over the same defaults.
Every task body is one call into `tasks/`; TensorFlow is only imported inside task bodies. Each edge
carries the small dict (URIs, hashes, metrics, decisions) the next step reads, the model included: select
hands the winner's model to fine_tune and evaluate, fine_tune hands over its own, and evaluate keeps the
better one and hands it to publish. Big artifacts stay under the run's run root (tasks/artifacts.py says
which step writes and which reads each). The graph has three groups: data, training and release. Object
storage credentials come from the Airflow connection `model_store`.
"""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import (
    Asset,
    AssetAlias,
    ExceptionRetryPolicy,
    Label,
    Param,
    RetryAction,
    RetryRule,
    TaskGroup,
    TriggerRule,
    dag,
    get_current_context,
    task,
)

from tasks import approval, settings, tf_logging
from tasks.config import RunConfig, param_specs

tf_logging.install()  # every task process parses this file: its first TensorFlow import starts quietly
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
# A run may take RUN_TIMEOUT besides the approval wait; its timeout covers both and promote after them, so a late
# answer is recorded, never cut off (checked at parse time: check_timeouts).
RUN_TIMEOUT = timedelta(hours=SETTINGS.run_timeout_hours)
APPROVAL_TIMEOUT = timedelta(hours=SETTINGS.approval_timeout_hours)
# optional ("null" in its type): Airflow's form marks a plain string left empty as missing
APPROVAL_PARAMS = {approval.COMMENT: Param(None, type=["null", "string"], title="Comment",
                                           description="Why (optional; kept with the promotion decision)")}
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
    from tasks.storage import use_credentials

    try:
        use_credentials(Connection.get(settings.load().model_store_conn_id))
    except AirflowNotFoundException:
        pass  # no connection: the worker's own AWS_* environment applies
    dag_run = get_current_context()["dag_run"]
    config = trusted_config(cfg, dag_run.run_id, dag_run.dag_id, settings.load())
    for name in ("source", "test_source"):  # the test source may be kept in a connection too
        uri = getattr(config, name)
        if connection_id(uri):
            try:
                source = Connection.get(connection_id(uri))
            except AirflowNotFoundException as error:
                from tasks.errors import DatasetError

                raise DatasetError(f"{name} {uri}: no Airflow connection {connection_id(uri)!r}; "
                                   "create it (Admin > Connections) or fix the id") from error
            config = dataclasses.replace(config, **{name: connection_source(
                uri, source.conn_type, source.host, source.login, source.password, source.port,
                source.schema, source.extra_dejson)})
    if winner is None:
        return config
    from tasks.config import Candidate

    return config.for_candidate(Candidate(winner["backbone"], winner["image_size"], winner["candidate"]))


def transfer_learning_pipeline(dag_id: str, overrides_variable: str | None = None) -> None:
    """The task graph shared by the manual and the scheduled DAG. Every run can wait for approval: the gate sends an
    eligible candidate of a model the deployment wants approved (TLP_APPROVAL_MODELS) to `approve`."""

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
        """The backbones to compare (one unless the `candidates` param lists several), each at its image size (auto
        decided here from the manifest's image statistics): train maps over them."""
        from dataclasses import asdict

        from tasks.config import planned_candidates

        return [asdict(candidate) for candidate in planned_candidates(_config(cfg))]

    @task(queue=SETTINGS.train_queue)
    def train(cfg: dict, data: dict, candidate: dict) -> dict:
        """Feature extraction for one candidate; returns its model, history and summary."""
        from tasks.steps.train import train

        return train(_config(cfg), data, candidate)

    @task(trigger_rule=TriggerRule.ALL_DONE_MIN_ONE_SUCCESS)  # runs when every candidate is done, failed or not
    def select(cfg: dict, trained: list) -> dict:
        """Rank the candidates on validation accuracy (a failed one is listed with its error); the winner's model
        goes on."""
        from tasks.steps.select import select

        return select(_config(cfg), list(trained))

    @task.branch
    def decide(cfg: dict, data: dict, best: dict) -> str:
        """Branch on the plateau rule; the decision and its reason also go to XCom key `decision`."""
        from tasks.steps.decide import decide

        decision = decide(_config(cfg, best), data, best)
        get_current_context()["ti"].xcom_push(key="decision", value=decision)
        return "fine_tune" if decision["fine_tune"] else "skip_fine_tune"

    @task(queue=SETTINGS.train_queue)
    def fine_tune(cfg: dict, data: dict, best: dict) -> dict:
        """Fine-tunes the winner's model; returns the fine-tuned model, history and summary."""
        from tasks.steps.fine_tune import fine_tune

        return fine_tune(_config(cfg, best), data, best)

    @task(queue=SETTINGS.train_queue, trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    def evaluate(cfg: dict, data: dict, best: dict, tuned: dict | None) -> dict:
        """Keeps the better of the winner's model and the fine-tuned one (None when skipped) and scores it on the
        test split: runs after whichever branch ran."""
        from tasks.steps.evaluate import evaluate

        return evaluate(_config(cfg, best), data, best, tuned)

    @task
    def publish_version(cfg: dict, evaluation: dict, best: dict) -> dict:
        """Serving check, TFLite variants, a verified version of the winner's model; judges whether it may
        replace the champion."""
        from tasks.steps.publish_version import publish_version

        return publish_version(_config(cfg, best), evaluation)

    @task.branch
    def approval_gate(cfg: dict, published: dict) -> str:
        """Routes an eligible candidate of a model that needs approval to a human; the rest go straight to promote.
        Routing only: promote checks both again from the store and fails closed."""
        needed = settings.load().approval_required(cfg["publish_uri"], cfg["model_name"])
        return "approve" if needed and published["eligible"] else "promote"

    # ALL_DONE, not ALL_DONE_MIN_ONE_SUCCESS: that rule skips a task with any skipped upstream, and `approve` is
    # skipped whenever the gate routes straight here
    @task(outlets=[CHAMPION_ALIAS], trigger_rule=TriggerRule.ALL_DONE)
    def promote(cfg: dict, published: dict | None, dag_run=None) -> dict:
        """Moves the champion when the recorded judgement allows it (and an approver approved, where the model
        needs approval); records who and why. Runs also when `approve` was skipped, failed or expired, to record
        that; never when publish_version did not publish."""
        from tasks import registry, storage
        from tasks.errors import PublishError
        from tasks.steps.promote import promote

        if not published:
            raise PublishError("publish_version published no version in this run: nothing to promote; see its log")
        config = _config(cfg)
        result = promote(config, published["version"], triggered_by=dag_run.triggering_user_name)
        if result["promoted"]:
            root = registry.model_root_of(config.publish_uri, config.model_name)
            champion = Asset(name=f"champion-{config.model_name}", uri=storage.join(root, registry.CHAMPION))
            get_current_context()["outlet_events"][CHAMPION_ALIAS].add(champion, extra=result)
        return result

    cfg = configure()
    # groups keep the graph readable at its default zoom; task ids stay unprefixed (README, plugin and tests use them)
    with TaskGroup("data", prefix_group_id=False,
                   tooltip="acquire the source, subsample it into split files, compare them with the champion's"):
        data = subsample(cfg, acquire(cfg))
        changed = check_changes(cfg, data)
    with TaskGroup("training", prefix_group_id=False,
                   tooltip="feature extraction per candidate, select the winner, fine-tune on a plateau"):
        backbones = candidates(cfg)
        changed >> Label("data or config changed since the champion") >> backbones
        trained = train.partial(cfg=cfg, data=data).expand(candidate=backbones)
        best = select(cfg, trained)
        branch = decide(cfg, data, best)
        tuned = fine_tune(cfg, data, best)
        skip = EmptyOperator(task_id="skip_fine_tune")
        branch >> Label("plateau below target: fine-tune") >> tuned
        branch >> Label("no plateau, or target reached: keep feature extraction") >> skip
    with TaskGroup("release", prefix_group_id=False,
                   tooltip="keep the better model, evaluate it, publish a verified version, promote it"):
        evaluation = evaluate(cfg, data, best, tuned)
        skip >> evaluation
        published = publish_version(cfg, evaluation, best)
        approve = ApprovePromotion(task_id="approve", params=APPROVAL_PARAMS)
        promoted = promote(cfg, published)
        approval_gate(cfg, published) >> [approve, promoted]
        approve >> promoted


class ApprovePromotion(HITLOperator):
    """Airflow's human approval of a published version, read and recorded without trusting XCom.

    The request (subject, body) comes from the judgement publish_version recorded in the store; only the
    deployment's approvers but the user who triggered the run are assigned. The answer is taken from the
    event Airflow resumes this task with (its own HITL record: responded_by_user, chosen_options,
    responded_at, timedout) and written to the store, where promote reads it. A task can read no other
    task's HITL record (Airflow 3.3's execution API serves HITL details to their own task instance only,
    and the worker supervisor does not relay GetHITLDetailResponse), so the answer is recorded here.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**{"subject": "Promote a model?", "options": approval.OPTIONS, "defaults": [approval.REJECT],
                            "response_timeout": APPROVAL_TIMEOUT, **kwargs})

    def execute(self, context) -> Any:
        cfg, version = self._published(context)
        request = approval.ask(cfg.publish_uri, cfg.model_name, version, cfg.run_id, cfg.dag_id)
        from tasks.steps.check_changes import changes_note

        self.subject, self.body = request["subject"], request["body"] + changes_note(cfg)
        self.assigned_users = approval.assignees(settings.load().approvers,
                                                 context["dag_run"].triggering_user_name)
        return super().execute(context)

    def execute_complete(self, context, event: dict[str, Any]) -> dict:
        super().execute_complete(context, event)
        cfg, version = self._published(context)
        answer = approval.answer_from_hitl(event, version=version,
                                           triggered_by=context["dag_run"].triggering_user_name)
        approval.record_answer(cfg.publish_uri, cfg.model_name, answer)
        return answer

    @staticmethod
    def _published(context) -> tuple[RunConfig, str]:
        ti = context["ti"]
        return _config(ti.xcom_pull(task_ids="configure")), ti.xcom_pull(task_ids="publish_version")["version"]


# shared by both DAGs: one run at a time (runs share the champion), bounded, retried, documented
DAG_SETTINGS = {
    "start_date": datetime(2026, 1, 1),
    "catchup": False,
    "max_active_runs": 1,
    "dagrun_timeout": RUN_TIMEOUT + APPROVAL_TIMEOUT + DEFAULT_ARGS["execution_timeout"],
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
    from s3_prefix_trigger import S3PrefixChangedTrigger  # plugins/: importable by the triggerer and the parser

    watcher = AssetWatcher(name="tlpipe-training-data-watcher", trigger=S3PrefixChangedTrigger(
        SETTINGS.retrain_watch_uri, SETTINGS.retrain_watch_interval_s, SETTINGS.model_store_conn_id))
    data = Asset(name="tlpipe-training-data", uri=SETTINGS.retrain_watch_uri, watchers=[watcher])
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(SETTINGS.retrain_schedule, timezone="UTC"),
                               assets=[data])


@dag(dag_id="transfer_learning_retrain", schedule=retrain_schedule(),
     tags=["ml", "transfer-learning", "scheduled"], **DAG_SETTINGS)
def transfer_learning_retrain() -> None:
    transfer_learning_pipeline("transfer_learning_retrain", overrides_variable=SETTINGS.retrain_params_variable)


def check_timeouts(dag) -> None:
    """Refuse, at parse time, a DAG whose run timeout would kill a run still waiting for approval (or promoting
    after it): training may take RUN_TIMEOUT, then the approval wait, then promote."""
    approve, promote_ = dag.task_dict["approve"], dag.task_dict["promote"]
    needed = RUN_TIMEOUT + approve.response_timeout + promote_.execution_timeout
    if dag.dagrun_timeout is None or dag.dagrun_timeout < needed:
        raise ValueError(f"{dag.dag_id}: dagrun_timeout {dag.dagrun_timeout} is shorter than training "
                         f"({RUN_TIMEOUT}, TLP_RUN_TIMEOUT_HOURS) + the approval wait ({approve.response_timeout}, "
                         f"TLP_APPROVAL_TIMEOUT_HOURS) + promote ({promote_.execution_timeout})")
    longest = max(task.execution_timeout for task in dag.tasks if task.task_id != "approve")
    if longest > RUN_TIMEOUT:
        raise ValueError(f"{dag.dag_id}: a task may run {longest}, longer than the run's training budget {RUN_TIMEOUT} "
                         "(TLP_RUN_TIMEOUT_HOURS)")


for built in (transfer_learning(), transfer_learning_retrain()):
    check_timeouts(built)
