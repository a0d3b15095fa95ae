"""Subsample manifests written by hand, for the change report's tests (tasks.data_changes, check_changes)."""
from __future__ import annotations


def manifest(files: dict[str, list[tuple[str, str]]], classes=None, split="train") -> dict:
    """{class: [(name, sha)]} as a subsample manifest (hash derived from the entries)."""
    entries = [{"split": split, "path": f"{split}/{name}/{file}", "label": i, "class": name, "sha256": sha}
               for i, (name, items) in enumerate(sorted(files.items())) for file, sha in items]
    lines = sorted(f"{e['split']}\t{e['path']}\t{e['label']}\t{e['sha256']}" for e in entries)
    return {"classes": classes or sorted(files), "files": entries, "hash": str(hash(tuple(lines)))}
