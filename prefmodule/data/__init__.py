from prefmodule.data.contract import BatchFormat
from prefmodule.data.datamodule import PreferenceDataModule
from prefmodule.data.formats import DataValidationError

__all__ = ["BatchFormat", "DataValidationError", "PreferenceDataModule"]
