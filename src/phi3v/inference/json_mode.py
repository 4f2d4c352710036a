"""JSON mode: constrained decoding that only lets through tokens keeping the answer a prefix of one JSON object.

A small incremental validator runs over the decoded text, one character at a time. Its state leaves out what can
no longer matter (the characters of a string, the digits of a number), so few distinct states occur and the
allowed-token mask of each is computed once, over the decoded text of every vocab token, and cached. Each state also
knows how many characters at least complete the value, so when the token budget runs short only tokens that still
let the object close in time are allowed; once it is complete, only a stop token is.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


WS = " \t\n\r"
MAX_DEPTH = 32  # deeper nesting is refused: every depth is new states to compute masks for
MASK_CACHE = 256  # states whose masks are kept (one int32 per vocab token each)
NEVER = 1 << 30  # the cost of a token that is never allowed
NUMBER_END = ("zero", "int", "frac", "exp_digits")  # number states that may end here
NUMBER_NEXT = {  # number state -> {character class -> next state}
    "minus": {"0": "zero", "1": "int"},
    "zero": {".": "dot", "e": "exp"},
    "int": {"0": "int", "1": "int", ".": "dot", "e": "exp"},
    "dot": {"0": "frac", "1": "frac"},
    "frac": {"0": "frac", "1": "frac", "e": "exp"},
    "exp": {"+": "exp_sign", "-": "exp_sign", "0": "exp_digits", "1": "exp_digits"},
    "exp_sign": {"0": "exp_digits", "1": "exp_digits"},
    "exp_digits": {"0": "exp_digits", "1": "exp_digits"},
}
LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
ESCAPES = set('"\\/bfnrt')
HEX = set("0123456789abcdefABCDEF")

# A state is (stack, mode, aux): stack holds "o" / "a" per open object / array; mode says what may come next;
# aux is the escape progress in a string, the number state, or the rest of a literal.
START = ("", "start", "")


def _char_class(ch: str) -> str:
    if ch == "0":
        return "0"
    if "1" <= ch <= "9":
        return "1"
    return "e" if ch in "eE" else ch


def _end_value(stack: str) -> tuple:
    return ("", "done", "") if not stack else (stack, "after", "")


def _start_value(stack: str, ch: str):
    if ch in "{[":
        return (stack + ("o" if ch == "{" else "a"), "obj_first" if ch == "{" else "arr_first", "") \
            if len(stack) < MAX_DEPTH else None
    if ch == '"':
        return (stack, "sval", "")
    if ch == "-":
        return (stack, "num", "minus")
    if "0" <= ch <= "9":
        return (stack, "num", "zero" if ch == "0" else "int")
    return (stack, "lit", LITERALS[ch]) if ch in LITERALS else None


def feed(state: tuple, ch: str):
    """The state after one more character, or None if the text is no longer a prefix of a JSON object."""
    stack, mode, aux = state
    if mode in ("skey", "sval"):
        if aux == "":
            if ch == '"':
                return (stack, "colon", "") if mode == "skey" else _end_value(stack)
            if ch == "\\":
                return (stack, mode, "\\")
            return state if ch >= " " else None  # control characters must be escaped
        if aux == "\\":
            return (stack, mode, "u0") if ch == "u" else (stack, mode, "") if ch in ESCAPES else None
        if ch not in HEX:
            return None
        k = int(aux[1]) + 1
        return (stack, mode, "" if k == 4 else f"u{k}")
    if mode == "num":
        nxt = NUMBER_NEXT[aux].get(_char_class(ch))
        if nxt is not None:
            return (stack, mode, nxt)
        return feed(_end_value(stack), ch) if aux in NUMBER_END else None
    if mode == "lit":
        if ch != aux[0]:
            return None
        return (stack, mode, aux[1:]) if len(aux) > 1 else _end_value(stack)
    if ch in WS:
        return state
    if mode == "start":
        return ("o", "obj_first", "") if ch == "{" else None  # the answer must be an object
    if mode == "done":
        return None
    if mode in ("obj_first", "obj_key"):
        if ch == '"':
            return (stack, "skey", "")
        return _end_value(stack[:-1]) if ch == "}" and mode == "obj_first" else None
    if mode == "colon":
        return (stack, "value", "") if ch == ":" else None
    if mode == "arr_first" and ch == "]":
        return _end_value(stack[:-1])
    if mode in ("value", "arr_first"):
        return _start_value(stack, ch)
    # mode == "after": a value just ended inside stack[-1]
    if ch == ",":
        return (stack, "obj_key" if stack[-1] == "o" else "value", "")
    if ch == ("}" if stack[-1] == "o" else "]"):
        return _end_value(stack[:-1])
    return None


def cost(state: tuple) -> int:
    """The fewest characters that complete the object from this state (each is one token: every ASCII character
    is a token of Llama-style vocabularies, as a piece or a byte-fallback token)."""
    stack, mode, aux = state
    if mode == "start":
        return 2  # {}
    if mode in ("skey", "sval"):
        rest = 1 if aux == "\\" else (4 - int(aux[1]) if aux else 0)
        return len(stack) + rest + (3 if mode == "skey" else 1)  # the closing quote, then :0 for a key
    local = {"obj_key": 4, "colon": 2, "value": 1, "lit": len(aux)}.get(mode, 0)  # "":0, :0, 0
    if mode == "num" and aux not in NUMBER_END:
        local = 1
    return len(stack) + local


def token_texts(tokenizer) -> list[str | None]:
    """The text each token id adds when decoded; None for special tokens and for byte-fallback tokens of non-ASCII
    bytes, which JSON mode never allows."""
    added = tokenizer.added_token_ids
    return [None if i in added else text for i, (text, _) in enumerate(tokenizer.vocab_pieces())]


def feed_text(state: tuple, text: str):
    for ch in text:
        state = feed(state, ch)
        if state is None:
            return None
    return state


class JsonVocab:
    """Per tokenizer, built once: each token's text, and the cached cost-after tensor of each validator state.
    Used from one thread (the server's engine thread)."""

    def __init__(self, tokenizer, n_logits: int):
        self.texts = token_texts(tokenizer)
        self.n_logits = n_logits  # the model's vocab (may be padded past the tokenizer's)
        self.stop_ids = sorted(i for i in tokenizer.stop_token_ids if i < n_logits)
        self.tokens = [(i, t) for i, t in enumerate(self.texts) if t]
        # inside a string, a token with no quote, backslash or control character keeps the state as it is
        self.plain = torch.zeros(n_logits, dtype=torch.bool)
        self.plain[[i for i, t in self.tokens if '"' not in t and "\\" not in t and min(t) >= " "]] = True
        self.tricky = [(i, t) for i, t in self.tokens if not self.plain[i]]
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def costs(self, state: tuple) -> torch.Tensor:
        """(V,) int32: for each token, the completion cost of the state after it (NEVER if not allowed)."""
        hit = self._cache.get(state)
        if hit is not None:
            self._cache.move_to_end(state)
            return hit
        out = torch.full((self.n_logits,), NEVER, dtype=torch.int32)
        if state[1] == "done":
            out[self.stop_ids] = 0
        else:
            tokens = self.tokens
            if state[1] in ("skey", "sval") and state[2] == "":
                out[self.plain] = cost(state)
                tokens = self.tricky
            ids, vals = [], []
            for i, text in tokens:
                nxt = feed_text(state, text)
                if nxt is not None:
                    ids.append(i)
                    vals.append(cost(nxt))
            out[ids] = torch.tensor(vals, dtype=torch.int32)
        self._cache[state] = out
        if len(self._cache) > MASK_CACHE:
            self._cache.popitem(last=False)
        return out

    def processor(self, budget: int) -> "JsonProcessor":
        return JsonProcessor(self, budget)


class JsonProcessor:
    """Logits processor of one request: fn(generated ids, logits (1, V)) -> logits, for Engine.add(processors=...).
    budget: the most tokens the request may generate, so that the object is closed before it runs out."""

    def __init__(self, vocab: JsonVocab, budget: int):
        self.vocab, self.budget = vocab, budget
        self.state, self.seen = START, 0

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        for token in generated[self.seen:]:
            text = self.vocab.texts[token] if token < len(self.vocab.texts) else None
            if self.state[1] != "done":
                nxt = feed_text(self.state, text or "")
                if nxt is None:
                    raise RuntimeError(f"JSON mode let through token {token} ({text!r}) that it should have masked")
                self.state = nxt
        self.seen = len(generated)
        costs = self.vocab.costs(self.state)[: logits.shape[-1]]
        left = self.budget - len(generated) - 1  # tokens after this one
        allowed = costs <= left
        if not bool(allowed.any()):  # too little budget left to close: come as close as possible
            allowed = costs == costs.min()
        return logits.masked_fill(~allowed, float("-inf"))

    @property
    def complete(self) -> bool:
        return self.state[1] == "done"
