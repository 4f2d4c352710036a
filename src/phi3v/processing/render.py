"""`render(tokenizer, conversation) -> (ids, loss_mask)`: the one contract shared by inference, training and evaluation.

The ids are what the model sees: the checkpoint's chat template, tokenized as `phi3v.load(...).prepare` does (text
models: the whole text; Phi-3-vision: chunk by chunk around `<|image_N|>` tags, a BOS per chunk, each tag becoming
a run of placeholder ids -N). The mask is 1 on the tokens the model is trained to produce: every assistant turn's
content and its `<|end|>`, never the prompt, the template's trailing newline or end-of-text.
"""

from __future__ import annotations

from collections.abc import Sequence

from phi3v.errors import InputError
from phi3v.processing.prompts import IMAGE_TAG, tokenize_with_images, with_image_tags
from phi3v.processing.tokenizer import END_OF_TURN, Tokenizer

Messages = list[dict]


def tag_images(conversation: Messages) -> Messages:
    """A copy where each message's "images" list became `<|image_N|>` tags (numbered across the conversation) in
    front of its content, as `prepare` does; messages without "images" are copied as they are."""
    out, seen = [], 0
    for m in conversation:
        if not isinstance(m, dict):
            raise InputError(f"a conversation is a list of {{'role', 'content'}} dicts, got {m!r}")
        m = dict(m)
        images = m.pop("images", None) or []
        if images:
            m["content"] = with_image_tags(str(m.get("content", "")), seen + 1, len(images))
        seen += len(images)
        out.append(m)
    return out


def render(tokenizer: Tokenizer, conversation: Messages, num_image_tokens: Sequence[int] = (), *,
           vision: bool = False, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 = assistant token) of a conversation. `num_image_tokens[k]` is the placeholder
    count of image k+1; `vision` selects the Phi-3-vision tokenization. With `add_generation_prompt` the ids end
    with the assistant prompt and equal `prepare(...)`'s; the mask is then all 0."""
    msgs = tag_images(conversation)
    counts = list(num_image_tokens)
    if not vision and counts:
        raise InputError("a text model cannot take images: drop the images or train a Phi-3-vision checkpoint")

    def tokens(part: Messages, gen: bool) -> list[int]:
        text = tokenizer.apply_chat_template(part, add_generation_prompt=gen, tokenize=False)
        if not vision:
            return tokenizer.encode(text)
        n = len(IMAGE_TAG.findall(text))  # the images tagged so far are 1..n (image_tags checks it)
        return tokenize_with_images(tokenizer, text, counts[:n])

    if add_generation_prompt:
        ids = tokens(msgs, True)
        _check_all_tagged(ids, counts)
        return ids, [0] * len(ids)
    ids = tokens(msgs, False)
    _check_all_tagged(ids, counts)
    mask = [0] * len(ids)
    end = tokenizer.token_to_id(END_OF_TURN)
    for i, m in enumerate(msgs):
        if m.get("role") != "assistant":
            continue
        if i == 0:
            raise InputError("the conversation starts with an assistant turn: begin with a system or user message")
        prompt = tokens(msgs[:i], True)  # what a generation of turn i starts from
        start = len(prompt)
        if prompt != ids[:start]:
            raise InputError(f"the chat template does not render turn {i} after the assistant prompt it generates "
                             "from; fix the conversation's roles (user, assistant, user, ...)")
        stop = next((j for j in range(start, len(ids)) if ids[j] == end), None)
        if stop is None:
            raise InputError(f"assistant turn {i} has no {END_OF_TURN} in the rendered template")
        mask[start:stop + 1] = [1] * (stop + 1 - start)
    return ids, mask


def _check_all_tagged(ids: list[int], counts: list[int]) -> None:
    tagged = {-t for t in ids if t < 0}
    if len(tagged) != len(counts):
        raise InputError(f"the conversation tags {len(tagged)} image(s) but {len(counts)} image(s) were given")
