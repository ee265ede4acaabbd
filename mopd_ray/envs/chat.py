"""Conversations as token ids: the first turns rendered once by the chat template, every later environment turn
rendered as the template's suffix after an assistant turn, appended to the tokens as generated (earlier turns
are never re-tokenised, so the student, its teachers and the learner see the ids that were sampled).

An environment turn's ids are what the template writes after an assistant turn's end-of-turn token, up to and
including the next assistant header (``\\n<|im_start|>tool\\n4<|im_end|>\\n<|im_start|>assistant\\n`` for
ChatML). They come from rendering a fixed stand-in conversation with and without the new turns: the template
must render that conversation's prefix identically both times (templates that rewrite earlier turns, e.g. by
stripping reasoning, still do for the stand-in, which has none); a template that does not is refused with an
error naming the model folder.
"""

from __future__ import annotations

import json
from typing import Optional

_STAND_IN = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


class ChatTemplateError(ValueError):
    """The chat template cannot render a turn as the run needs; the message names the template's model and the fix."""


def render_messages(tokenizer, messages: list, tools: Optional[list] = None, generation_prompt: bool = True) -> list:
    """Token ids of a conversation, with the assistant header appended (``generation_prompt``)."""
    kwargs = {"tools": tools} if tools else {}
    out = tokenizer.apply_chat_template(list(messages), add_generation_prompt=generation_prompt, tokenize=True,
                                        return_dict=True, **kwargs)
    return list(out["input_ids"])


class TurnRenderer:
    """Token ids of environment turns, appended after an assistant turn that ended with one of ``stop_ids``."""

    def __init__(self, tokenizer, stop_ids: list, name: str = "the student", tools: Optional[list] = None):
        self.tokenizer, self.name, self.tools = tokenizer, name, tools
        self.stop_ids = {int(i) for i in stop_ids}
        base = self._render(_STAND_IN, False)
        other = self._render(_STAND_IN[:1] + [{"role": "assistant", "content": "b"}], False)
        content = next((i for i, (x, y) in enumerate(zip(base, other)) if x != y), len(base))  # the turn's text
        ends = [i for i, t in enumerate(base) if t in self.stop_ids and i > content]
        if not ends:
            raise ChatTemplateError(f"{name}'s chat template ends an assistant turn with none of the end-of-turn ids "
                                    f"{sorted(self.stop_ids)}; set rollout.stop_token_ids to the id its template "
                                    "writes after an assistant turn")
        self.cut = ends[0] + 1  # the stand-in's assistant turn ends here; what follows belongs to the next turns
        self.base = base
        self._cache: dict = {}

    def _render(self, messages: list, generation_prompt: bool) -> list:
        try:
            return render_messages(self.tokenizer, messages, self.tools, generation_prompt)
        except Exception as e:  # jinja errors: e.g. a template that knows no 'tool' role
            roles = sorted({m.get("role") for m in messages})
            raise ChatTemplateError(f"{self.name}'s chat template cannot render the roles {roles} "
                                    f"({type(e).__name__}: {e}); have the environment answer with a role the "
                                    "template knows (e.g. 'user' for templates without a 'tool' role)") from None

    def turn_ids(self, messages: list) -> list:
        """Ids of ``messages`` (environment turns) after an assistant turn, ending with the assistant header."""
        key = json.dumps(messages, sort_keys=True)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        full = self._render(_STAND_IN + list(messages), True)
        if full[:self.cut] != self.base[:self.cut]:
            raise ChatTemplateError(f"{self.name}'s chat template renders earlier turns differently once later turns "
                                    "follow; multi-turn rollouts append turns to the ids as generated and cannot "
                                    "use it: give the model a template that renders turns independently")
        ids = full[self.cut:]
        if len(self._cache) < 4096:
            self._cache[key] = ids
        return ids
