"""How the engine turns a group of scheduled rows into one step's host arrays (split out of
engine.py, no behaviour change): padded tokens/positions, the page table at its width bucket, the
rows' window slots, and the per-row sampling arrays; plus recording returned logprobs."""

from __future__ import annotations

import numpy as np

from kvjax import sampling
from kvjax.engine.pool import BATCH_BUCKETS, DECODE_BUCKETS, Pool, _bucket
from kvjax.engine.request import Request
from kvjax.engine.step import StepBatch
from kvjax.runner import CHUNK_BUCKETS


class BatchMixin:
    """Methods of `Engine` (kvjax/engine/engine.py) that build a step's inputs."""

    def _build(self, pool: Pool, index: int, group: list[tuple[Request, int, int]]
               ) -> tuple[StepBatch, list[bool]]:
        """Host arrays of one padded forward (+ the sampling of the rows that end their tokens);
        the page table is only as wide as the longest row needs (a width bucket)."""
        t = _bucket(max(n for _, _, n in group), CHUNK_BUCKETS)
        b = _bucket(len(group), DECODE_BUCKETS if t == 1 else BATCH_BUCKETS)
        tokens = np.zeros((b, t), np.int32)
        positions = np.tile(np.arange(t, dtype=np.int32), (b, 1))
        lengths = np.zeros((b,), np.int32)
        logits_index = np.zeros((b,), np.int32)
        wants = []
        for row, (req, start, n) in enumerate(group):
            tokens[row, :n] = req.cache_tokens[start:start + n]
            positions[row] += start
            lengths[row] = start + n
            logits_index[row] = n - 1
            wants.append(start + n == len(req.cache_tokens))
        seq_ids = [r.seq_id for r, _, _ in group]
        held = max(len(pool.bm.pages(s)) for s in seq_ids) * pool.page_size
        width = pool.runner.table_width(max(int(lengths.max()), held))
        page_table = np.zeros((b, width), np.int32)
        page_table[: len(group)] = pool.bm.page_table(seq_ids, width)
        fresh = np.zeros((b,), np.int32)  # rows whose ring slot is handed out now
        fresh[: len(group)] = [s not in pool.runner.window_slot for s in seq_ids]
        slots = pool.runner.slots_for(seq_ids + [None] * (b - len(group)))
        step = StepBatch(index, tokens, positions, page_table, lengths, slots, logits_index,
                         fresh=fresh)
        step.page_pos = pool.bm.page_positions(seq_ids + [None] * (b - len(group)), width)
        step.mass = pool.runner.tracks_attention_mass
        if any(wants):
            step.sample, step.flags = self._sampling(group, wants, b)
        return step, wants

    def _sampling(self, group: list[tuple[Request, int, int]], wants: list[bool], b: int):
        """Per-row sampling arrays (kvjax.sampling.pack) for the rows that sample."""
        reqs = [req if w else None for (req, _, _), w in zip(group, wants, strict=True)]
        rows = [None if r is None else r.params for r in reqs]
        steps = [0 if r is None else len(r.output_ids) for r in reqs]
        seeds = [0 if r is None else sampling.row_seed(r.params.seed,
                                                       r.seq_id + (self.ecfg.seed << 32))
                 for r in reqs]
        stops = [() if r is None else (*self.eos_ids, *r.params.stop_token_ids) for r in reqs]
        sb, flags = sampling.pack(rows, b, steps, seeds, stops)
        if flags.penalties:  # token counts of what each row generated, and its prompt's tokens
            v = self.cfg.model.vocab_size
            counts = np.zeros((b, v), np.int32)
            mask = np.zeros((b, v), bool)
            for i, r in enumerate(reqs):
                if r is not None:
                    counts[i] = np.bincount(np.asarray(r.output_ids, np.int64), minlength=v)[:v]
                    mask[i, r.prompt_ids] = True
            sb = sb._replace(output_counts=counts, prompt_mask=mask)
        return sb, flags

    @staticmethod
    def _record_logprobs(req: Request, host: tuple[np.ndarray, ...], row: int) -> None:
        n = req.params.logprobs
        if n is None or len(host) < 2:
            return
        req.output_logprobs.append(float(host[1][row]))
        if n and len(host) == 4:
            req.top_logprobs.append([(int(i), float(lp)) for i, lp in
                                     zip(host[2][row][:n], host[3][row][:n], strict=True)])
        else:
            req.top_logprobs.append([])
