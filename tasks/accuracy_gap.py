"""Validation vs test accuracy, side by side with their noise, and what a gap between them means.

Validation images are drawn from the training source; test images from the
source's test split or from a `test_source` of their own (tasks.test_source).
When the two accuracies differ by more than sampling noise can explain, the
test images differ from the training images in a way the model notices, and
the test accuracy, not the validation accuracy, is what to expect on images like
them. Each accuracy gets a Wilson 95 % interval (sound at 0 and 100 % and for
small n, unlike the normal approximation), and their difference Newcombe's
interval built from the two; "differ" means that interval excludes 0.
"""
from __future__ import annotations

import math
from typing import Any

Z_95 = 1.959964  # two-sided 95 % normal quantile


def wilson_interval(accuracy: float, n: int) -> tuple[float, float]:
    """The Wilson score 95 % interval of an accuracy measured on n images ((0, 1) when n is 0)."""
    if n <= 0:
        return 0.0, 1.0
    z2 = Z_95 ** 2
    centre = (accuracy + z2 / (2 * n)) / (1 + z2 / n)
    half = Z_95 * math.sqrt(accuracy * (1 - accuracy) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_interval(first: float, n_first: int, second: float, n_second: int) -> tuple[float, float]:
    """Newcombe's 95 % interval of `second - first` for two independent accuracies (hybrid Wilson score)."""
    low_1, high_1 = wilson_interval(first, n_first)
    low_2, high_2 = wilson_interval(second, n_second)
    difference = second - first
    return (difference - math.sqrt((second - low_2) ** 2 + (high_1 - first) ** 2),
            difference + math.sqrt((high_2 - second) ** 2 + (first - low_1) ** 2))


def compare(val_accuracy: float, n_val: int, test_accuracy: float, n_test: int,
            test_source: str | None = None) -> dict[str, Any]:
    """Both accuracies with n and interval, their difference (test - validation) with its interval, whether they
    differ beyond noise, and the statement that says what to expect. `test_source` names where the test images
    came from when that is not the training source's own test split."""
    low, high = difference_interval(val_accuracy, n_val, test_accuracy, n_test)
    gap = {
        "validation": {"accuracy": val_accuracy, "n": n_val, "interval": list(wilson_interval(val_accuracy, n_val))},
        "test": {"accuracy": test_accuracy, "n": n_test, "interval": list(wilson_interval(test_accuracy, n_test)),
                 "source": test_source},
        "difference": test_accuracy - val_accuracy,
        "difference_interval": [low, high],
        "differ": low > 0 or high < 0,
    }
    gap["statement"] = statement(gap)
    return gap


def statement(gap: dict[str, Any]) -> str:
    """What the two accuracies mean together, in plain words."""
    val, test = gap["validation"], gap["test"]
    low, high = gap["difference_interval"]
    points = f"{100 * abs(gap['difference']):.1f} points"
    interval = f"95 % interval of test minus validation: {100 * low:+.1f} to {100 * high:+.1f} points"
    estimate = (f"{_percent(test['accuracy'])} (95 % interval {_percent(test['interval'][0])} to "
                f"{_percent(test['interval'][1])}) on images like the test images")
    if not gap["differ"]:
        return (f"Validation ({_percent(val['accuracy'])} on {val['n']} images) and test ({_percent(test['accuracy'])} "
                f"on {test['n']} images) agree within their noise: they differ by {points} ({interval}, which "
                f"includes 0). Expect about {estimate}.")
    if gap["difference"] < 0:
        return (f"Your test images differ from your training images: expect about {estimate}, not the "
                f"{_percent(val['accuracy'])} that validation (drawn from the training source) suggests. Test "
                f"accuracy is {points} below validation ({interval}), more than sampling noise explains; to close "
                "the gap, train on images like the test images (add some to the training source) or try "
                "augmentation.")
    return (f"Your test images differ from your training images: test accuracy is {points} above validation "
            f"({interval}), more than sampling noise explains, so the test images are easier for this model than "
            f"the training source's; expect about {estimate}, and check that they are the images users will send.")


def card_section(gap: dict[str, Any] | None, source: str) -> str:
    """The model card's side-by-side section (Markdown); "" when the metrics have no comparison."""
    if not gap:
        return ""
    from tasks.model_card import markdown_code, markdown_text

    val, test = gap["validation"], gap["test"]
    test_from = markdown_code(test["source"]) + " (test_source)" if test["source"] else \
        f"{markdown_code(source)}, its test split"
    rows = [("validation", f"{markdown_code(source)}, held out of the training images", val),
            ("test", test_from, test)]
    lines = ["## Validation vs test",
             "| split | images from | images | accuracy | 95 % interval |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {origin} | {entry['n']} | {_percent(entry['accuracy'])} | "
              f"{_percent(entry['interval'][0])} to {_percent(entry['interval'][1])} |" for name, origin, entry in rows]
    lines += ["", markdown_text(gap["statement"])]
    return "\n".join(lines)


def _percent(value: float) -> str:
    return f"{100 * value:.1f} %"
