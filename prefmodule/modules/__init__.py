from prefmodule.modules.base import PreferenceModule
from prefmodule.modules.cpo import CPOModule
from prefmodule.modules.dpo import BetaDPOSettings, DPOModule
from prefmodule.modules.kto import KTOModule
from prefmodule.modules.orpo import ORPOModule
from prefmodule.modules.reference import ReferenceModule
from prefmodule.modules.simpo import SimPOModule

__all__ = [
    "BetaDPOSettings", "CPOModule", "DPOModule", "KTOModule", "ORPOModule", "PreferenceModule", "ReferenceModule",
    "SimPOModule",
]
