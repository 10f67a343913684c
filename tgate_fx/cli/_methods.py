"""Command-line flags of every method, generated once from its config dataclass.

For each method in :data:`tgate_fx.methods.METHODS`, ``--<method>`` /
``--no-<method>`` switch it on or off, and each field of its config becomes
``--<field-name>`` (``--gate-step``, ``--cache-interval``, ``--ratio``),
typed from the field's annotation: ``int``, ``float``, ``str`` (a
``Literal`` gives the choices; a plain ``str`` is checked by the config),
each also ``| None`` (the flag is then optional: absent keeps the config's
default), ``int | str`` (an int or a word such as ToDo's ``auto``), and
``bool`` / ``bool | None`` as ``--<field>`` / ``--no-<field>``. A field of
another type gets no flag. Help texts come from the config's docstring.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing

from ..methods import METHODS

__all__ = ["add_method_arguments", "methods_from_args"]


def _field_help(config_cls: type) -> dict[str, str]:
    """First sentence of each ``name: text`` entry of the config's ``Attributes:`` section."""
    doc = inspect.getdoc(config_cls) or ""
    out: dict[str, str] = {}
    for m in re.finditer(r"^\s{4}(\w+): (.+?)(?=^\s{4}\w+: |\Z)", doc.split("Attributes:", 1)[-1], re.S | re.M):
        text = " ".join(m.group(2).split()).replace("``", "")
        sentences = re.split(r"(?<!e\.g)(?<!i\.e)\.\s", text)
        first = sentences[0] if len(sentences[0]) >= 25 or len(sentences) == 1 else ". ".join(sentences[:2])
        out[m.group(1)] = first.rstrip(".").replace("%", "%%")
    return out


def _int_or_word(text: str) -> int | str:
    """An int, or a word such as ToDo's ``auto`` (the config validates it)."""
    return int(text) if text.lstrip("-").isdigit() else text


def _flag_kwargs(annotation) -> dict | None:
    """``add_argument`` keywords for a field annotated ``annotation``; ``None`` for a type with no flag."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        if set(kinds) == {int, str}:
            return {"type": _int_or_word, "metavar": "N"}
        if len(kinds) != 1:
            return None
        annotation = kinds[0]  # "X | None": the flag sets X; absent, the config keeps its default
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if annotation is int:
        return {"type": int, "metavar": "N"}
    if annotation is float:
        return {"type": float, "metavar": "X"}
    if annotation is str:
        return {"type": str, "metavar": "NAME"}
    if typing.get_origin(annotation) is typing.Literal:
        choices = typing.get_args(annotation)
        if all(isinstance(c, str) for c in choices):
            return {"type": str, "choices": choices}
    return None


def _flag_fields(config_cls: type) -> list[tuple[dataclasses.Field, dict]]:
    """The fields of ``config_cls`` that get a flag, with their ``add_argument`` keywords."""
    hints = typing.get_type_hints(config_cls)
    out = []
    for f in dataclasses.fields(config_cls):
        kwargs = _flag_kwargs(hints[f.name])
        if kwargs is not None:
            out.append((f, kwargs))
    return out


def add_method_arguments(parser: argparse.ArgumentParser, default_on: tuple[str, ...] = ("tgate",),
                         notes: dict[str, str] | None = None) -> None:
    """Add ``--<method>``/``--no-<method>`` and the settings of every method to ``parser``.

    ``notes``: method name -> text appended to its group's title.
    """
    notes = notes or {}
    for name, method_cls in METHODS.items():
        config_cls = method_cls.config_class
        on = name in default_on
        note = f"; {notes[name]}" if name in notes else ""
        group = parser.add_argument_group(f"{method_cls.title} ({'on' if on else 'off'} by default{note})")
        flag = name.replace("_", "-")
        group.add_argument(f"--{flag}", dest=f"method_{name}", action="store_true", default=None,
                           help=f"apply {method_cls.title}" + (" (the default)" if on else ""))
        group.add_argument(f"--no-{flag}", dest=f"method_{name}", action="store_false",
                           help=f"do not apply {method_cls.title}")
        helps = _field_help(config_cls)
        for field, kwargs in _flag_fields(config_cls):
            group.add_argument(f"--{field.name.replace('_', '-')}", dest=f"{name}__{field.name}", default=None,
                               help=helps.get(field.name), **kwargs)


def methods_from_args(args: argparse.Namespace, defaults: dict[str, object] | None = None) -> list:
    """Method configs from parsed flags.

    Args:
        defaults: Method name -> config to start from where that method is on
            by default (e.g. an architecture's published T-GATE settings); a
            method switched on without a default starts from its config's defaults.

    A setting of a method given without ``--<method>`` switches it on. Raises
    ``ValueError`` for a setting of a method switched off.
    """
    defaults = dict(defaults or {})
    chosen = []
    for name, method_cls in METHODS.items():
        config_cls = method_cls.config_class
        settings = {f.name: getattr(args, f"{name}__{f.name}") for f, _ in _flag_fields(config_cls)
                    if getattr(args, f"{name}__{f.name}", None) is not None}
        switch = getattr(args, f"method_{name}", None)
        if switch is False and settings:
            flags = ", ".join("--" + k.replace("_", "-") for k in settings)
            raise ValueError(f"--no-{name.replace('_', '-')} with {flags}: drop one")
        on = switch if switch is not None else (name in defaults or bool(settings))
        if on:
            base = defaults.get(name) or config_cls()
            chosen.append(dataclasses.replace(base, **settings))
    return chosen
