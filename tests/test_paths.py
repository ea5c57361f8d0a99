"""A `~user` that has no home here: a name that is no path, never a crash (`shoal.paths.user_path`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.commands.placing import is_hub_repo_id
from shoal.engine.errors import ModelLoadError
from shoal.engine.loader import open_source
from shoal.models import ModelNotFoundError, matches, resolve_model, resolve_path
from shoal.paths import user_path

NO_SUCH_USER = "~shoal-no-such-user"


def test_user_path_expands_the_home_and_leaves_an_unknown_user_as_written() -> None:
    assert user_path("~/models/x") == Path.home() / "models" / "x"
    assert user_path(f"{NO_SUCH_USER}/x") == Path(f"{NO_SUCH_USER}/x")
    with pytest.raises(RuntimeError):  # what every caller met before
        Path(f"{NO_SUCH_USER}/x").expanduser()


def test_an_unknown_user_is_an_unknown_model_everywhere(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="unknown model"):
        resolve_path(f"{NO_SUCH_USER}/model", tmp_path)
    card = resolve_model("default", None)  # the embedded model's card
    assert not matches(NO_SUCH_USER, card)
    with pytest.raises(ModelLoadError, match="does not exist"):
        open_source(f"{NO_SUCH_USER}/model")
    assert not is_hub_repo_id(f"{NO_SUCH_USER}/model")
