"""Client-side load balancing over the instances of one service.

Every strategy is a small class with ``pick(instances, key=None) -> ServiceInstance``.
``pick`` first narrows the list with :func:`eligible_instances`:

* critical instances are never picked (warning ones are, as in discovery);
* no healthy instance at all -> :class:`NoHealthyInstance`;
* protection threshold (as in Nacos): when the healthy fraction of the
  instances passed in is *below* ``protection_threshold``, ``pick`` raises
  :class:`ProtectionThresholdReached` instead of piling all traffic onto the few
  healthy instances left. Nacos in that situation returns every instance,
  unhealthy ones included; fleetmesh deliberately does not send traffic to
  instances it knows to be critical and raises a clear signal instead, so the
  caller can shed load, back off or fail fast. The exception carries the
  healthy and total counts. The threshold defaults to ``0.0`` (disabled, like
  Nacos); set it per service, e.g. ``0.5``.

Candidates are ordered by :attr:`ServiceInstance.qualified_id`, so the
deterministic strategies do not depend on the order of the list passed in.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import datetime

from fleetmesh.core.errors import InvalidInput
from fleetmesh.registry.domain import (
    NoHealthyInstance,
    ProtectionThresholdReached,
    ServiceInstance,
    select_instances,
)

DEFAULT_VIRTUAL_NODES = 160


class MissingHashKey(InvalidInput):
    """Consistent hashing was asked to pick without a key."""

    problem = "missing-hash-key"


class UnbalancedRelease(ValueError):
    """``release`` was called for an instance with no outstanding request (a caller bug)."""


def eligible_instances(
    instances: Sequence[ServiceInstance],
    *,
    protection_threshold: float = 0.0,
    now: datetime | None = None,
) -> list[ServiceInstance]:
    """The healthy instances, ordered by qualified id, after the protection check."""
    if not instances:
        raise NoHealthyInstance(None)
    service = instances[0].service
    healthy = sorted(
        select_instances(instances, healthy_only=True, now=now),
        key=lambda instance: instance.qualified_id,
    )
    if not healthy:
        raise NoHealthyInstance(service)
    if len(healthy) / len(instances) < protection_threshold:
        raise ProtectionThresholdReached(
            service, healthy=len(healthy), total=len(instances), threshold=protection_threshold
        )
    return healthy


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process (unlike ``hash()``)."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class LoadBalancer(ABC):
    """Common part of the strategies: health filtering and the protection threshold."""

    def __init__(self, *, protection_threshold: float = 0.0) -> None:
        if not 0.0 <= protection_threshold <= 1.0:
            raise ValueError("protection_threshold must be between 0.0 and 1.0")
        self.protection_threshold = protection_threshold

    def pick(
        self,
        instances: Sequence[ServiceInstance],
        key: str | None = None,
        *,
        now: datetime | None = None,
    ) -> ServiceInstance:
        """Choose one healthy instance; ``now`` lets expired TTL instances count as critical."""
        candidates = eligible_instances(
            instances, protection_threshold=self.protection_threshold, now=now
        )
        return self._choose(candidates, key)

    @abstractmethod
    def _choose(self, candidates: list[ServiceInstance], key: str | None) -> ServiceInstance:
        """Choose among non-empty, healthy candidates ordered by qualified id."""


class RoundRobinBalancer(LoadBalancer):
    """Each candidate in turn."""

    def __init__(self, *, protection_threshold: float = 0.0) -> None:
        super().__init__(protection_threshold=protection_threshold)
        self._position = 0

    def _choose(self, candidates: list[ServiceInstance], _key: str | None) -> ServiceInstance:
        chosen = candidates[self._position % len(candidates)]
        self._position += 1
        return chosen


class RandomBalancer(LoadBalancer):
    """Uniformly at random."""

    def __init__(
        self, rng: random.Random | None = None, *, protection_threshold: float = 0.0
    ) -> None:
        super().__init__(protection_threshold=protection_threshold)
        self._rng = rng or random.Random()

    def _choose(self, candidates: list[ServiceInstance], _key: str | None) -> ServiceInstance:
        return self._rng.choice(candidates)


class WeightedRandomBalancer(LoadBalancer):
    """At random, in proportion to each instance's ``weight``."""

    def __init__(
        self, rng: random.Random | None = None, *, protection_threshold: float = 0.0
    ) -> None:
        super().__init__(protection_threshold=protection_threshold)
        self._rng = rng or random.Random()

    def _choose(self, candidates: list[ServiceInstance], _key: str | None) -> ServiceInstance:
        weights = [instance.weight for instance in candidates]
        return self._rng.choices(candidates, weights=weights)[0]


class LeastOutstandingBalancer(LoadBalancer):
    """The instance with the fewest requests in flight; ties are broken round-robin.

    The caller reports requests: :meth:`acquire` when one is sent to an
    instance, :meth:`release` when it completes (successfully or not).
    ``pick`` itself does not acquire.
    """

    def __init__(self, *, protection_threshold: float = 0.0) -> None:
        super().__init__(protection_threshold=protection_threshold)
        self._outstanding: dict[str, int] = {}
        self._tie_position = 0

    def acquire(self, instance: ServiceInstance) -> None:
        self._outstanding[instance.qualified_id] = self.outstanding(instance) + 1

    def release(self, instance: ServiceInstance) -> None:
        count = self.outstanding(instance)
        if count == 0:
            raise UnbalancedRelease(f"{instance.qualified_id} has no outstanding request")
        if count == 1:
            del self._outstanding[instance.qualified_id]
        else:
            self._outstanding[instance.qualified_id] = count - 1

    def outstanding(self, instance: ServiceInstance) -> int:
        return self._outstanding.get(instance.qualified_id, 0)

    def _choose(self, candidates: list[ServiceInstance], _key: str | None) -> ServiceInstance:
        fewest = min(self.outstanding(instance) for instance in candidates)
        tied = [instance for instance in candidates if self.outstanding(instance) == fewest]
        chosen = tied[self._tie_position % len(tied)]
        self._tie_position += 1
        return chosen


class ConsistentHashBalancer(LoadBalancer):
    """The owner of ``key`` on a hash ring with ``virtual_nodes`` points per instance.

    Uses a stable 64-bit blake2b hash. When one of N instances leaves (or turns
    critical) only the keys it owned move, about 1/N of them; when one joins it
    takes about 1/(N+1) of the keys from the others. Weights are not used.
    The ring is rebuilt only when the set of candidates changes.
    """

    def __init__(
        self, virtual_nodes: int = DEFAULT_VIRTUAL_NODES, *, protection_threshold: float = 0.0
    ) -> None:
        super().__init__(protection_threshold=protection_threshold)
        if virtual_nodes < 1:
            raise ValueError("virtual_nodes must be at least 1")
        self.virtual_nodes = virtual_nodes
        self._ring_members: tuple[str, ...] = ()
        self._ring_points: list[int] = []
        self._ring_owners: list[int] = []

    def _choose(self, candidates: list[ServiceInstance], key: str | None) -> ServiceInstance:
        if key is None:
            raise MissingHashKey("consistent hashing needs a key to pick an instance")
        self._ensure_ring(candidates)
        index = bisect.bisect_right(self._ring_points, stable_hash(key))
        return candidates[self._ring_owners[index % len(self._ring_points)]]

    def _ensure_ring(self, candidates: list[ServiceInstance]) -> None:
        members = tuple(instance.qualified_id for instance in candidates)
        if members == self._ring_members:
            return
        points = sorted(
            (stable_hash(f"{member}#{vnode}"), position)
            for position, member in enumerate(members)
            for vnode in range(self.virtual_nodes)
        )
        self._ring_members = members
        self._ring_points = [point for point, _ in points]
        self._ring_owners = [position for _, position in points]
