"""Copy-on-write radix trees of metadata blocks, and the bounded cache they are read through.

Every persistent map in a pool (a volume's block map, a snapshot's shadow map, the inode table,
the snapshot table, the free-space bitmap) is a radix tree: interior nodes hold block pointers
(the child's address, and the generation and checksum of the very version written there, so a
lost or misdirected write is caught on read), leaves hold fixed-size records. A key's leaf is
`key // leaf_capacity`; an absent subtree (address 0) means "all records zero", which is why a
new snapshot's shadow map costs nothing: it is an empty tree.

With two metadata copies (a pool formatted so), every node is written at two addresses far
apart, the same bytes at both (the header names both), and its pointer carries both. A read
whose first copy fails (bad checksum, wrong version, a read error) is served from the second;
the bad copy is rewritten from the good one at the next commit (it holds the same committed
bytes, so rewriting it in place changes nothing any state relies on) and the heal is counted.

Copy-on-write rules (the crash-safety argument rests on them):
* A committed node is never modified in place. The first change in a transaction turns it
  *dirty*: it leaves the address cache and its old address is freed through `free_address`,
  which the allocator keeps unusable until the transaction commits.
* Dirty nodes are pinned in their parent's `children` (the root in the tree), so they never
  depend on the cache. Clean nodes are reached through their address and the LRU cache only:
  memory stays bounded whatever the pool size.
* `commit()` writes dirty nodes bottom-up at freshly allocated addresses; the superblock that
  makes them current is written by the transaction layer after a sync.

Locking: callers hold the engine lock for every call below.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from .device import Device
from .errors import CorruptMetadata, DittoError
from .layout import (
    BT_INTERIOR,
    FORMAT_VERSION,
    HEADER_SIZE,
    NO_POINTER,
    BlockHeader,
    BlockPointer,
    get_pointer,
    get_pointer_v1,
    interior_fanout,
    nonzero_records,
    open_block,
    pointer_size,
    seal_block,
    set_pointer,
    set_pointer_v1,
)


class Node:
    """One metadata block in memory."""

    __slots__ = (
        "buf",
        "level",
        "addr",
        "dirty",
        "children",
        "count",
        "mask",
        "pointer",
        "records",
    )

    def __init__(self, buf: bytearray, level: int, addr: int, count: int = 0) -> None:
        self.buf = buf
        self.level = level
        self.addr = addr  # where it lives on disk; 0 while dirty or new
        self.pointer = NO_POINTER  # the pointer to it as committed (clean nodes)
        self.dirty = False
        self.children: dict[int, Node] = {}  # interior: dirty children, pinned
        self.count = count  # leaf: records in use
        self.mask: int | None = None  # leaf: owner's cached summary (e.g. non-empty entries)
        # a keyed tree's dirty node, decoded: its keys and its values (a leaf) or children
        # (interior: a pointer, or the dirty child itself, pinned); None while clean
        self.records: tuple[list[bytes], list[Any]] | None = None


class MetadataTree(Protocol):
    """What the checker and the scrub walk: a tree's committed nodes and their types."""

    store: MetaStore

    @property
    def is_dirty(self) -> bool: ...

    def all_node_pointers(self) -> Iterator[tuple[BlockPointer, int]]: ...

    def block_type(self, level: int) -> int: ...


RECENT_LEAVES = 32  # per tree


class MetaStore:
    """Reads, caches and writes metadata blocks for every tree of one pool."""

    def __init__(
        self, device: Device, block_size: int, cache_bytes: int, version: int = FORMAT_VERSION
    ) -> None:
        self.device = device
        self.block_size = block_size
        self.version = version  # a version 1 store only reads (snapctl upgrade)
        self.fanout = interior_fanout(block_size, version)
        self.pointer_size = pointer_size(version)
        self.get_pointer = get_pointer if version >= 2 else get_pointer_v1
        self.set_pointer = set_pointer if version >= 2 else set_pointer_v1
        self.cache: OrderedDict[int, Node] = OrderedDict()
        self.cache_limit = max(16, cache_bytes // block_size)
        self.generation = 0  # the generation the open transaction will commit as
        # Set by the allocator once it exists (it is itself stored in a tree).
        self.allocate_address: Callable[[], int] = _no_allocator
        self.free_address: Callable[[int], None] = _no_allocator_free
        self.nodes_read = 0
        self.nodes_written = 0
        self.dirty_nodes = 0  # dirtied or created since the last commit (an upper bound)
        self.copies = 1  # metadata copies written (the pool's setting)
        self.allocate_far: Callable[[int], int] = _no_allocator_far
        # bad copies to rewrite at the next commit: address -> the good bytes (same block)
        self.heals: dict[int, bytes] = {}
        self.healed = 0  # copies found bad and served from the other, since open
        self.report: Callable[[str], None] = lambda message: None

    def load(self, ptr: BlockPointer, btype: int, level: int) -> Node:
        """The node ptr points to, verified: checksum, type, address, and that it is the
        version ptr names."""
        addr = ptr.addr0
        node = self.cache.get(addr)
        if node is not None and (not ptr.generation or node.pointer == ptr):
            self.cache.move_to_end(addr)
            return node
        try:
            buf, hdr = self._read_copy(addr, btype, ptr)
        except DittoError as first:
            if not ptr.addr1:
                raise
            try:
                buf, hdr = self._read_copy(ptr.addr1, btype, ptr)
            except DittoError as second:
                raise CorruptMetadata(
                    f"both copies of a metadata block failed: {first}; and {second}",
                    addr,
                    getattr(first, "block_type", ""),
                ) from None
            self.queue_heal(addr, ptr.addr1, bytes(buf), f"{first}; served from its second copy")
        node = Node(buf, hdr.level, addr, hdr.records)
        node.pointer = ptr
        self.nodes_read += 1
        self.cache[addr] = node
        if len(self.cache) > self.cache_limit:
            self.cache.popitem(last=False)
        return node

    def _read_copy(self, addr: int, btype: int, ptr: BlockPointer) -> tuple[bytearray, BlockHeader]:
        buf = self.device.pread(self.block_size, addr * self.block_size)
        try:
            return buf, open_block(buf, addr, btype, ptr)
        except CorruptMetadata:
            self.device.stats.checksum_errors += 1
            raise

    def queue_heal(self, bad: int, good: int, data: bytes, why: str) -> None:
        """Rewrite the copy at `bad` with `data` (its twin's verified bytes, read from `good`)
        at the next commit; counted and logged once per block."""
        if bad in self.heals:
            return
        self.healed += 1
        self.heals[bad] = data
        if self.device.readonly:  # a check: it looks, it never writes
            self.report(
                f"{why} at block {good}; 'snapctl scrub' or 'check --repair' rewrites the bad one"
            )
        else:
            self.report(f"{why} at block {good}, and rewritten from it at the next commit")

    def bad_copies(self, ptr: BlockPointer, btype: int) -> list[tuple[int, str]]:
        """(address, what is wrong) for each copy of ptr's node that does not verify, read
        from the device (not the cache): the checker's and the scrub's view of both copies."""
        bad = []
        for addr in (ptr.addr0, ptr.addr1):
            if not addr:
                continue
            try:
                self._read_copy(addr, btype, ptr)
            except DittoError as e:
                bad.append((addr, str(e)))
        return bad

    def make_dirty(self, node: Node) -> None:
        if node.dirty:
            return
        node.dirty = True
        self.dirty_nodes += 1
        if node.addr:
            self.forget(node.pointer if node.pointer.addr0 else BlockPointer(node.addr))
            node.addr = 0

    def forget(self, ptr: BlockPointer) -> None:
        """Free a clean node's copies (its tree no longer references it)."""
        for addr in (ptr.addr0, ptr.addr1):
            if addr:
                self.cache.pop(addr, None)
                self.heals.pop(addr, None)
                self.free_address(addr)

    def write_heals(self) -> int:
        """Rewrite the bad copies found since the last commit from their good twins (called by
        the commit before it syncs). Returns how many."""
        heals, self.heals = self.heals, {}
        for addr, good in heals.items():
            self.device.pwrite(good, addr * self.block_size)
        return len(heals)

    def write(
        self,
        node: Node,
        btype: int,
        owner: int,
        key_base: int,
        allocate: Callable[[], int] | None = None,
    ) -> BlockPointer:
        """Write node at a fresh address; returns the pointer its parent (or owner) keeps."""
        addr = (allocate or self.allocate_address)()
        addr1 = 0
        if self.copies > 1:  # far from the first, unless the caller hands out the addresses
            addr1 = allocate() if allocate else self.allocate_far(addr)
        gen = self.generation
        crc = seal_block(node.buf, btype, addr, gen, owner, node.level, node.count, key_base, addr1)
        self.device.pwrite(node.buf, addr * self.block_size)
        if addr1:
            self.device.pwrite(node.buf, addr1 * self.block_size)
        self.nodes_written += 1
        node.addr = addr
        node.dirty = False
        node.pointer = BlockPointer(addr, addr1, gen, crc)
        self.cache[addr] = node
        if len(self.cache) > self.cache_limit:
            self.cache.popitem(last=False)
        return node.pointer

    def new_node(self, level: int) -> Node:
        node = Node(bytearray(self.block_size), level, 0)
        node.dirty = True
        self.dirty_nodes += 1
        return node

    def drop_cache(self) -> None:
        self.cache.clear()


def _no_allocator() -> int:
    raise AssertionError("metadata store used before the allocator was attached")


def _no_allocator_free(addr: int) -> None:
    raise AssertionError("metadata store used before the allocator was attached")


def _no_allocator_far(near: int) -> int:
    raise AssertionError("metadata store used before the allocator was attached")


class RadixTree:
    """A copy-on-write radix tree with `leaf_capacity` records per leaf."""

    def __init__(
        self,
        store: MetaStore,
        owner: int,
        leaf_type: int,
        leaf_capacity: int,
        root: BlockPointer = NO_POINTER,
        height: int = 0,
    ) -> None:
        self.store = store
        self.owner = owner
        self.leaf_type = leaf_type
        self.leaf_capacity = leaf_capacity
        self.root = root  # the committed root (NO_POINTER: empty, or dirty: see root_node)
        self.height = height  # interior levels above the leaves
        self.root_node: Node | None = None  # pinned only while dirty
        self.fanout = store.fanout
        # leaves read lately (a few, so the bound adds little to the node cache's): repeated
        # reads skip the walk; any change to the tree's shape forgets them all (a leaf changed
        # in place stays the same object)
        self._recent: dict[int, Node] = {}

    # --- reading ------------------------------------------------------------------------------

    @property
    def root_addr(self) -> int:
        return self.root.addr0

    @property
    def is_empty(self) -> bool:
        return self.root.addr0 == 0 and self.root_node is None

    @property
    def is_dirty(self) -> bool:
        return self.root_node is not None

    def _type_at(self, level: int) -> int:
        return self.leaf_type if level == 0 else BT_INTERIOR

    def block_type(self, level: int) -> int:
        """The type of this tree's nodes at level (what a read of one verifies)."""
        return self.leaf_type if level == 0 else BT_INTERIOR

    def _root(self) -> Node | None:
        if self.root_node is not None:
            return self.root_node
        if self.root.addr0 == 0:
            return None
        return self.store.load(self.root, self._type_at(self.height), self.height)

    def load_root(self) -> None:
        """Read (and verify) the root now: raises CorruptMetadata if it is unusable."""
        self._root()

    def leaf(self, leaf_no: int) -> Node | None:
        """The leaf holding records [leaf_no * capacity, ...), or None if it is absent."""
        node = self._recent.get(leaf_no)
        if node is not None:
            return node
        node = self._leaf(leaf_no)
        if node is not None:
            if len(self._recent) >= RECENT_LEAVES:
                self._recent.clear()
            self._recent[leaf_no] = node
        return node

    def _leaf(self, leaf_no: int) -> Node | None:
        node = self._root()
        if node is None:
            return None
        fan = self.fanout
        level = self.height
        if level == 0:
            return node if leaf_no == 0 else None
        span = fan ** (level - 1)
        if leaf_no >= span * fan:
            return None
        load = self.store.load
        get_ptr = self.store.get_pointer
        while level > 0:
            slot = (leaf_no // span) % fan
            child = node.children.get(slot) if node.dirty else None
            if child is None:
                ptr = get_ptr(node.buf, slot)
                if ptr.addr0 == 0:
                    return None
                child = load(ptr, self.leaf_type if level == 1 else BT_INTERIOR, level - 1)
            node = child
            level -= 1
            span //= fan
        return node

    def iter_leaves(
        self, start: int = 0, skip: Callable[[CorruptMetadata], None] | None = None
    ) -> Iterator[tuple[int, Node]]:
        """Present leaves with leaf number >= start, in order. Don't mutate the tree meanwhile.
        With skip, an unreadable node is handed to it and its subtree left out (a degraded
        open takes what can be read); without, it raises."""
        try:
            root = self._root()
        except CorruptMetadata as e:
            if skip is None:
                raise
            skip(e)
            return
        if root is None:
            return
        if self.height == 0:
            if start == 0:
                yield 0, root
            return
        yield from self._iter(root, self.height, 0, start, skip)

    def _iter(
        self,
        node: Node,
        level: int,
        base: int,
        start: int,
        skip: Callable[[CorruptMetadata], None] | None,
    ) -> Iterator[tuple[int, Node]]:
        span = self.fanout ** (level - 1)
        first = max(0, (start - base) // span)
        for slot in self._present_slots(node, first):
            child_base = base + slot * span
            if child_base + span <= start:
                continue
            child = node.children.get(slot) if node.dirty else None
            if child is None:
                ptr = self.store.get_pointer(node.buf, slot)
                try:
                    child = self.store.load(ptr, self._type_at(level - 1), level - 1)
                except CorruptMetadata as e:
                    if skip is None:
                        raise
                    skip(e)
                    continue
            if level == 1:
                yield child_base, child
            else:
                yield from self._iter(child, level - 1, child_base, start, skip)

    def _present_slots(self, node: Node, first: int) -> list[int]:
        slots = nonzero_records(node.buf, self.store.pointer_size, first)
        if node.dirty and node.children:
            slots = sorted({*slots, *(s for s in node.children if s >= first)})
        return slots

    # --- writing ------------------------------------------------------------------------------

    def _grow_to(self, leaf_no: int) -> None:
        while leaf_no >= self.fanout**self.height:
            old = self._root()
            new_root = self.store.new_node(self.height + 1)
            if old is not None:
                if old.dirty:
                    new_root.children[0] = old
                else:
                    self.store.set_pointer(new_root.buf, 0, self.root)
            self.root_node = new_root
            self.root = NO_POINTER
            self.height += 1

    def _dirty_root(self) -> Node:
        node = self._root()
        if node is None:
            node = self.store.new_node(self.height)
        else:
            self.store.make_dirty(node)
        self.root_node = node
        self.root = NO_POINTER
        return node

    def leaf_for_write(self, leaf_no: int) -> Node:
        """The leaf for leaf_no, dirty and pinned (created zeroed if absent)."""
        node = self._recent.get(leaf_no)
        if node is not None and node.dirty:
            return node  # already dirty and pinned in this tree
        self._recent.clear()
        self._grow_to(leaf_no)
        node = self._dirty_root()
        level = self.height
        fan = self.fanout
        span = fan ** (level - 1) if level else 0
        store = self.store
        while level > 0:
            slot = (leaf_no // span) % fan
            child = node.children.get(slot)
            if child is None:
                ptr = store.get_pointer(node.buf, slot)
                if ptr.addr0 == 0:
                    child = store.new_node(level - 1)
                else:
                    child = store.load(ptr, self._type_at(level - 1), level - 1)
                    store.make_dirty(child)
                    store.set_pointer(node.buf, slot, NO_POINTER)
                node.children[slot] = child
            node = child
            level -= 1
            span //= fan
        return node

    def detach_leaf(self, leaf_no: int) -> Node | None:
        """Remove a leaf from this tree and return it (dirty), for attaching to another tree."""
        self._recent.clear()
        if self.leaf(leaf_no) is None:
            return None
        node = self.leaf_for_write(leaf_no)
        self._recent.clear()
        if self.height == 0:
            self.root_node = None
            self.root = NO_POINTER
            return node
        parent = self._parent_for_write(leaf_no)
        del parent.children[leaf_no % self.fanout]
        return node

    def attach_leaf(self, leaf_no: int, leaf: Node) -> None:
        """Install a dirty leaf where this tree has none."""
        assert leaf.dirty and self.leaf(leaf_no) is None
        self._recent.clear()
        self._grow_to(leaf_no)
        if self.height == 0:
            self.root_node = leaf
            self.root = NO_POINTER
            return
        parent = self._parent_for_write(leaf_no)
        parent.children[leaf_no % self.fanout] = leaf

    def _parent_for_write(self, leaf_no: int) -> Node:
        node = self._dirty_root()
        level = self.height
        fan = self.fanout
        span = fan ** (level - 1)
        store = self.store
        while level > 1:
            slot = (leaf_no // span) % fan
            child = node.children.get(slot)
            if child is None:
                ptr = store.get_pointer(node.buf, slot)
                if ptr.addr0 == 0:
                    child = store.new_node(level - 1)
                else:
                    child = store.load(ptr, BT_INTERIOR, level - 1)
                    store.make_dirty(child)
                    store.set_pointer(node.buf, slot, NO_POINTER)
                node.children[slot] = child
            node = child
            level -= 1
            span //= fan
        return node

    def count_dirty(self) -> int:
        """Nodes the next commit will write (empty nodes are dropped, but counted: an upper
        bound the bitmap's reservation may round up)."""
        if self.root_node is None:
            return 0
        n = 0
        stack = [self.root_node]
        while stack:
            node = stack.pop()
            n += 1
            stack.extend(node.children.values())
        return n

    def commit(self, allocate: Callable[[], int] | None = None, keep_empty: bool = False) -> None:
        """Write every dirty node; afterwards root/height describe the tree on disk."""
        if self.root_node is None:
            return
        self._recent.clear()  # an emptied leaf is dropped by the commit
        ptr = self._commit_node(self.root_node, self.height, 0, allocate, keep_empty)
        self.root_node = None
        self.root = ptr
        if ptr.addr0 == 0:
            self.height = 0

    def _commit_node(
        self,
        node: Node,
        level: int,
        base: int,
        allocate: Callable[[], int] | None,
        keep_empty: bool,
    ) -> BlockPointer:
        if level > 0:
            span = self.fanout ** (level - 1)
            for slot, child in node.children.items():
                p = self._commit_node(child, level - 1, base + slot * span, allocate, keep_empty)
                self.store.set_pointer(node.buf, slot, p)
            node.children.clear()
            empty = node.buf.count(0, HEADER_SIZE) == len(node.buf) - HEADER_SIZE
        else:
            empty = node.count == 0
        if empty and not keep_empty:
            node.dirty = False
            return NO_POINTER
        key_base = base * self.leaf_capacity
        return self.store.write(node, self._type_at(level), self.owner, key_base, allocate)

    def free_all(self) -> int:
        """Free every node of the tree (its records must already be disposed of). Returns the
        number of nodes freed. Leaves are freed without being read."""
        self._recent.clear()
        freed = 0
        if self.root_node is not None:
            freed += self._free_dirty(self.root_node, self.height)
        elif self.root.addr0:
            freed += self._free_clean(self.root, self.height)
        self.root_node = None
        self.root = NO_POINTER
        self.height = 0
        return freed

    def _free_dirty(self, node: Node, level: int) -> int:
        freed = 0
        if level > 0:
            for slot in range(self.fanout):
                p = self.store.get_pointer(node.buf, slot)
                if p.addr0:
                    freed += self._free_clean(p, level - 1)
            for child in node.children.values():
                freed += self._free_dirty(child, level - 1)
        node.dirty = False
        return freed  # a dirty node's own old address was already freed when it turned dirty

    def _free_clean(self, ptr: BlockPointer, level: int) -> int:
        freed = 1
        if level > 0:
            node = self.store.load(ptr, BT_INTERIOR, level)
            for slot in nonzero_records(node.buf, self.store.pointer_size):
                freed += self._free_clean(self.store.get_pointer(node.buf, slot), level - 1)
        self.store.forget(ptr)
        return freed

    def all_node_addresses(self) -> Iterator[tuple[int, int]]:
        """(address, level) of every committed node, both copies: for the checker. Tree must
        be clean."""
        for ptr, level in self.all_node_pointers():
            yield ptr.addr0, level
            if ptr.addr1:
                yield ptr.addr1, level

    def all_node_pointers(self) -> Iterator[tuple[BlockPointer, int]]:
        """(pointer, level) of every committed node, parents first. Tree must be clean."""
        assert self.root_node is None
        if self.root.addr0:
            yield from self._pointers(self.root, self.height)

    def _pointers(self, ptr: BlockPointer, level: int) -> Iterator[tuple[BlockPointer, int]]:
        yield ptr, level
        if level > 0:
            node = self.store.load(ptr, BT_INTERIOR, level)
            for slot in nonzero_records(node.buf, self.store.pointer_size):
                yield from self._pointers(self.store.get_pointer(node.buf, slot), level - 1)
