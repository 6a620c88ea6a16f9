"""Reading a Compose file as Compose does, for :mod:`supervisor.importers.compose`.

- **Which Compose** the host has (:func:`detect_compose`): ``HOSTVISOR_COMPOSE=v1|v2`` in
  the import's environment decides (importing on one host for another, tests); otherwise
  ``docker compose version`` answering means v2 (the docker CLI plugin), else
  ``docker-compose version`` tells v1 (1.x, Debian 12's 1.29) from a standalone v2;
  neither found: v2.
- **Project name** (:func:`project_name`). v2 (docs.docker.com/compose/how-tos/project-name,
  compose-go ``loader.NormalizeProjectName``): ``COMPOSE_PROJECT_NAME`` (the environment,
  else the ``.env`` file beside the Compose file) > the top-level ``name:`` > the folder's
  name, lower-cased, only ``[a-z0-9_-]`` kept, leading ``_``/``-`` stripped. v1
  (docker-compose 1.29, ``compose/cli/command.py`` ``get_project_name``):
  ``COMPOSE_PROJECT_NAME`` > the folder's name, lower-cased, only ``[-_a-z0-9]`` kept (1.29
  rejects a top-level ``name``).
- **Container names** (:func:`container_name`): ``container_name``, else v2
  ``PROJECT-SERVICE-1``, v1 ``PROJECT_SERVICE_1`` with the project's leading ``-``/``_``
  stripped (1.29 ``compose/service.py`` ``build_container_name``).
- **YAML** (:func:`load`) as Compose v2 reads it (YAML 1.2, compose-go): ``no``/``on`` are
  strings, not booleans, ``22:22`` is not a base-60 number, a key given twice is an error.
- **Interpolation** (:func:`interpolate`, the Compose Specification's): ``$VAR``,
  ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:+other}``, ``${VAR?error}``,
  ``$$``; the environment wins over ``.env`` (:func:`read_dotenv`).

PyYAML is imported inside :func:`load` (the daemon never loads it).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from typing import Any

from supervisor.importers import ImportFailed

__all__ = [
    "V1",
    "V2",
    "container_name",
    "detect_compose",
    "duration_text",
    "interpolate",
    "load",
    "override_file",
    "project_name",
    "read_dotenv",
    "seconds",
]

#: The command that runs each Compose.
V2 = ("docker", "compose")
V1 = ("docker-compose",)
#: Seconds a ``version`` call may take at import time.
VERSION_TIMEOUT = 5.0
#: The file names ``docker compose up`` reads without ``-f``, and their override files
#: (1.29 ``compose/config/config.py`` ``SUPPORTED_FILENAMES``, ``DEFAULT_OVERRIDE_FILENAMES``).
DEFAULT_NAMES = ("docker-compose.yml", "docker-compose.yaml", "compose.yml", "compose.yaml")
OVERRIDES = (
    "docker-compose.override.yml",
    "docker-compose.override.yaml",
    "compose.override.yml",
    "compose.override.yaml",
)

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|(?P<plain>[A-Za-z_][A-Za-z0-9_]*)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>(?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*))?\}"
    r"|(?P<invalid>\{))"
)
_REFUSED = "import refuses it"
#: Bounds of a Compose file's YAML: nodes once aliases are expanded, and nesting depth
#: (a real file has a few thousand nodes, nested less than ten deep).
MAX_NODES = 100_000
MAX_DEPTH = 64
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def detect_compose(environ: Mapping[str, str]) -> tuple[str, tuple[str, ...], str]:
    """Which Compose this host has: ``("v2" | "v1", the command, how it was told)``.

    ``HOSTVISOR_COMPOSE=v1|v2`` forces it. Else ``docker compose version --short`` exiting
    0 is v2 (:data:`V2`); else ``docker-compose version --short`` is v1 for ``1.x`` and v2
    for a standalone v2 binary (:data:`V1`, the command, either way). Each call may take
    :data:`VERSION_TIMEOUT` seconds, in ``environ`` (its ``PATH``). Neither found: v2.

    Raises:
        ImportFailed: ``HOSTVISOR_COMPOSE`` is set to something else.
    """
    forced = environ.get("HOSTVISOR_COMPOSE", "").strip().lower()
    if forced in ("v1", "v2"):
        return forced, (V1 if forced == "v1" else V2), f"HOSTVISOR_COMPOSE={forced}"
    if forced:
        raise ImportFailed(f"HOSTVISOR_COMPOSE={forced!r}: expected v1 or v2")
    return _detect(tuple(sorted(environ.items())))


@functools.lru_cache(maxsize=4)
def _detect(items: tuple[tuple[str, str], ...]) -> tuple[str, tuple[str, ...], str]:
    """:func:`detect_compose` once per environment: an import of several files asks once."""
    environ = dict(items)
    path = environ.get("PATH", os.defpath)
    docker = shutil.which("docker", path=path)
    answer = _version((docker, "compose", "version", "--short"), environ) if docker else None
    if answer is not None:
        return "v2", V2, f"`docker compose version`: {answer}"
    legacy = shutil.which("docker-compose", path=path)
    if legacy is None:
        return "v2", V2, "neither `docker compose` nor `docker-compose` found here: assumed v2"
    answer = _version((legacy, "version", "--short"), environ)
    if answer is None:
        return "v1", V1, "`docker-compose version` did not answer: assumed v1"
    major = re.match(r"v?(\d+)", answer)
    if major is not None and int(major.group(1)) >= 2:
        return "v2", V1, f"`docker-compose version`: {answer}, a standalone v2"
    return "v1", V1, f"`docker-compose version`: {answer}"


def _version(argv: tuple[str, ...], environ: Mapping[str, str]) -> str | None:
    """The first line ``argv`` prints, if it exits 0 within the time limit."""
    try:
        done = subprocess.run(
            argv,
            env=dict(environ),
            capture_output=True,
            text=True,
            timeout=VERSION_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines()
    return (lines[0].strip() or "?") if done.returncode == 0 and lines else None


def project_name(
    doc: Mapping[str, Any], version: str, env: Mapping[str, str], folder: str
) -> tuple[str, str, list[tuple[str, str]]]:
    """The project name Compose ``version`` gives the file ``doc`` in ``folder``:
    ``(name, where it came from, [(setting, reason)] not used)`` (module docstring).

    Raises:
        ImportFailed: the name comes out empty (a folder name of other characters only).
    """
    keep = "[^a-z0-9_-]" if version == "v2" else "[^-_a-z0-9]"

    def normal(text: str) -> str:
        name = re.sub(keep, "", text.lower())
        return name.lstrip("_-") if version == "v2" else name

    unused: list[tuple[str, str]] = []
    given, why = env.get("COMPOSE_PROJECT_NAME", ""), "COMPOSE_PROJECT_NAME"
    top = doc.get("name")
    if top is not None and version == "v1":
        why_not = (
            "docker-compose 1.29 refuses a top-level name ('name' does not match any of the "
            "regexes: '^x-'): remove it, or recreate_command fails"
        )
        unused.append((f"name: {top}", why_not))
    elif top is not None and not isinstance(top, str):
        unused.append(("name", "not a string"))
    elif top and given:
        unused.append((f"name: {top}", "COMPOSE_PROJECT_NAME takes precedence"))
    elif top:
        given, why = top, "the top-level name"
    if given and version == "v2" and normal(given) != given:
        why_not = f"not a valid v2 project name (Compose refuses it): {normal(given)!r} used"
        unused.append((f"{why}: {given}", why_not))
    if not given:
        given, why = os.path.basename(folder.rstrip("/")), f"the folder's name, {folder}"
    name = normal(given)
    if not name:
        raise ImportFailed(
            f"the project name from {why} is empty once normalised; "
            "set COMPOSE_PROJECT_NAME or a top-level name"
        )
    return name, why, unused


def container_name(project: str, service: str, body: Mapping[str, Any], version: str) -> str:
    """``container_name``, else ``PROJECT-SERVICE-1`` (v2) or ``PROJECT_SERVICE_1`` (v1)."""
    given = body.get("container_name")
    if isinstance(given, str) and given:
        return given
    sep = "-" if version == "v2" else "_"
    return f"{project.lstrip('-_')}{sep}{service}{sep}1"


def read_dotenv(path: str) -> dict[str, str]:
    """The ``KEY=VALUE`` lines of a Compose ``.env`` file (``export``, quotes, ``#``
    comments); ``{}`` when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read(1024**2)
    except (OSError, UnicodeDecodeError):
        return {}
    found: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip().removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        if not sep or not key.strip() or key.startswith("#"):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        found[key.strip()] = value
    return found


def override_file(path: str) -> str | None:
    """The override file a plain ``up`` reads with ``path`` (a default-named Compose file),
    if one exists beside it."""
    if os.path.basename(path) not in DEFAULT_NAMES:
        return None
    folder = os.path.dirname(path)
    for name in OVERRIDES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def seconds(value: object) -> float | None:
    """A Compose duration (``"1m30s"``, ``"500ms"``, ``"2h"``, a number of seconds) in
    seconds; ``None`` if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if value >= 0 else None
    text = str(value).strip()
    total, position = 0.0, 0
    for match in _DURATION.finditer(text):
        if match.start() != position:
            return None
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    return total if text and position == len(text) else None


def duration_text(value: float) -> str:
    """Seconds as a unit file writes a duration: ``"30s"``, ``"1.5s"``, ``"250ms"``."""
    if value >= 1 or value == 0:
        return f"{value:g}s"
    return f"{max(1, round(value * 1000))}ms"


def interpolate(doc: Any, env: Mapping[str, str]) -> tuple[Any, set[str], set[str], list[str]]:
    """``doc`` with every string value (not key) interpolated from ``env``:
    ``(doc, variables used, variables unset (read as ""), "VAR (message)" of the
    ``${VAR?message}`` that are unset)``.

    Raises:
        ImportFailed: a ``${`` that is no ``${VAR...}`` (unterminated, or not a name),
            which Compose refuses ("invalid interpolation format"): the key, dotted.
    """
    used: set[str] = set()
    missing: set[str] = set()
    required: list[str] = []

    where: list[str] = []

    def substitute(text: str) -> str:
        def one(match: re.Match[str]) -> str:
            if match["escaped"]:
                return "$"
            if match["invalid"]:
                raise ImportFailed(
                    f"{'.'.join(where) or 'the file'}: {text!r}: invalid interpolation "
                    "format (a ${ that is no ${VAR}, ${VAR:-default}...); Compose "
                    "refuses it too (write $$ for a $)"
                )
            name, op, arg = match["plain"] or match["braced"], match["op"], match["arg"] or ""
            used.add(name)
            value = env.get(name)
            unset = value is None or (op is not None and op.startswith(":") and value == "")
            if op is None:
                if value is None:
                    missing.add(name)
                return value or ""
            if op[-1] == "-":
                return substitute(arg) if unset else str(value)
            if op[-1] == "+":
                return "" if unset else substitute(arg)
            if unset:  # ${VAR?message}: Compose stops with the message
                required.append(f"{name} ({substitute(arg) or 'required'})")
            return value or ""

        return _VARIABLE.sub(one, text)

    def walk(node: Any) -> Any:
        if isinstance(node, str):
            return substitute(node) if "$" in node else node
        if isinstance(node, dict):
            return {key: inside(str(key), value) for key, value in node.items()}
        if isinstance(node, list):
            return [inside(f"[{i}]", item) for i, item in enumerate(node)]
        return node

    def inside(step: str, node: Any) -> Any:
        where.append(step)
        try:
            return walk(node)
        finally:
            where.pop()

    return walk(doc), used, missing, required


def load(text: str) -> dict[str, Any]:
    """The YAML mapping of a Compose file, read as Compose v2 reads it (module docstring).

    Raises:
        ImportFailed: not YAML (the line and the problem), more than :data:`MAX_NODES`
            nodes once its aliases are expanded (an alias bomb) or nested deeper than
            :data:`MAX_DEPTH` (the line), or the top level is not a mapping.
    """
    import yaml

    try:
        doc = yaml.load(text, Loader=_loader())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}: " if mark is not None else ""
        if exc.context == _REFUSED:
            raise ImportFailed(f"{where}{exc.problem}") from None
        raise ImportFailed(f"{where}not valid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ImportFailed(f"not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ImportFailed("not a Compose file: the top level is not a mapping of keys")
    return doc


@functools.cache
def _loader() -> Any:
    """A ``yaml.SafeLoader`` with YAML 1.2's booleans and numbers, refusing a key given
    twice in one mapping (merge keys ``<<`` aside), and bounding the document as
    :func:`load` says: each composed node's expanded size and depth are counted from
    its children's (an alias counts as the whole node it names), before anything is
    constructed, so that neither an alias bomb nor deep nesting costs time or stack."""
    import yaml

    tags = {f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float")}

    class ComposeLoader(yaml.SafeLoader):
        def __init__(self, stream: Any) -> None:
            super().__init__(stream)
            self.depth = 0
            self.bounds: dict[int, tuple[int, int]] = {}  # id(node): (nodes, depth)
            self.nodes: list[Any] = []  # keeps the ids of self.bounds alive

        def compose_node(self, parent: Any, index: Any) -> Any:
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            if self.depth >= MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    _REFUSED, None, f"nested more than {MAX_DEPTH} deep", mark
                )
            alias = self.check_event(yaml.AliasEvent)
            self.depth += 1
            try:
                node = super().compose_node(parent, index)
            finally:
                self.depth -= 1
            if alias and id(node) not in self.bounds:  # `&a [*a]`: itself inside itself
                raise yaml.composer.ComposerError(
                    _REFUSED, None, "an alias inside the node it names (a recursive value)", mark
                )
            if alias:
                return node
            if isinstance(node, yaml.MappingNode):
                children = [child for pair in node.value for child in pair]
            else:
                children = node.value if isinstance(node, yaml.SequenceNode) else []
            known = [self.bounds[id(child)] for child in children]
            nodes = 1 + sum(n for n, _ in known)
            depth = 1 + max((d for _, d in known), default=0)
            if nodes > MAX_NODES or depth > MAX_DEPTH:
                what = f"{nodes} values" if nodes > MAX_NODES else f"{depth} levels deep"
                raise yaml.composer.ComposerError(
                    _REFUSED, None, f"its aliases expand to {what} (at most {MAX_NODES} "
                    f"values, {MAX_DEPTH} levels): an alias bomb?", mark,
                )  # fmt: skip
            self.bounds[id(node)] = (nodes, depth)
            self.nodes.append(node)
            return node

        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
            seen: set[object] = set()
            for key, _ in node.value:
                if key.tag == "tag:yaml.org,2002:merge" or not isinstance(key, yaml.ScalarNode):
                    continue
                if key.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key.value!r} is given twice", key.start_mark
                    )
                seen.add(key.value)
            return super().construct_mapping(node, deep)

    ComposeLoader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in tags]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    numbers = r"^[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$"
    for tag, pattern, first in (
        ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
        ("int", r"^[-+]?(?:0|[1-9][0-9]*|0x[0-9a-fA-F]+)$", "-+0123456789"),
        ("float", numbers + r"|^\.(?:nan|NaN|NAN)$", "-+0123456789."),
    ):
        ComposeLoader.add_implicit_resolver(
            f"tag:yaml.org,2002:{tag}", re.compile(pattern), list(first)
        )
    return ComposeLoader
