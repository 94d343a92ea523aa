"""What a completion cost: list prices in USD per 1M tokens, so every ``llm.completed`` event carries its cost.

Models are matched by name, also with a date or variant suffix (``gpt-4o-2024-08-06`` is priced as ``gpt-4o``,
``claude-sonnet-4-5@20250929`` as ``claude-sonnet-4-5``). A point version is listed on its own (``gpt-5.1``):
it is a new model, whose price may differ from its family's. Self-hosted endpoints cost 0; so do unknown models,
with a warning, as a budget cannot count them. The scripted provider is priced as the model it stands in for, so
budgets can be exercised without an API."""

from __future__ import annotations

from functools import lru_cache

import structlog
from pydantic import BaseModel

log = structlog.get_logger(__name__)


class ModelPrice(BaseModel):
    input_per_mtok: float
    output_per_mtok: float


def _p(input_per_mtok: float, output_per_mtok: float) -> ModelPrice:
    return ModelPrice(input_per_mtok=input_per_mtok, output_per_mtok=output_per_mtok)


PRICES: dict[str, ModelPrice] = {
    # OpenAI
    "gpt-4o": _p(2.50, 10.00),
    "gpt-4o-mini": _p(0.15, 0.60),
    "chatgpt-4o-latest": _p(5.00, 15.00),
    "gpt-4-turbo": _p(10.00, 30.00),
    "gpt-4.1": _p(2.00, 8.00),
    "gpt-4.1-mini": _p(0.40, 1.60),
    "gpt-4.1-nano": _p(0.10, 0.40),
    "gpt-5": _p(1.25, 10.00),
    "gpt-5-mini": _p(0.25, 2.00),
    "gpt-5-nano": _p(0.05, 0.40),
    "gpt-5-pro": _p(15.00, 120.00),
    "gpt-5.1": _p(1.25, 10.00),
    # a smaller model behind a family's name: priced as gpt-5.1 it cost five times its list price
    "gpt-5.1-codex-mini": _p(0.25, 2.00),
    "codex-mini": _p(1.50, 6.00),
    "o1": _p(15.00, 60.00),
    "o1-mini": _p(1.10, 4.40),
    "o1-pro": _p(150.00, 600.00),
    "o3": _p(2.00, 8.00),
    "o3-mini": _p(1.10, 4.40),
    "o3-pro": _p(20.00, 80.00),
    "o4-mini": _p(1.10, 4.40),
    # Anthropic
    "claude-3-5-sonnet": _p(3.00, 15.00),
    "claude-3-7-sonnet": _p(3.00, 15.00),
    "claude-sonnet-4": _p(3.00, 15.00),
    "claude-sonnet-4-5": _p(3.00, 15.00),
    "claude-3-5-haiku": _p(0.80, 4.00),
    "claude-3-haiku": _p(0.25, 1.25),
    "claude-haiku-4-5": _p(1.00, 5.00),
    "claude-opus-4": _p(15.00, 75.00),
    "claude-opus-4-1": _p(15.00, 75.00),
    "claude-opus-4-5": _p(5.00, 25.00),
    "claude-3-opus": _p(15.00, 75.00),
}

# Providers that run models on our own hardware: their tokens cost nothing per call.
LOCAL_PROVIDERS = frozenset({"openai_compatible"})
# Providers that bill per token: a model of theirs with no price here is spending a budget cannot see.
PAID_PROVIDERS = frozenset({"openai", "anthropic"})
# What a suffix starts with: a date or variant (``-2024-08-06``, ``-latest``), or a Vertex AI version (``@…``).
_SUFFIX = ("-", "@")
_unpriced: set[tuple[str, str]] = set()


@lru_cache(maxsize=1024)  # asked at every completion; an unlisted name walks the whole list
def price_of(model: str) -> ModelPrice | None:
    """The price of ``model``: an exact name, else the longest listed name it extends with a suffix."""
    name = model.rsplit("/", 1)[-1].lower()  # "openai/gpt-4o" as gateways spell it
    if name in PRICES:
        return PRICES[name]
    best = max((k for k in PRICES if name.startswith(tuple(k + s for s in _SUFFIX))), key=len, default=None)
    return PRICES[best] if best else None


def cost_usd(provider: str, model: str, prompt_tokens: int, completion_tokens: int) -> float:
    if provider in LOCAL_PROVIDERS:
        return 0.0
    price = price_of(model)
    if price is None:
        if provider in PAID_PROVIDERS and (provider, model) not in _unpriced:
            _unpriced.add((provider, model))  # once per model: every completion would repeat it
            log.warning(
                "llm.model_unpriced",
                provider=provider,
                model=model,
                detail="no list price for this model (actors/llm/pricing.py): its completions are recorded as "
                "costing $0, so no budget counts them",
            )
        return 0.0
    return round((prompt_tokens * price.input_per_mtok + completion_tokens * price.output_per_mtok) / 1_000_000, 10)
