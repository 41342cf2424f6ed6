"""BAGEL's KV cache: per-layer keys/values of a padded batch of contexts, which columns are real,
and each row's next RoPE position; rows can be indexed, repeated (G samples share one prefill)
and stacked (guidance contexts of different lengths in one call)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Union

import torch
import torch.nn.functional as F


@dataclass
class KVCache:
    """Per-layer keys/values [B, Hkv, L, Dh] (after k_norm and RoPE), which columns hold real
    tokens (valid [B, L]) and each row's next RoPE position (next_pos [B])."""

    keys: List[torch.Tensor]
    values: List[torch.Tensor]
    valid: torch.Tensor
    next_pos: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    @classmethod
    def empty(cls, model, batch: int, device=None, dtype=None) -> "KVCache":
        """A cache with no columns for `batch` rows of `model` (BagelModel)."""
        p = model.language_model.lm_head.weight
        device, dtype = device or p.device, dtype or p.dtype
        attn = model.language_model.model.layers[0].self_attn
        shape = (batch, attn.num_kv_heads, 0, attn.head_dim)
        n = len(model.language_model.model.layers)
        return cls(
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
            torch.zeros(batch, 0, dtype=torch.bool, device=device),
            torch.zeros(batch, dtype=torch.long, device=device),
        )

    def index(self, rows: Union[Sequence[int], torch.Tensor]) -> "KVCache":
        """The cache of rows `rows` (any order, repeats allowed; copies)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.valid.device)
        return KVCache(
            [k.index_select(0, idx) for k in self.keys],
            [v.index_select(0, idx) for v in self.values],
            self.valid.index_select(0, idx),
            self.next_pos.index_select(0, idx),
        )

    def expand(self, g: int) -> "KVCache":
        """Each row repeated g times (row i -> rows i*g .. i*g+g-1): G samples share one prefill.
        With one row this is a view (no copy); the prefix is read by every later step."""
        if self.batch_size == 1:

            def ex(t):
                return t.expand(g, *t.shape[1:])

            return KVCache([ex(k) for k in self.keys], [ex(v) for v in self.values], ex(self.valid), ex(self.next_pos))
        return self.index(torch.arange(self.batch_size, device=self.valid.device).repeat_interleave(g))

    def detach(self) -> "KVCache":
        return KVCache([k.detach() for k in self.keys], [v.detach() for v in self.values], self.valid, self.next_pos)

    @staticmethod
    def concat(caches: Sequence["KVCache"]) -> "KVCache":
        """Rows of all caches in order, right-padded (invalid columns) to the longest: e.g. the three
        guidance contexts stacked for one velocity call."""
        L = max(c.length for c in caches)

        def pad(t, n):  # pad dim 2 (keys/values) or dim 1 (valid) to L
            return t if n == L else F.pad(t, (0, 0, 0, L - n) if t.ndim == 4 else (0, L - n))

        n_layers = len(caches[0].keys)
        keys = [torch.cat([pad(c.keys[i], c.length) for c in caches]) for i in range(n_layers)]
        values = [torch.cat([pad(c.values[i], c.length) for c in caches]) for i in range(n_layers)]
        valid = torch.cat([pad(c.valid, c.length) for c in caches])
        return KVCache(keys, values, valid, torch.cat([c.next_pos for c in caches]))
