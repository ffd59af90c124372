"""A small network registry: networks are created by name, tiny test variants registered like real ones.

Every registered factory accepts the shared keyword vocabulary ``spatial_dims``, ``modalities`` and
``out_channels`` and returns an ``nn.Module`` whose ``forward(image, available)`` takes
``image: (B, M, *spatial)`` and ``available: (B, M) bool``. One parametrised contract test
(``tests/networks/test_registry.py``) runs every entry forward and backward in 2D and 3D.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

F = TypeVar("F", bound=Callable[..., nn.Module])

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_network(name: str) -> Callable[[F], F]:
    """Class or function decorator adding a network factory under ``name``."""

    def deco(factory: F) -> F:
        if name in _REGISTRY:
            raise KeyError(f"network {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def list_networks() -> list[str]:
    """Names of every registered network, sorted."""
    _import_builtin()
    return sorted(_REGISTRY)


def network_argument_default(name: str, argument: str) -> Any:
    """The default of ``argument`` in the factory of network ``name``: ``inspect.Parameter.empty`` when it has no
    default, :class:`KeyError` when the factory (or the network) does not take it."""
    import inspect

    _import_builtin()
    if name not in _REGISTRY:
        raise KeyError(name)
    params = inspect.signature(_REGISTRY[name]).parameters
    if argument not in params:
        raise KeyError(argument)
    return params[argument].default


def create_network(name: str, **kwargs: Any) -> nn.Module:
    """Build the network registered as ``name`` with keyword arguments ``kwargs``.

    Raises:
        KeyError: unknown name (the message lists the known ones).
        TypeError: an unknown or missing keyword argument (the message names the network).
    """
    _import_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"unknown network {name!r}; registered networks: {', '.join(sorted(_REGISTRY))}")
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as err:
        raise TypeError(f"network {name!r}: {err}") from err


def _import_builtin() -> None:
    """Import every module of :mod:`medmodal.networks` (their ``@register_network`` decorators fill the
    registry), so a new network file registers itself without editing this one."""
    import importlib
    import pkgutil

    import medmodal.networks as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "registry":
            importlib.import_module(f"{package.__name__}.{info.name}")
