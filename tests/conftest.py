# Make helper modules in tests/ (e.g. ``models.py``) importable as top-level
# modules from test files: ``from models import tiny_gpt2``.
# Fixtures may be appended below.
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
