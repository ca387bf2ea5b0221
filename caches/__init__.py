"""KV caches, registered by name: `create_cache("last_recent", params, sink_tokens=4)`."""

from caches import dense, h2o, last_recent, qh2o, snapkv, tova  # noqa: F401  (importing a module registers it)
from caches.base import KVCache, KVCacheParams, cache_class, cache_names, create_cache

__all__ = ["KVCache", "KVCacheParams", "cache_class", "cache_names", "create_cache"]
