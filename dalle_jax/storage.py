"""One path abstraction for every file a run reads or writes: local paths, and bucket URLs (`gs://`, `s3://`).

Each function takes a local path or a URL. A local path goes to `os`, `shutil` and `open` exactly as before; a URL
goes to etils `epath`, which reaches the bucket through fsspec (gcsfs for gs://, s3fs for s3://) with the
machine's own credentials (application default credentials, AWS_* variables): nothing here reads, stores or
prints a credential. Orbax writes checkpoints to the same URLs itself (through tensorstore).

Object stores have no rename and no append: a URL's file is written whole in one upload, which appears complete
or not at all, so `write_atomic` needs no temporary there. Readers that need a local file (ArrayRecord, TFDS,
sentencepiece) get one from `local_copy`, which stages the object under this process's scratch directory
(`$DALLE_JAX_SCRATCH`, default ~/.cache/dalle_jax/staged) and logs it.
"""
from __future__ import annotations

import builtins
import hashlib
import logging
import os
import re
import shutil

# epath reaches gs:// through TensorFlow's gfile when TensorFlow is importable; that client honours neither
# gcsfs's credentials chain nor STORAGE_EMULATOR_HOST. fsspec (gcsfs) is the one this package declares.
os.environ.setdefault("EPATH_USE_TF", "false")

from etils import epath  # noqa: E402  (after the variable above, which epath reads once)
import fsspec  # noqa: E402

# A bucket is written by other processes while this one runs (the other hosts, a resumed run, a trainer beside a
# sampler); fsspec's listing cache would keep answering with what a directory held when first listed.
for _scheme in ("gcs", "s3"):
    fsspec.config.conf.setdefault(_scheme, {})["use_listings_cache"] = False

SCRATCH_ENV = "DALLE_JAX_SCRATCH"
_USERINFO = re.compile(r"^([a-z][a-z0-9+.-]*://)[^/@]*@")


def is_remote(path) -> bool:
    return "://" in os.fspath(path)


def shown(path) -> str:
    """`path` fit for a log line or an error: a URL loses any `user:secret@` part."""
    return _USERINFO.sub(r"\1", os.fspath(path))


def _url(path) -> epath.Path:
    if _USERINFO.match(os.fspath(path)):
        # No bucket scheme takes credentials in its URL; refused here, such a URL never reaches a log or a file.
        raise ValueError(f"{shown(path)}: a bucket URL takes no `user:password@` part; remove it and give the "
                         "credentials the usual way (application default credentials for gs://, AWS_* variables "
                         "for s3://)")
    return epath.Path(os.fspath(path))


def abspath(path: str) -> str:
    return path if is_remote(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
    if is_remote(path):
        return os.fspath(_url(path).joinpath(*parts))
    return os.path.join(path, *parts)


def dirname(path: str) -> str:
    return os.fspath(_url(path).parent) if is_remote(path) else os.path.dirname(path)


def basename(path: str) -> str:
    return os.path.basename(os.fspath(path).rstrip("/") if is_remote(path) else path)


def exists(path: str) -> bool:
    return _url(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _url(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    return _url(path).is_file() if is_remote(path) else os.path.isfile(path)


def getsize(path: str) -> int:
    return _url(path).stat().length if is_remote(path) else os.path.getsize(path)


def makedirs(path: str) -> None:
    """A bucket has no directories (a prefix exists once an object is under it); only local ones are made."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
    if is_remote(path):
        return [p.name for p in _url(path).iterdir()] if isdir(path) else []
    return os.listdir(path)


def walk(path: str):
    """(directory, subdirectory names, file names) like os.walk, for a local directory or a URL prefix."""
    if not is_remote(path):
        yield from os.walk(path)
        return
    # Listed level by level: epath's own walk passes fsspec a `max_depth` argument that s3fs refuses.
    directories, files = [], []
    for child in _url(path).iterdir():
        (directories if child.is_dir() else files).append(child.name)
    yield os.fspath(path).rstrip("/"), directories, files
    for name in directories:
        yield from walk(join(path, name))


def open(path: str, mode: str = "r", **kwargs):  # noqa: A001  (the builtin's name, for the builtin's job)
    if is_remote(path):
        return _url(path).open(mode, **kwargs)
    return builtins.open(path, mode, **kwargs)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_atomic(path: str, data: str | bytes) -> None:
    """Writes the whole file so that a reader sees the old one or the new one, never half of one."""
    mode = "w" if isinstance(data, str) else "wb"
    if is_remote(path):
        with open(path, mode) as f:  # one upload: the object appears complete or not at all
            f.write(data)
        return
    temporary = f"{path}.tmp-{os.getpid()}"
    with builtins.open(temporary, mode) as f:
        f.write(data)
    os.replace(temporary, path)


def replace(source: str, target: str) -> None:
    if is_remote(source) or is_remote(target):
        copyfile(source, target)
        remove(source)
    else:
        os.replace(source, target)


def copyfile(source: str, target: str) -> None:
    if is_remote(source) or is_remote(target):
        _url(source).copy(_url(target), overwrite=True)
    else:
        shutil.copyfile(source, target)


def remove(path: str) -> None:
    _url(path).unlink() if is_remote(path) else os.remove(path)


def rmtree(path: str) -> None:
    if is_remote(path):
        if exists(path):
            _url(path).rmtree()
    else:
        shutil.rmtree(path, ignore_errors=True)


def move_tree(source: str, target: str) -> None:
    """Moves a directory; in a bucket, a copy of every object then the removal of the originals."""
    if not is_remote(source):
        shutil.move(source, target)
        return
    for directory, _, files in walk(source):
        relative = directory[len(source.rstrip("/")):].lstrip("/")
        for name in files:
            copyfile(join(directory, name), join(target, relative, name) if relative else join(target, name))
    rmtree(source)


def upload_tree_last(local_dir: str, target: str, last: str) -> int:
    """`upload_tree`, with the file named `last` sent after all others: its presence marks the upload complete."""
    held = os.path.join(local_dir, last)
    sent = 0
    for directory, _, files in os.walk(local_dir):
        relative = os.path.relpath(directory, local_dir)
        for name in files:
            path = os.path.join(directory, name)
            if path != held:
                copyfile(path, join(target, *([] if relative == "." else relative.split(os.sep)), name))
                sent += os.path.getsize(path)
    copyfile(held, join(target, last))
    return sent + os.path.getsize(held)


def stage_tree(url: str, local_dir: str, what: str) -> int:
    """Copies every object under the prefix `url` to the same relative place under `local_dir`, skipping files
    already there with the same size; returns the bytes fetched."""
    fetched, root = 0, url.rstrip("/")
    for directory, _, files in walk(url):
        relative = directory.rstrip("/")[len(root):].lstrip("/")
        for name in files:
            local = os.path.join(local_dir, *([relative] if relative else []), name)
            remote = join(directory, name)
            size = getsize(remote)
            if os.path.isfile(local) and os.path.getsize(local) == size:
                continue
            os.makedirs(os.path.dirname(local), exist_ok=True)
            _url(remote).copy(epath.Path(f"{local}.part-{os.getpid()}"), overwrite=True)
            os.replace(f"{local}.part-{os.getpid()}", local)
            fetched += size
    logging.info("Staged %s from %s on local scratch at %s (%d bytes fetched)", what, shown(url), local_dir, fetched)
    return fetched


def scratch_dir() -> str:
    """This process's local scratch directory for staged copies of bucket files (never shared between hosts)."""
    return os.environ.get(SCRATCH_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "dalle_jax", "staged")


def staging_dir(url: str) -> str:
    """A local directory that stands for the bucket prefix `url` on this host."""
    key = hashlib.sha256(shown(url).rstrip("/").encode()).hexdigest()[:16]
    return os.path.join(scratch_dir(), f"{basename(url) or 'root'}-{key}")


def local_copy(path: str, what: str = "file") -> str:
    """`path` itself when local; for a URL, a copy on local scratch (fetched once, again only if its size
    changed), for readers that cannot open URLs."""
    if not is_remote(path):
        return path
    local = os.path.join(staging_dir(dirname(path)), basename(path))
    size = getsize(path)
    if not (os.path.isfile(local) and os.path.getsize(local) == size):
        os.makedirs(os.path.dirname(local), exist_ok=True)
        logging.info("Staging %s %s (%d bytes) on local scratch at %s", what, shown(path), size, local)
        temporary = f"{local}.part-{os.getpid()}"
        _url(path).copy(epath.Path(temporary), overwrite=True)
        os.replace(temporary, local)
    return local
