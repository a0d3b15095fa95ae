"""Promotion without TensorFlow, against a store in a temporary folder: the rule and its paired test, the
records promote trusts (and what it refuses), approval per model by named approvers.

Versions here are a few small files with a real checksums.json and a judgement record, as
publish_version leaves them; nothing is trained or scored, so each test takes milliseconds.
"""
from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from tasks import approval, promotion, registry, settings, storage
from tasks.config import RunConfig
from tasks.errors import PublishError
from tasks.promotion import Policy
from tasks.steps.promote import promote
from tests.helpers.runs import ROOT

pytestmark = pytest.mark.fast  # registry and promotion logic on a local store: no TensorFlow

MODEL = "tiny"
CLASSES = ["apple", "banana"]
OPEN = Policy(min_accuracy=0.0, margin=0.0, alpha=1.0, min_test_images=1)


@pytest.fixture(autouse=True)
def deployment(monkeypatch):
    """A deployment with no approval and a permissive rule; tests change what they are about."""
    for name in ("TLP_APPROVAL_MODELS", "TLP_APPROVERS", "TLP_APPROVAL_DAGS", "TLP_EVALUATION_SETS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TLP_MIN_TEST_IMAGES", "1")


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("TLP_PUBLISH_LOCATIONS", str(tmp_path / "models"))
    return str(tmp_path / "models")


def config(tmp_path, store: str, run_id: str = "run-1") -> RunConfig:
    return RunConfig(run_id=run_id, run_root=str(tmp_path / "runs"), publish_uri=store, model_name=MODEL,
                     classes=list(CLASSES))


def version_id(run_id: str, at: datetime | None = None) -> str:
    at = at or datetime.now(timezone.utc)
    return f"{at:%Y%m%dT%H%M%S}.{at.microsecond // 1000:03d}Z-" + hashlib.sha256(run_id.encode()).hexdigest()[:12]


def published(cfg: RunConfig, *, eligible: bool = True, accuracy: float = 0.9, judged_at: datetime | None = None,
              **judged) -> dict:
    """A complete version of `cfg`'s run (files + checksums.json) and the judgement publish_version records."""
    model_root = registry.model_root_of(cfg.publish_uri, cfg.model_name)
    version = version_id(cfg.run_id)
    version_uri = registry.version_uri_of(model_root, version)
    files = {"model/model.weights.h5": b"weights " + cfg.run_id.encode(), "metrics.json": b'{"accuracy": 0.9}',
             "params.json": json.dumps({"run_id": cfg.run_id}).encode()}
    for name, data in files.items():
        storage.write_bytes(storage.join(version_uri, name), data)
    storage.write_json(storage.join(version_uri, registry.CHECKSUMS),
                       {name: hashlib.sha256(data).hexdigest() for name, data in files.items()})
    judgement = {
        "eligible": eligible, "reason": "judged in the test", "new_accuracy": accuracy, "champion_accuracy": None,
        "gain": None, "gain_interval": None, "p_value": None, "n_test": 1000, "paired_test": None,
        "judged_on": "this run's test split", "min_accuracy": 0.0, "margin": 0.01, "alpha": 0.05,
        "min_test_images": 1000, "champion_version": None, "champion_decision": None,
        "version": version, "version_uri": version_uri, "model_name": cfg.model_name, "dag_id": cfg.dag_id,
        "run_id": cfg.run_id, "classes": list(CLASSES), "test_accuracy": accuracy,
        "report_uri": f"{version_uri}/report/index.html", "model_card_uri": f"{version_uri}/model_card.md",
        "serving_check": {"n_images": 8, "max_abs_diff": {"model": 0.0}, "tolerance": 1e-4},
        "tflite": {"status": "skipped", "variants": {}},
        "judged_at": (judged_at or datetime.now(timezone.utc)).isoformat(), **judged,
    }
    registry.write_judgement(model_root, judgement)
    return judgement


def answer(version: str, option: str = "Approve", *, user: str | None = "ana", triggered_by: str | None = "tom",
           at: datetime | None = None, comment: str = "") -> dict:
    """What the approval task records from Airflow's HITL event."""
    event = {"chosen_options": [option], "params_input": {"comment": comment},
             "responded_by_user": {"id": user, "name": user} if user else None,
             "responded_at": at or datetime.now(timezone.utc) + timedelta(seconds=1), "timedout": user is None}
    return approval.answer_from_hitl(event, version=version, triggered_by=triggered_by)


def require_approval(monkeypatch, models: str = MODEL, approvers: str = "ana,bea") -> None:
    monkeypatch.setenv("TLP_APPROVAL_MODELS", models)
    monkeypatch.setenv("TLP_APPROVERS", approvers)


# --- the paired test and the rule ---------------------------------------------------------------------------------

def test_mcnemar_mid_p_is_the_exact_one_sided_binomial_tail():
    # 10 images only the candidate gets right, 2 only the champion: P(X > 10) + P(X = 10) / 2, X ~ B(12, 1/2)
    assert promotion.mcnemar_mid_p(10, 2) == pytest.approx((12 + 1 + 66 / 2) / 4096)
    assert promotion.mcnemar_mid_p(4, 0) == pytest.approx(1 / 32)
    assert promotion.mcnemar_mid_p(5, 5) == pytest.approx(0.5)
    assert promotion.mcnemar_mid_p(300, 200) < 1e-5 < promotion.mcnemar_mid_p(230, 200)


def paired(n: int, candidate_only: int, champion_only: int, both: int) -> tuple[list[bool], list[bool]]:
    """Correctness per image for two models: `both` right for both, the discordant ones as given, the rest wrong."""
    new = [True] * both + [True] * candidate_only + [False] * champion_only
    old = [True] * both + [False] * candidate_only + [True] * champion_only
    rest = n - len(new)
    return new + [False] * rest, old + [False] * rest


def test_paired_comparison_reports_gain_interval_and_p_on_the_same_images():
    new, old = paired(10_000, candidate_only=330, champion_only=200, both=8_800)

    result = promotion.paired_comparison(new, old)

    assert result["gain"] == pytest.approx(0.013) and result["n_test"] == 10_000
    low, high = result["gain_interval"]
    assert low < 0.013 < high and high - low == pytest.approx(2 * 1.96 * math.sqrt(530) / 10_000, rel=0.05)
    assert result["p_value"] == pytest.approx(promotion.mcnemar_mid_p(330, 200))
    assert result["paired_test"] == promotion.PAIRED_TEST


def judged(n: int, candidate_only: int, champion_only: int, policy: Policy | None = None) -> dict:
    """The rule on a demo-like split: ~0.913 accuracy for the champion."""
    both = round(0.913 * n) - champion_only
    new, old = paired(n, candidate_only, champion_only, both)
    labels = {f"{i:05d}": "apple" for i in range(n)}
    candidate = {key: "apple" if right else "banana" for key, right in zip(sorted(labels), new, strict=False)}
    champion = {key: "apple" if right else "banana" for key, right in zip(sorted(labels), old, strict=False)}
    return promotion.judge_predictions(labels, candidate, {"version": "v-old", "decision": "promotions/x.json"},
                                       champion, "", policy or Policy.from_settings(), "the test's images")


def test_two_seeds_of_one_recipe_are_not_promoted_over_each_other_with_the_default_policy(monkeypatch):
    for name in ("TLP_PROMOTION_MARGIN", "TLP_PROMOTION_ALPHA", "TLP_MIN_TEST_IMAGES", "TLP_MIN_ACCURACY"):
        monkeypatch.delenv(name, raising=False)
    # demo numbers: 10,000 test images, ~0.913; seeds differ on ~435 images and by a few tenths of a point
    for candidate_only, champion_only in [(230, 205), (240, 195), (250, 185)]:
        result = judged(10_000, candidate_only, champion_only)
        assert not result["eligible"] and "does not beat" in result["reason"], result["reason"]
    better = judged(10_000, 320, 200)  # a real 1.2-point improvement
    assert better["eligible"] and better["p_value"] < 1e-6 and better["gain"] == pytest.approx(0.012)


def test_a_gain_above_the_minimum_effect_that_could_be_noise_is_not_promoted():
    result = judged(1000, 15, 5, Policy(min_accuracy=0.0, margin=0.01, alpha=0.01, min_test_images=1))

    assert result["gain"] == pytest.approx(0.01) and result["p_value"] > 0.01
    assert not result["eligible"] and "p <= 0.01" in result["reason"] and "95% interval" in result["reason"]


def test_a_significant_gain_below_the_minimum_effect_is_not_promoted():
    result = judged(10_000, 400, 300, Policy(min_accuracy=0.0, margin=0.02, alpha=0.05, min_test_images=1))

    assert result["p_value"] < 0.001 and not result["eligible"] and "minimum effect 0.02" in result["reason"]


def test_fewer_test_images_than_the_minimum_is_not_eligible_even_without_a_champion(monkeypatch):
    monkeypatch.setenv("TLP_MIN_TEST_IMAGES", "500")
    labels = {str(i): "apple" for i in range(20)}

    result = promotion.judge_predictions(labels, dict(labels), None, None, "", Policy.from_settings(), "its split")

    assert result["new_accuracy"] == 1.0 and not result["eligible"]
    assert "20 test images" in result["reason"] and "TLP_MIN_TEST_IMAGES" in result["reason"]


def test_without_a_champion_there_is_no_paired_test_but_the_fields_are_recorded():
    labels = {str(i): "apple" for i in range(10)}

    result = promotion.judge_predictions(labels, dict(labels), None, None, "", OPEN, "its split")

    assert result["eligible"] and result["reason"].startswith("no champion yet")
    assert {key: result[key] for key in ("gain", "gain_interval", "p_value", "paired_test", "n_test")} == {
        "gain": None, "gain_interval": None, "p_value": None, "paired_test": None, "n_test": 10}


# --- promote trusts the store, not what it is handed ----------------------------------------------------------------

def test_promote_takes_a_version_id_only_and_refuses_anything_else(tmp_path, store):
    cfg = config(tmp_path, store)
    real = published(cfg)
    forged = {**real, "version_uri": f"{tmp_path}/elsewhere/never-published", "eligible": True}

    for bad in (forged, "../../elsewhere", real["version"] + "/../x", "20261122T081500.123Z-3fa2b1c9d0e4/.."):
        with pytest.raises(PublishError, match="is not a version id"):
            promote(cfg, bad)

    assert registry.read_champion(store, MODEL) is None and registry.list_decisions(store, MODEL) == []


def test_promote_refuses_a_model_root_outside_the_deployments_publish_locations(tmp_path, store):
    from tasks.errors import ConfigError

    elsewhere = config(tmp_path, str(tmp_path / "elsewhere"))
    version = published(elsewhere)["version"]

    with pytest.raises(ConfigError, match="not a publish location"):
        promote(elsewhere, version)

    assert registry.read_champion(str(tmp_path / "elsewhere"), MODEL) is None


def test_a_version_never_published_is_not_promoted(tmp_path, store):
    cfg = config(tmp_path, store)

    with pytest.raises(PublishError, match="has no recorded judgement"):
        promote(cfg, version_id("never"))

    assert registry.read_champion(store, MODEL) is None


def test_eligibility_comes_from_the_recorded_judgement(tmp_path, store):
    cfg = config(tmp_path, store)
    version = published(cfg, eligible=False, reason="0.4000 is below the floor")["version"]

    result = promote(cfg, version)

    assert not result["promoted"] and result["reason"] == "0.4000 is below the floor"
    assert registry.read_champion(store, MODEL) is None


def test_a_version_another_run_published_is_not_promoted_by_this_run(tmp_path, store):
    other = published(config(tmp_path, store, "run-other"))

    with pytest.raises(PublishError, match="published by run 'run-other'.*not by this run"):
        promote(config(tmp_path, store, "run-1"), other["version"])

    assert registry.read_champion(store, MODEL) is None


def test_a_tampered_version_fails_verification_and_is_not_promoted(tmp_path, store):
    cfg = config(tmp_path, store)
    judgement = published(cfg)
    storage.write_bytes(storage.join(judgement["version_uri"], "model", "model.weights.h5"), b"swapped weights")

    with pytest.raises(PublishError, match="model/model.weights.h5 does not match its sha256"):
        promote(cfg, judgement["version"])

    assert registry.read_champion(store, MODEL) is None


def test_promotion_records_the_paired_test_in_the_decision(tmp_path, store):
    cfg = config(tmp_path, store)
    version = published(cfg, gain=0.012, gain_interval=[0.006, 0.018], p_value=2e-7, n_test=10_000,
                        paired_test=promotion.PAIRED_TEST)["version"]

    result = promote(cfg, version)

    [decision] = registry.list_decisions(store, MODEL)
    assert result["promoted"] and decision["promoted"]
    assert {key: decision[key] for key in ("gain", "gain_interval", "p_value", "n_test", "paired_test")} == {
        "gain": 0.012, "gain_interval": [0.006, 0.018], "p_value": 2e-7, "n_test": 10_000,
        "paired_test": promotion.PAIRED_TEST}
    assert result["p_value"] == 2e-7 and registry.read_champion(store, MODEL)["version"] == version


# --- approval per model, by named approvers, never the triggering user ----------------------------------------------

@pytest.mark.parametrize("recorded, status", [
    (None, "missing"),
    ("pending", "missing"),
    ("expired", "expired"),
    ("self", "self-approval"),
    ("stranger", "not an approver"),
    ("stale", "stale"),
    ("reject", "rejected"),
])
def test_without_a_fresh_approve_by_an_approver_nothing_is_promoted(tmp_path, store, monkeypatch, recorded, status):
    require_approval(monkeypatch)
    cfg = config(tmp_path, store)
    version = published(cfg)["version"]
    answers = {
        "pending": approval.pending(version),
        "expired": answer(version, "Reject", user=None),
        "self": answer(version, user="tom", triggered_by="tom"),
        "stranger": answer(version, user="mallory"),
        "stale": answer(version, at=datetime.now(timezone.utc) - timedelta(days=1)),
        "reject": answer(version, "Reject", comment="confuses apples"),
    }
    if recorded is not None:
        registry.write_approval(registry.model_root_of(store, MODEL), version, answers[recorded])

    result = promote(cfg, version, triggered_by="tom")

    assert not result["promoted"] and registry.read_champion(store, MODEL) is None
    [decision] = registry.list_decisions(store, MODEL)
    assert decision["approval"]["status"] == status and decision["approval"]["approved"] is False
    assert approval.verdict(decision["approval"]) in decision["reason"]


def test_the_triggering_user_cannot_approve_even_when_listed_as_an_approver(tmp_path, store, monkeypatch):
    require_approval(monkeypatch, approvers="ana,tom")
    cfg = config(tmp_path, store)
    version = published(cfg)["version"]
    registry.write_approval(registry.model_root_of(store, MODEL), version, answer(version, user="tom",
                                                                                   triggered_by=None))

    result = promote(cfg, version, triggered_by="tom")

    assert not result["promoted"] and result["approval"]["status"] == "self-approval"
    assert "who triggered the run" in result["reason"]


def test_an_approvers_fresh_approve_promotes_and_is_recorded(tmp_path, store, monkeypatch):
    require_approval(monkeypatch)
    cfg = config(tmp_path, store)
    version = published(cfg)["version"]
    registry.write_approval(registry.model_root_of(store, MODEL), version,
                            answer(version, user="bea", comment="gallery looks right"))

    result = promote(cfg, version, triggered_by="tom")

    assert result["promoted"] and "approved by bea (bea): 'gallery looks right'" in result["reason"]
    assert registry.list_decisions(store, MODEL)[0]["approval"]["by"] == "bea (bea)"


def test_an_expired_request_is_recorded_as_expired(tmp_path, store, monkeypatch):
    require_approval(monkeypatch)
    cfg = config(tmp_path, store)
    version = published(cfg)["version"]
    registry.write_approval(registry.model_root_of(store, MODEL), version, answer(version, "Reject", user=None))

    promote(cfg, version, triggered_by="tom")

    [decision] = registry.list_decisions(store, MODEL)
    assert decision["approval"]["status"] == "expired" and decision["approval"]["timed_out"] is True
    assert "expired" in decision["reason"]


def test_approval_is_per_model_not_per_dag(tmp_path, store, monkeypatch):
    require_approval(monkeypatch, models=f"other-model,{store}/{MODEL}-b")
    deployment = settings.load()
    assert not deployment.approval_required(store, MODEL)
    assert deployment.approval_required(store, "other-model") and deployment.approval_required(store, f"{MODEL}-b")
    assert not deployment.approval_required(f"{tmp_path}/elsewhere", f"{MODEL}-b")
    monkeypatch.setenv("TLP_APPROVAL_MODELS", "*")
    assert settings.load().approval_required(store, MODEL)
    cfg = config(tmp_path, store)
    result = promote(cfg, published(cfg)["version"], triggered_by="tom")  # every DAG publishing MODEL waits
    assert not result["promoted"] and result["approval"]["status"] == "missing"


def test_approval_settings_fail_loudly_when_they_cannot_hold(monkeypatch):
    monkeypatch.setenv("TLP_APPROVAL_DAGS", "transfer_learning_retrain")
    with pytest.raises(ValueError, match="TLP_APPROVAL_MODELS"):
        settings.load()
    monkeypatch.delenv("TLP_APPROVAL_DAGS")
    monkeypatch.setenv("TLP_APPROVAL_MODELS", MODEL)
    with pytest.raises(ValueError, match="TLP_APPROVERS names nobody"):
        settings.load()


def test_approval_request_reads_the_judgement_with_its_noise_and_one_link_per_line(tmp_path, store):
    first = published(config(tmp_path, store))
    compared = {**first, "champion_version": "20261101T000000.000Z-aaaaaaaaaaaa", "champion_accuracy": 0.905,
                "new_accuracy": 0.911, "gain": 0.006, "gain_interval": [-0.002, 0.014], "p_value": 0.07,
                "paired_test": promotion.PAIRED_TEST}

    alone, against = approval.approval_request(first), approval.approval_request(compared)

    assert alone["subject"] == f"Promote {MODEL} {first['version']} (0.9000, no champion yet)?"
    assert "not comparable" not in alone["subject"] and "| champion | none yet | |" in alone["body"]
    assert against["subject"].endswith("(0.9110, champion 0.9050)?")
    assert "Gain +0.0060, 95% interval [-0.0020, +0.0140], p = 0.07" in against["body"]
    assert "may be noise" in against["body"]
    lines = against["body"].splitlines()
    assert {f"- Report: {first['report_uri']}", f"- Model card: {first['model_card_uri']}",
            f"- Version: {first['version_uri']}"} <= set(lines)  # one per line, as a Markdown list


def test_promotion_logic_imports_no_tensorflow():
    code = ("import sys; import tasks.steps.promote, tasks.promotion, tasks.registry, tasks.approval; "
            "print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
