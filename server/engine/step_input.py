"""StepInput: one scheduled step as the flat tensors a forward takes, built once per step.

Order of the flat batch: sequences computing one token (decodes), longest first in groups of similar length,
then the prefill chunks. Each sequence ``(req, n)`` contributes its tokens ``[c, c + n)``, c =
``req.num_computed_tokens``. Rows to sample are the last token of each sequence that reaches its end this
step (a decode, or the last chunk of a prompt). A request asking for prompt logprobs also needs the logits of
every chunk row whose next token is a prompt token it has no logprob for yet (``prompt_rows``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from server.engine.attention import AttentionMetadata, DecodeBatch, DecodeGroup, PrefillSpan
from server.engine.block_pool import NULL_BLOCK
from server.engine.request import Request
from server.layers.transfer import to_device

# A decode group is padded to its longest sequence; a new group starts when padding would pass this share of
# the real tokens (+ a constant: each group is one more SDPA call per layer, ~0.1 ms on CPU).
DECODE_PAD_SHARE = 0.5
DECODE_PAD_SLACK = 256


@dataclass
class StepInput:
    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    attention: AttentionMetadata
    seqs: list[tuple[Request, int]]  # in flat-batch order
    sample_rows: torch.Tensor  # [S] long: rows of the flat batch whose logits are sampled
    sampled: list[Request]  # the request of each sampled row
    prompt_rows: list[tuple[Request, int, int]]  # (request, first row, rows): logits for its prompt logprobs

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def build(cls, seqs: list[tuple[Request, int]], block_size: int, device: torch.device,
              decode: str = "torch") -> "StepInput":
        """``decode``: the decode attention path (PagedAttention.decode): torch also plans the decodes as
        padded groups, triton copies their block tables and lengths to ``device``."""
        decodes = sorted((s for s in seqs if s[1] == 1), key=lambda s: -s[0].num_computed_tokens)
        prefills = [s for s in seqs if s[1] > 1]
        ordered = decodes + prefills
        ids, positions, slots, sample_rows, sampled, prompt_rows = [], [], [], [], [], []
        row = 0
        for req, n in ordered:
            start = req.num_computed_tokens
            pos = np.arange(start, start + n)
            ids.extend(req.token_slice(start, start + n))
            positions.append(pos)
            slots.append(_slots(req.block_ids, pos, block_size))
            if req.prompt_logprobs is not None:
                first = max(start, len(req.prompt_logprobs) - 1)  # position whose logits predict the next one
                last = min(start + n, len(req.prompt_token_ids) - 1)
                if first < last:
                    prompt_rows.append((req, row + first - start, last - first))
            row += n
            if start + n == req.num_tokens:
                sample_rows.append(row - 1)
                sampled.append(req)
        meta = AttentionMetadata(_tensor(np.concatenate(slots), device),
                                 _decode_batch(decodes, device if decode == "triton" else None),
                                 _decode_groups(decodes, block_size, device) if decode == "torch" else [],
                                 _prefill_spans(prefills, len(decodes), block_size, device))
        return cls(torch.tensor(ids, dtype=torch.long, device=device), _tensor(np.concatenate(positions), device),
                   meta, ordered, torch.tensor(sample_rows, dtype=torch.long, device=device), sampled, prompt_rows)

    @property
    def logit_rows(self) -> torch.Tensor:
        """[S + P] rows to run the head on: the sampled rows, then every prompt-logprob row in order."""
        if not self.prompt_rows:
            return self.sample_rows
        extra = [torch.arange(lo, lo + m) for _, lo, m in self.prompt_rows]
        return torch.cat([self.sample_rows, *(e.to(self.sample_rows.device) for e in extra)])


def _slots(block_ids: list[int], positions: np.ndarray, block_size: int) -> np.ndarray:
    """Cache slot of each position of a sequence holding ``block_ids``."""
    return np.asarray(block_ids, dtype=np.int64)[positions // block_size] * block_size + positions % block_size


def _tensor(a: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)


def _decode_batch(decodes, device=None) -> DecodeBatch | None:
    """The decodes' block tables and lengths; with ``device``, also on it (the Triton kernel's), as int32
    views of one tensor: one host-to-device copy a step, not queued behind the device's work on CUDA."""
    if not decodes:
        return None
    widest = max(len(req.block_ids) for req, _ in decodes)
    tables = np.zeros((len(decodes), widest), dtype=np.int64)
    for i, (req, _) in enumerate(decodes):
        tables[i, :len(req.block_ids)] = req.block_ids
    lengths = np.array([req.num_computed_tokens + 1 for req, _ in decodes], dtype=np.int64)
    batch = DecodeBatch(0, len(decodes), tables, lengths)
    if device is not None:
        flat = to_device(torch.from_numpy(np.concatenate([tables.reshape(-1), lengths]).astype(np.int32)), device)
        batch.device_tables, batch.device_lengths = flat[:tables.size].view(tables.shape), flat[tables.size:]
    return batch


def _decode_groups(decodes, block_size: int, device) -> list[DecodeGroup]:
    """Decodes (longest first) cut into groups that each pad to their first (longest) member."""
    groups, lo = [], 0
    while lo < len(decodes):
        width = decodes[lo][0].num_computed_tokens + 1
        hi, real = lo + 1, width
        while hi < len(decodes):
            length = decodes[hi][0].num_computed_tokens + 1
            if (hi + 1 - lo) * width > (1 + DECODE_PAD_SHARE) * (real + length) + DECODE_PAD_SLACK:
                break
            hi, real = hi + 1, real + length
        groups.append(_decode_group(decodes[lo:hi], lo, width, block_size, device))
        lo = hi
    return groups


def _decode_group(members, lo: int, width: int, block_size: int, device) -> DecodeGroup:
    lengths = np.array([req.num_computed_tokens + 1 for req, _ in members])  # [n]
    cols = np.arange(width)  # [L]
    index = np.zeros((len(members), width), dtype=np.int64)
    for i, (req, _) in enumerate(members):
        index[i, :lengths[i]] = _slots(req.block_ids, cols[:lengths[i]], block_size)
    valid = cols[None, :] < lengths[:, None]  # [n, L]
    index[~valid] = NULL_BLOCK * block_size
    mask = None if valid.all() else torch.from_numpy(valid[:, None, None, :]).to(device)
    return DecodeGroup(lo, lo + len(members), _tensor(index, device), mask)


def _prefill_spans(prefills, lo: int, block_size: int, device) -> list[PrefillSpan]:
    spans = []
    for req, n in prefills:
        ctx = req.num_computed_tokens
        if ctx == 0:
            spans.append(PrefillSpan(lo, lo + n, 0, None, None))
        else:
            keys = np.arange(ctx + n)
            causal = keys[None, :] <= (ctx + np.arange(n))[:, None]  # [q, ctx + q]
            spans.append(PrefillSpan(lo, lo + n, ctx, _tensor(_slots(req.block_ids, keys, block_size), device),
                                     torch.from_numpy(causal).to(device)))
        lo += n
    return spans
