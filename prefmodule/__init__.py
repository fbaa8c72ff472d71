"""prefmodule: Lightning-native preference optimisation (DPO, KTO, ORPO, SimPO, CPO) for Hugging Face causal LMs."""

from prefmodule.data import DataValidationError, PreferenceDataModule
from prefmodule.modules import (
    BetaDPOSettings, CPOModule, DPOModule, KTOModule, LoraSettings, ORPOModule, PreferenceModule, ReferenceModule,
    SimPOModule,
)

__version__ = "0.1.0"
__all__ = [
    "BetaDPOSettings", "CPOModule", "DPOModule", "DataValidationError", "KTOModule", "LoraSettings", "ORPOModule",
    "PreferenceDataModule", "PreferenceModule", "ReferenceModule", "SimPOModule",
]
