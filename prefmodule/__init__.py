"""prefmodule: Lightning-native preference optimisation (DPO, KTO, ORPO, SimPO, CPO) for Hugging Face causal LMs."""

from prefmodule.training.callbacks import silence_lightning_tips
from prefmodule.data import DataValidationError, PreferenceDataModule
from prefmodule.objectives import (
    BetaDPOSettings, CPOModule, DPOModule, KTOModule, ORPOModule, PreferenceModule, ReferenceModule, SimPOModule,
)

silence_lightning_tips()

__version__ = "0.1.0"
__all__ = [
    "BetaDPOSettings", "CPOModule", "DPOModule", "DataValidationError", "KTOModule", "ORPOModule",
    "PreferenceDataModule", "PreferenceModule", "ReferenceModule", "SimPOModule",
]
