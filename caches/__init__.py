"""KV caches, registered by name: `create_cache("last_recent", params, sink_tokens=4)`."""

from caches import dense, last_recent  # noqa: F401  (importing a cache module registers it)
from caches.base import KVCache, KVCacheParams, cache_class, cache_names, create_cache

__all__ = ["KVCache", "KVCacheParams", "cache_class", "cache_names", "create_cache"]
