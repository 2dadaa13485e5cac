"""Where a store lives: the one place that tells a local path from a URL and builds its zarr v3 store.

Local: a plain path or `file://` URL, read and written as files. Remote: `s3://bucket/prefix`,
`gs://bucket/prefix` (read and write) and `https://host/path` (read-only; `http://` too, for servers
on this machine), through zarr's `ObjectStore` on obstore (Rust I/O that does not hold the GIL; one
small dependency for all three schemes: `pip install "ips-wsi[cloud]"`). Endpoint and credentials come
from the standard environment variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_REGION`; `GOOGLE_SERVICE_ACCOUNT`, ...); an `http://` endpoint (an
S3-compatible server such as MinIO or moto) is allowed without further setting.

Object stores have no rename, so a remote store is made complete by its completion marker alone, written
last (`data_prep.remote`). The helpers below are synchronous wrappers over the zarr store API (run on
zarr's event loop), batched where a caller has many keys: listing with sizes, concurrent gets.
"""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from zarr.storage import LocalStore

from ips.errors import StoreError

REMOTE_SCHEMES = ("s3", "gs", "https", "http")
WRITABLE_SCHEMES = ("s3", "gs")
CONCURRENCY = 32  # requests in flight at once for batched gets (listing, checksums, verify)


def scheme_of(location: str | Path) -> str:
    """`"file"` for a local path (or `file://` URL), else the URL's scheme; ValueError for others."""
    if isinstance(location, Path) or "://" not in str(location):
        return "file"
    scheme = urlsplit(str(location)).scheme.lower()
    if scheme == "file" or scheme in REMOTE_SCHEMES:
        return scheme
    raise ValueError(f"{location}: unsupported URL scheme {scheme!r} (use a path, s3://, gs:// or https://)")


def is_remote(location: Any) -> bool:
    """True for an `s3://`, `gs://`, `https://` or `http://` URL (a zarr store object is neither)."""
    return isinstance(location, str) and "://" in location and scheme_of(location) != "file"


def local_path(location: str | Path) -> Path:
    """The path of a local location (`file://` stripped)."""
    text = str(location)
    return Path(urlsplit(text).path) if text.startswith("file://") else Path(location)


def join(base: str | Path, name: str) -> str | Path:
    """`base/name`: a Path for a local base, a URL (one `/` between) for a remote one."""
    if is_remote(base):
        return f"{str(base).rstrip('/')}/{name}"
    return local_path(base) / name


def base_name(location: str | Path) -> str:
    """The last part of a path or URL (`s3://b/x/a.zarr/` -> `a.zarr`)."""
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def _client_options(url: str) -> dict[str, Any]:
    # an S3-compatible server on plain http (MinIO, moto): obstore refuses http unless allowed
    endpoint = os.environ.get("AWS_ENDPOINT_URL", os.environ.get("AWS_ENDPOINT", ""))
    return {"allow_http": True} if url.startswith("http://") or endpoint.startswith("http://") else {}


def object_store(location: str, *, read_only: bool = True, quick: bool = False) -> Any:
    """The zarr `ObjectStore` rooted at the remote `location` (keys are relative to it).

    `quick`: give up after 2 retries within 10 s (a check before work, not the work: an unreachable
    server is said at once instead of after obstore's default 10 retries in 3 minutes).
    Raises ValueError for a write to a read-only scheme, ImportError (naming the extra) without obstore.
    """
    scheme = scheme_of(location)
    if not read_only and scheme not in WRITABLE_SCHEMES:
        raise ValueError(f"{location}: {scheme}:// is read-only here; write stores to s3:// or gs://")
    try:
        from obstore.store import from_url
        from zarr.storage import ObjectStore
    except ImportError:
        raise ImportError(
            f"{location}: remote stores need obstore: pip install 'ips-wsi[cloud]' (or obstore)"
        ) from None
    retry: dict[str, Any] = {}
    if quick:
        from datetime import timedelta

        retry = {"retry_config": {"max_retries": 2, "retry_timeout": timedelta(seconds=10)}}
    store = from_url(location.rstrip("/"), client_options=_client_options(location), **retry)
    return ObjectStore(store, read_only=read_only)


def zarr_store(location: str | Path, *, read_only: bool = True) -> Any:
    """What `zarr.open_group` takes for `location`: a `CheckedLocalStore` (reads stay inside the store), or
    a remote `ObjectStore`."""
    if is_remote(location):
        return object_store(str(location), read_only=read_only)
    return checked_local_store(local_path(location), read_only=read_only)


# --- no reads outside a local store --------------------------------------------------------------------
# A store may come from someone else: a chunk file that is a symbolic link, or that lies in a folder
# resolving outside the store's root, would make every reader serve a file the store does not hold. Every
# local read goes through `outside_reason` (zarr's reads through `CheckedLocalStore`, the patch reader's
# preads in `ips.data.chunk_io`); the root itself may be a link (a store kept on another disk).


LINK = "a symbolic link (a store holds no links; refused)"
OUTSIDE = "in a folder that resolves outside the store (refused)"


class OutsideStore(StoreError):
    """A read that would leave the store (a symbolic link, or a folder resolving outside its root);
    `reason` says which."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (raised in DataLoader workers)
        return OutsideStore, (self.path, self.reason)


class RootGuard:
    """Decides whether a path under a local store's root stays inside it. Folders found inside are
    remembered, so a chunk read costs one dictionary lookup beyond the `open` (done with O_NOFOLLOW)."""

    def __init__(self, root: str | Path) -> None:
        self.root = os.path.realpath(root)
        self._inside: set[str] = set()

    def folder_inside(self, folder: str) -> bool:
        """True when `folder` resolves inside the root."""
        if folder in self._inside:
            return True
        real = os.path.realpath(folder)
        if real == self.root or real.startswith(self.root + os.sep):
            self._inside.add(folder)
            return True
        return False

    def reason(self, path: str) -> str | None:
        """Why reading the file `path` would leave the store (None: it would not)."""
        if os.path.islink(path):
            return LINK
        if not self.folder_inside(os.path.dirname(path)):
            return OUTSIDE
        return None

    def open(self, path: str) -> int:
        """`os.open(path, O_RDONLY)` that refuses a link or a path outside the root (`OutsideStore`);
        FileNotFoundError as usual."""
        if not self.folder_inside(os.path.dirname(path)):
            if not os.path.exists(path):
                raise FileNotFoundError(path)
            raise OutsideStore(path, OUTSIDE)
        if not hasattr(os, "O_NOFOLLOW") and os.path.islink(path):  # (Windows) no flag to do it for us
            raise OutsideStore(path, LINK)
        try:
            return os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OutsideStore(path, LINK) from None
            raise


class CheckedLocalStore(LocalStore):
    """zarr's `LocalStore` whose reads refuse files outside the store (`OutsideStore`): every zarr read
    of a local store (metadata, small arrays, zarr's own pixel reads) goes through it."""

    def __init__(self, root: str | Path, *, read_only: bool = False) -> None:
        super().__init__(root, read_only=read_only)
        self.guard = RootGuard(self.root)

    def _check(self, key: str) -> None:
        why = self.guard.reason(str(self.root / key))
        if why is not None:
            raise OutsideStore(self.root / key, why)

    async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
        self._check(key)
        return await super().get(key, prototype, byte_range)

    def get_sync(self, key: str, *, prototype: Any = None, byte_range: Any = None) -> Any:
        self._check(key)
        return super().get_sync(key, prototype=prototype, byte_range=byte_range)

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> Any:
        key_ranges = list(key_ranges)
        for key, _ in key_ranges:
            self._check(key)
        return await super().get_partial_values(prototype, key_ranges)


def checked_local_store(root: str | Path, *, read_only: bool = True) -> CheckedLocalStore:
    """The `CheckedLocalStore` at `root`."""
    return CheckedLocalStore(root, read_only=read_only)


# --- synchronous object helpers (any zarr store; listing with sizes is one request per 1000 keys on
# obstore, a HEAD per key elsewhere) ----------------------------------------------------------------------


def _sync(coro: Any) -> Any:
    from zarr.core.sync import sync

    return sync(coro)


def _proto() -> Any:
    from zarr.buffer import default_buffer_prototype

    return default_buffer_prototype()


def get_bytes(store: Any, key: str) -> bytes | None:
    """The whole object `key` of a zarr store, or None if it does not exist."""
    buf = _sync(store.get(key, prototype=_proto()))
    return None if buf is None else buf.to_bytes()


def get_many(store: Any, keys: list[str]) -> list[bytes | None]:
    """Several whole objects, `CONCURRENCY` requests at once (None where absent)."""

    async def run() -> list[bytes | None]:
        limit = asyncio.Semaphore(CONCURRENCY)

        async def one(key: str) -> bytes | None:
            async with limit:
                buf = await store.get(key, prototype=_proto())
            return None if buf is None else buf.to_bytes()

        return await asyncio.gather(*(one(k) for k in keys))

    return _sync(run())


def put_bytes(store: Any, key: str, data: bytes) -> None:
    """Write object `key` (whole; an object store has no partial writes)."""
    _sync(store.set(key, _proto().buffer.from_bytes(data)))


def delete_key(store: Any, key: str) -> None:
    """Delete object `key` (nothing if it is absent)."""
    _sync(store.delete(key))


def delete_prefix(store: Any, prefix: str = "") -> None:
    """Delete every object under `prefix` (all of the store for "")."""
    _sync(store.delete_dir(prefix))


def list_sizes(store: Any, prefix: str = "") -> dict[str, int]:
    """`{key: size}` of every object under `prefix` (keys relative to the store's root)."""
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    inner = getattr(store, "store", None)
    if inner is not None and type(inner).__module__.startswith("obstore"):
        import obstore

        return {m["path"]: int(m["size"]) for batch in obstore.list(inner, prefix or None) for m in batch}

    async def run() -> dict[str, int]:
        keys = [k async for k in store.list_prefix(prefix)]
        limit = asyncio.Semaphore(CONCURRENCY)

        async def size(key: str) -> int:
            async with limit:
                return int(await store.getsize(key))

        return dict(zip(keys, await asyncio.gather(*(size(k) for k in keys))))

    return _sync(run())


def sizes_of(store: Any, keys: list[str]) -> dict[str, int]:
    """`{key: size}` of the given objects that exist, by concurrent HEAD requests (for HTTP servers,
    which have no listing)."""

    async def run() -> dict[str, int]:
        limit = asyncio.Semaphore(CONCURRENCY)

        async def size(key: str) -> int | None:
            async with limit:
                try:
                    return int(await store.getsize(key))
                except FileNotFoundError:
                    return None

        got = await asyncio.gather(*(size(k) for k in keys))
        return {k: n for k, n in zip(keys, got) if n is not None}

    return _sync(run())


def check_writable(location: str) -> None:
    """Before writing stores under a remote `location`: one listing request, so that a missing bucket,
    refused or missing credentials, or an unreachable server is one `WriteError` line naming the URL,
    not the same failure for every input (nor a client's traceback)."""
    from ips.errors import WriteError, is_remote_error, remote_reason

    try:
        store = object_store(location, read_only=False, quick=True)
        list_sizes(store, "")
    except (ValueError, ImportError) as e:
        raise WriteError(f"--out {location}: {e}") from None
    except Exception as e:  # noqa: BLE001 - the client's own error kinds
        if not is_remote_error(e):
            raise
        raise WriteError(f"--out {location}: cannot write there ({remote_reason(e)})") from None
