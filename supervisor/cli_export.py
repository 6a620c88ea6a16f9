"""``hostvisor export k8s [NAME...] [-o FILE] [--namespace NS] [--image NAME=IMAGE]...
[--include-secrets] [--check]`` (contract section 7, issue 13).

Loads the config, picks the units (all of them without NAME), finds each unit's image
(``--image NAME=IMAGE``; else a process unit's ``[k8s] image``; else a container unit's
image as its Docker engine tells, ``docker.from_env()``, so ``DOCKER_HOST`` is
honoured), builds the manifests with :mod:`supervisor.k8s`, and prints them as one
YAML stream (or writes ``FILE`` atomically: mode 0600 when it holds secret values,
0644 otherwise). ``--check`` first validates every object with kubernetes-validate in
strict mode against the newest Kubernetes version the installed package knows.

Output: the YAML on stdout (or ``wrote FILE: N objects``); on stderr each warning
(``warning: NAME: ...``: what did not map, or mapped only roughly) and each error
(``error: NAME: ...``). Nothing is printed or written when there is an error.

Exit codes: 0 exported; 1 the config is invalid, a NAME or ``--image`` is wrong, a unit
has no image or a schedule Kubernetes cannot run, or ``--check`` failed (or could not
run: kubernetes-validate is missing).

The Docker engine is read here with the SDK directly, not through
:mod:`supervisor.drivers.docker` (STYLE rule 10 keeps the SDK there): that adapter is
the daemon's asynchronous, reconnecting driver; this verb makes two blocking calls per
container unit and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import stat
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from supervisor.errors import ConfigError
from supervisor.k8s import Export, build
from supervisor.k8s_target import (
    ExportError,
    Target,
    container_target,
    process_target,
    valid_image,
)
from supervisor.paths import resolve_config_path
from supervisor.spec import ContainerSpec, Loaded, ServiceSpec

__all__ = ["check_manifests", "dump_manifests", "export_verb"]

EXIT_OK = 0
EXIT_FAILED = 1
#: Seconds any one call to the Docker engine may take.
ENGINE_TIMEOUT = 10
_INSTALL = "pip install 'hostvisor[k8s]'"


def export_verb(
    args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    """Run one export (module docstring); returns the exit code."""
    from supervisor.config import load

    config_path = resolve_config_path(getattr(args, "config", None))
    try:
        loaded = load(config_path)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=err)
        return EXIT_FAILED
    result = _manifests(args, loaded)
    text = "" if result.errors else dump_manifests(result.objects)
    if not result.errors and args.check:
        result.errors += _check_text(text)
    for line in result.warnings:
        print(f"warning: {line}", file=err)
    for line in result.errors:
        print(f"error: {line}", file=err)
    if result.errors:
        return EXIT_FAILED
    if args.check:
        print(_checked(len(result.objects)), file=err)
    if args.output and args.output != "-":
        return _write(
            Path(args.output),
            text,
            count=len(result.objects),
            secret=args.include_secrets,
            out=out,
            err=err,
        )
    out.write(text)
    return EXIT_OK


def _manifests(args: argparse.Namespace, loaded: Loaded) -> Export:
    """Pick the units, find their images and build; every warning and error in the
    returned :class:`Export`."""
    errors: list[str] = []
    warnings: list[str] = []
    units = _select(loaded, args.names, errors)
    if not units and not errors:
        warnings.append(f"no units to export in {loaded.daemon.units_dir}")
    images = _images(args.image, loaded, {u.name for u in units}, errors, warnings)
    targets: dict[str, Target] = {}
    if not errors:
        engine = _Engine()
        for spec in units:
            try:
                targets[spec.name] = _target(spec, images.get(spec.name), loaded, engine)
            except ExportError as exc:
                errors.append(f"{spec.name}: {exc}")
        engine.close()
    if errors:
        return Export(warnings=warnings, errors=errors)
    result = build(
        units,
        targets,
        config=loaded.services,
        namespace=args.namespace,
        include_secrets=args.include_secrets,
    )
    result.warnings[:0] = warnings
    return result


def _check_text(text: str) -> list[str]:
    """``--check``: the problems of the objects of ``text`` as a YAML reader (kubectl)
    gets them back, not as they were built."""
    import yaml

    try:
        docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
        return check_manifests(docs)[1]
    except ImportError:
        return [f"--check needs kubernetes-validate: {_INSTALL}"]
    except yaml.YAMLError as exc:
        return [f"--check: the YAML written cannot be read back ({_short(exc)})"]


def _select(loaded: Loaded, names: Sequence[str], errors: list[str]) -> list[ServiceSpec]:
    """The units named (all without names), in the config's order (by name)."""
    known = loaded.services
    unknown = [n for n in dict.fromkeys(names) if n not in known]
    for name in unknown:
        units = ", ".join(known) or "none"
        errors.append(f"{name}: no such unit (units: {units})")
    wanted = set(names) or set(known)
    return [spec for name, spec in known.items() if name in wanted]


def _images(
    options: Sequence[str],
    loaded: Loaded,
    selected: set[str],
    errors: list[str],
    warnings: list[str],
) -> dict[str, str]:
    """``--image NAME=IMAGE`` options, by unit name."""
    images: dict[str, str] = {}
    for option in options:
        name, sep, image = option.partition("=")
        name, image = name.strip(), image.strip()
        if not sep or not name or not image:
            errors.append(f"--image {option!r}: expected NAME=IMAGE (--image gateway=ghcr.io/"
                          "joel/gateway:1.4)")  # fmt: skip
        elif name not in loaded.services:
            units = ", ".join(loaded.services) or "none"
            errors.append(f"--image {option!r}: no unit {name} (units: {units})")
        elif not valid_image(image):
            errors.append(f"--image {option!r}: {image!r} is not an image reference "
                          "([registry/]repository[:tag][@digest], lower case)")  # fmt: skip
        elif images.get(name, image) != image:
            errors.append(f"--image {option!r}: {name} was given another image, {images[name]}")
        else:
            images[name] = image
            if name not in selected:
                warnings.append(f"{name}: --image {image}: not used, {name} is not exported")
    return images


def _target(spec: ServiceSpec, image: str | None, loaded: Loaded, engine: _Engine) -> Target:
    """The :class:`Target` of one unit.

    Raises:
        ExportError: no image can be found for it.
    """
    if isinstance(spec.target, ContainerSpec):
        container = spec.target.name
        try:
            info, image_info = engine.inspect(container)
        except ExportError as exc:
            if image is None:
                raise ExportError(
                    f"{exc}, so its image is unknown: pass --image {spec.name}=IMAGE"
                ) from None
            target = Target(image=image, ports_known=False,
                            notes=(f"{exc}: only the image {image} is exported (not the "
                                   "container's command, environment or ports)",))  # fmt: skip
            return target
        return container_target(spec, info, image_info, override=image)
    image = image or spec.k8s_image
    if image is None:
        raise ExportError(
            f"no image: pass --image {spec.name}=IMAGE or set [k8s] image in units/{spec.name}.toml"
        )
    if not valid_image(image):
        raise ExportError(f"[k8s] image {image!r} is not an image reference "
                          "([registry/]repository[:tag][@digest], lower case)")  # fmt: skip
    config_dir = str(loaded.daemon.config_path.parent)
    return process_target(
        spec, image, file_keys=_file_keys(spec, loaded), default_workdir=config_dir
    )


def _file_keys(spec: ServiceSpec, loaded: Loaded) -> frozenset[str]:
    """The variables the unit's ``env_files`` set, read again as the loader read them
    (their paths resolved the loader's way; a missing optional file sets nothing)."""
    from supervisor.config import resolve_path  # the loader's own path rules, not a copy
    from supervisor.configfiles import read_env_file

    keys: set[str] = set()
    for raw in spec.env_files:
        path = resolve_path(loaded.daemon.config_path, raw[1:] if raw.startswith("-") else raw)
        with contextlib.suppress(OSError, ConfigError):
            keys.update(read_env_file(path))
    return frozenset(keys)


class _Engine:
    """The Docker engine, connected on first use (``docker.from_env``: ``DOCKER_HOST``,
    ``DOCKER_TLS_VERIFY``, ``DOCKER_CERT_PATH``)."""

    def __init__(self) -> None:
        self._client: Any = None
        self._failure: str | None = None

    def inspect(self, container: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """``docker inspect`` of ``container`` and of its image (``None`` if the engine no
        longer has the image).

        Raises:
            ExportError: the engine cannot be reached, or has no such container.
        """
        import docker
        import docker.errors

        if self._failure is None and self._client is None:
            try:
                self._client = docker.from_env(timeout=ENGINE_TIMEOUT)
                self._client.ping()
            except (docker.errors.DockerException, OSError) as exc:  # requests: OSError
                self._failure = f"the Docker engine cannot be reached ({_short(exc)})"
        if self._failure is not None:
            raise ExportError(f"container {container}: {self._failure}")
        api = self._client.api
        try:
            info: dict[str, Any] = api.inspect_container(container)
        except docker.errors.NotFound:
            raise ExportError(f"the Docker engine has no container {container}") from None
        except (docker.errors.DockerException, OSError) as exc:
            raise ExportError(
                f"container {container}: docker inspect failed ({_short(exc)})"
            ) from None
        image: dict[str, Any] | None = None
        with contextlib.suppress(docker.errors.DockerException, OSError):
            image = api.inspect_image(info.get("Image") or info["Config"]["Image"])
        return info, image

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


#: Plain scalars that a YAML 1.1 reader (go-yaml v2 under kubectl's sigs.k8s.io/yaml,
#: PyYAML) or a YAML 1.2 core-schema reader takes for a null, a bool, an int or a float:
#: such a string is written quoted. Case is ignored (quoting more is harmless).
_AMBIGUOUS = re.compile(
    r"""(?:~|null|
    y|yes|n|no|true|false|on|off|
    [-+]?(?:0b[0-1_]+|0o?[0-7_]+|0x[0-9a-f_]+|[0-9][0-9_]*(?::[0-5]?[0-9])*)|
    [-+]?(?:\.[0-9_]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:e[-+]?[0-9]+)?|
    [-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*|
    [-+]?\.inf|\.nan)?""",
    re.IGNORECASE | re.VERBOSE,
)


def dump_manifests(objects: Sequence[Mapping[str, Any]]) -> str:
    """One YAML stream: each object a document starting with ``---``, keys in the order
    built, no anchors or aliases, no line folding; a string any YAML 1.1 or 1.2 reader
    could take for another type (``1e3``, ``0o17``, ``y``, ``off``, ``~``, ``12:30``,
    ``""``: :data:`_AMBIGUOUS`) single-quoted."""
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    def text(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
        if _AMBIGUOUS.fullmatch(data):
            return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="'")
        return dumper.represent_str(data)

    Dumper.add_representer(str, text)

    stream: str = yaml.dump_all(
        list(objects),
        Dumper=Dumper,
        sort_keys=False,
        explicit_start=True,
        default_flow_style=False,
        allow_unicode=True,
        width=4096,
    )
    return stream


def check_manifests(objects: Sequence[Mapping[str, Any]]) -> tuple[str, list[str]]:
    """Validate each object with kubernetes-validate, strict (no unknown fields), against
    the newest Kubernetes version the installed package has schemas for.

    Returns:
        ``(version, problems)``: the version checked against (``"1.37.0"``) and one
        ``NAME KIND: path: message`` line per invalid object (``[]`` when all are valid).

    Raises:
        ImportError: kubernetes-validate is not installed.
    """
    import kubernetes_validate

    version: str = kubernetes_validate.latest_version()
    problems: list[str] = []
    for obj in objects:
        meta = obj.get("metadata") or {}
        what = f"{meta.get('name', '?')} {obj.get('kind', '?')}"
        try:
            kubernetes_validate.validate(dict(obj), version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{what}: {path + ': ' if path else ''}{exc.message}")
        except (
            kubernetes_validate.SchemaNotFoundError,
            kubernetes_validate.InvalidSchemaError,
        ) as exc:
            problems.append(f"{what}: {exc.message}")
        except Exception as exc:  # a document the validator cannot even read
            problems.append(f"{what}: cannot be validated ({_short(exc)})")
    return version, problems


def _checked(count: int) -> str:
    import kubernetes_validate

    version: str = kubernetes_validate.latest_version()
    return (f"checked {count} object{'s' if count != 1 else ''} against Kubernetes {version} "
            "(kubernetes-validate, strict): valid")  # fmt: skip


def _write(path: Path, text: str, *, count: int, secret: bool, out: TextIO, err: TextIO) -> int:
    """Write ``text`` to ``path``: atomically (a temporary file beside it, then rename)
    when ``path`` is missing or a regular file; into it, in place, when it is anything
    else (a symlink, followed; a FIFO; a device such as ``/dev/stdout``), which a rename
    would replace by a regular file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        print(f"error: cannot write {path}: {exc.strerror or exc}", file=err)
        return EXIT_FAILED
    if mode is not None and not stat.S_ISREG(mode):
        return _write_into(path, text, count=count, secret=secret, out=out, err=err)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    except OSError as exc:
        print(f"error: cannot write {path}: {exc.strerror or exc}", file=err)
        return EXIT_FAILED
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp, 0o600 if secret else 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        print(f"error: cannot write {path}: {exc.strerror or exc}", file=err)
        return EXIT_FAILED
    print(f"wrote {path}: {count} object{'s' if count != 1 else ''}", file=out)
    return EXIT_OK


def _write_into(
    path: Path, text: str, *, count: int, secret: bool, out: TextIO, err: TextIO
) -> int:
    """Write ``text`` into the existing ``path`` (links followed, truncated if a file;
    a dangling link's target is created, as the shell's ``>`` does). A regular file
    reached through a link is made 0600 with secrets; other modes are left alone."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOCTTY,
                     0o600 if secret else 0o644)  # fmt: skip
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            if secret and stat.S_ISREG(os.fstat(fd).st_mode):
                os.fchmod(fd, 0o600)
            stream.write(text)
    except OSError as exc:
        print(f"error: cannot write {path}: {exc.strerror or exc}", file=err)
        return EXIT_FAILED
    print(f"wrote {path}: {count} object{'s' if count != 1 else ''}", file=out)
    return EXIT_OK
