from prefmodule.objectives.base import PreferenceModule
from prefmodule.objectives.cpo import CPOModule
from prefmodule.objectives.dpo import BetaDPOSettings, DPOModule
from prefmodule.objectives.kto import KTOModule
from prefmodule.objectives.orpo import ORPOModule
from prefmodule.reference.module import ReferenceModule
from prefmodule.objectives.simpo import SimPOModule

__all__ = [
    "BetaDPOSettings", "CPOModule", "DPOModule", "KTOModule", "ORPOModule", "PreferenceModule", "ReferenceModule",
    "SimPOModule",
]
