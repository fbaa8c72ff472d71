"""What a run leaves for people: samples, the report, the model card, the Hub upload, the loggers' tables."""
