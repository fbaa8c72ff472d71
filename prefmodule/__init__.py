"""prefmodule: Lightning-native preference optimisation (DPO, KTO, ORPO, SimPO, CPO, GRPO, RLOO) for Hugging Face
causal LMs."""

from prefmodule.data import BatchFormat, DataValidationError, PreferenceDataModule
from prefmodule.objectives import (
    BetaDPOSettings, CPOModule, DPOModule, GRPOModule, KTOModule, OnlineDPOModule, ORPOModule, PreferenceModule,
    ReferenceModule, RewardModule, RLOOModule, SamplePairsModule, SimPOModule,
)
from prefmodule.outputs.loggers import silence_lightning_tips

silence_lightning_tips()

__version__ = "0.1.0"
__all__ = [
    "BatchFormat", "BetaDPOSettings", "CPOModule", "DPOModule", "DataValidationError", "GRPOModule", "KTOModule",
    "ORPOModule", "OnlineDPOModule", "PreferenceDataModule", "PreferenceModule", "RLOOModule", "ReferenceModule",
    "RewardModule", "SamplePairsModule", "SimPOModule",
]
