"""Script templates with values that can never become code.

A template marks values with ``{{ name }}``. Every value is passed through
``shlex.quote`` (a list becomes its quoted items joined by spaces), so a job name, a path
or an override containing spaces, quotes, ``;`` or ``$(...)`` reaches the command as one
literal argument. Only blocks the launcher assembled itself from quoted parts, and the
profile's own ``setup`` shell lines, are inserted verbatim with ``{{ name | raw }}``.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any, Callable, Mapping

from launcher.errors import LaunchError
from launcher.profiles import cluster_dir

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*(\|\s*raw\s*)?\}\}")


def shell_value(value: Any) -> str:
    """One shell word (or, for a list, several) that means exactly ``value``."""
    if isinstance(value, (list, tuple)):
        return " ".join(shlex.quote(str(v)) for v in value)
    if isinstance(value, bool):
        value = int(value)
    return shlex.quote(str(value))


def yaml_value(value: Any) -> str:
    """A YAML scalar (or flow list) that means exactly ``value``: JSON is valid YAML."""
    return json.dumps(value)


def render(template: str, values: Mapping[str, Any], source: str | Path = "<template>",
           quote: Callable[[Any], str] = shell_value) -> str:
    """Fill ``{{ name }}`` (quoted with ``quote``: shell words by default, YAML scalars
    with ``yaml_value``) and ``{{ name | raw }}`` (verbatim) placeholders.

    Raises LaunchError naming the template and the placeholder when a value is missing.
    """
    def fill(match: re.Match) -> str:
        name, raw = match.group(1), match.group(2)
        if name not in values:
            raise LaunchError(f"{source}: placeholder {{{{ {name} }}}} has no value; "
                              f"known: {sorted(values)}")
        value = values[name]
        if raw:
            return "\n".join(value) if isinstance(value, (list, tuple)) else str(value)
        return quote(value)

    return _PLACEHOLDER.sub(fill, template)


def template_path(template: str, profile_path: Path, kind_dir: str) -> Path:
    """Where a profile's template is: an absolute path as it is, a relative path with a
    folder relative to the profile's folder, a bare name in ``cluster/<kind_dir>/``."""
    t = Path(template)
    if t.is_absolute():
        return t
    if len(t.parts) > 1:
        return profile_path.parent / t
    return cluster_dir() / kind_dir / t
