"""The draft-and-verify seam: what a drafter and an acceptance rule must do.

Every decoder in ragdec is one loop (``loop.decode``): a drafter proposes up to k tokens,
the target model runs once over ``[last token, *draft]``, an acceptance rule keeps a
prefix of the draft plus one token of the target's own, and the KV cache is cropped to
what stands. Plain greedy decoding is the case of a drafter that never proposes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:
    import torch

    from .cost import ForwardCost


class Drafter(Protocol):
    """Proposes draft tokens from what has been decoded so far.

    Besides ``propose`` and ``observe``, a drafter declares what else it offers the loop;
    the defaults below offer nothing. Every drafter subclasses this class and sets what it
    offers, so the loop reads these attributes as they are and never probes for them.
    """

    # the model that verifies this row's drafts, when the drafter brings its own (FREE's
    # shallow-deep model, which runs only the deep layers over what the drafter's shallow
    # passes stacked in the row's cache); None: the batch's model. A row with a target of
    # its own decodes alone, since that target works on one row's cache.
    target: object = None
    # forwards of the drafter's own model (BiLD's little model, FREE's shallow passes), for
    # ``DecodeStats.drafter_forward_passes``; 0 where the drafter runs none
    forward_passes: int = 0
    # the measured seconds of a target forward per draft length (LLMA's); the batch cuts
    # its rows' drafts to the width that pays by it. None: drafts are verified whole
    cost: ForwardCost | None = None

    def propose(self, tokens: Sequence[int], max_tokens: int) -> list[int]:
        """Return at most ``max_tokens`` draft tokens to follow ``tokens``.

        Args:
            tokens: prompt and generated tokens so far, the last one not yet in the
                target's KV cache.
            max_tokens: the most draft tokens the loop can use this step.
        """
        ...

    def observe(self, tokens: Sequence[int], drafted: int, accepted: int) -> None:
        """Learn the outcome of the last step: ``tokens`` as they now stand,
        ``drafted`` tokens proposed, ``accepted`` of them kept. By default nothing."""
        return None


class AcceptanceRule(Protocol):
    """Decides how much of a draft stands, given the target's logits over it."""

    def accept(self, draft: Sequence[int], logits: "torch.Tensor") -> list[int]:
        """Return the accepted draft prefix followed by one token chosen by the target.

        Args:
            draft: the k proposed tokens.
            logits: [k + 1, vocab] target logits at the positions of ``[last, *draft]``;
                row i predicts the token after position i.
        """
        ...


@dataclass(frozen=True)
class DecodeStats:
    """What one request cost. Seconds are wall time on this process."""

    forward_passes: int  # target-model forwards, prefill included
    new_tokens: int  # tokens generated (the prompt excluded)
    drafted_tokens: int  # draft tokens sent to verification
    accepted_tokens: int  # draft tokens that stood
    seconds: float  # prefill + decode
    prefill_seconds: float  # prompt forward up to the first new token (time to first token)
    prompt_tokens: int = 0
    drafter_forward_passes: int = 0  # forwards of a draft model, where the drafter has one
    reused_prompt_tokens: int = 0  # prompt tokens whose KV came from a kept prefix (not prefilled)

    @property
    def decode_seconds(self) -> float:
        """From the first new token to the last: the part that methods speed up."""
        return self.seconds - self.prefill_seconds

    @property
    def tokens_per_forward(self) -> float:
        """New tokens per decode-phase target forward (1.0 for plain greedy)."""
        decode_forwards = self.forward_passes - 1
        return (self.new_tokens - 1) / decode_forwards if decode_forwards > 0 else 1.0

    @property
    def copied_share(self) -> float:
        """Share of the answer's tokens that came from accepted drafts."""
        return self.accepted_tokens / self.new_tokens if self.new_tokens else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first, per decode-phase second."""
        return (self.new_tokens - 1) / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "forward_passes": self.forward_passes,
            "new_tokens": self.new_tokens,
            "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens,
            "seconds": round(self.seconds, 4),
            "prefill_seconds": round(self.prefill_seconds, 4),
            "decode_seconds": round(self.decode_seconds, 4),
            "prompt_tokens": self.prompt_tokens,
            "tokens_per_forward": round(self.tokens_per_forward, 3),
            "copied_share": round(self.copied_share, 3),
            "drafter_forward_passes": self.drafter_forward_passes,
            "reused_prompt_tokens": self.reused_prompt_tokens,
        }


@dataclass(frozen=True)
class Block:
    """Tokens accepted in one step of the loop."""

    token_ids: tuple[int, ...]  # new tokens, in order; empty only on a final block
    finish_reason: str | None = None  # "stop" (EOS or stop string) | "length" | None
    stats: DecodeStats | None = None  # set on the final block only
