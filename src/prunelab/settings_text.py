"""Settings as text a person typed (a preset file, an override's value), read as YAML
safely: a size limit, UTF-8, one document, no anchors or aliases, bounded nesting, and
every problem one line naming where the text came from."""

from __future__ import annotations

from typing import Any

import yaml

from prunelab.errors import ConfigError, one_line

MAX_NESTING = 8  # a preset is sections of values and lists: deeper is not settings (and YAML's composer recurses)


class _SettingsLoader(yaml.SafeLoader):
    """YAML's safe loader, less what settings never need and an attacker would use:
    anchors and aliases (a few hundred bytes of nested aliases expand to gigabytes)
    and nesting deeper than MAX_NESTING (the composer recurses once per level)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if event.anchor is not None:  # `&name` on a node, or a `*name` alias
            raise yaml.composer.ComposerError(None, None, "anchors and aliases (&name, *name) are not allowed in "
                                              "settings: write the value out", event.start_mark)
        self.depth = getattr(self, "depth", 0) + 1
        try:
            if self.depth > MAX_NESTING:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_NESTING} levels",
                                                  event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def parse_settings(text: str | bytes, source: str, limit: int) -> Any:
    """The value of a preset's text or of one override's value: at most `limit` bytes,
    UTF-8, one YAML document, no anchors or aliases; any problem is one line naming `source`."""
    size = len(text.encode("utf-8", "replace") if isinstance(text, str) else text)
    if size > limit:
        raise ConfigError(f"{source} is larger than {limit} bytes: settings are a few lines of text; check it")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{source} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    loader = None
    try:
        loader = _SettingsLoader(text)  # refuses control characters already
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {_yaml_problem(exc)}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What YAML found wrong and where, in one short line (its own message spans several)."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem is None:
        return one_line(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 160)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    context = getattr(exc, "context", None)
    return one_line(f"{context + ', ' if context else ''}{problem}{where}", 200)
