"""Workspace tooling for the ds monorepo.

Each module is a command: ``python -m tools.workspace``, ``tools.check_versions``,
``tools.affected``, ``tools.bump`` and ``tools.release``. They use only the standard library
and ``packaging`` so that CI can run them before any package is installed; they need Python
3.11 or newer (``tomllib``), which is what CI and the dev environment use.
"""
