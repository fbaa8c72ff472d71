from prefmodule.modules.base import PreferenceModule
from prefmodule.modules.dpo import DPOModule
from prefmodule.modules.orpo import ORPOModule
from prefmodule.modules.simpo import SimPOModule

__all__ = ["DPOModule", "ORPOModule", "PreferenceModule", "SimPOModule"]
