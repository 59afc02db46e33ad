"""Earlier names of options, still accepted with a DeprecationWarning that names the new one."""

from __future__ import annotations

import warnings


def renamed_option(old_name: str, old_value: object, new_name: str, new_value: object, default: object) -> object:
    """The option's value: `new_value`, or `old_value` when given under the earlier name `old_name`
    (with a DeprecationWarning). `default` is the new name's default, which stands for "not given";
    both names given is an error."""
    if old_value is None:
        return new_value
    new_given = new_value is not None and (default is None or new_value != default)
    if new_given:
        raise ValueError(f"{old_name} / {new_name}: pass {new_name}= only ({old_name}= is its earlier name)")
    warnings.warn(f"{old_name}= is deprecated; pass {new_name}= instead", DeprecationWarning, stacklevel=3)
    return old_value
