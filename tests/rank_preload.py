"""Imported once by the server the test ranks fork from (tests/runs.py): what every rank would import anyway."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: F401
import torch  # noqa: F401

import lumina_ds.cli
import lumina_ds.training.session  # noqa: F401
