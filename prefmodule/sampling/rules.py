"""Example rule-based rewards (verifiable rewards), for ``reward: prefmodule.sampling.rules:<name>``: each takes the
prompts and the completions and returns one float per completion."""

from __future__ import annotations

import re

# The shipped demo data's chosen answers are helpful and polite, its rejected ones rude or dismissive.
POLITE = frozenset({"glad", "happy", "help", "hope", "sure", "thanks", "thank", "great", "please", "absolutely",
                    "tip", "tips", "welcome", "enjoy"})
RUDE = frozenset({"seriously", "whatever", "nobody", "boring", "problem", "stupid", "job", "figure", "google",
                  "waste", "bother"})
WORDS = re.compile(r"[a-z']+")


def politeness(prompts: list, completions: list[str]) -> list[float]:
    """A quarter point per distinct polite word and minus a quarter per distinct rude one, half a point for
    sharing a content word (five letters or more) with the prompt (on topic), minus the share of repeated words
    (so repeating a polite word earns nothing; an empty completion scores -1)."""
    scores = []
    for prompt, completion in zip(prompts, completions):
        words = WORDS.findall(completion.lower())
        distinct = set(words)
        asked = {word for word in WORDS.findall(_last_text(prompt).lower()) if len(word) > 4}
        repeated = 1 - len(distinct) / len(words) if words else 1.0
        scores.append(0.25 * (len(distinct & POLITE) - len(distinct & RUDE)) + 0.5 * bool(asked & distinct) - repeated)
    return scores


def _last_text(prompt: str | list) -> str:
    """A text prompt, or the last message's content of a chat prompt."""
    return prompt if isinstance(prompt, str) else str(prompt[-1].get("content", ""))
