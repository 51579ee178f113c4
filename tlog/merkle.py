"""RFC 6962 / RFC 9162 Merkle tree hashing, proofs and their verification.

Pure functions over bytes. A leaf hash is SHA-256(0x00 || entry), an interior
node SHA-256(0x01 || left || right), the root of the empty tree SHA-256("").

Two ways in:
- the fixed list API (`root`, `inclusion_proof`, `consistency_proof`) over a
  sequence of leaf hashes, for tests and small trees;
- the node API (`tree_root`, `prove_inclusion`, `prove_inclusions`, `prove_batch`,
  `prove_consistency`) over a `NodeReader`, a function returning the hash of
  the complete subtree of 2**level leaves starting at leaf `index << level`.
  Storage backends give a reader over their tiles, so proofs touch O(log n)
  stored hashes.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

NodeReader = Callable[[int, int], bytes]
"""node(level, index) -> hash of leaves [index << level, (index + 1) << level)."""


class ProofError(ValueError):
    """A proof does not verify, or its inputs are out of range."""


def leaf_hash(entry: bytes) -> bytes:
    """SHA-256(0x00 || entry)."""
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly less than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


# -- list API ---------------------------------------------------------------


def root(leaf_hashes: Sequence[bytes]) -> bytes:
    """Merkle tree hash of the leaves; SHA-256("") for none."""
    builder = Builder()
    for h in leaf_hashes:
        builder.append(h)
    return builder.root()


def _list_reader(leaf_hashes: Sequence[bytes]) -> NodeReader:
    def node(level: int, index: int) -> bytes:
        lo = index << level
        return root(leaf_hashes[lo : lo + (1 << level)])

    return node


def inclusion_proof(index: int, size: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """Audit path for leaf `index` in the tree of the first `size` leaves."""
    if size > len(leaf_hashes):
        raise ProofError(f"tree size {size} exceeds the {len(leaf_hashes)} leaves given")
    return prove_inclusion(index, size, _list_reader(leaf_hashes))


def consistency_proof(old_size: int, new_size: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """Consistency proof between the trees of the first old_size and new_size leaves."""
    if new_size > len(leaf_hashes):
        raise ProofError(f"tree size {new_size} exceeds the {len(leaf_hashes)} leaves given")
    return prove_consistency(old_size, new_size, _list_reader(leaf_hashes))


# -- node API ---------------------------------------------------------------


def range_hash(lo: int, hi: int, node: NodeReader,
               memo: dict[tuple[int, int], bytes] | None = None) -> bytes:
    """Hash of leaves [lo, hi) where lo is aligned as in RFC 6962's recursion.

    The range is split at the largest power of two below its length; each
    complete, aligned subtree is read with `node`. `memo`, if given, keeps the
    hashes of incomplete ranges (the tree's right edge) across calls for one
    tree size.
    """
    n = hi - lo
    if n <= 0:
        raise ProofError(f"empty range [{lo}, {hi})")
    if n & (n - 1) == 0 and lo % n == 0:
        level = n.bit_length() - 1
        return node(level, lo >> level)
    if memo is not None and (lo, hi) in memo:
        return memo[(lo, hi)]
    k = _split(n)
    h = node_hash(range_hash(lo, lo + k, node, memo), range_hash(lo + k, hi, node, memo))
    if memo is not None:
        memo[(lo, hi)] = h
    return h


def tree_root(size: int, node: NodeReader) -> bytes:
    """Root of the tree of the first `size` leaves."""
    if size < 0:
        raise ProofError("negative tree size")
    return EMPTY_ROOT if size == 0 else range_hash(0, size, node)


def prove_inclusion(index: int, size: int, node: NodeReader,
                    memo: dict[tuple[int, int], bytes] | None = None) -> list[bytes]:
    """RFC 9162 PATH(index, D[0:size]), leaf-side first; `memo` as in range_hash."""
    if not 0 <= index < size:
        raise ProofError(f"index {index} out of range for tree size {size}")
    proof: list[bytes] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            proof.append(range_hash(lo + k, hi, node, memo))
            hi = lo + k
        else:
            proof.append(range_hash(lo, lo + k, node, memo))
            lo = lo + k
    proof.reverse()
    return proof


def prove_inclusions(indices: Iterable[int], size: int, node: NodeReader,
                     memo: dict[tuple[int, int], bytes] | None = None
                     ) -> dict[int, tuple[bytes, ...]]:
    """`prove_inclusion` for many leaves of one tree at once: {index: PATH}.

    One walk down RFC 9162's recursion, split by the leaves wanted: a subtree
    that is a sibling on many paths (the top of a run of consecutive leaves)
    is hashed and read once, not once per leaf. Each path equals
    `prove_inclusion(index, size, node)`.
    """
    wanted = sorted(set(indices))
    if wanted and not (wanted[0] >= 0 and wanted[-1] < size):
        bad = wanted[0] if wanted[0] < 0 else wanted[-1]
        raise ProofError(f"index {bad} out of range for tree size {size}")
    out: dict[int, tuple[bytes, ...]] = {}
    stack: list[tuple[int, int, list[int], tuple[bytes, ...]]] = []
    if wanted:
        stack.append((0, size, wanted, ()))
    while stack:
        lo, hi, group, root_side = stack.pop()  # root_side: the path so far, root first
        if hi - lo == 1:
            out[lo] = root_side[::-1]
            continue
        mid = lo + _split(hi - lo)
        cut = bisect.bisect_left(group, mid)
        if cut:
            stack.append((lo, mid, group[:cut], root_side + (range_hash(mid, hi, node, memo),)))
        if cut < len(group):
            stack.append((mid, hi, group[cut:], root_side + (range_hash(lo, mid, node, memo),)))
    return out


def prove_batch(indices: Iterable[int], size: int, node: NodeReader,
                memo: dict[tuple[int, int], bytes] | None = None) -> list[bytes]:
    """One inclusion proof for many leaves of one tree: the hashes of the subtrees that
    hold none of the leaves but are siblings of subtrees that hold some.

    Their order is that of a depth-first walk down RFC 9162's recursion, left
    before right, entered only where a wanted leaf is; `root_from_batch` walks the
    same way. A run of k neighbouring leaves needs about 2 log2(size) hashes, not
    k times log2(size). `memo` as in range_hash.
    """
    wanted = sorted(set(indices))
    if wanted and not (wanted[0] >= 0 and wanted[-1] < size):
        bad = wanted[0] if wanted[0] < 0 else wanted[-1]
        raise ProofError(f"index {bad} out of range for tree size {size}")
    out: list[bytes] = []

    def walk(lo: int, hi: int, group: list[int]) -> None:
        if hi - lo == 1:
            return
        mid = lo + _split(hi - lo)
        cut = bisect.bisect_left(group, mid)
        for a, b, part in ((lo, mid, group[:cut]), (mid, hi, group[cut:])):
            if part:
                walk(a, b, part)
            else:
                out.append(range_hash(a, b, node, memo))

    if wanted:
        walk(0, size, wanted)
    return out


def prove_consistency(old_size: int, new_size: int, node: NodeReader) -> list[bytes]:
    """RFC 9162 PROOF(old_size, D[0:new_size]); empty when the sizes are equal."""
    if not 0 < old_size <= new_size:
        raise ProofError(f"no consistency proof from size {old_size} to {new_size}")
    proof: list[bytes] = []
    m, lo, hi, complete = old_size, 0, new_size, True
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:
            proof.append(range_hash(lo + k, hi, node))
            hi = lo + k
        else:
            proof.append(range_hash(lo, lo + k, node))
            m -= k
            lo = lo + k
            complete = False
    if not complete:
        proof.append(range_hash(lo, hi, node))
    proof.reverse()
    return proof


# -- verification ------------------------------------------------------------


def _check_hashes(proof: Sequence[bytes]) -> None:
    for h in proof:
        if len(h) != HASH_SIZE:
            raise ProofError("proof hash is not 32 bytes")


def root_from_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes:
    """The root implied by an inclusion proof (RFC 9162 section 2.1.3.2)."""
    if not 0 <= index < size:
        raise ProofError(f"index {index} out of range for tree size {size}")
    if len(leaf) != HASH_SIZE:
        raise ProofError("leaf hash is not 32 bytes")
    _check_hashes(proof)
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError("inclusion proof too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof too short")
    return r


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Raise ProofError unless `proof` shows leaf `index` of tree `size` has `root`."""
    if root_from_inclusion(leaf_hash, index, size, proof) != root:
        raise ProofError("inclusion proof does not lead to the root")


def root_from_batch(leaves: Mapping[int, bytes], size: int, proof: Sequence[bytes]
                    ) -> tuple[bytes, dict[int, list[bytes]]]:
    """The root implied by a `prove_batch` proof for `leaves` ({index: leaf hash}), and
    each leaf's own inclusion path (leaf side first, as `prove_inclusion` gives it).

    ProofError if an index is out of range, a hash is not 32 bytes, or the proof
    has too few or too many hashes. The caller compares the root.
    """
    wanted = sorted(leaves)
    if not wanted:
        raise ProofError("a batch proof of no leaves")
    if wanted[0] < 0 or wanted[-1] >= size:
        bad = wanted[0] if wanted[0] < 0 else wanted[-1]
        raise ProofError(f"index {bad} out of range for tree size {size}")
    _check_hashes([*leaves.values(), *proof])
    paths: dict[int, list[bytes]] = {i: [] for i in wanted}
    given = iter(proof)

    def walk(lo: int, hi: int, group: list[int]) -> bytes:
        if hi - lo == 1:
            return leaves[lo]
        mid = lo + _split(hi - lo)
        cut = bisect.bisect_left(group, mid)
        left, right = group[:cut], group[cut:]
        lh = walk(lo, mid, left) if left else next(given, None)
        rh = walk(mid, hi, right) if right else next(given, None)
        if lh is None or rh is None:
            raise ProofError("batch proof too short")
        for i in left:
            paths[i].append(rh)
        for i in right:
            paths[i].append(lh)
        return node_hash(lh, rh)

    root = walk(0, size, wanted)
    if next(given, None) is not None:
        raise ProofError("batch proof too long")
    return root, paths


def verify_consistency(
    old_size: int, new_size: int, proof: Sequence[bytes], old_root: bytes, new_root: bytes
) -> None:
    """Raise ProofError unless tree `old_size` is a prefix of tree `new_size`.

    `old_size == 0` is refused (there is nothing to prove); equal sizes need an
    empty proof and equal roots.
    """
    if old_size <= 0:
        raise ProofError("consistency from an empty tree is not provable")
    if old_size > new_size:
        raise ProofError(f"old size {old_size} exceeds new size {new_size}")
    if old_size == new_size:
        if proof:
            raise ProofError("proof between equal sizes must be empty")
        if old_root != new_root:
            raise ProofError("equal sizes with different roots")
        return
    if not proof:
        raise ProofError("empty consistency proof")
    _check_hashes(proof)
    if len(old_root) != HASH_SIZE or len(new_root) != HASH_SIZE:
        raise ProofError("root is not 32 bytes")
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("consistency proof too short")
    if fr != old_root:
        raise ProofError("consistency proof does not lead to the old root")
    if sr != new_root:
        raise ProofError("consistency proof does not lead to the new root")


# -- streaming ---------------------------------------------------------------


class Builder:
    """Incremental root over appended leaf hashes in O(log n) memory.

    Invariant: `_stack` holds the roots of the complete subtrees that make up
    the tree so far, largest first, one per set bit of `size`.
    """

    __slots__ = ("_stack", "size")

    def __init__(self) -> None:
        self._stack: list[bytes] = []
        self.size = 0

    def append(self, leaf: bytes) -> None:
        """Add the next leaf hash."""
        h = leaf
        n = self.size
        stack = self._stack
        while n & 1:
            h = hashlib.sha256(b"\x01" + stack.pop() + h).digest()
            n >>= 1
        stack.append(h)
        self.size += 1

    def append_subtree(self, h: bytes, level: int) -> None:
        """Add the root of the next complete subtree of 2**level leaves.

        The tree size must be a multiple of 2**level (the subtree is aligned).
        """
        if self.size & ((1 << level) - 1):
            raise ProofError(f"size {self.size} is not aligned to a subtree of level {level}")
        n = self.size >> level
        stack = self._stack
        while n & 1:
            h = hashlib.sha256(b"\x01" + stack.pop() + h).digest()
            n >>= 1
        stack.append(h)
        self.size += 1 << level

    def root(self) -> bytes:
        """Root of all leaves appended so far."""
        if not self._stack:
            return EMPTY_ROOT
        h = self._stack[-1]
        for left in reversed(self._stack[:-1]):
            h = node_hash(left, h)
        return h
