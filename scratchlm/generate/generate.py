"""Autoregressive generation: prefill, decode, the KV cache, stop strings, streaming, beam search.

Generation has two phases. **Prefill** runs the prompt through the model once, filling the KV
cache. **Decode** then feeds one token at a time: each step computes keys and values for the new
token only and attends over the cache (O(t) per step instead of rerunning O(t) positions).

Context window policy (both paths, so they agree token for token): the model sees at most
``block_size`` positions. When the window is full, the oldest half is dropped and the rest is
re-encoded (a new prefill), so decoding can run for any number of tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from scratchlm.generate.kv_cache import KVCache
from scratchlm.generate.sampling import SamplingConfig, choose
from scratchlm.generate.stats import GenerationStats


class _Window:
    """The visible context of a batch of sequences, with or without a KV cache.

    The cache is sized for what this generation can still need (the visible prompt plus the new
    tokens, at most ``block_size``), not always ``block_size``: memory, and every reorder of
    beam search, then scale with the text actually generated.

    ``vocab_size``: the ids a tokenizer can decode. An imported model's output matrix is often padded
    past its tokenizer (Qwen2's 151,936 rows for 151,665 ids); the rows beyond are never chosen.
    """

    def __init__(
        self, model, tokens: torch.Tensor, use_cache: bool, max_new_tokens: int, vocab_size: int | None = None
    ):
        self.model, self.tokens, self.use_cache = model, tokens, use_cache
        self.vocab_size = vocab_size
        self.block = model.config.block_size
        self.start = max(0, tokens.shape[1] - self.block)  # first visible position
        self.final_length = tokens.shape[1] + max_new_tokens  # tokens held once generation ends
        self.cache: KVCache | None = None

    def logits(self) -> torch.Tensor:
        """Next-token logits (B, V) given everything in ``tokens``, V the decodable ids."""
        return self._logits()[:, : self.vocab_size]

    def _logits(self) -> torch.Tensor:
        if self.tokens.shape[1] - self.start > self.block:  # window full: keep the newest half
            self.start = self.tokens.shape[1] - self.block // 2
            self.cache = None
        visible = self.tokens[:, self.start :]
        if not self.use_cache:
            return self.model(visible, last_only=True)[0][:, -1]
        if self.cache is None:  # prefill
            needed = min(self.block, self.final_length - self.start)
            self.cache = KVCache.for_model(self.model, visible.shape[0], max_len=needed)
            return self.model(visible, cache=self.cache, last_only=True)[0][:, -1]
        new = visible[:, self.cache.length :]  # decode: only the positions not yet cached
        return self.model(new, cache=self.cache, last_only=True)[0][:, -1]

    def append(self, next_ids: torch.Tensor) -> None:
        self.tokens = torch.cat([self.tokens, next_ids], dim=1)

    def reorder(self, index: torch.Tensor) -> None:
        self.tokens = self.tokens.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder(index)


def _as_batch(prompt, device) -> torch.Tensor:
    tokens = torch.as_tensor(prompt, dtype=torch.long, device=device)
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token (e.g. <|endoftext|> or a newline)")
    return tokens


@torch.no_grad()
def stream(
    model,
    prompt: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    *,
    use_cache: bool = True,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
    vocab_size: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B,) one step at a time. Stops early when every row hit a stop id.
    ``vocab_size``: choose only ids below it (a tokenizer's, when the model's rows are padded)."""
    sampling = sampling or SamplingConfig()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    window = _Window(model, _as_batch(prompt, device), use_cache, max_new_tokens, vocab_size)
    prompt_len = window.tokens.shape[1]
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    done = torch.zeros(window.tokens.shape[0], dtype=torch.bool, device=device)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    try:
        for _ in range(max_new_tokens):
            previous = window.tokens[:, prompt_len:] if sampling.repetition_penalty != 1.0 else None
            next_ids = choose(window.logits(), sampling, previous, generator)
            window.append(next_ids)
            yield next_ids[:, 0]
            if stops.numel():
                done |= torch.isin(next_ids[:, 0], stops)
                if done.all():
                    break
    finally:
        model.train(was_training)


def generate(
    model, prompt, max_new_tokens: int, sampling: SamplingConfig | None = None, **kwargs
) -> list[list[int]]:
    """The generated ids for each prompt row (the prompt itself not included)."""
    steps = list(stream(model, prompt, max_new_tokens, sampling, **kwargs))
    if not steps:
        return [[] for _ in range(_as_batch(prompt, "cpu").shape[0])]
    return torch.stack(steps, dim=1).tolist()


def start_ids(tokenizer) -> list[int]:
    """Where text starts, for a prompt of nothing: the end-of-text token (what a document follows),
    else a newline (where a line starts); a tokenizer with neither is refused, naming it. The one
    rule of ``sample`` and ``generate`` with an empty prompt, the engine, and the trainer's samples."""
    if tokenizer.eot_token is not None:
        return [tokenizer.eot_token]
    try:
        newline = tokenizer.encode_ordinary("\n")
    except (ValueError, KeyError):  # a character vocabulary without "\n"
        newline = []
    if newline:
        return newline
    raise ValueError(
        f"an empty prompt starts from <|endoftext|> or a newline, and this tokenizer ({tokenizer.kind}, "
        f"{tokenizer.vocab_size} ids) has neither: give a prompt"
    )


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A text prompt's ids (special-token spellings included); an empty prompt starts where text
    starts (:func:`start_ids`)."""
    return tokenizer.encode(prompt, allowed_special="all") if prompt else start_ids(tokenizer)


def generate_text(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 200,
    sampling: SamplingConfig | None = None,
    *,
    stop: Sequence[str] = (),
    on_text: Callable[[str], None] | None = None,
    use_cache: bool = True,
    seed: int | None = None,
    stats: GenerationStats | None = None,
) -> str:
    """Generate from a text prompt; stop at any of the ``stop`` strings (which are cut off).

    ``on_text`` receives the text as it grows (streaming to a terminal): everything it is given,
    joined, is exactly the returned text (see :class:`TextStream`). ``stats`` records the time of
    each token (TTFT, ITL, TPOT: see :mod:`scratchlm.generate.stats`).
    """
    ids = prompt_ids(tokenizer, prompt)
    stop_ids = [tokenizer.eot_token] if tokenizer.eot_token is not None else []
    text = TextStream(tokenizer, stop)
    if stats is not None:
        stats.start(min(len(ids), model.config.block_size))  # what prefill processes: the visible window
    for next_ids in stream(
        model,
        ids,
        max_new_tokens,
        sampling,
        use_cache=use_cache,
        seed=seed,
        stop_ids=stop_ids,
        vocab_size=tokenizer.vocab_size,
    ):
        token = int(next_ids[0])  # waits for the device: the token exists now
        if stats is not None:
            stats.token()
        if token in stop_ids:
            break
        chunk = text.push(token)
        if on_text and chunk:
            on_text(chunk)
        if text.stopped:
            break
    chunk = text.finish()
    if on_text and chunk:
        on_text(chunk)
    return text.text


class TextStream:
    """Token ids in, text out as soon as it is safe to show, cut before the first stop string.

    Two things make streamed text unsafe to print at once:

    * a token can end in the middle of a UTF-8 character (byte-level BPE splits emoji and CJK
      characters across tokens): an incremental UTF-8 decoder keeps those bytes until the
      character is complete;
    * the end of the text so far may be the beginning of a stop string (``"\n\nUs"`` of
      ``"\n\nUser:"``): that suffix is held back until the next tokens show whether the stop string
      follows (then it is cut, never shown) or not (then it is released).

    Each token costs work proportional to its own bytes and the stop strings' length, never to
    the text so far. ``"".join`` of everything :meth:`push` and :meth:`finish` returned equals
    :attr:`text`, which equals decoding all ids at once and cutting at the first stop string.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        import codecs

        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._longest = max((len(s) for s in self.stop), default=0)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded, not yet shown: might still become a stop string
        self._shown: list[str] = []
        self.stopped = False

    @property
    def text(self) -> str:
        return "".join(self._shown)

    def push(self, token: int) -> str:
        """Add one token; return the text that became safe to show (often "")."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(self.tokenizer.decode_bytes([token]))
        return self._release(final=False)

    def finish(self) -> str:
        """No more tokens: flush an incomplete character (as U+FFFD) and what was held back."""
        if not self.stopped:
            self._held += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        hits = [i for i in (self._held.find(s) for s in self.stop) if i >= 0]
        if hits:
            cut = min(hits)
            # A longer stop string may have begun *before* this hit and not be complete yet
            # ("\n\nUs" of "\n\nUser:" when "User" is also a stop string): then the cut could still
            # move earlier. Show only what precedes it and wait for the next token (or the end).
            pending = [] if final else [j for j in range(cut) if self._starts_a_stop(self._held[j:])]
            if not pending:
                out, self._held, self.stopped = self._held[:cut], "", True
                self._shown.append(out)
                return out
            out, self._held = self._held[: pending[0]], self._held[pending[0] :]
        else:
            keep = 0 if final else self._unsafe_suffix()
            out, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
        self._shown.append(out)
        return out

    def _starts_a_stop(self, tail: str) -> bool:
        """``tail`` is the beginning of some stop string, not yet all of it."""
        return any(len(s) > len(tail) and s.startswith(tail) for s in self.stop)

    def _unsafe_suffix(self) -> int:
        """Length of the longest end of the held text that begins some stop string."""
        for k in range(min(len(self._held), self._longest - 1), 0, -1):
            tail = self._held[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0


@torch.no_grad()
def beam_search(
    model,
    prompt: Sequence[int],
    max_new_tokens: int,
    beam_width: int = 4,
    *,
    length_penalty: float = 1.0,
    eos_id: int | None = None,
    use_cache: bool = True,
    vocab_size: int | None = None,
) -> list[tuple[list[int], float]]:
    """Keep the ``beam_width`` most likely continuations; return them best first as (ids, score).

    A hypothesis' score is its total log-probability divided by ``length ** length_penalty``
    (> 1 favours longer outputs, < 1 shorter; an ended hypothesis' length counts its end token).
    Hypotheses that emit ``eos_id`` are finished (their ids leave the end token out). The rules
    are Hugging Face ``generate(num_beams=..., early_stopping=False)``'s, so both return the same
    beams: each step ranks ``2 · beam_width`` candidates; an end token counts only among the first
    ``beam_width`` of them; the ``beam_width`` best finished hypotheses are kept, and the search
    stops once the worst of them beats the best score a live beam could still reach (its running
    log-probability at the current length: log-probabilities only fall). Live beams join the
    result only when the search runs to ``max_new_tokens``. ``vocab_size``: as in :func:`stream`.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    window = _Window(model, _as_batch(prompt, device), use_cache, max_new_tokens, vocab_size)
    prompt_len = window.tokens.shape[1]
    scores = torch.zeros(1, device=device)  # running log-probability of each live beam
    finished: list[tuple[list[int], float]] = []  # the beam_width best, best first
    try:
        for step in range(max_new_tokens):
            log_probs = F.log_softmax(window.logits().float(), dim=-1)  # (beams, V)
            V = log_probs.shape[-1]
            candidates = (scores[:, None] + log_probs).view(-1)
            top_scores, top_index = candidates.topk(min(2 * beam_width, candidates.numel()))
            beams, tokens, new_scores = [], [], []
            for rank, (score, index) in enumerate(zip(top_scores.tolist(), top_index.tolist())):
                beam, token = divmod(index, V)
                if eos_id is not None and token == eos_id:
                    if rank < beam_width:  # an end token below the beam_width best is not taken
                        ids = window.tokens[beam, prompt_len:].tolist()
                        finished.append((ids, score / (len(ids) + 1) ** length_penalty))
                    continue
                beams.append(beam)
                tokens.append(token)
                new_scores.append(score)
                if len(beams) == beam_width:
                    break
            finished = sorted(finished, key=lambda pair: pair[1], reverse=True)[:beam_width]
            if not beams:
                return finished
            window.reorder(torch.tensor(beams, device=device))
            window.append(torch.tensor(tokens, device=device)[:, None])
            scores = torch.tensor(new_scores, device=device)
            best_reachable = max(new_scores) / (step + 1) ** length_penalty
            if len(finished) == beam_width and finished[-1][1] >= best_reachable:
                return finished  # no live beam can beat the worst kept hypothesis
    finally:
        model.train(was_training)
    length = window.tokens.shape[1] - prompt_len
    live = [
        (window.tokens[i, prompt_len:].tolist(), s / max(length, 1) ** length_penalty)
        for i, s in enumerate(scores.tolist())
    ]
    return sorted(finished + live, key=lambda pair: pair[1], reverse=True)[:beam_width]
