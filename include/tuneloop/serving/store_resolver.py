"""Adapters through object storage: a vLLM LoRA resolver that fetches a registered version from
the tuneloop store (S3 or a directory) onto the server's own disk, so that no volume has to be
shared between the Airflow workers and the vLLM fleet (``vllm.adapter_source: store``).

On the server (a vLLM general plugin, entry point ``vllm.general_plugins``), enabled by
``TUNELOOP_ADAPTER_CACHE=<dir>`` with the store settings in its environment
(``TUNELOOP_CONFIG`` or ``TUNELOOP__STORE__URI``...; S3 credentials from boto3's chain) and
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``. A request for a model named ``<anything>-fetch-vN``
that the server does not know makes vLLM ask the resolver, which downloads
``adapters/vN/`` to ``<cache>/vN-<hash16>/``, checks the files against the hash the registry
pins for vN (and refuses on a mismatch), and hands vLLM that directory.

On the deploying side, :func:`fetch_on_server` asks every server for ``<served>-fetch-vN``,
reads the directory it resolved to from ``/v1/models`` and unloads the fetch name; the deploy
then swaps the stable name in place from that directory, as it does from a shared path.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop import layout

if TYPE_CHECKING:
    from tuneloop.serving.vllm_client import VllmClient
    from tuneloop.storage import Store

logger = logging.getLogger(__name__)

CACHE_ENV = "TUNELOOP_ADAPTER_CACHE"
FETCH_INFIX = "-fetch-"
FETCH_NAME = re.compile(r"^(?P<prefix>[A-Za-z0-9._-]+)-fetch-(?P<version>v[0-9]{1,9})\Z")
FILES = ("adapter_config.json", "adapter_model.safetensors")


class AdapterFetchError(RuntimeError):
    """A version cannot be served from the store (unknown, unpinned, or not the pinned bytes)."""


def fetch_name(prefix: str, version: str) -> str:
    """The model name that makes a server fetch ``version`` (``<prefix>-fetch-vN``)."""
    return f"{prefix}{FETCH_INFIX}{layout.version_name(version)}"


def cached_name(version: str, pinned: str) -> str:
    """The name of a server's directory of ``version``: the hash in it, so it never changes."""
    return f"{layout.version_name(version)}-{pinned[:16]}"


def cached_dir(cache: str | os.PathLike[str], version: str, pinned: str) -> Path:
    """Where a server keeps ``version`` (see :func:`cached_name`)."""
    return Path(cache).resolve() / cached_name(version, pinned)


def fetch_version(store: Store, version: str, cache: str | os.PathLike[str]) -> Path:
    """Download ``adapters/<version>/`` into ``cache`` (once) and check it against the hash its
    registry record pins; returns the directory. Written under a temporary name and renamed
    into place, so a reader (vLLM) never sees half an adapter."""
    from tuneloop.provenance import dir_digest
    from tuneloop.registry import Registry

    version = layout.version_name(version)
    pinned = Registry(store).get(version).get("adapter_hash")
    if not pinned:
        raise AdapterFetchError(f"{version} has no adapter_hash in its registry record ({store.uri}): only pinned versions are served from the store")
    target = cached_dir(cache, version, pinned)
    if all((target / name).is_file() for name in FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        store.get_dir(layout.adapter(version), staging)
        found = dir_digest(staging, suffixes=FILES)
        if found != pinned:
            raise AdapterFetchError(
                f"{store.uri}/{layout.adapter(version)} does not match the hash its registry record pins "
                f"(sha256 {found[:12]} != {pinned[:12]}): an incomplete upload or changed weights; refusing to serve it"
            )
        try:
            staging.rename(target)
        except OSError:
            if not all((target / name).is_file() for name in FILES):  # another fetch won the rename
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def fetch_on_server(client: VllmClient, prefix: str, version: str) -> str:
    """Make the server behind ``client`` fetch ``version`` through its resolver; return the
    directory it holds it in (its own filesystem). The fetch name is unloaded again."""
    from tuneloop.serving.vllm_client import VllmError

    name = fetch_name(prefix, version)
    try:
        client.chat(name, "ping", max_tokens=1)
    except VllmError as err:
        if err.status in (400, 404):
            raise AdapterFetchError(
                f"vLLM at {client.base_url} could not fetch {version} from the store as {name}: {err.reply or err}. "
                f"Is the tuneloop resolver on (${CACHE_ENV} set, tuneloop installed in the server's Python, "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, the store settings in its environment)? Its log says why"
            ) from err
        raise
    root = client.adapters().get(name)
    if not root:
        raise AdapterFetchError(f"vLLM at {client.base_url} answered as {name} but does not list it")
    client.unload_adapter(name)
    return root


# -- the vLLM side --------------------------------------------------------------------------


def _open_store() -> Store:
    from tuneloop.config import load_settings
    from tuneloop.storage import open_store_from_settings

    return open_store_from_settings(load_settings(os.environ.get("TUNELOOP_CONFIG")))


def make_resolver(cache: str, store_factory: Any = _open_store) -> Any:
    """The resolver object vLLM calls (imports vLLM: only on a server)."""
    import asyncio

    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    class StoreResolver(LoRAResolver):
        """Resolves ``<prefix>-fetch-vN`` to the store's pinned adapter vN on this server's disk."""

        def __init__(self) -> None:
            self._store: Store | None = None

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            match = FETCH_NAME.match(lora_name)
            if match is None:
                return None
            try:
                if self._store is None:
                    self._store = store_factory()
                path = await asyncio.to_thread(fetch_version, self._store, match["version"], cache)
            except Exception as err:  # vLLM answers 404; the reason is in this server's log
                logger.error("tuneloop resolver: cannot serve %s: %s", lora_name, err)
                return None
            logger.info("tuneloop resolver: %s -> %s", lora_name, path)
            return LoRARequest(lora_name=lora_name, lora_int_id=abs(hash(lora_name)) % (2**31) + 1, lora_path=str(path))

    return StoreResolver()


def register() -> None:
    """vLLM general-plugin entry point: register the resolver when ``$TUNELOOP_ADAPTER_CACHE`` is
    set (a no-op otherwise, so installing tuneloop beside vLLM changes nothing)."""
    cache = os.environ.get(CACHE_ENV)
    if not cache:
        return
    from vllm.lora.resolver import LoRAResolverRegistry

    if "tuneloop store" in LoRAResolverRegistry.get_supported_resolvers():
        return  # plugins may load more than once per process
    Path(cache).mkdir(parents=True, exist_ok=True)
    LoRAResolverRegistry.register_resolver("tuneloop store", make_resolver(cache))
    logger.info("tuneloop resolver: adapters <prefix>-fetch-vN come from the store into %s", cache)
