"""Config mistakes on the command line as one line naming the flag, the value and what is allowed.

Every command builds a pydantic config from its flags. `guard_config_errors` wraps the
commands of a click command tree so that a `pydantic.ValidationError` becomes a `FlagError`
(printed as one ``error:`` line, exit 2) instead of a traceback. Errors are mapped to the
command's options by name: a config field ``a.b`` is set by the option whose Python name is
``a_b`` or ``b`` (``--index`` sets ``neighbours.index``; ``negatives_mode`` spelled
``--negatives`` sets ``negatives.mode``), so a new command gets this by naming its parameters
after the fields they set.

    $ b3mine mine --embeddings e.parquet --algorithm kmeans
    error: --algorithm 'kmeans': expected one of 'metis', 'louvain', 'igraph-louvain' or 'leiden'
"""
from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

from b3mine.errors import B3MineError

_FROM_USER = ("COMMANDLINE", "ENVIRONMENT")  # click's ParameterSource names
_BOUNDS = {"greater_than_equal": ">= {ge}", "greater_than": "> {gt}",
           "less_than_equal": "<= {le}", "less_than": "< {lt}"}


class FlagError(B3MineError):
    """A flag (or a key of the ``--config`` file) holds a value the config does not allow."""


def guard_config_errors(command: Any) -> Any:
    """Wrap ``invoke`` of every command under the click/typer ``command`` (groups recursively);
    returns ``command``. Duck-typed: typer may vendor its own copy of click."""
    for sub in (getattr(command, "commands", None) or {}).values():
        guard_config_errors(sub)
    if getattr(command, "callback", None) is not None and "invoke" not in vars(command):
        invoke = command.invoke

        def guarded(ctx: Any) -> Any:
            try:
                return invoke(ctx)
            except ValidationError as exc:
                raise FlagError(explain(exc, ctx)) from exc

        command.invoke = guarded
    return command


def flag_name(param: Any) -> str:
    longs = [o for o in param.opts if o.startswith("--")]
    return longs[0] if longs else param.opts[0]


def explain(exc: ValidationError, ctx: Any) -> str:
    """One line for all of ``exc``'s errors, in terms of the options of ``ctx``'s command."""
    options = {p.name: p for p in ctx.command.params
               if getattr(p, "param_type_name", "") == "option" and p.name}
    given = {n for n in options if getattr(ctx.get_parameter_source(n), "name", "") in _FROM_USER}
    config_file = next((ctx.params[n] for n in ("config_file", "config") if n in given), None)
    parts = []
    for error in exc.errors(include_url=False):
        loc = tuple(str(x) for x in error["loc"])
        allowed = _allowed(error)
        name = _option_for(loc, options)
        if not loc or error["type"] == "json_invalid":
            where = f"--config {config_file}" if error["type"] == "json_invalid" else ""
            text = _with_flags(allowed, options, given)
            parts.append(f"{where}: {text}" if where else text)
        elif name in given:
            parts.append(f"{flag_name(options[name])} {error['input']!r}: expected {allowed}")
        else:
            key = ".".join(loc)
            where = f"--config {config_file}: {key}" if config_file else key
            shown = "" if error["type"] == "missing" else f" {error.get('input')!r}"
            parts.append(f"{where}{shown}: expected {allowed}")
    return "; ".join(parts)


def _option_for(loc: tuple[str, ...], options: dict[str, Any]) -> str | None:
    """The option whose name is the field path joined by ``_``, or a tail of it."""
    for start in range(len(loc)):
        name = "_".join(loc[start:])
        if name in options:
            return name
    return None


def _allowed(error: dict[str, Any]) -> str:
    ctx, kind = error.get("ctx") or {}, error["type"]
    if kind == "literal_error":
        return f"one of {ctx['expected']}"
    if kind in _BOUNDS:
        return "a number " + _BOUNDS[kind].format(**ctx)
    message = error["msg"]
    for prefix in ("Value error, ", "Input should be "):
        message = message.removeprefix(prefix)
    return message


def _with_flags(text: str, options: dict[str, Any], given: set[str]) -> str:
    """A whole-config message (``batch_size must be a multiple of cluster_size ...``) with the
    field names spelled as the flags that set them."""
    for name, param in options.items():
        if "_" in name or name in given:
            text = re.sub(rf"(?<![\w-]){re.escape(name)}(?!\w)", flag_name(param), text)
    return text
