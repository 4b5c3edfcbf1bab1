"""Keyed trees: copy-on-write B+trees of sorted fixed-size records in metadata blocks.

A radix tree (radix.py) suits dense keys: a block map's block numbers. Sparse keys, such as
(block, snapshot) pairs where each snapshot holds a few entries, would cost a whole leaf (and
its path) per snapshot there; a keyed tree packs them: records of every owner share leaves, in
key order, and a lookup costs one node per level whatever the number of keys.

Keys are 16 bytes, compared as bytes (layout.py stores them big-endian, so that is numeric
order); every record of one tree has a value of the same size. Interior nodes hold, for each
child, a lower bound of the keys under it (above every key under the child before it) and the
child's block pointer (with its generation
and checksum, verified on read, and both copies' addresses: the same rules as a radix tree's).

The copy-on-write rules are the radix tree's: a committed node is never changed in place; the
first change in a transaction decodes it into `Node.records` and frees its old address (not
reusable before the commit); dirty nodes are pinned in their parent's records, so they never
depend on the cache; `commit()` writes them bottom-up at fresh addresses. A clean node is
searched where it lies (a binary search over its bytes), so the cache holds only block buffers
and memory stays inside its bound.

Balance: a leaf or interior node splits in two when full; after a delete, a node under a
quarter full is merged into a neighbour when the two fit in three quarters of a node, and an
emptied node leaves its parent. A root with a single child gives way to it.

Hot leaves: a committed tree remembers the key ranges of the last leaves it descended to
(each leaf's bounds, as its parents give them, and its address), so a lookup in one of them
goes straight to the leaf: one C bisect instead of a descent of interior nodes. Only the
range and address are kept, never the node: a leaf the cache evicted is found by a descent
again, so this adds nothing to memory beyond a few keys. The ranges hold while the tree is
unchanged; the first change (which is where an address can be freed) forgets them.

Locking: callers hold the engine lock for every call below.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import Any

from .layout import (
    BT_KEYED_INTERIOR,
    BT_KEYED_LEAF,
    KEY_SIZE,
    NO_POINTER,
    POINTER_SIZE,
    BlockPointer,
    keyed_fanout,
    keyed_interior_records,
    keyed_key_at,
    keyed_leaf_capacity,
    keyed_leaf_records,
    keyed_pointer_at,
    keyed_search,
    keyed_value_at,
    pack_keyed_interior,
    pack_keyed_leaf,
)
from .radix import MetaStore, Node

Child = BlockPointer | Node  # an interior node's child: committed, or dirty and pinned

HOT_LEAVES = 64  # key ranges remembered per tree (see "Hot leaves" above)


class KeyedTree:
    """A B+tree of (16-byte key, value_size-byte value) records."""

    def __init__(
        self,
        store: MetaStore,
        owner: int,
        value_size: int,
        root: BlockPointer = NO_POINTER,
        height: int = 0,
    ) -> None:
        self.store = store
        self.owner = owner
        self.value_size = value_size
        self.root = root  # the committed root (NO_POINTER: empty, or dirty: see root_node)
        self.height = height  # interior levels above the leaves
        self.root_node: Node | None = None  # pinned while dirty
        self.leaf_capacity = keyed_leaf_capacity(store.block_size, value_size)
        self.fanout = keyed_fanout(store.block_size)
        self._leaf_record = KEY_SIZE + value_size
        self._interior_record = KEY_SIZE + POINTER_SIZE
        # hot leaves: sorted lower bounds, and for each its upper bound (None: none) and address
        self._hot_lo: list[bytes] = []
        self._hot_leaf: list[tuple[bytes | None, int]] = []

    # --- reading ------------------------------------------------------------------------------

    @property
    def is_empty(self) -> bool:
        return self.root.addr0 == 0 and self.root_node is None

    @property
    def is_dirty(self) -> bool:
        return self.root_node is not None

    def _root(self) -> Node | None:
        if self.root_node is not None:
            return self.root_node
        if self.root.addr0 == 0:
            return None
        return self._load(self.root, self.height)

    def block_type(self, level: int) -> int:
        """The type of this tree's nodes at level (what a read of one verifies)."""
        return BT_KEYED_LEAF if level == 0 else BT_KEYED_INTERIOR

    def _load(self, ptr: BlockPointer, level: int) -> Node:
        return self.store.load(ptr, self.block_type(level), level)

    def _child_index(self, node: Node, key: bytes) -> int:
        """The child of an interior node whose range holds key: the last one whose lower
        bound is not above key (the first child takes keys below every bound)."""
        if node.records is not None:
            return max(0, bisect.bisect_right(node.records[0], key) - 1)
        n = node.count
        i = keyed_search(node.buf, self._interior_record, n, key)
        if i < n and keyed_key_at(node.buf, self._interior_record, i) == key:
            return i
        return max(0, i - 1)

    def _child(self, node: Node, i: int) -> Node:
        if node.records is not None:
            kid = node.records[1][i]
            return kid if isinstance(kid, Node) else self._load(kid, node.level - 1)
        return self._load(keyed_pointer_at(node.buf, i), node.level - 1)

    def _leaf_for(self, key: bytes) -> Node | None:
        if self.root_node is not None:  # changing: a plain descent through dirty nodes
            node: Node | None = self.root_node
            while node is not None and node.level > 0:
                node = self._child(node, self._child_index(node, key))
            return node
        i = bisect.bisect_right(self._hot_lo, key) - 1
        if i >= 0:
            hi, addr = self._hot_leaf[i]
            if hi is None or key < hi:
                node = self.store.cache.get(addr)
                if node is not None:
                    return node
        return self._descend(key)

    def _descend(self, key: bytes) -> Node | None:
        """A committed tree's leaf for key, remembered with its key range."""
        node = self._root()
        lo, hi = b"", None
        rs = self._interior_record
        while node is not None and node.level > 0:
            i = self._child_index(node, key)
            if i > 0:
                lo = keyed_key_at(node.buf, rs, i)
            if i + 1 < node.count:
                hi = keyed_key_at(node.buf, rs, i + 1)
            node = self._child(node, i)
        if node is not None and node.addr:
            self._remember(lo, hi, node.addr)
        return node

    def _remember(self, lo: bytes, hi: bytes | None, addr: int) -> None:
        if len(self._hot_lo) >= HOT_LEAVES:
            self._forget_hot()
        j = bisect.bisect_left(self._hot_lo, lo)
        if j < len(self._hot_lo) and self._hot_lo[j] == lo:
            self._hot_leaf[j] = (hi, addr)
            return
        self._hot_lo.insert(j, lo)
        self._hot_leaf.insert(j, (hi, addr))

    def _forget_hot(self) -> None:
        self._hot_lo.clear()
        self._hot_leaf.clear()

    def _size(self, node: Node) -> int:
        return len(node.records[0]) if node.records is not None else node.count

    def get(self, key: bytes) -> bytes | None:
        """The value stored under key, or None."""
        leaf = self._leaf_for(key)
        if leaf is None:
            return None
        if leaf.records is not None:
            keys = leaf.records[0]
            i = bisect.bisect_left(keys, key)
            return leaf.records[1][i] if i < len(keys) and keys[i] == key else None
        i = keyed_search(leaf.buf, self._leaf_record, leaf.count, key)
        if i < leaf.count and keyed_key_at(leaf.buf, self._leaf_record, i) == key:
            return keyed_value_at(leaf.buf, self.value_size, i)
        return None

    def ceiling(self, key: bytes) -> tuple[bytes, bytes] | None:
        """The first record whose key is not below key, or None."""
        leaf = self._leaf_for(key)  # one descent: the answer is in this leaf, or the next
        if leaf is None:
            return None
        if leaf.records is not None:
            keys = leaf.records[0]
            i = bisect.bisect_left(keys, key)
            if i < len(keys):
                return keys[i], leaf.records[1][i]
        else:
            n = leaf.count
            i = keyed_search(leaf.buf, self._leaf_record, n, key)
            if i < n:
                return (
                    keyed_key_at(leaf.buf, self._leaf_record, i),
                    keyed_value_at(leaf.buf, self.value_size, i),
                )
        for found in self.items(key):  # past the leaf's last key
            return found
        return None

    def items(self, lo: bytes = b"", hi: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) of every record with lo <= key < hi (hi None: no end), in key order.
        Don't change the tree meanwhile."""
        root = self._root()
        if root is None:
            return
        yield from self._items(root, lo, hi)

    def _items(self, node: Node, lo: bytes, hi: bytes | None) -> Iterator[tuple[bytes, bytes]]:
        if node.level == 0:
            if node.records is not None:
                keys, values = node.records
                for i in range(bisect.bisect_left(keys, lo), len(keys)):
                    if hi is not None and keys[i] >= hi:
                        return
                    yield keys[i], values[i]
                return
            n, rs, buf = node.count, self._leaf_record, node.buf
            for i in range(keyed_search(buf, rs, n, lo), n):
                key = keyed_key_at(buf, rs, i)
                if hi is not None and key >= hi:
                    return
                yield key, keyed_value_at(buf, self.value_size, i)
            return
        n = self._size(node)
        for i in range(self._child_index(node, lo), n):
            if i > 0 and hi is not None and self._bound(node, i) >= hi:
                return
            yield from self._items(self._child(node, i), lo, hi)

    def _bound(self, node: Node, i: int) -> bytes:
        if node.records is not None:
            return node.records[0][i]
        return keyed_key_at(node.buf, self._interior_record, i)

    # --- writing ------------------------------------------------------------------------------

    def _decode(self, node: Node) -> None:
        """Turn a clean node dirty: decoded into records, its old address freed."""
        if node.level == 0:
            node.records = keyed_leaf_records(node.buf, self.value_size, node.count)
        else:
            keys, pointers = keyed_interior_records(node.buf, node.count)
            node.records = (keys, list(pointers))
        self.store.make_dirty(node)

    def _new(self, level: int, keys: list[bytes], others: list[Any]) -> Node:
        node = self.store.new_node(level)
        node.records = (keys, others)
        return node

    def _dirty_root(self) -> Node:
        self._forget_hot()  # the change about to start may free a remembered leaf's address
        node = self._root()
        if node is None:
            node = self._new(0, [], [])
        elif node.records is None:
            self._decode(node)
        self.root_node = node
        self.root = NO_POINTER
        return node

    def _dirty_child(self, parent: Node, i: int) -> Node:
        assert parent.records is not None
        kid = parent.records[1][i]
        if isinstance(kid, Node):
            return kid
        node = self._load(kid, parent.level - 1)
        self._decode(node)
        parent.records[1][i] = node
        return node

    def _dirty_path(self, key: bytes) -> list[tuple[Node, int]]:
        """The nodes from the root to key's leaf, each dirty, with the index each has in its
        parent (the root's: -1)."""
        node = self._dirty_root()
        path = [(node, -1)]
        while node.level > 0:
            i = self._child_index(node, key)
            if i == 0 and key < node.records[0][0]:  # type: ignore[index]
                node.records[0][0] = key  # type: ignore[index]  # keep every bound a lower one
            node = self._dirty_child(node, i)
            path.append((node, i))
        return path

    def put(self, key: bytes, value: bytes) -> bytes | None:
        """Store value under key; returns the value it replaced, or None if key is new."""
        assert len(key) == KEY_SIZE and len(value) == self.value_size
        path = self._dirty_path(key)
        leaf = path[-1][0]
        assert leaf.records is not None
        keys, values = leaf.records
        i = bisect.bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            old: bytes = values[i]
            values[i] = value
            return old
        keys.insert(i, key)
        values.insert(i, value)
        self._split_up(path)
        return None

    def _split_up(self, path: list[tuple[Node, int]]) -> None:
        for depth in range(len(path) - 1, -1, -1):
            node, index = path[depth]
            assert node.records is not None
            keys, others = node.records
            limit = self.leaf_capacity if node.level == 0 else self.fanout
            if len(keys) <= limit:
                return
            half = len(keys) // 2
            right_keys = keys[half:]
            right = self._new(node.level, right_keys, others[half:])
            del keys[half:], others[half:]
            if depth == 0:  # the root splits: the tree grows a level
                bounds = [keys[0], right_keys[0]]
                self.root_node = self._new(node.level + 1, bounds, [node, right])
                self.height += 1
                return
            parent = path[depth - 1][0]
            assert parent.records is not None
            parent.records[0].insert(index + 1, right_keys[0])
            parent.records[1].insert(index + 1, right)

    def delete(self, key: bytes) -> bytes | None:
        """Remove key's record; returns its value, or None if there was none (the tree is
        left unchanged then)."""
        if self.get(key) is None:
            return None
        path = self._dirty_path(key)
        leaf = path[-1][0]
        assert leaf.records is not None
        keys, values = leaf.records
        i = bisect.bisect_left(keys, key)
        old: bytes = values.pop(i)
        del keys[i]
        self._rebalance_up(path)
        return old

    def _rebalance_up(self, path: list[tuple[Node, int]]) -> None:
        for depth in range(len(path) - 1, 0, -1):
            node, index = path[depth]
            parent = path[depth - 1][0]
            assert node.records is not None and parent.records is not None
            limit = self.leaf_capacity if node.level == 0 else self.fanout
            size = len(node.records[0])
            if size == 0:
                self._drop_child(parent, index)
                continue
            if size >= limit // 4 or len(parent.records[0]) < 2:
                return
            left = index - 1 if index > 0 else index
            sibling = left if left != index else left + 1
            if size + self._size(self._child(parent, sibling)) > limit * 3 // 4:
                return  # (decided before the sibling is copied: it stays as it is)
            a = self._dirty_child(parent, left)
            b = self._dirty_child(parent, left + 1)
            assert a.records is not None and b.records is not None
            if node.level > 0:  # b's first bound, made exact: it now follows a's children
                b.records[0][0] = parent.records[0][left + 1]
            a.records[0].extend(b.records[0])
            a.records[1].extend(b.records[1])
            b.records = None
            b.dirty = False  # never written: its old address was freed when it turned dirty
            del parent.records[0][left + 1], parent.records[1][left + 1]
        self._shrink_root()

    def _drop_child(self, parent: Node, i: int) -> None:
        assert parent.records is not None
        kid = parent.records[1][i]
        if isinstance(kid, Node):
            kid.records = None
            kid.dirty = False
        else:
            self.store.forget(kid)
        del parent.records[0][i], parent.records[1][i]

    def _shrink_root(self) -> None:
        """A root left with one child gives way to it (an emptied one to nothing)."""
        root = self.root_node
        while root is not None and root.level > 0:
            assert root.records is not None
            keys, kids = root.records
            if len(keys) > 1:
                return
            root.records = None
            root.dirty = False  # dropped unwritten: its old address was freed when dirtied
            self.height -= 1
            if not keys:
                self.root_node, self.root, self.height = None, NO_POINTER, 0
                return
            kid = kids[0]
            if not isinstance(kid, Node):  # committed: it becomes the root as it is
                self.root_node, self.root = None, kid
                return
            self.root_node = root = kid

    def count_dirty(self) -> int:
        """Nodes the next commit will write (an upper bound)."""
        if self.root_node is None:
            return 0
        n, stack = 0, [self.root_node]
        while stack:
            node = stack.pop()
            n += 1
            if node.level > 0 and node.records is not None:
                stack.extend(k for k in node.records[1] if isinstance(k, Node))
        return n

    def commit(self, allocate: Callable[[], int] | None = None) -> None:
        """Write every dirty node; afterwards root and height describe the tree on disk."""
        root = self.root_node
        if root is None:
            return
        self.root_node = None
        assert root.records is not None
        if not root.records[0]:  # emptied
            root.records = None
            root.dirty = False
            self.root = NO_POINTER
            self.height = 0
            return
        self.root = self._commit_node(root, allocate)

    def _commit_node(self, node: Node, allocate: Callable[[], int] | None) -> BlockPointer:
        assert node.records is not None
        keys, others = node.records
        if node.level == 0:
            pack_keyed_leaf(node.buf, keys, others)
            btype = BT_KEYED_LEAF
        else:
            pointers = [
                self._commit_node(k, allocate) if isinstance(k, Node) else k for k in others
            ]
            pack_keyed_interior(node.buf, keys, pointers)
            btype = BT_KEYED_INTERIOR
        node.count = len(keys)
        node.records = None
        key_base = int.from_bytes(keys[0][:8], "big")
        return self.store.write(node, btype, self.owner, key_base, allocate)

    def free_all(self) -> int:
        """Free every node of the tree (its records must already be disposed of). Returns the
        number of nodes freed."""
        freed = 0
        self._forget_hot()
        if self.root_node is not None:
            freed = self._free_dirty(self.root_node)
        elif self.root.addr0:
            freed = self._free_clean(self.root, self.height)
        self.root_node = None
        self.root = NO_POINTER
        self.height = 0
        return freed

    def _free_dirty(self, node: Node) -> int:
        freed = 0
        if node.level > 0 and node.records is not None:
            for kid in node.records[1]:
                if isinstance(kid, Node):
                    freed += self._free_dirty(kid)
                else:
                    freed += self._free_clean(kid, node.level - 1)
        node.records = None
        node.dirty = False
        return freed  # a dirty node's own old address was freed when it turned dirty

    def _free_clean(self, ptr: BlockPointer, level: int) -> int:
        freed = 1
        if level > 0:
            node = self._load(ptr, level)
            for i in range(node.count):
                freed += self._free_clean(keyed_pointer_at(node.buf, i), level - 1)
        self.store.forget(ptr)
        return freed

    def all_node_pointers(self) -> Iterator[tuple[BlockPointer, int]]:
        """(pointer, level) of every committed node, parents first. Tree must be clean."""
        assert self.root_node is None
        if self.root.addr0:
            yield from self._pointers(self.root, self.height)

    def _pointers(self, ptr: BlockPointer, level: int) -> Iterator[tuple[BlockPointer, int]]:
        yield ptr, level
        if level > 0:
            node = self._load(ptr, level)
            for i in range(node.count):
                yield from self._pointers(keyed_pointer_at(node.buf, i), level - 1)
