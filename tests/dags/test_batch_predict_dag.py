"""The batch_predict DAG: its shape, and a whole run in-process (dag.test) against SeaweedFS on a folder with
unreadable files."""
from __future__ import annotations

import pytest

from tasks import artifacts, storage
from tasks.batch_config import BatchConfig
from tests.helpers.batch import MODEL_NAME, UNREADABLE, batch_folder, publish_tiny
from tests.helpers.runs import ROOT

DAG_ID = "batch_predict"


def load_dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags[DAG_ID]


def test_shards_are_mapped_bounded_and_on_the_score_queue(monkeypatch):
    monkeypatch.setenv("TLP_SCORE_QUEUE", "gpu")
    monkeypatch.setenv("TLP_SCORE_PARALLELISM", "3")
    dag = load_dag()

    score = dag.task_dict["score_shard"]
    assert score.queue == "gpu" and score.max_active_tis_per_dagrun == 3
    assert dag.task_dict["list_images"].upstream_task_ids == set(), "list_images fixes the version: no configure"
    assert dag.task_dict["list_images"].downstream_task_ids == {"score_shard"}
    assert dag.task_dict["score_shard"].downstream_task_ids == {"merge_predictions"}
    assert dag.task_dict["merge_predictions"].outlets, "the predictions emit an asset event"
    # one XCom per task: a dict return would otherwise also push one XCom per key (a request each)
    assert {task.task_id: task.multiple_outputs for task in dag.tasks} == {
        "list_images": False, "score_shard": False, "merge_predictions": False}
    assert set(dag.params.keys()) == {"images", "model_name", "model_version", "publish_uri", "predictions_uri",
                                      "shard_size", "top_k", "gallery_size"}


@pytest.mark.slow
def test_run_scores_a_folder_with_unreadable_files_and_emits_a_predictions_event(
        airflow_db, s3_bucket, model_store_connection, tmp_path, monkeypatch, cache_dir):
    publish_uri, predictions_uri = f"{s3_bucket}/models", f"{s3_bucket}/predictions"
    with monkeypatch.context() as patch:
        for key, value in model_store_connection.env().items():
            patch.setenv(key, value)
        champion = publish_tiny(publish_uri, cache_dir, tmp_path / "work")
    for key, value in {"TLP_RUN_ROOT": f"{s3_bucket}/runs", "TLP_PUBLISH_URI": publish_uri,
                       "TLP_PREDICTIONS_URI": predictions_uri, "TLP_CACHE_DIR": cache_dir}.items():
        monkeypatch.setenv(key, value)
    folder = batch_folder(tmp_path / "images")

    dag_run = load_dag().test(run_conf={"images": str(folder), "model_name": MODEL_NAME, "shard_size": 4})

    states = {(ti.task_id, ti.map_index): ti.state for ti in dag_run.get_task_instances()}
    assert dag_run.state == "success", states
    assert sorted(index for task, index in states if task == "score_shard") == list(range(5))  # 20 images / 4
    merged = dag_run.get_task_instance("merge_predictions").xcom_pull(task_ids="merge_predictions")
    assert merged["n_scored"] == 18 and merged["n_unreadable"] == len(UNREADABLE)
    assert merged["model_version"] == champion["version"]
    pushed = {(ti.task_id, ti.map_index): xcom_keys(dag_run.run_id, ti.task_id, ti.map_index)
              for ti in dag_run.get_task_instances()}
    assert set(pushed.values()) == {("return_value",)}, pushed
    with monkeypatch.context() as patch:
        for key, value in model_store_connection.env().items():
            patch.setenv(key, value)
        cfg = BatchConfig(images=str(folder), model_name=MODEL_NAME, run_id=dag_run.run_id,
                          run_root=f"{s3_bucket}/runs")
        summary = storage.read_json(cfg.artifact(artifacts.BATCH_SUMMARY))
        assert sorted(item["path"] for item in summary["unreadable"]) == sorted(UNREADABLE)
        embedding = summary["embedding_shift"]  # the batch is drawn like the champion's reference sample
        assert embedding["status"] == "not shifted" and 0 <= embedding["auc"] <= 1, embedding
        assert embedding["n_batch"] == 18 and embedding["n_reference"] == 90 and merged["embedding_shifted"] is False
        assert storage.exists(cfg.artifact(artifacts.BATCH_GALLERY))
        assert storage.exists(merged["predictions"]["parquet"]) and storage.exists(merged["predictions"]["csv"])
    events = predictions_events()
    assert [event for event in events if event.get("summary_uri") == merged["summary_uri"]], events


def xcom_keys(run_id: str, task_id: str, map_index: int) -> tuple[str, ...]:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return tuple(sorted(session.scalars(select(XComModel.key).where(
            XComModel.dag_id == DAG_ID, XComModel.run_id == run_id, XComModel.task_id == task_id,
            XComModel.map_index == map_index))))


def predictions_events() -> list[dict]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(select(AssetEvent.extra, AssetModel.name).join(
            AssetModel, AssetEvent.asset_id == AssetModel.id)).all()
    return [extra for extra, name in rows if name == f"predictions-{MODEL_NAME}"]
