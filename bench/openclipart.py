"""The openclipart benchmark: real RGBA clip art, test images by other artists than the training images.

Source: Debian's `openclipart-png` (0.18, 8,121 PNGs with transparency, from
openclipart.org). Licence: every image is in the public domain (Creative
Commons Public Domain Dedication / Certification; /usr/share/doc/openclipart-png/
copyright). Nothing is committed: the package is read where `apt-get install
openclipart-png` put it (/usr/share/openclipart/png), or fetched with
`apt-get download` and unpacked with `dpkg-deb -x` into `--cache` (no root
needed once the package lists are current), and the benchmark folder is built
from it.

Classes, from the package's top-level categories (8 of its 22):

| class | from | left out (why) |
|---|---|---|
| animals | animals/** | |
| food | food/** | |
| people | people/** | clothing (objects, not people), smilies (emoticons) |
| transportation | transportation/** | roadsigns, aiga-symbols (signs, not vehicles) |
| computer | computer/** | icons (1,853 desktop icons of every subject), buttons, folders, games, diagrams |
| tools | tools/** | toys (1 image) |
| office | office/** | |
| plants | plants/** | |

Dropped categories: too small (buildings 70, buttons 3, containers 16,
decorations 26, education 54, electronics 43, logos 7, science 21) or mixed
(geography: maps, flags and astronomy; recreation: art, games, holidays, music;
shapes; signs_and_symbols; special; unsorted). A file whose bytes appear in
two classes is dropped (the package files some images twice); duplicates
within a class are kept once.

The shift: openclipart names most files `<title>_<artist>_<n>.png`. Every image
whose name carries one of ten prolific artists (ARTISTS: Francesco Rollandin,
Gerald G., Nicu Buculei, Juliane Krug, Benji Park, Jarno Vasamaa, Sergio Luiz
Araujo, Linda Kim, Nicolas Clemenceau and "ganson") goes to `test/`, every other
image to `train/`: no named artist is on both sides, and each has a drawing
style of their own, as when a new supplier's images arrive. (Unnamed files by
those artists may remain in train: the names are all there is.) About 1,270
training and 480 test images; validation is carved from train by the pipeline,
so it comes from the training artists, and the validation -> test gap measures
the shift. The PNGs are copied unchanged (alpha kept): compositing the
transparency is the pipeline's job.

    python bench/openclipart.py [--out .bench-data/openclipart] [--cache .bench-data/deb]
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE = "openclipart-png"
INSTALLED = Path("/usr/share/openclipart/png")
LICENCE = ("public domain (Creative Commons Public Domain Dedication/Certification), Debian openclipart-png "
           "0.18; see /usr/share/doc/openclipart-png/copyright")
DATA = Path(__file__).resolve().parents[1] / ".bench-data"  # git-ignored
DEFAULT_OUT = DATA / "openclipart"
DEFAULT_CACHE = DATA / "deb"
# class -> (category folders taken, sub-folders left out)
CLASSES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "animals": (("animals",), ()),
    "computer": (("computer",), ("computer/icons", "computer/buttons", "computer/folders", "computer/games",
                                 "computer/diagrams")),
    "food": (("food",), ()),
    "office": (("office",), ()),
    "people": (("people",), ("people/clothing", "people/smilies")),
    "plants": (("plants",), ()),
    "tools": (("tools",), ("tools/toys",)),
    "transportation": (("transportation",), ("transportation/roadsigns", "transportation/aiga-symbols")),
}
# artist -> pattern in the lower-case file name (names are cut at 25 characters, hence the prefixes)
ARTISTS = {
    "francesco rollandin": r"architett|rollandin|francesc|_fra(n|nc|nce)?_|_fr_",
    "ganson": r"ganson",
    "juliane krug": r"juliane|krug",
    "nicu buculei": r"nicu|buculei",
    "benji park": r"benji|_park_",
    "jarno vasamaa": r"jarno|vasamaa",
    "gerald g.": r"gerald",
    "sergio luiz araujo": r"sergio|luiz",
    "linda kim": r"linda|_kim",
    "nicolas clemenceau": r"nicolas",
}
VERSION = 1  # of the build rules above; a folder built by other rules is rebuilt
STAMP = "openclipart-benchmark.json"


def artist(name: str) -> str | None:
    """The held-out artist named in a file name, or None."""
    lowered = name.lower()
    return next((who for who, pattern in ARTISTS.items() if re.search(pattern, lowered)), None)


def package_root(cache: Path) -> Path:
    """The package's png/ folder: installed, or downloaded and unpacked into `cache`."""
    if INSTALLED.is_dir():
        return INSTALLED
    unpacked = cache / "root" / INSTALLED.relative_to("/")
    if unpacked.is_dir():
        return unpacked
    cache.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=cache, check=True)
        deb = max(cache.glob(f"{PACKAGE}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(cache / "root")], check=True)
    except (OSError, subprocess.CalledProcessError, ValueError) as error:
        raise SystemExit(f"cannot fetch {PACKAGE} ({error}); run `apt-get update` (as root) first, or install it: "
                         f"apt-get install {PACKAGE}") from error
    return unpacked


def select(root: Path) -> dict[str, dict[str, list[Path]]]:
    """split -> class -> files, by the rules of the module docstring."""
    by_class: dict[str, dict[str, Path]] = {}
    for cls, (taken, left_out) in CLASSES.items():
        files: dict[str, Path] = {}
        for folder in taken:
            for path in sorted((root / folder).rglob("*.png")):
                relative = path.relative_to(root).as_posix()
                if not any(relative.startswith(prefix + "/") for prefix in left_out):
                    files.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), path)
        by_class[cls] = files
    owners = collections.Counter(digest for files in by_class.values() for digest in files)
    splits: dict[str, dict[str, list[Path]]] = {"train": {}, "test": {}}
    for cls, files in by_class.items():
        kept = [path for digest, path in files.items() if owners[digest] == 1]
        splits["test"][cls] = [path for path in kept if artist(path.name)]
        splits["train"][cls] = [path for path in kept if not artist(path.name)]
    return splits


def build(out: Path = DEFAULT_OUT, cache: Path = DEFAULT_CACHE) -> Path:
    """The benchmark folder `<out>/<split>/<class>/<file>.png` (built once; rebuilt when the rules change)."""
    stamp = out / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()).get("version") == VERSION:
        return out
    root = package_root(cache)
    splits = select(root)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    for split, classes in splits.items():
        for cls, paths in classes.items():
            target = staging / split / cls
            target.mkdir(parents=True)
            for path in paths:  # names are unique within a class folder of the package
                shutil.copyfile(path, target / f"{path.parent.relative_to(root).as_posix().replace('/', '-')}"
                                               f"-{path.name}")
    counts = {split: {cls: len(paths) for cls, paths in classes.items()} for split, classes in splits.items()}
    (staging / STAMP).write_text(json.dumps({"version": VERSION, "package": PACKAGE, "licence": LICENCE,
                                             "source": str(root), "counts": counts}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def counts(out: Path) -> dict[str, dict[str, int]]:
    return json.loads((out / STAMP).read_text())["counts"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args()
    out = build(args.out, args.cache)
    table = counts(out)
    for cls in CLASSES:
        print(f"{cls:<16}{table['train'][cls]:>6}{table['test'][cls]:>6}")
    print(json.dumps({"root": str(out), "licence": LICENCE,
                      **{f"{split}_images": sum(per.values()) for split, per in table.items()}}), file=sys.stdout)


if __name__ == "__main__":
    main()
