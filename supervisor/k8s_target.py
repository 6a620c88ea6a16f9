"""What the cluster runs for a unit, beyond its spec: the :class:`Target` of
:func:`supervisor.k8s.build`.

Pure. :func:`process_target` takes a process unit's command, env and workdir;
:func:`container_target` reads ``docker inspect`` of a container unit's container (and
of its image) the way ``docker run`` composed them: the image's ENTRYPOINT, CMD, Env
and WORKDIR, with the container's own settings over them. Only what the container set
beyond its image is exported, so the pod runs what the container ran.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from supervisor.spec import ContainerSpec, ProcessSpec, ServiceSpec, is_secret, is_secret_name

__all__ = [
    "ExportError",
    "Target",
    "container_target",
    "leaks",
    "process_target",
    "sensitive",
    "valid_image",
]

#: distribution/reference's grammar: [domain/]path[:tag][@digest].
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"  # noqa: E501
_IMAGE = re.compile(
    rf"(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::[\w][\w.-]{{0,127}})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?"
)


class ExportError(Exception):
    """A unit that cannot be exported; the message says why and what to pass or set."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """What the cluster runs for one unit, beyond its spec.

    Attributes:
        image: the image reference.
        command: the container's ``command`` (it replaces the image's ENTRYPOINT), or
            ``None`` for the image's.
        args: the container's ``args`` (they replace the image's CMD), or ``None``.
        env: the container's environment, in order.
        secret_keys: the variables of ``env`` that go to the Secret.
        secret_values: the values hostvisor redacts (:meth:`ServiceSpec.secret_values`):
            commands reference them as ``$(VAR)``.
        named_secrets: the variables that are secrets by name (``*TOKEN*``,
            ``*PASSWORD*`` ...) or by ``secret_env_files``: their values are printed
            nowhere without ``include_secrets``, not even where no ``$(VAR)`` works.
        workdir: ``workingDir``, or ``None`` for the image's.
        ports: host port -> container port (a container unit's published ports).
        ports_known: ``False`` when the container could not be inspected: the unit's
            port is the host's, the container's is unknown.
        notes: warnings found while reading the unit's files or container.
    """

    image: str
    command: tuple[str, ...] | None = None
    args: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    secret_keys: frozenset[str] = frozenset()
    secret_values: frozenset[str] = frozenset()
    named_secrets: frozenset[str] = frozenset()
    workdir: str | None = None
    ports: Mapping[int, int] = field(default_factory=dict)
    ports_known: bool = True
    notes: tuple[str, ...] = ()


def valid_image(reference: str) -> bool:
    """Whether ``reference`` is an image reference (``[registry/]repo[:tag][@digest]``,
    distribution/reference's grammar)."""
    return bool(_IMAGE.fullmatch(reference))


def process_target(
    spec: ServiceSpec, image: str, *, file_keys: frozenset[str], default_workdir: str
) -> Target:
    """The :class:`Target` of a process unit: its command, its ``env`` (``file_keys``:
    the variables its ``env_files`` set) and its ``workdir`` unless it is
    ``default_workdir`` (the config's folder, the loader's default: then the image's
    WORKDIR applies)."""
    hidden = spec.secret_values()
    keys = (
        file_keys
        | spec.secret_env_names
        | {k for k, v in spec.env.items() if _manifest_secret(k, v)}
    )
    workdir = str(spec.workdir)
    notes: list[str] = []
    if workdir == default_workdir:
        notes.append(f"workdir: {workdir} (the default) is not carried: the image's "
                     "WORKDIR applies")  # fmt: skip
        workdir = ""
    else:
        notes.append(f"workdir: {workdir} is a host path: it must exist in the image")
    command = spec.target.command if isinstance(spec.target, ProcessSpec) else None
    for key in sorted(_HOST_ONLY.keys() & (spec.env.keys() - keys)):
        notes.append(f"env {key}: the host's {_HOST_ONLY[key]}, exported as it is; the "
                     "image's own is usually the right one: drop it from env")  # fmt: skip
    return Target(
        image=image,
        command=command,
        env=dict(spec.env),
        secret_keys=frozenset(keys & spec.env.keys()),
        secret_values=hidden,
        named_secrets=frozenset(
            k for k, v in spec.env.items() if (k in spec.secret_env_names and v) or _named(k, v)
        ),
        workdir=workdir or None,
        notes=tuple(notes),
    )


def container_target(
    spec: ServiceSpec,
    container: Mapping[str, Any],
    image: Mapping[str, Any] | None,
    *,
    override: str | None = None,
) -> Target:
    """The :class:`Target` of a container unit from ``docker inspect`` of its container
    and of its image (``None`` when the engine no longer has it).

    The image is the container's ``Config.Image`` unless ``override``; the command,
    environment and working folder are the container's where they differ from the
    image's (all of them when the image is unknown); ``ports`` from
    ``HostConfig.PortBindings``. Mounts are reported, not exported.

    Raises:
        ExportError: no ``override`` and the container names no usable image (it was
            created from an image id).
    """
    config: Mapping[str, Any] = container.get("Config") or {}
    base: Mapping[str, Any] = (image or {}).get("Config") or {}
    ref = override or str(config.get("Image") or "")
    if not valid_image(ref) or ref.startswith("sha256:"):
        raise ExportError(
            f"the container was created from {ref or 'no image'!r}, which is no image "
            f"reference a cluster can pull: pass --image {spec.name}=IMAGE"
        )
    entry, cmd = _strings(config.get("Entrypoint")), _strings(config.get("Cmd"))
    command: tuple[str, ...] | None = None
    args: tuple[str, ...] | None = None
    if image is None or entry != _strings(base.get("Entrypoint")):
        command, args = (entry, cmd or None) if entry else (cmd or None, None)
    elif cmd != _strings(base.get("Cmd")):
        args = cmd
    own = set(_strings(base.get("Env")))
    env = dict(item.partition("=")[::2] for item in _strings(config.get("Env")) if item not in own)
    hidden = frozenset(v for k, v in env.items() if is_secret(k, v))
    workdir = str(config.get("WorkingDir") or "")
    if image is not None and workdir == str(base.get("WorkingDir") or ""):
        workdir = ""
    notes = _container_notes(spec, container)
    return Target(
        image=ref,
        command=command,
        args=args,
        env=env,
        secret_keys=frozenset(k for k, v in env.items() if _manifest_secret(k, v)),
        secret_values=hidden,
        named_secrets=frozenset(k for k, v in env.items() if _named(k, v)),
        workdir=workdir or None,
        ports=_published(container),
        notes=tuple(notes),
    )


#: ``env`` variables that describe the host rather than the service.
_HOST_ONLY = {"PATH": "search path", "HOME": "home folder", "USER": "user name"}


def _manifest_secret(key: str, value: str) -> bool:
    """Whether an ``env`` variable of a unit goes to the Secret rather than to ``env``: a
    secret by its name (``*TOKEN*``, ``*PASSWORD*`` ..., 3 characters or more), or a URL
    with a password. Not hostvisor's redaction rule (every value of 8 characters or more),
    which would empty ``PATH`` or ``NODE_ENV`` in the cluster: a value written in plain
    text in a unit file is no secret the manifest must hold back."""
    if is_secret_name(key):
        return is_secret(key, value)
    if "://" not in value:
        return False
    from urllib.parse import urlsplit

    try:
        return urlsplit(value).password is not None
    except ValueError:
        return False


def _named(key: str, value: str) -> bool:
    """A secret by its name (spec's rule: 3 characters or more)."""
    return is_secret_name(key) and is_secret(key, value)


def _strings(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(str(v) for v in value)
    return ()


def _published(container: Mapping[str, Any]) -> dict[int, int]:
    bindings = (container.get("HostConfig") or {}).get("PortBindings") or {}
    ports: dict[int, int] = {}
    for key, hosts in bindings.items():
        inside, _, proto = str(key).partition("/")
        if proto not in ("", "tcp") or not inside.isdigit():
            continue
        for host in hosts or []:
            if str(host.get("HostPort") or "").isdigit():
                ports[int(host["HostPort"])] = int(inside)
    return ports


def _container_notes(spec: ServiceSpec, container: Mapping[str, Any]) -> list[str]:
    notes: list[str] = []
    mounts = [
        f"{m.get('Source') or m.get('Name') or '?'}:{m.get('Destination')}"
        for m in container.get("Mounts") or []
    ]
    if mounts:
        notes.append(f"the container's mounts ({', '.join(mounts)}) are not exported: add "
                     "volumes (a PersistentVolumeClaim for data) to the pod")  # fmt: skip
    if spec.env or spec.env_files or spec.secret_env_files:
        notes.append("env, env_files: for a container unit they are the environment of "
                     "recreate_command and hooks on the host: not exported (the "
                     "container's own environment is)")  # fmt: skip
    if isinstance(spec.target, ContainerSpec) and spec.target.recreate_command:
        notes.append("recreate_command: not carried: the Deployment creates the pods")
    return notes


#: The shortest secret value looked for outside the Secret: shorter ones (``1``, ``on``)
#: would match everywhere; a variable secret by its name (``API_KEY``) is looked for
#: from 3 characters, spec's rule (:func:`~supervisor.spec.is_secret`).
LEAK_MIN = 4
#: Keys whose values are names the export made (object, container, label, image,
#: Secret reference names), not text of the unit: a secret value there is a coincidence.
_NAMES = frozenset(
    {"name", "image", "namespace", "apiVersion", "kind", "labels", "matchLabels", "selector"}
)


def sensitive(target: Target) -> list[tuple[str, str]]:
    """``(variable, text)`` pairs that must not appear outside the Secret: the value of
    each variable of the Secret that hostvisor treats as secret (``secret_values``), and
    the password of such a value that is a URL; at least :data:`LEAK_MIN` characters
    (3 for a variable secret by its name), longest first."""
    from urllib.parse import urlsplit

    found: dict[str, str] = {}
    for key in target.secret_keys:
        value = target.env.get(key, "")
        if value not in target.secret_values:
            continue
        texts = [value]
        if "://" in value:
            with contextlib.suppress(ValueError):
                texts.append(urlsplit(value).password or "")
        shortest = 3 if is_secret_name(key) else LEAK_MIN
        for text in texts:
            if len(text) >= shortest:
                found.setdefault(text, key)
    return sorted(((k, t) for t, k in found.items()), key=lambda kt: (-len(kt[1]), kt[0]))


def leaks(
    value: object, secrets: list[tuple[str, str]], skip: frozenset[int] = frozenset()
) -> list[tuple[str, tuple[str | int, ...]]]:
    """Where in ``value`` (a manifest, or part of one) a text of ``secrets`` (from
    :func:`sensitive`) appears: ``(variable, path)`` pairs, a path being the keys and
    list indexes from ``value`` to the string. Names (:data:`_NAMES`) and the dicts whose
    ``id`` is in ``skip`` are not searched."""
    found: list[tuple[str, tuple[str | int, ...]]] = []

    def walk(item: object, path: tuple[str | int, ...]) -> None:
        if id(item) in skip:
            return
        if isinstance(item, str):
            for key, text in secrets:
                if text in item:
                    found.append((key, path))
                    return
        elif isinstance(item, dict):
            for k, v in item.items():
                if k not in _NAMES:
                    walk(v, (*path, k))
        elif isinstance(item, list):
            for i, v in enumerate(item):
                walk(v, (*path, i))

    walk(value, ())
    return found
