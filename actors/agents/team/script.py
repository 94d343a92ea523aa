"""The scripted team: deterministic answers for every prompt the team makes, so the TDD demo and the tests
run the whole flow (QA tests → a failing first attempt → a fix → review → merge) without an LLM.

Rules match the ``PHASE=…`` line the roles put first in their prompts (actors/agents/team/roles.py)."""

from __future__ import annotations

from actors.llm.providers import ScriptRule

SLUG_TESTS = """from slugify_util import slugify


def test_lowercases_and_joins_words():
    assert slugify("Hello World") == "hello-world"


def test_drops_punctuation():
    assert slugify("Rent a car, now!") == "rent-a-car-now"


def test_collapses_spaces():
    assert slugify("  many   spaces ") == "many-spaces"
"""

NAIVE_SLUGIFY = """def slugify(text: str) -> str:
    return text.lower().replace(" ", "-")
"""

GOOD_SLUGIFY = '''import re


def slugify(text: str) -> str:
    """Lowercase words joined by single dashes; punctuation dropped."""
    return "-".join(re.findall(r"[a-z0-9]+", text.lower()))
'''

TEAM_SCRIPT: list[ScriptRule] = [
    ScriptRule(pattern=r"PHASE=tests", structured={"files": {"tests/test_slugify.py": SLUG_TESTS}}),
    ScriptRule(
        pattern=r"PHASE=code ROLE=developer ATTEMPT=1 ", structured={"files": {"slugify_util.py": NAIVE_SLUGIFY}}
    ),
    ScriptRule(pattern=r"PHASE=code ROLE=developer", structured={"files": {"slugify_util.py": GOOD_SLUGIFY}}),
    ScriptRule(pattern=r"PHASE=work .*ATTEMPT=1 ", text="A first draft: the plan lists the cars but no prices."),
    ScriptRule(pattern=r"PHASE=work ", text="The plan: cars, prices per day, insurance options and a launch date."),
    ScriptRule(
        pattern=r"PHASE=validate (?s:.*)no prices",
        structured={"valid": False, "score": 4, "issues": ["prices are missing"]},
    ),
    ScriptRule(pattern=r"PHASE=validate", structured={"valid": True, "score": 8.5, "issues": []}),
    ScriptRule(pattern=r"PHASE=review", structured={"approved": True, "comments": "Looks good; merge it."}),
    ScriptRule(
        pattern=r"PHASE=generate",
        structured={
            "tasks": [
                {
                    "title": "Price list for the summer fleet",
                    "description": "Daily prices for every car class.",
                    "role": "cfo",
                    "priority": 1,
                },
                {
                    "title": "Check the rental contract template",
                    "description": "Deposit and insurance clauses.",
                    "role": "legal",
                    "priority": 5,
                },
            ]
        },
    ),
    ScriptRule(
        pattern=r"PHASE=verdict ROLE=cfo",
        structured={
            "criteria": ["payback under 12 months", "cash reserve stays above 3 months"],
            "verdict": "approve",
            "rationale": "Pays back in 9 months.",
        },
    ),
    ScriptRule(
        pattern=r"PHASE=verdict ROLE=risk",
        structured={
            "criteria": ["loss probability", "insurance coverage"],
            "verdict": "conditional",
            "rationale": "Only with full insurance on the new cars.",
        },
    ),
    ScriptRule(
        pattern=r"PHASE=verdict ROLE=legal",
        structured={
            "criteria": ["licences", "contract terms"],
            "verdict": "approve",
            "rationale": "Leasing contracts are standard.",
        },
    ),
    ScriptRule(
        pattern=r"PHASE=verdict ",
        structured={
            "criteria": ["maintenance load", "booking system capacity"],
            "verdict": "approve",
            "rationale": "The systems can take 20 more cars.",
        },
    ),
    ScriptRule(
        pattern=r"PHASE=decide",
        structured={"decision": "approve", "rationale": "Approved, with full insurance as Risk asks."},
    ),
]
