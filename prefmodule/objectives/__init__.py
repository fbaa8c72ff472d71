"""The objectives: one LightningModule each on a shared base, their pure losses, outputs and metrics."""

from prefmodule.objectives.base import PreferenceModule
from prefmodule.objectives.cpo import CPOModule
from prefmodule.objectives.dpo import BetaDPOSettings, DPOModule
from prefmodule.objectives.grpo import GRPOModule
from prefmodule.objectives.kto import KTOModule
from prefmodule.objectives.online_dpo import OnlineDPOModule
from prefmodule.objectives.orpo import ORPOModule
from prefmodule.objectives.reward import RewardModule
from prefmodule.objectives.reference import ReferenceModule
from prefmodule.objectives.rloo import RLOOModule
from prefmodule.objectives.sample_pairs import SamplePairsModule
from prefmodule.objectives.simpo import SimPOModule

__all__ = ["BetaDPOSettings", "CPOModule", "DPOModule", "GRPOModule", "KTOModule", "ORPOModule", "OnlineDPOModule",
           "PreferenceModule", "RLOOModule", "ReferenceModule", "RewardModule", "SamplePairsModule", "SimPOModule"]
