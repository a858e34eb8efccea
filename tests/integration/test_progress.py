"""The server's rounds bar (fl_dplora/progress.py): on a terminal with elapsed time and ETA, ε and
the evaluation; nothing off a terminal or under CI; log lines go above it, and leaving the loop
restores the log handlers."""

from __future__ import annotations

import io
import logging
import re

import pytest

from fl_dplora import progress

ETA = re.compile(r"\[\d\d:\d\d<\d\d:\d\d")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("FL_DPLORA_PROGRESS", raising=False)
    monkeypatch.delenv("CI", raising=False)
    return monkeypatch


def test_shown_on_a_terminal_only(clean_env):
    assert progress.enabled(FakeTerminal())
    assert not progress.enabled(io.StringIO())


@pytest.mark.parametrize("env, tty, shown", [
    ({"CI": "true"}, True, False), ({"FL_DPLORA_PROGRESS": "0"}, True, False),
    ({"FL_DPLORA_PROGRESS": "1"}, False, True), ({"FL_DPLORA_PROGRESS": "1", "CI": "true"}, True, True),
    ({"CI": "false"}, True, True),
])
def test_ci_and_the_variable(clean_env, env, tty, shown):
    for k, v in env.items():
        clean_env.setenv(k, v)
    assert progress.enabled(FakeTerminal() if tty else io.StringIO()) is shown


def test_the_bar_counts_rounds_with_eta_and_the_round_s_numbers(clean_env):
    out = FakeTerminal()
    rounds = progress.RoundsProgress(1, 3, stream=out)
    seen = []
    for rnd in rounds:
        seen.append(rnd)
        rounds.show({"round": rnd, "epsilon": 0.5 * rnd, "eval_loss": 1.25, "eval_accuracy": 0.75})
    assert seen == [1, 2, 3]
    text = out.getvalue()
    assert "rounds:" in text and "3/3" in text and ETA.search(text), text
    assert "eps=1.5 loss=1.2500 acc=0.750" in text


def test_a_resumed_run_starts_at_its_rounds_done(clean_env):
    out = FakeTerminal()
    assert list(progress.RoundsProgress(3, 4, stream=out)) == [3, 4]
    assert "2/4" in out.getvalue() and "4/4" in out.getvalue()


def test_nothing_is_written_off_a_terminal(clean_env):
    out = io.StringIO()
    rounds = progress.RoundsProgress(1, 2, stream=out)
    for rnd in rounds:
        rounds.show({"epsilon": 1.0})
    assert out.getvalue() == ""


def test_log_lines_go_above_the_bar_and_handlers_come_back(clean_env, monkeypatch):
    import sys

    out = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", out)  # the terminal our log handler and the bar both write to
    log = logging.getLogger("fl_dplora")
    handler = logging.StreamHandler(sys.stderr)
    monkeypatch.setattr(log, "handlers", [handler])
    with pytest.raises(RuntimeError):
        for rnd in progress.RoundsProgress(1, 5):
            log.warning("round %d finished", rnd)
            if rnd == 2:
                raise RuntimeError("a round failed")
    assert log.handlers == [handler]  # restored, though the loop left with an exception
    lines = out.getvalue().replace("\r", "\n").splitlines()
    assert "round 1 finished" in lines and "round 2 finished" in lines, out.getvalue()
    assert any(line.startswith("rounds:") and "1/5" in line for line in lines), out.getvalue()


@pytest.mark.slow
def test_a_run_shows_the_bar_on_a_terminal(clean_env, monkeypatch, tmp_path):
    import sys

    from harness import run_in_process

    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    run_in_process(2, output_dir=tmp_path / "run", num_server_rounds=2, local_steps=1, max_seq_len=48)
    text = term.getvalue()
    assert "rounds:" in text and "2/2" in text and ETA.search(text), text
    assert re.search(r"loss=\d+\.\d{4} acc=\d\.\d{3}", text), text
