"""The Hugging Face Hub: where the exported model goes after ``fit`` (:class:`HubSettings`), and which names are
Hub repository ids."""

from __future__ import annotations

import os
from dataclasses import dataclass

from huggingface_hub import HfApi
from huggingface_hub.utils import HFValidationError, validate_repo_id

from prefmodule.errors import ConfigError


@dataclass(frozen=True)
class HubSettings:
    """Where the exported model is uploaded after ``fit``: the repository ``repo_id`` (``owner/name``), created
    if missing, ``private`` unless set to false. The token comes from ``HF_TOKEN`` or ``hf auth login``."""

    repo_id: str
    private: bool = True

    def __post_init__(self):
        try:
            validate_repo_id(self.repo_id)
        except HFValidationError as error:
            raise ConfigError(f"push_to_hub.repo_id: {self.repo_id!r} is not a Hub repository id "
                              f"(owner/name): {error}") from None


def push_to_hub(folder: str, settings: HubSettings) -> str:
    """Upload ``folder`` (model, tokenizer, card) to the Hub; returns the repository's URL."""
    api = HfApi()
    url = api.create_repo(settings.repo_id, private=settings.private, repo_type="model", exist_ok=True)
    api.upload_folder(repo_id=url.repo_id, folder_path=folder, repo_type="model",
                      commit_message="Upload model trained with prefmodule")
    return str(url)


def hub_id(name: str | None) -> str | None:
    """``name`` as a Hub repository id (``owner/name``, any ``?split=...`` dropped), or ``None`` for local paths."""
    if not name or "://" in name or os.path.exists(name):
        return None
    name = name.split("?")[0]
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name if name.count("/") == 1 else None
