"""KV caches, registered by name: `create_cache("last_recent", params, sink_tokens=4)`."""

from caches import (  # noqa: F401  (importing a module registers it)
    adakv,
    dense,
    expected_attention,
    h2o,
    keydiff,
    knorm,
    last_recent,
    qh2o,
    random_eviction,
    snapkv,
    tova,
)
from caches.base import KVCache, KVCacheParams, cache_class, cache_names, create_cache

__all__ = ["KVCache", "KVCacheParams", "cache_class", "cache_names", "create_cache"]
