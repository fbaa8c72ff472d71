"""Rows with several rated completions (UltraFeedback's raw shape) turned into one pair each.

A row holds a prompt (``prompt``, or ``instruction`` as UltraFeedback names it) and ``completions``: a list
of objects with the response (``response``, ``text``, ``completion`` or ``content``) and its score
(``score``, ``rating``, ``fine-grained_score`` or ``overall_score``: the first of these the data has, named in
the summary; ``columns`` picks another, e.g. ``{overall_score: score}``), or a list of responses with a
parallel ``scores`` list.

``pairs_from_ratings``:
- ``best_worst``: the highest-rated completion is chosen, the lowest rejected;
- ``best_random``: the highest-rated is chosen, and one of those rated strictly lower, drawn at random, is
  rejected (as HuggingFaceH4/ultrafeedback_binarized was built); the draw is seeded by ``seed`` and the row's
  content, so it is the same on every run and whatever the order of the rows.

On equal scores the first completion wins. A row whose completions are all rated the same has no pair: it
is dropped and counted as "tied ratings". ``score_chosen`` and ``score_rejected`` travel with the pair.
"""

from __future__ import annotations

import json
import random

import xxhash

from prefmodule.data.messages import is_empty, is_messages, message_problem, type_name
from prefmodule.data.records import Columns, Pair, RowDropped, RowError, field, score_field, tools_field

RESPONSE_KEYS = ("response", "text", "completion", "content")
SCORE_KEYS = ("score", "rating", "fine-grained_score", "overall_score")


class RatedRows:
    unpaired = False

    def __init__(self, sample: list[dict], columns: Columns, mode: str, seed: int):
        self.column, self.mode, self.seed = columns, mode, seed
        has_prompt = "prompt" in columns.names or columns.present(sample, "prompt")
        self.prompt = columns("prompt") if has_prompt else columns("instruction")
        self.completions = columns("completions")
        first = next((row[self.completions][0] for row in sample
                      if isinstance(row.get(self.completions), list) and row[self.completions]), None)
        self.parallel = first is not None and not isinstance(first, dict)  # responses beside a `scores` list
        keys = first if isinstance(first, dict) else {}
        self.response_key = self._key(keys, "response", RESPONSE_KEYS)
        self.score_key = columns("scores") if self.parallel else self._key(keys, "score", SCORE_KEYS)
        self.conversational = is_messages(next((row[self.prompt] for row in sample if row.get(self.prompt)), None))
        self.name = f"ratings, {self.score_key}, {mode}"
        self.needed = [self.prompt, self.completions]

    def _key(self, keys: dict, target: str, candidates: tuple[str, ...]) -> str:
        if target in self.column.names:
            return self.column(target)
        return next((key for key in candidates if key in keys), candidates[0])

    def check(self, row: dict) -> Pair:
        prompt = field(row, self.prompt)
        problem = message_problem(prompt, "ratings") if self.conversational else (
            None if isinstance(prompt, str) else f"expected a string (ratings format), got {type_name(prompt)}")
        if problem:
            raise RowError(self.prompt, problem, "wrong type")
        responses, scores = self._rated(row)
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        if self.mode == "best_worst":
            worst = min(range(len(scores)), key=lambda i: (scores[i], i))
        else:
            lower = [i for i, score in enumerate(scores) if score < scores[best]]
            digest = xxhash.xxh64_intdigest(json.dumps([self.seed, prompt, responses], sort_keys=True).encode())
            worst = random.Random(digest).choice(lower) if lower else best
        if scores[worst] == scores[best]:
            raise RowDropped("tied ratings")
        chosen, rejected = responses[best], responses[worst]
        if chosen == rejected:
            raise RowError(f"{self.completions}[{worst}]", "identical to the best-rated response",
                           "identical responses")
        return Pair(prompt, chosen, rejected, tools_field(row, self.column("tools")), (scores[best], scores[worst]))

    def _rated(self, row: dict) -> tuple[list, list[float]]:
        completions = field(row, self.completions)
        if not isinstance(completions, list):
            raise RowError(self.completions, f"expected a list of rated completions, got {type_name(completions)}",
                           "wrong type")
        if self.parallel:
            scores = field(row, self.score_key)
            if not isinstance(scores, list) or len(scores) != len(completions):
                raise RowError(self.score_key, f"expected a list of {len(completions)} scores, one per completion, "
                                               f"got {scores!r:.60}", "wrong type")
            items = list(zip(completions, scores))
        else:
            items = []
            for i, item in enumerate(completions):
                if not isinstance(item, dict) or self.response_key not in item or self.score_key not in item:
                    raise RowError(f"{self.completions}[{i}]", f"expected an object with {self.response_key!r} "
                                                               f"and {self.score_key!r}, got {item!r:.60}", "wrong type")
                items.append((item[self.response_key], item[self.score_key]))
        responses, scores = [], []
        for i, (response, score) in enumerate(items):
            where = f"{self.completions}[{i}]"
            ok = is_messages(response) and not message_problem(response, "ratings") if self.conversational else (
                isinstance(response, str))
            if not ok:
                raise RowError(where, f"expected a {'list of messages' if self.conversational else 'string'} "
                                      f"response, got {type_name(response)}", "wrong type")
            if is_empty(response):
                raise RowError(where, "empty response", "empty response")
            responses.append(response)
            scores.append(score_field(score, f"{where}.{self.score_key}" if not self.parallel
                                      else f"{self.score_key}[{i}]"))
        if len(responses) < 2:
            raise RowError(self.completions, f"needs at least 2 rated completions, got {len(responses)}",
                           "too few completions")
        return responses, scores
