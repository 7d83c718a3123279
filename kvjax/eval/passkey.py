"""Passkey retrieval: a 5-digit key hidden at a random depth of filler text, then asked for.

The standard prompt (Mohtashami & Jaggi's landmark-attention test, as used by LongLoRA and
others): an instruction, filler sentences repeated to the target length, the key sentence at a
random depth, more filler, and "What is the pass key? The pass key is". The model decodes a few
tokens greedily; a trial is right when the first run of digits it writes is the key.

`length` is the whole context: prompt plus the decoded answer tokens, so an 8192 trial fits a
model trained for 8192 positions. Trials are batched through `Runner.step` (several sequences per
forward) and every prompt token is written into the compressed cache, in prefill chunks, before
the answer is decoded from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from kvjax.loaders import Tokenizer
from kvjax.runner import CHUNK_BUCKETS, Runner

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
ANSWER = "The pass key is"
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
MAX_NEW_TOKENS = 8  # " 12345." is 6-7 tokens for SmolLM2's tokenizer (one per digit)


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    key: str
    depth: float  # requested fraction of the filler placed before the key
    needle_pos: int  # index of the first token of the key sentence
    filler_span: tuple[int, int]  # token range [start, end) of the filler, key sentence included


def _filler(start: int, count: int) -> list[str]:
    return [FILLER[i % len(FILLER)] for i in range(start, start + count)]


def _texts(before: int, after: int, key: str, chat: bool, tokenizer: Tokenizer
           ) -> tuple[str, str, str]:
    """(text up to the key sentence, text up to the question, whole prompt)."""
    head = INTRO + "\n" + " ".join(_filler(0, before))
    head = head + " " if before else head
    mid = head + NEEDLE.format(key=key) + " " + " ".join(_filler(before, after))
    body = mid.rstrip() + "\n" + QUESTION
    if chat:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": body}])
        prefix_len = rendered.index(INTRO)
        return (rendered[:prefix_len] + head, rendered[:prefix_len] + mid.rstrip(),
                rendered + ANSWER)
    return head, mid.rstrip(), body + " " + ANSWER


def build_prompt(tokenizer: Tokenizer, length: int, depth: float, key: str,
                 chat: bool = False) -> Prompt:
    """The passkey prompt of at most `length` tokens (and within one filler sentence of it), with
    the key sentence after `depth` of the filler sentences."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")

    def size(n: int) -> int:
        return len(tokenizer.encode(_texts(0, n, key, chat, tokenizer)[2]))

    base = size(0)
    if base > length:
        raise ValueError(f"a passkey prompt needs at least {base} tokens, asked for {length}")
    per_sentence = (size(2 * len(FILLER)) - base) / (2 * len(FILLER))
    n = int((length - base) / per_sentence)
    while n > 0 and size(n) > length:  # token merges at the joins: step down to fit
        n -= 1
    while size(n + 1) <= length:
        n += 1
    before = round(depth * n)
    head, mid, whole = _texts(before, n - before, key, chat, tokenizer)
    ids = tokenizer.encode(whole)
    # Token counts of text prefixes (a trailing space merges into the next word: count the
    # prefix without it).
    needle_pos = len(tokenizer.encode(head.rstrip(" ")))
    intro_end = len(tokenizer.encode(head[: head.index(INTRO) + len(INTRO)]))
    return Prompt(ids=ids, key=key, depth=depth, needle_pos=needle_pos,
                  filler_span=(intro_end, len(tokenizer.encode(mid))))


def check_answer(text: str, key: str) -> bool:
    """True when the first run of digits in the model's answer is exactly the key."""
    m = re.search(r"\d+", text)
    return m is not None and m.group() == key


@dataclass
class PasskeyResult:
    length: int
    trials: int = 0
    correct: int = 0
    answers: list[tuple[str, str]] = field(default_factory=list)  # (key, decoded answer)

    @property
    def accuracy(self) -> float:
        return self.correct / self.trials if self.trials else float("nan")


def trial_prompts(tokenizer: Tokenizer, length: int, trials: int, seed: int = 0,
                  chat: bool = False, max_new_tokens: int = MAX_NEW_TOKENS) -> list[Prompt]:
    """`trials` prompts for one context length: keys and depths drawn from (seed, length), so a
    length's trials are the same whichever other lengths run, and the same for every dtype."""
    rng = np.random.default_rng([seed, length])
    out = []
    for _ in range(trials):
        key = str(rng.integers(10000, 100000))
        depth = float(rng.uniform(0.0, 1.0))
        out.append(build_prompt(tokenizer, length - max_new_tokens, depth, key, chat))
    return out


def answer_batch(runner: Runner, prompts: list[list[int]], max_new_tokens: int = MAX_NEW_TOKENS,
                 chunk: int = CHUNK_BUCKETS[-1], first_seq_id: int = 0) -> list[list[int]]:
    """Greedy answers to several prompts at once: prefill them together in chunks, then decode
    `max_new_tokens` steps with one token per sequence. The runner needs max_batch >= len(prompts)
    and max_seq_len >= the longest prompt + max_new_tokens."""
    seq_ids = list(range(first_seq_id, first_seq_id + len(prompts)))
    for sid in seq_ids:
        runner.free(sid)
    last = [None] * len(prompts)
    for start in range(0, max(len(p) for p in prompts), chunk):
        # A sequence whose prompt has ended gets an empty chunk: all padding, written nowhere.
        pieces = [p[start: start + chunk] for p in prompts]
        logits = runner.step(seq_ids, pieces)
        for row, piece in enumerate(pieces):
            if piece and start + len(piece) == len(prompts[row]):
                last[row] = logits[row, len(piece) - 1]
    tokens = [int(np.argmax(np.asarray(x))) for x in last]
    out = [[t] for t in tokens]
    for _ in range(max_new_tokens - 1):
        logits = np.asarray(runner.step(seq_ids, [[t] for t in tokens])[:, 0])
        tokens = [int(t) for t in logits.argmax(-1)]
        for row, t in enumerate(tokens):
            out[row].append(t)
    for sid in seq_ids:
        runner.free(sid)
    return out


def passkey_accuracy(runner: Runner, tokenizer: Tokenizer, lengths=DEFAULT_LENGTHS,
                     trials: int = 3, seed: int = 0, chat: bool = False, batch: int = 1,
                     max_new_tokens: int = MAX_NEW_TOKENS, chunk: int = CHUNK_BUCKETS[-1],
                     log=None) -> dict[int, PasskeyResult]:
    """Retrieval accuracy per context length; `batch` trials run together."""
    results = {}
    for length in lengths:
        res = results[length] = PasskeyResult(length)
        prompts = trial_prompts(tokenizer, length, trials, seed, chat, max_new_tokens)
        for i in range(0, len(prompts), batch):
            group = prompts[i: i + batch]
            answers = answer_batch(runner, [p.ids for p in group], max_new_tokens, chunk)
            for p, ans in zip(group, answers, strict=True):
                text = tokenizer.decode(ans)
                res.trials += 1
                res.correct += check_answer(text, p.key)
                res.answers.append((p.key, text))
        if log is not None:
            log(f"passkey {length}: {res.correct}/{res.trials} "
                + " ".join(f"{k}->{a.strip()!r}" for k, a in res.answers))
    return results
