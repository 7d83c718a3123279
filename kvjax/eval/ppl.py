"""Perplexity, teacher forced through the paged-cache path.

The first `prefix` tokens are written into the cache unscored; the rest (up to `max_tokens` in
all) are fed in chunks of `chunk` tokens and each is scored from the logits of the token before
it. With chunk 1 every scored token attends only to what is stored in the cache, exactly as in
decoding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.runner import Runner


@dataclass(frozen=True)
class PplResult:
    tokens_scored: int
    nll: float  # mean negative log-likelihood, nats per token

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


@jax.jit
def _token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits: [tokens, vocab]; targets: [tokens] -> [tokens] negative log-likelihoods."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]


def scored_logits(runner: Runner, ids: list[int], prefix: int = 0, chunk: int = 256,
                  seq_id: int = 0) -> Iterator[tuple[jax.Array, np.ndarray]]:
    """Yields (logits [n, vocab], targets [n]) chunk by chunk: the logits that predict each scored
    token of ids[max(prefix, 1):], as `perplexity` and `kvjax.eval.kl` score them."""
    if len(ids) < prefix + 2:
        raise ValueError(f"need more than prefix + 1 = {prefix + 1} tokens, got {len(ids)}")
    runner.free(seq_id)
    last = runner.prefill(seq_id, ids[:prefix]) if prefix else None
    pos = prefix
    while pos < len(ids):
        piece = ids[pos: pos + chunk]
        logits = runner.step([seq_id], [piece])[0, : len(piece)]
        # Token pos is predicted by the logits of pos - 1 (the previous chunk's last row).
        pred = logits[:-1] if last is None else jnp.concatenate([last[None], logits[:-1]])
        targets = piece[1:] if last is None else piece
        if len(targets):
            yield pred, np.asarray(targets, np.int32)
        last = logits[-1]
        pos += len(piece)
    runner.free(seq_id)


def perplexity(runner: Runner, ids: list[int], prefix: int = 0, chunk: int = 256,
               seq_id: int = 0) -> PplResult:
    """Perplexity of ids[prefix + 1:] given everything before each token."""
    nlls = [np.asarray(_token_nll(pred, jnp.asarray(targets)))
            for pred, targets in scored_logits(runner, ids, prefix, chunk, seq_id)]
    all_nll = np.concatenate(nlls)
    return PplResult(tokens_scored=len(all_nll), nll=float(all_nll.mean()))
