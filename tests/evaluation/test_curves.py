"""Reading metrics JSONL (resumed and torn files) and drawing the curriculum's loss curves to a PNG."""
import json
import struct

import pytest

from af2_jax.evaluation import curves


def _write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def test_read_metrics_keeps_the_last_record_of_a_resumed_step_and_skips_a_torn_line(tmp_path):
    # Steps 1-3, then a resume from the step-2 checkpoint replays 3 and adds 4; the final line was cut mid-write.
    records = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 3, "loss": 3.5},
               {"step": 3, "loss": 3.4}, {"step": 4, "loss": 3.0}]
    path = _write(tmp_path / "metrics.jsonl", records, tail='{"step": 5, "lo')
    assert [(r["step"], r["loss"]) for r in curves.read_metrics(path)] == [(1, 5.0), (2, 4.0), (3, 3.4), (4, 3.0)]


def test_a_bad_line_in_the_middle_is_an_error(tmp_path):
    path = _write(tmp_path / "m.jsonl", [{"step": 1, "loss": 1.0}], tail='oops\n{"step": 2, "loss": 0.5}\n')
    with pytest.raises(ValueError, match="line 2"):
        curves.read_metrics(path)


def test_stage_offsets_put_stages_one_after_another():
    stages = {"stage 1": [{"step": s} for s in range(1, 11)], "stage 2": [{"step": s} for s in range(1, 6)],
              "stage 3": [{"step": 1}]}
    assert curves.stage_offsets(stages) == {"stage 1": 0, "stage 2": 10, "stage 3": 15}


def test_plot_writes_a_png(tmp_path):
    stages = {f"stage {k}": [{"step": s, "loss": 6.0 / (s + k)} for s in range(1, 20)] for k in (1, 2, 3)}
    out = curves.plot_training_curves(stages, tmp_path / "plots" / "curves.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk: 8 x 4.5 inches at 100 dpi
    assert (width, height) == (800, 450)


def test_trailing_mean_by_hand():
    # window 2: [1], [1, 3], [3, 5], [5, 7]
    assert curves.trailing_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert curves.trailing_mean([2.0, 4.0], 1) == [2.0, 4.0]


def test_plot_of_a_long_noisy_run(tmp_path):
    stages = {"stage 1": [{"step": s, "loss": 5.0 - s / 100 + 0.3 * (-1) ** s} for s in range(1, 201)]}
    assert curves.plot_training_curves(stages, tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
