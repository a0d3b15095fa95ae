"""What changed since the champion: fingerprints, per-class file diffs, class-prior and embedding shift."""
from __future__ import annotations

import numpy as np
import pytest

from tasks import data_changes
from tasks.config import RunConfig
from tests.helpers.changes import manifest as _manifest


@pytest.mark.fast
def test_data_fingerprint_follows_the_selection_and_class_order():
    base = _manifest({"a": [("1.jpg", "x")], "b": [("1.jpg", "y")]})
    assert data_changes.data_fingerprint(base) == data_changes.data_fingerprint(dict(base))
    assert data_changes.data_fingerprint(base) != data_changes.data_fingerprint({**base, "hash": "other"})
    assert data_changes.data_fingerprint(base) != data_changes.data_fingerprint({**base, "classes": ["b", "a"]})


@pytest.mark.fast
def test_config_fingerprint_ignores_where_a_run_lives_but_not_what_it_trains():
    params = RunConfig().to_public_dict()
    moved = {**params, "run_id": "other", "dag_id": "transfer_learning_retrain", "run_root": "/elsewhere",
             "skip_unchanged": False}
    assert data_changes.config_fingerprint(params) == data_changes.config_fingerprint(moved)
    assert data_changes.config_fingerprint(params) != data_changes.config_fingerprint({**params, "epochs": 3})
    assert data_changes.config_fingerprint(params) != data_changes.config_fingerprint({**params, "image_size": 64})
    assert data_changes.changed_fields(params, {**moved, "epochs": 3}) == ["epochs"]


@pytest.mark.fast
def test_a_winners_config_matches_the_config_that_listed_it():
    listed = RunConfig(candidates="efficientnet_lite0@64")
    from tasks.config import candidate_list

    winner = listed.for_candidate(candidate_list(listed)[0])
    assert data_changes.config_fingerprint(listed.to_public_dict()) == \
        data_changes.config_fingerprint(winner.to_public_dict())


@pytest.mark.fast
def test_file_changes_per_class():
    old = _manifest({"cat": [("1.jpg", "a"), ("2.jpg", "b"), ("3.jpg", "c")], "dog": [("1.jpg", "d")]})
    new = _manifest({"cat": [("1.jpg", "a"), ("2.jpg", "B"), ("4.jpg", "e")], "emu": [("1.jpg", "f")]},
                    classes=["cat", "emu"])
    changes = data_changes.file_changes(old, new)
    cat = changes["per_class"]["cat"]
    assert (cat["added"], cat["removed"], cat["changed"]) == (1, 1, 1)
    assert cat["examples"] == {"added": ["train/cat/4.jpg"], "removed": ["train/cat/3.jpg"],
                               "changed": ["train/cat/2.jpg"]}
    assert changes["per_class"]["dog"]["removed"] == 1 and changes["per_class"]["emu"]["added"] == 1
    assert changes["new_classes"] == ["emu"] and changes["missing_classes"] == ["dog"]
    assert changes["totals"] == {"added": 2, "removed": 2, "changed": 1}
    assert data_changes.new_image_hashes(old, new) == (["a", "b", "c", "d"], ["B", "e", "f"])


@pytest.mark.fast
def test_test_split_files_are_not_training_changes():
    old = _manifest({"cat": [("1.jpg", "a")]})
    new = {**old, "files": old["files"] + [{"split": "test", "path": "test/cat/9.jpg", "label": 0, "class": "cat",
                                            "sha256": "z"}]}
    assert data_changes.file_changes(old, new)["totals"] == {"added": 0, "removed": 0, "changed": 0}


@pytest.mark.fast
def test_prior_shift_detects_a_changed_class_balance_and_not_a_scaled_one():
    same = data_changes.prior_shift({"a": 100, "b": 100}, {"a": 200, "b": 200})
    shifted = data_changes.prior_shift({"a": 100, "b": 100}, {"a": 180, "b": 20})
    assert same["p_value"] > 0.99
    assert shifted["p_value"] < 1e-6 and shifted["dof"] == 1
    assert shifted["priors"]["a"] == {"before": 0.5, "after": 0.9}
    assert data_changes.prior_shift({"a": 5}, {"a": 9})["p_value"] is None


@pytest.mark.fast
def test_embedding_shift_separates_shifted_features_from_noise():
    rng = np.random.default_rng(0)
    old = rng.normal(size=(60, 16))
    same = data_changes.embedding_shift(old, rng.normal(size=(40, 16)))
    moved = data_changes.embedding_shift(old, rng.normal(size=(40, 16)) + np.r_[3.0, np.zeros(15)])
    assert moved["auc"] > 0.9 and moved["shifted"]
    assert same["auc"] < 0.7 and moved["auc"] > same["noise_band"][1]
    assert len(same["noise_band"]) == 2 and same["noise_band"][0] <= same["noise_band"][1]


@pytest.mark.fast
def test_embedding_shift_needs_a_few_images_per_side():
    assert data_changes.embedding_shift(np.zeros((2, 4)), np.zeros((9, 4)))["auc"] is None


@pytest.mark.fast
@pytest.mark.parametrize("auc,expected", [(0.5, 0.5), (1.0, 1.0)])
def test_auc_of_known_orderings(auc, expected):
    y = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4]) if auc == 1.0 else np.array([0.1, 0.3, 0.1, 0.3])
    assert data_changes._auc(y, scores) == expected



@pytest.mark.fast
def test_auc_ranks_ties_as_scipy_does():
    """The AUC's ranks (numpy, so the batch merge needs no SciPy import) are scipy.stats.rankdata's, ties included."""
    from scipy.stats import rankdata

    rng = np.random.default_rng(0)
    for values in (rng.integers(0, 4, 50).astype(float), rng.normal(size=200), np.zeros(3), np.array([2.0])):
        assert np.array_equal(data_changes._average_ranks(values), rankdata(values))
    y = rng.integers(0, 2, 200)
    scores = rng.integers(0, 5, 200).astype(float)
    ranks = rankdata(scores)
    positives = y == 1
    expected = (ranks[positives].sum() - positives.sum() * (positives.sum() + 1) / 2) / (positives.sum()
                                                                                         * (~positives).sum())
    assert data_changes._auc(y, scores) == pytest.approx(expected, abs=1e-12)

REPORT = {"champion_version": "v1", "data_changed": True, "config_changed": False, "changed_params": [],
          "files": data_changes.file_changes(_manifest({"cat": [("1.jpg", "a")]}),
                                             _manifest({"cat": [("1.jpg", "a"), ("2.jpg", "b")]})),
          "prior_shift": {"chi2": 3.2, "dof": 1, "p_value": 0.07},
          "embedding_shift": {"auc": 0.91, "noise_band": [0.45, 0.58], "shifted": True}}


@pytest.mark.fast
def test_change_report_reads_as_a_model_card_section():
    text = data_changes.markdown(REPORT)
    assert text.startswith("## Changes since the champion") and "champion `v1`" in text
    assert "| cat | 1 | 2 | 1 | 0 | 0 |" in text
    assert "p = 0.07" in text and "AUC 0.910" in text and "0.450-0.580" in text
    assert "+1 / -0 / ~0 training images" in data_changes.summary_line(REPORT)


@pytest.mark.fast
def test_shift_beyond_the_threshold_holds_promotion_and_noise_does_not():
    assert "AUC 0.910" in data_changes.shift_hold(REPORT, 0.8)
    assert data_changes.shift_hold(REPORT, 0.95) == ""
    assert data_changes.shift_hold(REPORT, 0.0) == ""
    noisy = {**REPORT, "embedding_shift": {"auc": 0.9, "noise_band": [0.5, 0.95], "shifted": False}}
    assert data_changes.shift_hold(noisy, 0.8) == ""


@pytest.mark.fast
def test_a_shift_beyond_the_threshold_makes_the_judgement_ineligible():
    judgement = {"eligible": True, "reason": "better than the champion"}
    assert data_changes.held(judgement, REPORT, 0.0) == judgement
    held = data_changes.held(judgement, REPORT, 0.8)
    assert not held["eligible"] and held["reason"].startswith("held: embedding shift AUC 0.910")
    assert data_changes.held({"eligible": False, "reason": "worse"}, REPORT, 0.8)["reason"] == "worse"
