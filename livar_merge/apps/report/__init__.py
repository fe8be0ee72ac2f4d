"""``livar-report PATH``: one self-contained HTML file for a run, a sweep or a calibration
(:mod:`.run`, :mod:`.sweep`, :mod:`.calibration`; the page in :mod:`.page`)."""
