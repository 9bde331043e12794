"""Experiments: many training runs from one config file.

  sweep.py          a config file's named groups of variants -> `lora-jax train` runs
  paper_regimes.py  what the paper's four regimes share (configs/paper/*): the variant string,
                    run names, the run config of a variant and the standard sweep groups
"""
