from prefmodule.data.datamodule import PreferenceDataModule
from prefmodule.data.formats import DataValidationError

__all__ = ["DataValidationError", "PreferenceDataModule"]
