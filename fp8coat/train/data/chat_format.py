"""How a record becomes one training text per model family, and which characters of it are learned.

:meth:`ChatFormat.render` returns the text (with the model's image placeholder where the record's ``<image>`` was)
and the character spans of the learned parts; :mod:`fp8coat.train.data.vlm_encode` maps the spans to tokens.

``llava`` (LLaVA-1.5's conversation style; the placeholder is the processor's ``image_token``, ``<image>``)::

    caption:       <image>{caption}{eos}
    conversation:  [{system} ]USER: <image>\\n{question} ASSISTANT: {answer}{eos}USER: {question} ASSISTANT: ...

``qwen2-vl`` (ChatML as in Qwen2-VL's chat template; the image is ``<|vision_start|><|image_pad|><|vision_end|>``)::

    caption:       <|vision_start|><|image_pad|><|vision_end|>{caption}<|endoftext|>
    conversation:  <|im_start|>system\\n{system or "You are a helpful assistant."}<|im_end|>\\n
                   <|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>\\n{question}<|im_end|>\\n
                   <|im_start|>assistant\\n{answer}<|im_end|>\\n ...

Learned: each ``{caption}{eos}`` / ``{answer}{eos}`` (``{answer}<|im_end|>`` for qwen2-vl); everything else
(system, user turns, role markers, the image, the newline after ``<|im_end|>``) is prompt. :data:`CHAT_TEMPLATES`
are Jinja chat templates that produce the same texts (``add_generation_prompt`` ends with ``ASSISTANT:`` or
``<|im_start|>assistant\\n``), for generating with a model trained on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .image_records import IMAGE, ImageTextRecord

__all__ = ["CHAT_TEMPLATES", "ChatFormat", "Rendered", "chat_format_for", "llava_format", "qwen2vl_format"]

QWEN_SYSTEM = "You are a helpful assistant."


class Rendered(NamedTuple):
    """``text``: the whole training text; ``learned``: ``((start, end), ...)`` character spans of ``text``."""

    text: str
    learned: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ChatFormat:
    """A family's text layout. ``image``: what replaces ``<image>`` in the text; ``image_token``: the token the
    processor expands into the image's tokens; ``caption_end`` / ``answer_end``: appended (and learned) after a
    caption / an assistant answer; ``style``: ``"llava"`` or ``"chatml"``."""

    name: str
    style: str
    image: str
    image_token: str
    caption_end: str
    answer_end: str

    def render(self, record: ImageTextRecord) -> Rendered:
        """The record as one text and its learned character spans (see the module docstring)."""
        if record.caption:
            parts = [(self.image, False), (record.turns[1][1] + self.caption_end, True)]
        elif self.style == "llava":
            parts = self._llava(record)
        else:
            parts = self._chatml(record)
        text, learned, pos = [], [], 0
        for piece, is_learned in parts:
            if is_learned:
                learned.append((pos, pos + len(piece)))
            text.append(piece)
            pos += len(piece)
        return Rendered("".join(text), tuple(learned))

    def _llava(self, record: ImageTextRecord) -> list[tuple[str, bool]]:
        parts = []
        for role, text in record.turns:
            if role == "system":
                parts.append((f"{text} ", False))
            elif role == "user":
                parts.append((f"USER: {text.replace(IMAGE, self.image)} ", False))
            else:
                parts += [("ASSISTANT: ", False), (text + self.answer_end, True)]
        return parts

    def _chatml(self, record: ImageTextRecord) -> list[tuple[str, bool]]:
        turns = record.turns if record.turns[0][0] == "system" else (("system", QWEN_SYSTEM), *record.turns)
        parts = []
        for role, text in turns:
            if role == "assistant":
                parts += [("<|im_start|>assistant\n", False), (text + self.answer_end, True), ("\n", False)]
            else:
                parts.append((f"<|im_start|>{role}\n{text.replace(IMAGE, self.image)}<|im_end|>\n", False))
        return parts


def llava_format(image_token: str = IMAGE, eos: str = "</s>") -> ChatFormat:
    """LLaVA's layout with the processor's ``image_token`` and the tokenizer's ``eos``."""
    return ChatFormat("llava", "llava", image_token, image_token, eos, eos)


def qwen2vl_format() -> ChatFormat:
    """Qwen2-VL's layout (ChatML, ``<|image_pad|>`` between ``<|vision_start|>`` and ``<|vision_end|>``)."""
    return ChatFormat("qwen2-vl", "chatml", "<|vision_start|><|image_pad|><|vision_end|>", "<|image_pad|>",
                      "<|endoftext|>", "<|im_end|>")


def chat_format_for(processor) -> ChatFormat:
    """The format for an HF processor: ``qwen2-vl`` when its ``image_token`` is ``<|image_pad|>`` (Qwen2-VL and its
    successors), else ``llava`` with its ``image_token`` and its tokenizer's ``eos_token``."""
    image_token = getattr(processor, "image_token", None)
    if image_token is None:
        raise ValueError(f"{type(processor).__name__} has no image_token: cannot place the image in the text "
                         "(pass chat_format= explicitly)")
    if image_token == "<|image_pad|>":
        return qwen2vl_format()
    eos = getattr(getattr(processor, "tokenizer", None), "eos_token", None)
    if not eos:
        raise ValueError(f"the tokenizer of {type(processor).__name__} has no eos_token to end the answers with")
    return llava_format(image_token, eos)


# Jinja chat templates writing the texts above; an image content item is written as the image followed by "\n"
_CONTENT = (
    "{%- set ns = namespace(text='') -%}"
    "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}"
    "{%- else -%}{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'image' -%}{%- set ns.text = ns.text + IMAGE + '\\n' -%}"
    "{%- elif c['type'] == 'text' -%}{%- set ns.text = ns.text + c['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
)
CHAT_TEMPLATES = {
    "llava": (
        "{%- set IMAGE = '<image>' -%}{%- for message in messages -%}" + _CONTENT +
        "{%- if message['role'] == 'system' -%}{{ ns.text + ' ' }}"
        "{%- elif message['role'] == 'user' -%}{{ 'USER: ' + ns.text + ' ' }}"
        "{%- else -%}{{ 'ASSISTANT: ' + ns.text + eos_token }}{%- endif -%}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    ),
    "qwen2-vl": (
        "{%- set IMAGE = '<|vision_start|><|image_pad|><|vision_end|>' -%}"
        "{%- if messages[0]['role'] != 'system' -%}{{ '<|im_start|>system\\n" + QWEN_SYSTEM + "<|im_end|>\\n' }}"
        "{%- endif -%}{%- for message in messages -%}" + _CONTENT +
        "{{ '<|im_start|>' + message['role'] + '\\n' + ns.text + '<|im_end|>\\n' }}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    ),
}
