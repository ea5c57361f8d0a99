"""`shoal node` flags that become worker settings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from shoal.cli import build_parser
from shoal.commands.node import STAGES, build_settings
from shoal.worker.plan import DEFAULT_DEADLINES, StageDeadlines


def test_stage_names_are_the_deadline_fields() -> None:
    assert tuple(field.name for field in dataclasses.fields(StageDeadlines)) == STAGES


def test_runner_flags_become_settings(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["node", "--data-dir", str(tmp_path), "--runner-threads", "2", "--runner-deadline", "loading=3"]
    )
    settings = build_settings(args)
    assert settings.runner_threads == 2
    assert settings.runner_deadlines == dataclasses.replace(DEFAULT_DEADLINES, loading=3.0)
    assert settings.models_dir == tmp_path / "models"
    assert settings.compile_decode  # by default; --no-compile turns it off
    assert not build_settings(build_parser().parse_args(["node", "--no-compile"])).compile_decode
    hub = build_parser().parse_args(["node", "--hub-endpoint", "http://127.0.0.1:9", "--offline"])
    assert (build_settings(hub).hub_endpoint, build_settings(hub).offline) == ("http://127.0.0.1:9", True)


@pytest.mark.parametrize(
    "flag",
    [["--runner-deadline", "napping=3"], ["--runner-deadline", "loading=0"], ["--runner-threads", "0"]],
)
def test_bad_runner_flags_are_refused(flag: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["node", *flag])
    assert exc.value.code == 2
