"""Token mixers behind one contract (see ``base.py``). Importing this package registers
every mixer; ``available()`` lists them and ``build(name, d_model=..., **kw)`` makes one."""

from seqzoo.mixers.base import (
    ConfigError,
    MixerConfig,
    State,
    TokenMixer,
    available,
    build,
    get,
    make_config,
    register,
)


def _import_all_mixer_modules() -> None:
    """Import every module of this package: each registers its mixers with ``register``.
    A new mixer is one new file here, with no list to edit."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all_mixer_modules()

__all__ = [
    "ConfigError", "MixerConfig", "State", "TokenMixer", "available", "build", "get",
    "make_config", "register",
]
