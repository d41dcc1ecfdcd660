"""Settings dataclasses filled from CLI flags and ``SDXL_*`` environment variables.

Shared by the API server (``service.settings``) and the remote worker command
(``python -m gpu_workers``), so that a setting both know, such as ``--broker`` or ``--model-cache``,
is spelled, typed and overridden the same way on every box: a field ``max_batch`` is the flag
``--max-batch`` and the variable ``SDXL_MAX_BATCH``; the flag wins over the variable, the variable
over the default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, field, fields
from typing import Any, TypeVar

ENV_PREFIX = "SDXL_"
T = TypeVar("T")


def setting(default: Any, help: str, secret: bool = False) -> Any:
    """A field with its help text; a secret one is left out of the dataclass's repr (and so of logs)."""
    return field(default=default, metadata={"help": help}, repr=not secret)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for spec in fields(cls):
        assert spec.default is not MISSING
        parser.add_argument(
            flag(spec.name),
            dest=spec.name,
            type=type(spec.default),
            default=argparse.SUPPRESS,
            help=f"{spec.metadata['help']} [{env_name(spec.name)}, default: {spec.default!r}]",
        )
    return parser


def parse(cls: type[T], parser: argparse.ArgumentParser, argv: Sequence[str] | None, environ: Mapping[str, str] | None) -> T:
    """Defaults, overridden by ``SDXL_*`` variables, overridden by flags."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for spec in fields(cls):  # type: ignore[arg-type]
        raw = environ.get(env_name(spec.name))
        if raw is not None:
            try:
                values[spec.name] = type(spec.default)(raw)
            except ValueError:
                parser.error(f"{env_name(spec.name)}={raw!r} is not a valid {type(spec.default).__name__}")
    values.update(vars(parser.parse_args(argv)))
    return cls(**values)
