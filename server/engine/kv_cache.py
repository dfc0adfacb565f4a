"""KVCache: one preallocated key/value buffer per layer, one row per running sequence.

Layout: ``keys[layer]: [max_rows, kv_heads, max_len, head_dim]``; row r holds its sequence's token at
absolute position p in column p, so RoPE positions equal the unpadded ones PEFT would see. Running rows are
kept dense (0..n-1): when a row finishes, the last row moves into its place. Memory is fixed at start-up, so
admission (a free row, prompt + max_tokens <= max_len) is the whole out-of-memory check. The column
dimension starts small and doubles on demand (a rare copy between steps) up to ``max_len``; ``max_nbytes``,
the ceiling, is checked against free memory at start-up.

It plugs into an unmodified Hugging Face model as a ``transformers`` Cache: before each forward the runner
``bind``s which rows the forward covers and where each writes; ``update`` writes in place and returns views.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _Binding:
    """What the current forward covers: rows [start, stop), write positions, attended length."""

    start = 0
    stop = 0
    kv_len = 0
    decode_pos: torch.Tensor | None = None  # [rows] write column per row (decode); None = prefill from column 0
    row_index: torch.Tensor | None = None  # [rows] arange(start, stop), for the decode scatter


class RowKVLayer(CacheLayerMixin):
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, binding: _Binding):
        super().__init__()
        self.keys, self.values, self.binding = keys, values, binding
        self.is_initialized = True
        self.device = keys.device

    def lazy_initialization(self, key_states, value_states) -> None:  # buffers exist from the start
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states: [rows, kv_heads, q_len, head_dim]; returns [rows, kv_heads, kv_len, head_dim] views."""
        b = self.binding
        if b.decode_pos is None:
            q_len = key_states.shape[2]
            self.keys[b.start:b.stop, :, :q_len] = key_states
            self.values[b.start:b.stop, :, :q_len] = value_states
        else:
            self.keys[b.row_index, :, b.decode_pos] = key_states[:, :, 0]
            self.values[b.row_index, :, b.decode_pos] = value_states[:, :, 0]
        return self.keys[b.start:b.stop, :, :b.kv_len], self.values[b.start:b.stop, :, :b.kv_len]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.binding.kv_len, 0

    def get_seq_length(self) -> int:
        return self.binding.kv_len

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class KVCache(Cache):
    INITIAL_COLUMNS = 256

    def __init__(self, num_layers: int, max_rows: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device):
        self.binding = _Binding()
        shape = (max_rows, kv_heads, min(max_len, self.INITIAL_COLUMNS), head_dim)
        layers = [RowKVLayer(torch.zeros(shape, dtype=dtype, device=device),
                             torch.zeros(shape, dtype=dtype, device=device), self.binding)
                  for _ in range(num_layers)]
        super().__init__(layers=layers)
        self.max_rows, self.max_len, self.device = max_rows, max_len, device

    @classmethod
    def for_model(cls, config, max_rows: int, max_len: int, dtype: torch.dtype, device: torch.device) -> "KVCache":
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.num_hidden_layers, max_rows, kv_heads, head_dim, max_len, dtype, device)

    @property
    def nbytes(self) -> int:
        """Bytes allocated now."""
        return sum(l.keys.numel() * l.keys.element_size() * 2 for l in self.layers)

    @property
    def max_nbytes(self) -> int:
        """Bytes once every row can hold ``max_len`` tokens: the most this cache will ever take."""
        return self.nbytes // self.columns * self.max_len

    @property
    def columns(self) -> int:
        return self.layers[0].keys.shape[2]

    def reserve(self, columns: int) -> None:
        """Make room for positions [0, columns); grows by doubling (copying the live prefix) up to max_len."""
        have = self.columns
        if columns <= have:
            return
        new = min(self.max_len, max(columns, 2 * have))
        for layer in self.layers:
            for name in ("keys", "values"):
                old = getattr(layer, name)
                grown = old.new_zeros(old.shape[0], old.shape[1], new, old.shape[3])
                grown[:, :, :have] = old
                setattr(layer, name, grown)

    def bind_prefill(self, start: int, stop: int, q_len: int) -> None:
        b = self.binding
        b.start, b.stop, b.kv_len, b.decode_pos, b.row_index = start, stop, q_len, None, None

    def bind_decode(self, positions: torch.Tensor) -> None:
        """Rows 0..len(positions)-1 each write one token at its own column ``positions[row]``."""
        b = self.binding
        n = positions.shape[0]
        b.start, b.stop, b.kv_len = 0, n, int(positions.max()) + 1
        b.decode_pos, b.row_index = positions, torch.arange(n, device=positions.device)

    @torch.inference_mode()  # the buffers may be inference tensors (grown inside the runner's forward)
    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row ``src``'s first ``length`` columns into row ``dst`` (compaction after a row finishes)."""
        for layer in self.layers:
            layer.keys[dst, :, :length] = layer.keys[src, :, :length]
            layer.values[dst, :, :length] = layer.values[src, :, :length]
