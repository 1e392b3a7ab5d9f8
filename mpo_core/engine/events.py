"""From a step's sampled tokens to the events each request's stream receives."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..models.policies import PolicySet
from .detokenize import TokenTexts
from .requests import SequenceState
from .streams import TokenEvent


class EventBuilder:
    """Builds ``TokenEvent``s and decides when a sequence is finished."""

    def __init__(self, policy_set: PolicySet, max_context: int) -> None:
        self.policy_set = policy_set
        self.max_context = max_context
        self._special_ids = set(policy_set.tokenizer.all_special_ids)
        # Decoded by the streams' readers, not here; shared so each token is decoded once.
        self.token_texts = TokenTexts(policy_set.tokenizer, policy_set.vocab_size)

    def is_special(self, token: int) -> bool:
        return token in self._special_ids

    def token_text(self, token: int) -> str:
        """The token decoded alone, cached (also used for reported alternatives)."""
        return self.token_texts(token)

    def bytes_of(self, token: int) -> bytes:
        """The token's exact bytes (``token_bytes``): joined over a reply, its UTF-8."""
        return self.token_texts.bytes_of(token)

    def stop_token(self, seq: SequenceState, token: int) -> str | None:
        """The finish reason if ``token`` ends the reply by itself (EOS, a stop token id)."""
        params = seq.sampling
        if token in params.stop_token_ids:
            return "stop_sequence"
        if not params.ignore_eos and token in self.policy_set.eos_token_ids:
            return "eos_token"
        return None

    def finish_reason(self, seq: SequenceState, token: int) -> str | None:
        params = seq.sampling
        stop = self.stop_token(seq, token)
        if stop is not None:
            return stop
        if len(seq.generated) >= params.max_new_tokens or len(seq.token_ids) >= self.max_context:
            return "length"
        return None

    def step_events(
        self,
        active: Sequence[SequenceState],
        mixed: torch.Tensor,  # [B, V]
        logprobs: torch.Tensor,  # [M, B, V]
        tokens: torch.Tensor,  # [B]
    ) -> list[TokenEvent]:
        """Append each row's token to its sequence and build its event (in row order).

        The event's text is left to the stream's reader (``detokenize.ReplyReader``), and so
        is a stop string: this thread decides only what the token ids decide."""
        names = self.policy_set.names
        rows = torch.arange(len(active), device=mixed.device)
        chosen = mixed[rows, tokens].tolist()  # [B]
        per_model = logprobs[:, rows, tokens].t().tolist()  # [B, M]
        top_n = max(s.sampling.top_logprobs for s in active)
        top = mixed.topk(top_n, dim=-1) if top_n else None
        top_values = top.values.tolist() if top else []
        top_ids = top.indices.tolist() if top else []
        events = []
        for row, (seq, token) in enumerate(zip(active, tokens.tolist())):
            seq.token_ids.append(token)
            seq.generated.append(token)
            finish = self.finish_reason(seq, token)
            n = seq.sampling.top_logprobs
            events.append(
                TokenEvent(
                    index=len(seq.generated) - 1,
                    token_id=token,
                    token_text="",  # the reader's
                    text="",  # the reader's
                    logprob=chosen[row],
                    top_logprobs=finite_pairs(top_ids[row][:n], top_values[row][:n]) if n else [],
                    policy_logprobs=self.policy_logprobs(seq, names, per_model[row]),
                    special=self.is_special(token),
                    finish_reason=finish,
                    token_bytes=self.bytes_of(token),  # its piece of text: the reader's
                    stop_token=self.stop_token(seq, token) is not None,
                )
            )
        return events

    @staticmethod
    def policy_logprobs(
        seq: SequenceState, names: Sequence[str], per_model: list[float]
    ) -> dict[str, float | None]:
        """Each policy's log-prob of the token (None where the mixture does not run it),
        then each of the request's own personas' (models K + 1 + i)."""
        coefs = seq.coefs
        out = {name: per_model[m] if coefs[m] != 0 else None for m, name in enumerate(names)}
        first = len(names) + 1
        for i, persona in enumerate(seq.mixture.request_personas):
            out[persona.name] = per_model[first + i] if coefs[first + i] != 0 else None
        return out


def finite_pairs(ids: list[int], logprobs: list[float]) -> list[tuple[int, float]]:
    """Top alternatives with a log-prob: a signed mixture's plausibility constraint leaves
    tokens at -inf, which are no alternative (and JSON has no -Infinity)."""
    return [(i, lp) for i, lp in zip(ids, logprobs) if lp > float("-inf")]


def emit_runs(
    builder: EventBuilder,
    active: list[SequenceState],
    emitted: list[list[int]],  # per row: its tokens of this step, in order
    mixed: torch.Tensor,  # [B, G, V]
    logprobs: torch.Tensor,  # [M, B, G, V]
) -> tuple[list[SequenceState], int]:
    """Position by position, push one event per emitted token; a row that a token
    finishes (stop, EOS, limit) emits nothing after it. Returns the finished rows and the
    number of events pushed."""
    finished: list[SequenceState] = []
    done: set[int] = set()
    pushed = 0
    for j in range(mixed.shape[1]):
        live = [b for b, seq in enumerate(active) if len(emitted[b]) > j and seq.sid not in done]
        if not live:
            break
        tokens = torch.tensor([emitted[b][j] for b in live], device=mixed.device)  # [B']
        rows = [active[b] for b in live]
        if len(live) == len(active):  # every row: views, no copy
            step_mixed, step_logprobs = mixed[:, j], logprobs[:, :, j]  # [B, V], [M, B, V]
        else:
            index = torch.tensor(live, device=mixed.device)
            step_mixed, step_logprobs = mixed[index, j], logprobs[:, index, j]
        events = builder.step_events(rows, step_mixed, step_logprobs, tokens)
        pushed += len(events)
        for seq, event in zip(rows, events):
            seq.stream.push(event)
            if event.finish_reason is not None:
                finished.append(seq)
                done.add(seq.sid)
    return finished, pushed


def broken_reason(seq: SequenceState) -> str:
    """Why a row had no finite token to choose: the message its stream fails with."""
    if seq.grammar is not None and seq.grammar.error:
        return f"the grammar refused the reply: {seq.grammar.error}"
    if seq.grammar is not None:
        return "the grammar allows no token the mixture gives a finite log-probability"
    return (
        "the mixture's log-probabilities are not finite (weights "
        f"{seq.stream.weights}, strength {seq.stream.strength})"
    )


def final_event(seq: SequenceState, reason: str) -> TokenEvent:
    """The closing event of a sequence that ends without a token (e.g. cancelled)."""
    return TokenEvent(
        index=len(seq.generated),
        token_id=-1,
        token_text="",
        text="",
        logprob=0.0,
        top_logprobs=[],
        policy_logprobs={},
        special=True,
        finish_reason=reason,
    )
