"""MLP-Mixer on CIFAR-100: config, data, model, training, evaluation."""

import os

# Under `uv run` (the README's commands, the tests), Ray gives the workers of a driver it finds
# under `uv run` a uv environment of their own, synced from a copy of the working folder: PyPI's
# CUDA build of torch and the rest, gigabytes and minutes per fresh machine, and a second copy of
# the code. Workers here run in the installed environment instead. Ray reads this switch once, as
# it is first imported, so it is set here, before any module of the package imports Ray; a value
# the user set wins.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
