"""THE lazy package attributes of both packages (``spavis``, ``stamp`` and their rooms).

A package lists what it exports and from which module (``_LAZY``: name -> module, or name ->
(module, attribute) where the name differs); the module is imported on first use, so
``import spavis`` / ``import stamp`` stay fast and pull in no pyarrow or torch. The layering
tests read the same ``_LAZY`` tables as import edges.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Sequence


def lazy_exports(
    package: str,
    table: Mapping[str, str | tuple[str, str]],
    *,
    submodules: Sequence[str] = (),
    extra: Sequence[str] = (),
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package`` (PEP 562) for the names in ``table``.

    ``submodules``: names that load ``package.NAME`` itself; ``extra``: names defined eagerly in
    the package, listed by ``dir()``. Nothing is cached: each access asks the module, so a
    monkeypatched function is the one a caller gets.
    """

    def __getattr__(name: str) -> Any:
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        target = table.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attr = (target, name) if isinstance(target, str) else target
        return getattr(importlib.import_module(module), attr)

    def __dir__() -> list[str]:
        return sorted({*table, *submodules, *extra})

    return __getattr__, __dir__
