from prefmodule.modules.base import LoraSettings, PreferenceModule
from prefmodule.modules.dpo import DPOModule
from prefmodule.modules.orpo import ORPOModule
from prefmodule.modules.simpo import SimPOModule

__all__ = ["DPOModule", "LoraSettings", "ORPOModule", "PreferenceModule", "SimPOModule"]
