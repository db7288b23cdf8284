"""Shared helpers of the Python tests: paths, the PyTorch reference (reference/dmkd_ref.py)."""

import os
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
REFERENCE = os.path.join(REPO, "reference")
FIXTURES = os.path.join(REFERENCE, "fixtures")
EXAMPLES = os.path.join(REPO, "python", "examples")

if REFERENCE not in sys.path:
    sys.path.insert(0, REFERENCE)


@pytest.fixture(scope="session")
def ref():
    """The independent PyTorch reference implementation."""
    import dmkd_ref

    return dmkd_ref
