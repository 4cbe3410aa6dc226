"""Build a Jupyter scientific workstation image from an Armbian image for Orange Pi boards.

The pipeline, one module per stage (see builder/pipeline.py for the order):
  config.py   settings: defaults.yaml, --config files, --set overrides, validated up front
  boards.py   the Orange Pi board catalog (boards.yaml)
  armbian.py  which Armbian image to start from (Armbian's index)
  fetch.py    where the base image is downloaded, verified, decompressed and cached
"""

__version__ = "0.1.0"
