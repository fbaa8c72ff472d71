from prefmodule.modules.base import LoraSettings, PreferenceModule
from prefmodule.modules.cpo import CPOModule
from prefmodule.modules.dpo import BetaDPOSettings, DPOModule
from prefmodule.modules.kto import KTOModule
from prefmodule.modules.orpo import ORPOModule
from prefmodule.modules.reference import ReferenceModule
from prefmodule.modules.simpo import SimPOModule

__all__ = [
    "BetaDPOSettings", "CPOModule", "DPOModule", "KTOModule", "LoraSettings", "ORPOModule", "PreferenceModule",
    "ReferenceModule", "SimPOModule",
]
