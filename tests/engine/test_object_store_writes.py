"""Atomic writes on object storage: one PUT, never a temporary object.

An object store has no rename: fsspec's `mv` is a copy then a delete. A writer killed between its
temporary PUT and that copy (a lease heartbeat when a stage's process is SIGKILLed, as the S3
end-to-end test does) used to leave `.<name>.tmp-*` in the bucket for good. A PUT is atomic by
itself (readers see the old object or the new one), so that is what a write is there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tasks.engine.store import Workdir, write_bytes_atomic
from tests.support.s3_server import s3_bucket, s3_server  # noqa: F401  (pytest fixtures)

# A writer that dies (no cleanup, as under SIGKILL) if it ever gets to a rename or copy.
DIES_AT_THE_RENAME = textwrap.dedent(
    """
    import os, sys
    from tasks.engine.store import Workdir, write_bytes_atomic

    wd = Workdir(sys.argv[1])
    type(wd.fs).mv = lambda *a, **k: os._exit(9)
    type(wd.fs).copy = lambda *a, **k: os._exit(9)
    write_bytes_atomic(wd.fs, wd.path("sft", "_lock.json"), b'{"run": "new"}')
    """
)


def test_a_writer_killed_mid_write_leaves_no_temporary_object(s3_bucket, s3_server):  # noqa: F811
    wd = Workdir(f"{s3_bucket}/wd")
    target = wd.path("sft", "_lock.json")
    write_bytes_atomic(wd.fs, target, b'{"run": "old"}')
    proc = subprocess.run([sys.executable, "-c", DIES_AT_THE_RENAME, wd.url], env={**os.environ, **s3_server.env},
                          capture_output=True, timeout=120)
    fs = s3_server.filesystem
    assert [p.rsplit("/", 1)[-1] for p in fs.find(wd.path())] == ["_lock.json"]  # no .tmp-* beside it
    assert fs.cat_file(target) == b'{"run": "new"}'  # and the write is whole
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]  # it never needed a rename


def test_object_store_writes_replace_whole_objects(s3_bucket, s3_server):  # noqa: F811
    wd = Workdir(f"{s3_bucket}/wd")
    target = wd.path("eval", "_manifest.json")
    for data in (b"x" * 10, b"y" * 3):
        write_bytes_atomic(wd.fs, target, data)
        assert s3_server.filesystem.cat_file(target) == data
