"""fxsight's benchmark suite: ``python -m perf`` (see ``perf/__main__.py``)."""
