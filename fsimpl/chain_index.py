"""Which snapshots of a volume hold an entry for each block: reading an old snapshot in O(1).

FIG. 10's walk looks at every newer shadow map in turn until one has an entry, so reading the
oldest of 100 snapshots costs 100 lookups per block. This index answers the same question with
one bisect: for each block of a leaf-sized range it keeps the ids of the snapshots whose shadow
maps have a non-empty entry there, oldest first. The walk's answer for snapshot S is the first
id >= S (then that map's entry), or live if there is none.

The index is derived data, never stored. It is built per leaf range on first use, from the
shadow maps' leaves, and kept exact by the maps themselves: a map reports every entry that
becomes empty or non-empty, and every leaf it detaches or attaches (the leaf range is then
rebuilt on its next use). A bounded number of leaf ranges is kept, least recently used first
out. A map whose leaf cannot be read (a corrupt block) is noted as broken for that range: a
read that would have to look at it is sent down the literal walk, which reports the damage,
while snapshots newer than it read as before.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Callable, Iterable

LEAF_RANGES = 256  # leaf ranges indexed at once (each at most a leaf's worth of blocks)
WALK = -1  # serving(): a broken map may hold the answer; walk the chain literally

# leaf_no -> ((snapshot id, block) of every entry, oldest id first; ids of unreadable maps)
Builder = Callable[[int], tuple[Iterable[tuple[int, int]], list[int]]]


class _Range:
    __slots__ = ("held", "broken")

    def __init__(self, held: dict[int, list[int]], broken: list[int]) -> None:
        self.held = held
        self.broken = broken


class ChainIndex:
    def __init__(self, capacity: int, build: Builder) -> None:
        self.capacity = capacity  # blocks per leaf range (the maps' leaf capacity)
        self.build = build
        self.leaves: OrderedDict[int, _Range] = OrderedDict()

    def _range(self, leaf_no: int) -> _Range:
        r = self.leaves.get(leaf_no)
        if r is None:
            pairs, broken = self.build(leaf_no)
            held: dict[int, list[int]] = {}
            for sid, b in pairs:
                held.setdefault(b, []).append(sid)
            r = self.leaves[leaf_no] = _Range(held, broken)
            if len(self.leaves) > LEAF_RANGES:
                self.leaves.popitem(last=False)
        elif len(self.leaves) > 8:
            self.leaves.move_to_end(leaf_no)
        return r

    def serving(self, snap_id: int, block: int) -> int:
        """The snapshot whose entry serves block when snap_id is read (0: live's does; WALK:
        a map that cannot be read may hold it)."""
        r = self._range(block // self.capacity)
        ids = r.held.get(block, _NONE)
        i = bisect.bisect_left(ids, snap_id)
        found = ids[i] if i < len(ids) else 0
        for s in r.broken:
            if snap_id <= s and (found == 0 or s < found):
                return WALK
        return found

    # --- kept exact by the shadow maps ---------------------------------------------------------

    def entry_changed(self, snap_id: int, block: int, present: bool) -> None:
        r = self.leaves.get(block // self.capacity)
        if r is None:
            return
        held = r.held
        ids = held.get(block)
        if present:
            if ids is None:
                held[block] = [snap_id]
            elif snap_id not in ids:
                bisect.insort(ids, snap_id)
        elif ids is not None and snap_id in ids:
            ids.remove(snap_id)
            if not ids:
                del held[block]

    def leaf_changed(self, leaf_no: int) -> None:
        self.leaves.pop(leaf_no, None)

    def clear(self) -> None:
        self.leaves.clear()


_NONE: list[int] = []
