"""Lets the training tests import their helpers (pytest runs in importlib mode, which adds no test folder to
sys.path)."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
