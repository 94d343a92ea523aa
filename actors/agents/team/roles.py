"""The roles of the team (seed 004). A role is a config (prompt, model, temperature, tools) plus a behaviour
class that writes its prompts; adding a role is adding a config and a class to ``ROLES``.

Prompts start with a ``PHASE=…`` line: real models ignore it, the scripted provider's rules match on it."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, Field

VALIDATION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "valid": {"type": "boolean"},
        "score": {"type": "number", "minimum": 0, "maximum": 10},
        "issues": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["valid", "score", "issues"],
    "additionalProperties": False,
}
FILES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"files": {"type": "object", "additionalProperties": {"type": "string"}}},
    "required": ["files"],
    "additionalProperties": False,
}
REVIEW_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"approved": {"type": "boolean"}, "comments": {"type": "string"}},
    "required": ["approved", "comments"],
    "additionalProperties": False,
}
VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "criteria": {"type": "array", "items": {"type": "string"}},
        "verdict": {"type": "string", "enum": ["approve", "reject", "conditional"]},
        "rationale": {"type": "string"},
    },
    "required": ["criteria", "verdict", "rationale"],
    "additionalProperties": False,
}
TASKS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "tasks": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "title": {"type": "string"},
                    "description": {"type": "string"},
                    "role": {"type": "string"},
                    "priority": {"type": "integer"},
                },
                "required": ["title", "description", "role", "priority"],
            },
        }
    },
    "required": ["tasks"],
}


class RoleConfig(BaseModel):
    name: str
    title: str
    system_prompt: str
    model: str = "scripted"
    temperature: float = Field(0.2, ge=0, le=2)
    max_tokens: int = 2048
    tools: list[str] = Field(default_factory=list)
    reviewer: str = "tech_lead"
    escalate_to: str = "ceo"


class Role:
    """Behaviour shared by every role: do the work, judge it, review a peer's work, give a verdict."""

    config: ClassVar[RoleConfig]

    def work_prompt(self, task: Any, attempt: int, approach: int, feedback: list[str]) -> str:
        lines = [f"PHASE=work ROLE={self.config.name} ATTEMPT={attempt} APPROACH={approach}", f"Task: {task.title}"]
        if task.description:
            lines.append(task.description)
        if approach > 1:
            lines.append("Earlier attempts did not pass validation: take a different approach.")
        lines += [f"Fix: {f}" for f in feedback]
        return "\n".join(lines)

    def validate_prompt(self, task: Any, output: str) -> str:
        return (
            f"PHASE=validate ROLE={self.config.name}\nTask: {task.title}\nResult:\n{output}\n"
            "Score the result from 0 to 10, list its issues, and say whether it is valid."
        )

    def review_prompt(self, task: Any, output: str) -> str:
        return (
            f"PHASE=review ROLE={self.config.name}\nReview a colleague's work on: {task.title}\n{output}\n"
            "Approve it or ask for changes."
        )

    def verdict_prompt(self, question: str) -> str:
        return (
            f"PHASE=verdict ROLE={self.config.name}\nQuestion for the team: {question}\n"
            f"As the {self.config.title}, set your own criteria, then give approve, reject or conditional."
        )

    # The TDD phases are QA's and the developer's; any role can take them over when a task is escalated to it.

    def tests_prompt(self, task: Any) -> str:
        return (
            f"PHASE=tests ROLE={self.config.name}\nTask: {task.title}\n{task.description}\n"
            "Write pytest tests for it first."
        )

    def code_prompt(self, task: Any, attempt: int, approach: int, tests: dict[str, str], failures: list[str]) -> str:
        lines = [f"PHASE=code ROLE={self.config.name} ATTEMPT={attempt} APPROACH={approach}", f"Task: {task.title}"]
        lines.append(task.description)
        lines += [f"Test file {path}:\n{content}" for path, content in sorted(tests.items())]
        if approach > 1:
            lines.append("The previous approach kept failing: use a different approach.")
        lines += [f"Failing: {f}" for f in failures]
        lines.append("Answer with the files that make these tests pass.")
        return "\n".join(lines)


def _role(name: str, title: str, prompt: str, **kw: Any) -> type[Role]:
    return type(
        title.replace(" ", ""), (Role,), {"config": RoleConfig(name=name, title=title, system_prompt=prompt, **kw)}
    )


class CEO(Role):
    config = RoleConfig(
        name="ceo",
        title="Chief Executive Officer",
        system_prompt="You run the company: turn the strategy into tasks and decide after hearing your team.",
        reviewer="product",
    )

    def generate_prompt(self, goal: str, strategy: list[str], done: list[str], room: int) -> str:
        return (
            f"PHASE=generate ROLE=ceo\nGoal: {goal}\nStrategy:\n"
            + "\n".join(f"- {s}" for s in strategy)
            + "\nAlready done:\n"
            + "\n".join(f"- {d}" for d in done)
            + f"\nThe team is idle. Create at most {room} new tasks (title, description, role, priority 1/5/10)."
        )

    def decide_prompt(
        self, question: str, verdicts: dict[str, dict[str, Any]], failed: dict[str, str] | None = None
    ) -> str:
        lines = [f"PHASE=decide ROLE=ceo\nQuestion: {question}"]
        lines += [f"- {role}: {v['verdict']} ({v['rationale']})" for role, v in sorted(verdicts.items())]
        lines += [f"- {role}: gave no verdict" for role in sorted(failed or {})]
        lines.append("Decide: approve, reject or conditional, with your rationale.")
        return "\n".join(lines)


class Developer(Role):
    config = RoleConfig(
        name="developer",
        title="Developer",
        system_prompt="You write clean, tested Python. Answer with the full content of every file you change.",
        tools=["filesystem", "git", "test_runner"],
    )


class QA(Role):
    config = RoleConfig(
        name="qa",
        title="QA Engineer",
        system_prompt="You write the tests first: pytest files that pin down the behaviour asked for.",
        tools=["filesystem", "test_runner"],
    )


CFO = _role("cfo", "Chief Financial Officer", "You guard the money: costs, revenue, runway.")
Product = _role("product", "Product Manager", "You own the product: users, scope and priorities.")
TechLead = _role("tech_lead", "Tech Lead", "You review code and architecture and keep quality high.", reviewer="ceo")
Risk = _role("risk", "Risk Officer", "You find what can go wrong and how likely and costly it is.")
Legal = _role("legal", "Legal Counsel", "You check contracts, licences, privacy and compliance.")
Security = _role("security", "Security Engineer", "You look for vulnerabilities and protect data and secrets.")

ROLES: dict[str, Role] = {
    cls.config.name: cls()
    for cls in (CEO, CFO, Developer, QA, Product, TechLead, Risk, Legal, Security)  # type: ignore[misc]
}
VOTERS = ("cfo", "risk", "legal", "tech_lead")  # the seed's V-team: Finance, Risk, Legal, Tech Lead


def role(name: str) -> Role:
    try:
        return ROLES[name]
    except KeyError:
        raise KeyError(f"unknown role {name!r}; roles: {', '.join(sorted(ROLES))}") from None
