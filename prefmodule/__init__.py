"""prefmodule: Lightning-native preference optimisation (DPO, ORPO, SimPO) for Hugging Face causal LMs."""

from prefmodule.data import DataValidationError, PreferenceDataModule
from prefmodule.modules import DPOModule, ORPOModule, PreferenceModule, SimPOModule

__version__ = "0.1.0"
__all__ = [
    "DPOModule", "DataValidationError", "ORPOModule", "PreferenceDataModule",
    "PreferenceModule", "SimPOModule",
]
