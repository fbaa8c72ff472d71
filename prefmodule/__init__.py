"""prefmodule: Lightning-native preference optimisation (DPO, ORPO, SimPO) for Hugging Face causal LMs."""

from prefmodule.callbacks import silence_lightning_tips
from prefmodule.data import DataValidationError, PreferenceDataModule
from prefmodule.modules import DPOModule, LoraSettings, ORPOModule, PreferenceModule, SimPOModule

silence_lightning_tips()

__version__ = "0.1.0"
__all__ = [
    "DPOModule", "DataValidationError", "LoraSettings", "ORPOModule", "PreferenceDataModule",
    "PreferenceModule", "SimPOModule",
]
