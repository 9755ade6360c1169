from trainer.training.progress import Progress, format_duration


def test_progress_lines_and_eta():
    now = [0.0]
    progress = Progress(100, start_step=20, every=10, stream=None, clock=lambda: now[0])
    lines = []
    for step in range(21, 41):
        now[0] += 0.5
        line = progress.update(step, loss=float(step), extras={"kl": 2.0})
        if line:
            lines.append(line)
    assert len(lines) == 3  # the run's first step, 30, 40
    assert lines[-1].startswith("step  40/100  loss ")
    assert "2.00 steps/s" in lines[-1] and "ETA 30s" in lines[-1] and "kl 2.0000" in lines[-1]
    budgeted = Progress(1000, every=1, budget_seconds=10, stream=None, clock=lambda: now[0])
    now[0] += 4
    assert "ETA 6s" in budgeted.update(1, 1.0)
    assert [format_duration(s) for s in (5, 381, 3720, 200000)] == ["5s", "6m21s", "1h02m", "2d07h"]
