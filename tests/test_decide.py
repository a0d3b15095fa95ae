"""The plateau rule: a pure function of the validation curve and the rule parameters; the decide step applies it."""
from __future__ import annotations

import pytest

from tasks import artifacts, storage
from tasks.config import RunConfig
from tasks.errors import MissingInputError
from tasks.plateau import judge
from tasks.steps.decide import decide

pytestmark = pytest.mark.fast


def judged(curve: dict, cfg: RunConfig, n_val: int | None = None) -> dict:
    return judge(curve["epochs"], mode=cfg.fine_tune, patience=cfg.patience, min_delta=cfg.min_delta,
                 target_accuracy=cfg.target_accuracy, n_val=n_val)


def history(*val_accuracy: float, fine_tuned: tuple[float, ...] = ()) -> dict:
    phases = ["feature_extraction"] * len(val_accuracy) + ["fine_tune"] * len(fine_tuned)
    epochs = [{"epoch": i + 1, "phase": phase, "val_accuracy": v}
              for i, (phase, v) in enumerate(zip(phases, val_accuracy + fine_tuned, strict=True))]
    return {"epochs": epochs, "fine_tune_start_epoch": len(val_accuracy) + 1 if fine_tuned else None}


PLATEAU = history(0.70, 0.80, 0.850, 0.852, 0.853, 0.851)
IMPROVING = history(0.70, 0.75, 0.80, 0.84, 0.87)
CASES = [
    # (name, history, rule, fine_tune?, words the reason must contain)
    ("plateau below target", PLATEAU, {}, True,
     ["improved 0.003 over the last 3 epochs", "plateau at 0.853 < target 0.95"]),
    ("still improving", IMPROVING, {}, False, ["still improving: +0.120", "not converged", "raise epochs"]),
    ("target reached", history(0.90, 0.96, 0.961, 0.96, 0.96), {}, False, ["0.961 ≥ target 0.95"]),
    ("target reached while improving", IMPROVING, {"target_accuracy": 0.85}, False, ["≥ target 0.85"]),
    ("too few epochs", history(0.5, 0.5), {}, False, ["only 2 feature-extraction epoch(s)", "patience=3"]),
    ("no epochs", history(), {}, False, ["only 0"]),
    ("plateau with no target", PLATEAU, {"target_accuracy": None}, True, ["plateau at 0.853 (no target)"]),
    ("no gain with min_delta 0 is a plateau", history(0.80, 0.81, 0.81), {"patience": 1, "min_delta": 0.0}, True,
     ["improved 0.000 over the last 1 epochs"]),
    ("longer patience sees the earlier rise", PLATEAU, {"patience": 4}, False, ["+0.053 over the last 4 epochs"]),
    ("larger min_delta sees a plateau", IMPROVING, {"min_delta": 0.15}, True,
     ["improved 0.120", "≤ 0.15", "plateau"]),
    ("always overrides improving", IMPROVING, {"fine_tune": "always"}, True, ["fine_tune=always", "0.870"]),
    ("always with target reached", history(0.99, 0.99), {"fine_tune": "always"}, True, ["fine_tune=always"]),
    ("never overrides plateau", PLATEAU, {"fine_tune": "never"}, False, ["fine_tune=never"]),
    ("only feature-extraction epochs count",
     history(0.70, 0.80, 0.85, 0.851, 0.852, 0.852, fine_tuned=(0.9, 0.95)),
     {}, True, ["plateau at 0.852"]),
]


# Feature extraction of `make demo` (Fashion-MNIST 10 %: 600 validation images, Lite0 at 96 px, seed 42), as
# logged: the head is flat from epoch 4 on and what follows is sampling noise of about ±0.014.
DEFAULT_RUN = history(0.8217, 0.8183, 0.8300, 0.8433, 0.8433, 0.8500, 0.8333, 0.8600, 0.8467, 0.8550)
RISING_600 = history(0.62, 0.69, 0.74, 0.78, 0.81, 0.835)
NOISY_CASES = [
    # (name, history, validation images, fine_tune?, words)
    ("default run: a +0.010 wobble on 600 images is noise", DEFAULT_RUN, 600, True,
     ["improved 0.010 over the last 3 epochs", "noise of accuracy on 600 validation images, ±0.014", "plateau"]),
    ("same wobble, noise unknown: min_delta alone reads it as a rise", DEFAULT_RUN, None, False,
     ["still improving: +0.010", "min_delta 0.005"]),
    ("a curve really rising on 600 images does not fine-tune", RISING_600, 600, False,
     ["still improving: +0.095", "±0.015"]),
    ("60000 validation images: the noise is below min_delta, which decides", DEFAULT_RUN, 60000, False,
     ["min_delta 0.005"]),
]


@pytest.mark.parametrize("name, curve, n_val, expected, words", NOISY_CASES, ids=[case[0] for case in NOISY_CASES])
def test_rule_reads_validation_noise_as_noise(name, curve, n_val, expected, words):
    cfg = RunConfig(patience=3, min_delta=0.005, target_accuracy=0.95, fine_tune="auto")

    decision = judged(curve, cfg, n_val)

    assert decision["fine_tune"] is expected, decision["reason"]
    for word in words:
        assert word in decision["reason"], decision["reason"]


@pytest.mark.parametrize("name, curve, rule, expected, words", CASES, ids=[case[0] for case in CASES])
def test_rule_decides_and_explains(name, curve, rule, expected, words):
    cfg = RunConfig(**{"patience": 3, "min_delta": 0.005, "target_accuracy": 0.95, "fine_tune": "auto", **rule})

    decision = judged(curve, cfg)

    assert decision["fine_tune"] is expected
    for word in words:
        assert word in decision["reason"]


def test_decision_records_the_rule_it_applied():
    decision = judged(PLATEAU, RunConfig(patience=2, min_delta=0.01, target_accuracy=0.9))

    assert decision == {**decision, "mode": "auto", "patience": 2, "min_delta": 0.01, "target_accuracy": 0.9,
                        "epochs": 6, "best_val_accuracy": 0.853}


def handed_over(cfg: RunConfig) -> tuple[dict, dict]:
    """What subsample and select hand decide for `cfg`'s run."""
    return ({"manifest": cfg.artifact(artifacts.MANIFEST), "hash": "h"},
            {"history_uri": cfg.artifact(artifacts.HISTORY)})


def test_step_reads_the_history_handed_over_and_writes_decision(tmp_path):
    cfg = RunConfig(run_root=str(tmp_path))
    storage.write_json(cfg.artifact(artifacts.HISTORY), PLATEAU)
    storage.write_json(cfg.artifact(artifacts.MANIFEST), {"counts": {"val": {"a": 300, "b": 300}}, "hash": "h",
                                                          "classes": ["a", "b"]})

    result = decide(cfg, *handed_over(cfg))

    assert result["fine_tune"] is True and result["n_val"] == 600
    assert storage.read_json(cfg.artifact(artifacts.DECISION)) == result


def test_step_without_history_says_to_train_first(tmp_path):
    cfg = RunConfig(run_root=str(tmp_path), run_id="r7")
    with pytest.raises(MissingInputError, match="run train first"):
        decide(cfg, *handed_over(cfg))


def test_step_refuses_a_history_from_elsewhere(tmp_path):
    """An edited XCom value cannot point decide at another run's (or any other) file."""
    cfg = RunConfig(run_root=str(tmp_path), run_id="r7")
    other = RunConfig(run_root=str(tmp_path), run_id="other")
    storage.write_json(other.artifact(artifacts.HISTORY), PLATEAU)
    data, _ = handed_over(cfg)

    with pytest.raises(MissingInputError, match="not where this run keeps it"):
        decide(cfg, data, {"history_uri": other.artifact(artifacts.HISTORY)})
