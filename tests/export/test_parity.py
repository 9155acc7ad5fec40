"""The parity gate: every output against PyTorch float32 and float64, its own widened tolerance, a cap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export import onnx_export, vit
from export.onnx_export import PARITY_BATCH, PARITY_CAP, Compared, ExportError, check_parity, require_parity
from service.manifest import read_manifest
from tests.conftest import tiny_checkpoint

RNG = np.random.default_rng(0)
EXACT = RNG.normal(size=(50, 11))


def compared(name: str, float32_error: float, onnx_error: float) -> Compared:
    """PyTorch float32 off the exact answer by `float32_error`, ONNX Runtime off PyTorch by `onnx_error`."""
    single = EXACT + float32_error * np.sign(RNG.normal(size=EXACT.shape))
    return Compared(name, single + onnx_error, single, EXACT)


def test_each_output_is_held_to_its_own_float32_error() -> None:
    """Noisy logits widen the logits' tolerance only: the boxes' stays 1e-4 (it was the logits' before)."""
    logits, boxes = compared("main.logits", 3e-4, 5e-4), compared("main.boxes", 1e-6, 5e-4)
    parity = check_parity([logits, boxes], batch_size=7)
    assert [o.tolerance for o in parity.outputs] == pytest.approx([6e-4, 1e-4])
    assert parity.outputs[1].onnx_float64_error == pytest.approx(5e-4 + 1e-6)
    assert parity.outputs[1].float32_error == pytest.approx(1e-6)
    with pytest.raises(ExportError, match=r"main\.boxes 0\.0005 \(tolerance 0\.0001\)"):
        require_parity(parity)
    require_parity(check_parity([logits, compared("main.boxes", 1e-6, 5e-5)], batch_size=7))


def test_the_widening_is_capped() -> None:
    parity = check_parity([compared("main.logits", 5e-3, 2e-3)], batch_size=7)
    assert parity.tolerance == PARITY_CAP == 1e-3 and parity.cap == PARITY_CAP
    with pytest.raises(ExportError, match="parity failed"):
        require_parity(parity)


def test_a_changed_argmax_fails_within_tolerance() -> None:
    single = EXACT.copy()
    single[3] = -10.0
    single[3, :2] = [1.0, 1.0 - 2e-5]  # a close runner-up...
    onnx = single.copy()
    onnx[3, 1] += 4e-5  # ...overtakes, by far less than the tolerance
    parity = check_parity([Compared("main.logits", onnx, single, EXACT)], batch_size=7)
    assert parity.max_abs_diff <= parity.tolerance and not parity.argmax_equal
    with pytest.raises(ExportError, match="argmax equal: False"):
        require_parity(parity)


@pytest.mark.parametrize(("output", "passes"), [(0, True), (1, False)])
def test_the_exporter_widens_only_the_noisy_output(
    output: int, passes: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PyTorch's float32 logits made 2e-4 off float64: ONNX logits 3e-4 off PyTorch pass (tolerance
    4e-4), ONNX attention 3e-4 off does not (its own float32 error is tiny: tolerance 1e-4)."""
    real_outputs, real_run = vit.torch_outputs, onnx_export.run_batched

    def noisy_float64(*args: object, double: bool = False, **kwargs: object) -> list[np.ndarray]:
        outputs = real_outputs(*args, double=double, **kwargs)  # type: ignore[arg-type]
        if double:
            outputs[0] = outputs[0] + 2e-4
        return outputs

    def drifting(*args: object, **kwargs: object) -> list[np.ndarray]:
        outputs = real_run(*args, **kwargs)  # type: ignore[arg-type]
        if len(outputs) > output:
            outputs[output][PARITY_BATCH + 1].flat[0] += 3e-4
        return outputs

    monkeypatch.setattr(vit, "torch_outputs", noisy_float64)
    monkeypatch.setattr(onnx_export, "run_batched", drifting)
    repository = tmp_path / "repo"
    if not passes:
        with pytest.raises(ExportError, match=r"attention\.attention"):
            vit.export(tiny_checkpoint(tmp_path / "t.pt"), repository, name="noisy")
        assert not repository.exists()
        return
    vit.export(tiny_checkpoint(tmp_path / "t.pt"), repository, name="noisy")
    parity = read_manifest(repository / "noisy" / "1").parity
    tolerances = {o.name: o.tolerance for o in parity.outputs}
    assert tolerances["main.logits"] == pytest.approx(4e-4, rel=0.01) and tolerances["attention.attention"] == 1e-4
    assert all(o.onnx_float64_error > 0 and o.float32_error > 0 for o in parity.outputs)


def test_an_output_measured_in_parts_has_the_figures_of_the_whole() -> None:
    """An image (or a layer) at a time, as ImageGPT's attention at real size is compared: the worst
    part's figures, tolerance included, are those of the whole batch measured at once."""
    quiet, noisy = compared("main.logits", 1e-6, 5e-5), compared("main.logits", 3e-4, 2e-4)
    arrays = [np.concatenate([getattr(quiet, f), getattr(noisy, f)]) for f in ("onnx", "float32", "float64")]
    whole = Compared("main.logits", *arrays)
    parts = [onnx_export.output_parity(c) for c in (quiet, noisy)]
    assert onnx_export.worst(parts) == onnx_export.output_parity(whole)
    assert onnx_export.parity_of([onnx_export.worst(parts)], 10, True) == check_parity([whole], 10)
