"""One /metrics page for the whole system: every actor's registry, merged with an ``actor`` label."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def _fmt_labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_esc(v)}"' for k, v in sorted(labels.items()))
    return "{" + body + "}"


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _with_actor(labels: dict[str, str], actor: str) -> dict[str, str]:
    """``labels`` plus ``actor=<the process that exported it>``. A metric that has an ``actor`` label of its own
    (the orchestrator's restarts, labelled with the restarted actor) keeps it, and the process goes under
    ``source`` instead (``exported_source`` and so on if that is taken too): overwriting it would fold every
    restarted actor's series into one."""
    name = "actor"
    while name in labels:
        name = "source" if name == "actor" else f"exported_{name}"
    return {**labels, name: actor}


def merge_expositions(pages: dict[str, bytes]) -> str:
    """Merge Prometheus text pages from several processes into one valid page."""
    families: dict[str, tuple[str, str, list[Sample]]] = {}
    for actor, page in pages.items():
        for fam in text_string_to_metric_families(page.decode()):
            if fam.name.startswith(("python_", "process_")) and actor != "ingress":
                continue  # runtime metrics of each worker process would only repeat per actor
            entry = families.setdefault(fam.name, (fam.type, fam.documentation, []))
            entry[2].extend(s._replace(labels=_with_actor(s.labels, actor)) for s in fam.samples)
    lines: list[str] = []
    for name, (typ, doc, samples) in families.items():
        lines.append(f"# HELP {name} {doc}")
        lines.append(f"# TYPE {name} {typ}")
        lines.extend(f"{s.name}{_fmt_labels(s.labels)} {s.value}" for s in samples)
    return "\n".join(lines) + "\n"
