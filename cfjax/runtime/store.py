"""`CacheStore`: the final KV caches of recent runs, so that a late edit costs only its own steps.

A trace is a record and holds no device state; this store, one per `LM`, keeps the final cache
of each recent batch beside the params that filled it, found again by a row's prompt and
response tokens (the cache is a function of those and the params alone). It is bounded by bytes
and evicts the oldest batch first; `clear()` frees it and `max_bytes = 0` turns it off.
The cache is position-indexed and attention never looks past the current slot, so the final
cache holds, in its first `bucket + s + 1` slots, the exact state after response step s.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from cfjax.core.cache import KVCache
from cfjax.runtime.driver import Decoded, Resume


@dataclasses.dataclass
class Stored:
    """One batch's final cache, the layout it was filled with and the params that filled it."""

    cache: KVCache
    start: np.ndarray  # [B] first real slot of each row
    bucket: int  # prompt slots; step i writes slot bucket + i
    chunk: int
    params: Any = dataclasses.field(repr=False)

    @property
    def nbytes(self) -> int:
        """Device bytes the cache holds."""
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(self.cache))


@dataclasses.dataclass(frozen=True)
class Hit:
    """A stored row: the batch and the row's index in it."""

    stored: Stored
    row: int


def row_key(params: Any, prompt_tokens: Sequence[int], tokens: Sequence[int]) -> tuple:
    """What determines a row's cache: the params object, the prompt and the response tokens."""
    return (id(params), tuple(int(t) for t in prompt_tokens), tuple(int(t) for t in tokens))


def _locked(method):
    """Run a store method under the store's lock."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class CacheStore:
    """A bounded LRU store of final KV caches (default 1 GiB of device memory)."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self._batches: collections.OrderedDict[int, tuple[Stored, list[tuple]]] = (
            collections.OrderedDict()
        )
        self._rows: dict[tuple, Hit] = {}
        self._lock = threading.RLock()  # a server runs requests in threads

    @property
    def nbytes(self) -> int:
        """Device bytes held now."""
        return sum(s.nbytes for s, _ in self._batches.values())

    def __len__(self) -> int:
        return len(self._batches)

    @_locked
    def put(self, stored: Stored, rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> None:
        """Keep `stored`, its row b holding `rows[b]` = (prompt tokens, response tokens)."""
        if stored.nbytes > self.max_bytes:
            return
        keys = [row_key(stored.params, p, t) for p, t in rows]
        self._batches[id(stored)] = (stored, keys)
        for b, k in enumerate(keys):
            self._rows[k] = Hit(stored, b)
        while self.nbytes > self.max_bytes:
            self._evict(next(iter(self._batches)))

    @_locked
    def get(self, params: Any, prompt_tokens: Sequence[int], tokens: Sequence[int]) -> Hit | None:
        """The stored row filled by `params` with this prompt and response, if still kept."""
        hit = self._rows.get(row_key(params, prompt_tokens, tokens))
        if hit is None or hit.stored.params is not params:  # an id reused by other params
            return None
        self._batches.move_to_end(id(hit.stored))
        return hit

    def keep(self, params: Any, out: Decoded, rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> None:  # fmt: skip
        """Keep the final cache of a run of `params` whose row b holds `rows[b]`."""
        self.put(Stored(out.cache, out.start, out.bucket, out.chunk, params), rows)

    def resume(self, params: Any, rows: Sequence[tuple[Sequence[int], Sequence[int]]], step: int, last: Sequence[int]) -> Resume | None:  # fmt: skip
        """Continue rows `(prompt, response)` of `params` at response `step` (feeding `last`)
        from their stored caches, if every row is still kept in a batch of one layout."""
        hits = [self.get(params, p, t) for p, t in rows]
        if any(h is None for h in hits):
            return None
        layouts = {(h.stored.bucket, h.stored.chunk, h.stored.cache.length) for h in hits}
        if len(layouts) != 1:
            return None
        bucket, chunk, _ = layouts.pop()
        starts = np.asarray([h.stored.start[h.row] for h in hits])
        # The run takes its rows of the stored caches' concatenation (one copy, `cache_layout`).
        batches = list({id(h.stored): h.stored for h in hits}.values())
        offsets = dict(zip(map(id, batches), np.cumsum([0] + [s.cache.batch for s in batches]), strict=False))  # fmt: skip
        rows = np.asarray([offsets[id(h.stored)] + h.row for h in hits])
        return Resume(tuple(s.cache for s in batches), starts, bucket, step, list(last), chunk, rows)  # fmt: skip

    @_locked
    def clear(self) -> None:
        """Drop every stored cache."""
        self._batches.clear()
        self._rows.clear()

    def _evict(self, batch_id: int) -> None:
        stored, keys = self._batches.pop(batch_id)
        for k in keys:
            if self._rows.get(k) is not None and self._rows[k].stored is stored:
                del self._rows[k]


class ArrayStore:
    """A bounded LRU of device values computed once per params and reused (default 1 GiB).

    Holds the scored logits of observed text (abduction), so that every posterior sample and
    every counterfactual of them reads one `[S, V]` array instead of scoring the text again.
    Keys start with the params object that computed the value; `clear()` frees it all.
    """

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[tuple, tuple[Any, Any]] = collections.OrderedDict()
        self._lock = threading.RLock()

    @property
    def nbytes(self) -> int:
        """Device bytes held now."""
        return sum(x.nbytes for _, v in self._items.values() for x in jax.tree_util.tree_leaves(v))

    def __len__(self) -> int:
        return len(self._items)

    @_locked
    def put(self, params: Any, key: tuple, value: Any) -> None:
        """Keep `value` (anything with an `nbytes`), computed by `params`, under `key`."""
        if value.nbytes > self.max_bytes:
            return
        self._items[(id(params), *key)] = (params, value)
        self._items.move_to_end((id(params), *key))
        while self.nbytes > self.max_bytes:
            self._items.popitem(last=False)

    @_locked
    def get(self, params: Any, key: tuple) -> Any:
        """The value `params` computed under `key`, if still kept (else None)."""
        item = self._items.get((id(params), *key))
        if item is None or item[0] is not params:  # an id reused by other params
            return None
        self._items.move_to_end((id(params), *key))
        return item[1]

    @_locked
    def clear(self) -> None:
        """Drop every value."""
        self._items.clear()
