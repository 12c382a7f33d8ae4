"""`Topology`: the switches above a cluster's nodes, as levels (e.g. racks, then pods) each with its own link.

In a cluster file, an optional `topology:` lists the levels bottom-up; the first level's groups hold node names,
every higher level's groups hold the names of the level below:

```yaml
topology:
  - {level: rack, link: {gb_s: 50, latency_us: 5}, groups: {r0: [h100-0, h100-1], r1: [h100-2, h100-3]}}
  - {level: pod, link: {gb_s: 25, latency_us: 10}, groups: {p0: [r0], p1: [r1]}}
```

A first-level group may name a `repeat` entry of `nodes:` for all of its nodes (`{r0: [h100]}` for `h100-0 ..`).
Every node (every group) sits in exactly one group of the next level. The *level* a set of nodes spans is 0 when
it is one node, `k` (1-based) when its nodes share a group of level `k` but not of the levels below, and
`len(levels) + 1` when they share none: the link their traffic crosses is then the node's own, level `k`'s, or
the cluster's `inter_node_link`. Without a topology, two nodes always span level 1, over `inter_node_link`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from planners import fields
from planners.errors import SpecError

if TYPE_CHECKING:
    from planners.cluster import Link


@dataclasses.dataclass(frozen=True)
class Level:
    """One switch level: its name (e.g. "rack") and the link joining the nodes under one of its switches."""

    name: str
    link: Link


@dataclasses.dataclass(frozen=True)
class Topology:
    """Switch levels bottom-up and, per node name, the names of the groups holding it at each level."""

    levels: tuple[Level, ...] = ()
    paths: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    @property
    def top(self) -> int:
        """The level of nodes that share no group: `len(levels) + 1`."""
        return len(self.levels) + 1

    def level_of(self, names: Iterable[str]) -> int:
        """The level a set of node names spans (see the module docstring)."""
        distinct = set(names)
        if len(distinct) <= 1:
            return 0
        for k in range(len(self.levels)):
            if len({self.paths[n][k] for n in distinct}) == 1:
                return k + 1
        return self.top

    def sort_key(self, name: str) -> tuple[str, ...]:
        """A node's groups top-down: sorting by it keeps each group's nodes together, whatever the file order."""
        return tuple(reversed(self.paths.get(name, ())))

    @classmethod
    def from_list(
        cls,
        data: Any,
        node_names: Sequence[str],
        parse_link: Callable[[Any, str], Link],
        aliases: Mapping[str, Sequence[str]] | None = None,
    ) -> Topology:
        """Parse and validate a cluster file's `topology:` list against the cluster's node names (`parse_link`
        reads a level's `link:` as the cluster's other links are read; `aliases` names sets of nodes, such as the
        nodes of a `repeat` entry by its name, that the first level's groups may list whole)."""
        if not isinstance(data, list) or not data:
            raise SpecError("topology must be a non-empty list of {level, link, groups} entries, bottom-up")
        if len(set(node_names)) != len(node_names):
            repeated = sorted({n for n in node_names if node_names.count(n) > 1})
            raise SpecError(f"topology needs unique node names; repeated: {repeated}")
        levels: list[Level] = []
        paths: dict[str, tuple[str, ...]] = {n: () for n in node_names}
        members = list(node_names)
        for k, entry in enumerate(data):
            where = f"topology[{k}]"
            e = fields.mapping(entry, where, ("level", "link", "groups"), ("level", "link", "groups"))
            name = str(e["level"])
            if name in [lv.name for lv in levels]:
                raise SpecError(f"{where}.level {name!r} repeats an earlier level's name")
            levels.append(Level(name, parse_link(e["link"], f"{where}.link")))
            groups = _groups(e["groups"], f"{where}.groups", members, (aliases or {}) if k == 0 else {})
            group_of = {m: g for g, names in groups.items() for m in names}
            paths = {n: (*p, group_of[n if k == 0 else p[-1]]) for n, p in paths.items()}
            members = list(dict.fromkeys(group_of.values()))
        return cls(tuple(levels), paths)


def _groups(data: Any, where: str, members: list[str], aliases: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """A level's groups: each a non-empty list of `members` (names of the level below, or `aliases` of several),
    each member in one."""
    if not isinstance(data, Mapping) or not data:
        raise SpecError(f"{where} must be a non-empty mapping of group name to a list of names among {members}")
    seen: dict[str, str] = {}
    out = {}
    for group, names in data.items():
        if not isinstance(names, list) or not names:
            raise SpecError(f"{where}.{group} must be a non-empty list of names; allowed: {[*aliases, *members]}")
        expanded = []
        for name in names:
            if name not in members and name not in aliases:
                raise SpecError(f"{where}.{group}: unknown name {name!r}; allowed: {[*aliases, *members]}")
            expanded += list(aliases.get(name, [name]))
        for m in expanded:
            if m in seen:
                raise SpecError(f"{where}: {m!r} is in both {seen[m]!r} and {group!r}")
            seen[m] = str(group)
        out[str(group)] = expanded
    missing = [m for m in members if m not in seen]
    if missing:
        raise SpecError(f"{where}: {missing} are in no group; every one of {members} must be in one")
    return out
