"""The two training phases' records: one schema, one reader, and the rule for which phase's model is kept."""
from __future__ import annotations

import pytest

from tasks import phases, storage
from tasks.errors import TrainingError
from tasks.phases import FEATURE_EXTRACTION, FINE_TUNE
from tests.helpers.runs import phase_summary

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("before, after, kept", [
    (0.80, None, FEATURE_EXTRACTION),  # fine-tuning skipped
    (0.80, 0.85, FINE_TUNE),
    (0.80, 0.80, FEATURE_EXTRACTION),  # a tie keeps the cheaper model
    (0.80, 0.79, FEATURE_EXTRACTION),
])
def test_fine_tuning_is_kept_only_when_it_beat_feature_extraction_on_validation(before, after, kept):
    tuned = None if after is None else phase_summary(phase=FINE_TUNE, best_val_accuracy=after)
    assert phases.kept_phase(phase_summary(best_val_accuracy=before), tuned) == kept


def test_summary_round_trips_and_a_foreign_file_is_refused_naming_it(tmp_path):
    uri = str(tmp_path / "summary.json")
    written = phase_summary(settings={"augment": True})
    phases.write_summary(uri, written)
    assert phases.read_summary(uri) == written

    storage.write_json(uri, {"kept": "fine_tuned", "val_accuracy": {}})  # the old combined summary
    with pytest.raises(TrainingError, match=f"{uri} is not a phase summary"):
        phases.read_summary(uri)
    storage.write_json(uri, {**written.to_json(), "phase": "warm_up"})
    with pytest.raises(TrainingError, match="names phase 'warm_up'"):
        phases.read_summary(uri)


def test_both_phases_make_one_curve_with_the_fine_tune_start_marked():
    first = [{"epoch": n, "phase": FEATURE_EXTRACTION} for n in (1, 2, 3)]
    second = [{"epoch": n, "phase": FINE_TUNE} for n in (4, 5)]

    assert phases.curves(first, second) == {"epochs": first + second, "fine_tune_start_epoch": 4}
    assert phases.curves(first, None) == {"epochs": first, "fine_tune_start_epoch": None}
