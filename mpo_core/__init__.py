"""Log-linear mixing of aligned causal LMs: config, loading, mixing, sampling, engine, fitting.

This package has no web imports; ``server`` is a thin HTTP layer over it.
"""

__version__ = "0.1.0"
