"""An outline of a Python module (classes, functions, methods with signatures and docstrings) from the stdlib ``ast``.

Agents read the outline instead of whole files to find where to edit, which keeps their context small.
"""

from __future__ import annotations

import ast
from pathlib import PurePath
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel

if TYPE_CHECKING:
    from actors.tools.filesystem import Workspace

Kind = Literal["class", "function", "async function", "method", "async method"]


class OutlineError(ValueError):
    """The source does not parse; carries the line so the agent can go and fix it."""

    def __init__(self, message: str, *, line: int | None, column: int | None = None, path: str | None = None):
        where = f"{path}:" if path else ""
        where += f"line {line}" if line is not None else "unknown line"
        super().__init__(f"{where}: {message}")
        self.line = line
        self.column = column
        self.path = path


class OutlineItem(BaseModel):
    kind: Kind
    name: str
    qualname: str
    line: int
    end_line: int
    signature: str
    docstring: str | None = None
    decorators: list[str] = []
    depth: int = 0


def _arg(arg: ast.arg, default: ast.expr | None) -> str:
    text = arg.arg + (f": {ast.unparse(arg.annotation)}" if arg.annotation else "")
    if default is not None:
        text += (" = " if arg.annotation else "=") + ast.unparse(default)
    return text


def _arguments(a: ast.arguments) -> str:
    """PEP 8 spacing (``x: int = 1``, ``y=2``) as ``inspect.signature`` shows it; ``ast.unparse`` gives ``x: int=1``."""
    positional = a.posonlyargs + a.args
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    parts: list[str] = []
    for i, (arg, default) in enumerate(zip(positional, defaults, strict=True)):
        parts.append(_arg(arg, default))
        if i == len(a.posonlyargs) - 1:
            parts.append("/")
    if a.vararg:
        parts.append("*" + _arg(a.vararg, None))
    elif a.kwonlyargs:
        parts.append("*")
    parts += [_arg(arg, default) for arg, default in zip(a.kwonlyargs, a.kw_defaults, strict=True)]
    if a.kwarg:
        parts.append("**" + _arg(a.kwarg, None))
    return ", ".join(parts)


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> str:
    if isinstance(node, ast.ClassDef):
        bases = [ast.unparse(b) for b in node.bases] + [ast.unparse(k) for k in node.keywords]
        return f"class {node.name}({', '.join(bases)})" if bases else f"class {node.name}"
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    type_params = getattr(node, "type_params", None)  # 3.12+ generics: def f[T](...)
    generic = f"[{', '.join(ast.unparse(t) for t in type_params)}]" if type_params else ""
    returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    return f"{prefix} {node.name}{generic}({_arguments(node.args)}){returns}"


def _first_line(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> str | None:
    doc = ast.get_docstring(node)
    if not doc:
        return None
    return doc.strip().splitlines()[0].strip()


def _walk(body: list[ast.stmt], prefix: str, in_class: bool, depth: int, out: list[OutlineItem]) -> None:
    for node in body:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        kind: Kind
        if isinstance(node, ast.ClassDef):
            kind = "class"
        elif isinstance(node, ast.AsyncFunctionDef):
            kind = "async method" if in_class else "async function"
        else:
            kind = "method" if in_class else "function"
        qualname = f"{prefix}{node.name}"
        out.append(
            OutlineItem(
                kind=kind,
                name=node.name,
                qualname=qualname,
                line=node.lineno,
                end_line=node.end_lineno or node.lineno,
                signature=_signature(node),
                docstring=_first_line(node),
                decorators=[ast.unparse(d) for d in node.decorator_list],
                depth=depth,
            )
        )
        # Nested classes and their methods are part of the outline; function bodies are not (locals are detail).
        if isinstance(node, ast.ClassDef):
            _walk(node.body, f"{qualname}.", True, depth + 1, out)


def outline(source: str, *, path: str | None = None) -> list[OutlineItem]:
    """Classes, functions and methods of ``source`` in source order; raises OutlineError on a syntax error."""
    try:
        tree = ast.parse(source, filename=path or "<source>")
    except SyntaxError as e:
        raise OutlineError(e.msg, line=e.lineno, column=e.offset, path=path) from e
    except ValueError as e:  # e.g. null bytes in the source
        raise OutlineError(str(e), line=None, path=path) from e
    out: list[OutlineItem] = []
    _walk(tree.body, "", False, 0, out)
    return out


def outline_file(ws: Workspace, rel: str | PurePath) -> list[OutlineItem]:
    """Outline of a file read through the confined workspace (so the path rules apply)."""
    return outline(ws.read(rel), path=PurePath(rel).as_posix())
