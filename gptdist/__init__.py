"""gptdist: nanoGPT's GPT-2, trained at cluster scale on Ray Train, tracked in MLflow."""

__version__ = "0.1.0"
