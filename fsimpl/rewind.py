"""The rewindable history: which committed generations a pool can be opened at, and the rewind.

Every superblock keeps a ring of the generations committed before it (layout.RootEntry). The
deferral window (layout.DEFER_GENERATIONS) guarantees the newest of them whole: no block they
reference has been reused. Older entries are best effort: their blocks may have been reused
since, so they are offered only after a full verification walk of their metadata (the checker's
walk: every node's checksum, version and ownership), and even then data blocks freed since may
have been overwritten; the listing says so.

A rewind opens the pool at a ring generation and commits it as the newest state (with a higher
generation number, so it wins every slot), recording which generation it went back to: opening
again with the same rewind once the pool has moved on is refused, so a rewind happens once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .checker import check_state
from .device import Device
from .errors import DittoError, InvalidArgument, Refused
from .layout import (
    DEFER_GENERATIONS,
    RING_FIELDS,
    RootEntry,
    Superblock,
    pack_ring,
    root_entry,
    unpack_ring,
)
from .txn import DEFAULT_CACHE_BYTES, Pool, commit_time, read_superblocks

REWIND_CACHE_BYTES = 16 << 20


@dataclass
class Generation:
    """One generation a rewind could open, as `rewind --list` shows it."""

    generation: int
    commit_ns: int
    status: str  # newest | whole | verified | unverified | degraded | unusable
    detail: str = ""

    @property
    def usable(self) -> bool:
        """Can the pool be opened (rewound) here and written? A degraded state opens only
        read-only (txn.Pool._damaged)."""
        return self.status not in ("unusable", "degraded")

    def json(self) -> dict[str, object]:
        return dataclasses.asdict(self) | {"commit_time": commit_time(self.commit_ns)}


_STATE_FIELDS = tuple(f for f in RING_FIELDS if f not in ("generation", "commit_ns"))


def state_at(newest: Superblock, entry: RootEntry) -> Superblock:
    """The newest superblock (its generation number too: what is committed from here must win
    every slot) with the roots and counts `entry` recorded; everything else as now: ids only
    grow, settings and the role stay current. No older history: the entries before `entry`
    were outside the deferral window, their blocks may be reused."""
    fields = {name: getattr(entry, name) for name in _STATE_FIELDS}
    return dataclasses.replace(newest, **fields, ring=pack_ring([]))


def _open_at(device: Device, sb: Superblock) -> Pool:
    pool = Pool(device, sb, REWIND_CACHE_BYTES)
    pool._load()
    return pool


def _verify_walk(pool: Pool) -> str:
    """The checker's walk over the state pool holds; "" when it found nothing."""
    report = check_state(pool)
    bad = [d for d in report.defects if d.kind != "leak"]
    return "; ".join(d.message for d in bad[:2])


def generations(device: Device, deep: bool = True) -> list[Generation]:
    """The newest generation and the ring's, newest first, each judged: the newest and the
    deferral window's by opening them (roots, tables, bitmap), older ones (with deep) also by a
    full verification walk."""
    newest, _ = read_superblocks(device, strict=False)
    out: list[Generation] = []
    for i, entry in enumerate([root_entry(newest), *unpack_ring(newest)]):
        status = "newest" if i == 0 else "whole" if i <= DEFER_GENERATIONS else "verified"
        pool: Pool | None = None
        try:
            pool = _open_at(device, newest if i == 0 else state_at(newest, entry))
            problem = _verify_walk(pool) if status == "verified" and deep else ""
        except DittoError as e:
            problem = str(e)
        if status == "verified" and not deep and pool is not None:
            status = "unverified"  # it opens; the walk is left for when it is chosen
        if problem:
            status = "unusable"
        elif pool is not None and pool.read_only_reason:
            status, problem = "degraded", pool.read_only_reason
        detail = {
            "newest": "the state a normal open serves",
            "whole": "inside the deferral window: nothing it references was reused",
            "verified": "older than the deferral window: its metadata verified whole; data "
            "blocks freed since may have been reused",
            "unverified": "older than the deferral window: verified when chosen",
        }.get(status, problem)
        out.append(Generation(entry.generation, entry.commit_ns, status, detail))
    return out


def newest_usable(device: Device) -> Generation | None:
    """The newest generation that opens (for an error message: no deep walks)."""
    try:
        found = generations(device, deep=False)
    except DittoError:
        return None
    return next((g for g in found if g.usable), None)


def rewind(device: Device, generation: int) -> tuple[Pool, dict[str, object]]:
    """Open the pool on device (locked, no server using it) at `generation` and commit that as
    its newest state. Returns the pool and what was discarded."""
    newest, _ = read_superblocks(device, strict=False)
    if newest.rewound_to == generation and newest.generation >= newest.rewound_at:
        since = (
            "and nothing was committed since"
            if newest.generation == newest.rewound_at
            else f"and has moved on to generation {newest.generation}"
        )
        raise Refused(
            f"{device.path} was already rewound to generation {generation} (that rewind "
            f"committed generation {newest.rewound_at}) {since}: a rewind happens once; open "
            "it without rewind"
        )
    if generation >= newest.generation:
        raise InvalidArgument(
            f"generation {generation}: the pool's newest is {newest.generation}, so there is "
            "nothing to rewind; 'snapctl rewind --list' shows the generations it can go back to"
        )
    found = {g.generation: g for g in generations(device)}
    target = found.get(generation)
    if target is None or not target.usable:
        usable = ", ".join(str(g.generation) for g in found.values() if g.usable) or "none"
        why = f" ({target.detail})" if target is not None else " (not in the ring)"
        raise Refused(
            f"generation {generation} cannot be opened{why}; usable generations: {usable} "
            "('snapctl rewind --list')"
        )
    entry = next(e for e in unpack_ring(newest) if e.generation == generation)
    discarded = [
        {"generation": g.generation, "commit_time": commit_time(g.commit_ns)}
        for g in found.values()
        if g.generation > generation
    ]
    before = _snapshot_names(device, newest)
    pool = Pool(device, state_at(newest, entry), DEFAULT_CACHE_BYTES)
    pool._load()
    # The generations after this one overwrote in place only blocks on its in-place list, or
    # blocks allocated after it (free here): a block leaves the list for good, and comes back
    # only through a new allocation. So its own list is all there is to retake.
    pool.retake_in_place()
    pool.sb.rewound_to = generation
    pool.sb.rewound_at = newest.generation + 1
    pool.ring_head = entry  # the next commit's ring starts at the generation rewound to
    pool.sb_dirty = True
    pool.commit()
    after = {s.name for s in pool.snapshots.values()}
    summary = (
        f"opened at generation {generation} (committed {commit_time(target.commit_ns)}) and "
        f"committed as generation {pool.sb.generation}; discarded generations "
        + (", ".join(str(d["generation"]) for d in discarded) or "none")
    )
    if before is not None and before - after:
        summary += "; snapshots gone: " + ", ".join(sorted(before - after))
    if before is not None and after - before:
        summary += "; snapshots back: " + ", ".join(sorted(after - before))
    return pool, {
        "summary": summary,
        "disk": device.path,
        "rewound_to": generation,
        "committed_ns": target.commit_ns,
        "generation": pool.sb.generation,
        "discarded_generations": discarded,
        "snapshots_lost": sorted(before - after) if before is not None else None,
        "snapshots_back": sorted(after - before) if before is not None else None,
    }


def _snapshot_names(device: Device, newest: Superblock) -> set[str] | None:
    try:
        return {s.name for s in _open_at(device, newest).snapshots.values()}
    except DittoError:
        return None  # the newest state is unreadable: what it held is unknown
