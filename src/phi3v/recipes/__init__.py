"""Recipes: whole training runs composed from the library (data, train, eval); `nano` trains phi3v-nano."""

from .nano import NANO_NUM_CROPS, NANO_SIZES, NANO_SYNTH, NanoPlan, run_recipe

__all__ = ["NANO_NUM_CROPS", "NANO_SIZES", "NANO_SYNTH", "NanoPlan", "run_recipe"]
