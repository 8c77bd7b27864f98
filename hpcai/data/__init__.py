"""Datasets: raw sources and generators, the sharded HDF5 build (:mod:`.etl`), reading (:mod:`.shards`),
per-rank batches (:mod:`.loader`) and the ``hpcai data`` commands (:mod:`.commands`).

Nothing is imported here. The file exists so that ``hpcai.data`` is a regular package: setup.cfg's
``packages = find:`` leaves a directory without it out of the wheel.
"""
