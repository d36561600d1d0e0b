"""The chat format: a conversation (a list of messages) as token ids, and which of them to learn.

A base model continues text. An assistant is a base model fine-tuned on conversations written in
a fixed *template*, so that it learns where a turn starts, whose turn it is, and — the part that
is easiest to get wrong — where its own turn ends. The template here is ChatML (the format of
OpenAI's early chat models, Qwen and many others)::

    <|im_start|>system
    You are terse.<|im_end|>
    <|im_start|>user
    2+2?<|im_end|>
    <|im_start|>assistant
    4<|im_end|>

``<|im_start|>`` and ``<|im_end|>`` are special tokens added to the tokenizer (new ids after every
existing one, see :func:`add_chat_tokens`). :meth:`ChatTemplate.render` returns the ids and a
**loss mask** of the same length: 1 for the tokens of each assistant message *and its
<|im_end|>*, 0 for everything else (system and user text, role names, the scaffolding between
turns). Training on the masked loss teaches the model to answer, not to write the user's part;
the end-of-turn token inside the mask teaches it to stop — a model fine-tuned without it never
emits <|im_end|> and rambles on until ``max_tokens`` (``tests/tokenizers/test_chat.py`` shows it).

Every piece is encoded on its own and concatenated. Message content is stripped of leading and
trailing whitespace, so the pieces meet where a regex pre-tokenizer cuts anyway (after the
newline, before a special token): the ids equal those of encoding the whole rendered string,
which is what Hugging Face's ``apply_chat_template`` does with :attr:`ChatTemplate.jinja`.
Content that spells a special token is refused (it would otherwise smuggle a turn boundary in).
"""

from __future__ import annotations

from dataclasses import dataclass

from scratchlm.tokenizers.base import ENDOFTEXT, Tokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_TOKENS = (IM_START, IM_END)
ROLES = ("system", "user", "assistant")

# The same template for Hugging Face (tokenizer_config.json's chat_template), rendering the
# string this module's ids encode.
JINJA_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


# What the template writes besides the content: the role names and a newline.
TEMPLATE_CHARACTERS = tuple(sorted(set("\n" + "".join(ROLES))))


def add_chat_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """``tokenizer`` with <|im_start|>, <|im_end|> (and <|endoftext|>, for padding) as special
    tokens; ids it already has keep their meaning. Unchanged if it has them all.

    A character vocabulary that cannot spell the template's role names and newline (one trained
    on ``12+30=42`` lines has 12 characters) also gets those characters
    (:func:`missing_template_characters`), as new characters after its own. Its special tokens
    then move up by as many ids, since a character vocabulary keeps them after its characters:
    :func:`moved_ids` says where each went, and a model's rows move with them."""
    missing = missing_template_characters(tokenizer)
    if missing:
        d = tokenizer._definition()
        d["chars"] = [*d["chars"], *missing]
        d["special_tokens"] = {name: i + len(missing) for name, i in tokenizer.special_tokens.items()}
        tokenizer = type(tokenizer)._from_definition(d)
    wanted = [t for t in (ENDOFTEXT, *CHAT_TOKENS) if t not in tokenizer.special_tokens]
    return tokenizer.with_special_tokens(wanted) if wanted else tokenizer


def missing_template_characters(tokenizer: Tokenizer) -> list[str]:
    """The characters the template writes that a character vocabulary lacks (none for byte-level
    vocabularies, which spell everything)."""
    if tokenizer.kind != "char":
        return []
    return [c for c in TEMPLATE_CHARACTERS if c not in tokenizer.stoi]


def moved_ids(plain: Tokenizer, chat: Tokenizer) -> dict[int, int]:
    """{old id: new id} of the tokens of ``plain`` whose id differs in ``chat = add_chat_tokens(plain)``
    (the special tokens of a character vocabulary grown with the template's characters); every
    other id of ``plain`` keeps its number."""
    return {
        i: chat.special_tokens[name]
        for name, i in plain.special_tokens.items()
        if chat.special_tokens[name] != i
    }


@dataclass
class Rendered:
    ids: list[int]
    mask: list[int]  # 1 = an assistant token to learn (the target at this position), 0 = context

    def __len__(self) -> int:
        return len(self.ids)


class ChatTemplate:
    def __init__(self, tokenizer: Tokenizer, *, learn_end_of_turn: bool = True):
        """``learn_end_of_turn=False`` leaves the assistant's <|im_end|> out of the mask: the classic
        bug, kept only to show what it does (the model never learns to stop)."""
        self.learn_end_of_turn = learn_end_of_turn
        missing = [t for t in (*CHAT_TOKENS, ENDOFTEXT) if t not in tokenizer.special_tokens]
        if missing:
            raise ValueError(
                f"the tokenizer has no {missing} special token(s); add them with add_chat_tokens() "
                "(and grow the model's vocabulary to match)"
            )
        self.tokenizer = tokenizer
        self.start_id = tokenizer.special_tokens[IM_START]
        self.end_id = tokenizer.special_tokens[IM_END]  # end of turn: what generation stops on
        self.pad_id = tokenizer.special_tokens[ENDOFTEXT]  # padding, never a label
        try:
            self._newline = tokenizer.encode_ordinary("\n")
            for role in ROLES:
                tokenizer.encode_ordinary(role + "\n")
        except ValueError as e:  # a character vocabulary without these letters
            raise ValueError(
                f"this tokenizer cannot spell the template's role names and newline ({e}); train it on "
                "text that contains them"
            ) from None
        self._check_piecewise_encoding()
        self.jinja = JINJA_TEMPLATE

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False) -> Rendered:
        """Ids and loss mask of a conversation; with ``add_generation_prompt``, ending with the
        opening of an assistant turn (what a model is given to reply to)."""
        check_messages(messages)
        ids: list[int] = []
        mask: list[int] = []

        def put(piece: list[int], learn: bool) -> None:
            ids.extend(piece)
            mask.extend([int(learn)] * len(piece))

        for m in messages:
            content = m["content"].strip()
            self._refuse_special(content)
            learn = m["role"] == "assistant"
            put([self.start_id], False)
            put(self.tokenizer.encode_ordinary(m["role"] + "\n"), False)
            put(self._encode_content(content), learn)
            put([self.end_id], learn and self.learn_end_of_turn)  # learned: it is how the model stops
            put(self._newline, False)
        if add_generation_prompt:
            put([self.start_id], False)
            put(self.tokenizer.encode_ordinary("assistant\n"), False)
        return Rendered(ids, mask)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The ids a model gets to write the next assistant message."""
        return self.render(messages, add_generation_prompt=True).ids

    def render_text(self, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
        return self.tokenizer.decode(self.render(messages, add_generation_prompt=add_generation_prompt).ids)

    def parse(self, ids: list[int]) -> list[dict]:
        """The messages of rendered ids (inverse of :meth:`render` for stripped content)."""
        messages = []
        i, n = 0, len(ids)
        while i < n:
            if ids[i] != self.start_id:
                raise ValueError(f"token {i}: expected {IM_START} (id {self.start_id}), got id {ids[i]}")
            try:
                end = ids.index(self.end_id, i + 1)
            except ValueError:
                raise ValueError(f"token {i}: a turn that never ends (no {IM_END})") from None
            role, sep, content = self.tokenizer.decode(ids[i + 1 : end]).partition("\n")
            if not sep or role not in ROLES:
                raise ValueError(
                    f"token {i}: a turn must start with a role ({', '.join(ROLES)}) and a newline"
                )
            messages.append({"role": role, "content": content})
            i = end + 1
            if ids[i : i + len(self._newline)] == self._newline:
                i += len(self._newline)
        return messages

    def _encode_content(self, content: str) -> list[int]:
        try:
            return self.tokenizer.encode_ordinary(content)
        except ValueError as e:  # a character vocabulary without a character of the data
            if self.tokenizer.kind != "char":
                raise
            raise ValueError(
                f"{e}. A byte tokenizer spells every character: train one with `scratchlm tokenizer "
                "train --kind byte`, tokenize the data with it and pretrain the base again"
            ) from None

    def _check_piecewise_encoding(self) -> None:
        """The pieces must meet where the tokenizer cuts anyway (true for the GPT-2, cl100k and o200k
        patterns and for characters); a custom pattern that glues a newline to the next word would
        make our ids differ from the whole string's (Hugging Face's), so it is refused."""
        samples = [
            [{"role": "user", "content": content}, {"role": "assistant", "content": content}]
            for content in ("x", "The cat, 12 mice", "def f():\n    return 1", "«quoted» ok?", "```py")
        ]
        for messages in samples:
            try:
                ids = self.render(messages).ids
            except ValueError:  # a character vocabulary without these characters: nothing to compare
                continue
            if self.tokenizer.encode(self.tokenizer.decode(ids), allowed_special="all") != ids:
                raise ValueError(
                    "this tokenizer's pre-tokenizer joins text across the template's boundaries (a "
                    "newline with the next word), so rendering piece by piece would not give the ids of "
                    "the whole conversation: use the GPT-2, cl100k or o200k pattern"
                )

    def _refuse_special(self, content: str) -> None:
        for name in self.tokenizer.special_tokens:
            if name in content:
                raise ValueError(
                    f"message content contains the special token {name!r} as text; it would act as a "
                    "turn boundary. Remove it (or escape it) before rendering"
                )


def check_messages(messages) -> None:
    """A conversation is a non-empty list of {"role": system|user|assistant, "content": str}."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(
            f"messages must be a non-empty list of {{'role': ..., 'content': ...}}, got {messages!r:.80}"
        )
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or set(m) - {"role", "content", "name"}
            or "role" not in m
            or "content" not in m
        ):
            raise ValueError(f"message {i} must be a {{'role': ..., 'content': ...}} object, got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i}: role must be one of {ROLES}, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i}: content must be a string, got {type(m['content']).__name__}")
