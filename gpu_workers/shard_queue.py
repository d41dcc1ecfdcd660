"""The queue of shards waiting for a worker: round-robin between owners (API keys), then between
each owner's requests.

Policy: owners take turns shard by shard, and within an owner its requests take turns in the order
they arrived. So one user's 150-image batches never starve another user's single image (it waits
for at most one shard per worker), and a 1-image request behind a user's own batch waits the same.
With no API keys every request has the same owner ('') and this is plain round-robin between
requests. A shard handed back after a worker died goes first, ahead of everything else.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from gpu_workers.messages import ShardTask


class ShardQueue:
    def __init__(self) -> None:
        self._by_owner: OrderedDict[str, OrderedDict[str, deque[ShardTask]]] = OrderedDict()
        self._owner_of: dict[str, str] = {}
        self._images = 0
        self._images_by_owner: dict[str, int] = {}

    def __len__(self) -> int:
        """Number of queued shards."""
        return sum(len(shards) for requests in self._by_owner.values() for shards in requests.values())

    @property
    def images(self) -> int:
        """Number of queued images (what admission control counts)."""
        return self._images

    def images_of(self, owner: str) -> int:
        """Queued images of one owner (what the per-key bound counts)."""
        return self._images_by_owner.get(owner, 0)

    def owner_of(self, request_id: str) -> str:
        return self._owner_of.get(request_id, "")

    def add(self, shards: list[ShardTask], owner: str = "") -> None:
        """Queue a new request's shards behind its owner's requests already waiting."""
        for shard in shards:
            self._owner_of[shard.request_id] = owner
            self._by_owner.setdefault(owner, OrderedDict()).setdefault(shard.request_id, deque()).append(shard)
            self._count(owner, shard.size)

    def put_front(self, shard: ShardTask) -> None:
        """Hand back a shard that was in flight: it is served before anything else."""
        owner = self.owner_of(shard.request_id)
        requests = self._by_owner.setdefault(owner, OrderedDict())
        requests.setdefault(shard.request_id, deque()).appendleft(shard)
        requests.move_to_end(shard.request_id, last=False)
        self._by_owner.move_to_end(owner, last=False)
        self._count(owner, shard.size)

    def pop(self) -> ShardTask | None:
        """The next owner's next request's next shard; both then go to the back of their lines."""
        if not self._by_owner:
            return None
        owner, requests = next(iter(self._by_owner.items()))
        request_id, shards = next(iter(requests.items()))
        shard = shards.popleft()
        self._count(owner, -shard.size)
        if shards:
            requests.move_to_end(request_id)
        else:
            del requests[request_id]
        if requests:
            self._by_owner.move_to_end(owner)
        else:
            del self._by_owner[owner]
        return shard

    def drop(self, request_id: str) -> int:
        """Forget a request's queued shards (failed or abandoned); returns how many images."""
        owner = self.owner_of(request_id)
        requests = self._by_owner.get(owner)
        shards = requests.pop(request_id, deque()) if requests is not None else deque()
        if requests is not None and not requests:
            del self._by_owner[owner]
        images = sum(shard.size for shard in shards)
        self._count(owner, -images)
        return images

    def forget(self, request_id: str) -> None:
        """The request ended (nothing of it is queued or in flight): forget its owner."""
        self.drop(request_id)
        self._owner_of.pop(request_id, None)

    def _count(self, owner: str, images: int) -> None:
        self._images += images
        left = self._images_by_owner.get(owner, 0) + images
        if left:
            self._images_by_owner[owner] = left
        else:
            self._images_by_owner.pop(owner, None)
