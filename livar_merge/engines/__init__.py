"""Engines: what moves client updates to the server's round.

``inprocess``   ``livar-fed``'s default engine: clients trained one after another in this process
``ray_engine``  independent run folders (sweep cells, calibration proxy runs) as Ray tasks
The Flower engine is the :mod:`livar_merge.flower` package (its name is part of Flower apps'
configuration).
"""
