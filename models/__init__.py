"""The shared model package: UNet, noise schedules, samplers, the text encoder
wrapper, the inference pipeline and checkpoint I/O.

It ships with every registered model, so it imports torch, open_clip,
safetensors and Pillow only (plus mlflow, pandas and numpy in `mlflow_model.py`,
the pyfunc wrapper a model server loads), never anything else of the project.
"""

__version__ = "0.1.0"
