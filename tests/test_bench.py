"""The bench scripts: the openclipart benchmark's selection rules, rounds against bracketing references, and both
ways of running a script."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import openclipart
from bench.bracketed import bracketed_ratios, median_index
from devtools import system_packages

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.fast
def test_each_round_is_measured_against_the_references_around_it_and_the_median_round_is_kept():
    ratios = bracketed_ratios([10.0, 30.0, 12.0], [10.0, 30.0, 10.0, 14.0])

    assert ratios == [10 / 20, 30 / 20, 12 / 12]
    assert median_index(ratios) == 2
    with pytest.raises(ValueError, match="3 measurements need 4 references"):
        bracketed_ratios([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])


def png(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + content)


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A miniature openclipart-png tree."""
    root = tmp_path / "png"
    png(root / "animals/bugs/spider.png", b"spider")
    png(root / "animals/cat_architetto_fran_01.png", b"rollandin cat")  # a held-out artist
    png(root / "animals/dog_ganson.png", b"ganson dog")
    png(root / "animals/cow.png", b"cow")
    png(root / "animals/cow_copy.png", b"cow")  # same bytes twice in one class: kept once
    png(root / "food/apple.png", b"apple")
    png(root / "food/beach_trip.png", b"shared")  # filed under two classes: dropped from both
    png(root / "people/beach_trip.png", b"shared")
    png(root / "people/smilies/smile.png", b"smile")  # a left-out sub-folder
    png(root / "people/boy_juliane_krug_01.png", b"krug boy")
    png(root / "shapes/circle.png", b"circle")  # a dropped category
    monkeypatch.setattr(openclipart, "INSTALLED", root)
    return root


def test_artists_are_read_from_file_names():
    assert openclipart.artist("cat_architetto_fran_01.png") == "francesco rollandin"
    assert openclipart.artist("Bus1_Jarno_Vasamaa_01.png") == "jarno vasamaa"
    assert openclipart.artist("cow.png") is None


def test_selection_holds_out_artists_drops_shared_files_and_left_out_folders(package):
    splits = openclipart.select(package)
    names = {split: {cls: sorted(p.name for p in paths) for cls, paths in classes.items() if paths}
             for split, classes in splits.items()}
    assert names["train"] == {"animals": ["cow.png", "spider.png"], "food": ["apple.png"]}
    assert names["test"] == {"animals": ["cat_architetto_fran_01.png", "dog_ganson.png"],
                             "people": ["boy_juliane_krug_01.png"]}


def test_build_copies_the_files_unchanged_and_records_counts_and_licence(package, tmp_path):
    out = openclipart.build(tmp_path / "bench", tmp_path / "deb")
    assert ((out / "train/animals/animals-bugs-spider.png").read_bytes()
            == (package / "animals/bugs/spider.png").read_bytes())
    stamp = json.loads((out / openclipart.STAMP).read_text())
    assert stamp["counts"]["test"]["animals"] == 2 and stamp["counts"]["train"]["people"] == 0
    assert "public domain" in stamp["licence"]
    (package / "animals/bugs/spider.png").unlink()
    assert openclipart.build(out, tmp_path / "deb") == out  # built once: the stamp says so
    assert (out / "train/animals/animals-bugs-spider.png").is_file()


def test_bench_target_installs_openclipart():
    assert "openclipart-png" in system_packages.TARGETS["bench"]
    assert set(system_packages.TARGETS["bench"]) <= set(system_packages.PURPOSE)


@pytest.mark.parametrize("command", [
    ["bench/training.py"], ["-m", "bench.training"], ["bench/openclipart.py"], ["bench/candidates.py"],
    pytest.param(["bench/fine_tune_sweep.py"], marks=pytest.mark.slow),  # these import TensorFlow first
    pytest.param(["bench/backbones.py"], marks=pytest.mark.slow)])
def test_bench_scripts_run_as_scripts_and_as_modules(command):
    # As a script, bench/training.py imports its siblings as `bench.*`: the installed package provides them.
    done = subprocess.run([sys.executable, *command, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_sweep_recipes_name_every_setting_they_change():
    from bench.fine_tune_sweep import Recipe

    recipe = Recipe.parse("units=34,lr=1e-3,epochs=7,schedule=warmup_cosine,depthwise=frozen,batch=128")
    assert (recipe.depthwise, recipe.batch, recipe.schedule) == (False, 128, "warmup_cosine")
    assert recipe.name("block4a") == "cut_block4a_lr1e-3_ep7_warmup_cosine_dwfrozen_bs128"
    assert Recipe.parse("units=19,lr=1e-4,epochs=5").name("block5c") == "cut_block5c_lr1e-4_ep5"
    with pytest.raises(SystemExit, match="schedule"):
        Recipe.parse("units=19,lr=1e-4,epochs=5,schedule=linear")
