"""The model card of the exported model, and ``push_to_hub`` with the Hub faked at ``HfApi`` (out of reach here)."""

import logging

import lightning as L
import pytest
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.repocard import RepoCard
from huggingface_hub.hf_api import RepoUrl
from transformers import AutoModelForCausalLM

import prefmodule
from prefmodule import DPOModule, PreferenceDataModule
from prefmodule.errors import ConfigError
from prefmodule.outputs.hub import HubSettings
from prefmodule.outputs.modelcard import write_model_card
from prefmodule.training.fit_end import PushToHub

from conftest import TINY_MODEL
from test_cli import CONFIGS, fails_with


def test_fit_writes_the_card_and_pushes_model_and_card(tmp_path, small_data, monkeypatch, caplog):
    calls = []

    def create_repo(self, repo_id, **options):
        calls.append(("create_repo", repo_id, options))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **options):
        calls.append(("upload_folder", options, ModelCard.load(options["folder_path"] + "/README.md")))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    module = DPOModule(model=TINY_MODEL, loss_type="ipo", beta=0.2, lr=1e-3)
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=1, val_check_interval=1, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[PushToHub("me/tiny-ipo", private=False)])
    data = PreferenceDataModule(train=small_data[0], val=small_data[1], batch_size=8)
    with caplog.at_level(logging.INFO):
        trainer.fit(module, datamodule=module.connect(data))
    hf_dir = tmp_path / "lightning_logs" / "version_0" / "hf_model"

    (create, upload) = calls
    assert create == ("create_repo", "me/tiny-ipo", {"private": False, "repo_type": "model", "exist_ok": True})
    assert upload[1]["repo_id"] == "me/tiny-ipo" and upload[1]["folder_path"] == str(hf_dir)
    card = upload[2]  # the card was written before the upload
    assert card.data.library_name == "transformers" and card.data.tags == ["prefmodule", "dpo", "ipo"]
    assert card.data.base_model is None  # a shipped asset is no Hub model
    assert "**IPO** (Azar et al., 2023" in card.text and "arxiv.org/abs/2310.12036" in card.text
    assert "| beta | `0.2` |" in card.text and "| loss_type | `ipo` |" in card.text
    assert "| data.batch_size | `8` |" in card.text and "| optimizer steps | `1` |" in card.text
    assert f"- train: `{small_data[0]}`" in card.text
    accuracy = trainer.callback_metrics["val/rewards/accuracies"].item()
    assert f"| val/rewards/accuracies | {accuracy:.4f} |" in card.text
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-ipo")' in card.text
    assert "HF model: " + str(hf_dir) + " (pushed to https://huggingface.co/me/tiny-ipo)" in caplog.text
    AutoModelForCausalLM.from_pretrained(hf_dir)  # the card sits next to a loadable model

    # Hub ids become metadata; local paths stay out of it.
    module.model_settings.model = "meta-llama/Llama-3.2-1B"
    data.groups = PreferenceDataModule(train=["HuggingFaceH4/ultrafeedback_binarized?split=train_prefs",
                                              small_data[0]], val=small_data[1]).groups
    card = RepoCard.load(write_model_card(str(tmp_path / "card"), module, trainer))
    assert card.data.base_model == "meta-llama/Llama-3.2-1B"
    assert card.data.datasets == ["HuggingFaceH4/ultrafeedback_binarized"]


def test_hub_settings_need_a_repository_id_and_an_export(tmp_path, small_data, capsys):
    assert PushToHub("me/model").settings == HubSettings("me/model", private=True)  # private unless said otherwise
    assert PushToHub().settings is None  # no repository: no upload
    with pytest.raises(ConfigError, match="push_to_hub.repo_id: 'not a repo' is not a Hub repository id"):
        PushToHub("not a repo")
    code, error = fails_with(capsys, "fit", "--config", str(CONFIGS / "dpo.yaml"), f"--data.train={small_data[0]}",
                             "--push_to_hub.repo_id=me/model", "--export.enabled=false",
                             f"--trainer.default_root_dir={tmp_path}")
    assert (code, error) == (2, "prefmodule: error: push_to_hub.repo_id='me/model' uploads the export, and "
                                "export.enabled=false leaves none: drop one of the two")


def test_each_objective_cites_its_own_paper():
    from prefmodule import CPOModule, KTOModule
    from prefmodule.outputs.modelcard import _objective

    def cited(module):
        family, (name, _, arxiv) = _objective(module)
        return family, name, arxiv

    assert cited(KTOModule(model=TINY_MODEL)) == ("KTO", "KTO", "2402.01306")
    assert cited(KTOModule(model=TINY_MODEL, loss_type="apo_zero_unpaired")) == ("KTO", "APO", "2408.06266")
    assert cited(CPOModule(model=TINY_MODEL, loss_type="ipo")) == ("CPO", "CPO", "2401.08417")  # not DPO's IPO
    assert cited(CPOModule(model=TINY_MODEL, loss_type="simpo", alpha=0.25)) == ("CPO", "AlphaPO", "2501.03884")
    assert cited(DPOModule(model=TINY_MODEL, loss_type="ipo")) == ("DPO", "IPO", "2310.12036")
    online = prefmodule.OnlineDPOModule(model=TINY_MODEL, reward="prefmodule.sampling.rules:politeness",
                                        loss_type="ipo")
    assert cited(online) == ("Online DPO", "Online DPO", "2402.04792")  # DPO's loss papers are DPO's
    trains = [getattr(prefmodule, name) for name in prefmodule.__all__ if name.endswith("Module")
              and name not in ("PreferenceModule", "ReferenceModule", "SamplePairsModule", "PreferenceDataModule")]
    assert len(trains) == 9 and all(len(module.citation) == 3 for module in trains)  # each its own, in its own file
