"""The one run configuration every step takes, and the one place each param rule is written.

Every per-run setting is a `RunConfig` field declared with `param(...)`: its
default, title, description and JSON-schema bounds. The DAG's trigger form is
generated from that metadata (`param_specs`) and the same metadata validates a
config built anywhere else (a CLI, a test, the retrain Variable), so the form
and the validation cannot drift. A trigger conf may only name declared params
(`check_conf`): a misspelt or undeclared key is refused before work starts.

Fields that are not params (`run_id`, `dag_id`, `run_root`, `cache_dir`) are
filled in by the DAG from the run's context and the deployment settings.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

from tasks import settings
from tasks.datasets import SUPPORTED_SOURCES
from tasks.errors import ConfigError

if TYPE_CHECKING:
    from tasks.artifacts import Artifact

FineTuneMode = Literal["auto", "always", "never"]
FINE_TUNE_MODES = ("auto", "always", "never")
DepthwiseMode = Literal["auto", "train", "freeze"]
DEPTHWISE_MODES = ("auto", "train", "freeze")
MODEL_NAME_PATTERN = "^[a-z0-9][a-z0-9._-]{0,62}$"
SCHEMA_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool}
# image_size auto (README "Where the defaults come from"): images that carry detail at 128 px get 128 px (openclipart:
# fine-tuned test +1.4 points over 96 px); small ones (Fashion-MNIST's 28 px) keep 96 px, which upsampling further
# barely helps (+0.5 points) for about a third more time per forward pass.
AUTO_SMALL_SIZE, AUTO_LARGE_SIZE, AUTO_LARGE_SIDE = 96, 128, 128


# The trigger form's sections, in the order the form shows them (Airflow groups params by `schema.section`);
# the rare settings come last. Airflow opens none of them at first: their titles are the form's overview.
DATA, MODEL, FEATURE_EXTRACTION, FINE_TUNING, PUBLISHING, ADVANCED = (
    "Data", "Model", "Feature extraction", "Fine-tuning", "Evaluation and publishing", "Advanced (rarely changed)")
SECTIONS = (DATA, MODEL, FEATURE_EXTRACTION, FINE_TUNING, PUBLISHING, ADVANCED)


def param(default: Any, title: str, description: str, section: str, optional: bool = False, **schema: Any) -> Any:
    """A RunConfig field that is a trigger-form param: its default plus the JSON schema the form and checks use.

    `optional` params may be left empty (None or ""), which means the default the
    description names; their schema type includes "null", which is also how
    Airflow's form tells an optional field from a required one.
    """
    if optional:
        schema["type"] = ["null", schema["type"]]
    return field(default=default, metadata={"param": {"title": title, "description": description,
                                                      "section": section, **schema}})


def parse_classes(value: str | int | list[str] | tuple[str, ...] | None) -> tuple[str, ...] | int | None:
    """Normalise the `classes` param: None/"" = all, an int or "3" = first N, else names.

    Names come as a list or a comma-separated string ("pizza, steak").
    """
    if value is None or value == "" or value == [] or value == ():
        return None
    if isinstance(value, bool):
        raise ConfigError("classes: expected class names or a number of classes, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return int(text)
        names = [part.strip() for part in text.split(",")]
    else:
        names = [str(part).strip() for part in value]
    names = [name for name in names if name]
    if len(set(names)) != len(names):
        raise ConfigError(f"classes: {names} lists a class twice; list each class once")
    return tuple(names) or None


@dataclass(frozen=True)
class RunConfig:
    """Everything a pipeline run needs to know, with the offline demo as defaults."""

    # data
    source: str = param("idx://fashion_mnist", "Dataset source", "One of: " + "; ".join(SUPPORTED_SOURCES) + ".",
                        section=DATA, type="string", minLength=3)
    source_sha256: str = param("", "Source sha256", "Expected sha256 of a downloaded archive (empty = "
                               "record it on first download and check it on every later one).",
                               section=ADVANCED, optional=True, type="string", pattern="^([0-9a-f]{64})?$")
    classes: tuple[str, ...] | int | None = param("", "Classes", "Empty = all classes; a number N = the first N; "
                                                  "or comma-separated class names.",
                                                  section=DATA, optional=True, type="string")
    train_percent: float = param(10.0, "Train % per class", "Percent of each class's training images.",
                                 section=DATA, type="number", exclusiveMinimum=0, maximum=100)
    train_count: int = param(0, "Train images per class", "A fixed number of training images per class "
                             "instead of a percentage (0 = use Train %).",
                             section=ADVANCED, type="integer", minimum=0)
    val_fraction: float = param(0.1, "Validation fraction", "Stratified share of the selected training images "
                                "held out for validation (the test split is never used for selection).",
                                section=DATA, type="number", exclusiveMinimum=0, exclusiveMaximum=1)
    test_percent: float = param(100.0, "Test % per class", "Percent of each class's test images (100 for any "
                                "result you compare; less only for quick trials).",
                                section=DATA, type="number", exclusiveMinimum=0, maximum=100)
    test_source: str = param("", "Test source", "Test on images from elsewhere: the test/ split of another source "
                             "(any form Dataset source takes, e.g. a folder test/<class>/<image>, an s3:// prefix or "
                             "an archive URL) replaces the source's own test split; it must have the selected "
                             "classes and no others. Empty = the source's test split.",
                             section=DATA, optional=True, type="string")
    seed: int = param(42, "Seed", "Seeds the subsample, shuffles and initialisation.", section=DATA,
                      type="integer", minimum=0)
    # model
    backbone: str = param("efficientnet_lite0", "Backbone", "efficientnet_lite0, _lite1, _lite2 (offline "
                          "ImageNet; native 224, 240, 260 px), "
                          "efficientnet_b0, resnet50_v2, mobilenet_v2, a TF Hub handle, or a SavedModel path / "
                          "s3:// prefix.", section=MODEL, type="string", minLength=1)
    candidates: str = param("", "Candidate backbones", "Compare several backbones in one run: comma-separated "
                            "specs, each optionally @size (e.g. efficientnet_lite0@96, efficientnet_lite0@160, a TF "
                            "Hub handle, s3://models/encoder@224). Each trains as its own mapped task; the best on "
                            "validation continues. Empty = the one Backbone at Image size.",
                            section=MODEL, optional=True, type="string")
    backbone_weights: str = param("imagenet", "Backbone weights", "imagenet, none (random init), or a local / "
                                  "s3:// Keras weights file (.weights.h5; .pth for efficientnet_lite0/1/2).",
                                  section=ADVANCED, type="string", minLength=1)
    image_size: int | None = param(None, "Image size (px)", "Square input size of the backbone. Empty = auto: "
                                   f"{AUTO_LARGE_SIZE} px when the training images' median shorter side is at least "
                                   f"{AUTO_LARGE_SIDE} px (enough detail to use it), else {AUTO_SMALL_SIZE} px; the "
                                   "choice and its reason are logged and shown in the report and model card.",
                                   section=MODEL, optional=True, type="integer", minimum=32, maximum=1024)
    batch_size: int = param(64, "Batch size", "Images per training step.", section=MODEL, type="integer",
                            minimum=1, maximum=1024)
    dropout: float = param(0.2, "Head dropout", "Dropout before the new dense head.",
                           section=MODEL, type="number", minimum=0, exclusiveMaximum=1)
    # feature extraction
    epochs: int = param(10, "Feature-extraction epochs", "Maximum epochs; early stopping may end sooner.",
                        section=FEATURE_EXTRACTION, type="integer", minimum=1, maximum=500)
    learning_rate: float = param(1e-3, "Learning rate", "Of the head in feature extraction.",
                                 section=FEATURE_EXTRACTION, type="number", exclusiveMinimum=0, maximum=1)
    optimizer: str = param("adam", "Optimizer", "Keras optimizer of both phases.", section=ADVANCED,
                           type="string", enum=["adam", "adamw", "sgd", "rmsprop"])
    loss: str = param("sparse_categorical_crossentropy", "Loss", "Keras loss of both phases.",
                      section=ADVANCED, type="string",
                      enum=["sparse_categorical_crossentropy", "categorical_crossentropy"])
    augment: bool = param(False, "Augment", "Random flips/rotations/zooms; the backbone then runs every epoch "
                          "instead of once (slower).", section=FEATURE_EXTRACTION, type="boolean")
    mixup: float = param(0.0, "Mixup (feature extraction)", "Mixup strength alpha for the head on cached features: "
                         "each training example becomes a random Beta(alpha, alpha) blend of two examples' features "
                         "and labels (costs nothing: the backbone still runs once per image; ignored with Augment). "
                         "0 = off; 0.2 to 0.4 are usual.", section=FEATURE_EXTRACTION, type="number", minimum=0,
                         maximum=4)
    patience: int = param(3, "Patience (epochs)", "Early stopping and plateau window.",
                          section=FEATURE_EXTRACTION, type="integer", minimum=1, maximum=100)
    min_delta: float = param(0.005, "Min improvement", "Smaller val_accuracy gains do not renew early stopping's "
                             "patience (the plateau rule also allows for the validation set's sampling noise); the "
                             "weights kept are still the best epoch's.",
                             section=FEATURE_EXTRACTION, type="number", minimum=0, maximum=1)
    # fine-tuning
    fine_tune: FineTuneMode = param("auto", "Fine-tune", "auto = only when validation accuracy plateaus below "
                                    "the target; always; never.", section=FINE_TUNING, type="string",
                                    enum=list(FINE_TUNE_MODES))
    target_accuracy: float | None = param(0.95, "Target accuracy", "Fine-tune only below this validation "
                                          "accuracy (0 = no target).", section=FINE_TUNING,
                                          type="number", minimum=0, maximum=1)
    fine_tune_layers: int = param(34, "Layers to unfreeze", "Top backbone layers made trainable (BatchNorm "
                                  "stays frozen); rounded to whole blocks.", section=FINE_TUNING,
                                  type="integer", minimum=1, maximum=1000)
    fine_tune_depthwise: DepthwiseMode = param(
        "auto", "Depthwise kernels", "Whether the depthwise (spatial) convolutions of the unfrozen layers train. "
        "auto = train them when the training images are at least as large as the input (median shorter side ≥ image "
        "size), freeze them when the images are upsampled (frozen: a third less work per step, same accuracy there; "
        "README); train; freeze.", section=FINE_TUNING, type="string", enum=list(DEPTHWISE_MODES))
    fine_tune_epochs: int = param(7, "Fine-tune epochs", "Extra epochs after feature extraction.",
                                  section=FINE_TUNING, type="integer", minimum=1, maximum=500)
    fine_tune_lr_factor: float = param(1.0, "Fine-tune LR factor", "Fine-tune learning rate = learning rate × "
                                       "this.", section=FINE_TUNING, type="number", exclusiveMinimum=0, maximum=1)
    fine_tune_schedule: str = param("cosine", "Fine-tune LR schedule", "cosine: linear warm-up for one epoch (at most "
                                    "15 % of a short fine-tune), then decays to 0 over the fine-tune epochs; constant.",
                                    section=FINE_TUNING, type="string", enum=["cosine", "constant"])
    # evaluation and publishing
    top_k: int = param(5, "Top-k", "k of the top-k accuracy.", section=PUBLISHING, type="integer",
                       minimum=1, maximum=100)
    top_k_wrong: int = param(50, "Most-wrong gallery size", "Most confidently wrong test images shown.",
                             section=PUBLISHING, type="integer", minimum=1, maximum=1000)
    model_name: str = param("fashion-mnist-classifier", "Model name", "Lowercase letters, digits, . _ -; names "
                            "the published model.", section=PUBLISHING, type="string", pattern=MODEL_NAME_PATTERN)
    warm_start: bool = param(True, "Warm start", "Start the head from the champion's when the classes, backbone and "
                             "image size are the same (else a fresh head, with the reason logged).",
                             section=FEATURE_EXTRACTION, type="boolean")
    warm_start_fine_tune: bool = param(False, "Warm-start fine-tuning", "Fine-tune from the champion's fine-tuned top "
                                       "and head when it was fine-tuned above the same frozen layers (else from "
                                       "feature extraction's model, with the reason logged).",
                                       section=FINE_TUNING, type="boolean")
    skip_unchanged: bool = param(True, "Skip when unchanged", "End the run early, training nothing, when the data "
                                 "and config equal those of the champion or of the newest published and judged "
                                 "version.", section=DATA, type="boolean")
    publish_uri: str = param(settings.load().publish_uri, "Publish to", "Model registry root; one of the "
                             "deployment's publish locations (TLP_PUBLISH_URI, TLP_PUBLISH_LOCATIONS).",
                             section=PUBLISHING, type="string", minLength=1)
    # filled in by the DAG, not params
    run_root: str = field(default_factory=lambda: settings.load().run_root)
    dag_id: str = "transfer_learning"
    run_id: str = "manual"
    candidate: str = ""  # the slug of the candidate whose training artifacts a step reads and writes
    asked: dict = field(default_factory=dict, compare=False)  # params for_candidate replaced: {name: as asked}
    cache_dir: str = field(default_factory=lambda: settings.load().cache_dir)

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            if "param" in spec.metadata and spec.name != "classes":
                value = getattr(self, spec.name)
                if not (spec.name == "target_accuracy" and value is None):
                    check_value(spec.name, value, spec.metadata["param"])
                if (value is None or (value == "" and spec.default is None)) and _nullable(spec.metadata["param"]):
                    object.__setattr__(self, spec.name, spec.default)  # left empty: the default
        object.__setattr__(self, "classes", parse_classes(self.classes))
        if self.target_accuracy in (0, 0.0):
            object.__setattr__(self, "target_accuracy", None)
        _check(bool(self.run_root), "run_root", self.run_root, "give a local directory or an s3:// URI")
        _check(bool(self.run_id), "run_id", self.run_id, "give the Airflow run_id or any non-empty name")
        _check(bool(re.fullmatch(r"[A-Za-z0-9_.-]+", self.dag_id)), "dag_id", self.dag_id, "give the Airflow dag_id")
        _check(self.candidate == "" or bool(re.fullmatch(r"[a-z0-9_.-]+", self.candidate)), "candidate",
               self.candidate, "give a slug made by candidate_list")
        if not self.candidate:  # a candidate's config runs at its own size: "x, x@160" is not a repeat at 160
            candidate_list(self)

    @classmethod
    def from_params(cls, params: dict[str, Any], **overrides: Any) -> "RunConfig":
        """Build from DAG params (Airflow passes its own keys too: only config fields are taken)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in {**params, **overrides}.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able params, e.g. for XCom, params.json and the model card.

        `cache_dir` is left out: it is a path on the machine that runs a step, so a
        config handed to another worker must use that worker's own cache.
        """
        values = dataclasses.asdict(self)
        del values["cache_dir"], values["asked"]
        if isinstance(self.classes, tuple):
            values["classes"] = list(self.classes)
        return values

    def to_public_dict(self) -> dict[str, Any]:
        """`to_dict` with credentials in URIs redacted: what is written where people read it (params.json).

        XCom keeps `to_dict`: the next task needs the real source to fetch it.
        """
        from tasks.redact import redact_text, redact_uri

        values = self.to_dict()
        values["source"] = redact_uri(self.source)
        values["test_source"] = redact_uri(self.test_source)
        for key in ("backbone", "backbone_weights", "candidates", "publish_uri"):
            values[key] = redact_text(values[key])
        return values

    @property
    def run_uri(self) -> str:
        """The run root of this run, `<run_root>/<dag_id>/<run id as one safe segment>`."""
        from tasks import storage

        return storage.join(self.run_root, self.dag_id, safe_name(self.run_id))

    def artifact(self, artifact: "Artifact", *below: str) -> str:
        """URI of a catalogued artifact of this run (or of a file below it), e.g. `cfg.artifact(artifacts.MANIFEST)`.

        Training artifacts belong to one candidate backbone and live under
        `candidates/<slug>/` of the candidate this config is for.
        """
        from tasks import storage

        scope = ("candidates", self.candidate) if artifact.per_candidate and self.candidate else ()
        return storage.join(self.run_uri, *scope, *artifact.parts, *below)

    def for_candidate(self, candidate: "Candidate") -> "RunConfig":
        """This config for one candidate: its backbone, image size, and its own training artifacts."""
        if candidate.image_size is None:
            raise ConfigError(f"candidate {candidate.backbone}: image_size auto is not resolved yet; plan the "
                              "candidates with tasks.config.planned_candidates once the manifest is written")
        return dataclasses.replace(self, backbone=candidate.backbone, image_size=candidate.image_size,
                                   candidate=candidate.slug,
                                   asked=self.asked or {"backbone": self.backbone, "image_size": self.image_size})

    def with_image_size(self, manifest: dict[str, Any] | None) -> "RunConfig":
        """This config with image_size auto resolved by `auto_image_size` from the manifest's image statistics
        (an explicit size is kept); `asked` keeps auto (None) for the report and model card."""
        if self.image_size is not None:
            return self
        size, _ = auto_image_size(manifest)
        return dataclasses.replace(self, image_size=size,
                                   asked=self.asked or {"backbone": self.backbone, "image_size": None})


def auto_image_size(manifest: dict[str, Any] | None) -> tuple[int, str]:
    """(size, why) of image_size auto, from the training images' sizes subsample recorded (manifest "image_sizes").

    Images whose median shorter side reaches AUTO_LARGE_SIDE carry detail a
    larger input can use: AUTO_LARGE_SIZE. Smaller ones (Fashion-MNIST is 28 px)
    would only be upsampled further: AUTO_SMALL_SIZE, the cheaper input. A
    manifest without statistics (written before they were recorded) gets
    AUTO_SMALL_SIZE, the size every run used before the rule.
    """
    side, count = _median_short_side(manifest)
    if not count or side is None:
        return AUTO_SMALL_SIZE, f"image_size auto: {AUTO_SMALL_SIZE} px (the manifest records no image sizes)"
    if side >= AUTO_LARGE_SIDE:
        return AUTO_LARGE_SIZE, (f"image_size auto: {AUTO_LARGE_SIZE} px, as the {count} training images' median "
                                 f"shorter side is {side:g} px (at least {AUTO_LARGE_SIDE}: detail a larger input "
                                 "uses)")
    return AUTO_SMALL_SIZE, (f"image_size auto: {AUTO_SMALL_SIZE} px, as the {count} training images' median shorter "
                             f"side is {side:g} px (under {AUTO_LARGE_SIDE}: a larger input would only upsample them)")


def _median_short_side(manifest: dict[str, Any] | None) -> tuple[float | None, int]:
    """(median shorter side in px, image count) of the training images, as subsample records them in the manifest
    ("image_sizes"; (None, 0) in a manifest written before they were recorded): what both auto rules read."""
    train = ((manifest or {}).get("image_sizes") or {}).get("train") or {}
    return train.get("short_side", {}).get("median"), train.get("images", 0)


def depthwise_trained(mode: DepthwiseMode, manifest: dict[str, Any] | None, image_size: int) -> tuple[bool, str]:
    """(train the depthwise kernels?, why) for fine_tune_depthwise `mode` at input `image_size`.

    auto decides by the training images' median shorter side (manifest
    "image_sizes", as image_size auto does). Images smaller than the input are
    upsampled: no detail finer than what the pretrained spatial filters see, and
    freezing those filters kept Fashion-MNIST's accuracy (28 px at 96) for a
    third less work per step. Images at least as large as the input carry detail
    the filters adapt to: on openclipart (368 px at 128) freezing them cost 2 to
    8 points (README). Without statistics auto trains them, as every run did
    before the rule.
    """
    if mode != "auto":
        return mode == "train", f"fine_tune_depthwise {mode}"
    side, _ = _median_short_side(manifest)
    if side is None:
        return True, "fine_tune_depthwise auto: trained, as the manifest records no image sizes"
    if side >= image_size:
        return True, (f"fine_tune_depthwise auto: trained, as the training images' median shorter side is {side:g} px, "
                      f"at least the {image_size} px input: detail the spatial filters adapt to")
    return False, (f"fine_tune_depthwise auto: frozen, as the training images' median shorter side is {side:g} px, "
                   f"under the {image_size} px input: upsampled, nothing finer for the spatial filters")


def planned_candidates(cfg: RunConfig, manifest: dict[str, Any] | None = None) -> list["Candidate"]:
    """The run's candidates with image_size auto resolved from its manifest (read from the run root unless given):
    what the `candidates` step maps train over and what select ranks. Logs the auto decision."""
    import logging

    from tasks import artifacts, storage

    if cfg.image_size is not None or all(candidate.image_size is not None for candidate in candidate_list(cfg)):
        return candidate_list(cfg)
    if manifest is None:
        uri = cfg.artifact(artifacts.MANIFEST)
        manifest = storage.read_json(uri) if storage.exists(uri) else None
    logging.getLogger(__name__).info("%s", auto_image_size(manifest)[1])
    return candidate_list(cfg.with_image_size(manifest))


@dataclass(frozen=True)
class Candidate:
    """One backbone to try: a spec, the image size it runs at (None: auto, not resolved yet), and a folder-safe slug
    naming both."""

    backbone: str
    image_size: int | None
    slug: str


def candidate_list(cfg: RunConfig) -> list[Candidate]:
    """The run's candidates: the `candidates` param, or the one `backbone` at `image_size` (None while auto is
    unresolved: `planned_candidates` resolves it).

    A spec may end in `@<size>`; the slug is readable plus a hash, so distinct
    specs never share a folder.
    """
    specs = [part.strip() for part in re.split(r"[,\n]", cfg.candidates) if part.strip()] or [cfg.backbone]
    found = []
    for spec in specs:
        backbone, size = spec, cfg.image_size
        head, sep, tail = spec.rpartition("@")
        if sep and tail.isdigit():
            backbone, size = head.strip(), int(tail)
        bounds = next(f for f in dataclasses.fields(RunConfig) if f.name == "image_size").metadata["param"]
        _check(size is None or bounds["minimum"] <= size <= bounds["maximum"], "candidates", spec,
               f"the image size of a candidate must be {bounds['minimum']}..{bounds['maximum']} px, as for image_size")
        _check(bool(backbone), "candidates", spec, "give a backbone spec before '@<size>'")
        stem = re.sub(r"[^a-z0-9]+", "_", backbone.lower().rstrip("/").rsplit("/", 1)[-1]).strip("_")[:32] or "backbone"
        digest = hashlib.sha256(f"{backbone}@{size or 'auto'}".encode()).hexdigest()[:8]
        found.append(Candidate(backbone, size, f"{stem}-{size or 'auto'}-{digest}"))
    slugs = [candidate.slug for candidate in found]
    _check(len(set(slugs)) == len(slugs), "candidates", cfg.candidates, "list each backbone@size once")
    return found


def param_specs(defaults: RunConfig) -> dict[str, tuple[Any, dict[str, Any]]]:
    """{param name: (default, JSON schema with title, description and section)}: what the trigger form is built
    from, section by section. The description ends with the bounds the checks apply; an optional param left
    empty has the default None (shown as an empty field)."""
    specs = {}
    fields = [spec for spec in dataclasses.fields(RunConfig) if "param" in spec.metadata]
    for spec in sorted(fields, key=lambda spec: SECTIONS.index(spec.metadata["param"]["section"])):
        schema = dict(spec.metadata["param"])
        default = getattr(defaults, spec.name)
        if spec.name == "classes":
            default = ",".join(default) if isinstance(default, tuple) else ("" if default is None else str(default))
        if spec.name == "target_accuracy" and default is None:
            default = 0.0
        if default == "" and _nullable(schema):
            default = None
        bounds = _bounds_text(schema)
        if bounds:
            schema["description"] = f"{schema['description']} {bounds}"
        specs[spec.name] = (default, schema)
    return specs


def _bounds_text(schema: dict[str, Any]) -> str:
    """The numeric bounds of a schema in words ("Allowed: 1 to 500."), as the checks apply them."""
    low = (f"more than {schema['exclusiveMinimum']}" if "exclusiveMinimum" in schema
           else f"at least {schema['minimum']}" if "minimum" in schema else "")
    high = (f"less than {schema['exclusiveMaximum']}" if "exclusiveMaximum" in schema
            else f"at most {schema['maximum']}" if "maximum" in schema else "")
    if "minimum" in schema and "maximum" in schema:
        return f"Allowed: {schema['minimum']} to {schema['maximum']}."
    return f"Allowed: {' and '.join(part for part in (low, high) if part)}." if low or high else ""


def _nullable(schema: dict[str, Any]) -> bool:
    """An optional param: its schema type lists "null" (Airflow's form then lets it stay empty)."""
    return isinstance(schema.get("type"), list) and "null" in schema["type"]


def check_conf(conf: dict[str, Any], origin: str = "trigger conf", params: Any = None) -> None:
    """Refuse keys that are not declared params (RunConfig's, or those in `params`), naming each and the closest
    param (a misspelling)."""
    declared = sorted(param_specs(RunConfig()) if params is None else params)
    unknown = sorted(set(conf) - set(declared))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, declared, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{origin}: {', '.join(hints)} {'is not a param' if len(unknown) == 1 else 'are not params'}"
                          f" of this DAG; use only the params of the trigger form: {', '.join(declared)}")


def check_value(name: str, value: Any, schema: dict[str, Any]) -> None:
    """One param value against its JSON schema (type, bounds, enum, pattern, length), naming the param and fix."""
    kind = schema.get("type")
    if _nullable(schema):
        if value is None or value == "":
            return  # an optional param left empty: its default applies
        kind = next(kind for kind in schema["type"] if kind != "null")
    if kind and (not isinstance(value, SCHEMA_TYPES[kind]) or (kind != "boolean" and isinstance(value, bool))):
        raise ConfigError(f"{name}={value!r} is invalid: expected a {kind}")
    bounds = (("minimum", lambda v, b: v >= b, ">="), ("maximum", lambda v, b: v <= b, "<="),
              ("exclusiveMinimum", lambda v, b: v > b, ">"), ("exclusiveMaximum", lambda v, b: v < b, "<"))
    for key, ok, sign in bounds:
        if key in schema:
            _check(ok(value, schema[key]), name, value, f"use a value {sign} {schema[key]}")
    if "enum" in schema:
        _check(value in schema["enum"], name, value, f"use one of {schema['enum']}")
    if "pattern" in schema:
        _check(re.search(schema["pattern"], value) is not None, name, value,
               f"it must match {schema['pattern']} ({schema['description']})")
    if "minLength" in schema:
        _check(len(value) >= schema["minLength"], name, value, f"give at least {schema['minLength']} characters")


def check_publish_location(cfg: RunConfig, allowed: tuple[str, ...]) -> None:
    """publish_uri must be one of the deployment's publish locations: the champion of a model lives there."""
    if cfg.publish_uri.rstrip("/") not in {uri.rstrip("/") for uri in allowed}:
        raise ConfigError(f"publish_uri={cfg.publish_uri!r} is not a publish location of this deployment; use one "
                          f"of {list(allowed)} (an operator adds locations with TLP_PUBLISH_LOCATIONS)")


def trusted_config(values: dict[str, Any], run_id: str, dag_id: str, deployment: settings.Settings) -> RunConfig:
    """A run's config rebuilt from values anyone who may trigger runs can also write (a conf, an XCom entry).

    Validated as the trigger form is; the run root comes from the deployment
    settings and the run's identity from Airflow, never from the values; the
    publish location must be one of the deployment's.
    """
    cfg = RunConfig.from_params(values, run_id=run_id, dag_id=dag_id, run_root=deployment.run_root)
    check_publish_location(cfg, deployment.readable_publish_locations())
    return cfg


def safe_name(run_id: str) -> str:
    """A run id as one path/key segment, injectively: distinct run ids never share a folder.

    Percent-encoding keeps letters, digits, '-' and '_' and encodes everything
    else ('/', ':', '+', '.', '%' itself), so '.', '..' and 'a:b' vs 'a_b' stay apart.
    """
    return quote(run_id, safe="-_").replace(".", "%2E").replace("~", "%7E")


def _check(ok: bool, name: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: {fix}")
