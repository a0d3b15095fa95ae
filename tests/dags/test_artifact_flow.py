"""The artifact catalog holds: run the steps in DAG order, the way the DAG wires them, and watch every run-root
read and write.

A step may read a run-root artifact it produced itself (a retry reuses its cache or checkpoint), one whose URI
arrived on its DAG edge when the catalog lists it among the artifact's consumers, or one the catalog declares
it reads through the run root. It may write only artifacts the catalog says it produces. Anything else fails
here, naming the step, the URI and what to declare.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

from tasks import artifacts, storage
from tasks.config import Candidate, RunConfig, candidate_list
from tests.helpers.runs import write_image_folder

READS = ("exists", "read_bytes", "read_text", "read_json", "download", "list_files", "list_stored")
WRITES = ("write_bytes", "write_text", "write_json", "upload", "delete")


@dataclasses.dataclass
class Access:
    step: str
    kind: str  # "read" or "write"
    uri: str
    handed: list[str]  # every string the step got on its edges


class Recorder:
    """Wraps tasks.storage so each call under the run root is recorded with the step that made it."""

    def __init__(self, monkeypatch, run_uri: str):
        self.run_uri, self.accesses, self.step, self.handed = run_uri, [], "", []
        for name in READS + WRITES:
            self._wrap(monkeypatch, name, "read" if name in READS else "write")

    def _wrap(self, monkeypatch, name: str, kind: str) -> None:
        original = getattr(storage, name)

        def recorded(uri, *args, **kwargs):
            if self.step and str(uri).startswith(self.run_uri):
                self.accesses.append(Access(self.step, kind, str(uri), self.handed))
            return original(uri, *args, **kwargs)

        monkeypatch.setattr(storage, name, recorded)

    @contextlib.contextmanager
    def running(self, step: str, *inputs) -> Iterator[None]:
        self.step, self.handed = step, [value.rstrip("/") for value in _strings(inputs)]
        try:
            yield
        finally:
            self.step = ""


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def _places(cfg: RunConfig) -> list[tuple[str, artifacts.Artifact]]:
    """Where each catalogued artifact lives for this run and each of its candidates, deepest first."""
    candidates = [cfg.for_candidate(candidate) for candidate in candidate_list(cfg)]
    places = []
    for artifact in artifacts.catalog():
        for run in candidates if artifact.per_candidate else [cfg]:
            places.append((run.artifact(artifact).rstrip("/"), artifact))
    return sorted(places, key=lambda place: -len(place[0]))


def _artifact_of(uri: str, places) -> tuple[str, artifacts.Artifact] | None:
    uri = uri.rstrip("/")
    return next(((place, artifact) for place, artifact in places if uri == place or uri.startswith(place + "/")),
                None)


def _arrived(uri: str, handed: list[str]) -> bool:
    uri = uri.rstrip("/")
    return any(uri == value or uri.startswith(value + "/") for value in handed)


def violations(accesses: list[Access], places) -> list[str]:
    found = []
    for access in accesses:
        match = _artifact_of(access.uri, places)
        if match is None:
            found.append(f"{access.step} {access.kind}s {access.uri}, which the catalog (tasks/artifacts.py) does "
                         "not name: add an Artifact for it")
            continue
        place, artifact = match
        if access.step == artifact.producer:
            continue
        if access.kind == "write":
            found.append(f"{access.step} writes {artifact.path} ({access.uri}), which {artifact.producer} "
                         "produces: an artifact has one writer")
        elif access.step in artifact.consumers and _arrived(place, access.handed):
            continue
        elif access.step not in artifact.read_through_run_root:
            how = ("it is among its consumers but its URI did not arrive on the step's edge"
                   if access.step in artifact.consumers else "the catalog does not list it as a reader")
            found.append(f"{access.step} reads {artifact.path} ({access.uri}): {how}; hand the URI over on the "
                         "DAG edge, or declare it in read_through_run_root")
    return found


def test_every_step_reads_what_arrives_on_its_edges_or_what_it_declares(tmp_path, cache_dir, monkeypatch):
    """Down the fine-tune branch, where every step runs (the other branch reads a subset)."""
    from tasks.steps.acquire import acquire
    from tasks.steps.check_changes import check_changes
    from tasks.steps.decide import decide
    from tasks.steps.evaluate import evaluate
    from tasks.steps.fine_tune import fine_tune as fine_tune_step
    from tasks.steps.select import select
    from tasks.steps.subsample import subsample
    from tasks.steps.train import train

    source = write_image_folder(tmp_path / "images", {"dark": 8, "mid": 8, "light": 8})
    cfg = RunConfig(run_root=str(tmp_path / "runs"), source=str(source), train_percent=100, val_fraction=0.25,
                    image_size=32, batch_size=8, epochs=2, patience=1, fine_tune="always", fine_tune_layers=4,
                    fine_tune_epochs=1, top_k_wrong=3, cache_dir=cache_dir, publish_uri=str(tmp_path / "models"))
    recorder = Recorder(monkeypatch, cfg.run_uri)
    steps = []

    def run(step: str, function, *inputs):
        with recorder.running(step, *inputs):
            result = function(*inputs)
        steps.append(step)
        return result

    acquired = run("acquire", acquire, cfg)
    data = run("subsample", subsample, cfg, acquired)
    assert run("check_changes", check_changes, cfg, data)["train"]  # no champion yet
    (only,) = candidate_list(cfg)
    trained = run("train", train, cfg, data, dataclasses.asdict(only))
    best = run("select", select, cfg, [trained])
    winner = cfg.for_candidate(Candidate(best["backbone"], best["image_size"], best["candidate"]))
    decision = run("decide", decide, winner, data, best)
    tuned = run("fine_tune", fine_tune_step, winner, data, best) if decision["fine_tune"] else None
    evaluation = run("evaluate", evaluate, winner, data, best, tuned)

    assert steps == ["acquire", "subsample", "check_changes", "train", "select", "decide", "fine_tune", "evaluate"]
    assert evaluation["kept"] in ("feature_extraction", "fine_tune")
    assert evaluation["model_uri"] == (tuned["model_uri"] if tuned and evaluation["kept"] == "fine_tune"
                                       else best["model_uri"])
    assert {access.step for access in recorder.accesses} >= set(steps) - {"acquire"}
    assert violations(recorder.accesses, _places(cfg)) == []


def test_the_check_catches_an_undeclared_read_and_a_second_writer(tmp_path):
    cfg = RunConfig(run_root=str(tmp_path), image_size=96)
    places = _places(cfg)
    run = cfg.for_candidate(candidate_list(cfg)[0])
    leaderboard, history = cfg.artifact(artifacts.LEADERBOARD), run.artifact(artifacts.HISTORY)

    found = violations([Access("decide", "read", leaderboard, []),
                        Access("evaluate", "read", history, []),
                        Access("fine_tune", "write", history, []),
                        Access("train", "write", storage.join(cfg.run_uri, "stray.json"), [])], places)

    assert len(found) == 4
    assert "decide reads leaderboard.json" in found[0] and "does not list it as a reader" in found[0]
    assert "evaluate reads train/history.json" in found[1] and "did not arrive on the step's edge" in found[1]
    assert "one writer" in found[2] and "catalog" in found[3]
    assert violations([Access("evaluate", "read", history, [history])], places) == []


def test_every_catalog_entry_names_real_steps():
    steps = {"acquire", "subsample", "check_changes", "candidates", "train", "select", "decide", "fine_tune",
             "evaluate", "publish_version", "approve", "promote", "list_images", "score_shard", "merge_predictions"}
    for artifact in artifacts.catalog():
        named = {artifact.producer, *artifact.consumers, *artifact.read_through_run_root}
        assert named <= steps, (artifact.path, named - steps)
