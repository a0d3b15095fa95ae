"""The DAG files parse fast and cleanly, and their graph, params and defaults are what users rely on."""
from __future__ import annotations

import json
import subprocess
import sys
from unittest import mock

import pytest

from tests.helpers.runs import ROOT

DAG_IDS = ("transfer_learning", "transfer_learning_retrain")


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


def test_dags_import_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert set(DAG_IDS) <= set(dagbag.dag_ids)


def test_parsing_makes_no_db_queries_and_no_connection_lookups():
    from airflow import settings
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk import BaseHook, Connection
    from sqlalchemy import event

    statements = []

    def count(*args, **kwargs):
        statements.append(args[2])

    engine = settings.engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        with mock.patch.object(BaseHook, "get_connection") as hook_lookup, \
                mock.patch.object(Connection, "get") as sdk_lookup:
            bag = DagBag(dag_folder=str(ROOT / "dags"))
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert bag.import_errors == {}
    assert statements == []
    hook_lookup.assert_not_called()
    sdk_lookup.assert_not_called()


def test_parsing_is_fast_and_does_not_import_tensorflow():
    # CPU seconds of the parse: what it costs the dag-processor, whatever else the machine (or xdist) runs
    code = ("import sys, time; "
            "from airflow.dag_processing.dagbag import DagBag; "
            "t = time.process_time(); DagBag(dag_folder=sys.argv[1]); "
            "print(time.process_time() - t, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "dags")], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.split()
    seconds, tf_loaded = float(out[-2]), out[-1]
    assert tf_loaded == "False"
    assert seconds < 2.0


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_graph_reads_like_the_pipeline(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    downstream = {t.task_id: t.downstream_task_ids for t in dag.tasks}
    assert downstream["acquire"] == {"subsample"}
    assert downstream["subsample"] == {"check_changes", "train", "decide", "fine_tune", "evaluate"}
    assert downstream["check_changes"] == {"candidates"}  # unchanged since the champion: everything after skips
    assert dag.task_dict["check_changes"].ignore_downstream_trigger_rules  # evaluate's rule cannot bring it back
    assert downstream["candidates"] == {"train"}
    assert downstream["train"] == {"select"}
    # the winner's model, history and summary go on
    assert downstream["select"] == {"decide", "fine_tune", "evaluate", "publish_version"}
    assert downstream["decide"] == {"fine_tune", "skip_fine_tune"}
    assert downstream["fine_tune"] == downstream["skip_fine_tune"] == {"evaluate"}  # the fine-tuned model, or none
    assert downstream["evaluate"] == {"publish_version"}  # the kept model
    assert downstream["publish_version"] == {"approval_gate", "promote"}
    assert downstream["approval_gate"] == {"approve", "promote"} and downstream["approve"] == {"promote"}
    # promote runs when approve was skipped (the gate routed straight to it), failed or expired too, to record that
    # no approval came (all_done_min_one_success would skip it whenever approve is skipped)
    assert dag.task_dict["promote"].trigger_rule == "all_done"
    assert dag.task_dict["decide"].task_type == "_BranchPythonDecoratedOperator"
    assert dag.task_dict["skip_fine_tune"].task_type == "EmptyOperator"
    assert dag.task_dict["evaluate"].trigger_rule == "none_failed_min_one_success"
    # select runs when every candidate is done (it lists the failed ones, and fails if all failed), but not when
    # configure failed: then nothing upstream succeeded
    assert dag.task_dict["select"].trigger_rule == "all_done_min_one_success"
    assert type(dag.task_dict["train"]).__name__.endswith("MappedOperator")  # one task instance per candidate


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_the_branch_edges_say_why_each_path_is_taken(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    assert "plateau" in dag.get_edge_info("decide", "fine_tune")["label"]
    assert "keep feature extraction" in dag.get_edge_info("decide", "skip_fine_tune")["label"]


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_tasks_are_grouped_into_data_training_and_release_with_their_plain_ids(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    groups = {task.task_id: task.task_group.group_id for task in dag.tasks}
    assert groups == {
        "configure": None, "acquire": "data", "subsample": "data", "check_changes": "data",
        **dict.fromkeys(("candidates", "train", "select", "decide", "fine_tune", "skip_fine_tune"), "training"),
        **dict.fromkeys(("evaluate", "publish_version", "approval_gate", "approve", "promote"), "release"),
    }


def parsed(env: dict[str, str], expression: str) -> str:
    """`expression` evaluated over the DAG bag parsed in a fresh process with `env` added to the environment."""
    code = ("from airflow.dag_processing.dagbag import DagBag; import sys, json, datetime; "
            f"bag = DagBag(dag_folder=sys.argv[1]); "
            f"dags = {{d: g for d, g in bag.dags.items() if d in {list(DAG_IDS)!r}}}; "
            f"print(json.dumps({expression}, default=str))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "dags")], capture_output=True, text=True,
                         check=True, cwd=ROOT, env={**__import__("os").environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_approval_is_asked_per_model_by_the_deployments_approvers_in_every_dag():
    env = {"TLP_APPROVAL_MODELS": "fashion-mnist-classifier", "TLP_APPROVERS": "ana,bea"}
    graphs = parsed(env, "{d: sorted(dags[d].task_dict['approval_gate'].downstream_task_ids) for d in dags}")
    assert graphs == {"transfer_learning": ["approve", "promote"], "transfer_learning_retrain": ["approve", "promote"]}
    old = parsed({"TLP_APPROVAL_DAGS": "transfer_learning_retrain"}, "bag.import_errors")
    assert "TLP_APPROVAL_MODELS" in "".join(old.values())  # the per-DAG setting is refused, not silently ignored
    nobody = parsed({"TLP_APPROVAL_MODELS": "fashion-mnist-classifier"}, "bag.import_errors")
    assert "TLP_APPROVERS names nobody" in "".join(nobody.values())


@pytest.mark.parametrize("hours", ["24", "72"])
def test_a_run_outlasts_training_and_the_approval_wait(hours):
    timeouts = parsed({"TLP_APPROVAL_TIMEOUT_HOURS": hours, "TLP_RUN_TIMEOUT_HOURS": "8"},
                      "{d: [dags[d].dagrun_timeout.total_seconds(), "
                      "dags[d].task_dict['approve'].response_timeout.total_seconds()] for d in dags}")
    for run, approval in timeouts.values():
        assert approval == float(hours) * 3600 and run > approval + 8 * 3600


def test_a_dag_whose_run_timeout_cannot_hold_the_approval_wait_is_refused_at_parse_time(dagbag):
    import importlib.util
    from datetime import timedelta

    spec = importlib.util.spec_from_file_location("tlp_dag_under_test", ROOT / "dags" / "transfer_learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag = dagbag.dags["transfer_learning"]
    short = mock.Mock(dag_id=dag.dag_id, task_dict=dag.task_dict, tasks=dag.tasks, dagrun_timeout=timedelta(hours=8))

    with pytest.raises(ValueError, match="shorter than training"):
        module.check_timeouts(short)
    module.check_timeouts(dag)


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_runs_are_safe_to_retry_and_bounded(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    assert dag.max_active_runs == 1
    assert dag.dagrun_timeout is not None
    for t in dag.tasks:
        assert t.retries >= 2, t.task_id
        assert t.retry_exponential_backoff, t.task_id
        assert t.execution_timeout is not None, t.task_id


def test_manual_dag_is_unscheduled_and_retrain_dag_has_a_cron(dagbag):
    assert type(dagbag.dags["transfer_learning"].timetable).__name__ == "NullTimetable"
    assert dagbag.dags["transfer_learning_retrain"].timetable.expression == "0 3 * * 1"


def test_retrain_schedule_comes_from_the_environment():
    code = ("from airflow.dag_processing.dagbag import DagBag; import sys; "
            "print(DagBag(dag_folder=sys.argv[1]).dags['transfer_learning_retrain'].timetable.expression)")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "dags")], capture_output=True, text=True,
                         check=True, cwd=ROOT, env={**__import__("os").environ, "TLP_RETRAIN_SCHEDULE": "15 4 * * *"})
    assert out.stdout.strip().endswith("15 4 * * *")


def test_retrain_dag_also_runs_when_its_watched_data_changes(tmp_path):
    code = ("from airflow.dag_processing.dagbag import DagBag; import sys, json; "
            "dag = DagBag(dag_folder=sys.argv[1]).dags['transfer_learning_retrain']; t = dag.timetable; "
            "assets = list(t.asset_condition.objects); "
            "print(json.dumps([type(t).__name__, t.timetable.expression, [a.uri for a in assets], "
            "[w.trigger.serialize() for a in assets for w in a.watchers]]))")
    env = {**__import__("os").environ, "TLP_RETRAIN_WATCH_URI": "s3://data/flowers/",
           "TLP_RETRAIN_WATCH_INTERVAL_S": "30"}
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "dags")], capture_output=True, text=True,
                         check=True, cwd=ROOT, env=env)
    kind, cron, uris, triggers = json.loads(out.stdout.strip().splitlines()[-1])
    assert kind == "AssetOrTimeSchedule" and cron == "0 3 * * 1" and uris == ["s3://data/flowers"]
    assert triggers == [["s3_prefix_trigger.S3PrefixChangedTrigger",
                         {"prefix": "s3://data/flowers/", "interval_s": 30.0, "conn_id": "model_store"}]]


REQUIRED_PARAMS = ("source", "classes", "train_percent", "val_fraction", "seed", "backbone", "image_size",
                   "batch_size", "epochs", "learning_rate", "augment", "fine_tune", "fine_tune_layers",
                   "fine_tune_epochs", "fine_tune_lr_factor", "patience", "min_delta", "target_accuracy",
                   "top_k_wrong", "model_name", "publish_uri", "backbone_weights", "source_sha256",
                   "train_count", "test_percent", "dropout")


def test_every_param_documents_itself(dagbag):
    params = dagbag.dags["transfer_learning"].params
    for name in REQUIRED_PARAMS:
        param = params.get_param(name)
        assert param.schema.get("title") and param.description, name
        assert "type" in param.schema, name


def test_form_params_are_exactly_the_config_params(dagbag):
    from tasks.config import RunConfig, param_specs

    specs = param_specs(RunConfig())
    params = dagbag.dags["transfer_learning"].params
    assert set(params.keys()) == set(specs)
    for name, (default, schema) in specs.items():
        param = params.get_param(name)
        assert param.value == default and {**param.schema, "description": param.description} == schema, name


def test_defaults_form_a_valid_run_config(dagbag):
    from tasks.config import RunConfig

    params = dagbag.dags["transfer_learning"].params.validate()
    cfg = RunConfig.from_params(params, run_id="manual__x")
    assert cfg.source == "idx://fashion_mnist" and cfg.backbone == "efficientnet_lite0"


@pytest.mark.parametrize("name, value", [
    ("epochs", "lots"), ("epochs", 0), ("train_percent", 150), ("fine_tune", "maybe"),
    ("model_name", "Bad Name"), ("image_size", 8), ("augment", "yes"),
])
def test_bad_params_are_rejected_before_a_run(dagbag, name, value):
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    params = ParamsDict(dict(dagbag.dags["transfer_learning"].params.items()))
    with pytest.raises(ParamValidationError, match=name):
        params[name] = value
        params.validate()


@pytest.mark.parametrize("error, action", [
    ("DownloadError", "retry"), ("StoreUnavailableError", "retry"),  # a network blip or a store that is down
    ("DatasetError", "fail"), ("ConfigError", "fail"), ("MissingInputError", "fail"), ("BackboneError", "fail"),
])
def test_retries_follow_the_failure_not_its_base_class(dagbag, error, action):
    from airflow.sdk import RetryAction

    from tasks import errors

    policy = dagbag.dags["transfer_learning"].task_dict["acquire"].retry_policy
    decision = policy.evaluate(getattr(errors, error)("x"), try_number=1, max_tries=3)
    assert decision.action == {"retry": RetryAction.RETRY, "fail": RetryAction.FAIL}[action]
    assert policy.evaluate(MemoryError(), try_number=1, max_tries=3).action == RetryAction.DEFAULT  # a lost worker
