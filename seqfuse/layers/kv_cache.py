"""Decoder attention caches kept in fairseq's ``incremental_state`` dict.

Self-attention: K and V of every decoded slot live interleaved in one
preallocated buffer ``kv [slots, rows, 2 * C]`` (time-major, so one step's
projection is one contiguous write). A beam-search reorder never moves K/V:
each logical row keeps a table ``rows[row, slot]`` of the physical row that
holds its slot (parent pointers), and a reorder gathers that small int table
into a second preallocated table and swaps the two. The buffers start at
``initial_slots(rows, need)`` slots (``INITIAL_SLOTS``, more for few rows, up
to ``INITIAL_ROW_SLOTS`` row-slots in all) and grow by a quarter (at least
``MIN_GROWTH`` slots) when the length outgrows them. A growth adds a block of
slots (``SelfAttnCache.blocks``): what the cache holds stays where it is, and
only the new slots' memory is mapped (a copy into a whole new buffer at each
growth mapped and copied about four times the final cache over a search).
seqfuse's one-call decoder step (``seqfuse/layers/fused_step.py``) reads the
blocks as they are; other readers get them merged into one buffer first
(``SelfAttnCache.kv``). ``SEQFUSE_KV_BLOCKS=0`` grows by copying into one new
buffer instead. A growth in rows, and a batch shrink to half the physical rows
or less that frees at least ``REPACK_MIN_BYTES``, repack the K/V of the live
rows only into one buffer (``SelfAttnCache.repack``), so memory follows the
rows still decoding, as stock's per-step reorder does.

The K/V buffers can come from a pool (``BUFFERS``, opt-in:
``SEQFUSE_CACHE_POOL=N`` keeps up to N free buffers per dtype and device) and
go back to it when their cache is dropped, repacked or merged: the next
growth, and the next generation's caches, then write into memory already
mapped instead of into fresh pages that the kernel maps and zeroes on first
touch inside the decoder step (5-10% of a batch-64 search here). The pool
holds no more than it must for that: free and taken buffers together stay
within the most the caches have held at once (a buffer that fits no free one
frees the oldest free ones first). It is off by default because what it keeps
between generations is memory held: counted with the generation's, the
Multi30k search at batch 128 then peaks at 0.8x stock's instead of about 0.5x.
``release_buffers()`` empties it.

Cross-attention: K/V of the encoder output are computed once per sentence
(``q_per_kv = beam`` query rows share them) when the rows of one sentence are
known to be copies: fairseq's beamable attention after ``set_beam_size``, or
seqfuse's generator saying so in the incremental state (``ROWS_PER_SOURCE``).
A reorder inside the beams of each sentence is a no-op, a batch shrink
rewrites the sentence map, and one to half the cached sentences or less drops
the finished sentences' K/V (when that frees ``REPACK_MIN_BYTES``).
"""

from __future__ import annotations

import os
import threading

import torch
from torch import Tensor

from seqfuse import _ext

# incremental_state[ROWS_PER_SOURCE] = k: the decoder's rows come in
# consecutive groups of k rows of one source (beam search's rows of a
# sentence), and reorders keep every row inside its group or drop whole groups;
# the encoder output then has k copies of each source or, for a decoder whose
# takes_encoder_out_per_source() says so, one. seqfuse's generator sets it.
ROWS_PER_SOURCE = "seqfuse.rows_per_source"

# incremental_state[FIRST_STEP_SHARED] = k, set with ROWS_PER_SOURCE = k for
# the first decoder call only: the k rows of each source would be identical
# there (beam search's first step), so the call gets one row per source; the
# caches it creates hold that row once, and the first reorder (addressing k
# rows per source) maps each row to its source's row.
FIRST_STEP_SHARED = "seqfuse.first_step_shared"

INITIAL_SLOTS = 8  # self-attention slots allocated at the first step, at least
# A first allocation may hold this many row-slots (rows x slots), up to
# MAX_INITIAL_SLOTS slots: few rows (small batches) start with room for a
# typical sentence instead of growing (a repack each time) on the way.
INITIAL_ROW_SLOTS = 512
MAX_INITIAL_SLOTS = 32
MIN_GROWTH = 4  # a growth adds a quarter of the slots, at least this many
# A batch shrink repacks a cache (self-attention: to half its physical rows or
# less; cross-attention: to half its sentences or less) only when that frees
# at least this many bytes of it. A smaller cache keeps its finished rows'
# K/V until the search drops it: the copy, and the search lane's hand-over to
# Python for it, cost more than the memory is worth (batch 16 on the Multi30k
# model: such a repack would free 1.6 MB of a cache at the median, and the
# lane stopped for 157 of them over the test set, about 3% of the search).
# The large caches, whose memory the repacks exist for (batch 128: 10-30 MB a
# layer), repack as before: the batch-128 generation peak is unchanged.
REPACK_MIN_BYTES = 4 << 20


def repack_frees_enough(rows: int, row_bytes: int) -> bool:
    """Whether a repack that drops ``rows`` rows of ``row_bytes`` bytes
    each frees at least ``REPACK_MIN_BYTES`` (the search lane's check is the
    same, csrc/cpu/search_lane_cpu.cc)."""
    return rows * row_bytes >= REPACK_MIN_BYTES


def initial_slots(rows: int, need: int) -> int:
    """Self-attention slot capacity of a first allocation for ``rows`` rows
    and ``need`` slots."""
    room = min(MAX_INITIAL_SLOTS, INITIAL_ROW_SLOTS // max(rows, 1))
    return max(need, INITIAL_SLOTS, room)


def next_slots(need: int, have: int) -> int:
    """Self-attention slot capacity after a growth from ``have`` for ``need``."""
    return max(need, have + max(MIN_GROWTH, have // 4))


# A growth adds a block of slots (SEQFUSE_KV_BLOCKS=0: copies into one buffer).
KV_BLOCKS_ENV = "SEQFUSE_KV_BLOCKS"

# free K/V buffers kept per dtype and device at most (SEQFUSE_CACHE_POOL; 0: none)
POOL_BUFFERS = int(os.environ.get("SEQFUSE_CACHE_POOL", "0") or 0)


class BufferPool:
    """Flat buffers handed back by caches, for the next ones.

    ``take`` returns the smallest free buffer that holds ``numel`` elements
    and is at most twice that (a new one when none is), ``give`` takes one
    back. Only a cache's own buffer is given back, when the cache no longer
    reads it (``SelfAttnCache.__del__``, ``repack``, a merge): a buffer is
    never handed out twice.

    Bounded: the bytes taken and not given back plus the free bytes never
    exceed the most ever taken at once (``high_water``); a new buffer first
    frees the oldest free ones as far as needed, and a buffer given back is
    dropped rather than kept past that bound (or past ``keep`` buffers).
    """

    def __init__(self, keep: int):
        self.keep = keep
        self._free: dict[tuple, list[Tensor]] = {}
        self._lock = threading.Lock()
        self.taken_bytes = 0  # handed out and not given back
        self.high_water = 0  # the most handed out at once

    @staticmethod
    def _bytes(buf: Tensor) -> int:
        return buf.numel() * buf.element_size()

    def _free_total(self) -> int:
        return sum(self._bytes(b) for bs in self._free.values() for b in bs)

    def _evict_oldest(self) -> bool:
        """Drops the oldest free buffer of the longest list; False: none."""
        oldest = None
        for bs in self._free.values():
            if bs and (oldest is None or len(bs) > len(oldest)):
                oldest = bs
        if oldest is None:
            return False
        oldest.pop(0)
        return True

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        with self._lock:
            free = self._free.get((dtype, device))
            if free:
                fits = [i for i, b in enumerate(free) if numel <= b.numel() <= 2 * numel]
                if fits:
                    buf = free.pop(min(fits, key=lambda i: free[i].numel()))
                    self.taken_bytes += self._bytes(buf)
                    self.high_water = max(self.high_water, self.taken_bytes)
                    return buf
            need = numel * torch.empty((), dtype=dtype).element_size()
            bound = max(self.high_water, self.taken_bytes + need)
            while self.taken_bytes + self._free_total() + need > bound and self._evict_oldest():
                pass
        buf = torch.empty(numel, dtype=dtype, device=device)
        with self._lock:
            self.taken_bytes += self._bytes(buf)
            self.high_water = max(self.high_water, self.taken_bytes)
        return buf

    def give(self, buf: Tensor) -> None:
        with self._lock:
            size = self._bytes(buf)
            self.taken_bytes = max(0, self.taken_bytes - size)
            if self.keep <= 0:
                return
            if self.taken_bytes + self._free_total() + size > self.high_water:
                return  # past the bound: freed
            free = self._free.setdefault((buf.dtype, buf.device), [])
            free.append(buf)
            while len(free) > self.keep:
                free.pop(0)  # the oldest

    def clear(self) -> None:
        with self._lock:
            self._free.clear()

    def free_bytes(self) -> int:
        with self._lock:
            return self._free_total()


BUFFERS = BufferPool(POOL_BUFFERS)


def release_buffers() -> None:
    """Free the K/V buffers the pool keeps for later generations."""
    BUFFERS.clear()


def _kv_buffer(slots: int, rows: int, c2: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """(pool buffer, its [slots, rows, c2] view)."""
    buf = BUFFERS.take(slots * rows * c2, like.dtype, like.device)
    return buf, buf[: slots * rows * c2].view(slots, rows, c2)


class SelfAttnCache:
    """K/V of the decoded prefix for ``n`` logical rows, written in place."""

    def __init__(self, rows: int, slots: int, channels: int, like: Tensor, expand: int = 1):
        self.channels = channels
        # > 1 until the first reorder: that reorder's indices address `expand`
        # rows per row written (FIRST_STEP_SHARED).
        self.expand = expand
        self.grow_by_blocks = _ext.env_flag(KV_BLOCKS_ENV, True)
        # K/V in blocks of slots, [slots_b, rows_b <= rows, 2C] each, in slot
        # order (each block's pool buffer in _bufs)
        buf, kv = _kv_buffer(slots, rows, 2 * channels, like)
        self._bufs, self.blocks = [buf], [kv]
        self.rows = torch.empty((rows, slots), dtype=torch.long, device=like.device)  # [R, L]
        self.rows_alt = torch.empty_like(self.rows)
        self.pad = torch.zeros((slots, rows), dtype=torch.bool, device=like.device)  # [L, R]
        self.arange = torch.arange(rows, device=like.device)
        self.length = 0  # slots written
        self.n = rows // expand  # logical rows (before the first reorder: rows written)

    @property
    def capacity(self) -> tuple[int, int]:
        return self.pad.size(1), self.rows.size(1)

    @property
    def kv(self) -> Tensor:
        """The K/V as one ``[slots, rows, 2C]`` tensor (several blocks are
        merged into one buffer first)."""
        if len(self.blocks) > 1:
            self._merge()
        return self.blocks[0]

    def _merge(self) -> None:
        """The blocks copied into one buffer of the cache's capacity, every
        physical row where it was (the tables stay as they are)."""
        r_cap, l_cap = self.capacity
        buf, kv = _kv_buffer(l_cap, r_cap, 2 * self.channels, self.blocks[0])
        s0 = 0
        for block in self.blocks:
            s1 = min(s0 + block.size(0), self.length)
            if s1 > s0:
                kv[s0:s1, : block.size(1)].copy_(block[: s1 - s0])
            s0 += block.size(0)
        self._swap_blocks(buf, kv)

    def _grow(self, rows: int, slots: int, by_block: bool = False) -> None:
        """Room for ``rows`` rows and ``slots`` slots: a block of new slots
        when ``by_block`` (for a reader of the blocks) and the rows fit, a
        repack into one buffer otherwise."""
        r_old, l_old = self.capacity
        l_new = next_slots(slots, l_old) if slots > l_old else l_old
        if rows > r_old or not (by_block and self.grow_by_blocks):
            self.repack(max(rows, self.n), l_new)
            return
        # a block of the new slots for the live rows (rows r < n write there);
        # the tables (small) are copied to the new length
        like = self.blocks[0]
        buf, kv = _kv_buffer(l_new - l_old, max(rows, self.n), 2 * self.channels, like)
        self._bufs.append(buf)
        self.blocks.append(kv)
        rows_t = torch.empty((r_old, l_new), dtype=torch.long, device=like.device)
        rows_t[:, :l_old].copy_(self.rows)
        pad = torch.zeros((l_new, r_old), dtype=torch.bool, device=like.device)
        pad[:l_old].copy_(self.pad)
        self.rows, self.pad = rows_t, pad
        self.rows_alt = torch.empty_like(rows_t)

    def repack(self, rows: int, slots: int) -> None:
        """New buffers of ``rows x slots`` capacity holding the written slots
        of the ``n`` logical rows only, logical row ``r`` at physical row ``r``
        (the old buffers are freed), in one block. The values read for each row
        are unchanged, so attention over the cache is too."""
        n, length, c2 = self.n, self.length, 2 * self.channels
        if rows < n or slots < length:
            raise ValueError(f"seqfuse: repack to {rows}x{slots} < {n} rows x {length} slots")
        r_old = self.capacity[0]
        like = self.blocks[0]
        dev = like.device
        buf, kv = _kv_buffer(slots, rows, c2, like)
        pad = torch.zeros((slots, rows), dtype=torch.bool, device=dev)
        table = torch.empty((rows, slots), dtype=torch.long, device=dev)
        arange = torch.arange(rows, device=dev)
        if length > 0:
            # per block: flat index of (slot s, physical row rows[r, s]) in its [L_b, R] buffer
            s0 = 0
            for block in self.blocks:
                m = min(block.size(0), length - s0)
                if m <= 0:
                    break
                r_b = block.size(1)
                base = torch.arange(m, device=dev).view(m, 1) * r_b
                flat = (self.rows[:n, s0 : s0 + m].t() + base).reshape(-1)  # [m * n], slot-major
                src_kv = block[:m].reshape(m * r_b, c2)
                if rows == n:  # straight into the new buffer
                    torch.index_select(src_kv, 0, flat, out=kv[s0 : s0 + m].view(m * n, c2))
                else:
                    kv[s0 : s0 + m, :n].copy_(src_kv.index_select(0, flat).view(m, n, c2))
                s0 += m
            base = torch.arange(length, device=dev).view(length, 1) * r_old
            flat = (self.rows[:n, :length].t() + base).reshape(-1)
            pad[:length, :n].copy_(self.pad[:length].reshape(-1)[flat].view(length, n))
            table[:n, :length].copy_(arange[:n].view(n, 1).expand(n, length))
        self.pad, self.rows = pad, table
        self.rows_alt = torch.empty_like(table)
        self.arange = arange
        self._swap_blocks(buf, kv)

    def _swap_blocks(self, buf: Tensor, kv: Tensor) -> None:
        """``kv`` (in pool buffer ``buf``) becomes the one block; the old
        blocks' buffers go back to the pool."""
        old = self._bufs
        self._bufs, self.blocks = [buf], [kv]
        for b in old:
            BUFFERS.give(b)

    def __del__(self):
        bufs = getattr(self, "_bufs", None)
        if bufs and BUFFERS is not None:  # (None at interpreter exit)
            self._bufs = []
            for buf in bufs:
                BUFFERS.give(buf)

    def append(self, kv_new: Tensor, pad_new: Tensor | None) -> None:
        """Write ``kv_new [T, n, 2C]`` (and ``pad_new [n, T]`` key padding) as the next slots."""
        t, n = kv_new.size(0), kv_new.size(1)
        if self.length == 0:
            self.n = n
        if n != self.n:
            raise RuntimeError(
                f"seqfuse: {n} rows decoded, the cache holds {self.n} (reorder missing?)"
            )
        r_cap, l_cap = self.capacity
        if n > r_cap or self.length + t > l_cap:
            self._grow(n, self.length + t)
        s0, s1 = self.length, self.length + t
        self.kv[s0:s1, :n].copy_(kv_new)
        self.rows[:n, s0:s1].copy_(self.arange[:n].view(n, 1).expand(n, t))
        if pad_new is not None:
            self.pad[s0:s1, :n].copy_(pad_new.t())
        else:
            self.pad[s0:s1, :n].zero_()
        self.length = s1

    def views(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(k, v, kv_rows, key_pad) for the attention op over the written slots."""
        s, c = self.length, self.channels
        kv = self.kv[:s]
        return kv[..., :c], kv[..., c:], self.rows[: self.n], self.pad[:s].t()

    @staticmethod
    def reorder_all(caches: list[SelfAttnCache], new_order: Tensor) -> None:
        """``cache.reorder(new_order)`` for each cache; every layer's caches
        reorder alike, so their parent tables are gathered by one CPU op call
        when they are in step (written, same rows)."""
        n = caches[0].n if caches else 0
        if (
            len(caches) < 2
            or _ext._C is None
            or new_order.device.type != "cpu"
            or new_order.dtype != torch.long
            or not new_order.is_contiguous()
            or any(c.expand != 1 or c.length == 0 or c.n != n for c in caches)
            or any(
                c.rows.device.type != "cpu" or c.rows_alt.size(0) < new_order.numel()
                for c in caches
            )
        ):
            for cache in caches:
                cache.reorder(new_order)
            return
        n_new = new_order.numel()
        torch.ops.seqfuse.gather_table_rows(
            [c.rows for c in caches], [c.rows_alt for c in caches], n, new_order
        )
        for cache in caches:
            cache._gathered(n_new)

    def reorder(self, new_order: Tensor) -> None:
        n_new = new_order.numel()
        if self.expand > 1:
            new_order = torch.div(new_order, self.expand, rounding_mode="floor")
            self.expand = 1
        if self.length == 0:
            self.n = n_new
            return
        torch.index_select(self.rows[: self.n], 0, new_order, out=self.rows_alt[:n_new])
        self._gathered(n_new)

    def _gathered(self, n_new: int) -> None:
        """The reordered parent table is in ``rows_alt[:n_new]``: swap it in,
        and repack when the rows shrank to half the capacity or less."""
        self.rows, self.rows_alt = self.rows_alt, self.rows
        self.n = n_new
        if self.repacks_at(n_new):  # finished rows' K/V: free them
            self.repack(n_new, self.capacity[1])

    def repacks_at(self, n_new: int) -> bool:
        """Whether a reorder to ``n_new`` rows repacks the cache (the rows
        shrank to half its physical rows or less, freeing enough)."""
        r_cap, l_cap = self.capacity
        block = self.blocks[0]
        return 0 < n_new <= r_cap // 2 and repack_frees_enough(
            r_cap - n_new, l_cap * block.size(2) * block.element_size()
        )


class CrossAttnCache:
    """Encoder K/V per sentence, shared by ``q_per_kv`` query rows."""

    def __init__(
        self, kv: Tensor, pad: Tensor | None, q_per_kv: int, beam: int, later_q_per_kv: int = 0
    ):
        self.kv = kv  # [S, sentences, 2C]
        self.pad = pad  # [sentences, S] or None
        self.q_per_kv = q_per_kv
        self.beam = beam
        # Query rows per kv row from the first reorder on, when the first step
        # had one row per source (FIRST_STEP_SHARED); 0: unchanged.
        self.later_q_per_kv = later_q_per_kv
        sent = kv.size(1)
        self.map = torch.arange(sent, device=kv.device)
        self.map_alt = torch.empty_like(self.map)
        self.n = sent

    def views(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        c = self.kv.size(2) // 2
        return self.kv[..., :c], self.kv[..., c:], self.map[: self.n], self.pad

    def reorder(self, new_order: Tensor) -> None:
        if self.later_q_per_kv:
            self.q_per_kv, self.later_q_per_kv = self.later_q_per_kv, 0
        # fairseq's rule (MultiheadAttention.reorder_incremental_state): same
        # row count means a reorder inside sentences, which shared K/V ignore.
        if self.n * self.beam == new_order.numel():
            return
        if self.beam > 1:
            sel = new_order.view(-1, self.beam)[:, 0] // self.beam
        else:
            sel = new_order
        k = sel.numel()
        torch.index_select(self.map[: self.n], 0, sel, out=self.map_alt[:k])
        self.map, self.map_alt = self.map_alt, self.map
        self.n = k
        kv = self.kv
        if 0 < k <= kv.size(1) // 2 and repack_frees_enough(  # finished sentences' K/V
            kv.size(1) - k, kv.size(0) * kv.size(2) * kv.element_size()
        ):
            self.repack()

    def repack(self) -> None:
        """Keep the K/V (and padding) of the ``n`` mapped sentences only, in map order."""
        sel = self.map[: self.n]
        self.kv = self.kv.index_select(1, sel)
        self.pad = None if self.pad is None else self.pad.index_select(0, sel)
        self.map = torch.arange(self.n, device=self.kv.device)
        self.map_alt = torch.empty_like(self.map)
