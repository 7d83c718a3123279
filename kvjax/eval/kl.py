"""KL divergence and top-1 agreement of next-token distributions against a reference cache.

Same protocol as `ppl`: the first `prefix` tokens are written into each cache unscored, the rest
are fed in chunks of `chunk` tokens (1 = decode steps that read the compressed cache), and every
scored token's next-token distribution is compared with the reference's (the bf16 cache) over the
same ids. The reference and all candidates advance in lockstep, one chunk at a time, so nothing
larger than one chunk of logits per runner is ever held; the reference is run once however many
candidates there are. Each candidate's perplexity comes out of the same pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.eval.ppl import scored_logits
from kvjax.runner import Runner


@dataclass(frozen=True)
class KlResult:
    tokens_scored: int
    kl: float  # mean KL(p_ref || p) over scored tokens, nats
    top1: float  # fraction of scored tokens whose argmax matches the reference's
    nll: float  # the candidate's mean negative log-likelihood (nats per token)
    ref_nll: float  # the reference's

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    @property
    def ref_ppl(self) -> float:
        return math.exp(self.ref_nll)


@jax.jit
def token_stats(ref_logits: jax.Array, logits: jax.Array, targets: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per token: KL(p_ref || p), argmax agreement, and both negative log-likelihoods.
    ref_logits, logits: [n, vocab]; targets: [n]."""
    ref_logp = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)
    agree = jnp.argmax(ref_logits, axis=-1) == jnp.argmax(logits, axis=-1)
    pick = targets[:, None]
    ref_nll = -jnp.take_along_axis(ref_logp, pick, axis=-1)[:, 0]
    nll = -jnp.take_along_axis(logp, pick, axis=-1)[:, 0]
    return kl, agree, nll, ref_nll


def compare(reference: Runner, candidates: dict[str, Runner], ids: list[int], prefix: int = 0,
            chunk: int = 256) -> dict[str, KlResult]:
    """KL and top-1 agreement of each candidate against the reference over the same ids."""
    names = list(candidates)
    streams = [scored_logits(reference, ids, prefix, chunk)]
    streams += [scored_logits(candidates[n], ids, prefix, chunk) for n in names]
    acc: dict[str, list[list[np.ndarray]]] = {n: [[], [], [], []] for n in names}
    for (ref_logits, targets), *outs in zip(*streams, strict=True):
        t = jnp.asarray(targets)
        for name, (logits, _) in zip(names, outs, strict=True):
            for store, value in zip(acc[name], token_stats(ref_logits, logits, t), strict=True):
                store.append(np.asarray(value))
    results = {}
    for name in names:
        kl, agree, nll, ref_nll = (np.concatenate(parts) for parts in acc[name])
        # KL is >= 0; float rounding can leave -1e-9 on identical distributions.
        results[name] = KlResult(tokens_scored=len(kl), kl=float(np.maximum(kl, 0.0).mean()),
                                 top1=float(agree.mean()), nll=float(nll.mean()),
                                 ref_nll=float(ref_nll.mean()))
    return results


def kl_divergence(reference: Runner, candidate: Runner, ids: list[int], prefix: int = 0,
                  chunk: int = 256) -> KlResult:
    return compare(reference, {"candidate": candidate}, ids, prefix, chunk)["candidate"]
