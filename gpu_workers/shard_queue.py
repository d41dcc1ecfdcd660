"""The queue of shards waiting for a worker, served round-robin between requests.

Policy: requests take turns shard by shard in the order they arrived, so a 1-image request that
comes in behind a 150-image batch waits for at most one shard of that batch per worker, not the
whole batch. A shard handed back after a worker died goes first, ahead of everything else.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from gpu_workers.messages import ShardTask


class ShardQueue:
    def __init__(self) -> None:
        self._by_request: OrderedDict[str, deque[ShardTask]] = OrderedDict()
        self._images = 0

    def __len__(self) -> int:
        """Number of queued shards."""
        return sum(len(shards) for shards in self._by_request.values())

    @property
    def images(self) -> int:
        """Number of queued images (what admission control counts)."""
        return self._images

    def add(self, shards: list[ShardTask]) -> None:
        """Queue a new request's shards behind the requests already waiting."""
        for shard in shards:
            self._by_request.setdefault(shard.request_id, deque()).append(shard)
            self._images += shard.size

    def put_front(self, shard: ShardTask) -> None:
        """Hand back a shard that was in flight: it is served before anything else."""
        self._by_request.setdefault(shard.request_id, deque()).appendleft(shard)
        self._by_request.move_to_end(shard.request_id, last=False)
        self._images += shard.size

    def pop(self) -> ShardTask | None:
        """Take the next request's next shard; that request then goes to the back of the line."""
        if not self._by_request:
            return None
        request_id, shards = next(iter(self._by_request.items()))
        shard = shards.popleft()
        self._images -= shard.size
        if shards:
            self._by_request.move_to_end(request_id)
        else:
            del self._by_request[request_id]
        return shard

    def drop(self, request_id: str) -> int:
        """Forget a request's queued shards (failed or abandoned); returns how many images."""
        shards = self._by_request.pop(request_id, deque())
        images = sum(shard.size for shard in shards)
        self._images -= images
        return images
