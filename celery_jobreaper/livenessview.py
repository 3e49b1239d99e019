"""What one reap knows about who is alive: the frozen view, and the draft it is made from."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType

from .incarnation import Incarnation


def _empty() -> Mapping[str, str]:
    return MappingProxyType({})


def _empty_times() -> Mapping[str, datetime]:
    return MappingProxyType({})


@dataclasses.dataclass(frozen=True)
class LivenessView:
    """What one reap knows about who is alive, made once by :meth:`Liveness.assess`.

    The planner reads it; nobody changes it afterwards. What is known about tasks (held by
    this worker, by live peers, waiting in queues) is a separate value per batch
    (:class:`~celery_jobreaper.planner.TaskFacts`).
    """

    me: Incarnation | None
    now: datetime
    dead_incarnations: Mapping[str, str] = dataclasses.field(default_factory=_empty)  # id -> reason
    live_incarnations: frozenset[str] = frozenset()
    incarnation_nodes: Mapping[str, str] = dataclasses.field(default_factory=_empty)  # id -> node
    dead_nodes: Mapping[str, str] = dataclasses.field(default_factory=_empty)  # node -> reason
    live_nodes: frozenset[str] = frozenset()
    refused_nodes: Mapping[str, str] = dataclasses.field(default_factory=_empty)  # node -> reason
    #: my node name -> why its earlier starts are not judged yet (their jobs are left alone)
    undecided_nodes: Mapping[str, str] = dataclasses.field(default_factory=_empty)
    #: incarnation id -> the heartbeat it was judged dead on (``mark_dead`` compares it)
    dead_heartbeats: Mapping[str, datetime] = dataclasses.field(default_factory=_empty_times)
    #: incarnation id -> its heartbeat, of every incarnation read (:func:`newcomers`)
    seen_heartbeats: Mapping[str, datetime] = dataclasses.field(default_factory=_empty_times)
    #: node name -> the newest heartbeat of its incarnations read (the owner's last sign of life)
    node_heartbeats: Mapping[str, datetime] = dataclasses.field(default_factory=_empty_times)
    #: owner node names with no incarnation ever recorded that did not answer one ping
    unregistered_silent: frozenset[str] = frozenset()
    #: seconds until the undecided earlier starts can be judged (``None``: none undecided)
    recheck_in: float | None = None
    #: live incarnations other than this one (with ``confirm_alone``: or, if none, the other
    #: workers that answered a ping of every worker, at least 1 if that ping failed)
    other_live_workers: int = 0
    ping_failed: str | None = None

    def node_is_me(self, node: str | None) -> bool:
        """Whether *node* is this worker's own node name."""
        return self.me is not None and node == self.me.node


@dataclasses.dataclass
class LivenessDraft:
    """The view while :meth:`~celery_jobreaper.liveness.Liveness.assess` makes it (never seen
    outside that method)."""

    me: Incarnation | None
    now: datetime
    dead_incarnations: dict[str, str] = dataclasses.field(default_factory=dict)
    live_incarnations: set[str] = dataclasses.field(default_factory=set)
    incarnation_nodes: dict[str, str] = dataclasses.field(default_factory=dict)
    dead_nodes: dict[str, str] = dataclasses.field(default_factory=dict)
    live_nodes: set[str] = dataclasses.field(default_factory=set)
    refused_nodes: dict[str, str] = dataclasses.field(default_factory=dict)
    undecided: dict[str, str] = dataclasses.field(default_factory=dict)
    dead_heartbeats: dict[str, datetime] = dataclasses.field(default_factory=dict)
    seen_heartbeats: dict[str, datetime] = dataclasses.field(default_factory=dict)
    unregistered_silent: set[str] = dataclasses.field(default_factory=set)
    recheck_in: float | None = None
    other_live_workers: int = 0
    ping_failed: str | None = None

    def node_is_me(self, node: str | None) -> bool:
        """Whether *node* is this worker's own node name."""
        return self.me is not None and node == self.me.node

    def freeze(self) -> LivenessView:
        """The finished view (each owner node's newest heartbeat worked out)."""
        newest: dict[str, datetime] = {}
        for inc_id, beat in self.seen_heartbeats.items():
            node = self.incarnation_nodes[inc_id]
            if node not in newest or beat > newest[node]:
                newest[node] = beat
        return LivenessView(
            me=self.me,
            now=self.now,
            dead_incarnations=MappingProxyType(dict(self.dead_incarnations)),
            live_incarnations=frozenset(self.live_incarnations),
            incarnation_nodes=MappingProxyType(dict(self.incarnation_nodes)),
            dead_nodes=MappingProxyType(dict(self.dead_nodes)),
            live_nodes=frozenset(self.live_nodes),
            refused_nodes=MappingProxyType(dict(self.refused_nodes)),
            undecided_nodes=MappingProxyType(dict(self.undecided)),
            dead_heartbeats=MappingProxyType(dict(self.dead_heartbeats)),
            seen_heartbeats=MappingProxyType(dict(self.seen_heartbeats)),
            node_heartbeats=MappingProxyType(newest),
            unregistered_silent=frozenset(self.unregistered_silent),
            recheck_in=self.recheck_in,
            other_live_workers=self.other_live_workers,
            ping_failed=self.ping_failed,
        )
