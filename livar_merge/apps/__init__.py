"""Applications: the command lines and what only they use.

``fed_cli``       ``livar-fed``
``sweep``         ``livar-sweep`` (a grid of runs) and ``grid_results`` (its tables)
``export``        ``livar-export`` (a package: source, check, timm and peft writers, CLI)
``livar-calibrate`` is :mod:`livar_calib`; the figures and tables are :mod:`analysis`.
"""
