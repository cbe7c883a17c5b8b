"""Decoder attention caches kept in fairseq's ``incremental_state`` dict.

Self-attention: K and V of every decoded slot live interleaved in one
preallocated buffer ``kv [slots, rows, 2 * C]`` (time-major, so one step's
projection is one contiguous write). A beam-search reorder never moves K/V:
each logical row keeps a table ``rows[row, slot]`` of the physical row that
holds its slot (parent pointers), and a reorder gathers that small int table
into a second preallocated table and swaps the two. The buffers grow by
doubling when the length or the row count outgrows them.

Cross-attention: K/V of the encoder output are computed once per sentence
(``q_per_kv = beam`` query rows share them, as fairseq's beamable attention
does after ``set_beam_size``); a reorder inside the beams of each sentence is a
no-op and a batch shrink only rewrites the sentence map.
"""

from __future__ import annotations

import torch
from torch import Tensor


class SelfAttnCache:
    """K/V of the decoded prefix for ``n`` logical rows, written in place."""

    def __init__(self, rows: int, slots: int, channels: int, like: Tensor):
        self.channels = channels
        self.kv = like.new_empty((slots, rows, 2 * channels))  # [L, R, 2C]
        self.rows = torch.empty((rows, slots), dtype=torch.long, device=like.device)  # [R, L]
        self.rows_alt = torch.empty_like(self.rows)
        self.pad = torch.zeros((slots, rows), dtype=torch.bool, device=like.device)  # [L, R]
        self.arange = torch.arange(rows, device=like.device)
        self.length = 0  # slots written
        self.n = rows  # logical rows

    @property
    def capacity(self) -> tuple[int, int]:
        return self.kv.size(1), self.kv.size(0)

    def _grow(self, rows: int, slots: int) -> None:
        r_old, l_old = self.capacity
        r_new = max(rows, r_old)
        l_new = max(slots, 2 * l_old) if slots > l_old else l_old
        kv = self.kv.new_empty((l_new, r_new, 2 * self.channels))
        kv[: self.length, :r_old].copy_(self.kv[: self.length])
        table = torch.empty((r_new, l_new), dtype=torch.long, device=kv.device)
        table[: self.n, : self.length].copy_(self.rows[: self.n, : self.length])
        pad = torch.zeros((l_new, r_new), dtype=torch.bool, device=kv.device)
        pad[: self.length, :r_old].copy_(self.pad[: self.length])
        self.kv, self.rows, self.pad = kv, table, pad
        self.rows_alt = torch.empty_like(table)
        self.arange = torch.arange(r_new, device=kv.device)

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

    def reorder(self, new_order: Tensor) -> None:
        n_new = new_order.numel()
        if self.length == 0:
            self.n = n_new
            return
        torch.index_select(self.rows[: self.n], 0, new_order, out=self.rows_alt[:n_new])
        self.rows, self.rows_alt = self.rows_alt, self.rows
        self.n = n_new


class CrossAttnCache:
    """Encoder K/V per sentence, shared by ``q_per_kv`` query rows."""

    def __init__(self, kv: Tensor, pad: Tensor | None, q_per_kv: int, beam: int):
        self.kv = kv  # [S, sentences, 2C]
        self.pad = pad  # [sentences, S] or None
        self.q_per_kv = q_per_kv
        self.beam = beam
        sent = kv.size(1)
        self.map = torch.arange(sent, device=kv.device)
        self.map_alt = torch.empty_like(self.map)
        self.n = sent

    def views(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        c = self.kv.size(2) // 2
        return self.kv[..., :c], self.kv[..., c:], self.map[: self.n], self.pad

    def reorder(self, new_order: Tensor) -> None:
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
