"""The arguments of ``hostvisor import`` and ``hostvisor export`` (contract section 7).

Only argparse here: every CLI start builds these parsers, and ``status`` must not pay
for the converters; :func:`import_verb` and :func:`export_verb` load
:mod:`supervisor.cli_import` and :mod:`supervisor.cli_export` when the verb runs.
"""

from __future__ import annotations

import argparse

__all__ = ["EXPORT_TARGETS", "KINDS", "add_export_arguments", "add_import_arguments"]

#: ``hostvisor import KIND``: each is the module ``supervisor.importers.<kind>``.
KINDS = ("systemd", "launchd", "compose", "crontab", "procfile", "supervisord", "pm2")
#: ``hostvisor export TARGET``.
EXPORT_TARGETS = ("k8s",)


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    """``KIND FILE... [-o DIR] [--dry-run] [--force]``."""
    parser.add_argument("kind", choices=KINDS, metavar="KIND", help=", ".join(KINDS))
    parser.add_argument("files", nargs="+", metavar="FILE", help="source files; - is stdin")
    parser.add_argument(
        "-o", "--output", metavar="DIR", help="units folder to write (default: the config's)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the units, write nothing")
    parser.add_argument("--force", action="store_true", help="replace existing unit files")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """``k8s [NAME...] [-o FILE] [--namespace NS] [--image NAME=IMAGE]... [--include-secrets]
    [--check]``."""
    parser.add_argument("target", choices=EXPORT_TARGETS, metavar="TARGET", help="k8s")
    parser.add_argument("names", nargs="*", metavar="NAME", help="units (default: all)")
    parser.add_argument("-o", "--output", metavar="FILE", help="write here, not to stdout")
    parser.add_argument("--namespace", metavar="NS", help="metadata.namespace of every object")
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="NAME=IMAGE",
        help="the image of unit NAME (repeatable)",
    )
    parser.add_argument(
        "--include-secrets", action="store_true", help="env file values into the Secrets"
    )
    parser.add_argument(
        "--check", action="store_true", help="validate with kubernetes-validate --strict"
    )


def import_verb(args: argparse.Namespace) -> int:
    """``hostvisor import``: :func:`supervisor.cli_import.import_verb`."""
    from supervisor.cli_import import import_verb as run

    return run(args)


def export_verb(args: argparse.Namespace) -> int:
    """``hostvisor export``: :func:`supervisor.cli_export.export_verb`."""
    from supervisor.cli_export import export_verb as run  # type: ignore[import-not-found,unused-ignore]

    code: int = run(args)
    return code
