"""Validation vs test side by side: intervals, whether they differ beyond noise, and what the statement says."""
from __future__ import annotations

import pytest

from tasks import accuracy_gap
from tasks.accuracy_gap import compare, difference_interval, wilson_interval
from tasks.config import RunConfig
from tasks.model_card import markdown_text


@pytest.mark.parametrize("accuracy, n, low, high", [
    (0.8, 10, 0.4902, 0.9433),  # the published Wilson score intervals of 8/10, 0/10, 50/50
    (0.0, 10, 0.0, 0.2775),
    (1.0, 50, 0.9287, 1.0),
    (0.5, 0, 0.0, 1.0),
])
def test_wilson_interval_matches_known_values(accuracy, n, low, high):
    assert wilson_interval(accuracy, n) == (pytest.approx(low, abs=1e-4), pytest.approx(high, abs=1e-4))


def test_difference_interval_is_wide_for_few_images_and_narrow_for_many():
    few = difference_interval(0.9, 20, 0.8, 20)
    many = difference_interval(0.9, 5000, 0.8, 5000)
    assert few[0] < 0 < few[1]  # 2 of 20 more wrong is within the noise
    assert many[1] < 0  # the same rates on 5000 images each are a real drop
    assert few[0] < many[0] < -0.1 < many[1] < few[1]


def test_a_drop_beyond_noise_says_the_test_images_differ_and_what_to_expect():
    gap = compare(0.80, 400, 0.51, 900, test_source="s3://photos/new-camera/")

    assert gap["differ"] and gap["difference"] == pytest.approx(-0.29)
    assert gap["test"]["source"] == "s3://photos/new-camera/" and gap["validation"]["n"] == 400
    assert gap["statement"].startswith("Your test images differ from your training images: expect about 51.0 %")
    low, high = gap["test"]["interval"]
    assert f"95 % interval {100 * low:.1f} % to {100 * high:.1f} %" in gap["statement"]
    assert "not the 80.0 % that validation" in gap["statement"] and "29.0 points" in gap["statement"]


def test_a_rise_beyond_noise_also_says_the_images_differ():
    gap = compare(0.70, 1000, 0.90, 1000)
    assert gap["differ"] and gap["difference"] > 0
    assert gap["statement"].startswith("Your test images differ from your training images: "
                                       "test accuracy is 20.0 points above")


def test_a_gap_within_noise_says_they_agree():
    gap = compare(0.95, 60, 0.91, 1000)  # 3 of 60 validation images: a 4-point gap is noise
    assert not gap["differ"]
    assert "agree within their noise" in gap["statement"] and "differ from your training" not in gap["statement"]
    assert "on 60 images" in gap["statement"] and "on 1000 images" in gap["statement"]


def test_model_card_section_shows_both_side_by_side_with_where_each_came_from():
    gap = compare(0.80, 400, 0.51, 900, test_source="s3://photos/new-camera/")
    card = accuracy_gap.card_section(gap, "s3://photos/studio/")

    rows = [line for line in card.splitlines() if line.startswith(("| validation", "| test"))]
    assert len(rows) == 2
    assert "`s3://photos/studio/`" in rows[0] and "| 400 | 80.0 % |" in rows[0]
    assert "`s3://photos/new-camera/` (test_source)" in rows[1] and "| 900 | 51.0 % |" in rows[1]
    assert markdown_text(gap["statement"]) in card
    assert accuracy_gap.card_section(None, "s3://photos/studio/") == ""


def test_test_source_is_a_declared_optional_param_and_its_credentials_are_redacted(tmp_path):
    from tasks.config import param_specs

    default, schema = param_specs(RunConfig())["test_source"]
    assert default in ("", None) and "test/" in schema["description"]
    cfg = RunConfig(run_root=str(tmp_path), test_source="https://user:secret@example.com/test.zip")
    assert "secret" not in str(cfg.to_public_dict()) and cfg.to_dict()["test_source"].endswith("test.zip")
    assert RunConfig(run_root=str(tmp_path), test_source=None).test_source == ""  # the form left it empty
