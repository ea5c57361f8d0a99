"""Which models a node can serve, by name: the embedded default, a local folder or GGUF file, or an entry
of the node's models directory. `resolve_model` turns a name into a path and a `ModelCard`.

Names: "default" or the embedded model's name -> the embedded GGUF; an existing path (folder or .gguf) ->
that path, named by its last component; otherwise an entry of `models_dir` with that name. A card's
`source` is the resolved absolute path the runners load, so every node of an instance needs the model at
the same path (true for the embedded model and a shared models directory).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shoal.engine.embedded import EMBEDDED_MODEL_NAME, embedded_model_path
from shoal.engine.errors import ModelLoadError
from shoal.engine.loader import load_config
from shoal.master.model_card import model_card_from_config
from shoal.paths import user_path
from shoal.types.instances import ModelCard

DEFAULT_MODEL = "default"


class ModelNotFoundError(LookupError):
    """No model of that name here; the message says where it looked."""


@dataclass(frozen=True, slots=True)
class LocalModel:
    model_id: str
    path: Path
    embedded: bool = False


def resolve_path(name: str, models_dir: Path | None) -> LocalModel:
    if name in (DEFAULT_MODEL, EMBEDDED_MODEL_NAME):
        try:
            return LocalModel(EMBEDDED_MODEL_NAME, embedded_model_path(), embedded=True)
        except ModelLoadError as error:
            raise ModelNotFoundError(str(error)) from error
    candidates = [user_path(name)]
    if models_dir is not None and "/" not in name and name not in ("", ".", ".."):
        candidates.append(models_dir / name)
    for path in candidates:
        if path.exists():
            return LocalModel(path.name, path.resolve())
    where = f" or in the models directory {models_dir}" if models_dir is not None else ""
    raise ModelNotFoundError(
        f"unknown model {name!r}: not {DEFAULT_MODEL!r}/{EMBEDDED_MODEL_NAME!r}, not a path{where}"
    )


def resolve_model(name: str, models_dir: Path | None) -> ModelCard:
    """The card of model `name` (reads its config; blocking). ModelNotFoundError / ModelLoadError."""
    local = resolve_path(name, models_dir)
    config = load_config(local.path)
    return model_card_from_config(config, model_id=local.model_id, source=str(local.path))


def local_models(models_dir: Path | None) -> list[LocalModel]:
    """The embedded model (when installed) and every entry of the models directory."""
    found: list[LocalModel] = []
    try:
        embedded: Path | None = embedded_model_path()
    except ModelLoadError:
        embedded = None  # not installed: not listed (resolve_path says why when asked for it)
    if embedded is not None:
        found.append(LocalModel(EMBEDDED_MODEL_NAME, embedded, embedded=True))
    if models_dir is not None and models_dir.is_dir():
        for entry in sorted(models_dir.iterdir()):
            if entry.suffix.lower() == ".gguf" or (entry / "config.json").is_file():
                found.append(LocalModel(entry.name, entry.resolve()))
    return found


def matches(name: str, card: ModelCard) -> bool:
    """Whether a request for model `name` can be served by an instance of `card`."""
    if name == DEFAULT_MODEL:
        return card.model_id == EMBEDDED_MODEL_NAME
    if name in (card.model_id, card.source):
        return True
    try:
        return str(user_path(name).resolve()) == card.source
    except (ValueError, OSError, RuntimeError):  # not a usable path (a NUL byte, a symlink loop): a name only
        return False
