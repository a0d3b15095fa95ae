"""Select: candidates ranked on validation accuracy; failures listed; all failing fails with every reason."""
from __future__ import annotations

import pytest

from tasks import artifacts, phases, storage
from tasks.config import RunConfig, candidate_list
from tasks.errors import ConfigError, TrainingError
from tasks.steps.select import select
from tests.helpers.runs import phase_summary

pytestmark = pytest.mark.fast

SPECS = "efficientnet_lite0@96, efficientnet_lite0@160, mobilenet_v2@128"


def finished(cfg: RunConfig, val_accuracy: float, seconds: float) -> None:
    """What train leaves for one candidate."""
    storage.write_json(cfg.artifact(artifacts.TRAIN_SUMMARY),
                       phase_summary(best_val_accuracy=val_accuracy, seconds=seconds).to_json())


def record_failure(cfg: RunConfig, error: Exception) -> None:
    """What train leaves for a candidate it failed on."""
    phases.write_failure(cfg.artifact(artifacts.TRAINING_ERROR), error)


def runs(tmp_path, specs: str = SPECS) -> tuple[RunConfig, list[RunConfig]]:
    cfg = RunConfig(run_root=str(tmp_path), candidates=specs)
    return cfg, [cfg.for_candidate(candidate) for candidate in candidate_list(cfg)]


def test_best_validation_accuracy_wins_and_every_candidate_is_on_the_leaderboard(tmp_path):
    cfg, (small, large, mobile) = runs(tmp_path)
    finished(small, 0.86, 20)
    finished(large, 0.89, 60)
    record_failure(mobile, ValueError("weights file missing"))

    winner = select(cfg, [{}, {}, None])

    assert (winner["backbone"], winner["image_size"], winner["val_accuracy"]) == ("efficientnet_lite0", 160, 0.89)
    assert "efficientnet_lite0@160 has the best validation accuracy, 0.8900" in winner["reason"]
    assert "next: efficientnet_lite0@96 at 0.8600, +0.0300" in winner["reason"]
    assert "failed: mobilenet_v2@128" in winner["reason"]
    board = storage.read_json(cfg.artifact(artifacts.LEADERBOARD))
    assert [row["spec"] for row in board["candidates"]] == ["efficientnet_lite0@160", "efficientnet_lite0@96",
                                                            "mobilenet_v2@128"]
    assert board["candidates"][2]["error"] == "ValueError: weights file missing"
    assert (winner["model_uri"], winner["history_uri"], winner["summary_uri"]) == (
        large.artifact(artifacts.FEATURE_EXTRACTION_MODEL), large.artifact(artifacts.HISTORY),
        large.artifact(artifacts.TRAIN_SUMMARY)), "the winner's own artifacts go on"
    assert winner["leaderboard_uri"] == cfg.artifact(artifacts.LEADERBOARD)


def test_a_tie_goes_to_the_faster_candidate(tmp_path):
    cfg, (small, large, mobile) = runs(tmp_path)
    for run, seconds in ((small, 30), (large, 90), (mobile, 12)):
        finished(run, 0.875, seconds)

    winner = select(cfg, [{}, {}, {}])

    assert winner["backbone"] == "mobilenet_v2" and "a tie, broken by training time" in winner["reason"]


def test_all_candidates_failing_fails_with_every_reason(tmp_path):
    cfg, (small, large, mobile) = runs(tmp_path)
    record_failure(small, ValueError("bad weights"))
    record_failure(large, OSError("disk full"))

    with pytest.raises(TrainingError, match=r"every candidate failed: efficientnet_lite0@96: ValueError: bad "
                                            r"weights; efficientnet_lite0@160: OSError: disk full; "
                                            r"mobilenet_v2@128: no result at .*did not finish"):
        select(cfg, [None, None, None])


def test_one_backbone_is_the_one_candidate_case():
    (only,) = candidate_list(RunConfig(backbone="mobilenet_v2", image_size=128))
    assert (only.backbone, only.image_size) == ("mobilenet_v2", 128)
    cfg = RunConfig(run_root="/r", run_id="x").for_candidate(only)
    assert cfg.artifact(artifacts.HISTORY) == f"/r/transfer_learning/x/candidates/{only.slug}/train/history.json"
    assert cfg.artifact(artifacts.MANIFEST) == "/r/transfer_learning/x/data/manifest.json"  # shared by all


@pytest.mark.parametrize("specs, words", [
    ("efficientnet_lite0@96, efficientnet_lite0@96", "list each backbone@size once"),
    ("efficientnet_lite0@8", "image size of a candidate must be 32..1024"),
    ("@96", "give a backbone spec"),
])
def test_bad_candidate_lists_are_refused_naming_the_candidate(specs, words):
    with pytest.raises(ConfigError, match=words):
        RunConfig(candidates=specs)


def test_an_auto_image_size_is_ranked_at_the_size_the_manifest_decides_and_the_board_says_why(tmp_path):
    from tasks.config import planned_candidates

    cfg = RunConfig(run_root=str(tmp_path), candidates="efficientnet_lite0, efficientnet_lite0@160")
    side = {"min": 20.0, "p25": 28.0, "median": 28.0, "p75": 28.0, "max": 28.0}
    storage.write_json(cfg.artifact(artifacts.MANIFEST), {"image_sizes": {"train": {
        "images": 50, "short_side": side, "width": side, "height": side}}})
    auto, fixed = (cfg.for_candidate(candidate) for candidate in planned_candidates(cfg))
    finished(auto, 0.9, 10)
    finished(fixed, 0.8, 30)

    winner = select(cfg, [{}, {}])

    assert (winner["candidate"], winner["image_size"]) == (auto.candidate, 96)
    board = storage.read_json(cfg.artifact(artifacts.LEADERBOARD))
    assert "image_size auto: 96 px" in board["image_size_auto"] and "28 px" in board["image_size_auto"]
