"""Test helpers for dataset sources: archives, a loopback HTTP server, IDX files."""
from __future__ import annotations

import contextlib
import gzip
import http.server
import io
import struct
import tarfile
import threading
import zipfile
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np


class FileServer:
    """An HTTP server on 127.0.0.1 serving one folder and recording every request path.

    `failures` are HTTP statuses answered, in order, before files are served;
    without `send_length` no Content-Length is sent (the end of the body is the
    end of the connection).
    """

    def __init__(self, directory: Path, failures: tuple[int, ...] = (), send_length: bool = True):
        self.requests: list[str] = []
        requests = self.requests
        pending = list(failures)

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                requests.append(self.path)
                if pending:
                    self.send_error(pending.pop(0))
                    return
                super().do_GET()

            def send_header(self, keyword, value):
                if send_length or keyword.lower() != "content-length":
                    super().send_header(keyword, value)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(directory)))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"


@contextlib.contextmanager
def serve(directory: Path, failures: tuple[int, ...] = (), send_length: bool = True) -> Iterator[FileServer]:
    """Serve `directory` over loopback HTTP for the duration of the block (see FileServer)."""
    server = FileServer(directory, failures, send_length)
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        server.thread.join()


def archive_folder(folder: Path, archive: Path, top: str = "") -> Path:
    """Zip or tar.gz (by the archive's name) every file below `folder`, optionally under one top directory."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    files = [path for path in sorted(folder.rglob("*")) if path.is_file()]
    members = [(path, str(Path(top, path.relative_to(folder)))) for path in files]
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive, "w") as bundle:
            for path, name in members:
                bundle.write(path, name)
    else:
        with tarfile.open(archive, "w:gz") as bundle:
            for path, name in members:
                bundle.add(path, name)
    return archive


def add_tar_member(bundle: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE,
                   linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    bundle.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def add_zip_symlink(bundle: zipfile.ZipFile, name: str, target: str) -> None:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (0o120777 << 16)
    bundle.writestr(info, target)


def truncated_copy(archive: Path, target: Path, size: int) -> Path:
    """The first `size` bytes of an archive, as a download cut short would leave it."""
    target.write_bytes(archive.read_bytes()[:size])
    return target


def idx_bytes(array: np.ndarray) -> bytes:
    """An array of unsigned bytes in IDX format, gzipped like the published files."""
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())
