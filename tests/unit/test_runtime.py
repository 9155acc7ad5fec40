"""Session creation and the two ways of running a session."""

from __future__ import annotations

import numpy as np

from service.runtime import CPU, create_session, on_cuda, requested_providers, run
from service.settings import PROJECT_ROOT, Settings

VIT = PROJECT_ROOT / "model_repository" / "vit" / "1" / "model.onnx"


def test_io_binding_gives_the_same_outputs_as_run() -> None:
    """The path used on CUDA, exercised on the CPU provider (the same ONNX Runtime API)."""
    session = create_session(VIT, Settings(device="cpu"))
    feeds = {"pixel_values": np.random.default_rng(0).normal(size=(3, 1, 32, 32)).astype(np.float32)}
    (plain,) = run(session, feeds, io_binding=False)
    (bound,) = run(session, feeds, io_binding=True)
    np.testing.assert_array_equal(plain, bound)
    assert not on_cuda(session)


def test_cpu_is_always_the_last_resort() -> None:
    assert requested_providers("cpu") == [CPU]
    assert requested_providers("cuda")[-1] == CPU
    assert requested_providers("auto")[-1] == CPU
