"""TEMPORARY stand-in (engineer `trust-publish` moves the registry here from tasks/steps/publish.py): the names
batch scoring reads. At merge take main's version."""
from tasks.steps.publish import CHECKSUMS, read_champion, verify_version  # noqa: F401
