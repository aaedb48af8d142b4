"""The routing token: an added special token after the question whose hidden state routers read (DPN's
`<ROUTER>`). Attention is causal, so at that point it has seen the image and the question."""

from __future__ import annotations

from typing import Any

from torch import nn

ROUTER_TOKEN = "<ROUTER>"


def add_routing_token(tokenizer: Any, model: nn.Module, token: str = ROUTER_TOKEN) -> int:
    """Add `token` to the tokenizer (or a processor's tokenizer) as a special token, grow the model's input
    embeddings (and tied output head) to match, and return its id: pass it as `DPN(routing_token_id=...)`."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    tokenizer.add_tokens([token], special_tokens=True)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return tokenizer.convert_tokens_to_ids(token)


def with_routing_token(question: str, token: str = ROUTER_TOKEN) -> str:
    """The question with the routing token after it; build the chat prompt around the result."""
    return f"{question.rstrip()}{token}"
