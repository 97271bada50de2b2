"""What some tests need from outside the repository: fail under CI=true (nothing may skip there), else skip."""

import os

import pytest


def missing(message: str) -> None:
    """Fail the test in CI, skip it elsewhere."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def require_onnx() -> None:
    """The `fnclass[onnx]` extra (onnx, onnxscript, onnxruntime), which CI installs."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        missing("the onnx extra is not installed: pip install -e '.[onnx]'")
