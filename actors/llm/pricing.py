"""What a completion cost: list prices in USD per 1M tokens, so every ``llm.completed`` event carries its cost.

Models are matched by name, also with a date or version suffix (``gpt-4o-2024-08-06`` is priced as ``gpt-4o``).
Unknown models and self-hosted endpoints cost 0. The scripted provider is priced as the model it stands in for,
so budgets can be exercised without an API."""

from __future__ import annotations

from pydantic import BaseModel


class ModelPrice(BaseModel):
    input_per_mtok: float
    output_per_mtok: float


def _p(input_per_mtok: float, output_per_mtok: float) -> ModelPrice:
    return ModelPrice(input_per_mtok=input_per_mtok, output_per_mtok=output_per_mtok)


PRICES: dict[str, ModelPrice] = {
    # OpenAI
    "gpt-4o": _p(2.50, 10.00),
    "gpt-4o-mini": _p(0.15, 0.60),
    "gpt-4.1": _p(2.00, 8.00),
    "gpt-4.1-mini": _p(0.40, 1.60),
    "gpt-4.1-nano": _p(0.10, 0.40),
    "gpt-5": _p(1.25, 10.00),
    "gpt-5-mini": _p(0.25, 2.00),
    "gpt-5-nano": _p(0.05, 0.40),
    "o3": _p(2.00, 8.00),
    "o3-mini": _p(1.10, 4.40),
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
}

# Providers that run models on our own hardware: their tokens cost nothing per call.
LOCAL_PROVIDERS = frozenset({"openai_compatible"})


def price_of(model: str) -> ModelPrice | None:
    """The price of ``model``: an exact name, else the longest listed name it extends with ``-suffix``."""
    name = model.rsplit("/", 1)[-1].lower()  # "openai/gpt-4o" as gateways spell it
    if name in PRICES:
        return PRICES[name]
    best = max((k for k in PRICES if name.startswith(k + "-")), key=len, default=None)
    return PRICES[best] if best else None


def cost_usd(provider: str, model: str, prompt_tokens: int, completion_tokens: int) -> float:
    if provider in LOCAL_PROVIDERS:
        return 0.0
    price = price_of(model)
    if price is None:
        return 0.0
    return round((prompt_tokens * price.input_per_mtok + completion_tokens * price.output_per_mtok) / 1_000_000, 10)
