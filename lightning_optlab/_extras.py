"""Optional dependencies ("extras"): what to install when one is missing, in one line.

A plain ``pip install lightning_optlab`` has no ``lm-eval`` (the ``eval`` extra), no ``datasets``
(the ``data`` extra) and no ``mup``. ``mup`` is in no extra on purpose: mup 1.0.0 declares
``torchvision`` as a requirement, and the registry's torchvision fails to import beside a CPU
torch build, which then breaks ``import lightning``; mup itself never imports torchvision, so it
is installed with ``--no-deps``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtraError", "install_hint", "missing_extra", "require"]

#: top-level module -> (what needs it, the install command)
EXTRAS: dict[str, tuple[str, str]] = {
    "mup": ("μP", "pip install --no-deps mup==1.0.0  (--no-deps: mup 1.0.0 declares torchvision, whose registry "
                  "build fails to import beside a CPU torch and breaks `import lightning`; mup never imports it)"),
    "lm_eval": ("zero-shot evaluation", "pip install 'lightning_optlab[eval]'"),
    "datasets": ("streaming from the Hugging Face hub", "pip install 'lightning_optlab[data]'"),
    "transformers": ("Hugging Face models (export, tokenizers)", "pip install transformers"),
}


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency is not installed; the message says what needs it and how to install it."""


def install_hint(module: str) -> str:
    """``"<feature> needs the `<module>` package: <install command>"``."""
    what, command = EXTRAS[module]
    return f"{what} needs the `{module}` package, which is not installed: {command}"


def missing_extra(err: BaseException) -> str | None:
    """The one-line install hint when ``err`` is a missing optional dependency, else None."""
    if isinstance(err, MissingExtraError):
        return str(err)
    name = getattr(err, "name", None)
    if isinstance(err, ModuleNotFoundError) and name and name.split(".")[0] in EXTRAS:
        return install_hint(name.split(".")[0])
    return None


def require(module: str) -> ModuleType:
    """``import module``, or a :class:`MissingExtraError` saying how to install it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] == module.split(".")[0]:
            raise MissingExtraError(install_hint(module.split(".")[0]), name=err.name) from None
        raise
