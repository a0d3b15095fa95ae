"""Where each artifact lives under a run root, in one place.

Steps hand each other these locations through the run root (never through
XCom), so the names must agree; `cfg.artifact(*layout.X)` gives the URI.
"""
ACQUIRED = ("data", "acquired.json")
MANIFEST = ("data", "manifest.json")
FEATURES = ("features",)
CHECKPOINTS = ("checkpoints",)
TENSORBOARD = ("tensorboard",)
HISTORY = ("train", "history.json")
DECISION = ("train", "decision.json")
TRAIN_SUMMARY = ("train", "summary.json")
FEATURE_EXTRACTION_MODEL = ("model", "feature_extraction.keras")
FINE_TUNED_MODEL = ("model", "fine_tuned.keras")
MODEL = ("model", "model.keras")
METRICS = ("eval", "metrics.json")
REPORT = ("eval", "report")
MODEL_CARD = ("eval", "model_card.md")
PARAMS = ("params.json",)
PUBLISHED = ("publish.json",)


def split_records(split: str) -> tuple[str, str]:
    """The TFRecord file of one split ("train", "val" or "test")."""
    return ("data", f"{split}.tfrecord")
