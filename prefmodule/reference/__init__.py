"""The frozen reference model of DPO, KTO and any objective scored against one: its four modes
(:mod:`prefmodule.reference.modes`); the objectives' base that holds one is
:class:`prefmodule.objectives.reference.ReferenceModule`."""
