"""The frozen reference model of DPO, KTO and any objective scored against one: its four modes and the module
base that holds one."""

from prefmodule.reference.module import ReferenceModule

__all__ = ["ReferenceModule"]
