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
        text = f"{spec.metadata['help']} [{env_name(spec.name)}, default: {spec.default!r}]"
        if isinstance(spec.default, bool):  # a switch: --name sets it, --no-name clears it
            parser.add_argument(flag(spec.name), dest=spec.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
            continue
        parser.add_argument(flag(spec.name), dest=spec.name, type=type(spec.default), default=argparse.SUPPRESS, help=text)
    return parser


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _from_text(default: Any, raw: str) -> Any:
    """A variable's text as the type of the setting's default (a bool from 1/0, true/false, yes/no, on/off)."""
    if isinstance(default, bool):
        if raw.strip().lower() in _TRUE + _FALSE:
            return raw.strip().lower() in _TRUE
        raise ValueError(raw)
    return type(default)(raw)


def parse(cls: type[T], parser: argparse.ArgumentParser, argv: Sequence[str] | None, environ: Mapping[str, str] | None) -> T:
    """Defaults, overridden by ``SDXL_*`` variables, overridden by flags."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for spec in fields(cls):  # type: ignore[arg-type]
        raw = environ.get(env_name(spec.name))
        if raw is not None:
            try:
                values[spec.name] = _from_text(spec.default, raw)
            except ValueError:
                parser.error(f"{env_name(spec.name)}={raw!r} is not a valid {type(spec.default).__name__}")
    values.update(vars(parser.parse_args(argv)))
    return cls(**values)
