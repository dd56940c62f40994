"""gptdist benchmarks: `python -m bench`."""
