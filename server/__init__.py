"""HTTP service over ``mpo_core``: TGI- and OpenAI-compatible routes, profiles, metrics."""

from mpo_core import __version__

__all__ = ["__version__"]
