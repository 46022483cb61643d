"""Padding-free batches: the sequences of a micro-batch packed into a few rows, each sequence keeping its own
positions (0, 1, 2, ... from its first token) and attending only to its own earlier tokens.

How attention stays within a sequence: the rows are passed with `position_ids` that restart at every sequence and
no `attention_mask`; transformers then reads the sequence boundaries from the position resets and builds the
block-diagonal causal mask itself (masking_utils.find_packed_sequence_indices; sdpa and eager on CPU and GPU, and
the varlen kernels of flash attention). Padding at the end of a row gets position 0 at every token, so each pad is
a sequence of its own that nothing else sees. tests/test_perf_paths.py checks that a packed batch gives each
sequence's log-probs of the padded batch.

Only the layout changes: the same sequences, the same targets and the same loss weights, so a packed step is the
same update as an unpacked one (up to float rounding).
"""

from __future__ import annotations

import bisect

import torch


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each bin's total length <= capacity: items from longest to shortest, each into the
    fullest bin it still fits in (a new bin when none). Items longer than capacity raise."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit in a packed row of {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), sorted
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))  # the tightest bin with free space >= n
        if k == len(free):
            bins.append([i])
            room, b = capacity - n, len(bins) - 1
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            room -= n
        bisect.insort(free, (room, b))
    return bins


def pack_rows(sequences: list[list[int]], weights: list[list[float]], capacity: int, pad_id: int,
              device=None) -> dict:
    """Pack token sequences with per-token loss weights (weight of token j = weight of predicting it from token
    j-1; the first token of a sequence is never a target) into rows of at most `capacity` tokens.

    Returns input_ids and position_ids (R, L), `last` (N, 2) = (row, column) of each sequence's last token, and for
    the trained tokens (weight != 0), in the order of the input sequences: `pred` (K, 2) = (row, column) of the
    position whose output predicts the token, `targets` (K,), `weights` (K,), `seq` (K,) = the index of the sequence
    each belongs to."""
    assert len(sequences) == len(weights)
    bins = best_fit_decreasing([len(s) for s in sequences], capacity)
    L = max(sum(len(sequences[i]) for i in b) for b in bins)
    ids = torch.full((len(bins), L), pad_id, dtype=torch.long)
    pos = torch.zeros((len(bins), L), dtype=torch.long)
    where = [None] * len(sequences)  # (row, start column) of each sequence
    for r, b in enumerate(bins):
        col = 0
        for i in sorted(b):
            n = len(sequences[i])
            ids[r, col:col + n] = torch.tensor(sequences[i], dtype=torch.long)
            pos[r, col:col + n] = torch.arange(n)
            where[i] = (r, col)
            col += n
    pred, targets, w, seq = [], [], [], []
    for i, (s, ws) in enumerate(zip(sequences, weights)):
        assert len(ws) == len(s)
        r, c = where[i]
        for j in range(1, len(s)):
            if ws[j]:
                pred.append((r, c + j - 1))
                targets.append(s[j])
                w.append(float(ws[j]))
                seq.append(i)
    last = [(r, c + len(s) - 1) for (r, c), s in zip(where, sequences)]
    out = {"input_ids": ids, "position_ids": pos, "last": torch.tensor(last, dtype=torch.long).view(-1, 2),
           "pred": torch.tensor(pred, dtype=torch.long).view(-1, 2), "targets": torch.tensor(targets, dtype=torch.long),
           "weights": torch.tensor(w, dtype=torch.float32), "seq": torch.tensor(seq, dtype=torch.long)}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def packed_token_logps(model, batch: dict, temperature: float = 1.0, return_argmax: bool = False,
                       return_entropy: bool = False):
    """Log-probs (K,) of the packed batch's trained tokens (pack_rows' order), with the model's head applied only at
    their K predicting positions (common/model.py's chunked head; a model that post-processes its logits gets them
    from its forward at every position). Optionally also entropy and argmax (K,), no gradient."""
    from common import model as model_utils

    ids, pos, pred = batch["input_ids"], batch["position_ids"], batch["pred"]
    want = return_argmax or return_entropy
    head = model_utils.chunked_head(model)
    if head is not None:
        h = model_utils.hidden_before_head(model, head, ids.shape[1], input_ids=ids, position_ids=pos)
        stats = ("entropy",) * return_entropy + ("argmax",) * return_argmax
        out = model_utils.head_logps(h[pred[:, 0], pred[:, 1]], head, batch["targets"], temperature, stats)
        logps, named = out if stats else (out, {})
        entropy, argmax = named.get("entropy"), named.get("argmax")
    else:
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits[pred[:, 0], pred[:, 1]]  # (K, V)
        logits = logits / temperature if temperature != 1.0 else logits
        logps = model_utils.selective_log_softmax(logits, batch["targets"])
        named = model_utils.logits_stats(logits) if want else {}
        entropy, argmax = named.get("entropy"), named.get("argmax")
    if not want:
        return logps
    return (logps,) + ((entropy,) if return_entropy else ()) + ((argmax,) if return_argmax else ())


def packed_sequence_scores(model, sequences: list[list[int]], pad_id: int, device, score_head=None) -> torch.Tensor:
    """Scalar scores (N,) of a one-output `*ForSequenceClassification` model, read at each sequence's last token,
    with the sequences packed into rows as long as the longest one (the padded batch's scores; see
    common/model.sequence_classifier_scores). The model runs through its own forward (DDP / DeepSpeed wrappers see a
    normal forward); pass the unwrapped model's head as `score_head` when `model` is wrapped."""
    b = pack_rows(sequences, [[0] * len(s) for s in sequences], max(len(s) for s in sequences), pad_id, device)
    hidden = model(input_ids=b["input_ids"], position_ids=b["position_ids"], output_hidden_states=True,
                   use_cache=False).hidden_states[-1]  # (R, L, H), after the final norm
    head = score_head if score_head is not None else model.score
    return head(hidden[b["last"][:, 0], b["last"][:, 1]])[:, 0].float()
